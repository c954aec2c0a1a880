"""Benchmark: structured ADMM pruning of LeNet-5 on MNIST, physically smaller layers in onnxruntime.

For each structure and rate, in one run:

1. ``onnxadmm.compress`` with ``structure=...`` on the cached dense LeNet-5 of ``bench_lenet_mnist``
   (60,000 training images, validated on the 10,000 test images): ADMM with group-norm projections,
   masked retraining, then the removed channels are cut out of the written ONNX layers;
2. the baseline with the same per-layer kept groups and the same epochs: iterative L2-norm group
   pruning (the criterion of ``torch.nn.utils.prune.ln_structured``) with masked fine-tuning, the
   classifier pruned by magnitude weight by weight as in the ADMM run;
3. onnxruntime CPU latency at batch 64 (p50 of interleaved rounds, one thread) of the dense model and
   of each structured model, side by side, quoted as a ratio.

    python benchmarks/bench_lenet_structured.py --structures filter --rates 10,30
    python benchmarks/bench_lenet_structured.py --json a.json; ... --merge a.json b.json --write
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_importer_speed import LeNet5  # noqa: E402
from bench_lenet_mnist import (  # noqa: E402
    WEIGHTS,
    admm_epochs,
    dense_model,
    load_mnist,
    ort_accuracy,
    parse_value,
    train_epochs,
)
from docs_section import write_section  # noqa: E402

SECTION = "LeNet-5 structured pruning"
DOCS = ROOT / "docs" / "benchmarks.md"
AXES = {"filter": 0, "channel": 1}  # torch layout: weight [out, in, ...]
BLOCKS = {"fc1.weight": 16}  # channel pruning of fc1: one group per conv2 channel (4x4 features)


def _weights(path: Path) -> dict[str, np.ndarray]:
    """Every weight of a model as a dense array (onnxadmm's packed storage decoded)."""
    from onnxadmm.export.storage import expand_storage
    from onnxadmm.export.writer import initializer_values
    from onnxadmm.modelio import load_model

    return initializer_values(expand_storage(load_model(path)))


def run_admm(model: Path, structure: str, rate: float, data, overrides: dict, work: Path, log) -> dict:
    from onnxadmm.compress.pipeline import compress

    xt, yt, xv, yv = data
    out = work / f"lenet5_{structure}_{rate:g}x.onnx"
    t0 = time.perf_counter()
    rep = compress(
        model, out, {"x": xt, "y": yt}, val_data={"x": xv, "y": yv}, rate=rate, structure=structure,
        quiet=True, log=lambda s: None, **overrides,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    w = _weights(out)
    shapes = {n: list(w[n].shape) for n in WEIGHTS}
    row = {
        "method": f"ADMM {structure}",
        "structure": structure,
        "rate": rate,
        "accuracy": rep["accuracy"]["compressed"],
        "original_accuracy": rep["accuracy"]["original"],
        "nonzero_rate": rep["pruning_rate"],
        "params": int(sum(np.prod(s) for s in shapes.values())),
        "nonzero": int(sum(np.count_nonzero(w[n]) for n in WEIGHTS)),
        "shapes": shapes,
        "file_bytes": rep["file_bytes"]["compressed"],
        "epochs": admm_epochs(rep["config"], len(rep["steps"]), len(xt)),
        "seconds": wall,
        "steps": rep["steps"],
        "path": str(out),
        "kept_groups": _kept_groups(model, out, structure),
        "nonzero_by_layer": {x["name"]: x["nonzero"] for x in rep["layers"]},
        "settings": dict(overrides),
        "storage_ratio": ((rep.get("storage") or {}).get("total") or {}).get("ratio_file"),
    }
    log(
        f"ADMM {structure} {rate:g}x: accuracy {row['accuracy']:.4f}, {row['params']:,} weights in the file "
        f"({row['nonzero']:,} non-zero) "
        f"(shapes {shapes}), {row['epochs']:g} epochs, {wall:.0f} s"
    )
    return row


def _kept_groups(model: Path, out: Path, structure: str) -> dict[str, int]:
    """Groups (filters or input channels) each structured layer keeps, counted in the written model:
    its remaining filters/channels that are not all-zero."""
    w = _weights(out)
    axis = AXES.get(structure)
    kept = {}
    for n in _structured(structure):
        if axis is None:
            continue
        a = np.moveaxis(w[n], axis, 0).reshape(w[n].shape[axis], -1)
        kept[n] = int((np.abs(a).sum(axis=1) > 0).sum())
        if structure == "channel" and n in BLOCKS:  # whole conv2 channels: blocks of 16 features
            kept[n] //= BLOCKS[n]
    return kept


def _structured(structure: str) -> tuple[str, ...]:
    """Layers pruned by groups: all but the classifier with filter pruning (its outputs are the
    classes: ADMM prunes it weight by weight), all four with channel pruning."""
    return WEIGHTS[:-1] if structure == "filter" else WEIGHTS


def run_baseline(model: Path, row: dict, data, work: Path, log) -> dict:
    """Iterative L2-norm group pruning + masked fine-tuning to the ADMM run's kept groups per layer,
    over the same steps and epochs (the classifier pruned by magnitude to the same non-zeros)."""
    xt, yt, xv, yv = data
    structure = row["structure"]
    axis = AXES[structure]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = LeNet5()
    state = _weights(model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.from_numpy(state[name].reshape(p.shape).copy()))
    params = dict(net.named_parameters())
    masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in WEIGHTS}
    n_steps = len(row["steps"])
    epochs = row["epochs"]
    t0 = time.perf_counter()

    def apply():
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m)

    head = WEIGHTS[-1]
    for s in range(1, n_steps + 1):
        frac = s / n_steps
        with torch.no_grad():
            for n in _structured(structure):
                w = params[n] * masks[n]
                block = BLOCKS.get(n, 1) if structure == "channel" else 1
                groups = w.shape[axis] // block
                target = row["kept_groups"][n]
                k = max(target, int(round(groups * (target / groups) ** frac)))
                g = w.movedim(axis, 0).reshape(groups, block, -1)
                norms = g.pow(2).sum(dim=(1, 2)).sqrt()
                keep = torch.zeros(groups, dtype=torch.bool)
                keep[torch.topk(norms, k).indices] = True
                shape = [1] * w.dim()
                shape[axis] = w.shape[axis]
                masks[n] = masks[n] & keep.repeat_interleave(block).view(shape)
            if head not in _structured(structure):
                w = params[head] * masks[head]
                target = row["nonzero_by_layer"][head]
                k = max(target, int(round(w.numel() * (target / w.numel()) ** frac)))
                m = torch.zeros(w.numel(), dtype=torch.bool)
                m[torch.topk(w.abs().flatten(), k).indices] = True
                masks[head] = masks[head] & m.view_as(w)
        apply()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        train_epochs(net, opt, xt, yt, epochs / n_steps, rng, after_step=apply)
    from bench_lenet_mnist import to_onnx

    path = work / f"baseline_{structure}_{row['rate']:g}x.onnx"
    onnx.save_model(to_onnx({n: p.detach().numpy() for n, p in net.named_parameters()}), path)
    acc = ort_accuracy(path, xv, yv)
    wall = time.perf_counter() - t0
    log(f"baseline {structure} {row['rate']:g}x: accuracy {acc:.4f} ({epochs:g} epochs, {wall:.0f} s)")
    return {"accuracy": acc, "seconds": wall, "epochs": epochs}


