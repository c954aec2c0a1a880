"""Benchmark: ADMM quantization, binarization, clustering and pruning + quantization of LeNet-5 on MNIST.

The dense model is the cached LeNet-5 (Caffe variant) of ``bench_lenet_mnist.py`` (trained there on the
60,000 MNIST training images if not cached yet): conv 1->20 5x5, maxpool, conv 20->50 5x5, maxpool,
fc 800->500, ReLU, fc 500->10; 430,500 weights in the four Conv/Gemm tensors. Every accuracy is
onnxruntime's (CPU) on the 10,000 test images, which are also the validation data of ``compress``.

Rows, all in one run (``--only`` picks some by name or glob, ``--list`` shows them):

1. ADMM binarization of all four layers (``bits=1``), and with the first and last layers at 8 bits
   (``bits=1, edge_bits=8``);
2. ADMM uniform quantization at 8, 4, 3 and 2 bits per tensor, and 2 bits per output channel, dense;
3. ADMM clustering (k-means, per tensor) with 16 and 4 clusters;
4. ADMM pruning + quantization: ``rate=100, bits=3``, ``rate=246, bits=3``, ``rate=300, bits=2``;
5. ADMM int8 with integer kernels: ``bits=8, fmt="int8"`` (QDQ), per tensor and per channel;
6. post-training baselines without any training, same bit widths:
   (a) plain rounding: each weight of the dense model projected with the same functions ADMM uses
       (``onnxadmm.compress.quantize``: ``quantize_uniform`` / ``binarize`` / ``cluster``), written
       with ``to_onnx`` (fp32 values: the accuracy) and with onnxadmm's codebook storage (the file);
   (b) ``onnxruntime.quantization.quantize_static``, QDQ, MinMax calibration on 512 training images:
       int8 weights, and int4 weights (``QuantType.QInt4``), per tensor and per channel;
   (c) global magnitude pruning to the rate, then rounding of the kept weights (for the rows of 4).

ADMM rows use the library's default schedule unless ``--set key=value`` overrides it (every ADMM row).

    python benchmarks/bench_lenet_quant.py                         # everything (about an hour+ on one core)
    python benchmarks/bench_lenet_quant.py --only 'admm-p*,prune-*' --json out.json
    python benchmarks/bench_lenet_quant.py --quick --only admm-q4,round-q4   # smoke test
    python benchmarks/bench_lenet_quant.py --list                  # rows and their planned epochs
    python benchmarks/bench_lenet_quant.py --write                 # also rewrite docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_lenet_mnist import (  # noqa: E402
    SIZES,
    WEIGHTS,
    admm_epochs,
    dense_model,
    load_mnist,
    load_onnx_state,
    ort_accuracy,
    parse_value,
    to_onnx,
)
from docs_section import write_section  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "LeNet-5 quantization on MNIST"
QUICK = {"max_batches_per_epoch": 5, "admm_iterations": 1, "retrain_epochs": 1, "min_batches": 1}
SECONDS_PER_EPOCH = 15.0  # one LeNet-5 epoch on 60,000 images, one core (for the printed estimate)
CALIBRATION = 512  # training images for onnxruntime's MinMax calibration
EDGES = (WEIGHTS[0], WEIGHTS[-1])  # first and last compressible layers, as edge_bits counts them

# (name, kind, setting label, parameters). kind: admm (compress), round (plain rounding),
# prune (magnitude pruning + rounding), ort (onnxruntime.quantization). Table order = run order.
ROWS: list[tuple[str, str, str, dict]] = []


def _rows(suffix: str, label: str, params: dict, ort_rows=()):
    ROWS.append((f"admm-{suffix}", "admm", label, params))
    if "rate" in params:
        ROWS.append((f"prune-{suffix}", "prune", label, params))
    else:
        ROWS.append((f"round-{suffix}", "round", label, params))
    for name, lab, p in ort_rows:
        ROWS.append((name, "ort", lab, p))


_rows("bin", "binary {-q,+q}, all 4 layers", {"bits": 1})
_rows("bin-edge8", "binary, first and last layers 8 bits", {"bits": 1, "edge_bits": 8})
_rows(
    "q8",
    "8 bits, per tensor",
    {"bits": 8},
    [
        ("ort-int8", "int8 QDQ, per tensor", {"weight_type": "QInt8", "per_channel": False}),
        ("ort-int8-channel", "int8 QDQ, per channel", {"weight_type": "QInt8", "per_channel": True}),
    ],
)
_rows(
    "q4",
    "4 bits, per tensor",
    {"bits": 4},
    [
        ("ort-int4", "int4 weights QDQ, per tensor", {"weight_type": "QInt4", "per_channel": False}),
        ("ort-int4-channel", "int4 weights QDQ, per channel", {"weight_type": "QInt4", "per_channel": True}),
    ],
)
_rows("q3", "3 bits, per tensor", {"bits": 3})
_rows("q2", "2 bits, per tensor", {"bits": 2})
_rows("q2-channel", "2 bits, per channel", {"bits": 2, "granularity": "channel"})
_rows("k16", "16 clusters", {"clusters": 16})
_rows("k4", "4 clusters", {"clusters": 4})
_rows("p100-q3", "pruned 100x, 3 bits", {"rate": 100, "bits": 3})
_rows("p246-q3", "pruned 246x, 3 bits", {"rate": 246, "bits": 3})
_rows("p300-q2", "pruned 300x, 2 bits", {"rate": 300, "bits": 2})
ROWS.append(("admm-int8", "admm", "int8 kernels (QDQ), per tensor", {"bits": 8, "fmt": "int8"}))
ROWS.append(
    (
        "admm-int8-channel",
        "admm",
        "int8 kernels (QDQ), per channel",
        {"bits": 8, "fmt": "int8", "granularity": "channel"},
    )
)
METHOD = {
    "admm": "ADMM (onnxadmm)",
    "round": "rounding, no training",
    "prune": "magnitude prune + rounding",
    "ort": "onnxruntime quantize_static",
    "dense": "dense fp32",
}


# ---- helpers ---------------------------------------------------------------------------------------


def planned_epochs(params: dict, overrides: dict, n_train: int) -> float:
    """Training epochs the compress schedule will run for ``params`` (pruning steps + one quantization step)."""
    from onnxadmm.compress.config import CompressConfig
    from onnxadmm.compress.pruning import progressive_rates

    cfg = CompressConfig().updated(**{k: v for k, v in params.items() if k != "fmt"}, **overrides).validate()
    steps = 0
    if cfg.rate > 1.0 or not cfg.quantizing:
        steps = len(progressive_rates(cfg.rate, cfg.step_factor)) if cfg.progressive else 1
    steps += 1 if cfg.quantizing else 0
    # admm_epochs counts epochs of max_batches_per_epoch batches when capped: convert to full epochs
    full = math.ceil(n_train / cfg.batch_size)
    capped = min(full, cfg.max_batches_per_epoch or full)
    return admm_epochs(cfg.to_dict(), steps, n_train) * capped / full


def storage(path: Path) -> dict:
    """The weight-storage totals of ``onnxadmm report`` for ``path`` (and the layers Deep Compression's
    count keeps at full width because they hold more than 256 distinct values), measured against the
    dense LeNet-5's layer sizes (a pruned model's dead channels are cut out of its layers)."""
    from onnxadmm.validate.storage_report import storage_report

    rep = storage_report(path, original_params=SIZES)
    t = rep["total"]
    out = {
        k: t[k]
        for k in ("fp32_bytes", "file_weight_bytes", "theoretical_bytes", "ratio_file", "ratio_theoretical")
    }
    out["pruning_rate"] = t["pruning_rate"]
    out["wide_layers"] = [x["name"] for x in rep["layers"] if x["distinct"] > 256]
    out["file_bytes"] = rep["file_bytes"]
    return out


def project_weights(state: dict, params: dict, masks: dict | None = None):
    """Each weight of ``state`` on its value set, as compress's quantization step does (edge layers at
    ``edge_bits``, per output channel = axis 0 for these Conv and transB Gemm weights)."""
    from onnxadmm.compress.quantize import binarize, cluster, quantize_uniform

    out, grids = dict(state), {}
    axis = 0 if params.get("granularity") == "channel" else None
    for n in WEIGHTS:
        w = torch.from_numpy(np.array(state[n], dtype=np.float32))
        mask = None if masks is None else torch.from_numpy(masks[n])
        edge = bool(params.get("edge_bits")) and n in EDGES
        bits = params["edge_bits"] if edge else params.get("bits")
        if params.get("clusters") and not edge:
            wq, grid = cluster(w, int(params["clusters"]), mask=mask)
        elif bits == 1:
            wq, grid = binarize(w, mask=mask, axis=axis)
        else:
            wq, grid = quantize_uniform(w, int(bits), mask=mask, axis=axis)
        out[n], grids[n] = wq.numpy().astype(np.float32), grid
    return out, grids


def write_codebook(state: dict, grids: dict, path: Path) -> None:
    """``state`` as ONNX with onnxadmm's codebook storage for the projected weights (as compress writes)."""
    from onnxadmm.export.storage import apply_storage, encode_from_values

    enc = {}
    for n, g in grids.items():
        w = state[n]
        book = g.codebook.detach().cpu().numpy()
        zeros_off = bool((w == 0).any()) and not bool((book == 0).any(axis=1).all())
        enc[n] = encode_from_values(w, book, g.group_axis, sparse=True if zeros_off else None)
    onnx.save_model(apply_storage(to_onnx(state), enc), str(path))


