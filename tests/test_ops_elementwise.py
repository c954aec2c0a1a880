"""Elementwise and activation ops: onnx node test cases, onnxruntime comparisons, gradient flow."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxadmm.errors import UnsupportedModelError
from onnxadmm.importer.graph import OnnxGraphModule
from onnxadmm.importer.registry import ONNX_TO_TORCH_DTYPE, registered_ops

ELEMENTWISE_OPS = set(
    "Add Sub Mul Div Pow Neg Abs Sqrt Reciprocal Exp Log Floor Ceil Round Sign Erf Sin Cos Tan Asin Acos "
    "Atan Sinh Cosh Asinh Acosh Atanh Min Max Sum Mean Mod BitShift Equal Greater GreaterOrEqual Less "
    "LessOrEqual Not And Or Xor Where IsNaN IsInf Cast CastLike Identity Clip BitwiseAnd BitwiseOr "
    "BitwiseXor BitwiseNot".split()
)
ACTIVATION_OPS = set(
    "Relu LeakyRelu PRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign "
    "ThresholdedRelu Gelu Mish Softmax LogSoftmax Hardmax Dropout Shrink Swish".split()
)
OURS = ELEMENTWISE_OPS | ACTIVATION_OPS


def _collect():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    picked = []
    for c in cases:
        if c.model is None:
            continue
        ops = {n.op_type for n in c.model.graph.node}
        if ops & OURS and ops <= OURS | {"Constant"}:
            picked.append(c)
    return picked


CASES = _collect()


def test_all_ops_registered():
    have = {op for (dom, op) in registered_ops() if dom == ""}
    assert OURS <= have, sorted(OURS - have)


# ---- onnx node test cases -----------------------------------------------------------------------
def _np(a) -> np.ndarray:
    return numpy_helper.to_array(a) if isinstance(a, TensorProto) else np.asarray(a)


def _to_torch(a) -> torch.Tensor:
    a = _np(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _from_torch(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _value_types(model: onnx.ModelProto) -> list[int]:
    g = model.graph
    types = [vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output)]
    for n in g.node:
        for a in n.attribute:
            if a.name == "to":
                types.append(a.i)
    return types


def _is_tensor_graph(model: onnx.ModelProto) -> bool:
    g = model.graph
    return all(vi.type.HasField("tensor_type") for vi in list(g.input) + list(g.output))


def _assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float, atol: float, fp16_as_fp32: bool):
    e = _np(expected)
    a = _from_torch(actual)
    assert a.shape == e.shape
    if e.dtype.name == "bfloat16":
        e = e.astype(np.float32)
    ok_dtype = a.dtype == e.dtype or (fp16_as_fp32 and e.dtype == np.float16 and a.dtype == np.float32)
    assert ok_dtype, f"dtype {a.dtype} != {e.dtype}"
    if e.dtype == np.bool_ or np.issubdtype(e.dtype, np.integer):
        np.testing.assert_array_equal(a, e)
    else:
        np.testing.assert_allclose(
            a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True
        )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_node_case(case):
    model = case.model
    if not _is_tensor_graph(model):
        pytest.skip("sequence/optional values are not tensors")
    if any(t not in ONNX_TO_TORCH_DTYPE for t in _value_types(model)):
        # string / float8 / 4-bit / 2-bit types: refused at import, never silently wrong
        with pytest.raises((UnsupportedModelError, NotImplementedError)):
            OnnxGraphModule(model)
        return
    m = OnnxGraphModule(model)
    for inputs, outputs in case.data_sets:
        feeds = {vi.name: _to_torch(x) for vi, x in zip(model.graph.input, inputs)}
        res = m(**{k: v for k, v in feeds.items() if k in m.input_names})  # unused inputs are pruned
        res = res if isinstance(res, tuple) else (res,)
        assert len(res) == len(outputs)
        if case.name.startswith("test_training_dropout") and "zero_ratio" not in case.name:
            _check_random_dropout(inputs, res)
            continue
        for a, e in zip(res, outputs):
            _assert_close(a, e, case.rtol, case.atol, m.ctx.compute_float16_as_float32)


def _check_random_dropout(inputs, res):
    """Random masks cannot match numpy's; check the structure: y = x * mask / (1 - ratio)."""
    x, ratio = _to_torch(inputs[0]), float(_np(inputs[1]))
    y = res[0]
    mask = res[1] if len(res) > 1 else y != 0
    assert mask.dtype == torch.bool
    torch.testing.assert_close(y, x * mask / (1 - ratio))
    assert 0.0 < mask.float().mean().item() < 1.0


