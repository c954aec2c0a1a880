"""Elementwise operators: arithmetic, math functions, comparisons, logic, bitwise, Cast, Clip, Where.

Broadcasting follows numpy rules, which torch shares. torch's CPU kernels lack most ops on
uint16/uint32/uint64, so those run on an int64 stand-in (uint64 reinterpreted bit for bit, with the
sign bit flipped where order matters) and are converted back.
"""

from __future__ import annotations

import functools
import math

import torch

from ..registry import NodeContext, register, torch_dtype

_WIDE_UINT = (torch.uint16, torch.uint32, torch.uint64)
_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1


def _lift(t: torch.Tensor, ordered: bool = False) -> torch.Tensor:
    """int64 stand-in for a wide unsigned tensor; ``ordered`` keeps uint64 order under signed compare."""
    if t.dtype == torch.uint64:
        v = t.view(torch.int64)
        return v ^ _I64_MIN if ordered else v
    if t.dtype in _WIDE_UINT:
        return t.to(torch.int64)
    return t


def _drop(t: torch.Tensor, dtype: torch.dtype, ordered: bool = False) -> torch.Tensor:
    """Inverse of :func:`_lift`."""
    if dtype == torch.uint64:
        return (t ^ _I64_MIN if ordered else t).view(torch.uint64)
    return t.to(dtype)


def _binary(fn, ordered: bool = False, keep_dtype: bool = True):
    """Wrap a torch binary op so that it also runs on wide unsigned integers."""

    def run(a, b):
        if a.dtype in _WIDE_UINT:
            r = fn(_lift(a, ordered), _lift(b, ordered))
            return _drop(r, a.dtype, ordered) if keep_dtype else r
        return fn(a, b)

    return run


def _unary(fn, ordered: bool = False):
    def run(x):
        if x.dtype in _WIDE_UINT:
            return _drop(fn(_lift(x, ordered)), x.dtype, ordered)
        return fn(x)

    return run


def _simple(op: str, fn, since: int = 1) -> None:
    register(op, since=since)(lambda node: fn)


# ---- arithmetic ---------------------------------------------------------------------------------
_add = _binary(torch.add)
_sub = _binary(torch.sub)
_mul = _binary(torch.mul)


def _div_impl(a, b):
    if a.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")  # C / onnxruntime integer division


_div = _binary(_div_impl)

_simple("Add", _add)
_simple("Sub", _sub)
_simple("Mul", _mul)
_simple("Div", _div)


def _int_pow(x, y):
    """Integer power; a negative exponent gives 1/x**n truncated (0 unless |x| == 1)."""
    neg = y < 0
    r = torch.pow(x, y.clamp(min=0))
    if bool(neg.any()):
        odd = (y.abs() % 2) == 1
        inv = torch.where(x == 1, 1, torch.where(x == -1, torch.where(odd, -1, 1), 0)).to(r.dtype)
        r = torch.where(neg, inv, r)
    return r


def _pow(x, y):
    y = _lift(y)
    if x.is_floating_point():
        r = torch.pow(x, y)
        return r if r.dtype == x.dtype else r.to(x.dtype)
    if y.is_floating_point():
        return torch.pow(x.double(), y.double()).to(x.dtype)
    return _int_pow(_lift(x), y).to(x.dtype)


_simple("Pow", _pow)


@register("Mod", since=10)
def mod(node: NodeContext):
    fn = torch.fmod if node.attr("fmod", 0) else torch.remainder
    return _binary(fn)


def _variadic(fn):
    def run(*xs):
        xs = [x for x in xs if x is not None]
        return functools.reduce(fn, xs)

    return run


_min2 = _binary(torch.minimum, ordered=True)
_max2 = _binary(torch.maximum, ordered=True)
_simple("Min", _variadic(_min2))
_simple("Max", _variadic(_max2))
_simple("Sum", _variadic(_add))


@register("Mean")
def mean(node: NodeContext):
    def run(*xs):
        xs = [x for x in xs if x is not None]
        s = functools.reduce(torch.add, xs)
        return s if len(xs) == 1 else s / len(xs)

    return run


# ---- unary math ---------------------------------------------------------------------------------
_simple("Neg", torch.neg)
_simple("Abs", _unary(torch.abs))
_simple("Sign", _unary(torch.sign), since=9)
_simple("Sqrt", torch.sqrt)
_simple("Reciprocal", torch.reciprocal)
_simple("Exp", torch.exp)
_simple("Log", torch.log)
_simple("Floor", torch.floor)
_simple("Ceil", torch.ceil)
_simple("Round", torch.round, since=11)  # torch.round rounds halves to even, as ONNX does
_simple("Erf", torch.erf, since=9)
for _op, _fn in (
    ("Sin", torch.sin),
    ("Cos", torch.cos),
    ("Tan", torch.tan),
    ("Asin", torch.asin),
    ("Acos", torch.acos),
    ("Atan", torch.atan),
):
    _simple(_op, _fn, since=7)
