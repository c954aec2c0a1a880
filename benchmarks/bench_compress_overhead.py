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


class Runner:
    """One mode on its own engine and optimizer; ``step`` is one batch of ``Engine.train_epoch``
    (copied from it, without the progress bar), ``end`` what train_epoch does after the last batch
    (the validation pass excluded)."""

    def __init__(self, mode: str, engine: Engine, lr: float):
        self.mode, self.e = mode, engine
        self.opt = engine.make_optimizer(lr)
        self.admm = mode == "ADMM W-step"
        self.masked = mode == "masked retrain"
        self.k = 0
        if self.admm:
            engine.start_admm(0)
        if self.masked:
            engine.hard_prune(0)

    def batches(self):
        return self.e.batches(1.0)

    def step(self, xs, y, t) -> float:
        e, opt = self.e, self.opt
        opt.zero_grad(set_to_none=True)
        outs = e._outs(xs)
        loss = loss_fn(e.heads, outs, y, t, e.cfg.distill, e.cfg.temperature)
        total_loss = loss + e.penalty() if self.admm else loss
        total_loss.backward()
        opt.step()
        if e.state.masks:
            e.apply_masks()
        return loss.item()

    def end(self):
        e = self.e
        if self.admm:
            e.z_step(0)
            e.residual()
            e.state.rho = min(e.state.rho * e.cfg.rho_multiplier, e.cfg.rho_max)

    def train_epoch(self):
        """The real ``Engine.train_epoch`` (fine-tune: the same loop without penalty and masks)."""
        self.e.m.train()
        if self.admm:
            self.k += 1
            return self.e.train_epoch(Unit("admm", 0, self.k - 1), self.opt, "admm")
        if self.masked:
            return self.e.train_epoch(Unit("retrain", 0, 0), self.opt, "retrain")
        for xs, y, t, _ in self.batches():
            self.step(xs, y, t)
        return {}


def check_replica(proto, train, val, cfg, rate) -> float:
    """Max abs difference of the weights (and Z, U) after 3 batches of ``Engine.train_epoch`` and of
    the Runner's copy of its loop: the timed steps must be what onnxadmm runs."""
    cfg = cfg.updated(max_batches_per_epoch=3)
    worst = 0.0
    for mode in MODES[1:]:
        ref = Runner(mode, make_engine(proto, train, val, cfg, rate), cfg.lr)
        rep = Runner(mode, make_engine(proto, train, val, cfg, rate), cfg.lr)
        ref.e.evaluate = lambda: {}
        ref.train_epoch()
        rep.e.m.train()
        for xs, y, t, _ in rep.batches():
            rep.step(xs, y, t)
        rep.end()
        for n in ref.e.names:
            worst = max(worst, float((ref.e.params[n] - rep.e.params[n]).abs().max()))
            if ref.admm:
                worst = max(worst, float((ref.e.state.Z[n] - rep.e.state.Z[n]).abs().max()))
                worst = max(worst, float((ref.e.state.U[n] - rep.e.state.U[n]).abs().max()))
    return worst


def interleaved_epoch(runners: dict[str, Runner], r: int) -> dict[str, dict]:
    """One epoch of every mode, batch by batch in turn (order rotated every batch), so that all
    modes see the same machine load. Per mode: the step times, the epoch-end time."""
    gens = {m: iter(run.batches()) for m, run in runners.items()}
    out = {m: {"steps": [], "end": 0.0} for m in runners}
    for run in runners.values():
        run.e.m.train()
    modes = list(runners)
    b = 0
    while True:
        order = modes[(b + r) % 3 :] + modes[: (b + r) % 3]
        done = False
        for m in order:
            t0 = time.perf_counter()
            try:
                xs, y, t, _ = next(gens[m])
            except StopIteration:
                done = True
                break
            runners[m].step(xs, y, t)
            out[m]["steps"].append(time.perf_counter() - t0)
        if done:
            break
        b += 1
    for m in order:  # rotate who goes first at the end too
        t0 = time.perf_counter()
        runners[m].end()
        out[m]["end"] = time.perf_counter() - t0
    return out


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