def latency(paths: dict[str, str], batch: int = 64, rounds: int = 7, runs: int = 50) -> dict[str, float]:
    """p50 milliseconds per batch, onnxruntime CPU, one thread, rounds interleaved across models."""
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    sessions = {}
    for key, p in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sessions[key] = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {k: [] for k in paths}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(5):
            s.run(None, feeds[k])
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def section_text(rows: list[dict], dense: dict, lat: dict, commands: list[str]) -> str:
    lines = [
        "Structured ADMM pruning (`--structure`), the removed channels cut out of the ONNX layers. Accuracy by "
        "onnxruntime on the 10,000 MNIST test images; dense LeNet-5: "
        f"{dense['ort_accuracy']:.2%}, 430,500 weights. The rate asked for counts the weights written "
        "(onnxadmm trains to the lower rate at which the layers, once the removed channels and the next "
        "layer's slices of them are cut out, hold that many). The baseline prunes the same groups per layer by L2 norm (the criterion of "
        "`torch.nn.utils.prune.ln_structured`) over the same steps and epochs, with masked fine-tuning. "
        "With filter pruning the classifier (fc2) keeps its 10 outputs and is pruned weight by weight in "
        "both; with channel pruning, fc1 prunes whole conv2 channels (blocks of 4x4 features). Latency: "
        "onnxruntime CPU, batch 64, one thread, p50 of interleaved rounds, in one run with the dense model. "
        "Wall times with two jobs sharing the 2 cores. File bytes: the format compress picks (auto).",
        "",
        "| structure | rate asked | weights in the file (x smaller) | non-zero (x fewer) | layer shapes (conv1, conv2, "
        "fc1, fc2) | ADMM | baseline | epochs | latency vs dense | file bytes | ADMM wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shapes = ", ".join("x".join(str(d) for d in r["shapes"][n]) for n in WEIGHTS)
        base = f"{r['baseline']['accuracy']:.2%}" if r.get("baseline") else "-"
        lt = lat.get(r["path"])
        ratio = f"{lat['dense'] / lt:.2f}x faster ({lt:.3f} ms)" if lt else "-"
        what = r["structure"] + "".join(f", {k}={v}" for k, v in r.get("settings", {}).items())
        if r.get("storage_ratio") and r.get("settings"):
            what += f" (weights {r['storage_ratio']:.0f}x smaller in the file)"
        lines.append(
            f"| {what} | {r['rate']:g}x | {r['params']:,} ({430500 / r['params']:.1f}x) | "
            f"{r['nonzero']:,} ({430500 / r['nonzero']:.1f}x) | {shapes} | "
            f"**{r['accuracy']:.2%}** | {base} | {r['epochs']:g} | {ratio} | {r['file_bytes']:,} | "
            f"{r['seconds'] / 60:.1f} min |"
        )
    if "dense" in lat:
        lines += ["", f"Dense LeNet-5 latency in the same run: {lat['dense']:.3f} ms per batch of 64."]
    lines += ["", "Commands:", "", "```"] + commands + ["```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", default="filter", help="comma-separated: filter,channel,shape")
    ap.add_argument("--rates", default="10,30", help="comma-separated rates")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="compress setting")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--merge", nargs="+", type=Path, help="merge row files (latency measured again)")
    ap.add_argument("--write", action="store_true", help="rewrite the docs section")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    data = load_mnist()
    model, dense = dense_model(data, False, log)
    if args.merge:
        blobs = [json.loads(p.read_text()) for p in args.merge]
        rows = [r for b in blobs for r in b["rows"]]
        commands = [c for b in blobs for c in b["commands"]]
        commands.append(
            "python benchmarks/bench_lenet_structured.py " + shlex.join(argv or sys.argv[1:])
            + "  # the table; latency of every row measured again, side by side"
        )
    else:
        overrides = dict(kv.split("=", 1) for kv in args.set)
        overrides = {k: parse_value(v) for k, v in overrides.items()}
        work = Path(tempfile.mkdtemp(prefix="lenet-structured-"))
        rows = []
        for structure in args.structures.split(","):
            for rate in [float(r) for r in args.rates.split(",")]:
                row = run_admm(model, structure, rate, data, overrides, work, log)
                if not args.no_baseline and structure in AXES:
                    row["baseline"] = run_baseline(model, row, data, work, log)
                rows.append(row)
        commands = ["python benchmarks/bench_lenet_structured.py " + shlex.join(argv or sys.argv[1:])]
    if args.json:  # before the latency runs, so a failure there keeps the rows
        args.json.write_text(json.dumps({"rows": rows, "commands": commands}, indent=2))
    paths = {"dense": str(model)} | {r["path"]: r["path"] for r in rows if Path(r["path"]).exists()}
    lat = latency(paths)
    for k, v in lat.items():
        log(f"latency {k}: {v:.3f} ms ({lat['dense'] / v:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "commands": commands, "latency": lat}, indent=2))
    text = section_text(rows, dense, lat, commands)
    print(f"## {SECTION}\n\n{text}")
    if args.write:
        write_section(DOCS, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
