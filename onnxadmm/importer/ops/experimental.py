"""The experimental ops of opsets 1-9 that onnxruntime still runs (default domain, removed in opset 10).

ImageScaler, Crop, Affine, ScaledTanh, ParametricSoftplus and Scale. Old exporters (OnnxMLTools,
WinMLTools, early Caffe2) emit them, e.g. the WinML style-transfer models. Semantics follow
onnxruntime's kernels; attributes onnxruntime requires but the old schema left optional default to
the identity (scale 1, no bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import NodeContext, register


class _ChannelBias:
    """Adds a per-channel constant to NCHW data; the constant is moved once per device and dtype."""

    def __init__(self, scale: float, bias: list[float] | None):
        self.scale = scale
        self.bias = torch.tensor(bias, dtype=torch.float32).reshape(1, -1, 1, 1) if bias else None
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.scale if self.scale != 1.0 else x
        if self.bias is None:
            return y
        key = (x.device, x.dtype)
        bias = self._cache.get(key)
        if bias is None:
            bias = self._cache[key] = self.bias.to(device=x.device, dtype=x.dtype)
        return y + bias


@register("ImageScaler")
def image_scaler(node: NodeContext):
    """``scale * x + bias[c]`` on NCHW data."""
    return _ChannelBias(node.attr("scale", 1.0), node.attr("bias"))


@register("Crop")
def crop(node: NodeContext):
    """Crop the H, W axes of NCHW data: ``border`` = (left, top, right, bottom); ``scale`` = (h, w)
    fixes the output size from the top-left corner instead of the right/bottom borders."""
    border = node.attr("border", [])
    size = node.attr("scale", [])
    if len(border) != 4:
        raise NotImplementedError(f"Crop needs 4 border values (left, top, right, bottom), got {border}")
    if size and len(size) != 2:
        raise NotImplementedError(f"Crop scale must be (height, width), got {size}")
    left, top, right, bottom = border

    def run(x):
        if x.dim() != 4:
            raise ValueError(f"Crop expects NCHW input, got shape {tuple(x.shape)}")
        h, w = x.shape[2], x.shape[3]
        h_end, w_end = (top + size[0], left + size[1]) if size else (h - bottom, w - right)
        if top > h_end or h_end > h or left > w_end or w_end > w:
            raise ValueError(f"Crop border {border} / scale {size} does not fit input {tuple(x.shape)}")
        return x[:, :, top:h_end, left:w_end]

    return run


@register("Affine")
def affine(node: NodeContext):
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 0.0)
    return lambda x: x * alpha + beta


@register("ScaledTanh")
def scaled_tanh(node: NodeContext):
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    return lambda x: alpha * torch.tanh(beta * x)


@register("ParametricSoftplus")
def parametric_softplus(node: NodeContext):
    """``alpha * ln(1 + exp(beta * x))``."""
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    return lambda x: alpha * F.softplus(beta * x)


@register("Scale")
def scale(node: NodeContext):
    factor = node.attr("scale", 1.0)
    return lambda x: x * factor
