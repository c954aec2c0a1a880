"""Benchmark: one shared decoder for all compressed weights (a bundle) against one decoder per weight.

No training: each model's compressible weights are pruned by magnitude with the library's per-layer
allocation (``allocate``, keep ~ n^0.3) to each rate and rounded to ``bits``-bit symmetric uniform
levels per tensor (zero included), then written twice with the library's planner
(``_select_storage`` against the plain and COO bytes of each weight, as ``--format auto`` does; the
weights it leaves out are written as COO sparse initializers where smaller, else plain): with
bundles allowed, and with one decoder per weight (the only form before session 15). Given
compressed files (``--files``, e.g. the outputs of ``bench_lenet_hybrid.py``) are decoded and
written both ways too. For every file: its bytes, the weights' bytes in it (payload, codebooks and
decoder constants: what ``onnxadmm report`` counts), onnxruntime's outputs bit-identical to the
plain model's on random inputs, and ``InferenceSession`` creation time (median of 5).

Models: the LeNet-5 of ``bench_lenet_mnist.py`` (cached; trained there if missing) and every MNIST
classifier of ``../shared/models`` with at least 10,000 compressible weights.

    python benchmarks/bench_bundle_storage.py [--cases 1:4,20:4,100:3,246:3] [--files F ...] [--write]
"""

from __future__ import annotations

import argparse
import datetime
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

from bench_sparse_storage import SHARED, lenet_path  # noqa: E402
from docs_section import write_section  # noqa: E402

from onnxadmm.compress.pipeline import _coo_cost, _plain_cost, _select_storage  # noqa: E402
from onnxadmm.compress.pruning import allocate, topk_mask  # noqa: E402
from onnxadmm.export.storage import (  # noqa: E402
    analyze,
    apply_storage,
    encode_from_values,
    expand_storage,
)
from onnxadmm.export.writer import export_onnx  # noqa: E402
from onnxadmm.importer.analysis import find_weights  # noqa: E402
from onnxadmm.modelio import load_model  # noqa: E402
from onnxadmm.validate import ortrun  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "Compressed weights on disk: one shared decoder (bundle) vs one per weight"


def shared_models() -> list[Path]:
    """The MNIST classifiers of ../shared/models with at least 10,000 compressible weights."""
    out = []
    if (SHARED / "models").is_dir():
        for p in sorted((SHARED / "models").glob("*/*.onnx")):
            if "mnist" in p.as_posix().lower():
                if sum(w.params for w in find_weights(load_model(p)) if w.compressible) >= 10_000:
                    out.append(p)
    return out


def compressed_weights(model: onnx.ModelProto, rate: float, bits: int) -> dict[str, np.ndarray]:
    """Magnitude pruning to ``rate`` (library allocation), then ``bits``-bit symmetric uniform levels."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    names = [
        w.name
        for w in find_weights(model)
        if w.compressible and w.name in inits and inits[w.name].dtype == np.float32
    ]
    sizes = {n: inits[n].size for n in names}
    keep = allocate(sizes, rate) if rate > 1 else {n: sizes[n] for n in names}
    out = {}
    for n in names:
        w = inits[n].astype(np.float32)
        if keep[n] < w.size:
            w = w * topk_mask(torch.from_numpy(w), keep[n]).numpy()
        top = 2 ** (bits - 1) - 1 if bits > 1 else 1
        step = np.abs(w).max() / top if np.abs(w).max() > 0 else 1.0
        q = np.clip(np.round(w / step), -top, top) * np.float32(step)
        out[n] = np.where(w == 0, 0, q).astype(np.float32)
    return out


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in weights:
            t.CopyFrom(onnx.numpy_helper.from_array(weights[t.name], t.name))
    return out


def write_both(plain: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, onnx.ModelProto]:
    """The planner's file with bundles allowed and with one decoder per weight."""
    encodings = {}
    for n, w in weights.items():
        levels = np.unique(w)
        if 1 < levels.size <= 256:
            encodings[n] = encode_from_values(w, levels)
    out = {}
    for label, bundle in (("bundle", True), ("per weight", False)):
        chosen, layout = _select_storage("auto", encodings, weights, plain, bundle=bundle)
        # the others as the pipeline writes them: COO sparse initializers where smaller, else plain
        coo = {
            n for n, w in weights.items() if n not in chosen and _coo_cost(n, w) < _plain_cost(n, w)
        }
        with tempfile.TemporaryDirectory() as tmp:
            base = load_model(export_onnx(plain, weights, Path(tmp) / "p.onnx", sparse=coo, force=True))
        out[label] = apply_storage(base, chosen, bundle=bundle, layout=layout)
    return out


