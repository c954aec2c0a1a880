"""Benchmark: time per epoch of onnxadmm's ADMM W-step and masked retraining versus plain fine-tuning.

All three train the same imported LeNet-5 (Caffe variant, written with ``onnx.helper`` by
``bench_importer_speed.py``; one fresh copy per mode) with Adam, batch 128, cross-entropy, on the
same batches (``Engine.batches``, same seed), ``torch.set_num_threads(2)``:

* ``fine-tune``: the plain loop (zero_grad, forward, loss, backward, step, ``loss.item()``);
* ``ADMM W-step``: ``Engine.train_epoch`` on an ``admm`` unit: the loss plus the penalty
  rho/2 sum ||W - Z + U||^2 over the four weight tensors, then the Z-step (top-k projection), the
  U-step and the residual at the end of the epoch;
* ``masked retrain``: ``Engine.train_epoch`` on a ``retrain`` unit after ``hard_prune`` (20x): the
  plain loss, with the masks re-applied after every optimizer step.

``Engine.train_epoch`` ends with a validation pass (``Engine.evaluate``); it is the same for any
training loop that validates, so it is switched off here and timed on its own. Data: the first
``--samples`` MNIST training images from /work/shared/data/mnist.npz as x/255 float32 [N,1,28,28]
(random data when the file is missing). Epochs of the three modes are interleaved (the order
rotates every round); the table shows medians and ratios to fine-tuning, both of the medians and the
median over rounds of the per-round ratio.

    python benchmarks/bench_compress_overhead.py              # 10,000 samples/epoch, 5 rounds
    python benchmarks/bench_compress_overhead.py --quick      # 2,560 samples/epoch, 3 rounds
    python benchmarks/bench_compress_overhead.py --write      # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import onnxadmm
from onnxadmm.compress.admm import Engine, Unit
from onnxadmm.compress.config import CompressConfig
from onnxadmm.compress.objective import loss_fn, training_heads
from onnxadmm.compress.pruning import allocate
from onnxadmm.data import Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_importer_speed import LeNet5, env_line, lenet5_onnx  # noqa: E402
from docs_section import write_section  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "Compression overhead"
DATA = Path("/work/shared/data/mnist.npz")
TARGET = 1.15
MODES = ("fine-tune", "ADMM W-step", "masked retrain")


def load_data(samples: int, val: int) -> tuple[Dataset, Dataset, str]:
    if DATA.exists():
        d = np.load(DATA)
        x = (d["x_train"][:samples].astype(np.float32) / 255.0)[:, None]
        y = d["y_train"][:samples].astype(np.int64)
        xv = (d["x_test"][:val].astype(np.float32) / 255.0)[:, None]
        yv = d["y_test"][:val].astype(np.int64)
        src = f"MNIST ({DATA}), first {samples:,} training images, x/255"
    else:
        rng = np.random.default_rng(0)
        x = rng.random((samples, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, samples).astype(np.int64)
        xv = rng.random((val, 1, 28, 28), dtype=np.float32)
        yv = rng.integers(0, 10, val).astype(np.int64)
        src = f"random data ({DATA} not found), {samples:,} samples"
    return Dataset({"input": x}, y), Dataset({"input": xv}, yv), src


def make_engine(proto, train: Dataset, val: Dataset, cfg: CompressConfig, rate: float) -> Engine:
    heads = training_heads(proto)
    module = onnxadmm.import_onnx(proto, outputs=[h.name for h in heads])
    sizes = {w.name: w.params for w in module.compressible_weights()}
    keep = [allocate(sizes, rate, {}, [])]
    return Engine(module, heads, train, val, None, cfg, keep, log=lambda s: None, quiet=True)


def plain_epoch(e: Engine, optimizer) -> dict:
    """Plain fine-tuning over the same batches as Engine.train_epoch, no penalty and no masks."""
    e.m.train()
    run_loss, seen = 0.0, 0
    for xs, y, t, _ in e.batches(1.0):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(e.heads, e._outs(xs), y, t, e.cfg.distill, e.cfg.temperature)
        loss.backward()
        optimizer.step()
        run_loss += loss.item() * len(xs[0])
        seen += len(xs[0])
    return {"loss": run_loss / max(seen, 1)}


def timed(fn, *a):
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def pieces(e_admm: Engine, e_rt: Engine, batches: int, reps: int) -> dict[str, float]:
    """Seconds per epoch of the pieces that fine-tuning lacks (medians of ``reps``)."""

    def penalty_fb():
        for p in e_admm.params.values():
            p.grad = None
        e_admm.penalty().backward()

    def masks():
        e_rt.apply_masks()

    def zu_step():
        saved = (dict(e_admm.state.Z), dict(e_admm.state.U))
        e_admm.z_step(0)
        e_admm.residual()
        e_admm.state.Z, e_admm.state.U = saved

    out = {"penalty fwd+bwd (x batches)": [], "apply_masks (x batches)": [], "Z/U-step + residual": []}
    out["evaluate (validation pass)"] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(batches):
            penalty_fb()
        out["penalty fwd+bwd (x batches)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(batches):
            masks()
        out["apply_masks (x batches)"].append(time.perf_counter() - t0)
        out["Z/U-step + residual"].append(timed(zu_step))
        out["evaluate (validation pass)"].append(timed(e_admm.evaluate))
    for p in e_admm.params.values():
        p.grad = None
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=None, help="training samples per epoch (default 10000)")
    ap.add_argument(
        "--val", type=int, default=2000, help="validation samples for the separate evaluate timing"
    )
    ap.add_argument("--rounds", type=int, default=None, help="timed epochs per mode (default 5, quick 3)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rate", type=float, default=20.0, help="pruning rate of the retraining masks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2,560 samples per epoch, 3 rounds")
    ap.add_argument(
        "--write", action="store_true", help=f"update the '{SECTION}' section of docs/benchmarks.md"
    )
    args = ap.parse_args(argv)
    samples = args.samples or (2560 if args.quick else 10000)
    rounds = args.rounds or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    proto = lenet5_onnx(LeNet5())
    train, val, src = load_data(samples, args.val)
    cfg = CompressConfig(batch_size=args.batch, min_batches=0, lr=1e-3, optimizer="adam").validate()
    engines = {m: make_engine(proto, train, val, cfg, args.rate) for m in MODES}
    opts = {m: e.make_optimizer(cfg.lr) for m, e in engines.items()}
    for e in engines.values():
        e.evaluate = lambda: {}  # timed separately below
    engines["ADMM W-step"].start_admm(0)
    engines["masked retrain"].hard_prune(0)
    admm_k = iter(range(10**6))

    def run(mode: str) -> float:
        e, opt = engines[mode], opts[mode]
        if mode == "fine-tune":
            return timed(plain_epoch, e, opt)
        if mode == "ADMM W-step":
            return timed(e.train_epoch, Unit("admm", 0, next(admm_k)), opt, "admm")
        return timed(e.train_epoch, Unit("retrain", 0, 0), opt, "retrain")

    batches = -(-samples // args.batch)
    print(f"{src}; {batches} batches of {args.batch} per epoch; {rounds} rounds", flush=True)
    for m in MODES:  # warm-up: one short pass each is enough to settle allocators and kernels
        e = engines[m]
        cfg_saved = e.cfg.max_batches_per_epoch
        e.cfg.max_batches_per_epoch = 5
        run(m)
        e.cfg.max_batches_per_epoch = cfg_saved
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        order = MODES[r % 3 :] + MODES[: r % 3]
        for m in order:
            times[m].append(run(m))
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in MODES), flush=True)

    base = statistics.median(times["fine-tune"])
    rows = []
    for m in MODES:
        med = statistics.median(times[m])
        paired = statistics.median(t / b for t, b in zip(times[m], times["fine-tune"]))
        rows.append((m, med, med / base, paired))
    e_eval = engines["ADMM W-step"]
    del e_eval.evaluate  # back to the real method
    parts = pieces(e_eval, engines["masked retrain"], batches, reps=3)

    lines = [
        "| mode | s/epoch (median) | ms/batch | ratio to fine-tune (medians) | ratio (paired median) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m, med, ratio, paired in rows:
        lines.append(f"| {m} | {med:.2f} | {med / batches * 1e3:.1f} | {ratio:.3f} | {paired:.3f} |")
    table = "\n".join(lines)
    plines = ["| piece (per epoch) | s | share of a fine-tune epoch |", "| --- | ---: | ---: |"]
    for k, v in parts.items():
        plines.append(f"| {k} | {v:.3f} | {v / base:.1%} |")
    ptable = "\n".join(plines)
    print()
    print(table)
    print()
    print(ptable)

    if args.write:
        cmd = "python benchmarks/bench_compress_overhead.py" + "".join(
            f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
        )
        verdict = ", ".join(
            f"{m} {ratio:.2f}x ({'within' if ratio <= TARGET else 'above'} the {TARGET}x target)"
            for m, _, ratio, _ in rows[1:]
        )
        body = f"""Time per training epoch of onnxadmm's ADMM W-step (`Engine.train_epoch` on an `admm` unit: loss +
rho/2 sum ||W - Z + U||^2 over the 4 weight tensors, then Z/U-step and residual) and of masked
retraining (`Engine.train_epoch` on a `retrain` unit after `hard_prune` to {args.rate:g}x: masks re-applied
after every step), versus plain fine-tuning (zero_grad, forward, cross-entropy, backward, step) of the
same imported LeNet-5 (Caffe variant, ONNX written with `onnx.helper`; a fresh copy per mode), Adam,
batch {args.batch}, the same batches (`Engine.batches`, same seed). Data: {src}, {batches} batches
per epoch. The validation pass that ends `Engine.train_epoch` is switched off for the comparison
and timed separately below. {rounds} epochs per mode after a short warm-up, interleaved (order
rotated every round); medians; "paired" is the median over rounds of mode/fine-tune.
Target: ratio <= {TARGET}.

{table}

Result: {verdict}.

Cost of the pieces that plain fine-tuning does not have, per epoch (timed alone, medians of 3):

{ptable}

- Command: `{cmd}`
- Date: {datetime.date.today().isoformat()}
- Machine: {env_line()}
"""
        write_section(DOCS, SECTION, body)
        print(f"\nupdated '{SECTION}' in {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
