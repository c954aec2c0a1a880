"""The channel-removal pass after structured pruning: smaller layers, the same outputs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxadmm.export.shrink import shrink_channels

RNG = np.random.default_rng(0)


def _f(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inits, x_shape, y_shape, opset=13):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return m


def _run(m, x):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _inits(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _cnn(pad_second=0):
    """conv(pads 1) - BN - relu - maxpool - conv - relu - flatten - gemm - relu - gemm."""
    inits = {
        "w1": _f(6, 3, 3, 3), "b1": _f(6),
        "s": (1 + _f(6, scale=0.1)), "bb": _f(6), "mu": _f(6), "var": (1 + np.abs(_f(6))),
        "w2": _f(5, 6, 3, 3), "b2": _f(5),
        "w3": _f(4, 5 * 2 * 2), "c3": _f(4),
        "w4": _f(3, 4), "c4": _f(3),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a1", "s", "bb", "mu", "var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["a2"], pads=[pad_second] * 4),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "c3"], ["a3"], transB=1),
        helper.make_node("Relu", ["a3"], ["r3"]),
        helper.make_node("Gemm", ["r3", "w4", "c4"], ["y"], transB=1),
    ]
    side = 4 + 2 * pad_second - 2
    inits["w3"] = _f(4, 5 * side * side)
    return nodes, inits


def test_filters_and_channels_removed_outputs_equal():
    nodes, inits = _cnn()
    inits["w1"][[1, 4]] = 0  # whole filters: their output is a constant (bias through BN and ReLU)
    inits["w2"][:, 2] = 0  # channel pruning in the reader: conv1's live filter 2 is unused
    inits["w2"][3] = 0  # a conv2 filter: constant relu(b2[3]), folded into the dense layer's bias
    inits["w3"][1] = 0  # a dense unit: constant relu(c3[1]) folded into the last layer's bias
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 3])
    res = shrink_channels(m)
    after = _inits(res.model)
    assert after["w1"].shape == (3, 3, 3, 3)
    assert after["w2"].shape == (4, 3, 3, 3)
    assert after["w3"].shape == (3, 16)
    assert after["w4"].shape == (3, 3)
    assert after["s"].shape == (3,) and after["b1"].shape == (3,)
    assert list(res.kept["w1"][0]) == [0, 3, 5]
    assert list(res.kept["w2"][1]) == [0, 3, 5] and list(res.kept["w2"][0]) == [0, 1, 2, 4]
    assert res.removed == {"w1": 3, "w2": 1, "w3": 1}
    onnx.checker.check_model(res.model, full_check=True)
    x = _f(7, 3, 8, 8, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)
    assert m.graph.initializer[0].dims == [6, 3, 3, 3]  # the input proto is not touched


def test_padded_reader_keeps_nonzero_constant_channel():
    nodes, inits = _cnn(pad_second=1)
    inits["w1"][1] = 0  # constant but non-zero after BN: a padded conv cannot fold it exactly
    inits["b1"][1] = 0
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 3])
    res = shrink_channels(m)
    assert _inits(res.model)["w1"].shape[0] == 6
    inits2 = dict(inits)
    inits2["w2"] = inits["w2"].copy()
    inits2["w2"][:, 1] = 0  # ... unless the reader does not read it
    res2 = shrink_channels(_model(nodes, inits2, ["N", 3, 8, 8], ["N", 3]))
    assert _inits(res2.model)["w1"].shape[0] == 5
    x = _f(2, 3, 8, 8, scale=1.0)
    np.testing.assert_allclose(_run(res2.model, x), _run(_model(nodes, inits2, ["N", 3, 8, 8], ["N", 3]), x), rtol=1e-5, atol=1e-5)


def test_keras_style_matmul_add_and_reshape():
    inits = {
        "w1": _f(10, 8), "b1": _f(8), "w2": _f(8, 6), "b2": _f(6), "w3": _f(6, 4), "b3": _f(4),
        "shape": np.array([-1, 10], dtype=np.int64),
    }  # fmt: skip
    inits["w1"][:, [0, 5]] = 0  # two units of the first layer
    inits["b1"][0] = 0
    inits["w2"][[2, 3]] = 0  # the second layer ignores units 2 and 3 of the first
    inits["w2"][:, 4] = 0  # and drops its own unit 4: constant tanh(b2[4]) folded into b3
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["xf"]),
        helper.make_node("MatMul", ["xf", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["a2"]),
        helper.make_node("Tanh", ["a2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["m3"]),
        helper.make_node("Add", ["m3", "b3"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 2, 5], ["N", 4])
    res = shrink_channels(m)
    after = _inits(res.model)
    assert after["w1"].shape == (10, 4) and after["w2"].shape == (4, 5) and after["w3"].shape == (5, 4)
    x = _f(5, 2, 5, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_flatten_through_reshape_with_fixed_feature_count():
    inits = {"w1": _f(4, 1, 3, 3), "b1": _f(4), "w2": _f(4 * 4, 3), "shape": np.array([-1, 16], dtype=np.int64)}
    inits["w1"][2] = 0
    inits["b1"][2] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], strides=[2, 2]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 1, 5, 5], ["N", 3])
    res = shrink_channels(m)
    after = _inits(res.model)
    assert after["w1"].shape[0] == 3 and after["w2"].shape == (12, 3)
    x = _f(3, 1, 5, 5, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reader", ["add_branch", "graph_output", "grouped"])
def test_unsupported_readers_keep_every_channel(reader):
    inits = {"w1": _f(4, 4, 1, 1), "w2": _f(4, 4, 1, 1)}
    inits["w1"][1] = 0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"])]
    if reader == "add_branch":  # a residual connection reads the channel too
        nodes += [helper.make_node("Conv", ["r", "w2"], ["c"]), helper.make_node("Add", ["c", "r"], ["y"])]
    elif reader == "graph_output":
        nodes += [helper.make_node("Identity", ["r"], ["y"])]
    else:
        inits["w2"] = _f(4, 2, 1, 1)
        nodes += [helper.make_node("Conv", ["r", "w2"], ["y"], group=2)]
    m = _model(nodes, inits, ["N", 4, 3, 3], ["N", 4, 3, 3])
    res = shrink_channels(m)
    assert res.removed == {}
    assert _inits(res.model)["w1"].shape == (4, 4, 1, 1)


def test_replaced_reshape_target_leaves_no_unused_initializer():
    inits = {"w1": _f(4, 1, 3, 3), "w2": _f(4 * 4, 3), "shape": np.array([-1, 16], dtype=np.int64)}
    inits["w1"][1] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], strides=[2, 2]),
        helper.make_node("Reshape", ["a", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 1, 5, 5], ["N", 3])
    res = shrink_channels(m)
    used = {i for n in res.model.graph.node for i in n.input}
    assert {t.name for t in res.model.graph.initializer} <= used
    x = _f(2, 1, 5, 5, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def _graph_cases():
    """Graphs where removing a dead channel naively would change the outputs (review findings)."""
    X = _f(2, 3, 8, 8, scale=1.0)
    cases = {}
    w1 = _f(3, 4)
    w1[:, 1] = 0
    cases["matmul_rank3_flatten"] = (  # (B,T,C) flattened: the channel is the innermost feature index
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Flatten", ["h"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "w2"], ["y"])],
        {"w1": w1, "w2": _f(8, 5)}, ["N", 2, 3], ["N", 5], _f(1, 2, 3, scale=1.0), [],
    )  # fmt: skip
    wc = _f(4, 3, 7, 7)
    wc[1] = 0
    cases["reshape_rows"] = (  # [-1, 4] makes each row a channel, not a sample
        [helper.make_node("Conv", ["x", "wc"], ["h"]), helper.make_node("Reshape", ["h", "s"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["y"])],
        {"wc": wc, "s": np.array([-1, 4], dtype=np.int64), "w2": _f(4, 3)}, [2, 3, 8, 8], None, X, [],
    )  # fmt: skip
    wc = _f(4, 3, 3, 3)
    wc[1] = 0
    cases["maxpool_indices_output"] = (
        [helper.make_node("Conv", ["x", "wc"], ["h"]),
         helper.make_node("MaxPool", ["h"], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Conv", ["p", "w3"], ["y"])],
        {"wc": wc, "w3": _f(2, 4, 3, 3)}, [2, 3, 8, 8], None, X, ["idx"],
    )  # fmt: skip
    w1 = _f(6, 4)
    w1[:, 1] = 0
    w2 = _f(4, 4)
    w2[1] = 0
    cases["read_twice"] = (
        [helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Gemm", ["h", "w2", "h"], ["y"])],
        {"w1": w1, "w2": w2}, [2, 6], None, _f(2, 6, scale=1.0), [],
    )  # fmt: skip
    return cases


@pytest.mark.parametrize("case", sorted(_graph_cases()))
def test_shrinking_never_changes_outputs(case):
    nodes, inits, x_shape, _, x, extra = _graph_cases()[case]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
        + [helper.make_tensor_value_info(e, TensorProto.INT64, None) for e in extra],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    res = shrink_channels(m)

    def run(model):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, {"x": x})

    for a, b in zip(run(m), run(res.model), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ir", [3, 8])
def test_initializers_listed_as_graph_inputs_shrink_with_their_declarations(ir):
    """Old exports (IR 3 must) list weights as graph inputs too: their declared shapes follow."""
    nodes, inits = _cnn()
    inits["w1"][1] = 0
    inits["w3"][2] = 0
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 3], opset=9 if ir == 3 else 13)
    m.ir_version = ir
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer)
    res = shrink_channels(m)
    assert res.removed and _inits(res.model)["w1"].shape == (5, 3, 3, 3)
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in res.model.graph.input}
    for name, value in _inits(res.model).items():
        assert declared[name] == list(value.shape), name
    x = _f(2, 3, 8, 8, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_biases_of_includes_batchnorm_scale_and_bias():
    """A removed filter's bias and its BatchNormalization's scale and bias are zeroed in training, so
    the channel is exactly 0 after BN and a padded reader can drop it."""
    from onnxadmm.importer.analysis import biases_of

    nodes, inits = _cnn()
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 3])
    got = biases_of(m)
    assert got["w1"] == ["b1", "s", "bb"]
    assert got["w2"] == ["b2"] and got["w3"] == ["c3"] and got["w4"] == ["c4"]
    # with filter 1 and its constants zeroed, even a padded reader drops the channel
    nodes, inits = _cnn(pad_second=1)
    for k in ("w1", "b1", "s", "bb"):
        inits[k][1] = 0
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 3])
    res = shrink_channels(m)
    assert _inits(res.model)["w1"].shape[0] == 5
    x = _f(2, 3, 8, 8, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_output_comparison_tolerates_rounding_only():
    from onnxadmm.compress.pipeline import _same_outputs

    a = [np.array([[1.0, 2.0]], np.float32), np.array([True, False])]
    assert _same_outputs(a, [a[0] + 1e-6, a[1].copy()])[0]
    assert not _same_outputs(a, [a[0] + 1e-2, a[1].copy()])[0]
    assert not _same_outputs(a, [a[0], ~a[1]])[0]  # booleans compare exactly
    h = np.array([100.0, -3.0], np.float16)
    assert _same_outputs([h], [h + np.float16(0.0625)])[0]  # float16: a few ulps
    assert not _same_outputs([h], [h + np.float16(4.0)])[0]
    assert not _same_outputs([h], [h[:1]])[0]


def test_channel_blocks_of_dense_layers_after_a_flatten():
    from onnxadmm.export.shrink import channel_blocks

    nodes, inits = _cnn()
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 3])
    assert channel_blocks(m) == {"w3": (5, False)}  # fc reads conv2's 5 channels x 2x2; w4 a dense layer
    # channels last (Keras): the features of a channel are every 5th
    nodes, inits = _keras_cnn()
    assert channel_blocks(_model(nodes, inits, ["N", 8, 8, 1], ["N", 3])) == {"w3": (5, True)}


@pytest.mark.parametrize(
    "op,attrs",
    [("HardSwish", {}), ("Softsign", {}), ("Abs", {}), ("Neg", {}), ("Mish", {}), ("Selu", {}), ("Elu", {"alpha": 0.5}),
     ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("Softplus", {}), ("LeakyRelu", {"alpha": 0.2})],
)  # fmt: skip
def test_constant_channel_carried_through_activations(op, attrs):
    """A removed filter's constant output goes through the activation and folds into the next
    (unpadded) convolution's bias: same outputs in onnxruntime."""
    inits = {"w1": _f(4, 3, 3, 3), "b1": _f(4), "w2": _f(2, 4, 3, 3), "b2": _f(2)}
    inits["w1"][2] = 0  # constant b1[2] after the first layer, act(b1[2]) after the activation
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"]),
        helper.make_node(op, ["a"], ["r"], **attrs),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"]),
    ]
    opset = 18 if op == "Mish" or op == "HardSwish" else 13
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 2, 4, 4], opset=opset)
    res = shrink_channels(m)
    assert res.removed == {"w1": 1}
    x = _f(2, 3, 8, 8, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_reshape_target_in_a_constant_node():
    """PyTorch exports write x.view(-1, K)'s target as a Constant node: it is replaced, and dropped."""
    inits = {"w1": _f(4, 1, 3, 3), "w2": _f(4 * 4, 3)}
    inits["w1"][2] = 0
    target = numpy_helper.from_array(np.array([-1, 16], dtype=np.int64))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], strides=[2, 2]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Constant", [], ["shape"], value=target),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 1, 5, 5], ["N", 3])
    res = shrink_channels(m)
    assert _inits(res.model)["w2"].shape == (12, 3)
    assert "Constant" not in [n.op_type for n in res.model.graph.node]
    x = _f(3, 1, 5, 5, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_reshape_with_a_target_computed_from_the_tensor():
    """Older PyTorch exports flatten with x.view(x.size(0), -1): Shape, Gather, Unsqueeze, Concat."""
    inits = {
        "w1": _f(4, 1, 3, 3), "w2": _f(4 * 4, 3), "zero": np.array(0, dtype=np.int64),
        "minus1": np.array([-1], dtype=np.int64), "ax0": np.array([0], dtype=np.int64),
    }  # fmt: skip
    inits["w1"][1] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], strides=[2, 2]),
        helper.make_node("Shape", ["a"], ["sh"]),
        helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["a", "target"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["y"]),
    ]
    x = _f(3, 1, 5, 5, scale=1.0)
    for source in ("a", "x"):  # the batch read from the channel tensor itself, or from the input
        nodes[1] = helper.make_node("Shape", [source], ["sh"])
        m = _model(nodes, inits, ["N", 1, 5, 5], ["N", 3])
        res = shrink_channels(m)
        assert res.removed == {"w1": 1} and _inits(res.model)["w2"].shape == (12, 3)
        np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)
    # a Shape whose channel count is used (here: the second entry) blocks the channel
    inits["one"] = np.array(1, dtype=np.int64)
    nodes[2] = helper.make_node("Gather", ["sh", "one"], ["n"], axis=0)
    nodes[1] = helper.make_node("Shape", ["a"], ["sh"])
    nodes[4] = helper.make_node("Concat", ["minus1", "n1"], ["target"], axis=0)
    m = _model(nodes, inits, ["N", 1, 5, 5], ["A", "B"])
    assert shrink_channels(m).removed == {}


