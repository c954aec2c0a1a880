"""Activation operators, Softmax/LogSoftmax/Hardmax and Dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import NodeContext, register


def _simple(op: str, fn, since: int = 1) -> None:
    register(op, since=since)(lambda node: fn)


_simple("Relu", torch.relu)
_simple("Sigmoid", torch.sigmoid)
_simple("Tanh", torch.tanh)
_simple("Softsign", F.softsign)
_simple("Mish", F.mish, since=18)
_simple("HardSwish", F.hardswish, since=14)  # x * max(0, min(1, x/6 + 1/2))


@register("Softplus")
def softplus(node: NodeContext):
    # threshold=20 switches to the identity where log1p(exp(x)) == x up to float rounding
    return lambda x: F.softplus(x, beta=1.0, threshold=20.0)


@register("LeakyRelu")
def leaky_relu(node: NodeContext):
    alpha = node.attr("alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


@register("PRelu", since=7)
def prelu(node: NodeContext):
    # slope broadcasts unidirectionally to X (numpy rules restricted to slope's side)
    return lambda x, slope: torch.where(x < 0, x * slope, x)


@register("Elu")
def elu(node: NodeContext):
    alpha = node.attr("alpha", 1.0)
    return lambda x: F.elu(x, alpha)


@register("Selu")
def selu(node: NodeContext):
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    return lambda x: gamma * F.elu(x, alpha)


@register("Celu", since=12)
def celu(node: NodeContext):
    alpha = node.attr("alpha", 1.0)
    return lambda x: F.celu(x, alpha)


@register("HardSigmoid")
def hard_sigmoid(node: NodeContext):
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@register("ThresholdedRelu", since=10)
def thresholded_relu(node: NodeContext):
    alpha = node.attr("alpha", 1.0)
    return lambda x: F.threshold(x, alpha, 0.0)


@register("Gelu", since=20)
def gelu(node: NodeContext):
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"Gelu approximate={approximate!r}")
    return lambda x: F.gelu(x, approximate=approximate)


@register("Swish", since=24)
def swish(node: NodeContext):
    alpha = node.attr("alpha", 1.0)
    if alpha == 1.0:
        return F.silu
    return lambda x: x * torch.sigmoid(alpha * x)


@register("Shrink", since=9)
def shrink(node: NodeContext):
    lambd, bias = node.attr("lambd", 0.5), node.attr("bias", 0.0)

    def run(x):
        if not x.is_floating_point():  # integer types: attributes cast to T
            lo, b = int(lambd), int(bias)
            return torch.where(x < -lo, x + b, torch.where(x > lo, x - b, 0)).to(x.dtype)
        return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, 0.0))

    return run


# ---- Softmax family -----------------------------------------------------------------------------
# Before opset 13 the input is coerced to 2D [prod(shape[:axis]), prod(shape[axis:])] and the op
# runs over the flattened tail; from 13 on it runs over the single axis.


def _hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    idx = x.argmax(dim=dim, keepdim=True)  # first maximum, as ONNX requires
    return torch.zeros_like(x).scatter_(dim, idx, 1)


_SOFTMAX = {"Softmax": torch.softmax, "LogSoftmax": torch.log_softmax, "Hardmax": _hardmax}


def _coerced(fn, axis: int):
    def run(x):
        if x.dim() == 0:
            return fn(x.reshape(1, 1), 1).reshape(())
        ax = axis + x.dim() if axis < 0 else axis
        return fn(x.flatten(ax) if ax < x.dim() else x.unsqueeze(-1), -1).reshape(x.shape)

    return run


def _register_softmax(op: str) -> None:
    fn = _SOFTMAX[op]

    @register(op, since=1)
    def old(node: NodeContext):
        return _coerced(fn, node.attr("axis", 1))

    @register(op, since=13)
    def new(node: NodeContext):
        axis = node.attr("axis", -1)
        return lambda x: fn(x, axis)


for _op in _SOFTMAX:
    _register_softmax(_op)


# ---- Dropout ------------------------------------------------------------------------------------
@register("Dropout", since=7)
def dropout_v7(node: NodeContext):
    """Inference: identity.

    The optional mask follows onnxruntime, which fills it with zeros/False before opset 12 (of
    type T before opset 10, bool after); the onnx reference implementation returns ones there.
    """
    want_mask = len(node.outputs) > 1 and bool(node.outputs[1])
    mask_dtype = torch.bool if node.opset >= 10 else None
    if not want_mask:
        return lambda x: x
    return lambda x: (x, torch.zeros_like(x, dtype=mask_dtype))


@register("Dropout", since=12)
def dropout_v12(node: NodeContext):
    """Identity unless ``training_mode`` is true; then random dropout with scale 1/(1-ratio)."""
    want_mask = len(node.outputs) > 1 and bool(node.outputs[1])
    training_const = node.const(2) if node.has_input(2) else None
    never_trains = not node.has_input(2) or (training_const is not None and not bool(training_const))

    def identity(x):
        return (x, torch.ones_like(x, dtype=torch.bool)) if want_mask else x

    if never_trains:
        return lambda x, *_: identity(x)

    def run(x, ratio=None, training_mode=None):
        if training_mode is None or not bool(training_mode):
            return identity(x)
        p = 0.5 if ratio is None else float(ratio)
        if p == 0.0:
            return identity(x)
        if p >= 1.0:
            mask = torch.zeros_like(x, dtype=torch.bool)
            return (torch.zeros_like(x), mask) if want_mask else torch.zeros_like(x)
        mask = torch.rand_like(x, dtype=torch.float32) >= p
        y = x * mask / (1.0 - p)
        return (y, mask) if want_mask else y

    return run
