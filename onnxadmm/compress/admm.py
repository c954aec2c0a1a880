"""The ADMM engine: W-step (training with the proximal penalty), Z-step (projection), U-step,
hard pruning and masked retraining, over progressive steps, with checkpoints after every unit."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import Dataset
from .config import CompressConfig
from .objective import Head, label_indices, loss_fn, predictions
from .pruning import alive_channels, supports


@dataclass
class Unit:
    kind: str  # admm | retrain
    step: int
    index: int


def final_step_of(quant: list) -> int:
    """Index of the final step: the last pruning step (``quant[s] is None``), else the last step."""
    pruning = [s for s, q in enumerate(quant) if q is None]
    return pruning[-1] if pruning else len(quant) - 1


def plan(cfg: CompressConfig, n_steps: int, final_step: int | None = None) -> list[Unit]:
    final = n_steps - 1 if final_step is None else final_step
    units = []
    for s in range(n_steps):
        units += [Unit("admm", s, k) for k in range(cfg.admm_iterations)]
        units += [Unit("retrain", s, e) for e in range(max(1, math.ceil(cfg.retrain_epochs_of(s, final))))]
    return units


@dataclass(frozen=True)
class QuantSpec:
    """The value set of one layer in a quantization step: ``bits`` uniform levels (1: binary {-q, +q})
    or ``clusters`` k-means centroids; ``axis`` None for one step/codebook per tensor, else per slice."""

    bits: int | None = None
    clusters: int | None = None
    axis: int | None = None
    zero_level: bool = False  # a pruned layer keeps a zero level (2^bits - 1 levels) below 8 bits

    def project(self, w: torch.Tensor, mask: torch.Tensor | None):
        """Projection onto the layer's value set; ``mask``: the kept entries of a pruned layer (None:
        dense). A pruned layer's zeros are stored by position, not by code, so below 8 bits its kept
        entries get every code of ``bits`` bits: ``2^bits`` non-zero levels (+-q .. +-2^(bits-1) q;
        3 bits: 8 levels instead of 6 around a zero level), unless ``zero_level``. 8 bits keep the
        symmetric int8 range (-127..127), which integer kernels can run."""
        from .quantize import binarize, cluster, quantize_uniform

        if self.clusters:
            return cluster(w, self.clusters, mask=mask)
        if self.bits == 1:
            return binarize(w, mask=mask, axis=self.axis)
        dense_codes = mask is None or self.bits >= 8 or self.zero_level
        return quantize_uniform(w, self.bits, mask=mask, axis=self.axis, allow_zero=dense_codes)


@dataclass
class State:
    """Everything a checkpoint holds besides the module's parameters."""

    unit: int = -1  # last completed unit
    rho: float = 0.0
    Z: dict = field(default_factory=dict)
    U: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)  # onnx name -> bool tensor (pruned weights stay pruned)
    grids: dict = field(default_factory=dict)  # onnx name -> frozen quantize.Grid (quantization retraining)
    codes: dict = field(default_factory=dict)  # onnx name -> frozen cluster codes (centroids move jointly)
    moments: dict = field(default_factory=dict)  # onnx name -> (m, v, t): Adam state of its centroids
    history: list = field(default_factory=list)
    steps: int = 0  # optimizer steps taken
    optimizer: dict | None = None
    keep: dict | None = None  # the retargeted step's kept counts (see Engine.retarget), from that step on
    osc: dict = field(default_factory=dict)  # onnx name -> oscillation tracking (see Engine.track_oscillations)