def magnitude_masks(state: dict, rate: float) -> dict:
    """Global magnitude pruning: keep the round(total / rate) largest |w| over the four weights."""
    flat = np.concatenate([np.abs(state[n]).ravel() for n in WEIGHTS])
    keep = max(1, int(round(flat.size / rate)))
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[np.argpartition(-flat, keep - 1)[:keep]] = True
    masks, i = {}, 0
    for n in WEIGHTS:
        size = state[n].size
        masks[n] = chosen[i : i + size].reshape(state[n].shape)
        i += size
    return masks


# ---- the rows ----------------------------------------------------------------------------------------


def run_admm(name, params, model, data, overrides, workdir, verbose) -> dict:
    from onnxadmm.compress.pipeline import compress

    xt, yt, xv, yv = data
    params = dict(params)
    fmt = params.pop("fmt", "auto")
    out = workdir / f"{name}.onnx"
    t0 = time.perf_counter()
    rep = compress(
        model,
        out,
        {"x": xt, "y": yt},
        val_data={"x": xv, "y": yv},
        quiet=not verbose,
        log=None if verbose else (lambda s: None),
        fmt=fmt,
        **{**params, **overrides},
    )
    wall = time.perf_counter() - t0
    st = storage(out)  # the report's storage summary, plus the fields the table needs
    bits = [q.get("bits") for q in (rep.get("quantization") or {}).values()]
    return {
        "accuracy": rep["accuracy"]["compressed"],
        "original_accuracy": rep["accuracy"]["original"],
        "epochs": rep["epochs"],
        "seconds": wall,
        "storage": st,
        "max_bits": max(bits) if bits else None,
        "steps": rep.get("steps"),
        "history": [
            {k: v for k, v in h.items() if k in ("kind", "step", "val_accuracy", "residual", "loss")}
            for h in rep.get("history", [])
        ],
    }


