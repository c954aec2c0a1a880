"""Normalization operators: Batch/Instance/Layer/Group/RMS normalization, LRN, LpNormalization, MVN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import NodeContext, register, torch_dtype

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast over axis 1 of an ``ndim``-d tensor."""
    return t.reshape((1, -1) + (1,) * (ndim - 2)) if ndim >= 2 else t


def _wanted(node: NodeContext, i: int) -> bool:
    return len(node.outputs) > i and bool(node.outputs[i])


@register("BatchNormalization")
def batch_norm(node: NodeContext):
    """BatchNormalization-1..15.

    Inference (the default) normalizes with the given ``input_mean``/``input_var``. Training
    semantics (``training_mode=1`` from opset 14; before, requesting the extra outputs with
    ``is_test=0``) normalize with the batch statistics and also return the updated running stats
    (opset < 14 additionally ``saved_mean`` and, as onnxruntime, the inverse std as ``saved_var``).
    """
    eps = node.attr("epsilon", 1e-5)
    momentum = node.attr("momentum", 0.9)
    spatial = node.attr("spatial", 1) if node.opset < 9 else 1
    if node.opset >= 14:
        training = bool(node.attr("training_mode", 0))
    else:
        training = any(_wanted(node, i) for i in range(1, 5)) and not node.attr("is_test", 0)
    n_out = 3 if node.opset >= 14 else 5

    def inference(x, scale, bias, mean, var):
        if (
            spatial
            and x.dim() >= 2
            and scale.dim() == 1
            and not (mean.requires_grad or var.requires_grad)
            and mean.dtype == x.dtype
        ):
            return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
        if spatial:
            scale, bias, mean, var = (_per_channel(t, x.dim()) for t in (scale, bias, mean, var))
        return (x - mean) * torch.rsqrt(var + eps) * scale + bias

    if not training:
        return inference

    def train(x, scale, bias, mean, var):
        dims = [d for d in range(x.dim()) if d != 1] if spatial else [0]
        xs = x.float() if x.dtype in _LOW_PRECISION else x
        cur_var, cur_mean = torch.var_mean(xs, dim=dims, correction=0)
        cur_var, cur_mean = cur_var.to(x.dtype), cur_mean.to(x.dtype)
        shape = (lambda t: _per_channel(t, x.dim())) if spatial else (lambda t: t)
        inv_std = torch.rsqrt(cur_var + eps)
        y = (x - shape(cur_mean)) * shape(inv_std) * shape(scale) + shape(bias)
        run_mean = mean * momentum + cur_mean * (1 - momentum)
        run_var = var * momentum + cur_var * (1 - momentum)
        return (y, run_mean, run_var, cur_mean, inv_std)[:n_out]

    return train


@register("InstanceNormalization")
def instance_norm(node: NodeContext):
    eps = node.attr("epsilon", 1e-5)

    def run(x, scale, bias):
        if x.dim() >= 3:
            return F.instance_norm(x, weight=scale, bias=bias, eps=eps)
        # no spatial dims: each statistic covers one element, which normalizes to 0
        return (x - x) * _per_channel(scale, x.dim()) + _per_channel(bias, x.dim())

    return run


@register("LayerNormalization", since=17)
def layer_norm(node: NodeContext):
    """LayerNormalization-17 over dims ``axis..``; optional Mean / InvStdDev outputs (keepdims)."""
    axis = node.attr("axis", -1)
    eps = node.attr("epsilon", 1e-5)
    stash = torch_dtype(node.attr("stash_type", 1))
    extra = _wanted(node, 1) or _wanted(node, 2)

    def run(x, scale, bias=None):
        a = axis % x.dim()
        norm_shape = tuple(x.shape[a:])
        dtype = x.dtype
        xs = x.to(stash) if dtype in _LOW_PRECISION and stash not in _LOW_PRECISION else x
        same = tuple(scale.shape) == norm_shape and (bias is None or tuple(bias.shape) == norm_shape)
        if same and scale.dtype == xs.dtype and (bias is None or bias.dtype == xs.dtype):
            if not extra:
                return F.layer_norm(xs, norm_shape, scale, bias, eps).to(dtype)
            y, mean, rstd = torch.native_layer_norm(xs, norm_shape, scale, bias, eps)
        else:
            dims = tuple(range(a, x.dim()))
            var, mean = torch.var_mean(xs, dim=dims, keepdim=True, correction=0)
            rstd = torch.rsqrt(var + eps)
            y = (xs - mean) * rstd * scale
            if bias is not None:
                y = y + bias
        y = y.to(dtype)
        if not extra:
            return y
        return y, mean.to(stash), rstd.to(stash)

    return run


