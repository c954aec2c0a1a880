"""Pooling operators: MaxPool, AveragePool, LpPool and their Global variants.

Window geometry follows onnxruntime (checked against it, degenerate sizes included): output size
``(size + pad_begin + pad_end - ((k - 1) * d + 1)) / s + 1`` rounded toward zero (up with
``ceil_mode``, the last window having to start inside the input or its begin pad); SAME_* pads are
sized with the undilated kernel. Taps past the end pad (ceil overflow) never count. Cases torch's
pooling kernels compute identically run on them directly; the rest run on an explicitly padded
input (``-inf`` for max) or, for averages/Lp with dilations or asymmetric pads, as a depthwise
convolution with a ones kernel divided by a precomputed count map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import NodeContext, register
from .conv import CONV, auto_pad_attr, torch_pad_arg

MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _out_size(n: int, k: int, s: int, b: int, e: int, ceil_mode: bool) -> int:
    """Output length as onnxruntime computes it (integer division truncating toward zero)."""
    span = n + b + e - k
    if ceil_mode or span < 0:
        o = -(-span // s) + 1
    else:
        o = span // s + 1
    if ceil_mode and o > 0 and (o - 1) * s >= n + b:
        o -= 1
    return max(o, 0)


def _same_pads_ort(auto_pad: str, sizes, kernel, strides) -> tuple[list[int], list[int]]:
    """SAME_* pads as onnxruntime sizes them for pooling: undilated kernel, no clamping at 0."""
    begin, end = [], []
    for n, k, s in zip(sizes, kernel, strides):
        need = (-(-n // s) - 1) * s + k - n
        num = need + 1 if auto_pad == "SAME_LOWER" else need
        head = abs(num) // 2 * (1 if num >= 0 else -1)  # C++ num / 2
        begin.append(head)
        end.append(need - head)
    return begin, end


class _Geometry:
    """Pads and output size of one pooling node for one input spatial size."""

    def __init__(self, sizes, kernel, strides, dils, begin, end, ceil_mode: bool):
        self.sizes, self.kernel, self.strides, self.dils = list(sizes), kernel, strides, dils
        self.begin, self.end = begin, end
        self.eff = [(k - 1) * d + 1 for k, d in zip(kernel, dils)]
        geo = zip(sizes, self.eff, strides, begin, end)
        self.out = [_out_size(n, k, s, b, e, ceil_mode) for n, k, s, b, e in geo]
        self.empty = 0 in self.out
        # end pad the windows actually reach (past `end` with ceil_mode or tiny inputs; < `end` crops)
        geo = zip(self.out, strides, self.eff, sizes, begin)
        self.reach = [(o - 1) * s + k - n - b for o, s, k, n, b in geo]

    def torch_native(self, ceil_mode: bool, dilation_ok: bool = True) -> bool:
        """Whether torch's pooling with symmetric ``padding=begin`` yields the same windows."""
        if (
            self.begin != self.end
            or min(self.begin) < 0
            or (not dilation_ok and any(d != 1 for d in self.dils))
        ):
            return False
        if any(2 * p > k for p, k in zip(self.begin, self.kernel)):
            return False
        for n, k, s, p, o in zip(self.sizes, self.eff, self.strides, self.begin, self.out):
            span = n + 2 * p - k
            if span < 0:
                return False
            t = (-(-span // s) if ceil_mode else span // s) + 1
            if ceil_mode and (t - 1) * s >= n + p:
                t -= 1
            if t != o:
                return False
        return True

    def pad(self, x: torch.Tensor, value: float = 0.0, hide_end: bool = True) -> torch.Tensor:
        """Pad (or crop) ``x`` so that every window fits exactly; excluded taps hold ``value``.

        With ``hide_end`` a negative end pad (SAME_* with stride > kernel) hides the last inputs
        from windows that reach them (onnxruntime's AveragePool); without, they stay visible
        (its MaxPool and LpPool).
        """
        if not hide_end or all(e >= 0 for e in self.end):
            return F.pad(x, torch_pad_arg(self.begin, self.reach), value=value)
        x = F.pad(x, torch_pad_arg(self.begin, self.end), value=value)
        zeros = [0] * len(self.end)
        return F.pad(x, torch_pad_arg(zeros, [r - e for r, e in zip(self.reach, self.end)]), value=value)


def _pool_attrs(node: NodeContext):
    kernel = node.attr("kernel_shape")
    if not kernel:
        raise NotImplementedError(f"{node.op_type} without kernel_shape")
    nd = len(kernel)
    strides = node.attr("strides") or [1] * nd
    dils = node.attr("dilations") or [1] * nd
    auto_pad = auto_pad_attr(node)
    pads = node.attr("pads") or [0] * (2 * nd)
    if auto_pad != "NOTSET":
        pads = [0] * (2 * nd)
    if len(pads) != 2 * nd:
        raise NotImplementedError(f"pads {pads} do not match kernel_shape {kernel}")
    ceil_mode = bool(node.attr("ceil_mode", 0))
    return list(kernel), list(strides), list(dils), auto_pad, list(pads), ceil_mode


def _geometry_cache(node: NodeContext):
    kernel, strides, dils, auto_pad, pads, ceil_mode = _pool_attrs(node)
    nd = len(kernel)
    cache: dict = {}

    def geometry(x: torch.Tensor) -> _Geometry:
        key = tuple(x.shape[2:])
        g = cache.get(key)
        if g is None:
            if x.dim() != nd + 2:
                raise ValueError(f"{node.op_type}: input rank {x.dim()} vs kernel_shape {kernel}")
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                # onnxruntime (and the ONNX reference) size SAME pads with the undilated kernel
                begin, end = _same_pads_ort(auto_pad, key, kernel, strides)
                g = _Geometry(key, kernel, strides, dils, begin, end, ceil_mode)
            else:
                g = _Geometry(key, kernel, strides, dils, pads[:nd], pads[nd:], ceil_mode)
            cache[key] = g
        return g

    return geometry, ceil_mode


def _flat_indices(idx: torch.Tensor, x_shape, padded_spatial, begin, storage_order: int) -> torch.Tensor:
    """torch's per-plane argmax (into the possibly padded plane) -> ONNX flat Indices over X."""
    sizes = list(x_shape[2:])
    coords = []
    rem = idx
    for n in reversed(padded_spatial):
        coords.append(rem % n)
        rem = torch.div(rem, n, rounding_mode="floor")
    coords = [c - b for c, b in zip(reversed(coords), begin)]
    flat = torch.zeros_like(idx)
    if storage_order == 0:
        for c, n in zip(coords, sizes):
            flat = flat * n + c
    else:
        step = 1
        for c, n in zip(coords, sizes):
            flat = flat + c * step
            step *= n
    planes = torch.arange(x_shape[0] * x_shape[1], device=idx.device).reshape(x_shape[0], x_shape[1])
    planes = planes.reshape(planes.shape + (1,) * len(sizes))
    return flat + planes * math.prod(sizes)


@register("MaxPool")
def max_pool(node: NodeContext):
    """MaxPool-1..22; the optional Indices output follows ``storage_order``."""
    geometry, ceil_mode = _geometry_cache(node)
    kernel, strides, dils = node.attr("kernel_shape"), node.attr("strides"), node.attr("dilations")
    nd = len(kernel)
    strides, dils = list(strides or [1] * nd), list(dils or [1] * nd)
    if nd not in MAX_POOL:
        raise NotImplementedError(f"MaxPool with {nd} spatial dims")
    pool = MAX_POOL[nd]
    want_idx = len(node.outputs) > 1 and bool(node.outputs[1])
    storage_order = node.attr("storage_order", 0)

    def run(x):
        g = geometry(x)
        if g.empty:
            y = x.new_zeros((*x.shape[:2], *g.out))
            return (y, y.to(torch.int64)) if want_idx else y
        dtype = x.dtype
        if not dtype.is_floating_point:
            x = x.to(torch.float64)  # torch lacks integer max pooling for some ranks
        if g.torch_native(ceil_mode):
            xin, shift = x, [0] * nd
            res = pool(x, kernel, strides, g.begin, dils, ceil_mode, want_idx)
        else:
            xin, shift = g.pad(x, -math.inf, hide_end=False), g.begin
            res = pool(xin, kernel, strides, 0, dils, False, want_idx)
        if not want_idx:
            return res if res.dtype == dtype else res.to(dtype)
        y, idx = res
        idx = _flat_indices(idx, x.shape, xin.shape[2:], shift, storage_order)
        return (y if y.dtype == dtype else y.to(dtype)), idx

    return run


def _window_sum(x: torch.Tensor, g: _Geometry, hide_end: bool = True) -> torch.Tensor:
    """Sum over each (zero padded, dilated) window as a depthwise convolution with a ones kernel."""
    n, c = x.shape[:2]
    nd = len(g.kernel)
    xp = g.pad(x.reshape((n * c, 1) + tuple(x.shape[2:])), hide_end=hide_end)
    ones = torch.ones((1, 1, *g.kernel), dtype=x.dtype, device=x.device)
    return CONV[nd](xp, ones, None, g.strides, 0, g.dils).reshape((n, c, *g.out))


def _counts(g: _Geometry, include_pad: bool, like: torch.Tensor) -> torch.Tensor:
    """Number of counted taps per window: input taps, plus pad taps when ``include_pad``."""
    mask = torch.ones((1, 1, *g.sizes), dtype=like.dtype, device=like.device)
    if include_pad:
        mask = F.pad(mask, torch_pad_arg(g.begin, g.end), value=1.0)
        inner = torch_pad_arg([0] * len(g.begin), [r - e for r, e in zip(g.reach, g.end)])
        mask = F.pad(mask, inner)
        ones = torch.ones((1, 1, *g.kernel), dtype=like.dtype, device=like.device)
        return CONV[len(g.kernel)](mask, ones, None, g.strides, 0, g.dils).reshape(g.out)
    return _window_sum(mask, g).reshape(g.out)


@register("AveragePool")
def average_pool(node: NodeContext):
    """AveragePool-1..22 with ``count_include_pad``, ``ceil_mode`` and (19+) ``dilations``."""
    geometry, ceil_mode = _geometry_cache(node)
    include_pad = bool(node.attr("count_include_pad", 0))
    kernel = list(node.attr("kernel_shape"))
    nd = len(kernel)
    if nd not in AVG_POOL:
        raise NotImplementedError(f"AveragePool with {nd} spatial dims")
    pool = AVG_POOL[nd]
    counts: dict = {}

    def run(x):
        g = geometry(x)
        if g.empty:
            return x.new_zeros((*x.shape[:2], *g.out))
        if g.torch_native(ceil_mode, dilation_ok=False):
            return pool(x, kernel, g.strides, g.begin, ceil_mode, include_pad)
        key = (tuple(g.sizes), x.dtype, x.device)
        cnt = counts.get(key)
        if cnt is None:
            cnt = counts[key] = _counts(g, include_pad, x)
        return _window_sum(x, g) / cnt

    return run


@register("LpPool")
def lp_pool(node: NodeContext):
    """LpPool-1..22: ``(sum |x|^p) ** (1/p)`` over each window (zero padding adds nothing)."""
    geometry, _ = _geometry_cache(node)
    p = float(node.attr("p", 2.0))

    def run(x):
        g = geometry(x)
        if g.empty:
            return x.new_zeros((*x.shape[:2], *g.out))
        xp = x * x if p == 2.0 else x.abs() ** p
        # the clamp (invisible in the values) keeps all-zero windows from giving NaN gradients
        s = _window_sum(xp, g, hide_end=False).clamp_min(torch.finfo(x.dtype).tiny)
        return torch.sqrt(s) if p == 2.0 else s ** (1.0 / p)

    return run


def _global(reduce):
    """Reduce over the spatial dims (2..), keeping them as size 1."""

    def run(x):
        return reduce(x, tuple(range(2, x.dim()))) if x.dim() > 2 else x

    return run


@register("GlobalAveragePool")
def global_average_pool(node: NodeContext):
    return _global(lambda x, dims: x.mean(dim=dims, keepdim=True))


@register("GlobalMaxPool")
def global_max_pool(node: NodeContext):
    return _global(lambda x, dims: x.amax(dim=dims, keepdim=True))


@register("GlobalLpPool")
def global_lp_pool(node: NodeContext):
    p = float(node.attr("p", 2.0))
    return _global(lambda x, dims: torch.linalg.vector_norm(x, ord=p, dim=dims, keepdim=True))
