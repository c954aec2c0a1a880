"""Loss, quantization and miscellaneous ops (NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss,
QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, QLinearMatMul, QLinearConv, ConvInteger,
MatMulInteger, the Optional ops, BitCast, SwiGLU, TensorScatter and the random ops).

Each test builds a one-node model, runs it in onnxruntime (or, where onnxruntime refuses the case,
in ``onnx.reference.ReferenceEvaluator``) and in ``OnnxGraphModule``, and compares shape, dtype and
values (exactly for integer outputs); for differentiable ops it also checks that finite, non-zero
gradients reach the float inputs. Random ops are checked for shape, type, range, distribution and
the determinism of their ``seed`` attribute, not for values. A QDQ model made by onnxruntime's
``quantize_static`` checks QuantizeLinear -> DequantizeLinear end to end, gradients included.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from builders import DRAWS, check_op, compare_outputs, expect_unsupported, expected_outputs, one_node_model
from builders import module_outputs as _outputs
from onnx import TensorProto, helper, numpy_helper

from onnxadmm.importer.graph import OnnxGraphModule

_r = DRAWS.uniform


def _ints(*shape, low=0, high=256, dtype=np.uint8) -> np.ndarray:
    return DRAWS.rng.integers(low, high, shape).astype(dtype)


def _s(v, dtype=np.float32) -> np.ndarray:
    return np.array(v, dtype=dtype)


_model = one_node_model


def check(
    op, feeds, consts=None, attrs=None, opset=21, names=None, n_out=1, rtol=1e-5, atol=1e-6, grad=None,
    reference=False,
):  # fmt: skip
    """:func:`builders.check_op` on every output (opset 21 by default); the outputs."""
    return check_op(
        op, feeds, consts, attrs, opset=opset, names=names, n_out=n_out, rtol=rtol, atol=atol, grad=grad,
        reference=reference,
    )  # fmt: skip


_unsupported = expect_unsupported


# ---- NegativeLogLikelihoodLoss / SoftmaxCrossEntropyLoss ------------------------------------------
LOSS_SHAPES = {"2d": (8, 4), "4d": (3, 4, 2, 3)}


def _loss_case(shape_id, weighted, ignore):
    """Scores, targets (every class as often, shuffled) and optional weight; with ``ignore`` every
    third target equals ``ignore`` (several classes are still kept: the weights get gradients)."""
    shape = LOSS_SHAPES[shape_id]
    feeds = {"x": _r(*shape, low=-3, high=1)}
    tshape = (shape[0],) + shape[2:]
    t = DRAWS.rng.permutation(np.arange(np.prod(tshape)) % shape[1]).reshape(tshape).astype(np.int64)
    if ignore is not None:
        t.reshape(-1)[::3] = ignore
    feeds["t"] = t
    if weighted:
        feeds["w"] = _r(shape[1], low=0.2, high=2.0)
    return feeds


@pytest.mark.parametrize("opset", [13, 22])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignore", [None, 1, -7], ids=["noignore", "ignore1", "ignore-7"])
@pytest.mark.parametrize("shape_id", list(LOSS_SHAPES))
def test_nll_loss(opset, reduction, weighted, ignore, shape_id):
    """Every reduction, with and without weights, ignore_index inside and outside the classes; the
    weighted mean divides by the summed weights of the targets kept."""
    feeds = _loss_case(shape_id, weighted, ignore)
    attrs = {"reduction": reduction} | ({} if ignore is None else {"ignore_index": ignore})
    grad = ["x", "w"] if weighted else ["x"]
    check("NegativeLogLikelihoodLoss", feeds, attrs=attrs, opset=opset, grad=grad)


@pytest.mark.parametrize("opset", [12, 13])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignore", [None, 2], ids=["noignore", "ignore2"])
@pytest.mark.parametrize("shape_id", list(LOSS_SHAPES))
@pytest.mark.parametrize("log_prob", [False, True], ids=["loss", "loss+logprob"])
def test_softmax_cross_entropy_loss(opset, reduction, weighted, ignore, shape_id, log_prob):
    """As NegativeLogLikelihoodLoss on log_softmax(scores, axis 1); the optional second output is
    that log-softmax."""
    feeds = _loss_case(shape_id, weighted, ignore)
    attrs = {"reduction": reduction} | ({} if ignore is None else {"ignore_index": ignore})
    grad = ["x", "w"] if weighted else ["x"]
    out = check("SoftmaxCrossEntropyLoss", feeds, attrs=attrs, opset=opset, n_out=1 + log_prob, grad=grad)
    if log_prob:
        assert out[1].shape == feeds["x"].shape


def test_loss_mean_weighted_by_kept_targets():
    """The mean is sum(w[t] * loss) / sum(w[t]) over the targets kept, computed by hand."""
    x = _r(4, 3)
    t = np.array([0, 2, 1, 2], dtype=np.int64)
    w = np.array([0.5, 2.0, 3.0], dtype=np.float32)
    (got,) = check("NegativeLogLikelihoodLoss", {"x": x, "t": t, "w": w}, attrs={"ignore_index": 1})
    kept = [0, 1, 3]
    want = sum(-x[i, t[i]] * w[t[i]] for i in kept) / sum(w[t[i]] for i in kept)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_loss_int32_targets_and_float64():
    feeds = {"x": _r(3, 4, 2, dtype=np.float64), "t": DRAWS.rng.integers(0, 4, (3, 2)).astype(np.int32)}
    check("SoftmaxCrossEntropyLoss", feeds, opset=13, n_out=2, grad=["x"], rtol=1e-12, atol=1e-12)
    check("NegativeLogLikelihoodLoss", feeds, opset=13, grad=["x"], rtol=1e-12, atol=1e-12)


def test_loss_all_ignored_mean_is_nan():
    """A mean over no kept target is 0 / 0 = NaN (onnxruntime agrees)."""
    feeds = {"x": _r(3, 4), "t": np.full(3, 1, dtype=np.int64)}
    (out,) = check("SoftmaxCrossEntropyLoss", feeds, attrs={"ignore_index": 1}, opset=13)
    assert np.isnan(out)


def test_loss_refuses_unknown_reduction():
    feeds = {"x": _r(3, 4), "t": np.zeros(3, dtype=np.int64)}
    _unsupported("SoftmaxCrossEntropyLoss", feeds, {}, {"reduction": "max"}, 13, "reduction 'max'")


# ---- QuantizeLinear / DequantizeLinear -----------------------------------------------------------
NP_QTYPES = {"uint8": np.uint8, "int8": np.int8, "uint16": np.uint16, "int16": np.int16}


@pytest.mark.parametrize("opset", [10, 13, 19, 21, 23])
@pytest.mark.parametrize("qtype", ["uint8", "int8"])
def test_quantize_linear_per_tensor(opset, qtype):
    """Values reaching past both ends of the range (saturation), including exact ties x / scale =
    k + 0.5 (round half to even)."""
    dt = NP_QTYPES[qtype]
    zp = _s(100 if qtype == "uint8" else -20, dt)
    ties = np.arange(-6, 7, dtype=np.float32) * 0.25 + 0.125
    x = np.concatenate([_r(18, low=-40, high=40), _s([-80.0, 80.0]), ties]).reshape(3, 11)
    q = check("QuantizeLinear", {"x": x}, {"s": _s(0.25), "z": zp}, opset=opset)[0]
    assert q.min() == np.iinfo(dt).min and q.max() == np.iinfo(dt).max


def test_quantize_linear_round_half_to_even():
    """x / scale = -2.5 .. 2.5 in steps of 1: every value a tie."""
    x = np.arange(-2.5, 3.0, 1.0, dtype=np.float32)
    (q,) = check("QuantizeLinear", {"x": x}, {"s": _s(1.0), "z": _s(0, np.int8)}, opset=13)
    np.testing.assert_array_equal(q, [-2, -2, 0, 0, 2, 2])


def test_quantize_linear_default_uint8():
    """Without a zero point the output is uint8 with zero point 0."""
    check("QuantizeLinear", {"x": _r(4, 5, low=-10, high=300)}, {"s": _s(1.5)}, opset=13)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_quantize_linear_per_axis(axis):
    x = _r(3, 4, 5, low=-5, high=5)
    n = x.shape[axis]
    consts = {"s": _r(n, low=0.02, high=0.1), "z": _ints(n, low=-10, high=10, dtype=np.int8)}
    check("QuantizeLinear", {"x": x}, consts, {"axis": axis}, opset=13)


@pytest.mark.parametrize("qtype", ["int16", "uint16"])
def test_quantize_linear_16bit(qtype):
    dt = NP_QTYPES[qtype]
    zp = _s(1000 if qtype == "uint16" else -300, dt)
    check("QuantizeLinear", {"x": _r(6, 7, low=-5000, high=70000)}, {"s": _s(0.5), "z": zp}, opset=21)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("block", [2, 3])
def test_quantize_linear_blocked(axis, block):
    """Blocked scales of ceil(D / block) along ``axis`` (D = 5 or 6: the last block shorter)."""
    x = _r(5, 6, low=-4, high=4)
    sshape = list(x.shape)
    sshape[axis] = -(-x.shape[axis] // block)
    consts = {"s": _r(*sshape, low=0.02, high=0.1), "z": _ints(*sshape, low=-5, high=5, dtype=np.int8)}
    attrs = {"axis": axis, "block_size": block}
    check("QuantizeLinear", {"x": x}, consts, attrs, opset=21)


def test_quantize_linear_output_dtype():
    """output_dtype (21+) sets the type when there is no zero point."""
    attrs = {"output_dtype": TensorProto.INT8}
    (q,) = check("QuantizeLinear", {"x": _r(4, 4, low=-300, high=300)}, {"s": _s(2.0)}, attrs, opset=21)
    assert q.dtype == np.int8


def test_quantize_linear_scale_input():
    """A scale and zero point given as graph inputs (read at run time)."""
    feeds = {"x": _r(3, 4, low=-100, high=100), "s": _s(0.7), "z": _s(3, np.int8)}
    check("QuantizeLinear", feeds, opset=19)


def test_quantize_linear_int32_input():
    """An int32 input divided by a float scale (opset 23 types them apart; onnxruntime refuses
    the pair: compared with the reference evaluator)."""
    x = _ints(3, 4, low=-1000, high=1000, dtype=np.int32)
    check("QuantizeLinear", {"x": x}, {"s": _s(7.0), "z": _s(3, np.int8)}, opset=23, reference=True)


@pytest.mark.parametrize("to", ["INT4", "UINT4", "FLOAT8E4M3FN"])
def test_quantize_linear_refuses_types_torch_lacks(to):
    """An output_dtype with no torch dtype is refused at import, naming the type."""
    attrs = {"output_dtype": getattr(TensorProto, to)}
    _unsupported("QuantizeLinear", {"x": _r(2, 4)}, {"s": _s(1.0)}, attrs, 21, f"output type {to} ")


@pytest.mark.parametrize("opset", [10, 13, 19, 21, 23])
@pytest.mark.parametrize("qtype", ["uint8", "int8"])
def test_dequantize_linear_per_tensor(opset, qtype):
    dt = NP_QTYPES[qtype]
    x = _ints(3, 5, low=np.iinfo(dt).min, high=np.iinfo(dt).max + 1, dtype=dt)
    check("DequantizeLinear", {"x": x}, {"s": _s(0.037), "z": _s(7, dt)}, opset=opset)
    check("DequantizeLinear", {"x": x}, {"s": _s(0.037)}, opset=opset)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_dequantize_linear_per_axis(axis):
    x = _ints(3, 4, 5, low=-128, high=128, dtype=np.int8)
    n = x.shape[axis]
    consts = {"s": _r(n, low=0.01, high=0.2), "z": _ints(n, low=-10, high=10, dtype=np.int8)}
    check("DequantizeLinear", {"x": x}, consts, {"axis": axis}, opset=13)


@pytest.mark.parametrize("qtype", ["int16", "uint16"])
def test_dequantize_linear_16bit(qtype):
    dt = NP_QTYPES[qtype]
    x = _ints(4, 6, low=np.iinfo(dt).min, high=np.iinfo(dt).max + 1, dtype=dt)
    check("DequantizeLinear", {"x": x}, {"s": _s(0.01), "z": _s(12, dt)}, opset=21)


def test_dequantize_linear_int32():
    """An int32 input (a bias), per output channel, without zero point."""
    x = _ints(6, low=-(2**20), high=2**20, dtype=np.int32)
    check("DequantizeLinear", {"x": x}, {"s": _r(6, low=1e-4, high=1e-3)}, {"axis": 0}, opset=13)


@pytest.mark.parametrize("axis", [0, 1])
def test_dequantize_linear_blocked(axis):
    x = _ints(5, 6, low=-128, high=128, dtype=np.int8)
    sshape = list(x.shape)
    sshape[axis] = -(-x.shape[axis] // 2)
    consts = {"s": _r(*sshape, low=0.01, high=0.1), "z": _ints(*sshape, low=-5, high=5, dtype=np.int8)}
    check("DequantizeLinear", {"x": x}, consts, {"axis": axis, "block_size": 2}, opset=21)


def test_dequantize_linear_output_dtype():
    """output_dtype (23+) sets the output type (here float16 from a float32 scale)."""
    x = _ints(3, 4, low=-128, high=128, dtype=np.int8)
    attrs = {"output_dtype": TensorProto.FLOAT16}
    (y,) = check("DequantizeLinear", {"x": x}, {"s": _s(0.1)}, attrs, opset=23, rtol=1e-3)
    assert y.dtype == np.float16


def test_quantize_dequantize_float16():
    """float16 input and scale: the model computes in float32 (the project's float16 convention);
    QuantizeLinear matches onnxruntime exactly, DequantizeLinear within float16 rounding (its
    float32 result is onnxruntime's before the cast to float16)."""
    x = _r(400, low=-30, high=30, dtype=np.float16)
    consts = {"s": _s(0.0731, np.float16), "z": _s(3, np.int8)}
    check("QuantizeLinear", {"x": x}, consts, opset=19)
    q = _ints(50, low=-128, high=128, dtype=np.int8)
    model = one_node_model("DequantizeLinear", {"q": q}, consts, {}, 19)
    (want,) = expected_outputs(model, {"q": q})
    got = OnnxGraphModule(model)(torch.from_numpy(q)).numpy()
    assert want.dtype == np.float16 and got.dtype == np.float32
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=2**-11, atol=0)


def _qdq_model(opset=13, axis=None, n=None) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> y, the scale a graph input."""
    shape = [3, n or 4]
    s_shape = [n] if n else []
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, s_shape),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(np.zeros(s_shape, np.int8) + 3, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def test_qdq_straight_through_gradient():
    """Q -> DQ: the value is onnxruntime's; d y / d x is 1 inside the int8 range and 0 where x
    saturates; a scale that requires grad gets LSQ's gradient (round(x/s) - x/s inside the range,
    qmin - z or qmax - z outside)."""
    x = np.concatenate([_r(10, low=-10, high=10), _s([-40.0, 30.0])]).reshape(3, 4)
    s = _s(0.1)
    model = _qdq_model()
    (want,) = expected_outputs(model, {"x": x, "s": s})
    m = OnnxGraphModule(model)
    xt, st = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(s).requires_grad_(True)
    y = m(xt, st)
    np.testing.assert_array_equal(y.detach().numpy(), want)
    y.sum().backward()
    v = x / s + 3
    inside = (v >= -128) & (v <= 127)
    np.testing.assert_array_equal(xt.grad.numpy(), inside.astype(np.float32))
    lsq = np.where(inside, np.round(x / s) - x / s, np.where(v < -128, -128 - 3, 127 - 3))
    np.testing.assert_allclose(st.grad.numpy(), lsq.sum(), rtol=1e-4)


def test_qdq_per_axis_gradient_and_no_grad():
    """Per-axis Q -> DQ passes the gradient per channel; under no_grad no estimator is attached."""
    x, s = _r(3, 5, low=-2, high=2), _r(5, low=0.01, high=0.05)
    model = _qdq_model(axis=1, n=5)
    (want,) = expected_outputs(model, {"x": x, "s": s})
    m = OnnxGraphModule(model)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = m(xt, torch.from_numpy(s))
    np.testing.assert_array_equal(y.detach().numpy(), want)
    y.sum().backward()
    inside = np.abs(x / s + 3) <= 127
    np.testing.assert_array_equal(xt.grad.numpy(), inside.astype(np.float32))
    with torch.no_grad():
        assert not m(xt, torch.from_numpy(s)).requires_grad


def test_quantize_linear_output_has_no_gradient():
    """The integer output itself carries no gradient (only the attached estimator does)."""
    m = OnnxGraphModule(one_node_model("QuantizeLinear", {"x": _r(2, 3)}, {"s": _s(0.1)}, {}, 13))
    q = m(torch.from_numpy(_r(2, 3)).requires_grad_(True))
    assert q.dtype == torch.uint8 and not q.requires_grad


# ---- DynamicQuantizeLinear -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mixed", "positive", "negative", "zeros", "ties"], ids=lambda k: k)
def test_dynamic_quantize_linear(kind):
    """(y, scale, zero point): the range widened to include 0; all zeros give scale 1."""
    x = {
        "mixed": _r(4, 6, low=-3, high=5),
        "positive": _r(4, 6, low=0.5, high=2),
        "negative": _r(4, 6, low=-7, high=-1),
        "zeros": np.zeros((3, 4), np.float32),
        "ties": np.array([0.0, 255.0, 0.5, 1.5, 2.5, 100.5], np.float32),
    }[kind]
    out = check("DynamicQuantizeLinear", {"x": x}, n_out=3, opset=11)
    assert out[0].dtype == np.uint8 and out[2].dtype == np.uint8 and out[1].dtype == np.float32


def test_dynamic_quantize_then_dequantize_gradient():
    """DynamicQuantizeLinear -> DequantizeLinear carries the estimator: x gets a gradient."""
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    x = _r(4, 5, low=-2, high=3)
    (want,) = expected_outputs(model, {"x": x})
    xt = torch.from_numpy(x).requires_grad_(True)
    y = OnnxGraphModule(model)(xt)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-6, atol=1e-7)
    (y * torch.from_numpy(_r(4, 5))).sum().backward()
    assert torch.isfinite(xt.grad).all() and xt.grad.abs().sum() > 0


# ---- QLinearMatMul / MatMulInteger ---------------------------------------------------------------
@pytest.mark.parametrize("opset", [10, 21])
@pytest.mark.parametrize("types", ["u8u8u8", "u8i8u8", "i8i8i8"])
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "3d"])
def test_qlinear_matmul(opset, types, batched):
    ta, tb, ty = (np.uint8 if t == "u8" else np.int8 for t in (types[:2], types[2:4], types[4:]))
    a_shape = (2, 3, 4) if batched else (3, 4)

    def q(shape, dt):
        i = np.iinfo(dt)
        return _ints(*shape, low=i.min, high=i.max + 1, dtype=dt)

    feeds = {"a": q(a_shape, ta), "b": q((4, 5), tb)}
    consts = {
        "as": _s(0.02),
        "az": _s(5, ta),
        "bs": _s(0.03),
        "bz": _s(3, tb),
        "ys": _s(0.05),
        "yz": _s(10, ty),
    }
    names = ["a", "as", "az", "b", "bs", "bz", "ys", "yz"]
    check("QLinearMatMul", feeds, consts, opset=opset, names=names)


def test_qlinear_matmul_per_column_b():
    """A 1-D b_scale / b_zero_point of N values applies per column of b."""
    feeds = {"a": _ints(3, 4), "b": _ints(4, 5, low=-128, high=128, dtype=np.int8)}
    consts = {
        "as": _s(0.02),
        "az": _s(128, np.uint8),
        "bs": _r(5, low=0.01, high=0.05),
        "bz": np.zeros(5, np.int8),
        "ys": _s(0.2),
        "yz": _s(120, np.uint8),
    }
    names = ["a", "as", "az", "b", "bs", "bz", "ys", "yz"]
    check("QLinearMatMul", feeds, consts, opset=10, names=names)


def test_matmul_integer():
    """MatMulInteger (registered in linear.py): int32 result; a per-row a zero point (onnxruntime and
    the reference evaluator both refuse it: compared with numpy)."""
    a, b = _ints(3, 4), _ints(4, 2, low=-128, high=128, dtype=np.int8)
    check("MatMulInteger", {"a": a, "b": b}, {"az": _s(12, np.uint8), "bz": _s(-3, np.int8)}, opset=10)
    az = _ints(3)
    m = OnnxGraphModule(one_node_model("MatMulInteger", {"a": a, "b": b}, {"az": az}, {}, 10))
    y = m(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, (a.astype(np.int64) - az[:, None]) @ b.astype(np.int64))


# ---- QLinearConv / ConvInteger -------------------------------------------------------------------
QCONV_ATTRS = {
    "plain": {},
    "pads_strides": {"pads": [1, 0, 2, 1], "strides": [2, 1]},
    "dilations_group": {"dilations": [2, 1], "group": 2, "pads": [1, 1, 1, 1]},
    "same_upper": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
}


@pytest.mark.parametrize("variant", list(QCONV_ATTRS))
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_qlinear_conv(variant, per_channel, bias):
    """uint8 activations and output, int8 weights (per output channel or per tensor), int32 bias;
    padding counts as the input zero point."""
    attrs = QCONV_ATTRS[variant]
    group = attrs.get("group", 1)
    x = _ints(2, 4, 6, 7)
    w = _ints(6, 4 // group, 3, 3, low=-128, high=128, dtype=np.int8)
    consts = {
        "xs": _s(0.05),
        "xz": _s(120, np.uint8),
        "ws": _r(6, low=0.002, high=0.01) if per_channel else _s(0.005),
        "wz": np.zeros(6, np.int8) if per_channel else _s(0, np.int8),
        "ys": _s(0.4),
        "yz": _s(100, np.uint8),
    }
    names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    if bias:
        consts["b"] = _ints(6, low=-5000, high=5000, dtype=np.int32)
        names.append("b")
    check("QLinearConv", {"x": x, "w": w}, consts, attrs, opset=10, names=names)


def test_qlinear_conv_int8_activations_1d():
    """int8 activations and output, a 1-D convolution."""
    x = _ints(1, 3, 9, low=-128, high=128, dtype=np.int8)
    w = _ints(2, 3, 3, low=-128, high=128, dtype=np.int8)
    consts = {
        "xs": _s(0.05),
        "xz": _s(-4, np.int8),
        "ws": _s(0.01),
        "wz": _s(0, np.int8),
        "ys": _s(0.3),
        "yz": _s(5, np.int8),
    }
    names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    check("QLinearConv", {"x": x, "w": w}, consts, {"pads": [1, 1]}, opset=10, names=names)


@pytest.mark.parametrize("variant", ["plain", "pads_strides", "dilations_group"])
@pytest.mark.parametrize("wtype", ["uint8", "int8"])
def test_conv_integer(variant, wtype):
    attrs = QCONV_ATTRS[variant]
    group = attrs.get("group", 1)
    dt = NP_QTYPES[wtype]
    i = np.iinfo(dt)
    x = _ints(2, 4, 5, 6)
    w = _ints(4, 4 // group, 2, 3, low=i.min, high=i.max + 1, dtype=dt)
    consts = {"xz": _s(17, np.uint8), "wz": _s(3, dt)}
    (y,) = check("ConvInteger", {"x": x, "w": w}, consts, attrs, opset=10)
    assert y.dtype == np.int32


def test_conv_integer_without_zero_points():
    check("ConvInteger", {"x": _ints(1, 2, 4, 4), "w": _ints(3, 2, 2, 2)}, opset=10)


# ---- a QDQ model from quantize_static ------------------------------------------------------------
def _float_conv_gemm_model() -> onnx.ModelProto:
    """x [N, 2, 6, 6] -> Conv(4, 3x3, pad 1) -> Relu -> Flatten -> Gemm(5)."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.4, (4, 2, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 4).astype(np.float32)
    w2 = rng.normal(0, 0.1, (5, 144)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "convgemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in dict(w1=w1, b1=b1, w2=w2, b2=b2).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_quantize_static_qdq_model(tmp_path):
    """A QDQ model by onnxruntime's quantize_static (uint8 activations, int8 weights): the imported
    graph matches onnxruntime within one output quantization step, and gradients reach the input."""
    from onnxruntime import quantization as oq

    rng = np.random.default_rng(2)
    calib = [rng.normal(0, 1, (4, 2, 6, 6)).astype(np.float32) for _ in range(4)]

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x}

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_float_conv_gemm_model(), src)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        oq.quantize_static(
            str(src), str(dst), Reader(), quant_format=oq.QuantFormat.QDQ, weight_type=oq.QuantType.QInt8
        )
    finally:
        root.setLevel(level)
    model = onnx.load(dst)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    out_dq = next(n for n in model.graph.node if n.output[0] == "y")
    assert out_dq.op_type == "DequantizeLinear"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    step = float(inits[out_dq.input[1]])

    x = rng.normal(0, 1, (3, 2, 6, 6)).astype(np.float32)
    (want,) = expected_outputs(model, {"x": x})
    m = OnnxGraphModule(model)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = m(xt)
    got = y.detach().numpy()
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.abs(got - want).max() <= step * 1.001, (np.abs(got - want).max(), step)
    (y * torch.from_numpy(rng.normal(size=want.shape).astype(np.float32))).sum().backward()
    assert torch.isfinite(xt.grad).all() and xt.grad.abs().sum() > 0


