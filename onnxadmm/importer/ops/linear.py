"""Linear-algebra operators: Gemm, MatMul, MatMulInteger, Einsum, Det."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import NodeContext, register


@register("Gemm")
def gemm(node: NodeContext):
    """Gemm-1..13: ``alpha * A' @ B' + beta * C`` (C optional from opset 11, broadcast to (M, N)).

    ``transB=1, transA=0, alpha=beta=1`` with a (N,) bias, the usual exported Linear, runs as a single
    ``F.linear(A, B, C)``.
    """
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    trans_a, trans_b = bool(node.attr("transA", 0)), bool(node.attr("transB", 0))
    linear_like = trans_b and not trans_a and alpha == 1.0 and beta == 1.0

    def run(a, b, c=None):
        if linear_like and (c is None or (c.dim() == 1 and c.shape[0] == b.shape[0])):
            return F.linear(a, b, c)
        if trans_a:
            a = a.t()
        if trans_b:
            b = b.t()
        if c is None or beta == 0.0:
            y = a @ b
            return y if alpha == 1.0 else y * alpha
        if a.dtype.is_floating_point:
            return torch.addmm(c.to(a.dtype), a, b, beta=beta, alpha=alpha)
        y = a @ b
        y = y if alpha == 1.0 else (y * alpha).to(a.dtype)
        return y + (c if beta == 1.0 else (c * beta).to(c.dtype))

    return run


@register("MatMul")
def matmul(node: NodeContext):
    return torch.matmul


@register("MatMulInteger", since=10)
def matmul_integer(node: NodeContext):
    """(u)int8 matmul with zero points, int32 result (computed exactly in int64)."""

    def run(a, b, a_zero=None, b_zero=None):
        a = a.to(torch.int64)
        b = b.to(torch.int64)
        if a_zero is not None:
            az = a_zero.to(torch.int64)
            a = a - (az.unsqueeze(-1) if az.dim() == 1 and az.numel() > 1 else az)
        if b_zero is not None:
            b = b - b_zero.to(torch.int64)
        # int64 matmul is not implemented on every device; the exact float64 path covers int8 sums
        return torch.matmul(a.double(), b.double()).round().to(torch.int32)

    return run


@register("Einsum", since=12)
def einsum(node: NodeContext):
    equation = node.attr("equation").replace(" ", "")

    def run(*xs):
        return torch.einsum(equation, *xs)

    return run


@register("Det", since=11)
def det(node: NodeContext):
    return torch.linalg.det
