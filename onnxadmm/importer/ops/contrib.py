"""onnxruntime's contrib operators that its transformer optimizer writes into models.

``python -m onnxruntime.transformers.optimizer`` (and models exported for onnxruntime) fuse
standard subgraphs into ops of the ``com.microsoft`` domain, and onnxruntime also accepts
``LayerNormalization`` and ``SimplifiedLayerNormalization`` in the default domain below opset 17.
The ones whose meaning is elementwise or a normalization are here, checked against onnxruntime
(tests/test_ops_contrib.py): FusedMatMul (without batch transposes), Gelu, FastGelu, BiasGelu,
QuickGelu, SkipLayerNormalization, SkipSimplifiedLayerNormalization and
SimplifiedLayerNormalization. Attention-style fused ops are not, nor those onnxruntime runs on CUDA
only (BiasAdd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import NodeContext, register
from .norm import layer_norm

MS = "com.microsoft"


@register("FusedMatMul", domain=MS)
def fused_matmul(node: NodeContext):
    """``alpha * A' @ B'``, ``'`` transposing the last two axes where transA / transB say."""
    alpha = node.attr("alpha", 1.0)
    trans_a, trans_b = bool(node.attr("transA", 0)), bool(node.attr("transB", 0))
    if node.attr("transBatchA", 0) or node.attr("transBatchB", 0):
        raise NotImplementedError("FusedMatMul with transBatchA / transBatchB")

    def run(a, b):
        if trans_a:
            a = a.transpose(-1, -2)
        if trans_b:
            b = b.transpose(-1, -2)
        y = torch.matmul(a, b)
        return y if alpha == 1.0 else y * alpha

    return run


def _gelu(x):
    return F.gelu(x)


@register("Gelu", domain=MS)
def gelu(node: NodeContext):
    return _gelu


@register("BiasGelu", domain=MS)
def bias_gelu(node: NodeContext):
    return lambda a, b: _gelu(a + b)


@register("FastGelu", domain=MS)
def fast_gelu(node: NodeContext):
    """The tanh approximation of Gelu, of ``X + bias`` when a bias is given."""

    def run(x, bias=None):
        if bias is not None:
            x = x + bias
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))

    return run


@register("QuickGelu", domain=MS)
def quick_gelu(node: NodeContext):
    alpha = node.attr("alpha", 1.702)
    return lambda x: x * torch.sigmoid(alpha * x)


def _normalize(x, scale, bias, eps: float, simplified: bool, axis: int = -1):
    """(y, mean, inverse standard deviation) over the axes from ``axis`` on, in float32 at least."""
    dims = tuple(range(axis % x.dim(), x.dim()))
    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if simplified:
        mean = None
        inv = torch.rsqrt(xs.pow(2).mean(dim=dims, keepdim=True) + eps)
        y = xs * inv * scale
    else:
        var, mean = torch.var_mean(xs, dim=dims, keepdim=True, correction=0)
        inv = torch.rsqrt(var + eps)
        y = (xs - mean) * inv * scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), mean, inv


def _skip_norm(simplified: bool):
    def factory(node: NodeContext):
        """``normalize(input + skip + bias) * gamma (+ beta)`` over the last axis; outputs the
        result, mean, inverse standard deviation and ``input + skip + bias``."""
        eps = node.attr("epsilon", 1e-12)

        def run(x, skip, gamma, *rest):
            if simplified:
                beta, bias = None, (rest[0] if rest else None)
            else:
                beta = rest[0] if rest else None
                bias = rest[1] if len(rest) > 1 else None
            s = x + skip
            if bias is not None:
                s = s + bias
            y, mean, inv = _normalize(s, gamma, beta, eps, simplified)
            return y, mean, inv, s

        return run

    return factory


register("SkipLayerNormalization", domain=MS)(_skip_norm(False))
register("SkipSimplifiedLayerNormalization", domain=MS)(_skip_norm(True))


def simplified_layer_norm(node: NodeContext):
    """onnxruntime's SimplifiedLayerNormalization (RMS normalization, default domain at any opset, or
    com.microsoft) over the axes from ``axis``: the result and the inverse standard deviation."""
    axis = node.attr("axis", -1)
    eps = node.attr("epsilon", 1e-5)

    def run(x, scale, bias=None):
        y, _, inv = _normalize(x, scale, bias, eps, True, axis)
        return y, inv

    return run


register("SimplifiedLayerNormalization", since=1)(simplified_layer_norm)
register("SimplifiedLayerNormalization", domain=MS)(simplified_layer_norm)
# onnxruntime's LayerNormalization below opset 17 and in com.microsoft means LayerNormalization-17
register("LayerNormalization", since=1)(layer_norm)
register("LayerNormalization", domain=MS)(layer_norm)
