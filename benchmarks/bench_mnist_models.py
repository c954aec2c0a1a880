"""Compress every MNIST classifier in ../shared/models: pruning, 4-bit quantization or 16 clusters.

Modes (--mode), each with its own section of docs/benchmarks.md:

- ``prune`` (default): rates as the issue sets them, 10x on models with at least 100,000 compressible
  weights and 3x on smaller ones, with labels and by distillation only. Limit: at most 0.3 points lost
  with labels, 0.5 without.
- ``bits4``: ``bits=4`` and no pruning (no rate given: the library uses 1x when quantizing), labels.
- ``clusters16``: ``clusters=16`` (at most 16 shared values per layer) and no pruning, labels.
  Limit for both quantization modes: at most 0.5 points lost.

Training data: the 60,000 MNIST training images; validation: the 10,000 test images, measured by
onnxruntime (the compress report). Each model gets its own preprocessing (shared/models/README.md),
passed as the CLI's --scale/--mean/--std conversions.

    python benchmarks/bench_mnist_models.py [--mode prune|bits4|clusters16] [--models SUBSTR[,SUBSTR]]
        [--data labels,distill] [--set KEY=VALUE ...] [--quick] [--write]

--quick (a smoke test; never written to the docs): 2,000 training and 1,000 test images with
max_batches_per_epoch=5, admm_iterations=1, retrain_epochs=1, min_batches=1 (--set still wins).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_section import write_section  # noqa: E402

SHARED = Path(os.environ.get("ONNXADMM_SHARED", ROOT.parent / "shared"))  # as the tests

# model file -> conversions of the raw uint8 images (scale, mean, std)
PREPROCESS = {
    "Frenz86+mnistonnx/mnist.onnx": {},
    "wuhanstudio+onnx-parser/mnist-sm.onnx": {"scale": 1 / 255},
    "wuhanstudio+onnx-parser/mnist-lg.onnx": {"scale": 1 / 255},
    "akinobu123+tf2onnx/mnist.onnx": {"scale": 1 / 255},
    "CODEMAN251+mnist-cnn-onnx/mnist_cnn.onnx": {"scale": 1 / 255, "mean": [0.5], "std": [0.5]},
    "ram6ces+mnist/mnist.onnx": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]},
    "yliess86+MNISTWeb/mnist.onnx": {"scale": 1 / 255},
    "michbogos+mnist-experiments/mnist.onnx": {"scale": 1 / 255, "mean": [0.5], "std": [0.5]},
    "aclex+k210_mnist_assets/mnist_cnn.onnx": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]},
}

# --mode -> docs section, compress settings, default data, accuracy limit (points) per data kind
MODES = {
    "prune": {
        "title": "MNIST models from shared/models",
        "settings": {},  # rate by model size, see _rate
        "data": "labels,distill",
        "limit": {"labels": 0.3, "distill": 0.5},
        "what": "pruning at 10x (models with at least 100,000 compressible weights) or 3x (smaller ones)",
        "limit_text": "at most 0.3 points lost with labels, 0.5 without (distillation only)",
    },
    "bits4": {
        "title": "MNIST models: 4-bit quantization",
        "settings": {"bits": 4},
        "data": "labels",
        "limit": {"labels": 0.5, "distill": 0.5},
        "what": "4-bit quantization (bits=4, one step per layer) without pruning (no rate given: 1x)",
        "limit_text": "at most 0.5 points lost",
    },
    "clusters16": {
        "title": "MNIST models: 16 clusters",
        "settings": {"clusters": 16},
        "data": "labels",
        "limit": {"labels": 0.5, "distill": 0.5},
        "what": "16 shared values per layer (clusters=16, k-means centroids) without pruning (no rate given: 1x)",
        "limit_text": "at most 0.5 points lost",
    },
}

QUICK = {"max_batches_per_epoch": 5, "admm_iterations": 1, "retrain_epochs": 1, "min_batches": 1}
QUICK_TRAIN, QUICK_TEST = 2000, 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="prune", help="what to compress (default prune)")
    ap.add_argument(
        "--models", default="", help="only models whose path contains this (comma-separated: any of them)"
    )
    ap.add_argument(
        "--data",
        "--modes",
        dest="data",
        default=None,
        help="labels, distill or both, comma-separated (default: prune labels,distill; others labels)",
    )
    ap.add_argument("--write", action="store_true", help="update this mode's section of docs/benchmarks.md")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_TRAIN:,} training / {QUICK_TEST:,} test images, "
        + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="compress setting override, e.g. --set admm_iterations=3 (repeatable; wins over the mode's)",
    )
    args = ap.parse_args(argv)
    spec = MODES[args.mode]
    kinds = [k.strip() for k in (args.data or spec["data"]).split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("labels", "distill")]
    if bad or not kinds:
        ap.error(f"--data {args.data!r}: expected labels, distill or labels,distill")
    if args.quick and args.write:
        ap.error("--quick results are a smoke test: not written to docs/benchmarks.md")
    overrides = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip()] = _value(v.strip())
    filters = [f for f in args.models.split(",") if f] or [""]
    names = [n for n in PREPROCESS if any(f in n for f in filters)]
    if not names:
        ap.error(f"--models {args.models!r} matches none of: {', '.join(PREPROCESS)}")

    from onnxadmm.compress.pipeline import compress
    from onnxadmm.importer.analysis import find_weights
    from onnxadmm.modelio import load_model

    with np.load(SHARED / "data" / "mnist.npz") as z:
        train = {"x": z["x_train"], "y": z["y_train"]}
        test = {"x": z["x_test"], "y": z["y_test"]}
    base = dict(QUICK) if args.quick else {}
    if args.quick:
        train = {k: v[:QUICK_TRAIN] for k, v in train.items()}
        test = {k: v[:QUICK_TEST] for k, v in test.items()}
    rows = []
    for name in names:
        conv = PREPROCESS[name]
        path = SHARED / "models" / name
        n = sum(w.params for w in find_weights(load_model(path)) if w.compressible)
        # the mode's settings, then --quick, then --set (the row lists them all)
        settings = {**_mode_settings(args.mode, n), **base, **overrides}
        for kind in kinds:
            data = train if kind == "labels" else {"x": train["x"]}
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                rep = compress(
                    path,
                    Path(tmp) / "out.onnx",
                    data,
                    val_data=test,
                    quiet=True,
                    data_options=conv,
                    **settings,
                )
                secs = time.perf_counter() - t0
            acc = rep["accuracy"]
            storage = rep.get("storage") or {}
            total = storage.get("total") or {}
            row = {
                "model": name,
                "weights": n,
                "mode": args.mode,
                "data": kind,
                "settings": _settings_text(settings),
                "rate": rep["pruning_rate"],
                "original": acc["original"],
                "compressed": acc["compressed"],
                "drop_points": 100 * (acc["original"] - acc["compressed"]),
                "limit_points": spec["limit"][kind],
                "agreement": rep["agreement"],
                "epochs": _epochs(rep),
                "seconds": secs,
                "bytes": (rep["file_bytes"]["original"], rep["file_bytes"]["compressed"]),
                "storage_ratio": total.get("ratio_file"),
                "max_distinct": max((x["distinct"] for x in storage.get("layers") or []), default=None),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = _table(rows, quantized=args.mode != "prune")
    print(table)
    over = [f"{r['model']} ({r['data']})" for r in rows if r["drop_points"] > r["limit_points"]]
    print(f"{len(rows) - len(over)}/{len(rows)} within the limit ({spec['limit_text']})")
    if args.write:
        import onnxruntime
        import torch

        cmd = " ".join(
            ["python benchmarks/bench_mnist_models.py"]
            + ([f"--mode {args.mode}"] if args.mode != "prune" else [])
            + ([f"--models {args.models}"] if args.models else [])
            + ([f"--data {','.join(kinds)}"] if args.data else [])
            + [f"--set {s}" for s in args.set]
            + ["--write"]
        )
        body = (
            f"Command: `{cmd}`  \n"
            f"Date: {datetime.date.today()}, {platform.machine()} with 2 cores, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}. Compression: {spec['what']}; compress settings: defaults"
            + (f" except {', '.join(args.set)}" if args.set else "")
            + " (each row lists the settings it was run with). Accuracy by onnxruntime on the "
            "10,000 MNIST test images (used as --val-data); training on the 60,000 training images. "
            f"Limit from the issue: {spec['limit_text']}."
            + (
                " Storage ratio: fp32 bytes of the compressible weights over the bytes the written file "
                "stores them in (`onnxadmm report`, `storage.total.ratio_file`); values/layer: the most "
                "distinct non-zero values in any compressed layer."
                if args.mode != "prune"
                else ""
            )
            + "\n\n"
            + table
        )
        write_section(ROOT / "docs" / "benchmarks.md", spec["title"], body)
    return 0


def _mode_settings(mode: str, n: int) -> dict:
    """compress keyword settings of a mode for a model with ``n`` compressible weights."""
    if mode == "prune":
        return {"rate": 10.0 if n >= 100_000 else 3.0}
    return dict(MODES[mode]["settings"])


def _value(v: str):
    """A --set value: true/false/none, an int, a float, else the string itself (e.g. granularity=channel)."""
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _settings_text(settings: dict) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in settings.items())


def _epochs(rep) -> float:
    return float(rep["epochs"])


def _table(rows, quantized: bool = False) -> str:
    # quantizing to a grid with a zero level zeroes some weights: the rate is then above 1x
    rate = "all/non-zero" if quantized else "rate"
    head = ["model", "weights", "data", "settings", rate, "original", "compressed", "drop (points)"]
    head += ["agreement", "epochs", "time (s)", "file bytes", "storage ratio"]
    if quantized:
        head.append("values/layer")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = r["drop_points"] <= r["limit_points"]
        ratio = f"{r['storage_ratio']:.1f}x" if r["storage_ratio"] is not None else "n/a"
        cells = [
            f"`{r['model']}`",
            f"{r['weights']:,}",
            "labels" if r["data"] == "labels" else "no labels (distill)",
            r["settings"],
            f"{r['rate']:.1f}x",
            f"{r['original']:.4f}",
            f"{r['compressed']:.4f}",
            f"{r['drop_points']:.2f}" + ("" if ok else " (over limit)"),
            f"{r['agreement']:.4f}",
            f"{r['epochs']:.1f}",
            f"{r['seconds']:.0f}",
            f"{r['bytes'][0]:,} -> {r['bytes'][1]:,}",
            ratio,
        ]
        if quantized:
            cells.append(str(r["max_distinct"]) if r["max_distinct"] is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
