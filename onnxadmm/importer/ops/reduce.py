"""Reductions (ReduceSum, ReduceMean, ...), ArgMax/ArgMin and TopK."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..registry import NodeContext, register


def _ints(v) -> list[int]:
    if isinstance(v, torch.Tensor):
        return [int(i) for i in v.reshape(-1).tolist()]
    return [int(i) for i in np.asarray(v).reshape(-1).tolist()]


def _sum(x, dims, keep):
    dtype = x.dtype if x.dtype != torch.bool else torch.int64
    return torch.sum(x, dims, keepdim=keep, dtype=dtype)


def _mean(x, dims, keep):
    if x.is_floating_point():
        return torch.mean(x, dims, keepdim=keep)
    count = math.prod(x.shape[d] for d in dims)
    return (torch.sum(x, dims, keepdim=keep, dtype=torch.float64) / count).to(x.dtype)


def _extreme(fn, empty_float: float, empty_int: str, empty_bool: bool):
    def reduce(x, dims, keep):
        if all(x.shape[d] for d in dims):
            return fn(x, dims, keepdim=keep)
        # reduction over an empty set: +-inf, or the dtype's extreme value
        shape = [1 if d in dims else n for d, n in enumerate(x.shape)]
        if not keep:
            shape = [n for d, n in enumerate(x.shape) if d not in dims]
        if x.dtype == torch.bool:
            value = empty_bool
        elif x.is_floating_point():
            value = empty_float
        else:
            value = getattr(torch.iinfo(x.dtype), empty_int)
        return torch.full(shape, value, dtype=x.dtype, device=x.device)

    return reduce


def _prod(x, dims, keep):
    y = x
    for d in dims:
        y = torch.prod(y, d, keepdim=True, dtype=x.dtype)
    return y if keep or not dims else y.squeeze(tuple(dims))


def _norm(order):
    def reduce(x, dims, keep):
        if x.is_floating_point():
            return torch.linalg.vector_norm(x, order, dims, keepdim=keep)
        if order == 1:
            return torch.sum(x.abs(), dims, keepdim=keep, dtype=x.dtype)
        return torch.sqrt(torch.sum(x * x, dims, keepdim=keep, dtype=torch.float64)).to(x.dtype)

    return reduce


def _log_sum(x, dims, keep):
    return torch.log(torch.sum(x, dims, keepdim=keep))


def _log_sum_exp(x, dims, keep):
    if all(x.shape[d] for d in dims):
        return torch.logsumexp(x, dims, keepdim=keep)
    return torch.log(torch.sum(torch.exp(x), dims, keepdim=keep))


def _sum_square(x, dims, keep):
    return torch.sum(x * x, dims, keepdim=keep, dtype=x.dtype)


# name -> (reduction, elementwise result of a reduction over no axes)
_REDUCTIONS = {
    "ReduceSum": (_sum, lambda x: x),
    "ReduceMean": (_mean, lambda x: x),
    "ReduceMax": (_extreme(torch.amax, -math.inf, "min", False), lambda x: x),
    "ReduceMin": (_extreme(torch.amin, math.inf, "max", True), lambda x: x),
    "ReduceProd": (_prod, lambda x: x),
    "ReduceL1": (_norm(1), torch.abs),
    "ReduceL2": (_norm(2), torch.abs),
    "ReduceLogSum": (_log_sum, torch.log),
    "ReduceLogSumExp": (_log_sum_exp, lambda x: x),
    "ReduceSumSquare": (_sum_square, lambda x: x * x),
}


def _run(op: str, x: torch.Tensor, axes: list[int] | None, keep: bool, noop: bool) -> torch.Tensor:
    reduce, identity = _REDUCTIONS[op]
    if not axes:
        if noop:
            return identity(x)
        dims = tuple(range(x.dim()))
    else:
        dims = tuple(sorted({a + x.dim() if a < 0 else a for a in axes}))
    return reduce(x, dims, keep)


def _attr_version(op: str):
    def factory(node: NodeContext):
        axes = node.attr("axes", None)
        keep = bool(node.attr("keepdims", 1))
        return lambda x: _run(op, x, axes, keep, False)

    return factory


def _input_version(op: str):
    def factory(node: NodeContext):
        keep = bool(node.attr("keepdims", 1))
        noop = bool(node.attr("noop_with_empty_axes", 0))
        static = node.const(1)
        static_axes = None if static is None else _ints(static)

        def fn(x, axes=None):
            ax = static_axes if static_axes is not None else (None if axes is None else _ints(axes))
            return _run(op, x, ax, keep, noop)

        return fn

    return factory


for _op in _REDUCTIONS:
    register(_op, since=1)(_attr_version(_op))
    register(_op, since=13 if _op == "ReduceSum" else 18)(_input_version(_op))


# ---- ArgMax / ArgMin -------------------------------------------------------------------------


def _arg(fn):
    def factory(node: NodeContext):
        axis = node.attr("axis", 0)
        keep = bool(node.attr("keepdims", 1))
        last = bool(node.attr("select_last_index", 0))

        def run(x):
            a = axis + x.dim() if axis < 0 else axis
            if x.dtype == torch.bool:
                x = x.to(torch.uint8)
            if last:
                n = x.shape[a]
                return (n - 1) - fn(x.flip(a), a, keepdim=keep)
            return fn(x, a, keepdim=keep)

        return run

    return factory


register("ArgMax", since=1)(_arg(torch.argmax))
register("ArgMin", since=1)(_arg(torch.argmin))


# ---- TopK ------------------------------------------------------------------------------------


def _topk(x: torch.Tensor, k: int, axis: int, largest: bool):
    # a stable sort keeps the lower index first among equal values, as ONNX asks
    if x.device.type != "cpu" and x.dtype in _CPU_ONLY_SORT:  # CUDA sorts no unsigned 16-64 bit ints
        values, indices = _topk(x.cpu(), k, axis, largest)
        return values.to(x.device), indices.to(x.device)
    values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


_CPU_ONLY_SORT = {getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)}


@register("TopK", since=1)
def topk_1(node: NodeContext):
    k, axis = node.attr("k"), node.attr("axis", -1)
    return lambda x: _topk(x, k, axis, True)


@register("TopK", since=10)
def topk(node: NodeContext):
    axis = node.attr("axis", -1)
    largest = bool(node.attr("largest", 1))
    static = node.const(1)
    k_static = None if static is None else _ints(static)[0]

    def fn(x, k):
        return _topk(x, k_static if k_static is not None else _ints(k)[0], axis, largest)

    return fn
