"""Conv, pooling, normalization and linear ops: onnx node test cases, onnxruntime, gradient flow."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from onnxadmm.importer.graph import OnnxGraphModule
from onnxadmm.importer.ops import conv as conv_ops
from onnxadmm.importer.registry import registered_ops

OPS = {
    "conv": ["Conv", "ConvTranspose"],
    "pool": ["MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"],
    "norm": [
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "RMSNormalization",
        "LRN",
        "LpNormalization",
        "MeanVarianceNormalization",
    ],
    "linear": ["Gemm", "MatMul", "MatMulInteger", "Einsum", "Det"],
}
ALL_OPS = {op for ops in OPS.values() for op in ops}


@functools.lru_cache(maxsize=1)
def _node_cases() -> dict[str, list]:
    """Single-node onnx backend test cases of our ops, by op type (collected once, lazily)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    out: dict[str, list] = {}
    for c in cases:
        if c.model is not None and len(c.model.graph.node) == 1:
            op = c.model.graph.node[0].op_type
            if op in ALL_OPS:
                out.setdefault(op, []).append(c)
    return out


def test_all_ops_registered():
    have = {op for (dom, op) in registered_ops() if dom == ""}
    assert ALL_OPS <= have, sorted(ALL_OPS - have)


def _to_torch(a) -> torch.Tensor:
    a = numpy_helper.to_array(a) if isinstance(a, TensorProto) else np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _from_torch(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


# ---- onnx node test cases -----------------------------------------------------------------------
@pytest.mark.parametrize("op", sorted(ALL_OPS))
def test_node_cases(op):
    cases = _node_cases().get(op, [])
    if op not in ("GlobalLpPool",):  # the only op of ours without node test cases
        assert cases, f"no node test cases for {op}"
    failures = []
    for case in cases:
        try:
            m = OnnxGraphModule(case.model)
            for inputs, outputs in case.data_sets:
                res = m(*[_to_torch(x) for x in inputs])
                res = res if isinstance(res, tuple) else (res,)
                assert len(res) == len(outputs)
                for a, e in zip(res, outputs):
                    e = numpy_helper.to_array(e) if isinstance(e, TensorProto) else np.asarray(e)
                    a = _from_torch(a)
                    assert a.shape == e.shape, (a.shape, e.shape)
                    if e.dtype.name == "bfloat16":
                        e = e.astype(np.float32)
                    rtol = max(case.rtol, 1e-4)
                    np.testing.assert_allclose(a, e, rtol=rtol, atol=max(case.atol, 1e-6))
        except Exception as exc:  # collect all failures of this op
            failures.append(f"{case.name}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)


# ---- onnxruntime comparisons --------------------------------------------------------------------
_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
}
RNG = np.random.default_rng(0)


def _r(*shape, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def _model(op, feeds, consts, attrs, opset, n_out, names=None):
    names = names or list(feeds) + list(consts)
    inputs = [helper.make_tensor_value_info(k, _NP_TO_ONNX[v.dtype], v.shape) for k, v in feeds.items()]
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


def check(op, feeds, consts=None, attrs=None, opset=17, n_out=1, names=None, rtol=1e-4, atol=1e-5, grad=True):
    """Compare with onnxruntime; then check that gradients reach float inputs and parameters."""
    consts = consts or {}
    model = _model(op, feeds, consts, attrs or {}, opset, n_out, names)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, feeds)
    m = OnnxGraphModule(model)
    xs = [torch.from_numpy(v.copy()) for v in feeds.values()]
    for x in xs:
        x.requires_grad_(grad and x.is_floating_point())
    got = m(*xs)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        a = _from_torch(g)
        assert a.shape == e.shape, (a.shape, e.shape)
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    if grad:
        loss = sum(g.double().sum() for g in got if g.is_floating_point() and g.requires_grad)
        loss.backward()
        for x in xs:
            if x.is_floating_point():
                assert x.grad is not None and torch.isfinite(x.grad).all()
        for name, p in m.named_onnx_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    return m


X4 = _r(2, 4, 7, 6)


# Conv ---------------------------------------------------------------------------------------------
CONV_CASES = [
    ("sym_pads", dict(pads=[1, 1, 1, 1], strides=[2, 2]), (6, 4, 3, 3)),
    ("asym_pads", dict(pads=[0, 1, 2, 1]), (6, 4, 3, 2)),
    ("kernel_attr", dict(kernel_shape=[3, 3], dilations=[2, 1], pads=[2, 1, 2, 1]), (6, 4, 3, 3)),
    ("groups", dict(group=2, strides=[1, 2]), (6, 2, 3, 3)),
    ("depthwise", dict(group=4, pads=[1, 1, 1, 1]), (4, 1, 3, 3)),
    ("same_upper", dict(auto_pad="SAME_UPPER", strides=[2, 2]), (6, 4, 2, 3)),
    ("same_lower", dict(auto_pad="SAME_LOWER", strides=[2, 1]), (6, 4, 4, 2)),
    ("valid", dict(auto_pad="VALID", strides=[2, 2]), (6, 4, 3, 3)),
]


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("name,attrs,wshape", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_vs_ort(name, attrs, wshape, opset):
    w, b = _r(*wshape), _r(wshape[0])
    check("Conv", {"x": X4}, {"w": w, "b": b}, attrs, opset)


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_1d_3d_no_bias(nd):
    x = _r(2, 3, *([6] * nd))
    w = _r(4, 3, *([3] * nd))
    check("Conv", {"x": x}, {"w": w}, dict(pads=[1] * nd + [0] * nd, strides=[2] * nd), 13)


def test_conv_weight_as_input():
    check("Conv", {"x": X4, "w": _r(5, 4, 3, 3)}, {}, dict(pads=[1, 1, 1, 1]), 11)


def test_conv_same_tracks_input_size():
    """SAME pads depend on the input size: one imported node, two sizes."""
    w = _r(3, 4, 3, 3)
    model = _model("Conv", {"x": X4}, {"w": w}, dict(auto_pad="SAME_UPPER", strides=[2, 2]), 11, 1)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    m = OnnxGraphModule(model)
    for shape in [(2, 4, 7, 6), (1, 4, 8, 5)]:
        x = _r(*shape)
        np.testing.assert_allclose(
            _from_torch(m(torch.from_numpy(x))), sess.run(None, {"x": x})[0], atol=1e-5
        )


def test_conv_symmetric_pads_is_a_single_conv_call(monkeypatch):
    calls = []
    monkeypatch.setitem(conv_ops.CONV, 2, lambda *a: calls.append(a) or F.conv2d(*a))

    def no_pad(*a, **k):
        raise AssertionError("F.pad called for symmetric pads")

    model = _model("Conv", {"x": X4}, {"w": _r(6, 4, 3, 3)}, dict(pads=[1, 1, 1, 1]), 17, 1)
    m = OnnxGraphModule(model)
    monkeypatch.setattr(F, "pad", no_pad)
    y = m(torch.from_numpy(X4))
    assert y.shape == (2, 6, 7, 6) and len(calls) == 1 and calls[0][4] == [1, 1]


# ConvTranspose ------------------------------------------------------------------------------------
CONVT_CASES = [
    ("basic", dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), (4, 3, 3, 3)),
    ("asym_pads", dict(strides=[2, 1], pads=[0, 1, 2, 0]), (4, 3, 3, 2)),
    ("output_shape", dict(strides=[2, 2], output_shape=[13, 12]), (4, 3, 3, 3)),
    ("same_upper", dict(strides=[2, 2], auto_pad="SAME_UPPER"), (4, 3, 3, 3)),
    ("same_lower", dict(strides=[3, 2], auto_pad="SAME_LOWER"), (4, 3, 4, 3)),
    ("groups_dil", dict(group=2, dilations=[2, 2], strides=[2, 1], output_padding=[1, 0]), (4, 2, 3, 3)),
    ("big_out_pad", dict(strides=[3, 3], output_padding=[2, 1], pads=[0, 0, 1, 0]), (4, 3, 2, 2)),
]


@pytest.mark.parametrize("name,attrs,wshape", CONVT_CASES, ids=[c[0] for c in CONVT_CASES])
def test_conv_transpose_vs_ort(name, attrs, wshape):
    w, b = _r(*wshape), _r(wshape[1] * attrs.get("group", 1))
    check("ConvTranspose", {"x": X4}, {"w": w, "b": b}, attrs, 11)


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_transpose_1d_3d(nd):
    x = _r(1, 2, *([4] * nd))
    check("ConvTranspose", {"x": x}, {"w": _r(2, 3, *([3] * nd))}, dict(strides=[2] * nd), 17)


# Pooling ------------------------------------------------------------------------------------------
POOL_CASES = [
    ("sym", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("ceil", dict(kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1)),
    ("ceil_pads", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("asym", dict(kernel_shape=[3, 3], strides=[2, 1], pads=[0, 1, 2, 0])),
    ("asym_ceil", dict(kernel_shape=[2, 3], strides=[3, 2], pads=[1, 0, 0, 2], ceil_mode=1)),
    ("same_upper", dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    ("same_lower", dict(kernel_shape=[3, 3], strides=[2, 3], auto_pad="SAME_LOWER")),
    ("valid", dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="VALID")),
]


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("name,attrs", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_max_pool_vs_ort(name, attrs, opset):
    check("MaxPool", {"x": X4}, {}, attrs, opset)


@pytest.mark.parametrize("cip", [0, 1])
@pytest.mark.parametrize("opset", [11, 19])
@pytest.mark.parametrize("name,attrs", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_average_pool_vs_ort(name, attrs, opset, cip):
    check("AveragePool", {"x": X4}, {}, dict(attrs, count_include_pad=cip), opset)


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("name,attrs", POOL_CASES[:1] + POOL_CASES[3:4] + POOL_CASES[5:6])
def test_lp_pool_vs_ort(name, attrs, p):
    check("LpPool", {"x": X4}, {}, dict(attrs, p=p), 11)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "LpPool"])
def test_pool_dilations_vs_ort(op):
    attrs = dict(kernel_shape=[2, 2], dilations=[2, 1], pads=[1, 0, 1, 1], strides=[1, 2], ceil_mode=1)
    check(op, {"x": X4}, {}, attrs, 19)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("nd", [1, 3])
def test_pool_1d_3d_vs_ort(op, nd):
    x = _r(2, 3, *([7] * nd))
    check(op, {"x": x}, {}, dict(kernel_shape=[3] * nd, strides=[2] * nd, pads=[1] * nd + [0] * nd), 12)


@pytest.mark.parametrize("storage_order", [0, 1])
@pytest.mark.parametrize("pads", [[1, 1, 1, 1], [0, 2, 1, 0]])
def test_max_pool_indices_vs_ort(pads, storage_order):
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=pads, storage_order=storage_order)
    check("MaxPool", {"x": X4}, {}, attrs, 12, n_out=2)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_max_pool_integer_vs_ort(dtype):
    x = RNG.integers(0 if dtype == np.uint8 else -128, 127, (1, 2, 6, 6)).astype(dtype)
    check("MaxPool", {"x": x}, {}, dict(kernel_shape=[2, 2], pads=[0, 0, 1, 1]), 12, grad=False)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_global_pool_vs_ort(op, nd):
    check(op, {"x": _r(2, 3, *([5] * nd))}, {}, {}, 11)


# Normalization ------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_batch_norm_vs_ort(opset):
    c = X4.shape[1]
    consts = dict(s=_r(c), b=_r(c), mean=_r(c), var=RNG.random(c).astype(np.float32) + 0.5)
    check("BatchNormalization", {"x": X4}, consts, dict(epsilon=1e-3), opset)


def test_batch_norm_2d_input():
    consts = dict(s=_r(5), b=_r(5), mean=_r(5), var=RNG.random(5).astype(np.float32) + 0.5)
    check("BatchNormalization", {"x": _r(3, 5)}, consts, {}, 15)


@pytest.mark.parametrize("opset,n_out", [(15, 3), (9, 5)])
def test_batch_norm_training_mode_vs_ort(opset, n_out):
    c = X4.shape[1]
    feeds = dict(x=X4, s=_r(c), b=_r(c), mean=_r(c), var=RNG.random(c).astype(np.float32) + 0.5)
    attrs = dict(momentum=0.8, training_mode=1) if opset >= 14 else dict(momentum=0.8)
    check("BatchNormalization", feeds, {}, attrs, opset, n_out=n_out)


def test_instance_norm_vs_ort():
    check("InstanceNormalization", {"x": X4}, dict(s=_r(4), b=_r(4)), dict(epsilon=1e-4), 11)
    check("InstanceNormalization", {"x": _r(2, 3, 9)}, dict(s=_r(3), b=_r(3)), {}, 17)


@pytest.mark.parametrize("axis", [-1, 1, -2])
def test_layer_norm_vs_ort(axis):
    shape = X4.shape[axis:]
    check("LayerNormalization", {"x": X4}, dict(s=_r(*shape), b=_r(*shape)), dict(axis=axis), 17)


def test_layer_norm_outputs_and_no_bias_vs_ort():
    check("LayerNormalization", {"x": X4}, dict(s=_r(6)), dict(epsilon=1e-3), 17, n_out=3)


def test_group_norm_vs_ort():
    check("GroupNormalization", {"x": X4}, dict(s=_r(4), b=_r(4)), dict(num_groups=2), 21)


def test_group_norm_18_per_group_scale():
    """Opset 18: scale/bias have one entry per group (the opset-21 layout is per channel)."""
    x, s, b = X4, _r(2), _r(2)
    model = _model("GroupNormalization", {"x": x}, dict(s=s, b=b), dict(num_groups=2, epsilon=1e-5), 18, 1)
    y = _from_torch(OnnxGraphModule(model)(torch.from_numpy(x)))
    g = x.reshape(2, 2, -1)
    ref = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    ref = ref * s[None, :, None] + b[None, :, None]
    np.testing.assert_allclose(y, ref.reshape(x.shape), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis", [-1, 1])
def test_rms_norm_vs_ort(axis):
    check("RMSNormalization", {"x": X4}, dict(s=_r(*X4.shape[axis:])), dict(axis=axis, epsilon=1e-3), 23)
    check("RMSNormalization", {"x": X4}, dict(s=_r(X4.shape[-1])), dict(axis=axis), 23)  # broadcast scale


@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn_vs_ort(size):
    check("LRN", {"x": X4}, {}, dict(size=size, alpha=0.01, beta=0.6, bias=1.5), 13)


def test_lrn_even_size_follows_spec():
    """onnxruntime refuses even sizes; the window is [c - floor((s-1)/2), c + ceil((s-1)/2)]."""
    x, size, alpha, beta, bias = X4, 4, 0.01, 0.6, 1.5
    model = _model("LRN", {"x": x}, {}, dict(size=size, alpha=alpha, beta=beta, bias=bias), 13, 1)
    y = _from_torch(OnnxGraphModule(model)(torch.from_numpy(x)))
    sq = np.zeros_like(x)
    for c in range(x.shape[1]):
        sq[:, c] = (x[:, max(0, c - 1) : c + 3] ** 2).sum(axis=1)
    np.testing.assert_allclose(y, x / (bias + alpha / size * sq) ** beta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("axis", [1, -1])
def test_lp_normalization_vs_ort(p, axis):
    check("LpNormalization", {"x": X4}, {}, dict(p=p, axis=axis), 11)


@pytest.mark.parametrize("axes", [None, [1, 2, 3], [2, 3]])
def test_mean_variance_normalization_vs_ort(axes):
    check("MeanVarianceNormalization", {"x": X4}, {}, {} if axes is None else dict(axes=axes), 13)


# Linear -------------------------------------------------------------------------------------------
GEMM_CASES = [
    ("linear", dict(transB=1), (5, 8), (6, 8), (6,)),
    ("linear_row_bias", dict(transB=1), (5, 8), (6, 8), (1, 6)),
    ("plain", {}, (5, 8), (8, 6), (6,)),
    ("trans_a", dict(transA=1, alpha=0.5), (8, 5), (8, 6), (5, 1)),
    ("all", dict(transA=1, transB=1, alpha=2.0, beta=-0.5), (8, 5), (6, 8), (5, 6)),
    ("scalar_bias", dict(beta=3.0), (5, 8), (8, 6), ()),
]


@pytest.mark.parametrize("opset", [7, 9, 11, 13])
@pytest.mark.parametrize("name,attrs,a,b,c", GEMM_CASES, ids=[g[0] for g in GEMM_CASES])
def test_gemm_vs_ort(name, attrs, a, b, c, opset):
    check("Gemm", {"a": _r(*a)}, {"b": _r(*b), "c": _r(*c)}, attrs, opset)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_without_c(trans_b):
    b = _r(6, 8) if trans_b else _r(8, 6)
    check("Gemm", {"a": _r(5, 8)}, {"b": b}, dict(transB=trans_b, alpha=1.5), 13)


def test_gemm_linear_path(monkeypatch):
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(a) or real(*a))
    m = check("Gemm", {"a": _r(5, 8)}, {"b": _r(6, 8), "c": _r(6)}, dict(transB=1), 13)
    assert len(calls) == 1 and sum(1 for _ in m.parameters()) == 2


@pytest.mark.parametrize(
    "a,b", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (3, 4, 2)), ((4,), (2, 4, 3)), ((4,), (4,))]
)
def test_matmul_vs_ort(a, b):
    check("MatMul", {"a": _r(*a)}, {"b": _r(*b)}, {}, 13)


def test_matmul_integer_vs_ort():
    a = RNG.integers(0, 255, (3, 4)).astype(np.uint8)
    b = RNG.integers(-128, 127, (4, 5)).astype(np.int8)
    feeds = dict(a=a, b=b, az=np.array(7, np.uint8), bz=np.array(-3, np.int8))
    check("MatMulInteger", feeds, {}, {}, 10, grad=False)


@pytest.mark.parametrize(
    "eq,shapes",
    [
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
        ("ij,jk", [(3, 4), (4, 5)]),
        ("...ij->...ji", [(2, 3, 4)]),
        ("i,i", [(5,), (5,)]),
        ("bhqd, bhkd -> bhqk", [(2, 2, 3, 4), (2, 2, 5, 4)]),
    ],
)
def test_einsum_vs_ort(eq, shapes):
    feeds = {f"x{i}": _r(*s) for i, s in enumerate(shapes)}
    check("Einsum", feeds, {}, dict(equation=eq), 12)


def test_det_vs_ort():
    check("Det", {"x": _r(2, 3, 3)}, {}, {}, 11)


# A small network through the graph runner ---------------------------------------------------------
def test_small_cnn_vs_ort_and_trains():
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    inits = dict(
        w1=_r(8, 4, 3, 3), b1=_r(8), s=_r(8), bb=_r(8), m=_r(8), v=RNG.random(8).astype(np.float32) + 0.5,
        w2=_r(3, 8), b2=_r(3),
    )  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = _r(2, 4, 8, 8)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    m = OnnxGraphModule(model)
    y = m(torch.from_numpy(x))
    np.testing.assert_allclose(_from_torch(y), expected, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    grads = {n: p.grad for n, p in m.named_onnx_parameters()}
    assert {"w1", "b1", "w2", "b2", "s", "bb"} <= set(grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
