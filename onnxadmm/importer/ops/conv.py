"""Convolution operators: Conv and ConvTranspose (1D/2D/3D), plus padding helpers shared with pooling.

Symmetric padding goes straight to ``F.convNd(padding=...)``; only the asymmetric remainder of the
pads (or ``auto_pad=SAME_*`` with an odd total) costs an extra ``F.pad``. Plans that depend on the
input's spatial size (``SAME_*``, ``output_shape``) are computed once per size and cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import NodeContext, register

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def auto_pad_attr(node: NodeContext) -> str:
    auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in AUTO_PADS:
        raise NotImplementedError(f"auto_pad={auto_pad!r}")
    return auto_pad


def _same_pads(auto_pad: str, sizes, eff_kernel, strides) -> tuple[list[int], list[int]]:
    """(begin, end) pads for ``SAME_UPPER``/``SAME_LOWER``: output size ``ceil(size / stride)``.

    Sized with the dilated kernel (as torch and TensorFlow; onnxruntime refuses SAME with dilations).
    """
    begin, end = [], []
    for n, k, s in zip(sizes, eff_kernel, strides):
        out = -(-n // s)
        total = max(0, (out - 1) * s + k - n)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return begin, end


def torch_pad_arg(begin, end) -> list[int]:
    """ONNX per-dim (begin, end) pads -> the flat, last-dim-first list that ``F.pad`` takes."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _split_pads(pads, nd: int) -> tuple[list[int], list[int]]:
    pads = list(pads) if pads else [0] * (2 * nd)
    if len(pads) != 2 * nd:
        raise NotImplementedError(f"pads {pads} do not match {nd} spatial dims")
    return pads[:nd], pads[nd:]


def _ints(v, nd: int, default: int = 1) -> list[int]:
    return list(v) if v else [default] * nd


@register("Conv")
def conv(node: NodeContext):
    """Conv-1/11/22: N x C x D1..Dn input, M x C/group x k1..kn weight, optional bias."""
    auto_pad = auto_pad_attr(node)
    group = node.attr("group", 1)
    kernel_attr = node.attr("kernel_shape")
    strides_attr, dil_attr, pads_attr = node.attr("strides"), node.attr("dilations"), node.attr("pads")
    plans: dict = {}

    def plan(x: torch.Tensor, w: torch.Tensor):
        nd = x.dim() - 2
        if nd not in CONV:
            raise NotImplementedError(f"Conv with {nd} spatial dims")
        kernel = list(kernel_attr) if kernel_attr else list(w.shape[2:])
        strides, dils = _ints(strides_attr, nd), _ints(dil_attr, nd)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            eff = [(k - 1) * d + 1 for k, d in zip(kernel, dils)]
            begin, end = _same_pads(auto_pad, x.shape[2:], eff, strides)
        elif auto_pad == "VALID":
            begin, end = [0] * nd, [0] * nd
        else:
            begin, end = _split_pads(pads_attr, nd)
        sym = [min(b, e) for b, e in zip(begin, end)]
        extra = torch_pad_arg([b - p for b, p in zip(begin, sym)], [e - p for e, p in zip(end, sym)])
        return CONV[nd], strides, sym, dils, (extra if any(extra) else None)

    def run(x, w, b=None):
        key = tuple(x.shape[1:]) if auto_pad.startswith("SAME") else x.dim()
        p = plans.get(key)
        if p is None:
            p = plans[key] = plan(x, w)
        fn, strides, padding, dils, extra = p
        if extra is not None:
            x = F.pad(x, extra)
        return fn(x, w, b, strides, padding, dils, group)

    return run


@register("ConvTranspose")
def conv_transpose(node: NodeContext):
    """ConvTranspose-1/11/22: weight C x M/group x k1..kn; output_padding, output_shape, auto_pad."""
    auto_pad = auto_pad_attr(node)
    group = node.attr("group", 1)
    strides_attr, dil_attr, pads_attr = node.attr("strides"), node.attr("dilations"), node.attr("pads")
    out_pad_attr, out_shape_attr = node.attr("output_padding"), node.attr("output_shape")
    shape_dependent = bool(out_shape_attr) or auto_pad.startswith("SAME")
    plans: dict = {}

    def plan(x: torch.Tensor, w: torch.Tensor):
        nd = x.dim() - 2
        if nd not in CONV_T:
            raise NotImplementedError(f"ConvTranspose with {nd} spatial dims")
        kernel = list(w.shape[2:])
        strides, dils = _ints(strides_attr, nd), _ints(dil_attr, nd)
        out_pad = _ints(out_pad_attr, nd, 0)[-nd:]
        sizes = list(x.shape[2:])
        full = [s * (n - 1) + (k - 1) * d + 1 for s, n, k, d in zip(strides, sizes, kernel, dils)]
        if shape_dependent:
            if out_shape_attr:
                target = list(out_shape_attr)[-nd:]
            else:
                target = [n * s for n, s in zip(sizes, strides)]
            # as onnxruntime: a negative total pad becomes 0; an explicit output_shape is then
            # reached by zero extension at the end
            total = [max(0, f + op - t) for f, op, t in zip(full, out_pad, target)]
            if auto_pad == "SAME_UPPER":
                begin = [t // 2 for t in total]
            else:
                begin = [t - t // 2 for t in total]
            if out_shape_attr:
                end = [f + op - b - t for f, op, b, t in zip(full, out_pad, begin, target)]
            else:
                end = [t - b for t, b in zip(total, begin)]
        elif auto_pad == "VALID":
            begin, end = [0] * nd, [0] * nd
        else:
            begin, end = _split_pads(pads_attr, nd)
        # torch crops `padding` on both sides and then appends `output_padding` at the end
        torch_op = [op + b - e for op, b, e in zip(out_pad, begin, end)]
        if all(b >= 0 and 0 <= t < max(s, d) for b, t, s, d in zip(begin, torch_op, strides, dils)):
            return CONV_T[nd], strides, begin, torch_op, dils, None
        # general case: full transposed conv, then crop / zero-extend each side
        crop = torch_pad_arg([-b for b in begin], [op - e for op, e in zip(out_pad, end)])
        return CONV_T[nd], strides, [0] * nd, [0] * nd, dils, crop

    def run(x, w, b=None):
        key = tuple(x.shape[1:]) if shape_dependent else x.dim()
        p = plans.get(key)
        if p is None:
            p = plans[key] = plan(x, w)
        fn, strides, padding, out_pad, dils, crop = p
        if crop is None:
            return fn(x, w, b, strides, padding, out_pad, group, dils)
        y = F.pad(fn(x, w, None, strides, 0, 0, group, dils), crop)
        if b is not None:
            y = y + b.reshape((1, -1) + (1,) * (y.dim() - 2))
        return y

    return run
