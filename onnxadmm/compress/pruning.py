"""Projections onto sparse sets and the automatic per-layer rate allocation."""

from __future__ import annotations

import fnmatch
import math

import torch

from ..errors import ConfigError

DEFAULT_POWER = 0.3  # per-layer allocation: keep_i proportional to n_i ** power (see allocate)


def topk_mask(w: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``k`` largest |w| (restricted to ``allowed`` when given)."""
    flat = w.detach().abs().flatten()
    if allowed is not None:
        flat = torch.where(allowed.flatten(), flat, torch.full_like(flat, -1.0))
    k = max(0, min(int(k), flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    if allowed is not None:
        mask &= allowed.flatten()
    return mask.view_as(w)


def project(w: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection onto {at most k non-zeros (inside ``allowed``)}."""
    return w * topk_mask(w, k, allowed)


def matches(name: str, patterns) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def allocate(
    sizes: dict[str, int],
    rate: float,
    fixed: dict[str, float] | None = None,
    exclude=(),
    power: float = DEFAULT_POWER,
) -> dict[str, int]:
    """Non-zeros to keep per layer so that sum(sizes) / sum(kept) == rate.

    Layers named in ``fixed`` keep size/rate; excluded layers stay dense. The others keep
    ``min(n, c * n**power)`` weights, ``c`` solved by bisection. With ``power`` < 1 small layers
    (first convolutions, classifier heads) keep a larger fraction: they are the most sensitive and
    cost little, while the big layers, which hold most of the redundancy, are pruned hardest.
    ``power`` 1 is uniform pruning, 0 gives every layer the same count. The default 0.3 was chosen
    on LeNet-5/MNIST (``benchmarks/``: magnitude pruning + the same retraining at 50x and 246x
    reached higher accuracy at 0.3 than at 0.5, the square root).
    """
    if not 0 <= power <= 1:
        raise ConfigError(f"allocation power {power!r}: expected a number from 0 to 1")
    fixed = dict(fixed or {})
    total = sum(sizes.values())
    budget = total / rate
    keep: dict[str, int] = {}
    free = []
    for name, n in sizes.items():
        if matches(name, exclude):
            keep[name] = n
        elif name in fixed:
            keep[name] = max(1, int(round(n / fixed[name])))
        else:
            free.append(name)
    left = budget - sum(keep.values())
    if free and left < len(free):
        raise ConfigError(
            f"cannot reach {rate:.4g}x overall: excluded and fixed-rate layers already keep "
            f"{sum(keep.values()):,} of the {int(budget):,} weights allowed"
        )
    if free and left > sum(sizes[n] for n in free):
        raise ConfigError(
            f"cannot reach a rate as low as {rate:.4g}x: the fixed-rate layers prune more than that "
            "even with every other layer dense"
        )
    if not free:
        return keep

    def kept(c: float) -> float:
        return sum(min(sizes[n], max(1.0, c * sizes[n] ** power)) for n in free)

    lo, hi = 0.0, max(sizes[n] ** (1.0 - power) for n in free) + 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if kept(mid) > left:
            hi = mid
        else:
            lo = mid
    for n in free:
        keep[n] = int(min(sizes[n], max(1, round(lo * sizes[n] ** power))))
    return keep


def progressive_rates(target: float, step_factor: float, start: float = 1.0) -> list[float]:
    """Geometric steps from ``start`` to ``target``, each at most ``step_factor`` times the previous."""
    if target <= start * step_factor:
        return [target]
    n = math.ceil(math.log(target / start) / math.log(step_factor))
    return [start * (target / start) ** (k / n) for k in range(1, n + 1)]


STRUCTURES = ("none", "filter", "channel", "shape")


def group_dims(structure: str, ndim: int, out_axis: int | None, in_axis: int | None) -> tuple[int, ...] | None:
    """Axes summed over to form one group's norm, or None when ``structure`` does not apply.

    filter: one group per output channel (a convolution filter, a dense layer's output unit);
    channel: one group per input channel (all filters' slices that read it);
    shape: one group per position in a filter (input channel x kernel offset, across all filters:
    the column of the im2col weight matrix). For a dense layer, shape is channel.
    """
    if structure == "none" or out_axis is None or in_axis is None:
        return None
    if structure == "filter":
        return tuple(a for a in range(ndim) if a != out_axis)
    if structure == "channel":
        return tuple(a for a in range(ndim) if a != in_axis)
    if structure == "shape":
        return (out_axis,)
    raise ConfigError(f"structure {structure!r}: expected one of {', '.join(STRUCTURES)}")


def group_mask(
    w: torch.Tensor, keep: int, dims: tuple[int, ...], allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask (shape of ``w``) of the groups with the largest L2 norms holding about ``keep``
    weights: the Euclidean projection onto {at most that many non-zero groups}. A group is the set of
    entries sharing their indices outside ``dims``; groups entirely outside ``allowed`` are never
    kept (pruned groups stay pruned), and entries outside ``allowed`` stay zero."""
    x = w.detach()
    if allowed is not None:
        x = x * allowed
    norms = x.pow(2).sum(dim=dims, keepdim=True)
    n_groups = norms.numel()
    size = w.numel() // max(n_groups, 1)
    k = max(1, min(n_groups, int(round(int(keep) / max(size, 1)))))
    flat = norms.flatten().clone()
    if allowed is not None:
        alive = allowed.sum(dim=dims, keepdim=True).flatten() > 0
        flat = torch.where(alive, flat, torch.full_like(flat, -1.0))
        k = min(k, max(1, int(alive.sum())))
    sel = torch.zeros_like(flat, dtype=torch.bool)
    sel[torch.topk(flat, k, sorted=False).indices] = True
    mask = sel.view_as(norms).expand_as(w).clone()
    if allowed is not None:
        mask &= allowed.bool()
    return mask


def layer_support(
    w: torch.Tensor,
    keep: int,
    dims: tuple[int, ...] | None = None,
    view: tuple[int, ...] | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask of a layer's entries kept at ``keep`` weights: the largest magnitudes, or with
    structured pruning (``dims``: the axes a group's norm sums over) the groups of largest L2 norm,
    taken on ``w.reshape(view)`` when the groups are blocks that a view exposes."""
    if dims is None or keep >= w.numel():
        return topk_mask(w, keep, allowed)
    if view is not None:
        m = None if allowed is None else allowed.reshape(view)
        return group_mask(w.reshape(view), keep, dims, m).reshape(w.shape)
    return group_mask(w, keep, dims, allowed)


def alive_channels(mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor | None:
    """For a group mask whose groups span every axis but one (filters: all but the output axis),
    whether each index of that axis keeps any entry; None for other group shapes."""
    out = [a for a in range(mask.dim()) if a not in dims]
    if len(out) != 1:
        return None
    return mask.movedim(out[0], 0).reshape(mask.shape[out[0]], -1).any(dim=1)


def coupled_support(
    ws: dict[str, torch.Tensor],
    keeps: dict[str, int],
    dims: dict[str, tuple[int, ...]],
    allowed: dict[str, torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Filter masks of layers whose output channels go together (summed by a residual connection;
    a depthwise convolution and the layer that feeds it): the same
    filters kept in every one, those with the largest joint L2 norm sum_l ||w_l[c]||^2, which is
    the Euclidean projection onto {the same at most k filters non-zero in all}. ``k`` is the mean
    of the layers' own filter budgets (``keeps[l]`` weights over the filter size); ``dims`` the
    axes a filter's norm sums over (all but the output axis); a filter that some layer's
    ``allowed`` mask pruned stays pruned in all of them."""
    allowed = allowed or {}
    names = list(ws)
    outs = {n: next(a for a in range(ws[n].dim()) if a not in dims[n]) for n in names}
    n_ch = ws[names[0]].shape[outs[names[0]]]
    dev = ws[names[0]].device
    norms = torch.zeros(n_ch, dtype=torch.float64, device=dev)
    alive = torch.ones(n_ch, dtype=torch.bool, device=dev)
    budget = 0.0
    for n in names:
        x = ws[n].detach()
        if allowed.get(n) is not None:
            x = x * allowed[n]
            alive &= alive_channels(allowed[n].bool(), dims[n])
        norms += x.movedim(outs[n], 0).reshape(n_ch, -1).double().pow(2).sum(dim=1)
        budget += keeps[n] / (ws[n].numel() / n_ch)
    k = max(1, min(int(alive.sum()) or 1, int(round(budget / len(names)))))
    score = torch.where(alive, norms, torch.full_like(norms, -1.0))
    chosen = torch.zeros(n_ch, dtype=torch.bool, device=dev)
    chosen[torch.topk(score, k, sorted=False).indices] = True
    out = {}
    for n in names:
        shape = [1] * ws[n].dim()
        shape[outs[n]] = n_ch
        m = chosen.reshape(shape).expand_as(ws[n]).clone()
        if allowed.get(n) is not None:
            m &= allowed[n].bool()
        out[n] = m
    return out


def supports(
    ws: dict[str, torch.Tensor],
    keeps: dict[str, int],
    groups: dict[str, tuple[int, ...]],
    views: dict[str, tuple[int, ...]],
    allowed: dict[str, torch.Tensor | None],
    couples: list[list[str]] = (),
    scales: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each layer's support at ``keeps[n]`` weights inside ``allowed[n]``: the layers of a couple
    (residual streams, depthwise convolutions with their feeders) choose their filters together
    (:func:`coupled_support`), the others alone (:func:`layer_support`). Entries are ranked by
    |w| times ``scales[n]`` where given (activation importance, :mod:`.importance`)."""
    if scales:
        ws = {n: w * scales[n].to(w.device) if n in scales else w for n, w in ws.items()}
    out = {}
    for c in couples:
        if all(n in ws and keeps[n] < ws[n].numel() for n in c):
            out.update(coupled_support({n: ws[n] for n in c}, keeps, groups, {n: allowed.get(n) for n in c}))
    for n, w in ws.items():
        if n not in out:
            out[n] = layer_support(w, keeps[n], groups.get(n), views.get(n), allowed.get(n))
    return out