@register("RMSNormalization", since=23)
def rms_norm(node: NodeContext):
    """RMSNormalization-23: ``x / sqrt(mean(x^2 over axis..) + eps) * scale`` (scale broadcasts)."""
    axis = node.attr("axis", -1)
    eps = node.attr("epsilon", 1e-5)
    stash = torch_dtype(node.attr("stash_type", 1))

    def run(x, scale):
        a = axis % x.dim()
        dtype = x.dtype
        xs = x.to(stash) if dtype in _LOW_PRECISION and stash not in _LOW_PRECISION else x
        norm_shape = tuple(x.shape[a:])
        if tuple(scale.shape) == norm_shape and xs is x and scale.dtype == x.dtype:
            return F.rms_norm(x, norm_shape, scale, eps)
        ms = (xs * xs).mean(dim=tuple(range(a, x.dim())), keepdim=True)
        return (xs * torch.rsqrt(ms + eps)).to(dtype) * scale

    return run


@register("GroupNormalization", since=18)
def group_norm_18(node: NodeContext):
    """GroupNormalization-18: ``scale`` and ``bias`` hold one value per group."""
    groups = node.attr("num_groups")
    eps = node.attr("epsilon", 1e-5)

    def run(x, scale, bias):
        c = x.shape[1]
        y = F.group_norm(x, groups, None, None, eps)
        scale = _per_channel(scale.repeat_interleave(c // groups), x.dim())
        bias = _per_channel(bias.repeat_interleave(c // groups), x.dim())
        return y * scale + bias

    return run


@register("GroupNormalization", since=21)
def group_norm_21(node: NodeContext):
    """GroupNormalization-21: per-channel ``scale``/``bias``; ``stash_type`` sets stage-one precision."""
    groups = node.attr("num_groups")
    eps = node.attr("epsilon", 1e-5)
    stash = torch_dtype(node.attr("stash_type", 1))

    def run(x, scale, bias):
        if x.dtype in _LOW_PRECISION and stash not in _LOW_PRECISION:
            y = F.group_norm(x.to(stash), groups, None, None, eps).to(x.dtype)
            return y * _per_channel(scale, x.dim()) + _per_channel(bias, x.dim())
        return F.group_norm(x, groups, scale, bias, eps)

    return run


@register("LRN")
def lrn(node: NodeContext):
    """``x / (bias + alpha / size * sum of x^2 over channels [c - (size-1)//2, c + ceil((size-1)/2)]) ** beta``."""
    size = node.attr("size")
    alpha, beta, bias = node.attr("alpha", 1e-4), node.attr("beta", 0.75), node.attr("bias", 1.0)
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2

    def run(x):
        n, c = x.shape[:2]
        sq = (x * x).reshape(n, 1, c, -1)
        avg = F.avg_pool2d(F.pad(sq, (0, 0, front, back)), (size, 1), stride=1)
        return x / (bias + alpha * avg.reshape(x.shape)) ** beta

    return run


@register("LpNormalization")
def lp_normalization(node: NodeContext):
    axis = node.attr("axis", -1)
    p = node.attr("p", 2)
    if p not in (1, 2):
        raise NotImplementedError(f"LpNormalization p={p}")

    def run(x):
        norm = torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)
        return x / torch.where(norm == 0, torch.ones_like(norm), norm)

    return run


@register("MeanVarianceNormalization", since=9)
def mean_variance_normalization(node: NodeContext):
    """``(x - mean) / (sqrt(var) + 1e-9)`` over ``axes`` (default [0, 2, 3])."""
    axes = node.attr("axes", [0, 2, 3])

    def run(x):
        var, mean = torch.var_mean(x, dim=axes, keepdim=True, correction=0)
        # the clamp (invisible in the values) keeps a constant slice from giving NaN gradients
        return (x - mean) / (torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny)) + 1e-9)

    return run
