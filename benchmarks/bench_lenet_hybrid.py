"""Benchmark: filter pruning, then unstructured pruning and quantization inside the smaller layers.

Issue #4's hardest target is a LeNet-5 pruned at least 100x, quantized to at most 3 bits, at 99.0%
or better, whose weight storage in the file (values, positions, codebooks, scales) is 1,000x smaller
than the fp32 weights. Unstructured pruning alone pays ~9-10 bits per non-zero for its position in
the full-size layers (docs/benchmarks.md, "how far 1,000x weight storage is"). This recipe cuts the
layers down first, so that the positions are coded within much smaller tensors:

1. ``compress(dense, structure="filter", rate=S)``: whole filters and units removed, the written
   layers physically smaller (S = 20x keeps 4 / 11 / 111 of conv1 / conv2 / fc1's 20 / 50 / 500);
2. ``compress(stage1, rate=R, bits=B, ...)``: unstructured ADMM pruning inside those layers (the
   rate counts the stage-1 model's weights), then B-bit quantization of the survivors, with a longer
   schedule than the default (the small network trains in minutes on 2 cores).

Both steps are plain onnxadmm runs; on the command line::

    onnxadmm compress lenet5.onnx stage1.onnx --structure filter --rate 20x --data train.npz --val-data test.npz
    onnxadmm compress stage1.onnx out.onnx --rate 13x --bits 3 --retrain-epochs 12 \\
        --epochs-per-iteration 3 --data train.npz --val-data test.npz

Accuracy: onnxruntime on the 10,000 MNIST test images (the --val-data of both steps). Storage:
``onnxadmm report``'s totals against the dense LeNet-5's 430,500 fp32 weights (1,722,000 bytes).
Stage 2 distils from the stage-1 model (its input), or with ``--dense-teacher`` from the dense one.

    python benchmarks/bench_lenet_hybrid.py [--structured-rate 20] [--rate 13] [--bits 3] \\
        [--dense-teacher] [--set1 KEY=VALUE ...] [--set2 KEY=VALUE ...] [--json F] [--out F.onnx] \\
        [--keep-stage1 F.onnx]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_lenet_mnist import dense_model, load_mnist, parse_value  # noqa: E402
from bench_lenet_quant import storage  # noqa: E402

STAGE2 = {"retrain_epochs": 12, "epochs_per_iteration": 3}  # the longer stage-2 schedule


def stage(model: Path, out: Path, data, log, **settings) -> dict:
    from onnxadmm.compress.pipeline import compress

    xt, yt, xv, yv = data
    t0 = time.perf_counter()
    rep = compress(
        model, out, {"x": xt, "y": yt}, val_data={"x": xv, "y": yv}, quiet=True, log=lambda s: None, **settings
    )
    row = {
        "settings": settings,
        "accuracy": rep["accuracy"]["compressed"],
        "input_accuracy": rep["accuracy"]["original"],
        "epochs": rep["epochs"],
        "seconds": time.perf_counter() - t0,
        "layers": {x["name"]: [x["shape"], x.get("shape_after"), x["nonzero"]] for x in rep["layers"]},
        "storage": storage(out),
        # the final step's masked retraining, epoch by epoch (frozen: freeze_oscillations' share)
        "retraining": [
            {k: h[k] for k in ("loss", "val_accuracy", "frozen") if k in h}
            for h in rep["history"]
            if h["kind"] == "retrain" and h["step"] == len(rep["steps"]) - 1
        ],
    }
    log(
        f"{settings}: accuracy {row['accuracy']:.4f} (input {row['input_accuracy']:.4f}), "
        f"{row['epochs']:g} epochs, {row['seconds']:.0f} s, pruning {row['storage']['pruning_rate']:.1f}x, "
        f"weight storage {row['storage']['ratio_file']:.0f}x in the file "
        f"({row['storage']['ratio_theoretical']:.0f}x by Deep Compression's count)"
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--structured-rate", type=float, default=20.0, help="stage 1: filter pruning rate")
    ap.add_argument("--rate", type=float, default=13.0, help="stage 2: unstructured rate of the stage-1 weights")
    ap.add_argument("--bits", type=int, default=3, help="stage 2: bits of the surviving weights")
    ap.add_argument("--stage1", type=Path, help="reuse this stage-1 model instead of running stage 1")
    ap.add_argument("--set1", action="append", default=[], metavar="KEY=VALUE", help="stage-1 setting")
    ap.add_argument("--set2", action="append", default=[], metavar="KEY=VALUE", help="stage-2 setting")
    ap.add_argument(
        "--dense-teacher", action="store_true", help="stage 2 distils from the dense model (--teacher)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--out", type=Path, help="keep the stage-2 model here")
    ap.add_argument("--keep-stage1", type=Path, help="keep the stage-1 model here (for --stage1 later)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    data = load_mnist()
    dense, info = dense_model(data, False, log)
    s1, s2 = {}, dict(STAGE2)
    for settings, pairs in ((s1, args.set1), (s2, args.set2)):
        for kv in pairs:
            k, _, v = kv.partition("=")
            settings[k.strip()] = parse_value(v.strip())
    result = {"dense_accuracy": info["ort_accuracy"]}
    with tempfile.TemporaryDirectory(prefix="bench_hybrid_") as tmp:
        work = Path(tmp)
        first = args.stage1
        if first is None:
            first = work / "stage1.onnx"
            result["stage1"] = stage(
                dense, first, data, log, **{"structure": "filter", "rate": args.structured_rate, **s1}
            )
            if args.keep_stage1:
                shutil.copyfile(first, args.keep_stage1)
        if args.dense_teacher:
            s2["teacher"] = str(dense)
        result["stage2"] = stage(first, work / "stage2.onnx", data, log, rate=args.rate, bits=args.bits, **s2)
        if args.out:
            shutil.copyfile(work / "stage2.onnx", args.out)
    result["command"] = "python benchmarks/bench_lenet_hybrid.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    s = result["stage2"]["storage"]
    log(
        f"\nfinal: {result['stage2']['accuracy']:.4f} at {s['pruning_rate']:.1f}x pruning, {args.bits} bits; "
        f"weights {s['file_weight_bytes']:,} B in the file ({s['ratio_file']:.0f}x), "
        f"{s['theoretical_bytes']:,.0f} B by Deep Compression's count ({s['ratio_theoretical']:.0f}x); "
        f"file {s['file_bytes']:,} B"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
