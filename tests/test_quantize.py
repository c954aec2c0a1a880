"""Projections onto quantized, binarized and clustered value sets (onnxadmm.compress.quantize).

Each projection is checked, over several seeds, shapes, masks and per-tensor / per-channel groups,
for feasibility (every kept entry is a level of its group's codebook, pruned entries are exactly 0, at
most 2^bits or k values), consistency with the fixed-grid functions, idempotence, and optimality:
the uniform step against a brute-force scan of steps on tiny tensors, the large-tensor search against
the exact breakpoint sweep, binarization against mean|w|, k-means against single-point moves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from onnxadmm.compress.quantize import (
    Grid,
    apply_codebook,
    binarize,
    centroid_grad,
    cluster,
    float16_levels,
    grid_codes,
    project_to_grid,
    quantization_error,
    quantize_uniform,
    step_grad,
)

SEEDS = range(4)
SHAPES = [(7,), (5, 6), (4, 3, 2), (6, 2, 3, 3)]


def rand_weight(seed: int, shape, dist: str = "gauss") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "gauss":
        return torch.randn(shape, generator=g)
    if dist == "heavy":  # Student-t-like: outliers that make clipping worthwhile
        return torch.randn(shape, generator=g) / torch.rand(shape, generator=g).clamp(min=0.05).sqrt()
    return torch.rand(shape, generator=g) * 2 - 1


def rand_mask(seed: int, shape, keep: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(shape, generator=g) < keep


def group_rows(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    return t.reshape(1, -1) if axis is None else t.movedim(axis, 0).reshape(t.shape[axis], -1)


def sq_err(w, wq, keep) -> float:
    d = (w.double() - wq.double())[keep]
    return float((d * d).sum())


def check_on_grid(w, wq, grid: Grid, mask, max_values: int):
    """Kept entries are levels of their group, pruned ones 0; codes and fixed-grid projection agree."""
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
    assert wq.shape == w.shape and wq.dtype == w.dtype
    assert grid.codebook.dtype == torch.float32 and grid.codebook.dim() == 2
    assert bool((wq[~keep] == 0).all()), "a pruned entry is not 0"
    rows, krows = group_rows(wq, grid.group_axis), group_rows(keep, grid.group_axis)
    assert rows.shape[0] == grid.codebook.shape[0]
    cb = grid.codebook.to(wq.dtype)
    for r in range(rows.shape[0]):
        vals = rows[r][krows[r]]
        hit = (vals[:, None] == cb[r][None, :]).any(1)
        assert bool(hit.all()), f"group {r}: {vals[~hit][:5]} not in the codebook {cb[r]}"
        assert rows[r].unique().numel() <= max_values
    codes = grid_codes(w, grid, mask)
    assert codes.dtype == torch.long and codes.shape == w.shape
    assert torch.equal(apply_codebook(grid, codes).to(w.dtype), wq)
    assert torch.equal(project_to_grid(w, grid, mask), wq)


# ---- feasibility, consistency, idempotence ---------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_on_grid_and_idempotent(seed, shape, bits):
    w = rand_weight(seed, shape, ["gauss", "heavy", "uniform"][seed % 3])
    for axis in (None, 0):
        for mask in (None, rand_mask(seed, shape)):
            for allow_zero in (True, False):
                wq, grid = quantize_uniform(w, bits, mask, axis=axis, allow_zero=allow_zero)
                assert grid.kind == "uniform" and grid.group_axis == axis
                # without a zero level the kept entries get the whole code space: 2^bits levels
                k = 2**bits - 1 if allow_zero else 2**bits
                assert grid.levels == k and grid.bits == bits == math.ceil(math.log2(k))
                check_on_grid(w, wq, grid, mask, k + 1)  # + 0 where pruned
                keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
                if not allow_zero:
                    assert bool((wq[keep] != 0).all()), "allow_zero=False put a kept entry on 0"
                # levels are symmetric multiples of the step
                on = grid.step > 0
                n = grid.codebook[on] / grid.step[on][:, None]
                assert torch.allclose(n, n.round(), atol=1e-4)
                again, _ = quantize_uniform(wq, bits, mask, axis=axis, allow_zero=allow_zero)
                assert torch.equal(again, wq), "projecting the projection changed it"
                assert torch.equal(project_to_grid(wq, grid, mask), wq)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_binarize_on_grid_and_optimal_step(seed, shape):
    w = rand_weight(seed, shape)
    for axis in (None, 0):
        for mask in (None, rand_mask(seed, shape)):
            wq, grid = binarize(w, mask, axis)
            assert grid.kind == "binary" and grid.bits == 1 and grid.levels == 2
            check_on_grid(w, wq, grid, mask, 3 if mask is not None else 2)
            keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
            rows, krows = group_rows(w, axis), group_rows(keep, axis)
            for r in range(rows.shape[0]):
                kept = rows[r][krows[r]]
                expect = kept.abs().mean() if kept.numel() else torch.tensor(0.0)
                assert float(grid.step[r]) == pytest.approx(float(expect), rel=1e-6, abs=1e-12)
            # bits=1 is binarization; the result is a fixed point
            wq1, _ = quantize_uniform(w, 1, mask, axis=axis)
            assert torch.equal(wq1, wq)
            assert torch.equal(binarize(wq, mask, axis)[0], wq)


def test_binarize_sign_of_zero_is_plus():
    wq, grid = binarize(torch.tensor([0.0, -1.0, 2.0]))
    assert wq.tolist() == [1.0, -1.0, 1.0]
    assert grid.codebook.tolist() == [[-1.0, 1.0]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_cluster_on_grid_and_idempotent(seed, shape, k):
    w = rand_weight(seed, shape, ["gauss", "heavy"][seed % 2])
    for axis in (None, 0):
        for mask in (None, rand_mask(seed, shape)):
            wq, grid = cluster(w, k, mask, axis=axis)
            assert grid.kind == "cluster" and grid.levels == k
            assert grid.bits == (math.ceil(math.log2(k)) if k > 1 else 0)
            check_on_grid(w, wq, grid, mask, k + 1)
            assert torch.equal(cluster(wq, k, mask, axis=axis)[0], wq)


# ---- optimality ----------------------------------------------------------------------------------


def brute_force_uniform(a: np.ndarray, bits: int, allow_zero: bool, n_q: int = 20001) -> float:
    """min over a fine grid of steps of the error of rounding |w| to the nearest level."""
    top = 2 ** (bits - 1) - 1 if allow_zero else 2 ** (bits - 1)
    a = np.abs(a.astype(np.float64))
    if a.size == 0 or a.max() == 0:
        return 0.0
    q = np.linspace(1e-6, 1.5, n_q)[:, None] * a.max()
    n = np.clip(np.floor(a[None, :] / q + 0.5), 0 if allow_zero else 1, top)
    return float(((a[None, :] - n * q) ** 2).sum(1).min())


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("bits", [2, 3])
def test_uniform_step_beats_brute_force(seed, bits):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 12, (1,), generator=g))
    w = rand_weight(seed, (n,), ["gauss", "heavy", "uniform"][seed % 3])
    for allow_zero in (True, False):
        wq, _ = quantize_uniform(w, bits, allow_zero=allow_zero)
        got = sq_err(w, wq, torch.ones_like(w, dtype=torch.bool))
        best = brute_force_uniform(w.numpy(), bits, allow_zero)
        assert got <= best * (1 + 1e-6) + 1e-12, (got, best)


@pytest.mark.parametrize("seed", range(4))
def test_uniform_per_channel_beats_brute_force(seed):
    w = rand_weight(seed, (3, 2, 3), "heavy")
    mask = rand_mask(seed, w.shape, 0.7)
    for bits in (2, 3):
        wq, _ = quantize_uniform(w, bits, mask, axis=0)
        for r in range(3):
            kept = w[r][mask[r]]
            got = sq_err(w[r], wq[r], mask[r])
            best = brute_force_uniform(kept.numpy(), bits, True)
            assert got <= best * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("seed,dist", [(0, "gauss"), (1, "heavy"), (2, "uniform")])
def test_uniform_search_matches_exact_sweep(seed, dist):
    """The grid/Lloyd search used for large tensors against the exact sweep (both forced)."""
    w = rand_weight(seed, (24000,), dist)
    keep = torch.ones_like(w, dtype=torch.bool)
    for bits, allow_zero in ((4, True), (5, False)):
        e_exact = sq_err(w, quantize_uniform(w, bits, allow_zero=allow_zero, method="exact")[0], keep)
        e_search = sq_err(w, quantize_uniform(w, bits, allow_zero=allow_zero, method="search")[0], keep)
        assert e_exact <= e_search * (1 + 1e-6)
        assert e_search <= e_exact * (1 + 1e-4)


def test_uniform_beats_max_abs_scaling():
    w = rand_weight(0, (5000,), "heavy")
    keep = torch.ones_like(w, dtype=torch.bool)
    for bits in (3, 4, 8):
        wq, grid = quantize_uniform(w, bits)
        top = 2 ** (bits - 1) - 1
        q = w.abs().max() / top
        naive = (w / q).round().clamp(-top, top) * q
        assert sq_err(w, wq, keep) <= sq_err(w, naive, keep)
        if bits == 3:  # outliers: clipping them pays off by far
            assert sq_err(w, wq, keep) < 0.5 * sq_err(w, naive, keep)


@pytest.mark.parametrize("seed", range(4))
def test_error_non_increasing_with_bits(seed):
    w = rand_weight(seed, (40, 30), ["gauss", "heavy", "uniform"][seed % 3])
    mask = rand_mask(seed, w.shape, 0.5) if seed % 2 else None
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
    for allow_zero in (True, False):
        prev = sq_err(w, binarize(w, mask)[0], keep) if allow_zero else math.inf
        for bits in range(2, 9):
            err = sq_err(w, quantize_uniform(w, bits, mask, allow_zero=allow_zero)[0], keep)
            assert err <= prev * (1 + 1e-6) + 1e-12, (bits, err, prev)
            prev = err


@pytest.mark.parametrize("seed", range(6))
def test_per_channel_no_worse_than_per_tensor(seed):
    w = (
        rand_weight(seed, (8, 4, 3, 3), ["gauss", "heavy"][seed % 2])
        * torch.linspace(0.1, 2, 8)[:, None, None, None]
    )
    mask = rand_mask(seed, w.shape) if seed % 2 else None
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
    for bits in (2, 3, 4, 6):
        for allow_zero in (True, False):
            e_t = sq_err(w, quantize_uniform(w, bits, mask, allow_zero=allow_zero)[0], keep)
            e_c = sq_err(w, quantize_uniform(w, bits, mask, axis=0, allow_zero=allow_zero)[0], keep)
            assert e_c <= e_t * (1 + 1e-6) + 1e-12
    assert sq_err(w, binarize(w, mask, 0)[0], keep) <= sq_err(w, binarize(w, mask)[0], keep) * (1 + 1e-6)
    for k in (2, 4):
        e_t = sq_err(w, cluster(w, k, mask)[0], keep)
        e_c = sq_err(w, cluster(w, k, mask, axis=0)[0], keep)
        assert e_c <= e_t * (1 + 1e-6) + 1e-12


def single_move_gain(x: np.ndarray, codes: np.ndarray, k: int) -> float:
    """Most negative change of the partition's squared error from moving one point to another cluster
    (both centroids recomputed as means). >= 0 means no single-point reassignment helps."""
    cnt = np.bincount(codes, minlength=k).astype(np.float64)
    s1 = np.bincount(codes, weights=x, minlength=k)
    c = np.where(cnt > 0, s1 / np.maximum(cnt, 1), 0.0)
    worst = 0.0
    for i, a in enumerate(codes):
        if cnt[a] < 2:
            continue
        remove = cnt[a] / (cnt[a] - 1) * (x[i] - c[a]) ** 2
        add = cnt / (cnt + 1) * (x[i] - c) ** 2
        add[a] = np.inf
        worst = min(worst, float(add.min() - remove))
    return worst


@pytest.mark.parametrize("seed", range(10))
def test_kmeans_locally_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 60, (1,), generator=g))
    k = int(torch.randint(2, 7, (1,), generator=g))
    w = rand_weight(seed, (n,), ["gauss", "heavy", "uniform"][seed % 3])
    if seed % 4 == 3:  # many ties
        w = torch.randint(-4, 5, (n,), generator=g).float() * 0.25
    wq, grid = cluster(w, k)
    codes = grid_codes(w, grid)
    keep = w != 0
    x, cx = w[keep].double().numpy(), codes[keep].numpy()
    cb = grid.codebook[0].double().numpy()
    # each point on its nearest centroid, each (non-empty) centroid the mean of its points
    dist = (x[:, None] - cb[None, :]) ** 2
    assert np.all(dist[np.arange(x.size), cx] <= dist.min(1) + 1e-6)
    for j in np.unique(cx):
        assert cb[j] == pytest.approx(x[cx == j].mean(), rel=1e-6, abs=1e-6)
    span = float(x.max() - x.min()) ** 2 if x.size else 0.0
    assert single_move_gain(x, cx, k) >= -1e-7 * span


@pytest.mark.parametrize("seed", range(6))
def test_kmeans_exact_with_enough_clusters(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(5, generator=g)
    w = values[torch.randint(0, 5, (6, 7), generator=g)]
    for k in (5, 6, 9):
        for axis in (None, 0):
            wq, grid = cluster(w, k, axis=axis)
            assert torch.equal(wq, w)
            assert quantization_error(w, wq) == 0.0
    # fewer clusters than values: the error is positive but k+1 clusters never do worse than k
    errs = [sq_err(w, cluster(w, k)[0], w != 0) for k in (1, 2, 3, 4, 5)]
    assert errs[-1] == 0.0
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:]))


def test_kmeans_beats_uniform_at_equal_levels():
    w = rand_weight(3, (4000,), "heavy")
    keep = torch.ones_like(w, dtype=torch.bool)
    assert sq_err(w, cluster(w, 7)[0], keep) <= sq_err(w, quantize_uniform(w, 3)[0], keep) * (1 + 1e-6)


def test_cluster_keeps_zeros_and_is_deterministic():
    w = rand_weight(1, (20, 10))
    w[w.abs() < 0.5] = 0
    wq, grid = cluster(w, 4, init="linear")
    assert bool((wq[w == 0] == 0).all()) and bool((grid_codes(w, grid)[w == 0] == -1).all())
    wq2, grid2 = cluster(w, 4)
    assert torch.equal(wq, wq2) and torch.equal(grid.codebook, grid2.codebook)
    wq3, _ = cluster(w, 4, init="quantile")
    assert wq3.unique().numel() <= 5


# ---- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "project",
    [
        lambda w, m, a: quantize_uniform(w, 3, m, axis=a),
        lambda w, m, a: quantize_uniform(w, 8, m, axis=a, allow_zero=False),
        lambda w, m, a: binarize(w, m, a),
        lambda w, m, a: cluster(w, 4, m, axis=a),
    ],
    ids=["uniform3", "uniform8-nozero", "binary", "cluster4"],
)
def test_edge_cases(project):
    for axis in (None, 0):
        # all zero
        w = torch.zeros(4, 5)
        wq, grid = project(w, None, axis)
        assert torch.equal(wq, w) and bool(torch.isfinite(grid.codebook).all())
        # a single kept entry is represented exactly
        w = rand_weight(0, (4, 5))
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[2, 3] = True
        wq, grid = project(w, mask, axis)
        assert float(wq[2, 3]) == pytest.approx(float(w[2, 3]), rel=1e-6)
        assert int((wq != 0).sum()) == 1
        # everything pruned
        wq, grid = project(w, torch.zeros_like(mask), axis)
        assert torch.equal(wq, torch.zeros_like(w))
        # a constant weight is represented exactly
        w = torch.full((3, 4), -0.7)
        wq, grid = project(w, None, axis)
        assert torch.allclose(wq, w, rtol=1e-6, atol=0)
        # float16 in: float16 out, float32 codebook, values are the codebook's levels in float16
        w = rand_weight(1, (6, 5)).half()
        wq, grid = project(w, None, axis)
        assert wq.dtype == torch.float16 and grid.codebook.dtype == torch.float32
        assert torch.equal(project_to_grid(w, grid), wq)
        rows = group_rows(wq, axis)
        cb16 = grid.codebook.half()
        for r in range(rows.shape[0]):
            assert bool((rows[r][:, None] == cb16[r][None, :]).any(1).all())
        # empty and scalar weights
        wq, _ = project(torch.zeros(0, 3), None, axis)
        assert wq.shape == (0, 3)
    wq, _ = project(torch.tensor(1.25), None, None)
    assert float(wq) == pytest.approx(1.25, rel=1e-6)


def test_requires_grad_and_float64():
    w = torch.nn.Parameter(rand_weight(2, (5, 5)))
    wq, grid = quantize_uniform(w, 4)
    assert not wq.requires_grad
    w64 = rand_weight(2, (5, 5)).double()
    wq, grid = quantize_uniform(w64, 4, axis=0)
    assert wq.dtype == torch.float64 and grid.codebook.dtype == torch.float32
    assert torch.equal(project_to_grid(w64, grid), wq)


def test_bad_arguments():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError):
        quantize_uniform(w, 0)
    with pytest.raises(ValueError):
        quantize_uniform(w, 3, method="magic")
    with pytest.raises(ValueError):
        quantize_uniform(w, 3, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        quantize_uniform(w, 3, axis=2)
    with pytest.raises(ValueError):
        cluster(w, 0)
    with pytest.raises(ValueError):
        cluster(w, 3, init="random")
    with pytest.raises(TypeError):
        binarize(torch.ones(3, dtype=torch.int64))
    _, grid = quantize_uniform(w, 3, axis=0)
    with pytest.raises(ValueError):
        project_to_grid(torch.randn(5, 4), grid)


# ---- retraining helpers --------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 0])
def test_centroid_grad_matches_autograd(axis):
    w = rand_weight(4, (6, 5))
    mask = rand_mask(4, w.shape)
    target = rand_weight(5, (6, 5))
    _, grid = cluster(w, 3, mask, axis=axis)
    codes = grid_codes(w, grid, mask)
    cb = grid.codebook.clone().requires_grad_(True)
    wq = apply_codebook(Grid(cb, axis, "cluster", grid.bits), codes)
    loss = ((wq - target) ** 2 * torch.arange(30.0).reshape(6, 5)).sum()
    loss.backward()
    wleaf = wq.detach().requires_grad_(True)
    ((wleaf - target) ** 2 * torch.arange(30.0).reshape(6, 5)).sum().backward()
    assert torch.allclose(centroid_grad(wleaf.grad, codes, grid), cb.grad, rtol=1e-5, atol=1e-5)
    assert bool((apply_codebook(grid, codes)[~mask] == 0).all())


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("bits", [1, 3])
def test_step_grad_matches_finite_difference(axis, bits):
    w = rand_weight(6, (4, 7))
    target = rand_weight(7, (4, 7))
    wq, grid = quantize_uniform(w, bits, axis=axis)
    codes = grid_codes(w, grid)

    def loss(step):
        return float(((apply_codebook(grid.scaled(step), codes).double() - target.double()) ** 2).sum())

    wleaf = wq.detach().requires_grad_(True)
    ((wleaf - target) ** 2).sum().backward()
    g = step_grad(wleaf.grad, codes, grid)
    assert g.shape == grid.step.shape
    for r in range(g.numel()):
        h = torch.zeros_like(grid.step)
        h[r] = 1e-3
        fd = (loss(grid.step + h) - loss(grid.step - h)) / 2e-3
        assert float(g[r]) == pytest.approx(fd, rel=1e-3, abs=1e-3)
    scaled = grid.scaled(grid.step * 2)
    assert torch.allclose(scaled.codebook, grid.codebook * 2)
    assert scaled.kind == grid.kind and scaled.bits == grid.bits


def test_ste_retraining_round_trip():
    """The documented STE loop: the parameter always lies on the frozen grid; the shadow moves."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(rand_weight(8, (6, 4)))
    mask = rand_mask(8, w.shape)
    with torch.no_grad():
        _, grid = quantize_uniform(w, 3, mask, axis=0)
    shadow = w.detach().clone()
    x, y = torch.randn(16, 4), torch.randn(16, 6)
    for _ in range(5):
        with torch.no_grad():
            w.copy_(project_to_grid(shadow, grid, mask))
        w.grad = None
        ((x @ w.t() - y) ** 2).mean().backward()
        shadow -= 0.1 * w.grad * mask
        assert torch.equal(project_to_grid(w.detach(), grid, mask), w.detach())
    assert bool((w.detach()[~mask] == 0).all())


