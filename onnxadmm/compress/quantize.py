"""Euclidean projections onto quantized, binarized and clustered value sets.

Every function takes and returns torch tensors. ``mask`` (optional, bool, the weight's shape) marks the
kept entries: positions outside it are pruned, come back exactly 0, get no code and are ignored when the
levels are fitted. The value set a weight was projected onto is returned as a :class:`Grid`.

Projections (the Z-step of ADMM, and the hard projection before masked retraining):

- :func:`quantize_uniform`: symmetric uniform levels ``n * q``, ``|n| <= L = 2^(bits-1) - 1``, with
  the step ``q`` (per tensor, or per slice along ``axis``) chosen to minimise ``||w - Q(w)||^2`` over
  the kept entries, not by max-abs scaling. The error is piecewise quadratic in ``q`` and very rugged
  (dozens of local minima near the optimum at 5-8 bits), so: when entries x levels <= 200,000 the
  global optimum is found exactly (a sweep over every breakpoint); above, by a coarse-to-fine grid
  search over ``q`` on sorted magnitudes with prefix sums (one evaluation costs O(L log n), not O(n)),
  polished by Lloyd iterations (nearest level, then the least-squares step ``<|w|, n> / <n, n>``)
  from the best grid points, the max-abs step and the smallest non-zero ``|w|``. Measured against
  the exact sweep the search is within ~1e-5 of the optimal squared error per tensor, ~1e-3 per
  channel at 8 bits (where many groups x many levels force a thinner search).
  ``allow_zero=False`` forbids the 0 level for kept entries, whose codes then have the whole code
  space to themselves: levels ``±q .. ±2^(bits-1) q`` (``2^bits`` levels; zeros are only where pruned,
  and their positions are stored apart); with ``allow_zero=True`` kept entries may round to 0, which
  adds sparsity: use ``wq != 0`` as the new support if you want to count it.
- :func:`binarize`: ``{-q, +q}`` with ``q = mean|w|`` over the kept entries (optimal), ``sign(0) = +``.
- :func:`cluster`: 1-D k-means (non-uniform centroids), per tensor or per slice. Lloyd on sorted values
  with prefix sums (O(k log n) per iteration), over-relaxed to cut the iterations plain Lloyd needs on
  large tensors, linear initialisation between min and max (Deep Compression), empty clusters
  re-seeded at the point farthest from its centroid, then single-point (Hartigan) moves until none
  lowers the error (within ``iters``); exact when there are at most ``k`` distinct values.
  Deterministic. Exact zeros count as pruned (they stay 0, uncoded), here and in the fixed-grid
  functions for "cluster" grids.

Fixed grids (retraining with frozen levels, export):

- :func:`project_to_grid`: nearest level of a fixed grid; ``quantize_*(w)`` equals
  ``project_to_grid(w, grid)`` for the grid it returns.
- :func:`grid_codes`: the code (column of ``grid.codebook``) of each entry, ``-1`` where not coded.
- :func:`apply_codebook`: values from codes (``-1`` gives 0).

Storage: ``Grid.bits = ceil(log2(K))`` counts the levels kept entries may take. Pruned entries are not
coded (their positions are stored by the sparse encoding), so a pruned binarized tensor holds three
values but needs 1 bit per kept entry, and a pruned ``allow_zero=False`` grid of ``bits`` bits has
``2^bits`` levels, every code of ``bits`` bits (``bits=2``: ``{±q, ±2q}``).
A ``-1`` code must be mapped before an ONNX ``Gather`` (which reads it as the last level): append a
0 level to the codebook, or store the pruned positions separately.

Retraining, as intended for an engine that keeps each weight as an ``nn.Parameter`` ``p``:

(a) Straight-through (STE) retraining: keep a float shadow ``W`` (``p.detach().clone()``); before each
    forward set ``p.data = project_to_grid(W, grid, mask)`` (frozen levels) or re-fit with
    ``quantize_uniform(W, bits, mask)[0]`` / ``cluster(W, k, mask)[0]``; after backward apply
    ``p.grad`` to ``W`` (``W.grad = p.grad``, step an optimizer that owns ``W``), and multiply by the
    mask if the pattern is frozen.
(b) Centroid / step fine-tuning with frozen codes: ``codes = grid_codes(p, grid, mask)`` once; after each
    backward ``g = centroid_grad(p.grad, codes, grid)`` (a weight's gradient goes to its centroid:
    scatter-add), update ``grid.codebook -= lr * g`` (or hand it to an optimizer), then
    ``p.data = apply_codebook(grid, codes).to(p.dtype)`` (the codebook may become unsorted: the
    fixed-grid functions accept any order). For ``"uniform"``/``"binary"`` grids update
    the step instead, to stay uniform: ``grid = grid.scaled(grid.step - lr * step_grad(p.grad, codes,
    grid))``. A codebook changed level by level is no longer uniform: rebuild it as a
    ``Grid(codebook, axis, "cluster", bits)``.

Fitting runs on the CPU (sorting through numpy); the projection itself runs on the weight's device. The
codebook is float32 (on the weight's device); the projection has the input's dtype (a float16 weight
gets float16 copies of the float32 levels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Grid",
    "apply_codebook",
    "binarize",
    "centroid_grad",
    "cluster",
    "float16_levels",
    "grid_codes",
    "project_to_grid",
    "quantization_error",
    "quantize_uniform",
    "step_grad",
]

_F64 = torch.float64
# Reductions use amin/amax/argmin rather than min(dim)/max(dim): the latter (values and indices) took
# ~15 ms even on tiny tensors on a busy 2-core machine.
# Below this many (entries x levels) the uniform step is found by the exact breakpoint sweep.
_EXACT_LIMIT = 200_000
# Searchsorted calls (rows x steps x levels) allowed for the grid stage of the heuristic search.
_SEARCH_BUDGET = 2_000_000


@dataclass(eq=False)
class Grid:
    """The value set a weight was projected onto: ``codebook[g, j]`` is level ``j`` of group ``g``."""

    codebook: torch.Tensor  # float32 [G, K]
    group_axis: int | None  # None -> G == 1; else the axis whose index selects the row
    kind: str  # "uniform" | "binary" | "cluster"
    bits: int  # bits per stored code of a kept entry: ceil(log2(K))
    step: torch.Tensor | None = None  # float32 [G] step q of "uniform"/"binary" grids (codebook = n * q)

    @property
    def levels(self) -> int:
        return int(self.codebook.shape[1])

    def scaled(self, step: torch.Tensor) -> Grid:
        """The same uniform/binary grid with a new step per group (``step`` of shape [G] or scalar)."""
        if self.step is None:
            raise ValueError("only uniform and binary grids have a step")
        step = torch.as_tensor(step, dtype=torch.float32, device=self.codebook.device).expand(
            self.codebook.shape[0]
        )
        step = step.clamp(min=0).contiguous()
        return Grid(
            _uniform_codebook(step, *_uniform_shape(self)), self.group_axis, self.kind, self.bits, step
        )


# ---- shapes and rows --------------------------------------------------------------------------------


def _bits_for(levels: int) -> int:
    return int(math.ceil(math.log2(levels))) if levels > 1 else 0


def _norm_axis(w: torch.Tensor, axis: int | None) -> int | None:
    if axis is None:
        return None
    if w.dim() == 0:
        raise ValueError("a scalar weight has no axis to group along")
    if not -w.dim() <= axis < w.dim():
        raise ValueError(f"axis {axis} out of range for a weight of {w.dim()} dims")
    return axis % w.dim()


def _rows(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """[G, M] view: one row per group."""
    if axis is None:
        return t.reshape(1, t.numel())
    g = t.shape[axis]
    return t.movedim(axis, 0).reshape(g, t.numel() // g if g else 0)


def _unrows(r: torch.Tensor, shape: torch.Size, axis: int | None) -> torch.Tensor:
    if axis is None:
        return r.reshape(shape)
    moved = (shape[axis],) + tuple(shape[:axis]) + tuple(shape[axis + 1 :])
    return r.reshape(moved).movedim(0, axis)


def _work(w: torch.Tensor) -> torch.Tensor:
    """The weight in the dtype the projection decisions are made in (float32, or float64)."""
    w = w.detach()
    if not w.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    return w if w.dtype == _F64 else w.float()


def _keep(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight {tuple(w.shape)}")
    return mask.to(device=w.device, dtype=torch.bool)


class _Sorted:
    """Kept values of each row sorted ascending (pruned ones last, as +inf), with prefix sums."""

    def __init__(self, vals: torch.Tensor, keep: torch.Tensor):
        vals, keep = vals.detach().cpu(), keep.cpu()
        g, n = vals.shape
        self.m = keep.sum(1)  # kept count per row
        dense = bool((self.m == n).all())
        keys = vals if dense else torch.where(keep, vals, torch.full_like(vals, math.inf))
        # numpy's sort is ~30x faster than torch's on one core; one +inf column more, so that index m
        # (one past the last kept entry) is always valid
        x = np.empty((g, n + 1), dtype=np.float64)
        x[:, :n] = np.sort(keys.contiguous().numpy(), axis=1)
        x[:, n] = math.inf
        self.x = torch.from_numpy(x)
        v = self.x[:, :n]
        if not dense:
            v = torch.where(torch.arange(n)[None, :] < self.m[:, None], v, torch.zeros((), dtype=_F64))
        self.p1 = torch.zeros(g, n + 1, dtype=_F64)
        self.p2 = torch.zeros(g, n + 1, dtype=_F64)
        torch.cumsum(v, 1, out=self.p1[:, 1:])
        torch.cumsum(v * v, 1, out=self.p2[:, 1:])
        self.s2 = self.p2.gather(1, self.m[:, None]).squeeze(1)

    def subset(self, idx: torch.Tensor) -> _Sorted:
        """The rows ``idx`` only."""
        new = _Sorted.__new__(_Sorted)
        new.x, new.p1, new.p2 = self.x[idx], self.p1[idx], self.p2[idx]
        new.m, new.s2 = self.m[idx], self.s2[idx]
        return new

    def sums(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Count and sum of the sorted entries [lo, hi) of each row (lo, hi: [G, ...] indices)."""
        shape = lo.shape
        lo2, hi2 = lo.reshape(shape[0], math.prod(shape[1:])), hi.reshape(shape[0], math.prod(shape[1:]))
        s1 = self.p1.gather(1, hi2) - self.p1.gather(1, lo2)
        return (hi2 - lo2).to(_F64).reshape(shape), s1.reshape(shape)

    def search(self, t: torch.Tensor) -> torch.Tensor:
        """Number of sorted entries of each row below each value of ``t`` ([G, ...])."""
        shape = t.shape
        flat = t.reshape(shape[0], math.prod(shape[1:])).contiguous()
        return torch.searchsorted(self.x, flat).reshape(shape)

    def last(self) -> torch.Tensor:
        """Largest kept value per row (0 for an empty row)."""
        top = self.x.gather(1, (self.m - 1).clamp(min=0)[:, None]).squeeze(1)
        return torch.where(self.m > 0, top, torch.zeros((), dtype=_F64))