def load_seconds(model: onnx.ModelProto) -> float:
    data = model.SerializeToString()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(label: str, case: str, plain: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict:
    feeds = ortrun.random_inputs(ortrun.input_specs(ortrun.session(plain)), batch=2, seed=0)
    expected = ortrun.session(plain).run(None, feeds)
    row = {"model": label, "case": case, "plain": plain.ByteSize(), "plain_load": load_seconds(plain)}
    for kind, model in write_both(plain, weights).items():
        got = ortrun.session(model).run(None, feeds)
        assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True)), (label, case, kind)
        entries = analyze(model)
        weight_bytes = sum(entries[n]["bytes"]["total"] for n in weights if n in entries)
        row[kind] = {"file": model.ByteSize(), "weights": weight_bytes, "load": load_seconds(model)}
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| model | pruning, bits | plain file | file, one decoder per weight | file, bundle | bundle / per weight | weights in the file, per weight -> bundle | session load, per weight -> bundle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["per weight"], r["bundle"]
        lines.append(
            f"| {r['model']} | {r['case']} | {r['plain']:,} | {a['file']:,} | {b['file']:,} | "
            f"{b['file'] / a['file']:.3f} | {a['weights']:,} -> {b['weights']:,} | "
            f"{a['load'] * 1e3:.1f} -> {b['load'] * 1e3:.1f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1:4,1:2,20:4,100:3,246:3", help="rate:bits pairs")
    ap.add_argument("--files", nargs="*", default=[], help="compressed ONNX files to write both ways too")
    ap.add_argument("--no-models", action="store_true", help="only the --files")
    ap.add_argument("--write", action="store_true", help=f"write the table to {DOCS}")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = [tuple(float(x) for x in c.split(":")) for c in args.cases.split(",")]
    rows = []
    if not args.no_models:
        models = [("LeNet-5", lenet_path())]
        models += [(str(p.relative_to(SHARED / "models")), p) for p in shared_models()]
        for label, path in models:
            model = load_model(path)
            for rate, bits in cases:
                weights = compressed_weights(model, rate, int(bits))
                plain = with_weights(model, weights)
                rows.append(measure(label, f"{rate:g}x, {int(bits)} bits", plain, weights))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    for f in args.files:
        plain = expand_storage(onnx.load(f))
        names = {w.name for w in find_weights(plain)}
        weights = {
            t.name: onnx.numpy_helper.to_array(t) for t in plain.graph.initializer if t.name in names
        }
        rows.append(measure(Path(f).name, "as trained", plain, weights))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    if args.write:
        cmd = "python benchmarks/bench_bundle_storage.py " + " ".join(sys.argv[1:])
        body = (
            f"Command: `{cmd.replace(' --write', '')}` ({datetime.date.today()}, {platform.processor() or 'cpu'}, "
            f"onnxruntime {ort.__version__}). Weights pruned by magnitude and rounded to uniform levels, no "
            "training (the storage does not depend on how the values were found); every file's "
            "onnxruntime outputs are bit-identical to the plain model's.\n\n" + text
        )
        write_section(DOCS, SECTION, body)


if __name__ == "__main__":
    main()
