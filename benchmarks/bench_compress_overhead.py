"""Benchmark: time per epoch of onnxadmm's ADMM W-step and masked retraining versus plain fine-tuning.

All modes train the same imported LeNet-5 (Caffe variant, written with ``onnx.helper`` by
``bench_importer_speed.py``; one fresh copy per mode) with Adam, batch 128, cross-entropy, on the
same batches (``Engine.batches``, same seed); each ``--threads`` value (default 2, then 1) is timed
separately:

* ``fine-tune``: the plain loop (zero_grad, forward, loss, backward, step, ``loss.item()``) with one
  Adam over all parameters (the ADMM modes use ``Engine.make_optimizer``: per-tensor groups where
  the ``lr_relative`` floor lifts a step);
* ``ADMM W-step``: the loop of ``Engine.train_epoch`` on an ``admm`` unit: the loss plus the
  penalty rho/2 sum ||W - Z + U||^2 over the four weight tensors; at the end of the epoch the
  Z-step (top-k projection), the U-step and the residual;
* ``masked retrain``: the loop of ``Engine.train_epoch`` on a ``retrain`` unit after
  ``hard_prune`` (20x): the plain loss, with the masks re-applied after every optimizer step.

``--alternative`` adds a fourth mode that is not onnxadmm code: the W-step with the penalty's
gradient rho (W - (Z - U)) added in place to ``.grad`` after ``loss.backward()``.

The machine is shared and its load changes within an epoch, so the modes run batch by batch
in turn (order rotated every batch) and an epoch's time is the sum of its batch times plus its end.
The per-batch code is ``Engine.train_epoch``'s loop body; before timing, the script checks that it
gives bit-identical weights (and Z, U) to ``Engine.train_epoch`` itself after 3 batches.
``--whole-epochs N`` also times whole ``Engine.train_epoch`` calls, interleaved epoch by epoch.
``Engine.train_epoch`` ends with a validation pass (``Engine.evaluate``); it is the same for any
training loop that validates, so it is left out and timed on its own. Data: the first
``--samples`` MNIST training images from shared/data/mnist.npz (beside the checkout, or $ONNXADMM_SHARED) as x/255 float32 [N,1,28,28]
(random data when the file is missing). The tables show medians and ratios to fine-tuning: of the
medians, and the median of the paired ratios (same epoch / same batch index).

    python benchmarks/bench_compress_overhead.py              # 10,000 samples/epoch, 5 epochs per mode
    python benchmarks/bench_compress_overhead.py --quick      # 2,560 samples/epoch, 2 epochs per mode
    python benchmarks/bench_compress_overhead.py --whole-epochs 3 --alternative --write
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
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
DATA = Path(os.environ.get("ONNXADMM_SHARED", ROOT.parent / "shared")) / "data" / "mnist.npz"
TARGET = 1.15
MODES = ("fine-tune", "ADMM W-step", "masked retrain")
# not onnxadmm code: the W-step with the penalty's gradient rho (W - (Z - U)) added in place to .grad
# after loss.backward() (Z - U cached per W-step) instead of autograd through the penalty value
ALT = "alt. W-step, in-place penalty grad"


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
        if mode == "fine-tune":  # what users run: one Adam over every parameter at one lr
            ps = [p for p in engine.m.parameters() if p.requires_grad]
            self.opt = torch.optim.Adam(ps, lr=lr)
        else:  # onnxadmm's: per-tensor groups where the lr_relative floor lifts a step
            self.opt = engine.make_optimizer(lr)
        self.admm = mode in ("ADMM W-step", ALT)
        self.inplace = mode == ALT
        self.masked = mode == "masked retrain"
        self.k = 0
        if self.admm:
            engine.start_admm(0)
            self._cache_zu()
        if self.masked:
            engine.hard_prune(0)

    def batches(self):
        return self.e.batches(1.0)

    def _cache_zu(self):
        if self.inplace:
            st = self.e.state
            self.zu = {n: st.Z[n] - st.U[n] for n in self.e.names}

    def step(self, xs, y, t, i: int = 0, total: int = 1) -> float:
        e, opt = self.e, self.opt
        if self.masked and e.cfg.retrain_schedule == "cosine":  # as Engine.train_epoch, retraining unit 0
            progress = (i / total) / max(1, math.ceil(e.cfg.retrain_epochs))
            for g in opt.param_groups:
                g["lr"] = e.cfg.retrain_lr * g.get("lr_scale", 1.0) * 0.5 * (1.0 + math.cos(math.pi * progress))
        opt.zero_grad(set_to_none=True)
        outs = e._outs(xs)
        loss = loss_fn(e.heads, outs, y, t, e.cfg.distill, e.cfg.temperature)
        if self.inplace:
            loss.backward()
            rho = e.state.rho
            with torch.no_grad():
                for n, p in e.params.items():
                    p.grad.add_(p, alpha=rho).sub_(self.zu[n], alpha=rho)
        else:
            loss.backward()
            if self.admm:
                e.add_penalty_grad()
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
            self._cache_zu()

    def train_epoch(self):
        """The real ``Engine.train_epoch`` (fine-tune: the same loop without penalty and masks)."""
        self.e.m.train()
        if self.admm and not self.inplace:
            self.k += 1
            return self.e.train_epoch(Unit("admm", 0, self.k - 1), self.opt, "admm")
        if self.masked:
            return self.e.train_epoch(Unit("retrain", 0, 0), self.opt, "retrain")
        for i, (xs, y, t, total) in enumerate(self.batches()):
            self.step(xs, y, t, i, total)
        self.end()
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
        for i, (xs, y, t, total) in enumerate(rep.batches()):
            rep.step(xs, y, t, i, total)
        rep.end()
        for n in ref.e.names:
            worst = max(worst, float((ref.e.params[n] - rep.e.params[n]).detach().abs().max()))
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
        k = (b + r) % len(modes)
        order = modes[k:] + modes[:k]
        done = False
        for m in order:
            t0 = time.perf_counter()
            try:
                xs, y, t, total = next(gens[m])
            except StopIteration:
                done = True
                break
            runners[m].step(xs, y, t, b, total)
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
    """Seconds per epoch of the pieces that fine-tuning lacks, each timed alone; per-batch pieces
    interleaved call by call over ``reps * 10`` calls, median x batches. Two alternatives are timed
    next to the code onnxadmm runs (they are not onnxadmm code): the penalty's gradient added in
    place without autograd, and masks stored as float."""
    w = list(e_admm.params.values())
    zu = [e_admm.state.Z[n] - e_admm.state.U[n] for n in e_admm.names]
    rho = e_admm.state.rho
    float_masks = {n: m.to(e_rt.params[n].dtype) for n, m in e_rt.state.masks.items()}

    def penalty_autograd():  # as train_epoch: penalty value + backward, accumulating into .grad
        e_admm.penalty().backward()

    def penalty_inplace():  # alternative: grad += rho * (W - (Z - U)), Z - U cached per W-step
        with torch.no_grad():
            for p, d in zip(w, zu):
                p.grad.add_(p, alpha=rho).sub_(d, alpha=rho)

    def masks_bool():  # as Engine.apply_masks
        e_rt.apply_masks()

    def masks_float():
        with torch.no_grad():
            for n, m in float_masks.items():
                e_rt.params[n].mul_(m)

    def zu_step():
        saved = (dict(e_admm.state.Z), dict(e_admm.state.U))
        e_admm.z_step(0)
        e_admm.residual()
        e_admm.state.Z, e_admm.state.U = saved

    for p in w:
        p.grad = torch.zeros_like(p)
    per_batch = {
        "former penalty: fwd+bwd by autograd": penalty_autograd,
        "apply_masks, bool masks (as Engine.apply_masks)": masks_bool,
        "penalty gradient added in place (as Engine.add_penalty_grad)": penalty_inplace,
        "alternative: apply_masks with float masks": masks_float,
    }
    calls: dict[str, list[float]] = {k: [] for k in per_batch}
    for _ in range(reps * 10):
        for k, fn in per_batch.items():
            calls[k].append(timed(fn))
    out = {k: statistics.median(v) * batches for k, v in calls.items()}
    out["Z/U-step + residual (once per epoch)"] = statistics.median(timed(zu_step) for _ in range(reps))
    out["evaluate (validation pass, once per epoch)"] = statistics.median(
        timed(e_admm.evaluate) for _ in range(reps)
    )
    for p in w:
        p.grad = None
    return out


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
    ap.add_argument(
        "--alternative",
        action="store_true",
        help=f"also time '{ALT}' (a cheaper penalty, not onnxadmm code) in the interleaved epochs",
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rate", type=float, default=20.0, help="pruning rate of the retraining masks")
    ap.add_argument(
        "--threads",
        default="2,1",
        help="comma-separated torch thread counts, each timed separately (default 2,1)",
    )
    ap.add_argument("--quick", action="store_true", help="2,560 samples per epoch, 2 rounds")
    ap.add_argument(
        "--write", action="store_true", help=f"update the '{SECTION}' section of docs/benchmarks.md"
    )
    args = ap.parse_args(argv)
    samples = args.samples or (2560 if args.quick else 10000)
    rounds = args.rounds or (2 if args.quick else 5)
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    torch.manual_seed(0)

    proto = lenet5_onnx(LeNet5())
    train, val, src = load_data(samples, args.val)
    cfg = CompressConfig(batch_size=args.batch, min_batches=0, lr=1e-3, optimizer="adam").validate()
    replica_diff = check_replica(proto, train, val, cfg, args.rate)
    if replica_diff > 0:
        raise SystemExit(f"the timed loop differs from Engine.train_epoch (max abs diff {replica_diff:.2e})")
    batches = -(-samples // args.batch)
    print(f"{src}; {batches} batches of {args.batch} per epoch; {rounds} rounds", flush=True)

    modes = MODES + ((ALT,) if args.alternative else ())
    results = {}
    for th in threads:
        torch.set_num_threads(th)
        runners = {m: Runner(m, make_engine(proto, train, val, cfg, args.rate), cfg.lr) for m in modes}
        # warm-up: a few batches of the real Engine.train_epoch per mode
        for run in runners.values():
            run.e.evaluate = lambda: {}
            run.e.cfg = cfg.updated(max_batches_per_epoch=5)
            run.train_epoch()
            run.e.cfg = cfg

        epoch: dict[str, list[float]] = {m: [] for m in modes}
        steps: dict[str, list[float]] = {m: [] for m in modes}
        ends: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(rounds):
            res = interleaved_epoch(runners, r)
            for m in modes:
                epoch[m].append(sum(res[m]["steps"]) + res[m]["end"])
                steps[m] += res[m]["steps"]
                ends[m].append(res[m]["end"])
            print(
                f"{th} thread(s), round {r + 1}: " + ", ".join(f"{m} {epoch[m][-1]:.2f} s" for m in modes),
                flush=True,
            )
        whole_rows = None
        if args.whole_epochs:
            whole: dict[str, list[float]] = {m: [] for m in modes}
            for r in range(args.whole_epochs):
                for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
                    whole[m].append(timed(runners[m].train_epoch))
                print(
                    f"{th} thread(s), whole epoch {r + 1}: "
                    + ", ".join(f"{m} {whole[m][-1]:.2f} s" for m in modes),
                    flush=True,
                )
            whole_rows = summarize(whole)
        e_admm = runners["ADMM W-step"].e
        del e_admm.evaluate  # back to the real method
        results[th] = {
            "rows": summarize(epoch),
            "steps": {m: (med, ratio, paired) for m, med, ratio, paired in summarize(steps)},
            "ends": {m: statistics.median(v) for m, v in ends.items()},
            "whole": whole_rows,
            "pieces": pieces(e_admm, runners["masked retrain"].e, batches, reps=3),
        }

    lines = [
        "| threads | mode | s/epoch (median) | ratio (medians) | ratio (paired epochs) "
        "| ms/batch (median) | ratio (batch medians) | ratio (paired batches) | epoch end, s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for th, res in results.items():
        for m, med, ratio, paired in res["rows"]:
            smed, sratio, spaired = res["steps"][m]
            lines.append(
                f"| {th} | {m} | {med:.2f} | {ratio:.3f} | {paired:.3f} | {smed * 1e3:.1f} | {sratio:.3f} "
                f"| {spaired:.3f} | {res['ends'][m]:.3f} |"
            )
    table = "\n".join(lines)
    wtable = ""
    if args.whole_epochs:
        wl = [
            "| threads | mode (whole Engine.train_epoch) | s/epoch (median) | ratio (medians) | ratio (paired) |",
            "| ---: | --- | ---: | ---: | ---: |",
        ]
        for th, res in results.items():
            wl += [
                f"| {th} | {m} | {med:.2f} | {ratio:.3f} | {paired:.3f} |"
                for m, med, ratio, paired in res["whole"]
            ]
        wtable = "\n".join(wl)
    plines = [
        "| threads | piece (per epoch) | s | share of a fine-tune epoch |",
        "| ---: | --- | ---: | ---: |",
    ]
    for th, res in results.items():
        base = res["rows"][0][1]
        for k, v in res["pieces"].items():
            plines.append(f"| {th} | {k} | {v:.3f} | {v / base:.1%} |")
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
        verdict = "; ".join(
            f"{th} thread(s): "
            + ", ".join(
                f"{m} {ratio:.2f}x ({'within' if ratio <= TARGET else 'above'} the {TARGET}x target)"
                for m, _, ratio, _ in res["rows"][1:3]
            )
            for th, res in results.items()
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
        alt_text = (
            f"""- {ALT} (with `--alternative`; not onnxadmm code): the same W-step with the
  penalty's gradient rho (W - (Z - U)) added in place to `.grad` after `loss.backward()` (Z - U
  cached once per W-step), instead of autograd through the penalty's value. Same update, fewer ops.