def run_round(name, params, model, data, workdir, prune_rate=None) -> dict:
    xv, yv = data[2], data[3]
    t0 = time.perf_counter()
    state = load_onnx_state(model)
    masks = magnitude_masks(state, prune_rate) if prune_rate else None
    if masks is not None:
        state = {n: (v * masks[n] if n in masks else v) for n, v in state.items()}
    qstate, grids = project_weights(state, params, masks)
    fp32 = workdir / f"{name}.fp32.onnx"
    onnx.save_model(to_onnx(qstate), str(fp32))
    acc = ort_accuracy(fp32, xv, yv)
    packed = workdir / f"{name}.onnx"
    note = ""
    try:
        write_codebook(qstate, grids, packed)
        acc_packed = ort_accuracy(packed, xv, yv)
        if acc_packed != acc:
            note = f"codebook file accuracy {acc_packed:.4f}"
        st = storage(packed)
    except Exception as exc:  # noqa: BLE001 - fall back to the fp32 file
        note = f"codebook storage failed ({exc}); fp32 file"
        st = storage(fp32)
    return {
        "accuracy": acc,
        "epochs": 0.0,
        "seconds": time.perf_counter() - t0,
        "storage": st,
        "max_bits": max(g.bits for g in grids.values()),
        "note": note,
    }