# ---- Optional ------------------------------------------------------------------------------------
def _graph_model(nodes, inputs, outputs, opset) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outputs]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _check_graph(model, feeds, grad=None):
    """Every output as onnxruntime's (sequences element by element, None as None)."""
    want = expected_outputs(model, feeds)
    xs = {k: torch.from_numpy(v.copy()) for k, v in feeds.items()}
    for k in grad or ():
        xs[k].requires_grad_(True)
    got = _outputs(OnnxGraphModule(model)(*xs.values()))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        elif isinstance(w, list):
            assert isinstance(g, list) and len(g) == len(w)
            compare_outputs(g, w, 0, 0)
        else:
            compare_outputs([g], [w], 0, 0)
    if grad:
        sum(g.sum() for g in got if isinstance(g, torch.Tensor) and g.is_floating_point()).backward()
        for k in grad:
            assert xs[k].grad is not None and xs[k].grad.abs().sum() > 0, k
    return got


@pytest.mark.parametrize("opset", [15, 18])
def test_optional_tensor(opset):
    """Optional(x) holds x: HasElement is true, GetElement returns x (gradient passes)."""
    nodes = [
        helper.make_node("Optional", ["x"], ["o"]),
        helper.make_node("OptionalHasElement", ["o"], ["has"]),
        helper.make_node("OptionalGetElement", ["o"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
    got = _check_graph(_graph_model(nodes, inputs, ["has", "y"], opset), {"x": _r(2, 3)}, grad=["x"])
    assert got[0].dtype == torch.bool and got[0].shape == ()


def test_optional_empty():
    """Optional without input (its type as the attribute) is empty: HasElement is false, and the
    empty optional itself is returned as None."""
    tp = helper.make_tensor_type_proto(TensorProto.FLOAT, [2])
    nodes = [
        helper.make_node("Optional", [], ["o"], type=tp),
        helper.make_node("OptionalHasElement", ["o"], ["has"]),
        helper.make_node("Identity", ["x"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])]
    model = _graph_model(nodes, inputs, ["has", "y"], 15)
    got = _check_graph(model, {"x": _r(2)})
    assert not got[0].item()
    model = _graph_model(nodes[:1], [], ["o"], 15)
    model.graph.output[0].type.CopyFrom(helper.make_optional_type_proto(tp))
    assert OnnxGraphModule(model)() is None


def test_optional_sequence():
    """An optional holding a sequence: GetElement returns the TensorSequence."""
    nodes = [
        helper.make_node("SequenceConstruct", ["a", "b"], ["s"]),
        helper.make_node("Optional", ["s"], ["o"]),
        helper.make_node("OptionalHasElement", ["o"], ["has"]),
        helper.make_node("OptionalGetElement", ["o"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.INT64, [2]),
        helper.make_tensor_value_info("b", TensorProto.INT64, [3]),
    ]
    feeds = {"a": np.array([1, 2], np.int64), "b": np.array([3, 4, 5], np.int64)}
    got = _check_graph(_graph_model(nodes, inputs, ["has", "y"], 15), feeds)
    assert type(got[1]).__name__ == "TensorSequence"


def test_optional_18_plain_tensor_and_missing_input():
    """Opset 18: HasElement and GetElement also take a plain tensor; HasElement without its input
    is false."""
    nodes = [
        helper.make_node("OptionalHasElement", ["x"], ["has"]),
        helper.make_node("OptionalHasElement", [""], ["none"]),
        helper.make_node("OptionalGetElement", ["x"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.INT32, [3])]
    got = _check_graph(_graph_model(nodes, inputs, ["has", "none", "y"], 18), {"x": _ints(3, dtype=np.int32)})
    assert got[0].item() and not got[1].item()


def test_optional_get_element_of_empty_fails():
    tp = helper.make_tensor_type_proto(TensorProto.FLOAT, [2])
    nodes = [
        helper.make_node("Optional", [], ["o"], type=tp),
        helper.make_node("OptionalGetElement", ["o"], ["y"]),
    ]
    with pytest.raises(ValueError, match="empty"):
        OnnxGraphModule(_graph_model(nodes, [], ["y"], 15))()


# ---- BitCast -------------------------------------------------------------------------------------
BITCASTS = [
    (np.float32, TensorProto.INT32),
    (np.int32, TensorProto.FLOAT),
    (np.float32, TensorProto.UINT32),
    (np.float64, TensorProto.INT64),
    (np.int64, TensorProto.UINT64),
    (np.int16, TensorProto.FLOAT16),
    (np.float16, TensorProto.UINT16),
    (np.uint8, TensorProto.INT8),
    (np.int8, TensorProto.UINT8),
]


@pytest.mark.parametrize("src,to", BITCASTS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_bit_cast(src, to):
    """Same-width reinterpretations (onnxruntime 1.32 runs BitCast-26)."""
    raw = DRAWS.rng.integers(0, 256, 32, dtype=np.uint8)
    x = raw.view(src)
    if x.dtype.kind == "f":  # no NaN payloads: their bits need not survive a float round trip
        x = np.where(np.isfinite(x), x, 0).astype(src)
    x = x.reshape(2, -1)
    check("BitCast", {"x": x}, attrs={"to": to}, opset=26, rtol=0, atol=0)


def test_bit_cast_refuses_other_widths_and_types():
    _unsupported("BitCast", {"x": _r(3)}, {}, {"to": TensorProto.COMPLEX64}, 26, "COMPLEX64")
    m = OnnxGraphModule(one_node_model("BitCast", {"x": _r(3)}, {}, {"to": TensorProto.INT16}, 26))
    with pytest.raises(ValueError, match="widths differ"):
        m(torch.from_numpy(_r(3)))


# ---- SwiGLU --------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [None, 1.702])
def test_swiglu(alpha):
    """SwiGLU-28 (onnxruntime 1.32 refuses opset 28: compared with the reference evaluator)."""
    attrs = {} if alpha is None else {"alpha": alpha}
    feeds = {"a": _r(3, 8, low=-4, high=4), "b": _r(3, 8)}
    check("SwiGLU", feeds, attrs=attrs, opset=28, reference=True, grad=["a", "b"])


# ---- TensorScatter -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,axis,indices",
    [
        ("linear", -2, None),
        ("linear", -2, [0, 3]),
        ("linear", 2, [1, 0]),
        ("circular", -2, [5, 2]),
        ("circular", 1, [5, 1]),
    ],
)
def test_tensor_scatter(mode, axis, indices):
    """Cache [2, 3, 6, 4], update of 2 positions along ``axis`` written from the batch entries'
    indices (0 without them), wrapped in circular mode."""
    past = _r(2, 3, 6, 4)
    a = axis % 4
    ushape = list(past.shape)
    ushape[a] = 2
    feeds = {"past": past, "update": _r(*ushape)}
    names = ["past", "update"]
    if indices is not None:
        feeds["idx"] = np.array(indices, np.int64)
        names.append("idx")
    attrs = {"mode": mode, "axis": axis}
    check("TensorScatter", feeds, attrs=attrs, opset=24, names=names, grad=["past", "update"])


def test_tensor_scatter_linear_overflow_fails():
    feeds = {"past": _r(1, 4, 2), "update": _r(1, 2, 2), "idx": np.array([3], np.int64)}
    m = OnnxGraphModule(one_node_model("TensorScatter", feeds, {}, {"axis": 1}, 24))
    with pytest.raises(ValueError, match="cache length"):
        m(*(torch.from_numpy(v) for v in feeds.values()))


# ---- random ops ----------------------------------------------------------------------------------
def _random_outputs(op, x, attrs, opset, runs=2, want_dtype=None):
    """``runs`` outputs of one imported module, of onnxruntime's shape and type (``want_dtype``:
    that type, where onnxruntime refuses the case)."""
    model = one_node_model(op, {"x": x}, {}, attrs, opset)
    if want_dtype is None:
        (want,) = expected_outputs(model, {"x": x})
        want_shape, want_dtype = want.shape, want.dtype
    else:
        want_shape = x.shape
    m = OnnxGraphModule(model)
    got = [m(torch.from_numpy(x)).numpy() for _ in range(runs)]
    for g in got:
        assert g.shape == want_shape and g.dtype == want_dtype, (g.shape, g.dtype, want_shape, want_dtype)
    return model, got


@pytest.mark.parametrize("dtype", [None, TensorProto.DOUBLE, TensorProto.INT32, TensorProto.BOOL], ids=str)
def test_bernoulli(dtype):
    """0 / 1 draws of the input's shape with frequency p; p = 0 and 1 are exact."""
    p = np.concatenate([np.zeros(50), np.ones(50), np.full(1900, 0.3)]).astype(np.float32)
    attrs = {} if dtype is None else {"dtype": dtype}
    _, (y, _) = _random_outputs("Bernoulli", p.reshape(20, 100), attrs, 15)
    y = y.reshape(-1).astype(np.float64)
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert (y[:50] == 0).all() and (y[50:100] == 1).all()
    assert abs(y[100:].mean() - 0.3) < 0.05


def _seeded(op, x, attrs, opset):
    """With a seed: two imports draw the same sequence, one import's successive calls differ."""
    model, (a1, a2) = _random_outputs(op, x, attrs | {"seed": 3.0}, opset)
    m = OnnxGraphModule(model)
    b1, b2 = (m(torch.from_numpy(x)).numpy() for _ in range(2))
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, a2)
    other = OnnxGraphModule(one_node_model(op, {"x": x}, {}, attrs | {"seed": 4.0}, opset))
    assert not np.array_equal(other(torch.from_numpy(x)).numpy(), a1)


def test_random_seeds():
    _seeded("Bernoulli", np.full((8, 8), 0.5, np.float32), {}, 15)
    _seeded("RandomUniformLike", _r(8, 8), {}, 1)
    _seeded("RandomNormalLike", _r(8, 8), {}, 1)


@pytest.mark.parametrize("dtype", [None, TensorProto.DOUBLE, TensorProto.FLOAT16], ids=str)
def test_random_uniform_like(dtype):
    """Draws in [low, high) of the input's shape, as ``dtype`` (default the input's type;
    onnxruntime has no float16 kernel: that type is checked alone)."""
    attrs = {"low": -2.0, "high": 3.0} | ({} if dtype is None else {"dtype": dtype})
    want = np.float16 if dtype == TensorProto.FLOAT16 else None
    _, (y, _) = _random_outputs("RandomUniformLike", _r(40, 50), attrs, 1, want_dtype=want)
    assert y.min() >= -2.0 and y.max() <= 3.0
    assert abs(y.astype(np.float64).mean() - 0.5) < 0.1


def test_random_uniform_like_integer_input_with_dtype():
    """An int32 input only lends its shape; without dtype a float output type is required."""
    x = _ints(3, 4, dtype=np.int32)
    _random_outputs("RandomUniformLike", x, {"dtype": TensorProto.FLOAT}, 1)
    m = OnnxGraphModule(one_node_model("RandomUniformLike", {"x": x}, {}, {}, 1))
    with pytest.raises(ValueError, match="not a float type"):
        m(torch.from_numpy(x))


@pytest.mark.parametrize("dtype", [None, TensorProto.DOUBLE], ids=str)
def test_random_normal_like(dtype):
    attrs = {"mean": 1.5, "scale": 0.5} | ({} if dtype is None else {"dtype": dtype})
    _, (y, _) = _random_outputs("RandomNormalLike", _r(50, 40), attrs, 1)
    y = y.astype(np.float64)
    assert abs(y.mean() - 1.5) < 0.05 and abs(y.std() - 0.5) < 0.05