def test_blocked_layers_say_what_keeps_their_channels():
    inits = {"w1": _f(4, 4, 1, 1), "w2": _f(4, 4, 1, 1)}
    inits["w1"][1] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["c"]),
        helper.make_node("Add", ["c", "r"], ["y"], name="residual"),
    ]
    res = shrink_channels(_model(nodes, inits, ["N", 4, 3, 3], ["N", 4, 3, 3]))
    assert res.removed == {}
    # the residual sum is followed (w1 and w2 together) up to the graph output
    assert res.blocked == {"w1": "graph output 'y'", "w2": "graph output 'y'"}
    # a sum with the graph input: the other branch has no layer whose filter could go
    nodes[3] = helper.make_node("Add", ["c", "x"], ["y"], name="skip")
    res = shrink_channels(_model(nodes, inits, ["N", 4, 3, 3], ["N", 4, 3, 3]))
    assert res.blocked["w2"] == "Add node 'skip' (adds a tensor from another source)"


def _residual(bn=True):
    """ResNet-style: stem conv (BN, ReLU) -> block [conv-BN-ReLU-conv-BN] + identity -> ReLU ->
    block with a 1x1 projection shortcut -> ReLU -> global pool -> flatten -> gemm."""
    inits = {
        "w0": _f(6, 3, 3, 3), "b0": _f(6),
        "w1": _f(6, 6, 3, 3), "b1": _f(6),
        "w2": _f(6, 6, 3, 3), "b2": _f(6),
        "w3": _f(8, 6, 3, 3), "b3": _f(8),
        "w4": _f(8, 8, 3, 3), "b4": _f(8),
        "wp": _f(8, 6, 1, 1), "bp": _f(8),
        "wf": _f(5, 8), "bf": _f(5),
    }  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["a0"], pads=[1] * 4)]
    if bn:
        inits.update({"s0": 1 + _f(6, scale=0.1), "t0": _f(6), "m0": _f(6), "v0": 1 + np.abs(_f(6))})
        nodes.append(helper.make_node("BatchNormalization", ["a0", "s0", "t0", "m0", "v0"], ["n0"]))
    else:
        nodes.append(helper.make_node("Identity", ["a0"], ["n0"]))
    nodes += [
        helper.make_node("Relu", ["n0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["a1"], pads=[1] * 4),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["a2"], pads=[1] * 4),
        helper.make_node("Add", ["a2", "r0"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["a3"], pads=[1] * 4),
        helper.make_node("Relu", ["a3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["a4"], pads=[1] * 4),
        helper.make_node("Conv", ["r2", "wp", "bp"], ["ap"]),
        helper.make_node("Add", ["ap", "a4"], ["s2"]),
        helper.make_node("Relu", ["s2"], ["r4"]),
        helper.make_node("GlobalAveragePool", ["r4"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    return nodes, inits


def test_residual_sums_couple_their_layers():
    from onnxadmm.export.shrink import coupled_layers, removable_channels

    nodes, inits = _residual()
    m = _model(nodes, inits, ["N", 3, 6, 6], ["N", 5])
    assert sorted(map(sorted, coupled_layers(m))) == [["w0", "w2"], ["w4", "wp"]]
    got = removable_channels(m)
    assert got == {n: None for n in ("w0", "w1", "w2", "w3", "w4", "wp")} | {"wf": "graph output 'y'"}
    # inspect shows the groups
    from onnxadmm.validate.inspect import describe, format_description

    d = describe(m)
    tied = {x["name"]: x["tied_group"] for x in d["layers"]}
    assert tied["w0"] == tied["w2"] != tied["w4"] == tied["wp"] and tied["w1"] is None and tied["w4"]
    assert "removable (tied group" in format_description(d)


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "no-bn"])
def test_residual_stream_loses_a_filter_pruned_in_every_branch(bn):
    """Filter 2 pruned in the stem and in the block's last conv (the two sides of the first sum),
    filter 5 in the second stage's two sides: those channels go from both producers and from every
    reader of the stream (the block's first conv, the next stage's conv and projection, the head),
    their constants folded into the readers' biases; outputs unchanged in onnxruntime."""
    nodes, inits = _residual(bn=bn)
    # as training zeroes them: the removed filters' biases (and BN scale and shift), so the stream's
    # channel is exactly 0 where padded convolutions read it
    for k in ("w0", "b0", "w2", "b2") + (("s0", "t0") if bn else ()):
        inits[k][2] = 0
    inits["w4"][5] = 0
    inits["wp"][5] = 0
    inits["w1"][3] = inits["b1"][3] = 0  # inside the block: not summed, goes alone
    m = _model(nodes, inits, ["N", 3, 6, 6], ["N", 5])
    res = shrink_channels(m)
    after = _inits(res.model)
    x = RNG.standard_normal((4, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)
    assert after["w0"].shape[0] == after["w2"].shape[0] == 5
    assert after["w1"].shape == (5, 5, 3, 3) and after["w2"].shape[1] == 5
    assert after["w3"].shape[1] == after["wp"].shape[1] == 5
    assert after["w4"].shape[0] == after["wp"].shape[0] == 7 and after["wf"].shape == (5, 7)
    assert res.removed == {"w0": 1, "w2": 1, "w1": 1, "w4": 1, "wp": 1}
    if bn:
        assert after["s0"].shape == (5,)


def test_residual_filter_pruned_on_one_side_only_stays():
    nodes, inits = _residual()
    inits["w0"][2] = 0  # the sum still carries w2's filter 2
    inits["w4"][5] = 0
    m = _model(nodes, inits, ["N", 3, 6, 6], ["N", 5])
    res = shrink_channels(m)
    assert res.removed == {}
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)


def test_concat_of_two_layers_then_batchnorm_and_conv():
    """SqueezeNet's fire module: two convolutions side by side (Concat), then BN and a reader; each
    layer's removed filters are a slice of the reader's input channels and of the BN parameters."""
    inits = {
        "e1": _f(3, 2, 1, 1), "e3": _f(4, 2, 3, 3), "s": 1 + _f(7, scale=0.1), "bb": _f(7), "mu": _f(7),
        "var": 1 + np.abs(_f(7)), "w": _f(2, 7, 3, 3), "b": _f(2),
    }  # fmt: skip
    inits["e1"][1] = 0  # output channel 1 of the Concat (constant after BN: folded, the reader is unpadded)
    inits["e3"][[0, 2]] = 0  # output channels 3 and 5
    inits["w"][:, 6] = 0  # the reader ignores channel 6, i.e. e3's filter 3
    nodes = [
        helper.make_node("Conv", ["x", "e1"], ["a1"]),
        helper.make_node("Conv", ["x", "e3"], ["a3"], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a1", "a3"], ["cat"], axis=1),
        helper.make_node("BatchNormalization", ["cat", "s", "bb", "mu", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Conv", ["r", "w", "b"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 2, 6, 6], ["N", 2, 4, 4])
    res = shrink_channels(m)
    after = _inits(res.model)
    assert after["e1"].shape[0] == 2 and after["e3"].shape[0] == 1
    assert after["w"].shape == (2, 3, 3, 3) and after["s"].shape == (3,)
    x = _f(3, 2, 6, 6, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inner,attrs", [("Sigmoid", {}), ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5})])
def test_swish_written_as_mul_of_the_tensor_and_its_gate(inner, attrs):
    """SiLU (x * sigmoid(x)) and HardSwish (x * hardsigmoid(x)) as two nodes are followed as one."""
    inits = {"w1": _f(4, 3, 3, 3), "b1": _f(4), "w2": _f(2, 4, 3, 3), "b2": _f(2)}
    inits["w1"][1] = 0  # constant b1[1] * f(b1[1]) after the activation: folded into b2
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"]),
        helper.make_node(inner, ["a"], ["g"], **attrs),
        helper.make_node("Mul", ["g", "a"], ["r"]),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 2, 4, 4])
    res = shrink_channels(m)
    assert res.removed == {"w1": 1}
    x = _f(2, 3, 8, 8, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)
    # the gate read by something else too (a second reader of g): refused
    nodes.append(helper.make_node("Identity", ["g"], ["g2"]))
    m2 = _model(nodes, inits, ["N", 3, 8, 8], ["N", 2, 4, 4])
    m2.graph.output.append(helper.make_tensor_value_info("g2", TensorProto.FLOAT, None))
    assert shrink_channels(m2).removed == {}


def test_depthwise_convolution_between_two_layers():
    """MobileNet's block: 1x1 expand, BN, ReLU6, 3x3 depthwise (padded), BN, ReLU6, 1x1 project. An
    expand filter that is exactly 0 goes, with its depthwise filter and BN entries; one that is a
    non-zero constant cannot cross the padded depthwise filter exactly and stays."""
    inits = {
        "w1": _f(6, 3, 1, 1), "b1": _f(6), "s1": 1 + _f(6, scale=0.1), "o1": _f(6), "m1": _f(6),
        "v1": 1 + np.abs(_f(6)), "wd": _f(6, 1, 3, 3), "bd": _f(6), "s2": 1 + _f(6, scale=0.1), "o2": _f(6),
        "m2": _f(6), "v2": 1 + np.abs(_f(6)), "wp": _f(4, 6, 1, 1), "lo": np.array(0, np.float32),
        "hi": np.array(6, np.float32),
    }  # fmt: skip
    for k in ("w1", "b1", "s1", "o1"):
        inits[k][[1, 4]] = 0  # zeroed with their BN scale and bias, as training does
    inits["w1"][2] = 0  # a constant b1[2] that BN and ReLU6 keep positive: it stays
    inits["b1"][2], inits["s1"][2], inits["o1"][2] = inits["m1"][2] + 1, 1.0, 0.5
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"]),
        helper.make_node("BatchNormalization", ["a", "s1", "o1", "m1", "v1"], ["n1"]),
        helper.make_node("Clip", ["n1", "lo", "hi"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["d"], group=6, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["d", "s2", "o2", "m2", "v2"], ["n2"]),
        helper.make_node("Clip", ["n2", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "wp"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 3, 5, 5], ["N", 4, 5, 5])
    from onnxadmm.export.shrink import coupled_layers

    # filter pruning prunes the depthwise filters together with the expand filters that feed them
    assert coupled_layers(m) == [["w1", "wd"]]
    from onnxadmm.export.shrink import removable_channels

    assert removable_channels(m)["wd"] is None  # (it goes with w1, whose channels can go)
    res = shrink_channels(m)
    after = _inits(res.model)
    assert after["w1"].shape[0] == 4 and after["wd"].shape[0] == 4 and after["wp"].shape[1] == 4
    assert after["s2"].shape == (4,) and after["bd"].shape == (4,)
    dw = next(n for n in res.model.graph.node if n.input[1] == "wd")
    assert next(a.i for a in dw.attribute if a.name == "group") == 4
    x = _f(2, 3, 5, 5, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_removable_channels_says_what_keeps_each_layer():
    from onnxadmm.export.shrink import removable_channels

    nodes, inits = _cnn()
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 3])
    got = removable_channels(m)
    assert got == {"w1": None, "w2": None, "w3": None, "w4": "graph output 'y'"}
    # the inspect command shows it per layer
    from onnxadmm.validate.inspect import describe, format_description

    d = describe(m)
    assert [x["channels_kept_by"] for x in d["layers"]] == [None, None, None, "graph output 'y'"]
    assert "kept: graph output 'y'" in format_description(d)


def _keras_cnn(flatten="reshape"):
    """What keras2onnx / tf2onnx write: NHWC input transposed for the Conv, the conv output transposed
    back to NHWC before the flatten, so each feature is position * channels + channel."""
    inits = {
        "w1": _f(4, 1, 3, 3), "b1": _f(4),
        "w2": _f(5, 4, 3, 3), "b2": _f(5),
        "w3": _f(2 * 2 * 5, 6), "c3": _f(6),
        "w4": _f(6, 3), "c4": _f(3),
        "target": np.array([-1, 20], np.int64),
    }  # fmt: skip
    flat = (
        helper.make_node("Reshape", ["t2", "target"], ["f"])
        if flatten == "reshape"
        else helper.make_node("Flatten", ["t2"], ["f"], axis=1)
    )
    if flatten != "reshape":
        inits.pop("target")
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["xt", "w1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        # back to NHWC and again to NCHW between the convolutions (unoptimised exports do this)
        helper.make_node("Transpose", ["r1"], ["h1"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["h1"], ["c1"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["a2"]),
        helper.make_node("MaxPool", ["a2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p2"], ["t2"], perm=[0, 2, 3, 1]),
        flat,
        helper.make_node("MatMul", ["f", "w3"], ["m3"]),
        helper.make_node("Add", ["m3", "c3"], ["a3"]),
        helper.make_node("Relu", ["a3"], ["r3"]),
        helper.make_node("MatMul", ["r3", "w4"], ["m4"]),
        helper.make_node("Add", ["m4", "c4"], ["y"]),
    ]
    return nodes, inits


@pytest.mark.parametrize("flatten", ["reshape", "flatten"])
def test_channels_last_flatten_keras_export(flatten):
    """A filter removed before an NHWC flatten takes every channels-th feature of the dense layer
    (interleaved, not a block); a constant channel folds into the MatMul's bias Add."""
    nodes, inits = _keras_cnn(flatten)
    inits["w2"][1] = 0  # conv2 filter 1: constant b2[1] (through the max pool), folded into c3
    inits["w2"][3] = 0
    inits["b2"][3] = 0  # filter 3: exactly 0
    inits["w1"][2] = 0  # conv1 filter 2: constant relu(b1[2]) (through two Transposes), conv2 unpadded
    m = _model(nodes, inits, ["N", 8, 8, 1], ["N", 3])
    res = shrink_channels(m)
    assert res.removed == {"w1": 1, "w2": 2}
    w = _inits(res.model)
    assert w["w2"].shape == (3, 3, 3, 3) and w["w3"].shape == (12, 6)
    keep = [k for k in range(20) if k % 5 not in (1, 3)]  # features p * 5 + c of channels 0, 2, 4
    np.testing.assert_array_equal(w["w3"], inits["w3"][keep])
    x = _f(3, 8, 8, 1, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_matmul_on_channels_last_tensor_reads_channels():
    """A MatMul on an NHWC tensor (a Keras Dense on a feature map, i.e. a 1x1 convolution) reads the
    channels on its contracted axis: they go like a dense layer's inputs."""
    inits = {"w1": _f(4, 2, 3, 3), "b1": _f(4), "w2": _f(4, 3), "c2": _f(3)}
    inits["w1"][0] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a1"]),
        helper.make_node("Transpose", ["a1"], ["t1"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t1", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "c2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 2, 5, 5], ["N", 3, 3, 3])
    res = shrink_channels(m)
    assert res.removed == {"w1": 1} and _inits(res.model)["w2"].shape == (3, 3)
    x = _f(2, 2, 5, 5, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_transpose_that_does_not_move_channels_to_an_end_is_not_followed():
    inits = {"w1": _f(4, 2, 3, 3), "b1": _f(4), "w2": _f(3, 3), "c2": _f(3)}
    inits["w1"][0] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a1"]),
        helper.make_node("Transpose", ["a1"], ["t1"], perm=[0, 2, 1, 3]),  # channels to axis 2
        helper.make_node("MatMul", ["t1", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "c2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 2, 5, 5], ["N", 3, 4, 3])
    res = shrink_channels(m)
    assert res.removed == {} and "Transpose" in res.blocked["w1"]


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_between_layers(mode):
    """A spatial Pad keeps a zero channel zero (constant mode) and any constant channel constant
    (edge, reflect): those fold into the next convolution; a non-zero constant padded with zeros
    does not (its border changes), so that filter stays."""
    inits = {"w1": _f(4, 2, 3, 3), "b1": _f(4), "w2": _f(3, 4, 3, 3), "b2": _f(3),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}  # fmt: skip
    inits["w1"][0] = 0
    inits["b1"][0] = 0  # filter 0: exactly zero
    inits["w1"][2] = 0  # filter 2: constant b1[2] != 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a1"]),
        helper.make_node("Pad", ["a1", "pads"], ["p1"], mode=mode),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 2, 6, 6], ["N", 3, 4, 4])
    res = shrink_channels(m)
    assert res.removed == {"w1": 1 if mode == "constant" else 2}
    x = _f(2, 2, 6, 6, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_pad_of_the_channel_axis_blocks():
    inits = {"w1": _f(4, 2, 3, 3), "b1": _f(4), "w2": _f(3, 5, 1, 1), "b2": _f(3),
             "pads": np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64)}  # fmt: skip
    inits["w1"][0] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a1"]),
        helper.make_node("Pad", ["a1", "pads"], ["p1"]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 2, 6, 6], ["N", 3, 4, 4])
    res = shrink_channels(m)
    assert res.removed == {} and "Pad" in res.blocked["w1"]


def test_instance_normalization_between_layers():
    """A constant channel comes out of InstanceNormalization as that channel's bias; its scale and
    bias are sliced with the channel (style-transfer networks such as candy)."""
    inits = {"w1": _f(4, 2, 3, 3), "b1": _f(4), "s": 1 + _f(4, scale=0.1), "bi": _f(4),
             "w2": _f(3, 4, 3, 3), "b2": _f(3)}  # fmt: skip
    inits["w1"][1] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a1"]),
        helper.make_node("InstanceNormalization", ["a1", "s", "bi"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 2, 8, 8], ["N", 3, 4, 4])
    res = shrink_channels(m)
    assert res.removed == {"w1": 1}
    w = _inits(res.model)
    assert w["s"].shape == (3,) and w["bi"].shape == (3,) and w["w2"].shape == (3, 3, 3, 3)
    x = _f(2, 2, 8, 8, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)


def test_paddle_style_constant_weights_and_hardswish_chain():
    """PaddlePaddle exports hold every weight in a Constant node and write HardSwish as
    x * Clip(x + 3, 0, 6) / 6: the weights become initializers of the same name and are sliced; the
    constant channel goes through the three-node gate and folds into the next convolution."""
    vals = {"w1": _f(4, 2, 3, 3), "b1": _f(4), "w2": _f(3, 4, 3, 3), "b2": _f(3),
            "three": np.array(3.0, np.float32), "lo": np.array(0.0, np.float32),
            "hi": np.array(6.0, np.float32), "six": np.array(6.0, np.float32)}  # fmt: skip
    vals["w1"][1] = 0  # filter 1: constant b1[1]
    consts = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in vals.items()]
    nodes = consts + [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a1"]),
        helper.make_node("Add", ["a1", "three"], ["s1"]),
        helper.make_node("Clip", ["s1", "lo", "hi"], ["c1"]),
        helper.make_node("Div", ["c1", "six"], ["d1"]),
        helper.make_node("Mul", ["a1", "d1"], ["h1"]),
        helper.make_node("Conv", ["h1", "w2", "b2"], ["y"]),
    ]
    m = _model(nodes, {}, ["N", 2, 8, 8], ["N", 3, 4, 4])
    res = shrink_channels(m)
    assert res.removed == {"w1": 1}
    w = _inits(res.model)
    assert w["w1"].shape == (3, 2, 3, 3) and w["w2"].shape == (3, 3, 3, 3)
    assert not any(n.op_type == "Constant" and n.output[0] in ("w1", "w2") for n in res.model.graph.node)
    x = _f(2, 2, 8, 8, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)
    assert any(n.op_type == "Constant" for n in m.graph.node)  # the input model is left as it was


@pytest.mark.parametrize("bias", [0.0, 0.7], ids=["zero", "constant"])
def test_conv_transpose_reader_loses_only_zero_channels(bias):
    """A ConvTranspose reads a pruned filter's channel: a 0 channel goes (its weight row with it), a
    nonzero constant one stays (through a transposed kernel it is not constant at the borders)."""
    inits = {"w1": _f(4, 3, 3, 3), "b1": _f(4), "wt": _f(4, 2, 3, 3), "bt": _f(2)}
    inits["w1"][1] = 0
    inits["b1"][1] = bias
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1] * 4),
        helper.make_node("Crop", ["a"], ["c"], border=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["y"], strides=[2, 2]),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 13, 13])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    res = shrink_channels(m)
    after = _inits(res.model)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)
    assert after["wt"].shape == ((3, 2, 3, 3) if bias == 0 else (4, 2, 3, 3))
    assert res.removed == ({"w1": 1} if bias == 0 else {})


@pytest.mark.parametrize("bias", [0.0, 0.7])
def test_conv_transpose_producer_loses_its_empty_filters(bias):
    """A ConvTranspose whose output channel has no weight outputs its bias there: the channel goes
    (the weight's column with it) and a reader without padding folds the constant into its bias."""
    inits = {"w1": _f(4, 3, 3, 3), "b1": _f(4), "wt": _f(4, 5, 3, 3), "bt": _f(5), "w2": _f(2, 5, 3, 3), "b2": _f(2)}
    inits["wt"][:, [1, 3]] = 0
    inits["bt"][[1, 3]] = bias
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["t"], strides=[2, 2]),
        helper.make_node("Relu", ["t"], ["rt"]),
        helper.make_node("Conv", ["rt", "w2", "b2"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 3, 6, 6], ["N", 2, 11, 11])
    res = shrink_channels(m)
    after = _inits(res.model)
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)
    assert after["wt"].shape == (4, 3, 3, 3) and after["bt"].shape == (3,)
    assert after["w2"].shape == (2, 3, 3, 3)
    assert res.removed == {"wt": 2}
    from onnxadmm.export.shrink import removable_channels

    assert removable_channels(m)["wt"] is None


def _per_channel_model(style: str):
    """conv (3 -> 5, no bias) - per-channel arithmetic of ``style`` - relu - conv (no padding)."""
    inits = {"w1": _f(5, 3, 3, 3), "w2": _f(2, 5, 3, 3), "b2": _f(2)}
    inits["w1"][[1, 3]] = 0  # two filters pruned whole: their channels are constants
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4)]
    if style == "paddle-bias":  # Constant [C] -> Reshape to [1, C, 1, 1] -> Add
        nodes += [
            helper.make_node("Constant", [], ["bias"], value=numpy_helper.from_array(_f(5), "bias")),
            helper.make_node(
                "Constant", [], ["target"], value=numpy_helper.from_array(np.array([1, 5, 1, 1], np.int64), "target")
            ),
            helper.make_node("Reshape", ["bias", "target"], ["b4"]),
            helper.make_node("Add", ["a", "b4"], ["z"]),
        ]
    elif style == "unsqueeze-bias":  # [C] -> Unsqueeze to [C, 1, 1] -> Add with the bias first
        inits.update(bias=_f(5), axes=np.array([1, 2], np.int64))
        nodes += [helper.make_node("Unsqueeze", ["bias", "axes"], ["b3"]), helper.make_node("Add", ["b3", "a"], ["z"])]
    elif style == "scale-shift":  # a decomposed BatchNormalization: Mul [1, C, 1, 1], Sub [C, 1, 1]
        inits.update(scale=(1 + _f(1, 5, 1, 1, scale=0.1)), shift=_f(5, 1, 1))
        nodes += [helper.make_node("Mul", ["a", "scale"], ["m"]), helper.make_node("Sub", ["shift", "m"], ["z"])]
    elif style == "divide":
        inits.update(d=(2 + np.abs(_f(1, 5, 1, 1))))
        nodes += [helper.make_node("Div", ["a", "d"], ["z"])]
    nodes += [helper.make_node("Relu", ["z"], ["r"]), helper.make_node("Conv", ["r", "w2", "b2"], ["y"])]
    return _model(nodes, inits, ["N", 3, 6, 6], ["N", 2, 4, 4])


@pytest.mark.parametrize("style", ["paddle-bias", "unsqueeze-bias", "scale-shift", "divide"])
def test_per_channel_constants_are_sliced_with_their_channel(style):
    """A channel-wise Add/Sub/Mul/Div by a per-channel constant (a PaddlePaddle conv bias reshaped to
    [1, C, 1, 1], a decomposed BatchNormalization) goes with the channel; the constant a pruned
    filter leaves passes through it and folds into the reader's bias."""
    m = _per_channel_model(style)
    res = shrink_channels(m)
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)
    assert res.removed == {"w1": 2}
    after = _inits(res.model)
    assert after["w1"].shape == (3, 3, 3, 3) and after["w2"].shape == (2, 3, 3, 3)
    per_channel = {"paddle-bias": ["bias"], "unsqueeze-bias": ["bias"], "scale-shift": ["scale", "shift"], "divide": ["d"]}
    assert all(after[k].size == 3 for k in per_channel[style])
    onnx.checker.check_model(res.model)


def test_shared_per_channel_constant_blocks():
    """A per-channel constant that another node reads too cannot be sliced: the channels stay."""
    m = _per_channel_model("divide")
    m.graph.node.append(helper.make_node("Identity", ["d"], ["d_copy"]))
    m.graph.output.append(helper.make_tensor_value_info("d_copy", TensorProto.FLOAT, [1, 5, 1, 1]))
    res = shrink_channels(m)
    assert res.removed == {} and "Div" in res.blocked["w1"]


def test_residual_sum_of_layers_with_reshaped_biases():
    """PaddlePaddle-style biases (Reshape of a [C] constant, Add) on both layers of a residual sum,
    with symbolic spatial sizes: the bias Add is not a sum of branches, the two layers are grouped
    through it, and a channel pruned in both goes from both."""
    inits = {"w1": _f(4, 3, 3, 3), "w2": _f(4, 4, 3, 3), "w3": _f(2, 4, 3, 3), "target": np.array([1, 4, 1, 1], np.int64)}
    b1, b2 = _f(4), _f(4)
    inits["w1"][2], inits["w2"][2], b1[2] = 0, 0, 0.0
    nodes = [
        helper.make_node("Constant", [], ["b1"], value=numpy_helper.from_array(b1, "b1")),
        helper.make_node("Constant", [], ["b2"], value=numpy_helper.from_array(b2, "b2")),
        helper.make_node("Conv", ["x", "w1"], ["a1"], pads=[1] * 4),
        helper.make_node("Reshape", ["b1", "target"], ["b1r"]),
        helper.make_node("Add", ["a1", "b1r"], ["z1"]),
        helper.make_node("Relu", ["z1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["a2"], pads=[1] * 4),
        helper.make_node("Reshape", ["b2", "target"], ["b2r"]),
        helper.make_node("Add", ["a2", "b2r"], ["z2"]),
        helper.make_node("Add", ["r1", "z2"], ["s"]),
        helper.make_node("Relu", ["s"], ["rs"]),
        helper.make_node("Conv", ["rs", "w3"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 3, "H", "W"], ["N", 2, "H2", "W2"])
    res = shrink_channels(m)
    x = RNG.standard_normal((2, 3, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)
    assert res.removed == {"w1": 1, "w2": 1}
    after = _inits(res.model)
    assert after["w2"].shape == (3, 3, 3, 3) and after["w3"].shape == (2, 3, 3, 3)
    assert after["b1"].shape == after["b2"].shape == (3,)


def _se_block(case: str):
    """conv P (3 -> 6) - relu = t; squeeze-and-excitation: GlobalAveragePool(t) - conv S (6 -> 2) -
    relu - conv E (2 -> 6) - sigmoid = g; t * g - conv R (no padding)."""
    inits = {
        "wp": _f(6, 3, 3, 3), "bp": _f(6), "ws": _f(2, 6, 1, 1), "bs": _f(2),
        "we": _f(6, 2, 1, 1), "be": _f(6), "wr": _f(2, 6, 3, 3), "br": _f(2),
    }  # fmt: skip
    inits["wp"][4] = 0
    if case == "both":  # coupled filter pruning: the same filter gone from P and E, biases kept
        inits["we"][4] = 0
        inits["bp"][4] = 0.3
    else:  # P's filter and bias zero: t's channel is 0, whatever E's gate makes of it
        inits["bp"][4] = 0.0
    nodes = [
        helper.make_node("Conv", ["x", "wp", "bp"], ["p"], pads=[1] * 4),
        helper.make_node("Relu", ["p"], ["t"]),
        helper.make_node("GlobalAveragePool", ["t"], ["pool"]),
        helper.make_node("Conv", ["pool", "ws", "bs"], ["s"]),
        helper.make_node("Relu", ["s"], ["rs"]),
        helper.make_node("Conv", ["rs", "we", "be"], ["e"]),
        helper.make_node("Sigmoid", ["e"], ["g"]),
        helper.make_node("Mul", ["t", "g"], ["m"]),
        helper.make_node("Conv", ["m", "wr", "br"], ["y"]),
    ]
    return _model(nodes, inits, ["N", 3, 6, 6], ["N", 2, 4, 4])


@pytest.mark.parametrize("case", ["both", "feature-zero"])
def test_squeeze_excitation_product_loses_channels_on_both_sides(case):
    """t * gate(t): channel c of the product is t_c * g_c, so the layer making t and the one making
    the gates (E) are one group; a channel goes from both when the product is constant there."""
    from onnxadmm.export.shrink import coupled_layers, removable_channels

    m = _se_block(case)
    assert ["wp", "we"] in [sorted(g, reverse=True) for g in coupled_layers(m)]
    assert removable_channels(m)["wp"] is None and removable_channels(m)["we"] is None
    res = shrink_channels(m)
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)
    assert res.removed == {"wp": 1, "we": 1}
    after = _inits(res.model)
    assert after["wp"].shape[0] == after["we"].shape[0] == after["ws"].shape[1] == after["wr"].shape[1] == 5


def test_product_with_an_unpruned_gate_keeps_a_nonzero_channel():
    """Only P's filter pruned, with a nonzero bias: the product t_c * g_c still varies (the gate
    does), so the channel stays in both layers."""
    m = _se_block("feature-zero")
    inits = {t.name: t for t in m.graph.initializer}
    bp = numpy_helper.to_array(inits["bp"]).copy()
    bp[4] = 0.3
    inits["bp"].CopyFrom(numpy_helper.from_array(bp, "bp"))
    res = shrink_channels(m)
    assert "wp" not in res.removed and "we" not in res.removed


@pytest.mark.parametrize("op", ["Resize", "Upsample"])
def test_feature_pyramid_sum_through_an_upsample(op):
    """A top-down feature pyramid: coarse features upsampled (Resize / Upsample with scales 1, 1, 2, 2)
    and added to a lateral layer's: the two layers are one group, and a channel pruned in both goes
    (a constant channel stays constant through the interpolation)."""
    inits = {
        "wa": _f(4, 3, 3, 3), "ba": _f(4), "wb": _f(4, 3, 1, 1), "bb": _f(4), "wr": _f(2, 4, 3, 3),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }  # fmt: skip
    inits["wa"][1], inits["wb"][1] = 0, 0
    up = (
        helper.make_node("Resize", ["a", "", "scales"], ["u"], mode="linear")
        if op == "Resize"
        else helper.make_node("Upsample", ["a", "scales"], ["u"], mode="nearest")
    )
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1] * 4, strides=[2, 2]),
        up,
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"]),
        helper.make_node("Add", ["u", "b"], ["s"]),
        helper.make_node("Conv", ["s", "wr"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 2, 6, 6], opset=13 if op == "Resize" else 9)
    res = shrink_channels(m)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-4, atol=1e-4)
    assert res.removed == {"wa": 1, "wb": 1} and _inits(res.model)["wr"].shape == (2, 3, 3, 3)


def test_resize_that_scales_the_channels_is_not_followed():
    inits = {"wa": _f(4, 3, 3, 3), "wr": _f(2, 8, 3, 3), "scales": np.array([1, 2, 1, 1], np.float32)}
    inits["wa"][1] = 0
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1] * 4),
        helper.make_node("Resize", ["a", "", "scales"], ["u"], mode="nearest"),
        helper.make_node("Conv", ["u", "wr"], ["y"]),
    ]
    m = _model(nodes, inits, ["N", 3, 8, 8], ["N", 2, 6, 6])
    res = shrink_channels(m)
    assert res.removed == {} and "Resize" in res.blocked["wa"]