def summarize(times: dict[str, list[float]]) -> list[tuple[str, float, float, float]]:
    """(mode, median, ratio of medians to fine-tune, median of the paired ratios) per mode."""
    base = statistics.median(times["fine-tune"])
    return [
        (
            m,
            statistics.median(v),
            statistics.median(v) / base,
            statistics.median(t / b for t, b in zip(v, times["fine-tune"])),
        )
        for m, v in times.items()
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=None, help="training samples per epoch (default 10000)")
    ap.add_argument("--val", type=int, default=2000, help="validation samples (evaluate is timed separately)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaved epochs per mode (default 5, quick 2)"
    )
    ap.add_argument(
        "--whole-epochs",
        type=int,
        default=0,
        help="also time N whole Engine.train_epoch calls per mode, interleaved epoch by epoch (noisy)",
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rate", type=float, default=20.0, help="pruning rate of the retraining masks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2,560 samples per epoch, 2 rounds")
    ap.add_argument(
        "--write", action="store_true", help=f"update the '{SECTION}' section of docs/benchmarks.md"
    )
    args = ap.parse_args(argv)
    samples = args.samples or (2560 if args.quick else 10000)
    rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    proto = lenet5_onnx(LeNet5())
    train, val, src = load_data(samples, args.val)
    cfg = CompressConfig(batch_size=args.batch, min_batches=0, lr=1e-3, optimizer="adam").validate()
    replica_diff = check_replica(proto, train, val, cfg, args.rate)
    if replica_diff > 0:
        raise SystemExit(f"the timed loop differs from Engine.train_epoch (max abs diff {replica_diff:.2e})")
    runners = {m: Runner(m, make_engine(proto, train, val, cfg, args.rate), cfg.lr) for m in MODES}
    batches = -(-samples // args.batch)
    print(f"{src}; {batches} batches of {args.batch} per epoch; {rounds} rounds", flush=True)

    # warm-up: a few batches of the real Engine.train_epoch per mode
    for run in runners.values():
        run.e.evaluate = lambda: {}
        run.e.cfg = cfg.updated(max_batches_per_epoch=5)
        run.train_epoch()
        run.e.cfg = cfg

    epoch: dict[str, list[float]] = {m: [] for m in MODES}
    steps: dict[str, list[float]] = {m: [] for m in MODES}
    ends: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        res = interleaved_epoch(runners, r)
        for m in MODES:
            epoch[m].append(sum(res[m]["steps"]) + res[m]["end"])
            steps[m] += res[m]["steps"]
            ends[m].append(res[m]["end"])
        print(f"round {r + 1}: " + ", ".join(f"{m} {epoch[m][-1]:.2f} s" for m in MODES), flush=True)
    rows = summarize(epoch)
    step_rows = {m: (med, ratio, paired) for m, med, ratio, paired in summarize(steps)}

    whole_rows = None
    if args.whole_epochs:
        whole: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.whole_epochs):
            for m in MODES[r % 3 :] + MODES[: r % 3]:
                whole[m].append(timed(runners[m].train_epoch))
            print(
                f"whole epoch {r + 1}: " + ", ".join(f"{m} {whole[m][-1]:.2f} s" for m in MODES), flush=True
            )
        whole_rows = summarize(whole)

    e_admm = runners["ADMM W-step"].e
    del e_admm.evaluate  # back to the real method
    parts = pieces(e_admm, runners["masked retrain"].e, batches, reps=3)

    lines = [
        "| mode | s/epoch (median) | ratio (medians) | ratio (paired epochs) "
        "| ms/batch (median) | ratio (batch medians) | ratio (paired batches) | epoch end, s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m, med, ratio, paired in rows:
        smed, sratio, spaired = step_rows[m]
        lines.append(
            f"| {m} | {med:.2f} | {ratio:.3f} | {paired:.3f} | {smed * 1e3:.1f} | {sratio:.3f} "
            f"| {spaired:.3f} | {statistics.median(ends[m]):.3f} |"
        )
    table = "\n".join(lines)
    wtable = ""
    if whole_rows:
        wl = [
            "| mode (whole Engine.train_epoch) | s/epoch (median) | ratio (medians) | ratio (paired) |",
            "| --- | ---: | ---: | ---: |",
        ]
        wl += [f"| {m} | {med:.2f} | {ratio:.3f} | {paired:.3f} |" for m, med, ratio, paired in whole_rows]
        wtable = "\n".join(wl)
    base = rows[0][1]
    plines = ["| piece (per epoch) | s | share of a fine-tune epoch |", "| --- | ---: | ---: |"]
    for k, v in parts.items():
        plines.append(f"| {k} | {v:.3f} | {v / base:.1%} |")
    ptable = "\n".join(plines)
    print()
    print(table)
    if wtable:
        print()
        print(wtable)
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
        whole_text = (
            f"""
Whole `Engine.train_epoch` calls, interleaved epoch by epoch ({args.whole_epochs} per mode; load
changes within an epoch make these noisier):

{wtable}
"""
            if wtable
            else ""
        )
        body = f"""Time per training epoch of onnxadmm's ADMM W-step and of masked retraining versus plain
fine-tuning of the same imported LeNet-5 (Caffe variant, ONNX written with `onnx.helper`; a fresh
copy per mode): Adam, batch {args.batch}, cross-entropy, the same batches (`Engine.batches`, same seed).
Data: {src}, {batches} batches per epoch.

- fine-tune: zero_grad, forward, loss, backward, step, `loss.item()`.
- ADMM W-step: one batch of `Engine.train_epoch` on an `admm` unit: the loss plus the penalty
  rho/2 sum ||W - Z + U||^2 over the 4 weight tensors; at the epoch end the Z-step (top-k
  projection), U-step and residual ("epoch end" column).
- masked retrain: one batch of `Engine.train_epoch` on a `retrain` unit after `hard_prune` to
  {args.rate:g}x: the plain loss, masks re-applied after every optimizer step.

The three modes run batch by batch in turn (order rotated every batch), so that they share the
machine's load; the per-batch code is `Engine.train_epoch`'s loop body, checked before timing to
give bit-identical weights (and Z, U) to `Engine.train_epoch` after 3 batches. An epoch's time is
the sum of its batches plus its end. The validation pass that ends `Engine.train_epoch` (same for
any loop that validates) is left out and timed separately below. {rounds} epochs per mode;
medians; "paired" is the median over epochs (or batches) of mode/fine-tune. Target: ratio <= {TARGET}.

{table}

Result: {verdict}.
{whole_text}
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