for _op, _fn in (
    ("Sinh", torch.sinh),
    ("Cosh", torch.cosh),
    ("Asinh", torch.asinh),
    ("Acosh", torch.acosh),
    ("Atanh", torch.atanh),
):
    _simple(_op, _fn, since=9)


# ---- comparison and logic -----------------------------------------------------------------------
for _op, _fn, _since in (
    ("Equal", torch.eq, 1),
    ("Greater", torch.gt, 1),
    ("Less", torch.lt, 1),
    ("GreaterOrEqual", torch.ge, 12),
    ("LessOrEqual", torch.le, 12),
):
    _simple(_op, _binary(_fn, ordered=True, keep_dtype=False), since=_since)

_simple("Not", torch.logical_not)
_simple("And", torch.logical_and)
_simple("Or", torch.logical_or)
_simple("Xor", torch.logical_xor)
_simple("IsNaN", torch.isnan, since=9)


@register("IsInf", since=10)
def isinf(node: NodeContext):
    neg, pos = node.attr("detect_negative", 1), node.attr("detect_positive", 1)
    if neg and pos:
        return torch.isinf
    if pos:
        return torch.isposinf
    if neg:
        return torch.isneginf
    return lambda x: torch.zeros_like(x, dtype=torch.bool)


def _where(c, x, y):
    if x.dtype in _WIDE_UINT:
        return _drop(torch.where(c, _lift(x), _lift(y)), x.dtype)
    return torch.where(c, x, y)


_simple("Where", _where, since=9)


# ---- bitwise ------------------------------------------------------------------------------------
_simple("BitwiseAnd", _binary(torch.bitwise_and), since=18)
_simple("BitwiseOr", _binary(torch.bitwise_or), since=18)
_simple("BitwiseXor", _binary(torch.bitwise_xor), since=18)
_simple("BitwiseNot", _unary(torch.bitwise_not), since=18)


@register("BitShift", since=11)
def bitshift(node: NodeContext):
    left = node.attr("direction", "").upper() == "LEFT"

    def run(x, y):
        dt = x.dtype
        bits = dt.itemsize * 8
        xs, ys = _lift(x), _lift(y)
        oob = (ys < 0) | (ys >= bits)  # spec (opset 28): only the sign fill remains
        if left:
            r = torch.where(oob, 0, xs << ys.clamp(0, bits - 1))
        elif dt.is_signed:
            r = xs >> torch.where(oob, bits - 1, ys)  # arithmetic: -1 or 0 when out of range
        elif dt == torch.uint64:
            s = ys.clamp(0, bits - 1)
            logical = ((xs >> 1) & _I64_MAX) >> (s - 1).clamp(min=0)
            r = torch.where(oob, 0, torch.where(s == 0, xs, logical))
        else:
            r = torch.where(oob, 0, xs >> ys.clamp(0, bits - 1))
        return r if r.dtype == dt else _drop(r, dt)

    return run


# ---- types and copies ---------------------------------------------------------------------------
@register("Cast")
def cast(node: NodeContext):
    dt = torch_dtype(node.attr("to"), node.graph)  # raises NotImplementedError for string/float8/...
    return lambda x: x.to(dt)


@register("CastLike", since=15)
def cast_like(node: NodeContext):
    as_fp32 = node.graph.compute_float16_as_float32

    def run(x, like):
        dt = like.dtype
        if as_fp32 and dt == torch.float16:
            dt = torch.float32
        return x.to(dt)

    return run


_simple("Identity", lambda x: x)


# ---- Clip ---------------------------------------------------------------------------------------
def _clamp(x, lo, hi):
    if x.dtype in _WIDE_UINT:
        dt = x.dtype
        lo = None if lo is None else _lift(torch.as_tensor(lo, dtype=dt, device=x.device), True)
        hi = None if hi is None else _lift(torch.as_tensor(hi, dtype=dt, device=x.device), True)
        return _drop(torch.clamp(_lift(x, True), lo, hi), dt, True)
    r = torch.clamp(x, lo, hi)
    return r if r.dtype == x.dtype else r.to(x.dtype)


@register("Clip", since=1)
def clip_v6(node: NodeContext):
    lo, hi = node.attr("min"), node.attr("max")
    lo = None if lo is None or lo == -math.inf else lo
    hi = None if hi is None or hi == math.inf else hi
    if lo is None and hi is None:
        return lambda x: x
    return lambda x: torch.clamp(x, lo, hi)


@register("Clip", since=11)
def clip_v11(node: NodeContext):
    bounds = []
    for i in (1, 2):
        c = node.const(i) if node.has_input(i) else None
        bounds.append(None if c is None else c.reshape(-1)[0].item())
    const_lo = not node.has_input(1) or bounds[0] is not None
    const_hi = not node.has_input(2) or bounds[1] is not None
    if const_lo and const_hi:
        lo, hi = bounds
        if lo is None and hi is None:
            return lambda x, *_: x
        return lambda x, *_: _clamp(x, lo, hi)

    def run(x, lo=None, hi=None):
        lo = lo.reshape(()) if lo is not None else None
        hi = hi.reshape(()) if hi is not None else None
        if lo is None and hi is None:
            return x
        return _clamp(x, lo, hi)

    return run