# ---- uniform levels ---------------------------------------------------------------------------------


def _uniform_codebook(step: torch.Tensor, nmin: int, top: int) -> torch.Tensor:
    """float32 [G, K] levels n * q, n in -top..-nmin, nmin..top (0 once when nmin == 0)."""
    pos = torch.arange(max(nmin, 1), top + 1, dtype=torch.float32, device=step.device)
    n = torch.cat([-pos.flip(0), pos]) if nmin else torch.cat([-pos.flip(0), pos.new_zeros(1), pos])
    return n[None, :] * step.float()[:, None]


def _uniform_shape(grid: Grid) -> tuple[int, int]:
    """(nmin, top) of a uniform or binary grid: K odd -> 0 is a level."""
    k = grid.levels
    return (0, (k - 1) // 2) if k % 2 else (1, k // 2)


def _round_codes(rows: torch.Tensor, step: torch.Tensor, nmin: int, top: int) -> torch.Tensor:
    """Code of the nearest level ``n * step`` of each entry (ties upward; sign(0) = + without 0)."""
    q = step.to(rows.dtype)[:, None]
    pos = q > 0
    if nmin == 1 and top == 1:  # binary: the sign
        return ((rows >= 0) | ~pos).long()
    r = rows / torch.where(pos, q, torch.ones_like(q))
    r.mul_(pos)
    n = torch.floor(r + 0.5)
    if nmin:
        n = torch.where(n == 0, torch.where(r >= 0, 1.0, -1.0).to(n.dtype), n)
    n = n.clamp_(-top, top).long()
    return n + top - (n > 0).long() if nmin else n.add_(top)


def _uniform_stats(s: _Sorted, q: torch.Tensor, nmin: int, top: int):
    """Assignment of the sorted |w| to levels nmin..top at steps q [G, S], and its error.

    Returns (boundaries [G, S, T], error, <a, n>, <n, n>) with the error of each step in closed form.
    """
    g, n_s = q.shape
    half = torch.arange(nmin, top, dtype=_F64) + 0.5
    b = s.search(q[:, :, None] * half)  # [G, S, T]
    lo = torch.cat([torch.zeros(g, n_s, 1, dtype=torch.long), b], 2)
    hi = torch.cat([b, s.m[:, None, None].expand(g, n_s, 1)], 2)
    cnt, s1 = s.sums(lo, hi)
    n = torch.arange(nmin, top + 1, dtype=_F64)
    num = (s1 * n).sum(2)
    den = (cnt * n * n).sum(2)
    err = s.s2[:, None] - 2 * q * num + q * q * den
    return b, err.clamp(min=0), num, den


def _pick(q: torch.Tensor, err: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the smallest error; among (numerically) equal ones the largest step."""
    best = err.amin(1)
    tie = err <= (best + 1e-12 * scale + 1e-300)[:, None]
    qq = torch.where(tie, q, torch.full_like(q, -1.0)).amax(1)
    return qq, best


def _uniform_exact(
    a: torch.Tensor, keep: torch.Tensor, nmin: int, top: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Globally optimal step per row by sweeping every breakpoint q = |w_i| / (j + 1/2).

    Between consecutive breakpoints the assignment is fixed and the error a convex quadratic in q;
    each piece's minimiser (clipped to the piece) is a candidate, the best one is the global optimum.
    """
    a = a.to(_F64)
    kf = keep.to(_F64)
    g = a.shape[0]
    if a.shape[1] == 0:
        return torch.zeros(g, dtype=_F64), torch.zeros(g, dtype=_F64)
    s1 = (a * kf).sum(1)
    s2 = (a * a * kf).sum(1)
    m = kf.sum(1)
    num0, den0 = nmin * s1, nmin * nmin * m
    # the piece above the largest breakpoint (every entry at level nmin)
    if top == nmin:
        q = torch.where(m > 0, s1 / m.clamp(min=1), torch.zeros_like(s1))
        return q, (s2 - 2 * q * num0 + q * q * den0).clamp(min=0)
    # in numpy: single-threaded and much faster than torch for the sort and these small passes
    an, kn = a.numpy(), keep.numpy()
    bp = an[:, :, None] / (np.arange(nmin, top, dtype=np.float64) + 0.5)  # [G, M, T]
    bp[~kn] = -1.0  # pruned entries: never crossed
    bp = bp.reshape(g, -1)
    order = np.argsort(-bp, axis=1)  # descending breakpoints: q decreasing, one level up at each
    bp = np.take_along_axis(bp, order, 1)
    elem, lev = np.divmod(order, top - nmin)
    kept = np.take_along_axis(kn, elem, 1)
    num = np.cumsum(np.take_along_axis(an, elem, 1) * kept, 1) + num0.numpy()[:, None]
    den = np.cumsum((2 * (lev + nmin) + 1) * kept, 1) + den0.numpy()[:, None]
    lower = np.zeros_like(bp)
    lower[:, :-1] = np.maximum(bp[:, 1:], 0)
    qs = np.where(den > 0, num / np.maximum(den, 1e-300), bp)
    qs = np.minimum(np.maximum(qs, lower), bp)
    err = s2.numpy()[:, None] - 2 * qs * num + qs * qs * den
    err[bp <= 0] = math.inf
    qs, err = torch.from_numpy(qs), torch.from_numpy(err)
    bp = torch.from_numpy(bp)
    # the first piece: q >= largest breakpoint
    q0 = torch.where(den0 > 0, torch.maximum(num0 / den0.clamp(min=1e-300), bp[:, 0]), bp[:, 0].clamp(min=0))
    e0 = s2 - 2 * q0 * num0 + q0 * q0 * den0
    qs = torch.cat([q0[:, None], qs], 1)
    err = torch.cat([e0[:, None], err], 1).clamp(min=0)
    return _pick(qs, err, s2)


def _best_local_minima(q: torch.Tensor, err: torch.Tensor, n: int) -> torch.Tensor:
    """Up to ``n`` steps per row (best first) at local minima of the error along each row of ``q``."""
    inf = torch.full_like(err[:, :1], math.inf)
    left = torch.cat([inf, err[:, :-1]], 1)
    right = torch.cat([err[:, 1:], inf], 1)
    e_loc = torch.where((err <= left) & (err <= right), err, torch.full_like(err, math.inf))
    return q.gather(1, e_loc.topk(min(n, q.shape[1]), dim=1, largest=False).indices)


def _uniform_model(s: _Sorted, q: torch.Tensor, nmin: int, top: int) -> torch.Tensor:
    """Cheap approximation of the error at steps q [G, S] (2 searches per step instead of L): exact for
    the lowest and the clipped bins, ``q^2 / 12`` per entry in between. Good for many levels."""
    g, n_s = q.shape
    b = s.search(q[:, :, None] * torch.tensor([nmin + 0.5, top + 0.5], dtype=_F64))  # [G, S, 2]
    zero = torch.zeros(g, n_s, 1, dtype=torch.long)
    lo = torch.cat([zero, b], 2)
    hi = torch.cat([b, s.m[:, None, None].expand(g, n_s, 1)], 2)
    cnt, s1 = s.sums(lo, hi)
    s2 = (s.p2.gather(1, hi.reshape(g, -1)) - s.p2.gather(1, lo.reshape(g, -1))).reshape(lo.shape)
    low = s2[..., 0] - 2 * nmin * q * s1[..., 0] + (nmin * q) ** 2 * cnt[..., 0]
    clip = s2[..., 2] - 2 * top * q * s1[..., 2] + (top * q) ** 2 * cnt[..., 2]
    return low + cnt[..., 1] * q * q / 12 + clip


def _uniform_search(s: _Sorted, nmin: int, top: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Near-optimal step per row. The error is very rugged in q (dozens of local minima within +-10% of
    the optimum for 5-8 bits) and Lloyd iterations creep on large tensors, so the search is a grid one:
    a coarse log grid of steps in [max|w| / (64 L), max|w|], then three levels of finer grids around the
    best local minima of the previous level (spacing ~1e-5 relative at the end); the best points, the
    max-abs step ``max|w| / L`` (and ``/(L-1)``) and the smallest non-zero ``|w|`` (which finds an input
    already on a grid) are polished by Lloyd iterations; the best result wins. When rows x levels is
    large (per-channel, many levels), the coarse stage uses :func:`_uniform_model` instead and the
    refinement is thinner."""
    g = s.x.shape[0]
    amax = s.last()
    evals = _SEARCH_BUDGET // (g * max(top - nmin, 1))  # exact error evaluations affordable per row
    if evals >= 300:
        n_centres, n_fine, levels = 3, 24, 3
        ratio = torch.logspace(0, -math.log10(64.0 * top), 48, dtype=_F64)
        q_cand = amax[:, None] * ratio
        _, e_cand, _, _ = _uniform_stats(s, q_cand, nmin, top)
        span = float(ratio[0] / ratio[1])
    else:  # many groups with many levels (per-channel 6-8 bits): model, then a thin exact search
        n_centres, n_fine, levels = 2, 6, 2
        ratio = torch.logspace(0, -math.log10(64.0 * top), 256, dtype=_F64)
        q_model = amax[:, None] * ratio
        centre = q_model.gather(1, _uniform_model(s, q_model, nmin, top).argmin(1, keepdim=True))
        q_cand = centre * torch.logspace(math.log10(1.05), -math.log10(1.05), 16, dtype=_F64)
        _, e_cand, _, _ = _uniform_stats(s, q_cand, nmin, top)
        span = 1.05 ** (2.0 / 15)
    pool_q, pool_e = [q_cand], [e_cand]
    for _ in range(levels):
        centre = _best_local_minima(q_cand, e_cand, n_centres)  # [G, C]
        fine = torch.logspace(math.log10(span), -math.log10(span), n_fine, dtype=_F64)
        q_cand = (centre[:, :, None] * fine).reshape(g, -1).sort(1).values
        _, e_cand, _, _ = _uniform_stats(s, q_cand, nmin, top)
        pool_q.append(q_cand)
        pool_e.append(e_cand)
        span = span ** (2.0 / (n_fine - 1))
    pool_q, pool_e = torch.cat(pool_q, 1), torch.cat(pool_e, 1)
    picks = pool_q.gather(1, pool_e.topk(min(2, pool_e.shape[1]), dim=1, largest=False).indices)
    first_pos = torch.searchsorted(s.x, torch.zeros(g, 1, dtype=_F64), right=True)  # first entry > 0
    apos = s.x.gather(1, first_pos).squeeze(1)
    apos = torch.where(torch.isfinite(apos) & (apos > 0), apos, amax)
    starts = [picks, (amax / top)[:, None], apos[:, None]]
    if top > 1:
        starts.append((amax / (top - 1))[:, None])
    q = torch.cat(starts, 1)
    best_q, best_e = q.clone(), torch.full_like(q, math.inf)
    prev = None
    rounds = max(2, min(iters, (evals - pool_q.shape[1]) // q.shape[1]))
    for _ in range(rounds):
        b, err, num, den = _uniform_stats(s, q, nmin, top)
        better = err < best_e
        best_q, best_e = torch.where(better, q, best_q), torch.where(better, err, best_e)
        if prev is not None and torch.equal(b, prev):
            break
        prev = b
        q = torch.where(den > 0, num / den.clamp(min=1e-300), q)
    return _pick(best_q, best_e, s.s2)


def _realized_error(rows, keep, step, nmin: int, top: int) -> torch.Tensor:
    cb = _uniform_codebook(step, nmin, top).to(rows.dtype)
    v = cb.gather(1, _round_codes(rows, step, nmin, top))
    return (((rows - v).to(_F64) ** 2) * keep).sum(1)


def _snap(rows: torch.Tensor, keep: torch.Tensor, q: torch.Tensor, nmin: int, top: int) -> torch.Tensor:
    """float32 steps for rows fitted with zero error (the input already lies on a grid).

    The float64 optimum is only known to ~1 ulp, and every q / d whose levels still reach the largest
    entry fits as well; so try fl32(q / d) and its two float32 neighbours for d = 1, 2, ... and keep the
    first (largest) step whose float32 levels reproduce the input exactly, or else the best one seen.
    This makes the projection of a projection return it unchanged.
    """
    q = q.to(_F64)
    amax = torch.where(keep, rows.abs(), torch.zeros_like(rows)).amax(1).to(_F64)
    n_max = torch.round(amax / q).clamp(min=1)
    d_max = int(min(64, float((top / n_max).floor().max())))
    best = q.float()
    best_err = torch.full_like(q, math.inf)
    for d in range(1, max(1, d_max) + 1):
        base = (q / d).float()
        for c in (base, torch.nextafter(base, torch.zeros_like(base)), torch.nextafter(base, base + 1)):
            err = _realized_error(rows, keep, c, nmin, top)
            err = torch.where(n_max * d <= top, err, torch.full_like(err, math.inf))
            better = err < best_err
            best, best_err = torch.where(better, c, best), torch.where(better, err, best_err)
        if bool((best_err == 0).all()):
            break
    return best


def _finish(w, rows, keep_rows, codes, cb, axis) -> torch.Tensor:
    vals = cb.to(rows.dtype).gather(1, codes.clamp(min=0))
    vals = torch.where(keep_rows & (codes >= 0), vals, torch.zeros_like(vals))
    return _unrows(vals, w.shape, axis).to(w.dtype)


def quantize_uniform(
    w: torch.Tensor,
    bits: int,
    mask: torch.Tensor | None = None,
    axis: int | None = None,
    allow_zero: bool = True,
    iters: int = 20,
    method: str = "auto",
) -> tuple[torch.Tensor, Grid]:
    """Projection onto symmetric uniform levels of ``bits`` bits, the step fitted to minimise the error.

    ``bits >= 2``: levels ``n * q``, ``|n| <= 2^(bits-1) - 1``; ``allow_zero=False`` excludes ``n = 0``
    for kept entries and gives them ``1 <= |n| <= 2^(bits-1)`` instead (``2^bits`` levels, as many as
    ``bits`` bits can code). ``bits == 1``: :func:`binarize`. ``axis``: one step per slice along it (per output
    channel: 0). ``method``: "exact" (breakpoint sweep, O(n L log(n L))), "search" (Lloyd from several
    starts on sorted magnitudes, at most ``iters`` iterations), "auto" (exact when n * L is small).
    """
    if bits == 1:
        return binarize(w, mask, axis)
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    if method not in ("auto", "exact", "search"):
        raise ValueError(f"method must be 'auto', 'exact' or 'search', got {method!r}")
    axis = _norm_axis(w, axis)
    wk = _work(w)
    keep = _keep(wk, mask)
    rows, keep_rows = _rows(wk, axis), _rows(keep, axis)
    top, nmin = (2 ** (bits - 1) - 1, 0) if allow_zero else (2 ** (bits - 1), 1)
    a = rows.abs().cpu()
    kc = keep_rows.cpu()
    if method == "exact" or (method == "auto" and a.numel() * (top - nmin) <= _EXACT_LIMIT):
        q, err = _uniform_exact(a, kc, nmin, top)
        s2 = ((a.to(_F64) ** 2) * kc).sum(1)
    else:
        srt = _Sorted(a, kc)
        q, err = _uniform_search(srt, nmin, top, iters)
        s2 = srt.s2
    step = q.float().to(rows.device)
    exact = ((err <= 1e-12 * s2) & (s2 > 0)).to(rows.device)
    if bool(exact.any()):
        sel = torch.nonzero(exact).squeeze(1)
        step[sel] = _snap(rows[sel], keep_rows[sel], q.to(rows.device)[sel], nmin, top)
    cb = _uniform_codebook(step, nmin, top)
    codes = _round_codes(rows, step, nmin, top)
    grid = Grid(cb, axis, "uniform", _bits_for(cb.shape[1]), step)
    return _finish(w, rows, keep_rows, codes, cb, axis), grid


def binarize(
    w: torch.Tensor, mask: torch.Tensor | None = None, axis: int | None = None
) -> tuple[torch.Tensor, Grid]:
    """Projection onto ``{-q, +q}`` (per tensor or per slice along ``axis``), ``q = mean|w|`` over the
    kept entries, ``sign(0) = +``. Pruned entries stay 0 (not coded): ``Grid.bits`` is 1."""
    axis = _norm_axis(w, axis)
    wk = _work(w)
    keep = _keep(wk, mask)
    rows, keep_rows = _rows(wk, axis), _rows(keep, axis)
    kf = keep_rows.to(_F64)
    step = ((rows.abs().to(_F64) * kf).sum(1) / kf.sum(1).clamp(min=1)).float()
    cb = _uniform_codebook(step, 1, 1)
    codes = _round_codes(rows, step, 1, 1)
    return _finish(w, rows, keep_rows, codes, cb, axis), Grid(cb, axis, "binary", 1, step)


# ---- clustering -------------------------------------------------------------------------------------


def _hartigan(s: _Sorted, c, cnt, s1, lo, hi, rows_ok) -> tuple[torch.Tensor, torch.Tensor]:
    """Best single-point move per row (an end point of a cluster to any other cluster) if it lowers the
    error; returns (new centroids, moved rows). In 1-D the gain of moving a point out of a contiguous
    cluster is concave in the point, so the end points are the only candidates needed."""
    g, k = c.shape
    new_c = c.clone()
    moved = torch.zeros(g, dtype=torch.bool)
    chunk = max(1, (1 << 22) // (2 * k * k))
    for r0 in range(0, g, chunk):
        sl = slice(r0, min(g, r0 + chunk))
        cc, nn, ss = c[sl], cnt[sl], s1[sl]
        x_lo = s.x[sl].gather(1, lo[sl].clamp(max=s.x.shape[1] - 1))
        x_hi = s.x[sl].gather(1, (hi[sl] - 1).clamp(min=0))
        x = torch.stack([x_lo, x_hi], 2)  # [R, K(src), 2]
        src_ok = nn >= 2
        x = torch.where(src_ok[:, :, None], x, torch.zeros_like(x))
        remove = (nn / (nn - 1).clamp(min=1))[:, :, None] * (x - cc[:, :, None]) ** 2  # [R, K, 2]
        add = (nn / (nn + 1))[:, None, None, :] * (x[:, :, :, None] - cc[:, None, None, :]) ** 2  # [R,K,2,K]
        delta = add - remove[:, :, :, None]
        bad = ~src_ok[:, :, None, None] | torch.eye(k, dtype=torch.bool)[None, :, None, :]
        delta = torch.where(bad, torch.full_like(delta, math.inf), delta)
        flat = delta.reshape(delta.shape[0], -1)
        idx = flat.argmin(1)
        best = flat.gather(1, idx[:, None]).squeeze(1)
        span = (s.x[sl].gather(1, (s.m[sl] - 1).clamp(min=0)[:, None]).squeeze(1) - s.x[sl, 0]) ** 2
        go = (best < -1e-12 * span) & rows_ok[sl]
        if not bool(go.any()):
            continue
        src, end, dst = idx // (2 * k), (idx // k) % 2, idx % k
        r = torch.nonzero(go).squeeze(1)
        xv = x[r, src[r], end[r]]
        blk = new_c[sl]
        blk[r, src[r]] = (ss[r, src[r]] - xv) / (nn[r, src[r]] - 1)
        blk[r, dst[r]] = (ss[r, dst[r]] + xv) / (nn[r, dst[r]] + 1)
        new_c[sl] = blk
        moved[sl] = go
    return new_c, moved


class _Step:
    """One Lloyd assignment of the sorted rows to centroids ``c`` [G, K] (ascending): partition
    boundaries, cluster counts and sums, the error of the nearest assignment, and the new means."""

    def __init__(self, s: _Sorted, c: torch.Tensor):
        g = c.shape[0]
        self.b = s.search((c[:, :-1] + c[:, 1:]) / 2)  # [G, K-1]
        self.lo = torch.cat([torch.zeros(g, 1, dtype=torch.long), self.b], 1)
        self.hi = torch.cat([self.b, s.m[:, None]], 1)
        self.cnt, self.s1 = s.sums(self.lo, self.hi)
        s2 = s.p2.gather(1, self.hi) - s.p2.gather(1, self.lo)
        self.err = (s2 - 2 * c * self.s1 + c * c * self.cnt).sum(1).clamp(min=0)
        self.mean = torch.where(self.cnt > 0, self.s1 / self.cnt.clamp(min=1), c)


def _kmeans(s: _Sorted, k: int, iters: int, init: str) -> torch.Tensor:
    """Centroids [G, K] (float64, ascending) of 1-D k-means on each row of ``s``.

    Lloyd iterations on sorted values (O(K log n) each), over-relaxed: the step from the centroids
    to the new means is stretched by omega (grown x1.5 per accepted step, up to 8) as long as the
    error falls, and reset to a plain step otherwise. Plain Lloyd creeps on large tensors (over a
    thousand iterations for k = 64 on 400k weights); this needs a fraction of that. Once a row is at
    a fixed point, an empty cluster is re-seeded at the point farthest from its centroid, or else the
    best improving single-point move is made; a row is done when neither applies.
    """
    g, n = s.x.shape
    m = s.m
    lo_v = s.x[:, 0]
    hi_v = s.last()
    if init == "linear":
        frac = torch.linspace(0, 1, k, dtype=_F64) if k > 1 else torch.full((1,), 0.5, dtype=_F64)
        c = lo_v[:, None] + (hi_v - lo_v)[:, None] * frac
    else:  # quantile
        pos = ((torch.arange(k, dtype=_F64) + 0.5) / k)[None, :] * m[:, None].to(_F64)
        c = s.x.gather(1, pos.long().clamp(max=n - 1))
    c = torch.where(m[:, None] > 0, c, torch.zeros_like(c))
    c = torch.nan_to_num(c, posinf=0.0)
    c_all, act, cur = c, torch.arange(g), s  # rows still iterating, and their data
    st = _Step(cur, c)
    omega = torch.ones(g, dtype=_F64)
    for _ in range(max(1, iters)):
        ga = act.numel()
        fast = omega > 1
        cand = torch.where(fast[:, None], (c + omega[:, None] * (st.mean - c)).sort(1).values, st.mean)
        nxt = _Step(cur, cand)
        reject = fast & ~(nxt.err < st.err)
        if bool(reject.any()):  # over-relaxation overshot: a plain step for those rows
            cand = torch.where(reject[:, None], st.mean, cand)
            nxt = _Step(cur, cand)
        plain = ~fast | reject
        fixed = plain & (nxt.b == st.b).all(1)  # a plain step that kept the partition: a fixed point
        omega = torch.where(plain & ~fast, omega * 1.5, torch.where(reject, 1.0, (omega * 1.5).clamp(max=8)))
        c, st = cand, nxt
        changed = torch.zeros(ga, dtype=torch.bool)
        # empty clusters at a fixed point: re-seed one per row at the point farthest from its centroid
        empty = (st.cnt == 0) & (cur.m[:, None] > 0) & fixed[:, None]
        if bool(empty.any()):
            x_lo = cur.x.gather(1, st.lo.clamp(max=n - 1))
            x_hi = cur.x.gather(1, (st.hi - 1).clamp(min=0))
            d_lo, d_hi = (x_lo - c) ** 2, (x_hi - c) ** 2
            d = torch.where(st.cnt > 0, torch.maximum(d_lo, d_hi), torch.full_like(c, -1.0))
            far = d.argmax(1)
            dmax = d.gather(1, far[:, None]).squeeze(1)
            go = empty.any(1) & (dmax > 0)
            if bool(go.any()):
                r = torch.nonzero(go).squeeze(1)
                fr = far[r]
                pt = torch.where(d_lo[r, fr] >= d_hi[r, fr], x_lo[r, fr], x_hi[r, fr])
                c[r, empty[r].long().argmax(1)] = pt
                changed |= go
        ready = fixed & ~changed
        if bool(ready.any()):
            c, moved = _hartigan(cur, c, st.cnt, st.s1, st.lo, st.hi, ready)
            changed |= moved
        finished = fixed & ~changed
        if bool(changed.any()):
            c = c.sort(1).values
            st = _Step(cur, c)
            omega = torch.where(changed, 1.0, omega)
        if bool(finished.all()):
            break
        if ga > 8 and 2 * int(finished.sum()) >= ga:  # drop the converged rows
            c_all[act] = c
            left = ~finished
            act, c, omega = act[left], c[left], omega[left]
            cur = s.subset(act)
            st = _Step(cur, c)
    c_all[act] = c
    return c_all.sort(1).values


def _nearest_codes(rows: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of each row's codebook (any order; ties to the larger level)."""
    srt, perm = cb.sort(1)
    srt = srt.to(_F64)
    mids = ((srt[:, :-1] + srt[:, 1:]) / 2).to(rows.dtype).contiguous()
    codes = torch.searchsorted(mids, rows.contiguous(), right=True)
    return perm.gather(1, codes)


def cluster(
    w: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
    iters: int = 1000,
    init: str = "linear",
    axis: int | None = None,
) -> tuple[torch.Tensor, Grid]:
    """Projection onto at most ``k`` distinct values (k-means centroids, per tensor or per slice).

    The centroids are fitted to the kept non-zero entries: exact zeros count as pruned and stay 0. At
    most ``iters`` Lloyd iterations (each O(k log n) on sorted values), interleaved with single-point
    moves; ``init`` "linear" (between min and max) or "quantile". Deterministic.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if init not in ("linear", "quantile"):
        raise ValueError(f"init must be 'linear' or 'quantile', got {init!r}")
    axis = _norm_axis(w, axis)
    wk = _work(w)
    keep = _keep(wk, mask) & (wk != 0)
    rows, keep_rows = _rows(wk, axis), _rows(keep, axis)
    s = _Sorted(rows.cpu(), keep_rows.cpu())
    c = _kmeans(s, k, iters, init)
    # at most k distinct values: the distinct values themselves (exact)
    x = s.x
    idx = torch.arange(x.shape[1])[None, :]
    new = torch.ones_like(x, dtype=torch.bool)
    new[:, 1:] = x[:, 1:] != x[:, :-1]
    new &= idx < s.m[:, None]
    few = (new.sum(1) <= k) & (s.m > 0)
    for r in torch.nonzero(few).squeeze(1).tolist():
        u = x[r, : int(s.m[r])].unique()
        c[r] = torch.cat([u, u[-1:].expand(k - u.numel())])
    cb = c.float().to(rows.device)
    codes = _nearest_codes(rows, cb)
    codes = torch.where(keep_rows, codes, torch.full_like(codes, -1))
    grid = Grid(cb, axis, "cluster", _bits_for(k))
    return _finish(w, rows, keep_rows, codes, cb, axis), grid


# ---- fixed grids --------------------------------------------------------------------------------------


def _grid_rows(w: torch.Tensor, grid: Grid, mask):
    axis = grid.group_axis
    if axis is not None and not 0 <= axis < w.dim():
        raise ValueError(f"grid groups along axis {axis}, the weight has {w.dim()} dims")
    wk = _work(w)
    keep = _keep(wk, mask)
    if grid.kind == "cluster":
        keep = keep & (wk != 0)
    rows, keep_rows = _rows(wk, axis), _rows(keep, axis)
    if rows.shape[0] != grid.codebook.shape[0]:
        raise ValueError(f"grid has {grid.codebook.shape[0]} groups, the weight {rows.shape[0]}")
    return rows, keep_rows


def grid_codes(w: torch.Tensor, grid: Grid, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Code (column of ``grid.codebook``) of the nearest level of each entry; -1 where not coded
    (outside ``mask``; for "cluster" grids also exact zeros). A LongTensor of the weight's shape."""
    rows, keep_rows = _grid_rows(w, grid, mask)
    cb = grid.codebook.to(rows.device)
    if grid.kind in ("uniform", "binary"):
        if grid.step is None:
            raise ValueError("a uniform/binary grid needs its step")
        codes = _round_codes(rows, grid.step.to(rows.device), *_uniform_shape(grid))
    else:
        codes = _nearest_codes(rows, cb)
    codes = torch.where(keep_rows, codes, torch.full_like(codes, -1))
    return _unrows(codes, w.shape, grid.group_axis)


def project_to_grid(w: torch.Tensor, grid: Grid, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest level of the fixed ``grid`` for each kept entry (0 elsewhere), in ``w``'s dtype."""
    codes = grid_codes(w, grid, mask)
    return apply_codebook(grid, codes).to(w.dtype)


def apply_codebook(grid: Grid, codes: torch.Tensor) -> torch.Tensor:
    """float32 values ``codebook[group, code]`` of a code tensor (``-1`` gives 0)."""
    axis = grid.group_axis
    rows = _rows(codes, axis)
    cb = grid.codebook.to(codes.device).float()
    vals = cb.gather(1, rows.clamp(min=0))
    vals = torch.where(rows >= 0, vals, torch.zeros_like(vals))
    return _unrows(vals, codes.shape, axis)


def centroid_grad(grad_w: torch.Tensor, codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Gradient of the loss w.r.t. the codebook [G, K]: each coded weight's gradient added to its level."""
    axis = grid.group_axis
    g_rows = _rows(grad_w.detach().float(), axis)
    c_rows = _rows(codes.to(g_rows.device), axis)
    valid = c_rows >= 0
    out = torch.zeros(grid.codebook.shape, dtype=torch.float32, device=g_rows.device)
    return out.scatter_add_(1, c_rows.clamp(min=0), torch.where(valid, g_rows, torch.zeros_like(g_rows)))


def step_grad(grad_w: torch.Tensor, codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Gradient of the loss w.r.t. the step [G] of a uniform/binary grid (values are n * q: sum grad * n)."""
    if grid.step is None:
        raise ValueError("only uniform and binary grids have a step")
    nmin, top = _uniform_shape(grid)
    pos = torch.arange(max(nmin, 1), top + 1, dtype=torch.float32)
    n = torch.cat([-pos.flip(0), pos]) if nmin else torch.cat([-pos.flip(0), pos.new_zeros(1), pos])
    return (centroid_grad(grad_w, codes, grid) * n.to(grad_w.device)[None, :]).sum(1)


def float16_levels(grid: Grid, tolerance: float = 1 / 32) -> Grid:
    """``grid`` moved onto levels that float16 holds exactly, where that moves no level by more than
    ``tolerance`` of the gap between levels (a step, or the nearest other centroid), so that the
    written codebook takes 2 bytes a level instead of 4.

    Uniform and binary grids: the step of each group becomes the nearest ``M * 2**e`` with ``M <=
    2047 // top`` (``top`` the largest level index), so every level ``n * step`` has at most 11
    significant bits. That moves the top level by at most ``top / (2047 // top)`` of a step: 2.4% at
    ``top = 7`` (4 bits), within the tolerance; 3.1% at ``top = 8`` (4-bit pruned layers), so the
    rare group that far keeps its step; at 8 bits mostly beyond it, and those groups keep theirs.
    Clustered grids: centroids rounded to float16. Groups whose levels fall outside float16's normal range keep theirs."""
    book = grid.codebook.detach().to(_F64).cpu()
    if grid.step is not None:
        step = grid.step.detach().to(_F64).cpu().clamp(min=0)
        top = max(_uniform_shape(grid)[1], 1)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        e = torch.ceil(torch.log2(safe / (2047 // top)))
        new = torch.round(safe / 2**e) * 2**e
        levels = _uniform_codebook(new.float(), *_uniform_shape(grid)).to(_F64)
        gap = step
    else:
        levels = book.float().half().to(_F64)
        new = None
        srt = book.sort(1).values
        # the nearest other distinct centroid (cluster() repeats a centroid where a group has fewer
        # distinct values than clusters); a group of one value: its magnitude
        d = srt[:, 1:] - srt[:, :-1]
        gap = torch.where(d > 0, d, torch.full_like(d, math.inf)).amin(1) if book.shape[1] > 1 else None
        gap = book.abs().amax(1) if gap is None else torch.where(gap.isinf(), book.abs().amax(1), gap)
    exact = (levels.float().half().to(_F64) == levels).all(1)
    normal = ((levels == 0) | (levels.abs() >= 2**-14)).all(1) & (levels.abs() <= 65504).all(1)
    close = ((levels - book).abs() <= tolerance * gap[:, None]).all(1)
    ok = exact & normal & close
    if new is not None:
        ok &= step > 0
        return grid.scaled(torch.where(ok, new, step).float().to(grid.codebook.device))
    out = torch.where(ok[:, None], levels, book).float().to(grid.codebook.device)
    return Grid(out, grid.group_axis, grid.kind, grid.bits, None)


def quantization_error(w: torch.Tensor, wq: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Relative error ``||w - wq|| / ||w||`` over the kept entries (0 for a zero weight equal to wq)."""
    d = w.detach().to(_F64) - wq.detach().to(_F64)
    ref = w.detach().to(_F64)
    if mask is not None:
        keep = mask.to(device=d.device, dtype=torch.bool)
        d, ref = d[keep], ref[keep]
    num, den = float(d.norm()), float(ref.norm())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den