# ---- onnxruntime comparisons --------------------------------------------------------------------
_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def _single_node_model(op, feeds, consts, attrs, opset, n_out=1, input_names=None):
    """One-node model; ``feeds`` become graph inputs, ``consts`` initializers (None = omitted input)."""
    names = input_names or list(feeds) + list(consts)
    inputs = [helper.make_tensor_value_info(k, _NP_TO_ONNX[v.dtype], None) for k, v in feeds.items()]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items() if v is not None]
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(
        op, [n if (n in feeds or consts.get(n) is not None) else "" for n in names], outs, **attrs
    )
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outs], initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _compare_ort(
    op, feeds, consts=None, attrs=None, opset=17, n_out=1, input_names=None, rtol=1e-5, atol=1e-6
):
    consts = consts or {}
    model = _single_node_model(op, feeds, consts, attrs or {}, opset, n_out, input_names)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, feeds)
    got = OnnxGraphModule(model)(*[torch.from_numpy(v.copy()) for v in feeds.values()])
    got = got if isinstance(got, tuple) else (got,)
    for g, e in zip(got, expected):
        g = _from_torch(g)
        assert g.dtype == e.dtype and g.shape == e.shape, (g.dtype, e.dtype, g.shape, e.shape)
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


RNG = np.random.default_rng(0)
X4 = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1, -3])
def test_softmax_family_vs_ort(op, axis, opset):
    attrs = {} if axis is None else {"axis": axis}
    _compare_ort(op, {"x": X4}, attrs=attrs, opset=opset)


def test_softmax_opset11_coerces_to_2d():
    model = _single_node_model("Softmax", {"x": X4}, {}, {"axis": 1}, 11)
    y = OnnxGraphModule(model)(torch.from_numpy(X4))
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), torch.ones(2))  # not per-axis


@pytest.mark.parametrize("opset", [11, 17])
def test_arithmetic_vs_ort(opset):
    a = RNG.integers(-20, 20, (3, 4)).astype(np.int64)
    b = RNG.integers(1, 7, (4,)).astype(np.int64) * np.array([1, -1, 1, -1])
    for op in ("Add", "Sub", "Mul", "Div", "Mod"):
        _compare_ort(op, {"a": a, "b": b}, opset=opset)
        _compare_ort(op, {"a": a.astype(np.int32), "b": b.astype(np.int32)}, opset=opset)
    _compare_ort("Mod", {"a": a, "b": b}, attrs={"fmod": 1}, opset=opset)
    fa, fb = RNG.standard_normal((3, 4)).astype(np.float32), RNG.uniform(0.5, 2, (4,)).astype(np.float32)
    _compare_ort("Mod", {"a": fa, "b": fb}, attrs={"fmod": 1}, opset=opset)
    for op in ("Div", "Pow"):
        _compare_ort(op, {"a": np.abs(fa), "b": fb}, opset=opset)
    if opset >= 12:  # integer and mixed base/exponent types
        _compare_ort("Pow", {"a": np.abs(a), "b": np.array([2, 3, 0, 1], np.int64)}, opset=opset)
        _compare_ort("Pow", {"a": fa, "b": np.array([2, 3, 0, 1], np.int64)}, opset=opset)
        _compare_ort("Pow", {"a": a.astype(np.int32), "b": fb}, opset=opset)
    for op in ("Max", "Min", "Sum", "Mean"):
        feeds = {"a": fa, "b": fb, "c": RNG.standard_normal((2, 1, 1)).astype(np.float32)}
        _compare_ort(op, feeds, opset=opset)
    for op in ("Equal", "Less", "Greater") + (("LessOrEqual", "GreaterOrEqual") if opset >= 12 else ()):
        _compare_ort(op, {"a": a, "b": b}, opset=opset)
    cond = RNG.random((3, 4)) > 0.5
    _compare_ort("Where", {"c": cond, "a": fa, "b": fb}, opset=opset)
    halves = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51], np.float32)
    _compare_ort("Round", {"x": halves}, opset=opset)