class Engine:
    def __init__(
        self,
        module,
        heads: list[Head],
        train: Dataset,
        val: Dataset,
        teacher: list[torch.Tensor] | None,
        cfg: CompressConfig,
        keep: list[dict[str, int]],
        log: Callable[[str], None],
        quiet: bool = False,
        quant: list[dict[str, QuantSpec] | None] | None = None,
        groups: dict[str, tuple[int, ...]] | None = None,
        biases: dict[str, list[str]] | None = None,
        views: dict[str, tuple[int, ...]] | None = None,
        couples: list[list[str]] | None = None,
        scales: dict[str, torch.Tensor] | None = None,
        retarget: tuple[int, Callable[[], dict[str, int]]] | None = None,
    ):
        self.m, self.heads, self.train, self.val, self.teacher = module, heads, train, val, teacher
        self.cfg, self.keep, self.log, self.quiet = cfg, keep, log, quiet
        # quant[s]: per-layer value sets of step s (None: a pruning step)
        self.quant = list(quant) if quant is not None else [None] * len(keep)
        self.final_step = final_step_of(self.quant)
        self.device = torch.device(cfg.device)
        self.names = list(keep[0])
        self.params = {n: module.parameter_for(n) for n in self.names}
        # structured pruning: the axes each layer's group norms sum over (absent: unstructured), and
        # the per-channel constants of each filter-pruned layer (bias, BN scale and bias), zeroed with
        # its filters so that a removed filter's channel is exactly 0
        self.groups = dict(groups or {})
        self.views = dict(views or {})  # a layer whose groups are blocks: the shape that exposes them
        # filter-pruned layers whose channels go together (residual streams, depthwise convolutions
        # with their feeders): they keep the same filters
        self.couples = [list(c) for c in (couples or []) if all(n in self.groups for n in c)]
        trainable = {name for name, _ in module.named_onnx_parameters()}
        self.biases = {
            n: [b for b in bs if b in trainable] for n, bs in (biases or {}).items() if n in self.groups
        }
        self.bias_params = {b: module.parameter_for(b) for bs in self.biases.values() for b in bs}
        # activation importance: each layer's per-entry factor on |w| when choosing what it keeps
        # (:mod:`.importance`; absent: plain magnitude)
        self.scales = dict(scales or {})
        # (step, fn): when ``step`` starts its ADMM phase and its masked retraining, ``fn()`` gives the
        # counts it keeps, in place of the planned ones, from the weights as they are then (unstructured
        # pruning: the counts whose written model, once dead channels are cut out, holds total/--rate)
        self.retarget = retarget
        self.rng = np.random.default_rng(cfg.seed)
        self.state = State()
        with torch.no_grad():  # each trainable tensor's scale in the input model (see :meth:`lr_scales`)
            self.param_rms = {
                n: (p, float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else 0.0)
                for n, p in module.named_onnx_parameters()
                if p.requires_grad and p.is_floating_point()
            }

    # ---- data ------------------------------------------------------------------------------
    def _tensors(self, ds: Dataset, idx):
        xs = [torch.from_numpy(ds.inputs[n][idx]).to(self.device) for n in self.m.input_names]
        y = None if ds.labels is None else torch.from_numpy(np.asarray(ds.labels[idx])).to(self.device)
        return xs, y

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.cfg.batch_size)

    def batches(self, epochs: float):
        n = len(self.train)
        bs = self.cfg.batch_size
        total = max(1, int(round(self.batches_per_epoch * epochs)))
        if epochs > 0:
            total = max(total, int(round(self.cfg.min_batches * min(epochs, 1.0))))
        if self.cfg.max_batches_per_epoch:  # the cap wins over the floor
            total = min(total, max(1, int(round(self.cfg.max_batches_per_epoch * max(epochs, 1e-9)))))
        done = 0
        while done < total:
            perm = self.rng.permutation(n)
            for i in range(0, n, bs):
                if done >= total:
                    return
                idx = np.sort(perm[i : i + bs])
                xs, y = self._tensors(self.train, idx)
                t = None if self.teacher is None else [t[idx].to(self.device) for t in self.teacher]
                yield xs, y, t, total
                done += 1

    def evaluate(self) -> dict:
        """Torch-side top-1 accuracy on the held-out set (None without labels)."""
        if self.val.labels is None or self.heads[0].kind == "regression":
            return {"val_accuracy": None}
        self.m.eval()
        correct, count = 0, 0
        shadows = self.swap_in_quantized()
        try:
            with torch.no_grad():
                for i in range(0, len(self.val), 512):
                    idx = np.arange(i, min(i + 512, len(self.val)))
                    xs, y = self._tensors(self.val, idx)
                    outs = self._outs(xs)
                    correct += int((predictions(self.heads[0], outs[0]) == label_indices(y)).sum())
                    count += len(idx)
        finally:
            self.restore(shadows)
        self.m.train()
        return {"val_accuracy": correct / max(count, 1)}

    def _outs(self, xs):
        out = self.m(*xs)
        return list(out) if isinstance(out, tuple) else [out]

    # ---- phases ----------------------------------------------------------------------------
    def make_optimizer(self, lr: float):
        """SGD, or Adam whose step is at least ``cfg.lr_relative`` times each trainable tensor's rms
        (:meth:`lr_scales`): parameter group 0 holds every parameter at ``lr``, each later group one
        tensor at ``lr_scale`` times it (schedules multiply a group's lr by its scale)."""
        ps = [p for p in self.m.parameters() if p.requires_grad]
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(ps, lr=lr, momentum=self.cfg.momentum)
        scaled = {}  # one group per parameter (a parameter under two names is scaled once)
        for n, s in self.lr_scales(lr).items():
            p = self.param_rms[n][0]
            scaled.setdefault(id(p), (p, s))
        groups = [{"params": [p for p in ps if id(p) not in scaled], "lr": lr, "lr_scale": 1.0}]
        groups += [{"params": [p], "lr": lr * s, "lr_scale": s} for p, s in scaled.values()]
        return torch.optim.Adam(groups, lr=lr)

    def lr_scales(self, lr: float) -> dict[str, float]:
        """Trainable tensors (weights, biases, normalisation) whose Adam step ``lr`` would be under
        ``cfg.lr_relative`` times their rms in the input model, with the factor that lifts it there.
        Adam moves every value by about ``lr`` a step whatever its size, so a tensor of large values
        (tiny Keras models: weights of rms 0.4-1.5 and biases of ~1, against 0.05 in LeNet-5) changes
        by a small fraction of itself and retrains too slowly."""
        rel = self.cfg.lr_relative
        if not rel or not lr > 0:
            return {}
        out = {}
        for n, (_, rms) in self.param_rms.items():
            if rel * rms > lr:
                out[n] = rel * rms / lr
        return out

    def apply_masks(self):
        with torch.no_grad():
            for n, mask in self.state.masks.items():
                (self.params[n] if n in self.params else self.bias_params[n]).mul_(mask)

    def _mask_bias(self, n: str):
        """Zero (and keep zero) the per-channel constants (bias; BN scale and bias) of the filters that
        layer ``n``'s mask removed whole, so their channels are exactly 0 and can be cut out."""
        if n not in self.state.masks or n not in self.groups or not self.biases.get(n):
            return
        alive = alive_channels(self.state.masks[n], self.groups[n])
        if alive is None:
            return
        for b in self.biases[n]:
            p = self.bias_params[b]
            if p.numel() == alive.numel():
                self.state.masks[b] = alive.reshape(p.shape)

    def penalty(self) -> torch.Tensor:
        st = self.state
        total = 0.0
        for n in self.names:
            total = total + (self.params[n] - st.Z[n] + st.U[n]).pow(2).sum()
        return 0.5 * st.rho * total

    def add_penalty_grad(self):
        """Add the gradient of the penalty, rho * (W - Z + U), to each weight's gradient in place
        (the same update as differentiating :meth:`penalty`, without building its graph)."""
        st = self.state
        with torch.no_grad():
            for n in self.names:
                p = self.params[n]
                term = p.detach() - st.Z[n] + st.U[n]
                if p.grad is None:
                    p.grad = term.mul_(st.rho)
                else:
                    p.grad.add_(term, alpha=st.rho)

    def add_damping_grad(self):
        """Quantized retraining: pull each straight-through shadow towards its level, gradient
        ``quant_damping * (w - q(w))``. Without it shadows gather at the rounding thresholds and
        flip back and forth every step, and the loss rises while the model retrains."""
        lam = self.cfg.quant_damping
        if not lam:
            return
        with torch.no_grad():
            for n in self.state.grids:
                if n in self.state.codes:  # clustered: codes frozen, the shadow is not used
                    continue
                p = self.params[n]
                term = p.detach() - self.quantized(n, p.detach())
                if p.grad is None:
                    p.grad = term.mul_(lam)
                else:
                    p.grad.add_(term, alpha=lam)

    def supports(self, ws: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Each layer's support at ``step`` (the kept count inside its existing mask), ranked by |w|
        times the layer's input factor where :attr:`scales` has one: coupled layers (:attr:`couples`)
        choose their filters together, the others alone."""
        return supports(
            ws, self.keep[step], self.groups, self.views, self.state.masks, self.couples, self.scales
        )

    def project(self, ws: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Euclidean projection of each ``ws[n]`` onto layer ``n``'s set at ``step``: the support first
        (:meth:`supports`), then, in a quantization step, the levels on it."""
        out = {}
        for n, support in self.supports(ws, step).items():
            w = ws[n]
            z = w * support
            spec = (self.quant[step] or {}).get(n)
            if spec is not None:  # levels fitted on the support (a dense layer: on every entry)
                partial = self.keep[step][n] < w.numel() or self.state.masks.get(n) is not None
                z, _ = spec.project(z, support if partial else None)
                z = z.to(w.dtype)
            out[n] = z
        return out

    def z_step(self, step: int):
        st = self.state
        with torch.no_grad():
            ws = {n: self.params[n] + st.U[n] for n in self.names}
            for n, z in self.project(ws, step).items():
                st.Z[n] = z
                st.U[n] = st.U[n] + self.params[n] - z

    def residual(self) -> float:
        """Relative primal residual sum ||W - Z|| / sum ||W|| over compressible layers."""
        with torch.no_grad():
            num = sum(float((self.params[n] - self.state.Z[n]).norm()) for n in self.names)
            den = sum(float(self.params[n].norm()) for n in self.names) or 1.0
        return num / den

    def _retarget(self, step: int):
        if self.retarget is None or step != self.retarget[0]:
            return
        keep = self.retarget[1]()
        self.state.keep = {"step": step, "keep": dict(keep)}
        self._apply_keep()

    def _apply_keep(self):
        """The retargeted counts replace the plan's from their step on (a quantization step after the
        last pruning step keeps what that step kept)."""
        if self.state.keep is None:
            return
        s0, keep = self.state.keep["step"], self.state.keep["keep"]
        for s in range(s0, len(self.keep)):
            self.keep[s] = {n: keep.get(n, k) for n, k in self.keep[s].items()}

    def start_admm(self, step: int):
        st = self.state
        self._retarget(step)
        st.rho = self.cfg.rho
        with torch.no_grad():
            st.Z = self.project({n: self.params[n].detach().clone() for n in self.names}, step)
            st.U = {n: torch.zeros_like(z) for n, z in st.Z.items()}

    def hard_prune(self, step: int):
        """Masked mapping: fix the support (and, in a quantization step, the levels) for retraining."""
        st = self.state
        self._retarget(step)
        with torch.no_grad():
            pruned = [n for n in self.names if self.keep[step][n] < self.params[n].numel() or n in st.masks]
            for n, support in self.supports({n: self.params[n] for n in pruned}, step).items():
                st.masks[n] = support
                self._mask_bias(n)
            self.apply_masks()
            for n, spec in (self.quant[step] or {}).items():
                w = self.params[n]
                wq, grid = spec.project(w.detach(), st.masks.get(n))
                st.grids[n] = grid
                if spec.clusters:
                    from .quantize import grid_codes

                    st.codes[n] = grid_codes(wq, grid, st.masks.get(n))
        st.Z, st.U = {}, {}
        st.osc = {}  # oscillations are tracked on this step's grids

    # ---- quantized retraining: a float shadow is trained, the forward pass sees its projection ----
    def quantized(self, n: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` (the shadow) mapped onto layer ``n``'s frozen value set. Uniform and binary levels keep
        their step and re-round every time; clustered layers keep their assignment and their centroids,
        which :meth:`step_centroids` trains."""
        from .quantize import apply_codebook, project_to_grid

        st = self.state
        if n in st.codes:
            return apply_codebook(st.grids[n], st.codes[n]).to(w.dtype)
        return project_to_grid(w, st.grids[n], st.masks.get(n)).to(w.dtype)

    def step_centroids(self, lr: float | dict[str, float], betas=(0.9, 0.999), eps: float = 1e-8):
        """Joint centroid update of clustered layers: each centroid's gradient is the sum of its
        members' (straight-through) gradients, and an Adam step of its own moves it. Feeding member
        gradients to the shadows' optimizer instead would move a centroid by the mean of per-member
        normalised steps, which is not a descent direction (it wrecked models fed raw 0-255 pixels).
        ``lr``: one rate, or each clustered layer's (its optimizer group's, see :meth:`lr_scales`)."""
        from .quantize import Grid

        st = self.state
        with torch.no_grad():
            for n, codes in st.codes.items():
                p = self.params[n]
                if p.grad is None:
                    continue
                grid = st.grids[n]
                k = grid.codebook.shape[1]
                flat = codes.flatten()
                sel = flat >= 0
                f64 = {"dtype": torch.float64, "device": p.grad.device}
                g = torch.zeros(k, **f64).index_add_(0, flat[sel], p.grad.flatten()[sel].double())
                m, v, t = st.moments.get(n, (torch.zeros(k, **f64), torch.zeros(k, **f64), 0))
                t += 1
                m = betas[0] * m + (1 - betas[0]) * g
                v = betas[1] * v + (1 - betas[1]) * g * g
                rate = lr[n] if isinstance(lr, dict) else lr
                update = rate * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
                st.moments[n] = (m, v, t)
                book = (grid.codebook[0].double() - update).float()
                st.grids[n] = Grid(book[None], None, grid.kind, grid.bits)
                p.grad = None  # the shadow of a clustered layer is not used while its codes are frozen

    #: moving-average weight of each step in :meth:`track_oscillations` (a window of ~100 steps)
    OSC_MOMENTUM = 0.01

    def track_oscillations(self):
        """After each quantized-retraining step: count, per weight of a uniform or binary layer below
        8 bits, the reversals of its level (a change in the opposite direction to its previous
        change), as a moving average per step; a weight whose rate exceeds ``freeze_oscillations``
        is frozen at the level nearest its moving-average value and stays there (its shadow is put
        back after every step). Straight-through shadows near a rounding threshold flip level step after step,
        which is noise the final rounding turns into a coin toss (Nagel et al., 2022)."""
        threshold, m = self.cfg.freeze_oscillations, self.OSC_MOMENTUM
        if not threshold:
            return
        st = self.state
        with torch.no_grad():
            for n, grid in st.grids.items():
                # clustered: codes fixed already; 8 bits: steps too fine to matter (LeNet-5 int8 lost
                # 0.09 points with it, session 21)
                if n in st.codes or grid.bits >= 8:
                    continue
                p = self.params[n]
                o = st.osc.get(n)
                if o is not None and o["frozen"].any():  # a frozen weight's level is its "prev"
                    p.copy_(torch.where(o["frozen"], o["prev"], p))
                q = self.quantized(n, p.detach())
                if o is None:
                    st.osc[n] = {
                        "prev": q,  # level after the last step
                        "dir": torch.zeros_like(q, dtype=torch.int8),  # sign of the last level change
                        "freq": torch.zeros_like(q),  # moving average of reversals per step
                        "ema": q.clone(),  # moving average of the level
                        "frozen": torch.zeros_like(q, dtype=torch.bool),
                    }
                    continue
                move = torch.sign(q - o["prev"]).to(torch.int8)
                moved = move != 0
                reversed_ = moved & (o["dir"] != 0) & (move != o["dir"])
                o["dir"] = torch.where(moved, move, o["dir"])
                o["freq"].mul_(1 - m).add_(reversed_.to(q.dtype), alpha=m)
                o["ema"].mul_(1 - m).add_(q, alpha=m)
                new = (o["freq"] > threshold) & ~o["frozen"]
                if new.any():
                    q = torch.where(new, self.quantized(n, o["ema"]), q)
                    o["frozen"] |= new
                    p.copy_(torch.where(new, q, p))
                o["prev"] = q

    def frozen_fraction(self) -> float | None:
        """Share of the tracked layers' kept weights frozen by :meth:`track_oscillations` (None: off)."""
        if not self.state.osc:
            return None
        frozen = sum(int(o["frozen"].sum()) for o in self.state.osc.values())
        kept = sum(
            int(self.state.masks[n].sum()) if n in self.state.masks else o["frozen"].numel()
            for n, o in self.state.osc.items()
        )
        return frozen / max(kept, 1)

    def swap_in_quantized(self) -> dict:
        """Put the quantized weights into the parameters; returns the shadows to restore."""
        shadows = {}
        with torch.no_grad():
            for n in self.state.grids:
                p = self.params[n]
                shadows[n] = p.detach().clone()
                p.copy_(self.quantized(n, shadows[n]))
        return shadows

    def restore(self, shadows: dict):
        with torch.no_grad():
            for n, w in shadows.items():
                self.params[n].copy_(w)

    def finalize(self):
        """Exact final weights: masks applied and, after quantization, the values on their grids."""
        self.apply_masks()
        if self.state.grids:
            self.swap_in_quantized()
            if self.cfg.float16_levels:
                # levels moved after the weights are on them: each weight keeps its level (a move is
                # under half a step), where projecting the shadows again would flip the many that
                # sit at rounding thresholds (and cost LeNet-5 0.4 points)
                from .quantize import float16_levels

                self.state.grids = {n: float16_levels(g) for n, g in self.state.grids.items()}
                self.swap_in_quantized()

    def train_epoch(self, unit: Unit, optimizer, desc: str) -> dict:
        from tqdm import tqdm

        admm = unit.kind == "admm"
        retrain = self.cfg.retrain_epochs_of(unit.step, self.final_step)
        epochs = self.cfg.iteration_epochs() if admm else min(1.0, retrain - unit.index)
        bar = None
        run_loss, seen = 0.0, 0
        self.m.train()
        n_units = max(1, math.ceil(retrain))
        cosine = not admm and self.cfg.retrain_schedule == "cosine"
        base_lr = self.cfg.retrain_lr_of(unit.step, self.final_step)
        for done, (xs, y, t, total) in enumerate(self.batches(epochs)):
            if bar is None:
                bar = tqdm(total=total, desc=desc, disable=self.quiet, leave=False, dynamic_ncols=True)
            if cosine:  # lr from the position in this step's retraining (stateless: resume-safe)
                progress = (unit.index + done / total) / n_units
                for g in optimizer.param_groups:
                    g["lr"] = base_lr * g.get("lr_scale", 1.0) * 0.5 * (1.0 + math.cos(math.pi * progress))
            optimizer.zero_grad(set_to_none=True)
            shadows = self.swap_in_quantized() if self.state.grids else {}
            try:  # straight-through: the gradient at the quantized weights updates the shadows
                outs = self._outs(xs)
                loss = loss_fn(
                    self.heads, outs, y, t, self.cfg.distill, self.cfg.temperature, self.cfg.pseudo_labels
                )
                loss.backward()
            finally:
                self.restore(shadows)
            if admm:
                self.add_penalty_grad()
            elif self.state.grids:
                self.add_damping_grad()
            if self.state.codes:
                group_lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
                self.step_centroids({n: group_lr[id(self.params[n])] for n in self.state.codes})
            optimizer.step()
            if self.state.masks:
                self.apply_masks()
            if not admm and self.state.grids:
                self.track_oscillations()
            self.state.steps += 1
            run_loss += loss.item() * len(xs[0])
            seen += len(xs[0])
            bar.update(1)
            if bar.n % 10 == 0 or bar.n == total:
                post = {"loss": f"{run_loss / seen:.4f}"}
                last = self.state.history[-1] if self.state.history else {}
                if last.get("val_accuracy") is not None:
                    post["val_acc"] = f"{last['val_accuracy']:.4f}"
                if admm:
                    post["rho"] = f"{self.state.rho:.2g}"
                    if "residual" in last:
                        post["residual"] = f"{last['residual']:.3f}"
                bar.set_postfix(post)
        if bar is not None:
            bar.close()
        out = {"loss": run_loss / max(seen, 1)}
        if admm:
            self.z_step(unit.step)
            out["residual"] = self.residual()
            out["rho"] = self.state.rho
            self.state.rho = min(self.state.rho * self.cfg.rho_multiplier, self.cfg.rho_max)
        frozen = self.frozen_fraction()
        if frozen is not None:
            out["frozen"] = frozen
        out.update(self.evaluate())
        return out

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, path, optimizer, meta: dict):
        st = self.state
        blob = {
            "meta": meta,
            "unit": st.unit,
            "rho": st.rho,
            "Z": st.Z,
            "U": st.U,
            "masks": st.masks,
            "grids": st.grids,
            "codes": st.codes,
            "moments": st.moments,
            "history": st.history,
            "steps": st.steps,
            "keep": st.keep,
            "osc": st.osc,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "module": self.m.state_dict(),
            "rng": self.rng.bit_generator.state,
        }
        tmp = f"{path}.tmp"
        torch.save(blob, tmp)
        os.replace(tmp, path)

    def load(self, blob: dict):
        self.m.load_state_dict(blob["module"])
        st = self.state
        st.unit, st.rho = blob["unit"], blob["rho"]
        st.Z, st.U, st.masks, st.history = blob["Z"], blob["U"], blob["masks"], blob["history"]
        st.grids, st.codes = blob.get("grids", {}), blob.get("codes", {})
        st.moments = blob.get("moments", {})
        st.optimizer = blob["optimizer"]
        st.steps = blob["steps"]
        st.keep = blob.get("keep")
        st.osc = blob.get("osc", {})
        self._apply_keep()
        self.rng.bit_generator.state = blob["rng"]
