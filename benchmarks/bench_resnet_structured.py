"""Benchmark: filter pruning of a residual network (ResNet-8 on MNIST), with and without coupling the
layers that residual connections sum.

A ResNet-8 (stem conv 1->16 3x3, three stages of one basic block each, 16/32/64 channels, strides
1/2/2, 1x1 projection shortcuts where the shape changes, global average pool, dense 64->10; BN after
every conv) is trained in torch on ``../shared/data/mnist.npz`` and exported with torch's ONNX
exporter (which folds each BN into its conv, as a PyTorch user's export does). Then, in one run:

1. ``onnxadmm.compress(..., structure="filter")`` as shipped: the stem and each stage's summed
   layers keep the same filters (``coupled_layers``), so the residual streams lose channels too;
2. the same with the coupling switched off (``shrink.coupled_layers`` patched to find none), which
   is what the library did before: each layer chooses its filters alone and the streams' channels
   stay;
3. onnxruntime CPU latency at batch 64 (p50 of interleaved rounds, one thread) of the dense model and
   of both pruned models, side by side.

Accuracy is onnxruntime's on the 10,000 MNIST test images.

    python benchmarks/bench_resnet_structured.py --rates 4,10 --write
    python benchmarks/bench_resnet_structured.py --rates 4 --json a.json   # (in parallel: --rates 10 --json b.json)
    python benchmarks/bench_resnet_structured.py --merge a.json b.json --write
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_importer_speed import ResNet8  # noqa: E402
from bench_lenet_mnist import load_mnist, ort_accuracy, parse_value, train_epochs  # noqa: E402
from bench_lenet_structured import _weights, latency  # noqa: E402
from docs_section import write_section  # noqa: E402

SECTION = "ResNet-8 filter pruning: residual streams coupled"
DOCS = ROOT / "docs" / "benchmarks.md"
CACHE = ROOT / "benchmarks" / ".cache"


def dense_model(data, log, epochs: int = 3) -> Path:
    """The trained ResNet-8 as ONNX (cached by seed and epochs)."""
    path = CACHE / f"resnet8_mnist_e{epochs}.onnx"
    if path.exists():
        return path
    xt, yt, _, _ = data
    torch.manual_seed(0)
    net = ResNet8(in_channels=1)  # (bench_importer_speed's CIFAR-style ResNet-8, on 1-channel MNIST)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = epochs * math.ceil(len(xt) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.perf_counter()
    train_epochs(net, opt, xt, yt, epochs, np.random.default_rng(0), sched=sched)
    log(f"trained ResNet-8: {epochs} epochs, {time.perf_counter() - t0:.0f} s")
    net.eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.onnx.export(
        net, (torch.zeros(1, 1, 28, 28),), str(tmp), dynamo=False, input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, opset_version=13,
    )  # fmt: skip
    tmp.replace(path)
    return path


def compressible(path: Path) -> dict[str, tuple]:
    from onnxadmm.importer.analysis import find_weights
    from onnxadmm.modelio import load_model

    return {w.name: tuple(w.shape) for w in find_weights(load_model(path)) if w.compressible}


def run(model: Path, rate: float, coupled: bool, data, overrides: dict, work: Path, log) -> dict:
    import onnxadmm
    from onnxadmm.export import shrink

    xt, yt, xv, yv = data
    out = work / f"resnet8_filter_{rate:g}x_{'coupled' if coupled else 'alone'}.onnx"
    saved = shrink.coupled_layers
    if not coupled:
        shrink.coupled_layers = lambda model: []
    try:
        t0 = time.perf_counter()
        rep = onnxadmm.compress(
            model, out, {"x": xt, "y": yt}, val_data={"x": xv, "y": yv}, rate=rate, structure="filter",
            quiet=True, **overrides,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        shrink.coupled_layers = saved
    sizes = compressible(model)
    w = _weights(out)
    row = {
        "rate": rate,
        "coupled": coupled,
        "accuracy": ort_accuracy(out, xv, yv),
        "report_accuracy": rep["accuracy"]["compressed"],
        "params": int(sum(w[n].size for n in sizes)),
        "nonzero": int(sum(np.count_nonzero(w[n]) for n in sizes)),
        "dense_params": int(sum(math.prod(s) for s in sizes.values())),
        "channels_removed": sum(rep["shrunk"]["channels_removed"].values()) if rep.get("shrunk") else 0,
        "out_channels": {n: int(w[n].shape[0]) for n in sizes},
        "file_bytes": rep["file_bytes"]["compressed"],
        "seconds": wall,
        "path": str(out),
    }
    log(
        f"{rate:g}x {'coupled' if coupled else 'alone'}: accuracy {row['accuracy']:.4f}, "
        f"{row['params']:,} weights written ({row['nonzero']:,} non-zero), "
        f"{row['channels_removed']} channels removed, {wall:.0f} s"
    )
    return row


def section_text(rows, dense_acc, dense_params, lat, command, overrides) -> str:
    lines = [
        "ResNet-8 (stem conv 1->16, three basic blocks of 16/32/64 channels, 1x1 projection shortcuts, "
        "global pool, dense 64->10) trained in torch on MNIST (3 epochs, Adam one-cycle) and exported "
        "with `torch.onnx.export` (BN folded into the convolutions), "
        f"{dense_params:,} weights, **{dense_acc:.2%}** in onnxruntime on the 10,000 test images. "
        "Filter pruning (`structure=\"filter\"`), the dense head pruned weight by weight; "
        f"schedule: {', '.join(f'{k}={v}' for k, v in overrides.items()) or 'the defaults'}. "
        "*coupled*: the layers summed by each residual connection keep the same filters (the default); "
        "*alone*: each layer picks its filters by itself (the behaviour before), so the summed "
        "channels stay in the file. Latency: onnxruntime CPU, batch 64, one thread, p50 of interleaved "
        f"rounds, dense {lat['dense']:.2f} ms.",
        "",
        "| rate asked | filters | accuracy | weights written (non-zero) | channels removed | output channels, graph order (stem; per block: two convs, projection; head) | latency | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = f"{r['rate']:g}-{r['coupled']}"
        outs = ", ".join(str(v) for v in r["out_channels"].values())
        lines.append(
            f"| {r['rate']:g}x | {'coupled' if r['coupled'] else 'alone'} | {r['accuracy']:.2%} | "
            f"{r['params']:,} ({r['nonzero']:,}) | {r['channels_removed']} | {outs} | "
            f"{lat['dense'] / lat[key]:.2f}x faster | {r['seconds'] / 60:.1f} min |"
        )
    lines += ["", "Produced by:", "", "```", command, "```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="4,10")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="compress setting")
    ap.add_argument("--write", action="store_true", help="rewrite the docs section")
    ap.add_argument("--json", type=Path, help="write the rows here (to --merge runs made in parallel)")
    ap.add_argument("--merge", nargs="+", type=Path, help="merge row files (latency measured again)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = parse_value(v)
    data = load_mnist()
    model = dense_model(data, log)
    dense_acc = ort_accuracy(model, data[2], data[3])
    dense_params = sum(math.prod(s) for s in compressible(model).values())
    log(f"dense ResNet-8: {dense_acc:.4f}, {dense_params:,} weights")
    commands = ["python " + shlex.join(["benchmarks/bench_resnet_structured.py", *(argv or sys.argv[1:])])]
    if args.merge:
        blobs = [json.loads(p.read_text()) for p in args.merge]
        rows = [r for b in blobs for r in b["rows"]]
        overrides = blobs[0]["overrides"]
        commands = [b["command"] for b in blobs] + commands
    else:
        work = Path(tempfile.mkdtemp(prefix="resnet8-"))
        rows = []
        for rate in [float(r) for r in args.rates.split(",")]:
            for coupled in (True, False):
                rows.append(run(model, rate, coupled, data, overrides, work, log))
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "overrides": overrides, "command": commands[0]}, indent=1))
    paths = {"dense": str(model)} | {f"{r['rate']:g}-{r['coupled']}": r["path"] for r in rows}
    lat = latency(paths)
    text = section_text(rows, dense_acc, dense_params, lat, "\n".join(commands), overrides)
    print(text)
    if args.write:
        write_section(DOCS, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
