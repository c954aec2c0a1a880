"""int8 export (onnxadmm.export.int8): exact weights, integer kernels, bounded activation error.

Two small graphs, each with a per-tensor and a per-channel weight grid, each exported as QDQ and
as QOperator:

* ``conv``: x[N,3,8,8] -> Conv 3->8 3x3 (+bias) -> Relu -> Flatten -> Gemm 512->10 (transB=1, +bias);
* ``mlp``: x[N,64] -> MatMul [64,32] -> Relu -> Gemm [32,10] (transB=0, +bias).

Tolerance (derived, not tuned). With uint8 activations every quantized tensor t is rounded to a
step s_t (its scale): an error of at most s_t / 2 per element on values inside its calibrated range
(also at the range ends: the zero point is rounded, so the representable range reaches at least
s_t / 2 beyond each end). The weights are exact, the int32 bias is rounded to the step
s_in * s_w (error <= s_in * s_w / 2), the products are accumulated exactly in int32, and ReLU is
1-Lipschitz. So, for a chain of layers y = W x + b with per-element input error d_in:

    d_out[j] <= sum_k |W[j, k]| * d_in + s_in * s_w[j] / 2 + s_out / 2,

starting from d_in = s_x / 2, and the bound for the output is max_j d_out[j] of the last layer
(a 1e-5 relative slack covers float32 rounding of the reference and of onnxruntime's float
requantization multiplier). The check uses the calibration samples themselves, so every tensor stays
inside its calibrated range.

That worst case adds every rounding error with the same sign (here 19-40 output steps s_y, while
the measured maximum is about 1.2 s_y), so the typical error is checked too: modelling each rounding
error as independent and uniform on [-s/2, s/2] (variance s^2 / 12), the variances propagate as

    v_out[j] = sum_k W[j, k]^2 * v_in + (s_in * s_w[j])^2 / 12 + s_out^2 / 12,

from v_in = s_x^2 / 12, and the RMS output error must stay below 1.5 * sqrt(max_j v_out[j]) (about
0.6 s_y; measured: 0.8 of the prediction). Top-1 agreement is checked on fresh random inputs from the
same distribution (>= 95%; logits closer than the error can swap).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxadmm.export.int8 import (
    Int8ExactnessError,
    Int8ExportError,
    _check_exact,
    export_int8,
    project_to_int8_grid,
)

CAL_N = 200


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()]
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def conv_graph(rng):
    inits = {
        "W1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "W2": rng.normal(0, 0.05, (10, 512)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c"], pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["h"]),
        helper.make_node("Flatten", ["h"], ["f"]),
        helper.make_node("Gemm", ["f", "W2", "b2"], ["y"], transB=1),
    ]
    m = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    # (weight, per-channel axis, bias, [names the input tensor's scale may have], [output's])
    layers = [("W1", 0, "b1", ["x"], ["h", "c"]), ("W2", 0, "b2", ["h", "c", "f"], ["y"])]
    return m, inits, layers, (3, 8, 8), "QLinearConv", "QGemm"


def mlp_graph(rng):
    inits = {
        "Wa": rng.normal(0, 0.2, (64, 32)).astype(np.float32),
        "Wb": rng.normal(0, 0.2, (32, 10)).astype(np.float32),
        "bb": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "Wa"], ["a"]),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("Gemm", ["h", "Wb", "bb"], ["y"]),
    ]
    m = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    layers = [("Wa", 1, None, ["x"], ["h", "a"]), ("Wb", 1, "bb", ["h", "a"], ["y"])]
    return m, inits, layers, (64,), "QLinearMatMul", "QGemm"


GRAPHS = {"conv": conv_graph, "mlp": mlp_graph}


def _grid(inits, layers, per_channel: bool):
    weights, scales = {}, {}
    for name, axis, *_ in layers:
        weights[name], scales[name] = project_to_int8_grid(inits[name], axis if per_channel else None)
    return weights, scales


def _with(model: onnx.ModelProto, weights) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    return m


def _run(model_or_path, x) -> np.ndarray:
    src = (
        model_or_path.SerializeToString()
        if isinstance(model_or_path, onnx.ModelProto)
        else str(model_or_path)
    )
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _scale(inits: dict, candidates: list[str]) -> float:
    for c in candidates:
        if f"{c}_scale" in inits:
            return float(inits[f"{c}_scale"])
    raise AssertionError(f"no activation scale among {candidates}: {sorted(inits)}")


def _bounds(qmodel: onnx.ModelProto, weights, scales, layers) -> tuple[float, float]:
    """(worst-case maximum, predicted RMS) output error of activation quantization (module docstring)."""
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    s_x = _scale(inits, layers[0][3])
    d_in, v_in = s_x / 2, s_x**2 / 12
    for name, axis, bias, in_names, out_names in layers:
        w = weights[name]
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)  # [out, fan-in]
        s_w = np.broadcast_to(np.asarray(scales[name], dtype=np.float64), (rows.shape[0],))
        s_in, s_out = _scale(inits, in_names), _scale(inits, out_names)
        d = np.abs(rows).sum(1) * d_in + s_out / 2 + (s_in * s_w / 2 if bias else 0)
        v = (rows**2).sum(1) * v_in + s_out**2 / 12 + ((s_in * s_w) ** 2 / 12 if bias else 0)
        d_in, v_in = float(d.max()), float(v.max())
    return d_in, float(np.sqrt(v_in))


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_export_int8(tmp_path, graph, per_channel, fmt):
    rng = np.random.default_rng(0)
    model, inits, layers, shape, first_kernel, last_kernel = GRAPHS[graph](rng)
    weights, scales = _grid(inits, layers, per_channel)
    cal = rng.uniform(-1, 1, (CAL_N, *shape)).astype(np.float32)
    out = tmp_path / "int8.onnx"

    info = export_int8(model, weights, scales, out, {"x": cal}, fmt=fmt)

    assert info["path"] == str(out) and info["format"] == fmt
    assert info["quantized_weights"] == 2 and info["per_channel_weights"] == (2 if per_channel else 0)
    assert info["file_bytes"] == out.stat().st_size
    # integer kernels after onnxruntime's optimisation, one per weight layer
    assert info["integer_kernel_ops"].get(first_kernel) == 1, info["op_types"]
    assert info["integer_kernel_ops"].get(last_kernel) == 1, info["op_types"]
    assert info["integer_kernels"] == 2
    assert not {"Conv", "Gemm", "MatMul", "MatMulNBits"} & set(info["op_types"])

    # the int8 initializers times their scales are the given weights, bit for bit
    q = onnx.load(str(out))
    qi = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    for name, axis, *_ in layers:
        n, s = qi[f"{name}_quantized"], qi[f"{name}_scale"]
        assert n.dtype == np.int8 and not qi[f"{name}_zero_point"].any()
        assert np.abs(n.astype(int)).max() <= 127
        if per_channel:
            shape_b = [1] * n.ndim
            shape_b[axis] = -1
            s = s.reshape(shape_b)
        else:
            assert s.size == 1 or (fmt == "qoperator" and np.all(s == s.ravel()[0]))
            s = s.ravel()[0]
        np.testing.assert_array_equal(
            s if per_channel else np.float32(s), np.asarray(scales[name]).reshape(np.shape(s))
        )
        deq = (n.astype(np.float32) * s).astype(np.float32)
        assert deq.view(np.uint32).tolist() == weights[name].view(np.uint32).tolist()

    # output error within the activation-quantization bound (on calibration samples)
    fp32 = _with(model, weights)
    ref, got = _run(fp32, cal), _run(out, cal)
    bound, rms_pred = _bounds(q, weights, scales, layers)
    err = float(np.abs(got - ref).max())
    assert 0 < err <= bound * (1 + 1e-5) + 1e-6, (err, bound)
    rms = float(np.sqrt(np.mean((got.astype(np.float64) - ref) ** 2)))
    assert rms <= 1.5 * rms_pred, (rms, rms_pred)
    assert rms_pred < 0.6 * _scale(qi, ["y"])  # the tolerance is a fraction of one output step

    # top-1 agreement on fresh inputs
    x = rng.uniform(-1, 1, (500, *shape)).astype(np.float32)
    agree = float((_run(out, x).argmax(1) == _run(fp32, x).argmax(1)).mean())
    assert agree >= 0.95, agree


def test_weight_off_grid_raises_naming_it(tmp_path):
    rng = np.random.default_rng(1)
    model, inits, layers, shape, *_ = conv_graph(rng)
    weights, scales = _grid(inits, layers, per_channel=True)
    bad = weights["W2"].copy()
    bad[3, 7] = np.nextafter(bad[3, 7], np.float32(np.inf))  # one ulp off the grid
    cal = {"x": rng.uniform(-1, 1, (8, *shape)).astype(np.float32)}
    with pytest.raises(ValueError, match=r"weight 'W2' is not on its int8 grid.*\(3, 7\)"):
        export_int8(model, {**weights, "W2": bad}, scales, tmp_path / "m.onnx", cal)
    with pytest.raises(Int8ExportError, match=r"weight 'W1' is not on its int8 grid: \|w / scale\| reaches"):
        export_int8(model, {**weights, "W1": weights["W1"] * 2}, scales, tmp_path / "m.onnx", cal)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_arguments_raise(tmp_path):
    rng = np.random.default_rng(2)
    model, inits, layers, shape, *_ = conv_graph(rng)
    weights, scales = _grid(inits, layers, per_channel=True)
    cal = {"x": rng.uniform(-1, 1, (8, *shape)).astype(np.float32)}
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="'W1': 4 scales for 8 channels"):
        export_int8(model, weights, {**scales, "W1": scales["W1"][:4]}, out, cal)
    with pytest.raises(ValueError, match="weight 'b1' must feed input 1 of Conv/Gemm/MatMul"):
        export_int8(model, {"b1": inits["b1"]}, {"b1": np.float32(1)}, out, cal)
    with pytest.raises(ValueError, match="weight 'nope' is not an initializer"):
        export_int8(model, {"nope": weights["W1"]}, {"nope": scales["W1"]}, out, cal)
    with pytest.raises(ValueError, match="calibration inputs"):
        export_int8(model, weights, scales, out, {"input": cal["x"]})


def test_pruned_channel_with_zero_scale_and_unlisted_layer_stays_float(tmp_path):
    """A filter pruned to zeros may come with scale 0; a layer not in ``weights`` keeps its float weight."""
    rng = np.random.default_rng(3)
    model, inits, layers, shape, *_ = conv_graph(rng)
    w1 = inits["W1"].copy()
    w1[2] = 0
    g1, s1 = project_to_int8_grid(w1, 0)
    assert s1[2] == 0
    cal = rng.uniform(-1, 1, (64, *shape)).astype(np.float32)
    out = tmp_path / "m.onnx"
    info = export_int8(model, {"W1": g1}, {"W1": s1}, out, {"x": cal})
    assert info["integer_kernel_ops"] == {"QLinearConv": 1}
    assert "Gemm" in info["op_types"]
    q = onnx.load(str(out))
    qi = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    assert np.array_equal(qi["W1_quantized"].astype(np.float32) * qi["W1_scale"].reshape(-1, 1, 1, 1), g1)
    assert qi["W1_scale"][2] > 0
    np.testing.assert_array_equal(qi["W2"], inits["W2"])  # untouched float weight
    ref = _run(_with(model, {"W1": g1}), cal)
    assert np.abs(_run(out, cal) - ref).max() < 0.05 * (ref.max() - ref.min())


def test_exactness_check_catches_a_changed_scale(tmp_path):
    """The post-quantization check compares int8 x scale with the given weights and raises on any change."""
    rng = np.random.default_rng(4)
    model, inits, layers, shape, *_ = mlp_graph(rng)
    weights, scales = _grid(inits, layers, per_channel=True)
    out = tmp_path / "m.onnx"
    export_int8(model, weights, scales, out, {"x": rng.uniform(-1, 1, (16, *shape)).astype(np.float32)})
    q = onnx.load(str(out))
    _check_exact(q, weights)
    for t in q.graph.initializer:
        if t.name == "Wb_scale":
            s = numpy_helper.to_array(t).copy()
            s[0] = np.nextafter(s[0], np.float32(1))
            t.CopyFrom(numpy_helper.from_array(s, t.name))
    with pytest.raises(Int8ExactnessError, match="weight 'Wb'"):
        _check_exact(q, weights)


def test_mixed_grids_model_path_qoperator(tmp_path):
    """Per-tensor and per-channel weights in one QOperator model (its per-channel switch is global)."""
    rng = np.random.default_rng(5)
    model, inits, layers, shape, *_ = conv_graph(rng)
    w1, s1 = project_to_int8_grid(inits["W1"], 0)
    w2, s2 = project_to_int8_grid(inits["W2"], None)
    path = tmp_path / "float.onnx"
    onnx.save(model, str(path))
    cal = {"x": rng.uniform(-1, 1, (32, *shape)).astype(np.float32)}
    info = export_int8(
        path, {"W1": w1, "W2": w2}, {"W1": s1, "W2": float(s2)}, tmp_path / "q.onnx", cal, "qoperator"
    )
    assert info["per_channel_weights"] == 1 and info["integer_kernels"] == 2
    qi = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert np.all(qi["W2_scale"] == s2)
    assert np.array_equal(qi["W2_quantized"].astype(np.float32) * qi["W2_scale"].reshape(-1, 1), w2)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_minus_inf_mask_stays_float(tmp_path, fmt):
    """An additive attention-style mask of -inf has no finite range: the nodes that read or write it
    stay in float (onnxruntime would give them an infinite scale), the weights still go int8."""
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.3, (8, 6)).astype(np.float32)
    mask = np.array([0, -np.inf, 0, 0, -np.inf, 0], np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["s"]),
        helper.make_node("Add", ["s", "mask"], ["m"]),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Softmax", ["m"], ["y"], axis=-1),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        {"W": w, "mask": mask},
    )
    g, sc = project_to_int8_grid(w, None)
    cal = rng.normal(size=(64, 8)).astype(np.float32)
    out = tmp_path / "m.onnx"
    info = export_int8(model, {"W": g}, {"W": sc}, out, {"x": cal}, fmt=fmt)
    assert "m" in info["left_float_nonfinite"] or "mask" in info["left_float_nonfinite"]
    q = onnx.load(str(out))
    scales = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_scale")]
    assert scales and all(np.isfinite(s).all() for s in scales)
    ref = _run(_with(model, {"W": g}), cal)
    got = _run(out, cal)
    assert np.all(got[:, [1, 4]] == 0) and np.abs(got - ref).max() < 0.05