def test_quantization_error():
    w = torch.tensor([3.0, 4.0, 1.0])
    assert quantization_error(w, w) == 0.0
    assert quantization_error(w, torch.zeros(3)) == pytest.approx(1.0)
    mask = torch.tensor([True, True, False])
    assert quantization_error(w, torch.tensor([3.0, 0.0, 0.0]), mask) == pytest.approx(4.0 / 5.0)
    assert quantization_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert quantization_error(torch.zeros(3), torch.ones(3)) == math.inf


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("axis", [None, 0])
def test_float16_levels_uniform(bits, axis):
    w = rand_weight(1, (6, 3, 3, 3)) * 0.05
    q, grid = (binarize(w, axis=axis) if bits == 1 else quantize_uniform(w, bits, axis=axis))
    out = float16_levels(grid)
    assert out.kind == grid.kind and out.bits == grid.bits and out.codebook.shape == grid.codebook.shape
    book, new = grid.codebook.double(), out.codebook.double()
    moved = ((new - book).abs() <= grid.step.double()[:, None] / 32).all(1)
    assert bool(moved.all())  # no level moves by more than 1/32 of a step
    exact = (new.float().half().double() == new).all(1)
    if bits <= 4:  # up to 4 bits every step can be snapped
        assert bool(exact.all())
    # a group not snapped keeps its levels exactly
    assert bool(((new == book).all(1) | exact).all())
    # still a uniform grid: the levels are n * step
    n = torch.round(new / out.step.double()[:, None])
    assert torch.allclose(n * out.step.double()[:, None], new, rtol=1e-6, atol=0)
    # the projection onto the new grid stays feasible and idempotent
    q2 = project_to_grid(w, out)
    assert torch.equal(project_to_grid(q2, out), q2)
    assert quantization_error(w, q2) <= quantization_error(w, q) * 1.05