def run_ort(name, params, model, data, workdir) -> dict:
    from onnxruntime import quantization as oq

    xt, xv, yv = data[0], data[2], data[3]
    wtype = getattr(oq.QuantType, params["weight_type"], None)
    if wtype is None:
        return {"unsupported": f"onnxruntime {ort.__version__} has no QuantType.{params['weight_type']}"}
    idx = np.sort(np.random.default_rng(0).permutation(len(xt))[: min(CALIBRATION, len(xt))])
    calib = xt[idx]

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i : i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.batches, None)

    out = workdir / f"{name}.onnx"
    t0 = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static's pre-processing / opset advice
    try:
        oq.quantize_static(
            str(model),
            str(out),
            Reader(),
            quant_format=oq.QuantFormat.QDQ,
            per_channel=params["per_channel"],
            weight_type=wtype,
            activation_type=oq.QuantType.QUInt8,
            calibrate_method=oq.CalibrationMethod.MinMax,
        )
        acc = ort_accuracy(out, xv, yv)
    except Exception as exc:  # noqa: BLE001 - a form this onnxruntime cannot write or run
        return {"unsupported": f"onnxruntime {ort.__version__}: {type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        root.setLevel(level)
    bits = 4 if "4" in params["weight_type"] else 8
    return {
        "accuracy": acc,
        "epochs": 0.0,
        "seconds": time.perf_counter() - t0,
        "storage": storage(out),
        "max_bits": bits,
    }


# ---- output ------------------------------------------------------------------------------------------


def fmt_ratio(r: float) -> str:
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def table(rows: list[dict], dense: dict) -> list[str]:
    lines = [
        "| row | method | setting | accuracy | drop vs dense (points) | pruned | epochs | wall time | "
        "weight storage ratio (file) | weight storage ratio (Deep Compression) | file bytes (ratio) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in [dense] + rows:
        head = f"| {r['name']} | {METHOD[r['kind']]} | {r['setting']} |"
        if r.get("unsupported") or r.get("error"):
            what = "not supported: " + r["unsupported"] if r.get("unsupported") else "failed: " + r["error"]
            lines.append(f"{head} {what} | | | | | | | |")
            continue
        st = r["storage"]
        wide = " †" if st["wide_layers"] and r["kind"] != "dense" else ""
        wall = f"{r['seconds'] / 60:.1f} min" if r["seconds"] >= 60 else f"{r['seconds']:.1f} s"
        lines.append(
            f"{head} {r['accuracy']:.2%} | {r['drop']:+.2f} | {st['pruning_rate']:.3g}x | {r['epochs']:.3g} | "
            f"{wall} | {fmt_ratio(st['ratio_file'])} | {fmt_ratio(st['ratio_theoretical'])}{wide} | "
            f"{st['file_bytes']:,} ({fmt_ratio(dense['storage']['file_bytes'] / st['file_bytes'])}) |"
        )
    return lines


def targets(rows: list[dict]) -> list[str]:
    """Sentences on the issue's two targets, for the rows that were run."""
    by = {r["name"]: r for r in rows if r.get("accuracy") is not None}
    out = []
    pq = [by[n] for n in ("admm-p100-q3", "admm-p246-q3", "admm-p300-q2") if n in by]
    if pq:
        parts, met_file, met_dc = [], [], []
        for r in pq:
            st = r["storage"]
            checks = {
                "pruned >= 100x": st["pruning_rate"] >= 100,
                "<= 3 bits": (r.get("max_bits") or 99) <= 3,
                ">= 99.0%": r["accuracy"] >= 0.99,
                "file >= 1,000x": st["ratio_file"] >= 1000,
                "Deep Compression count >= 1,000x": st["ratio_theoretical"] >= 1000,
            }
            misses = [k for k, ok in checks.items() if not ok]
            if not misses:
                met_file.append(r["name"])
            if not [m for m in misses if m != "file >= 1,000x"]:
                met_dc.append(r["name"])
            parts.append(
                f"{r['name']} ({st['pruning_rate']:.0f}x, {r.get('max_bits')} bits, {r['accuracy']:.2%}, "
                f"{fmt_ratio(st['ratio_file'])} in the file, {fmt_ratio(st['ratio_theoretical'])} by Deep "
                f"Compression's count): " + ("all met" if not misses else "misses " + ", ".join(misses))
            )
        verdict = (
            f"**met** in the file by {', '.join(met_file)}"
            if met_file
            else f"**met by Deep Compression's count only** ({', '.join(met_dc)}), not in the file"
            if met_dc
            else "**not met**"
        )
        out.append(
            "Target 1, pruned >= 100x at <= 3 bits with >= 99.0% accuracy and weight storage >= 1,000x "
            f"smaller than the fp32 weights: {verdict}. " + "; ".join(parts) + "."
        )
    i8 = [by[n] for n in ("admm-int8", "admm-int8-channel") if n in by]
    if i8:
        parts = [f"{r['name']} {r['accuracy']:.2%} ({-r['drop']:+.2f} points)" for r in i8]
        ok = all(r["drop"] <= 0.1 + 1e-9 for r in i8)
        out.append(
            "Target 2, int8 with integer kernels within 0.1 points of the fp32 model: "
            + ("**met**" if ok else "**not met**")
            + ": "
            + ", ".join(parts)
            + "."
        )
    return out


def section_body(rows, dense, command, env, overrides, n_train, n_val) -> str:
    unsupported = [r for r in rows if r.get("unsupported")]
    lines = [
        'ADMM quantization of the dense LeNet-5 of the section "LeNet-5 on MNIST" (Caffe variant, '
        "430,500 weights in the four Conv/Gemm tensors; the model `bench_lenet_mnist.py` trains and caches, "
        f"{dense['accuracy']:.2%} in onnxruntime): `onnxadmm.compress.pipeline.compress` with the "
        f"{n_train:,} training images as training data and the {n_val:,} test images as validation data, "
        + (
            "the library's default schedule"
            if not overrides
            else "the default schedule with " + ", ".join(f"`{k}={v}`" for k, v in overrides.items())
        )
        + ". Accuracy: onnxruntime (CPU) on the "
        f"{n_val:,} test images. Epochs: training epochs of the compress run (ADMM iterations + masked "
        "retraining, all steps); wall time: the whole call (import, training, export, validation).",
        "",
        "Baselines, no training: *rounding*: each weight of the dense model projected onto the same value "
        "set with the same functions (`quantize_uniform` / `binarize` / `cluster` of "
        "`onnxadmm.compress.quantize`), accuracy of the fp32 ONNX file, storage of the same weights in "
        "onnxadmm's codebook format; *magnitude prune + rounding*: global magnitude pruning of the four "
        "weights to the rate, then rounding of the kept ones; *onnxruntime quantize_static*: QDQ, uint8 "
        f"activations, MinMax calibration on {CALIBRATION} training images, int8 or int4 (`QuantType.QInt4`) "
        "weights. `matmul_nbits_quantizer` (MatMulNBits) is not used: it quantizes MatMul and Gather nodes, "
        "and LeNet's fully connected layers are Gemm.",
        "",
        "Weight storage ratios: fp32 bytes of the four weights over (file) the bytes the file spends on them "
        "(codes, positions, codebooks, scales) and (Deep Compression) the count of the ADMM papers: "
        "ceil(log2 K)-bit codes plus the codebook, relative indices for sparse tensors (`onnxadmm report`). "
        "† a layer holds more than 256 distinct values (per-channel grids), which that count keeps at 32 bits. "
        "Pruned: all weights / non-zero weights (rounding to 0 counts). File bytes: the whole ONNX file "
        "(biases and graph included), ratio to the dense file.",
        "",
        *table(rows, dense),
        "",
        *[f"- {t}" for t in targets(rows)],
    ]
    if unsupported:
        lines += [
            "",
            "Not supported: " + "; ".join(f"{r['name']}: {r['unsupported']}" for r in unsupported) + ".",
        ]
    lines += [
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Machine: {env}",
    ]
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------------


def select(only: str | None) -> list[tuple]:
    if not only:
        return list(ROWS)
    pats = [p.strip() for p in only.split(",") if p.strip()]
    bad = [p for p in pats if not any(fnmatch.fnmatchcase(r[0], p) for r in ROWS)]
    if bad:
        raise SystemExit(f"--only: no row matches {', '.join(bad)}; rows: {', '.join(r[0] for r in ROWS)}")
    return [r for r in ROWS if any(fnmatch.fnmatchcase(r[0], p) for p in pats)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    ap.add_argument("--only", help="comma list of row names or globs, e.g. 'admm-q*,round-q*'")
    ap.add_argument(
        "--list", action="store_true", help="print the rows and their planned epochs, run nothing"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="compress() config override"
    )
    ap.add_argument("--json", type=Path, help="write the results here (rewritten after every row)")
    ap.add_argument(
        "--write", action="store_true", help=f"rewrite the '{SECTION}' section of docs/benchmarks.md"
    )
    ap.add_argument(
        "--section",
        default=SECTION,
        help="with --write: the docs section to (re)write, e.g. a separate one for a rerun of some rows",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and onnxruntime intra-op) [1]")
    ap.add_argument("--verbose", action="store_true", help="compress progress output")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k.strip()] = parse_value(v.strip())
    run_overrides = {**(QUICK if args.quick else {}), **overrides}
    rows_todo = select(args.only)
    n_train = 4000 if args.quick else 60000
    plans = {n: planned_epochs(p, run_overrides, n_train) for n, kind, _, p in rows_todo if kind == "admm"}
    total = sum(plans.values())
    if args.list:
        for n, kind, label, _ in rows_todo:
            extra = f"{plans[n]:g} epochs" if n in plans else "no training"
            print(f"{n:20s} {METHOD[kind]:28s} {label:40s} {extra}")
    log(
        f"planned: {total:g} training epochs in {len(plans)} ADMM row(s) "
        f"(~{total * SECONDS_PER_EPOCH / 60:.0f} min at {SECONDS_PER_EPOCH:g} s per full epoch on one core)"
    )
    if args.list:
        return 0

    data = load_mnist()
    if args.quick:
        xt, yt, xv, yv = data
        data = (xt[:4000], yt[:4000], xv[:2000], yv[:2000])
    model, dense_info = dense_model(data, args.quick, log)
    xv, yv = data[2], data[3]
    load_start = os.getloadavg()[1]
    t_dense = time.perf_counter()
    dense_acc = ort_accuracy(model, xv, yv)
    dense = {
        "name": "dense",
        "kind": "dense",
        "setting": "fp32, as trained",
        "accuracy": dense_acc,
        "drop": 0.0,
        "epochs": 0.0,
        "seconds": time.perf_counter() - t_dense,
        "storage": storage(model),
        "training": dense_info,
    }
    log(f"dense: onnxruntime accuracy {dense_acc:.4f} on {len(xv):,} test images")
    command = "python benchmarks/bench_lenet_quant.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    command = command.strip()

    def env_line():
        return (
            f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs shared with other jobs "
            f"(load average {load_start:.1f} at the start, {os.getloadavg()[1]:.1f} at the end), "
            f"{args.threads} torch thread(s), torch {torch.__version__}, onnxruntime {ort.__version__}, "
            f"onnx {onnx.__version__}, Python {platform.python_version()}"
        )

    rows: list[dict] = []

    def dump():
        if args.json:
            result = {"dense": dense, "rows": rows, "overrides": overrides, "quick": args.quick}
            result.update(command=command, env=env_line(), targets=targets(rows))
            args.json.write_text(json.dumps(result, indent=2, default=str))

    with tempfile.TemporaryDirectory(prefix="bench_lenet_quant_") as tmp:
        workdir = Path(tmp)
        for name, kind, label, params in rows_todo:
            row = {"name": name, "kind": kind, "setting": label, "params": params}
            try:
                if kind == "admm":
                    log(f"{name}: compress {params} ({plans[name]:g} epochs planned) ...")
                    row.update(run_admm(name, params, model, data, run_overrides, workdir, args.verbose))
                elif kind == "ort":
                    row.update(run_ort(name, params, model, data, workdir))
                else:
                    row.update(
                        run_round(
                            name,
                            params,
                            model,
                            data,
                            workdir,
                            params.get("rate") if kind == "prune" else None,
                        )
                    )
            except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if row.get("accuracy") is not None:
                row["drop"] = (dense_acc - row["accuracy"]) * 100
                st = row["storage"]
                log(
                    f"{name}: accuracy {row['accuracy']:.4f} ({-row['drop'] + 0.0:+.2f} points), pruned "
                    f"{st['pruning_rate']:.3g}x, {row['epochs']:.3g} epochs, {row['seconds']:.1f} s, weight "
                    f"storage {st['ratio_file']:.1f}x (file) {st['ratio_theoretical']:.1f}x (Deep Compression), "
                    f"file {st['file_bytes']:,} B" + (f"; {row['note']}" if row.get("note") else "")
                )
            else:
                log(f"{name}: " + (row.get("unsupported") or row.get("error", "")))
            rows.append(row)
            dump()

    log("")
    for line in table(rows, dense) + [""] + targets(rows):
        log(line)
    dump()
    if args.write:
        if args.quick:
            log("--write ignored with --quick")
        else:
            write_section(
                DOCS,
                args.section,
                section_body(rows, dense, command, env_line(), overrides, len(data[0]), len(xv)),
            )
            log(f"updated the '{args.section}' section of {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