@pytest.mark.parametrize("opset", [11, 17])
def test_cast_vs_ort(opset):
    x = np.array([-2.7, -0.5, 0.0, 0.5, 1.9, 300.25], np.float32)
    for to in (
        TensorProto.INT32,
        TensorProto.INT64,
        TensorProto.FLOAT16,
        TensorProto.DOUBLE,
        TensorProto.BOOL,
    ):
        _compare_ort("Cast", {"x": x}, attrs={"to": to}, opset=opset)
    _compare_ort(
        "Cast", {"x": np.array([3, -1, 200], np.int64)}, attrs={"to": TensorProto.FLOAT}, opset=opset
    )


@pytest.mark.parametrize("opset", [11, 17])
def test_clip_vs_ort(opset):
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    lo, hi = np.array(-0.5, np.float32), np.array(0.7, np.float32)
    names = ["x", "lo", "hi"]
    _compare_ort("Clip", {"x": x}, {"lo": lo, "hi": hi}, opset=opset, input_names=names)  # constant bounds
    _compare_ort("Clip", {"x": x, "lo": lo, "hi": hi}, opset=opset, input_names=names)  # runtime bounds
    _compare_ort("Clip", {"x": x, "hi": hi}, {"lo": None}, opset=opset, input_names=names)  # missing min
    _compare_ort("Clip", {"x": x}, opset=opset)
    if opset >= 12:
        xi = RNG.integers(-10, 10, (3, 4)).astype(np.int32)
        _compare_ort(
            "Clip", {"x": xi}, {"lo": np.array(-3, np.int32), "hi": np.array(4, np.int32)}, opset=opset
        )
        _compare_ort("Clip", {"x": xi, "lo": np.array(-3, np.int32)}, opset=opset)


def test_clip_opset6_attributes_vs_ort():
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    _compare_ort("Clip", {"x": x}, attrs={"min": -0.3, "max": 0.4}, opset=9)
    _compare_ort("Clip", {"x": x}, attrs={"max": 0.4}, opset=9)


@pytest.mark.parametrize("opset", [11, 17])
def test_activations_vs_ort(opset):
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32) * 3
    cases = [
        ("Relu", {}),
        ("LeakyRelu", {"alpha": 0.2}),
        ("Elu", {"alpha": 0.7}),
        ("Selu", {}),
        ("Selu", {"alpha": 1.5, "gamma": 0.9}),
        ("Sigmoid", {}),
        ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
        ("Tanh", {}),
        ("Softplus", {}),
        ("Softsign", {}),
        ("ThresholdedRelu", {"alpha": 0.5}),
        ("Shrink", {"lambd": 0.8, "bias": 0.3}),
        ("Erf", {}),
        ("Sign", {}),
        ("Floor", {}),
        ("Ceil", {}),
        ("Exp", {}),
        ("Neg", {}),
        ("Abs", {}),
    ]
    if opset >= 12:
        cases.append(("Celu", {"alpha": 1.3}))
    if opset >= 14:
        cases.append(("HardSwish", {}))
    for op, attrs in cases:
        _compare_ort(op, {"x": x}, attrs=attrs, opset=opset)
    for slope in (RNG.standard_normal((3, 1, 1)), RNG.standard_normal((5,)), np.array([0.1])):
        _compare_ort("PRelu", {"x": x}, {"slope": slope.astype(np.float32)}, opset=opset)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_vs_ort(approximate):
    _compare_ort("Gelu", {"x": X4 * 3}, attrs={"approximate": approximate}, opset=20)


@pytest.mark.parametrize("opset", [9, 11, 17])
def test_dropout_inference_vs_ort(opset):
    """Mask before opset 12 is all False in onnxruntime (all True from 12 on)."""
    _compare_ort("Dropout", {"x": X4}, opset=opset, n_out=2)
    _compare_ort("Dropout", {"x": X4}, opset=opset, n_out=1)