def test_float16_levels_cluster_and_out_of_range():
    w = rand_weight(2, (5, 6))
    _, grid = cluster(w, 5)
    out = float16_levels(grid)
    assert out.step is None and torch.equal(out.codebook, grid.codebook.half().float())
    tiny = Grid(torch.tensor([[-3e-6, 3e-6]]), None, "cluster", 1)  # below float16's normal range
    assert torch.equal(float16_levels(tiny).codebook, tiny.codebook)
    huge = quantize_uniform(torch.tensor([1e6, -2e6, 5e5]), 3)[1]  # above float16's range
    assert torch.equal(float16_levels(huge).codebook, huge.codebook)
    zero = Grid(torch.zeros(1, 3), None, "uniform", 2, torch.zeros(1))  # an all-zero layer's grid
    assert torch.equal(float16_levels(zero).codebook, zero.codebook)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_float16_levels_pruned_grids(bits):
    """A pruned layer's grid (no zero level, 2^bits levels up to 2^(bits-1) steps): up to 3 bits
    every group snaps (the top level moves by at most 4/511 of a step); at 4 bits (up to 8/255) a
    group may keep its step, and no level moves by more than 1/32 of a step either way."""
    w = rand_weight(3, (16, 3, 3, 3)) * 0.05
    mask = rand_mask(3, w.shape)
    _, grid = quantize_uniform(w, bits, mask, axis=0, allow_zero=False)
    out = float16_levels(grid)
    book, new = grid.codebook.double(), out.codebook.double()
    assert bool(((new - book).abs() <= grid.step.double()[:, None] / 32).all())
    exact = (new.float().half().double() == new).all(1)
    assert bool(exact.all()) if bits <= 3 else bool(exact.float().mean() >= 0.5)


def test_float16_levels_clusters_with_repeated_centroids():
    """cluster() repeats a centroid where a group has fewer distinct values than clusters; the gap
    that bounds the move is to the nearest *other* value, so such groups still go to float16."""
    w = torch.tensor([[0.1001, -0.2003, 0.1001, 0.3007], [0.11, 0.52, -0.33, 0.71]])
    _, grid = cluster(w, 4, axis=0)
    assert grid.codebook[0].unique().numel() < 4  # row 0 has three distinct values
    out = float16_levels(grid)
    assert torch.equal(out.codebook, grid.codebook.half().float())
