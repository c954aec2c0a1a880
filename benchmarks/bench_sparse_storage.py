"""Benchmark: file size of pruned float weights as dense tensors, ONNX COO sparse initializers and
onnxadmm's packed form (raw values + packed relative positions, decoded by folded standard ops).

No training: each model's compressible weights are pruned by magnitude with the library's per-layer
allocation (``allocate``, keep ~ n^0.3) to each rate, then the same weights are written three ways
with the library's own writer (``export_onnx``; ``apply_storage(encode_sparse(...))`` for the packed
form) and, for the last column, with ``--format auto``'s per-layer choice. For every file the
benchmark checks that onnxruntime's outputs are bit-identical to the dense file's on random inputs,
and times ``InferenceSession`` creation (median of 5; the packed decoders are folded at load).

Models: the LeNet-5 of ``bench_lenet_mnist.py`` (cached; trained there if missing), and every MNIST
classifier of ``../shared/models`` that has at least 10,000 compressible weights.

    python benchmarks/bench_sparse_storage.py [--rates 10,20,50,100,246] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_section import write_section  # noqa: E402

from onnxadmm.compress.pipeline import _compact_sparse, _pick_format  # noqa: E402
from onnxadmm.compress.pruning import allocate, topk_mask  # noqa: E402
from onnxadmm.export.storage import apply_storage, encode_sparse  # noqa: E402
from onnxadmm.export.writer import export_onnx  # noqa: E402
from onnxadmm.importer.analysis import find_weights  # noqa: E402
from onnxadmm.modelio import load_model  # noqa: E402
from onnxadmm.validate import ortrun  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "Pruned weights on disk: packed positions vs ONNX sparse initializers"
SHARED = Path(os.environ.get("ONNXADMM_SHARED", ROOT.parent / "shared"))  # as the tests


def lenet_path() -> Path:
    from bench_lenet_mnist import dense_model, load_mnist

    data = load_mnist()
    return Path(dense_model(data, False, lambda s: None)[0])


def pruned_weights(model: onnx.ModelProto, rate: float) -> dict[str, np.ndarray]:
    ws = [w for w in find_weights(model) if w.compressible]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    ws = [w for w in ws if w.name in inits]
    keep = allocate({w.name: w.params for w in ws}, rate)
    out = {}
    for w in ws:
        t = torch.from_numpy(inits[w.name].astype(np.float32))
        out[w.name] = (t * topk_mask(t, keep[w.name])).numpy().astype(inits[w.name].dtype)
    return out


def load_seconds(path: Path) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def outputs(path: Path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def measure(name: str, path: Path, rate: float, tmp: Path) -> dict:
    model = load_model(path)
    weights = pruned_weights(model, rate)
    files = {}
    files["dense"] = export_onnx(model, weights, tmp / "dense.onnx", force=True)
    files["coo"] = export_onnx(model, weights, tmp / "coo.onnx", sparse=set(weights), force=True)
    export_onnx(model, weights, tmp / "packed.onnx", force=True)
    packed = apply_storage(load_model(tmp / "packed.onnx"), {n: encode_sparse(w) for n, w in weights.items()})
    onnx.save(packed, str(tmp / "packed.onnx"))
    files["packed"] = tmp / "packed.onnx"
    compact = _compact_sparse("auto", weights, model)
    coo = _pick_format("auto", {n: w for n, w in weights.items() if n not in compact}, model)
    export_onnx(model, weights, tmp / "auto.onnx", sparse=coo, force=True)
    if compact:
        onnx.save(apply_storage(load_model(tmp / "auto.onnx"), compact), str(tmp / "auto.onnx"))
    files["auto"] = tmp / "auto.onnx"
    feeds = ortrun.random_inputs(ortrun.input_specs(ortrun.session(files["dense"])), batch=4, seed=0)
    ref = outputs(files["dense"], feeds)
    row = {"model": name, "rate": rate, "nonzero": sum(int(np.count_nonzero(w)) for w in weights.values())}
    row["weights"] = sum(w.size for w in weights.values())
    for kind, f in files.items():
        same = all(np.array_equal(a, b) for a, b in zip(ref, outputs(f, feeds), strict=True))
        if not same:
            raise SystemExit(f"{name} {rate}x: {kind} outputs differ from the dense file's")
        row[kind] = Path(f).stat().st_size
        row[f"{kind}_load_ms"] = 1000 * load_seconds(Path(f))
    row["original"] = path.stat().st_size
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| model | rate | non-zeros | original file | dense | COO sparse initializers | packed | auto "
        "| packed vs COO | load ms (dense / COO / packed) |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| `{r['model']}` | {r['rate']:g}x | {r['nonzero']:,} | {r['original']:,} | {r['dense']:,} "
            f"| {r['coo']:,} | {r['packed']:,} | {r['auto']:,} | {r['coo'] / r['packed']:.2f}x smaller "
            f"| {r['dense_load_ms']:.1f} / {r['coo_load_ms']:.1f} / {r['packed_load_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="10,20,50,100,246", help="comma list of pruning rates")
    ap.add_argument("--write", action="store_true", help=f"rewrite the '{SECTION}' section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    torch.set_num_threads(1)
    models = [("LeNet-5 (bench_lenet_mnist.py)", lenet_path())]
    if (SHARED / "models").is_dir():
        for p in sorted((SHARED / "models").glob("*/*.onnx")):
            if "mnist" not in p.as_posix().lower():
                continue
            m = load_model(p)
            if sum(w.params for w in find_weights(m) if w.compressible) >= 10_000:
                models.append((str(p.relative_to(SHARED / "models")), p))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models:
            for rate in rates:
                row = measure(name, path, rate, Path(tmp))
                rows.append(row)
                print(
                    f"{name} {rate:g}x: dense {row['dense']:,}  coo {row['coo']:,}  packed {row['packed']:,}  "
                    f"auto {row['auto']:,}",
                    flush=True,
                )
    text = table(rows)
    print(text)
    if args.write:
        default = ap.get_default("rates")
        cmd = "python benchmarks/bench_sparse_storage.py" + (f" --rates {args.rates}" if args.rates != default else "")
        body = (
            "Pruned float weights (no quantization) written four ways with the library's writer: dense "
            "tensors, ONNX COO sparse initializers (float32 values + int64 indices: 12 bytes per non-zero), "
            "onnxadmm's packed form (float32 values + relative positions packed at the best width, with "
            "filler entries for long gaps; decoded by `CumSum`/`ScatterElements` that onnxruntime folds at "
            "load), and `--format auto`'s per-layer choice of the smallest. Weights: magnitude pruning with "
            "the library's per-layer allocation, no training (the storage does not depend on how the "
            "weights were trained). Every file's onnxruntime outputs are bit-identical to the dense "
            "file's on random inputs (checked by the benchmark). Load: median `InferenceSession` "
            "creation time of 5.\n\n"
            f"{text}\n\n"
            f"- Command: `{cmd}`\n"
            f"- Date: {datetime.date.today().isoformat()}\n"
            f"- Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, Python {platform.python_version()}\n"
        )
        write_section(DOCS, SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