def _reduce_pooled(op: str, axes, keepdims: int, opset: int, flatten: bool):
    """conv - relu - conv - relu - Reduce{Mean,Max,Min} (global pooling as torch's dynamo exporter
    writes x.mean((2, 3))) - [Flatten] - gemm; conv2's filters 1 and 3 pruned."""
    inits = {"w1": _f(4, 3, 3, 3), "b1": _f(4), "w2": _f(6, 4, 3, 3), "b2": _f(6), "w3": _f(5, 6), "c3": _f(5)}
    inits["w2"][[1, 3]] = 0
    kw = {"keepdims": keepdims}
    ins = ["r2"]
    if opset >= 18:
        inits["axes"] = np.asarray(axes, np.int64)
        ins.append("axes")
    else:
        kw["axes"] = axes
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node(op, ins, ["p"], **kw),
    ]
    feats = "p"
    if flatten:
        nodes.append(helper.make_node("Flatten", ["p"], ["f"], axis=1))
        feats = "f"
    nodes.append(helper.make_node("Gemm", [feats, "w3", "c3"], ["y"], transB=1))
    return _model(nodes, inits, ["N", 3, 7, 7], ["N", 5], opset=opset)


@pytest.mark.parametrize(
    "op, axes, keepdims, opset, flatten",
    [
        ("ReduceMean", [2, 3], 0, 18, False),  # dynamo: x.mean((2, 3))
        ("ReduceMean", [-2, -1], 1, 18, True),  # dynamo: adaptive_avg_pool2d(x, 1).flatten(1)
        ("ReduceMax", [2, 3], 0, 13, False),  # axes as an attribute (before opset 18)
        ("ReduceMin", [3, 2], 1, 13, True),
    ],
)
def test_global_pooling_written_as_a_reduce(op, axes, keepdims, opset, flatten):
    """A reduction over the spatial axes passes a constant channel on: conv2's dead filters go with
    the dense layer's columns that read them, and the outputs stay the same."""
    m = _reduce_pooled(op, axes, keepdims, opset, flatten)
    res = shrink_channels(m)
    after = _inits(res.model)
    assert after["w2"].shape == (4, 4, 3, 3) and after["w3"].shape == (5, 4)
    onnx.checker.check_model(res.model, full_check=True)
    x = _f(3, 3, 7, 7, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axes", [[1, 2, 3], [1], [0]])
def test_reduce_over_the_channel_or_batch_axis_blocks(axes):
    m = _reduce_pooled("ReduceMean", axes, 1, 13, True)
    if axes == [0]:  # (the Gemm then reads 6 x 7 x 7 features: give it a matching weight)
        w3 = numpy_helper.from_array(_f(5, 6 * 7 * 7), "w3")
        next(t for t in m.graph.initializer if t.name == "w3").CopyFrom(w3)
    elif axes == [1, 2, 3]:
        w3 = numpy_helper.from_array(_f(5, 1), "w3")
        next(t for t in m.graph.initializer if t.name == "w3").CopyFrom(w3)
    elif axes == [1]:
        w3 = numpy_helper.from_array(_f(5, 49), "w3")
        next(t for t in m.graph.initializer if t.name == "w3").CopyFrom(w3)
    res = shrink_channels(m)
    assert _inits(res.model)["w2"].shape == (6, 4, 3, 3)
    assert "ReduceMean" in res.blocked["w2"]


def test_dynamo_style_value_info_is_dropped_for_sliced_tensors():
    """Files that list shapes for every tensor and initializer (dynamo exports) stay valid after
    the removal (full shape-inference check), and later walks still see the new shapes."""
    m = _reduce_pooled("ReduceMean", [2, 3], 0, 18, False)
    m = onnx.shape_inference.infer_shapes(m)
    for t in m.graph.initializer:  # initializers listed as value_info too
        m.graph.value_info.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    w1 = _inits(m)["w1"].copy()
    w1[[0, 2]] = 0  # conv1 filters too: removed in a second pass, after conv2's
    next(t for t in m.graph.initializer if t.name == "w1").CopyFrom(numpy_helper.from_array(w1, "w1"))
    res = shrink_channels(m)
    after = _inits(res.model)
    assert after["w2"].shape[0] == 4 and after["w1"].shape[0] == 2
    onnx.checker.check_model(res.model, full_check=True)
    x = _f(2, 3, 7, 7, scale=1.0)
    np.testing.assert_allclose(_run(res.model, x), _run(m, x), rtol=1e-5, atol=1e-5)