# ---- integer corner cases ----------------------------------------------------------------------
def _run(op, *arrays, opset=18, **attrs):
    feeds = {f"i{k}": a for k, a in enumerate(arrays)}
    inputs = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(a.dtype), None)
        for k, a in feeds.items()
    ]
    node = helper.make_node(op, list(feeds), ["y"], **attrs)
    g = helper.make_graph([node], "g", inputs, [helper.make_value_info("y", onnx.TypeProto())])
    m = OnnxGraphModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))
    return m(*[torch.from_numpy(a) for a in arrays])


def test_uint64_order_and_shift():
    big = np.array([2**64 - 1, 2**63, 5, 0], np.uint64)
    small = np.array([1, 2**63 - 1, 7, 0], np.uint64)
    assert _run("Greater", big, small).tolist() == [True, True, False, False]
    assert _run("Max", big, small).numpy().tolist() == np.maximum(big, small).tolist()
    shift = np.array([1, 63, 0, 64], np.uint64)
    got = _run("BitShift", big, shift, direction="RIGHT").numpy()
    assert got.tolist() == [2**63 - 1, 1, 5, 0]
    u32 = np.array([4000000000, 7], np.uint32)
    assert _run("Sub", u32, np.array([1, 8], np.uint32)).numpy().tolist() == [3999999999, 2**32 - 1]


def test_integer_div_truncates_and_pow_types():
    a, b = np.array([-7, 7, -7, 7], np.int64), np.array([2, -2, -2, 2], np.int64)
    assert _run("Div", a, b).tolist() == [-3, -3, 3, 3]
    y = _run("Pow", np.array([2, 3], np.int32), np.array([1.5, 2.0], np.float32))
    assert y.dtype == torch.int32 and y.tolist() == [2, 9]
    y = _run("Pow", np.array([2.0, 4.0], np.float16), np.array([2.0, 0.5], np.float32))
    assert y.dtype == torch.float32  # graph computes fp16 in fp32
    assert y.tolist() == [4.0, 2.0]


# ---- gradient flow ------------------------------------------------------------------------------
def _chain_model(opset: int) -> onnx.ModelProto:
    """x -> a chain of differentiable elementwise/activation ops -> y."""
    f = TensorProto.DOUBLE
    inits = [
        numpy_helper.from_array(np.array([0.5, -1.0, 2.0], np.float64), "w"),
        numpy_helper.from_array(np.array(0.3, np.float64), "b"),
        numpy_helper.from_array(np.array([[0.2], [0.1]], np.float64), "slope"),
        numpy_helper.from_array(np.array(-1.5, np.float64), "lo"),
        numpy_helper.from_array(np.array(1.5, np.float64), "hi"),
    ]
    N = helper.make_node
    nodes = [
        N("Mul", ["x", "w"], ["t1"]),
        N("Add", ["t1", "b"], ["t2"]),
        N("PRelu", ["t2", "slope"], ["t3"]),
        N("Selu", ["t3"], ["t4"]),
        N("Softplus", ["t4"], ["t5"]),
        N("Sub", ["t5", "x"], ["t6"]),
        N("Clip", ["t6", "lo", "hi"], ["t7"]),
        N("Tanh", ["t7"], ["t8"]),
        N("Div", ["t8", "t5"], ["t9"]),
        N("Max", ["t9", "t3", "x"], ["t10"]),
        N("Sigmoid", ["t10"], ["t11"]),
        N("Cast", ["t11"], ["t12"], to=TensorProto.DOUBLE),
        N("Gelu" if opset >= 20 else "Elu", ["t12"], ["t13"]),
        N("LogSoftmax", ["t13"], ["t14"], axis=1),
        N("Softmax", ["t14"], ["t15"], axis=-1),
        N("Mean", ["t15", "t2"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", f, [2, 3])],
        [helper.make_tensor_value_info("y", f, None)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [11, 17, 20])
def test_gradients_flow(opset):
    m = OnnxGraphModule(_chain_model(opset))
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
