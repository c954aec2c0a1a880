"""Sparse projections, per-layer rate allocation, progressive steps and rate parsing.

The projection onto {at most k non-zeros inside ``allowed``} is checked against a brute force over
every support on tiny tensors; ``allocate`` against its contract (overall rate within rounding,
fixed rates and exclusions honoured, small layers keep a larger fraction, impossible targets
refused); ``progressive_rates`` and ``parse_rate`` against their documented forms.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from onnxadmm.compress.config import CompressConfig, load_config_file, parse_rate
from onnxadmm.compress.pruning import (
    allocate,
    group_dims,
    group_mask,
    matches,
    progressive_rates,
    project,
    topk_mask,
)
from onnxadmm.errors import ConfigError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies ----------------------------------------------------------------------------------

finite = st.floats(min_value=-100.0, max_value=100.0, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def tensor_k_allowed(draw, max_size: int = 8, with_allowed: bool | None = None):
    """A small float tensor (1-3 dims), a k (may exceed the size) and an optional ``allowed`` mask."""
    shape = draw(st.sampled_from([(1,), (3,), (5,), (8,), (2, 3), (2, 2, 2), (1, 4), (4, 1)]))
    n = math.prod(shape)
    assume(n <= max_size)
    vals = draw(st.lists(finite, min_size=n, max_size=n))
    # ties and zeros are the interesting cases: sometimes draw from a tiny pool of values
    if draw(st.booleans()):
        pool = draw(st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.0, -0.5]), min_size=n, max_size=n))
        vals = pool
    w = torch.tensor(vals, dtype=torch.float32).reshape(shape)
    k = draw(st.integers(min_value=0, max_value=n + 2))
    use_allowed = draw(st.booleans()) if with_allowed is None else with_allowed
    allowed = None
    if use_allowed:
        bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        allowed = torch.tensor(bits, dtype=torch.bool).reshape(shape)
    return w, k, allowed


def brute_force_best(w: torch.Tensor, k: int, allowed: torch.Tensor | None) -> float:
    """min ||W - Z||^2 over Z with at most k non-zeros, all inside ``allowed`` (exhaustive)."""
    flat = w.double().flatten().numpy()
    ok = np.ones(flat.size, bool) if allowed is None else allowed.flatten().numpy()
    candidates = [i for i in range(flat.size) if ok[i]]
    best = math.inf
    for size in range(0, min(k, len(candidates)) + 1):
        for support in itertools.combinations(candidates, size):
            z = np.zeros_like(flat)
            z[list(support)] = flat[list(support)]  # optimal values on a fixed support: copy W
            best = min(best, float(((flat - z) ** 2).sum()))
    return best


# ---- topk_mask / project -------------------------------------------------------------------------


@SETTINGS
@given(tensor_k_allowed())
def test_projection_is_feasible(case):
    w, k, allowed = case
    mask = topk_mask(w, k, allowed)
    z = project(w, k, allowed)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert z.shape == w.shape and z.dtype == w.dtype
    assert int(mask.sum()) <= k
    assert int((z != 0).sum()) <= k
    if allowed is not None:
        assert not bool((mask & ~allowed).any()), "mask leaves the allowed set"
        assert not bool(((z != 0) & ~allowed).any())
    # exactly min(k, |allowed|) entries are kept (the support is as large as permitted)
    room = w.numel() if allowed is None else int(allowed.sum())
    assert int(mask.sum()) == min(k, room)
    # kept entries keep their values exactly, the rest are zero
    assert torch.equal(z[mask], w[mask])
    assert bool((z[~mask] == 0).all())


@SETTINGS
@given(tensor_k_allowed())
def test_projection_is_idempotent(case):
    w, k, allowed = case
    z = project(w, k, allowed)
    assert torch.equal(project(z, k, allowed), z)
    mask = topk_mask(w, k, allowed)
    # re-projecting inside the mask keeps the mask (hard pruning: pruned weights stay pruned)
    assert torch.equal(topk_mask(w, k, mask), mask)
    assert torch.equal(topk_mask(z, k, mask), mask)


@SETTINGS
@given(tensor_k_allowed(max_size=8))
def test_projection_is_optimal(case):
    w, k, allowed = case
    z = project(w, k, allowed)
    got = float(((w.double() - z.double()) ** 2).sum())
    best = brute_force_best(w, k, allowed)
    assert got <= best + 1e-9 * max(1.0, best), (got, best)


def test_projection_small_examples():
    w = torch.tensor([0.1, -3.0, 2.0, -0.5])
    assert project(w, 2).tolist() == [0.0, -3.0, 2.0, 0.0]
    assert project(w, 0).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert project(w, 10).tolist() == w.tolist()
    allowed = torch.tensor([True, False, True, True])
    assert project(w, 2, allowed).tolist() == [0.0, 0.0, 2.0, -0.5]
    assert torch.equal(project(w, 5, allowed), w * allowed)
    # the input is not modified and gradients do not leak into the mask
    w2 = torch.tensor([[1.0, -2.0], [3.0, 0.0]], requires_grad=True)
    m = topk_mask(w2, 1)
    assert m.tolist() == [[False, False], [True, False]]
    assert w2.tolist() == [[1.0, -2.0], [3.0, 0.0]]


def test_matches_names_and_globs():
    assert matches("fc1.weight", ["fc1.weight"])
    assert matches("layer3.conv.weight", ["layer*.weight"])
    assert not matches("fc1.weight", ["fc2.*"])
    assert not matches("fc1.weight", [])


# ---- allocate --------------------------------------------------------------------------------------

DIGITS_SIZES = {"conv1.weight": 144, "conv2.weight": 4608, "fc1.weight": 32768, "fc2.weight": 640}


def _rate(sizes, keep) -> float:
    return sum(sizes.values()) / sum(keep.values())


@st.composite
def sizes_and_rate(draw):
    n_layers = draw(st.integers(1, 6))
    sizes = {f"l{i}": draw(st.integers(1, 50_000)) for i in range(n_layers)}
    total = sum(sizes.values())
    # only feasible targets: every layer keeps at least one weight
    max_rate = total / n_layers
    assume(max_rate >= 1.0)
    rate = draw(st.floats(min_value=1.0, max_value=max_rate, allow_nan=False))
    return sizes, rate


@SETTINGS
@given(sizes_and_rate())
def test_allocate_meets_the_overall_rate_within_rounding(case):
    sizes, rate = case
    keep = allocate(sizes, rate)
    assert set(keep) == set(sizes)
    for n, k in keep.items():
        assert isinstance(k, int) and 1 <= k <= sizes[n]
    budget = sum(sizes.values()) / rate
    # each layer's count is a rounding of the exact share: at most 1/2 weight off per layer
    assert abs(sum(keep.values()) - budget) <= 0.5 * len(sizes) + 1e-6, (keep, budget)


@SETTINGS
@given(sizes_and_rate())
def test_allocate_small_layers_keep_a_larger_fraction(case):
    sizes, rate = case
    keep = allocate(sizes, rate)
    names = sorted(sizes, key=sizes.get)
    for a, b in itertools.combinations(names, 2):
        if sizes[a] < sizes[b]:
            # fraction kept is non-increasing in the layer size, up to each layer's own rounding
            assert (keep[a] + 0.5) / sizes[a] >= (keep[b] - 0.5) / sizes[b], (sizes, keep)


def test_allocate_digits_layers():
    keep = allocate(DIGITS_SIZES, 20.0)
    assert abs(_rate(DIGITS_SIZES, keep) - 20.0) / 20.0 < 0.005
    frac = {n: keep[n] / DIGITS_SIZES[n] for n in keep}
    by_size = sorted(DIGITS_SIZES, key=DIGITS_SIZES.get)
    assert [frac[n] for n in by_size] == sorted(frac.values(), reverse=True)
    assert frac["conv1.weight"] > 0.3 and frac["fc1.weight"] < 0.05
    # rate 1: everything dense
    assert allocate(DIGITS_SIZES, 1.0) == DIGITS_SIZES


def test_allocate_fixed_rates_and_exclusions_honoured():
    keep = allocate(DIGITS_SIZES, 20.0, fixed={"conv2.weight": 10.0}, exclude=["fc2.*"])
    assert keep["fc2.weight"] == 640  # excluded (glob): dense
    assert keep["conv2.weight"] == round(4608 / 10)  # fixed rate
    assert abs(_rate(DIGITS_SIZES, keep) - 20.0) / 20.0 < 0.005  # the free layers absorb the rest
    # exclusion wins over a fixed rate for the same layer
    keep = allocate(DIGITS_SIZES, 5.0, fixed={"conv1.weight": 4.0}, exclude=["conv1.weight"])
    assert keep["conv1.weight"] == 144
    # a fixed rate keeps at least one weight
    keep = allocate(DIGITS_SIZES, 20.0, fixed={"conv1.weight": 1e6})
    assert keep["conv1.weight"] == 1


@SETTINGS
@given(sizes_and_rate(), st.data())
def test_allocate_fixed_rates_property(case, data):
    sizes, rate = case
    name = data.draw(st.sampled_from(sorted(sizes)))
    fixed_rate = data.draw(st.floats(min_value=1.0, max_value=1000.0))
    try:
        keep = allocate(sizes, rate, fixed={name: fixed_rate})
    except ConfigError:
        return  # the fixed layer alone used up the budget
    assert keep[name] == max(1, int(round(sizes[name] / fixed_rate)))
    others = [n for n in sizes if n != name]
    if others and sum(sizes[n] for n in others) >= sum(sizes.values()) / rate - keep[name]:
        # reachable: the free layers absorb the rest of the budget
        budget = sum(sizes.values()) / rate
        assert abs(sum(keep.values()) - budget) <= 0.5 * len(sizes) + 1e-6


@pytest.mark.parametrize(
    "sizes, rate, kw",
    [
        ({"a": 100, "b": 10_000}, 1.5, {"exclude": ["b"]}),  # the excluded layer alone is over budget
        ({"a": 100, "b": 10_000}, 500.0, {"fixed": {"a": 1.0}}),  # the fixed layer alone is over budget
        ({"a": 1, "b": 1, "c": 1}, 2.0, {}),  # every layer must keep one weight
        (DIGITS_SIZES, 20.0, {"exclude": ["fc1.weight"]}),
    ],
)
def test_allocate_impossible_targets_raise(sizes, rate, kw):
    with pytest.raises(ConfigError, match="cannot reach"):
        allocate(sizes, rate, **kw)


def test_allocate_unreachable_low_target_raises():
    # b fixed at 100x keeps 100 weights; even with a kept dense, the best reachable is 10100/200 = 50.5x
    with pytest.raises(ConfigError):
        allocate({"a": 100, "b": 10_000}, 2.0, fixed={"b": 100.0})


# ---- progressive_rates -----------------------------------------------------------------------------


@SETTINGS
@given(
    st.floats(min_value=1.0, max_value=1e6, allow_nan=False),
    st.floats(min_value=1.05, max_value=50.0, allow_nan=False),
)
def test_progressive_rates_geometric(target, step):
    rates = progressive_rates(target, step)
    assert rates[-1] == pytest.approx(target, rel=1e-12)
    assert rates[-1] == target  # exact: the pipeline compares the last step with the target
    steps = [1.0, *rates]
    ratios = [b / a for a, b in zip(steps, steps[1:])]
    assert all(r <= step * (1 + 1e-12) for r in ratios), ratios
    assert all(r >= 1.0 for r in ratios)
    # geometric: all ratios equal
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    # as few steps as the step factor allows
    if len(rates) > 1:
        assert target ** (1 / (len(rates) - 1)) > step * (1 - 1e-9)
    else:
        assert target <= step


def test_progressive_rates_examples():
    assert progressive_rates(20.0, 8.0) == pytest.approx([math.sqrt(20.0), 20.0])
    assert progressive_rates(8.0, 8.0) == [8.0]
    assert progressive_rates(5.0, 8.0) == [5.0]
    assert progressive_rates(1.0, 8.0) == [1.0]
    assert progressive_rates(1000.0, 10.0) == pytest.approx([10.0, 100.0, 1000.0])
    assert progressive_rates(100.0, 4.0, start=2.0)[-1] == pytest.approx(100.0)


# ---- parse_rate / config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("20x", 20.0),
        ("20X", 20.0),
        ("20", 20.0),
        (20, 20.0),
        (20.5, 20.5),
        ("20.5x", 20.5),
        (" 20x ", 20.0),
        ("95%", 20.0),
        ("0%", 1.0),
        ("50%", 2.0),
        ("1x", 1.0),
        ("1e2x", 100.0),
    ],
)
def test_parse_rate_accepts(text, want):
    assert parse_rate(text) == pytest.approx(want)


@pytest.mark.parametrize(
    "text",
    [
        "0.5x",
        "0x",
        "0",
        0,
        0.5,
        "-3",
        -3,
        "abc",
        "100%",
        "120%",
        "-5%",
        "",
        "x",
        "20xx",
        "nan",
        "inf",
        float("nan"),
        float("inf"),
        True,
        None,
    ],
)
def test_parse_rate_rejects(text):
    with pytest.raises(ConfigError) as ei:
        parse_rate(text)
    msg = str(ei.value)
    assert "\n" not in msg and "rate" in msg


@SETTINGS
@given(st.floats(min_value=1.0, max_value=1e5, allow_nan=False))
def test_parse_rate_round_trip(r):
    assert parse_rate(f"{r!r}x") == pytest.approx(r)
    assert parse_rate(r) == pytest.approx(r)
    sparsity = 100.0 * (1.0 - 1.0 / r)
    assume(sparsity < 100.0)
    assert parse_rate(f"{sparsity!r}%") == pytest.approx(r, rel=1e-6)


def test_config_validate_and_updated():
    cfg = CompressConfig(rate="95%", layer_rates={"fc1.weight": "10x"}).validate()
    assert cfg.rate == pytest.approx(20.0) and cfg.layer_rates == {"fc1.weight": 10.0}
    with pytest.raises(ConfigError, match="unknown setting"):
        CompressConfig().updated(no_such_knob=1)
    for bad in (
        {"optimizer": "lbfgs"},
        {"rho": 0},
        {"step_factor": 1.0},
        {"admm_iterations": 0},
        {"val_fraction": 1.0},
        {"retrain_epochs": -1},
        {"layer_rates": {"a": "0.5x"}},
    ):
        with pytest.raises(ConfigError):
            CompressConfig().updated(**bad).validate()


def test_load_config_file_layers(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('rate = "30x"\n[layers."fc1.weight"]\nrate = "40x"\n[layers."fc2.weight"]\nexclude = true\n')
    raw = load_config_file(p)
    assert raw["layer_rates"] == {"fc1.weight": "40x"} and raw["exclude"] == ["fc2.weight"]
    p = tmp_path / "c.json"
    p.write_text('{"compress": {"rate": 30, "exclude": ["conv1.*"], "layers": {"fc1.weight": {"rate": 8}}}}')
    raw = load_config_file(p)
    assert raw["rate"] == 30 and raw["exclude"] == ["conv1.*"] and raw["layer_rates"] == {"fc1.weight": 8}
    for text, suffix in (("rate = ", ".toml"), ("{", ".json"), ('[layers]\n"fc1.weight" = 3\n', ".toml")):
        q = tmp_path / f"bad{suffix}"
        q.write_text(text)
        with pytest.raises(ConfigError):
            load_config_file(q)
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.toml")


# ---- structured (group) projections --------------------------------------------------------------


def _brute_group_best(w: torch.Tensor, dims, k_groups: int) -> float:
    """min ||W - Z||^2 over Z whose non-zeros lie in at most k_groups groups (exhaustive)."""
    norms = w.double().pow(2).sum(dim=dims, keepdim=True).flatten()
    total = float(norms.sum())
    best = math.inf
    for size in range(0, min(k_groups, norms.numel()) + 1):
        for support in itertools.combinations(range(norms.numel()), size):
            best = min(best, total - float(norms[list(support)].sum()))
    return best


@pytest.mark.parametrize("structure", ["filter", "channel", "shape"])
@pytest.mark.parametrize("seed", range(4))
def test_group_projection_feasible_optimal_idempotent(structure, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, 2, 2, generator=g)
    dims = group_dims(structure, 4, 0, 1)
    n_groups = w.pow(2).sum(dim=dims, keepdim=True).numel()
    size = w.numel() // n_groups
    for k_groups in range(1, n_groups + 1):
        mask = group_mask(w, k_groups * size, dims)
        z = w * mask
        # feasible: whole groups, at most k of them
        kept = mask.sum(dim=dims) if structure != "shape" else mask.sum(dim=0)
        assert set(kept.unique().tolist()) <= {0, size}
        assert int((kept > 0).sum()) == k_groups
        # optimal among all choices of k groups
        got = float((w.double() - z.double()).pow(2).sum())
        assert got <= _brute_group_best(w, dims, k_groups) + 1e-9
        # idempotent, and pruned groups stay pruned inside the mask
        assert torch.equal(group_mask(z, k_groups * size, dims), mask)
        assert torch.equal(group_mask(w, k_groups * size, dims, mask), mask)


def test_group_dims_per_structure_and_layout():
    assert group_dims("none", 4, 0, 1) is None
    assert group_dims("filter", 4, None, None) is None
    assert group_dims("filter", 4, 0, 1) == (1, 2, 3)  # Conv [O, I, kh, kw]: one group per filter
    assert group_dims("channel", 4, 0, 1) == (0, 2, 3)  # one group per input channel
    assert group_dims("shape", 4, 0, 1) == (0,)  # one group per (input channel, kernel offset)
    assert group_dims("filter", 2, 1, 0) == (0,)  # MatMul [in, out]: one group per output unit
    assert group_dims("channel", 2, 1, 0) == (1,)
    with pytest.raises(ConfigError):
        group_dims("rows", 2, 1, 0)


def test_group_mask_rounds_to_whole_groups_and_keeps_one():
    w = torch.arange(1.0, 13.0).reshape(4, 3)  # filters (rows) of norms rising with the row
    dims = (1,)
    assert group_mask(w, 7, dims).sum(dim=1).tolist() == [0, 0, 3, 3]  # 7 weights -> 2 filters
    assert group_mask(w, 1, dims).sum(dim=1).tolist() == [0, 0, 0, 3]  # at least one filter
    allowed = torch.ones_like(w, dtype=torch.bool)
    allowed[3] = False  # a pruned filter never comes back
    assert group_mask(w, 6, dims, allowed).sum(dim=1).tolist() == [0, 3, 3, 0]


def test_structure_setting_validated():
    assert CompressConfig(structure="filter").validate().structure == "filter"
    with pytest.raises(ConfigError, match="structure"):
        CompressConfig(structure="rows").validate()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), pruned=st.booleans())
def test_coupled_support_is_the_joint_projection(seed, k, pruned):
    """Two layers summed by a residual connection (5 filters each, one 4-D, one 2-D): the masks keep
    the same filters in both (feasible), those of largest joint norm among every k-subset (optimal),
    give the same masks again on the projected weights (idempotent), and keep a pruned filter pruned."""
    from onnxadmm.compress.pruning import coupled_support

    g = torch.Generator().manual_seed(seed)
    ws = {"a": torch.randn(5, 3, 2, 2, generator=g), "b": torch.randn(4, 5, generator=g)}
    dims = {"a": (1, 2, 3), "b": (0,)}
    keeps = {"a": k * 12, "b": k * 4}  # k filters' worth in both
    allowed = {"a": None, "b": None}
    if pruned:
        allowed["b"] = torch.ones(4, 5, dtype=torch.bool)
        allowed["b"][:, 0] = False  # filter 0 was removed earlier
    masks = coupled_support(ws, keeps, dims, allowed)
    alive_a = masks["a"].reshape(5, -1).any(dim=1)
    alive_b = masks["b"].any(dim=0)
    assert torch.equal(alive_a, alive_b)  # the same filters in both layers
    assert bool(masks["a"][alive_a].all()) and bool(masks["b"][:, alive_b].all())  # whole filters
    k_eff = min(k, 4) if pruned else k
    assert int(alive_a.sum()) == k_eff
    if pruned:
        assert not bool(alive_a[0])
    joint = ws["a"].reshape(5, -1).pow(2).sum(1) + ws["b"].pow(2).sum(0)
    cands = [c for c in itertools.combinations(range(5), k_eff) if not (pruned and 0 in c)]
    best = max(float(joint[list(c)].sum()) for c in cands)
    assert float(joint[alive_a].sum()) == pytest.approx(best, rel=1e-6)
    again = coupled_support({n: ws[n] * masks[n] for n in ws}, keeps, dims, allowed)
    assert all(torch.equal(again[n], masks[n]) for n in ws)