"""
            if args.alternative
            else ""
        )
        body = f"""Time per training epoch of onnxadmm's ADMM W-step and of masked retraining versus plain
fine-tuning of the same imported LeNet-5 (Caffe variant, ONNX written with `onnx.helper`; a fresh
copy per mode): Adam, batch {args.batch}, cross-entropy, the same batches (`Engine.batches`, same seed).
Data: {src}, {batches} batches per epoch.

- fine-tune: zero_grad, forward, loss, backward, step, `loss.item()`; one Adam over all parameters
  (the other modes use `Engine.make_optimizer`: an Adam group per tensor that the `lr_relative`
  floor lifts).
- ADMM W-step: one batch of `Engine.train_epoch` on an `admm` unit: the loss's gradient plus the
  gradient of the penalty rho/2 sum ||W - Z + U||^2, rho (W - Z + U), added in place to each of the
  4 weight tensors' `.grad` (`Engine.add_penalty_grad`); at the epoch end the Z-step (top-k
  projection), U-step and residual ("epoch end" column).
- masked retrain: one batch of `Engine.train_epoch` on a `retrain` unit after `hard_prune` to
  {args.rate:g}x: the plain loss, masks re-applied after every optimizer step, the lr set per batch (cosine).
{alt_text}
The modes run batch by batch in turn (order rotated every batch), so that they share the
machine's load; the per-batch code is `Engine.train_epoch`'s loop body, checked before timing to
give bit-identical weights (and Z, U) to `Engine.train_epoch` after 3 batches. An epoch's time is
the sum of its batches plus its end. The validation pass that ends `Engine.train_epoch` (same for
any loop that validates) is left out and timed separately below. {rounds} epochs per mode;
medians; "paired" is the median over epochs (or batches) of mode/fine-tune. Target: ratio <= {TARGET}.
One block of rows per `torch.set_num_threads` value ({", ".join(map(str, threads))}). On this shared
2-core machine 2 threads are much slower than 1: every parallel op waits until both of its threads
get a core while other jobs hold them, so at 2 threads the cost of a piece grows with its number of
ops more than with its arithmetic, which penalizes the penalty's many elementwise ops.

{table}

Result (ratio of the medians): {verdict}.

Reading the tables: the W-step's extra cost per batch is the penalty's gradient, two in-place
elementwise ops per weight tensor over the 430,500 LeNet-5 weights (until 2026-11-23 the engine
computed the penalty's value and differentiated it by autograd: the "autograd" piece below, about
five times the cost); masked retraining's extra cost is `apply_masks`, which multiplies by bool
masks (a dtype conversion per tensor and step).
{whole_text}
Cost of the pieces that plain fine-tuning does not have, per epoch, each timed alone (per-batch
pieces: median of 30 interleaved calls x {batches} batches; per-epoch pieces: median of 3). The
"autograd" and "alternative" rows are not onnxadmm code: the former engine's penalty (value plus
autograd), and masks kept as float tensors instead of bool.

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
