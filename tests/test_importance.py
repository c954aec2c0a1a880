"""Activation importance (compress/importance.py): the input statistics of each layer kind, checked
against numpy, and what pruning keeps with it: weights on a dead input go first."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from onnxadmm.compress.config import CompressConfig
from onnxadmm.compress.importance import feature_input, input_scales
from onnxadmm.compress.pipeline import compress
from onnxadmm.errors import ConfigError
from onnxadmm.importer.graph import OnnxGraphModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=13) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, s) for k, s in inputs.items()],
        [
            helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, shape)
            for o, shape in dict(outputs).items()
        ],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _rms(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    r = np.sqrt((x**2).mean(0))
    return r / r.mean()


def _scales(model, data):
    module = OnnxGraphModule(model)
    ws = module.compressible_weights()
    return input_scales(model, module, ws, data, torch.device("cpu"), batch_size=7), module


def test_feature_input_of_each_layer_kind():
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    assert feature_input(conv, 1) == ("x", 1)
    mm = helper.make_node("MatMul", ["a", "b"], ["y"])
    assert feature_input(mm, 1) == ("a", -1) and feature_input(mm, 0) == ("b", -2)
    for ta, tb in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        gemm = helper.make_node("Gemm", ["a", "b"], ["y"], transA=ta, transB=tb)
        assert feature_input(gemm, 1) == ("a", 0 if ta else 1)
        assert feature_input(gemm, 0) == ("b", 1 if tb else 0)
    assert feature_input(helper.make_node("LSTM", ["x", "w", "r"], ["y"]), 1) is None


def test_scales_of_matmul_and_gemm_match_numpy():
    """MatMul (weight on the right), Gemm with transB (weight [out, in]) and Gemm with transA (the
    activation [in, rows]): each weight's factor runs along its input axis and is the rms of the
    feature it multiplies over the layer's mean rms."""
    x = RNG.normal(size=(50, 4)) * np.array([0.0, 1.0, 3.0, 0.5])
    inits = {"w1": RNG.normal(size=(4, 6)), "w2": RNG.normal(size=(5, 6)), "w3": RNG.normal(size=(5, 3))}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["z"], transB=1),
        helper.make_node("Transpose", ["z"], ["zt"], perm=[1, 0]),
        helper.make_node("Gemm", ["zt", "w3"], ["y"], transA=1),
    ]
    model = _model(nodes, {"x": ["N", 4]}, {"y": None}, inits)
    scales, _ = _scales(model, {"x": x.astype(np.float32)})
    w1 = x.astype(np.float32) @ inits["w1"].astype(np.float32)
    r = np.maximum(w1, 0)
    z = r @ inits["w2"].astype(np.float32).T
    np.testing.assert_allclose(scales["w1"].numpy(), _rms(x, 1).reshape(4, 1), rtol=1e-5)
    np.testing.assert_allclose(scales["w2"].numpy(), _rms(r, 1).reshape(1, 6), rtol=1e-4)
    np.testing.assert_allclose(scales["w3"].numpy(), _rms(z, 1).reshape(5, 1), rtol=1e-4)
    assert scales["w1"][0, 0] == 0  # a dead input: its weights count for nothing


def test_scales_of_conv_grouped_conv_and_conv_transpose():
    x = RNG.normal(size=(9, 4, 6, 6)) * np.array([2.0, 0.1, 1.0, 0.0]).reshape(1, 4, 1, 1)
    inits = {
        "wc": RNG.normal(size=(6, 4, 3, 3)),
        "wg": RNG.normal(size=(4, 2, 1, 1)),
        "wt": RNG.normal(size=(4, 3, 2, 2)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wg"], ["b"], group=2),
        helper.make_node("ConvTranspose", ["b", "wt"], ["c"]),
    ]
    model = _model(nodes, {"x": ["N", 4, 6, 6]}, {"a": None, "c": None}, inits)
    scales, module = _scales(model, {"x": x.astype(np.float32)})
    want = _rms(x, 1)
    np.testing.assert_allclose(scales["wc"].numpy(), want.reshape(1, 4, 1, 1), rtol=1e-5)
    # group 2: filters 0-1 read channels 0-1, filters 2-3 channels 2-3
    np.testing.assert_allclose(
        scales["wg"].numpy()[:, :, 0, 0], [want[:2], want[:2], want[2:], want[2:]], rtol=1e-5
    )
    b = module.values(["b"], torch.from_numpy(x.astype(np.float32)))["b"].detach().numpy()
    np.testing.assert_allclose(scales["wt"].numpy(), _rms(b, 1).reshape(4, 1, 1, 1), rtol=1e-4)


def test_shared_weight_keeps_plain_magnitude():
    """A tensor that two layers read has no single input to weigh it by."""
    x = RNG.normal(size=(20, 3))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    model = _model(nodes, {"x": ["N", 3]}, {"y": None}, {"w": RNG.normal(size=(3, 3))})
    scales, _ = _scales(model, {"x": x.astype(np.float32)})
    assert scales == {}


def _dead_input_mlp(tmp_path):
    """8 inputs -> 16 -> 3 classes, the first four inputs always 0 in the data but carrying the
    first layer's largest weights; the classes depend on inputs 4-7."""
    w1 = RNG.normal(size=(8, 16)) * 0.3
    w1[:4] *= 10
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    model = _model(nodes, {"x": ["N", 8]}, {"y": ["N", 3]}, {"w1": w1, "w2": RNG.normal(size=(16, 3)) * 0.3})
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    x = RNG.normal(size=(600, 8)).astype(np.float32)
    x[:, :4] = 0
    y = np.argmax(x[:, 4:7] + 0.5 * x[:, 7:8], axis=1)
    return path, {"x": x, "y": y}


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_pruning_drops_weights_on_a_dead_input_first(tmp_path, importance):
    path, data = _dead_input_mlp(tmp_path)
    out = tmp_path / f"{importance}.onnx"
    rep = compress(
        path, out, data, rate=2, layer_rates={"w1": 2}, exclude=["w2"], quiet=True, importance=importance,
        admm_iterations=2, retrain_epochs=1, min_batches=5, batch_size=64, fmt="dense", shrink=False,
    )  # fmt: skip
    assert rep["config"]["importance"] == importance
    w1 = numpy_helper.to_array(next(t for t in onnx.load(out).graph.initializer if t.name == "w1"))
    assert np.count_nonzero(w1) == 64
    if importance == "activation":  # the 64 kept are the live inputs' weights, however small
        assert np.count_nonzero(w1[:4]) == 0 and np.count_nonzero(w1[4:]) == 64
    else:  # magnitude keeps the large, useless ones
        assert np.count_nonzero(w1[:4]) > 32


def test_importance_setting_is_checked():
    with pytest.raises(ConfigError, match="importance 'hessian'"):
        CompressConfig(importance="hessian").validate()


def _lookup_model(vocab: int = 40, dim: int = 6):
    """ids (int64, N x 4) -> Gather from a (vocab, dim) table -> mean over tokens -> MatMul (dim -> 3)."""
    g = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"]),
            helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        initializer=[
            numpy_helper.from_array(RNG.normal(size=(vocab, dim)).astype(np.float32), "emb"),
            numpy_helper.from_array(RNG.normal(size=(dim, 3)).astype(np.float32), "w"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_embedding_rows_scaled_by_their_share_of_lookups():
    """A lookup is a one-hot input times the table: a row's factor is sqrt(its count / all lookups),
    over the layer's mean (negative ids count for the row they pick); unused rows get 0."""
    model = _lookup_model()
    ids = RNG.integers(0, 10, size=(50, 4))
    ids[0, 0] = -1  # row 39
    s, _ = _scales(model, {"ids": ids})
    counts = np.bincount(ids.reshape(-1) % 40, minlength=40).astype(np.float64)
    rms = np.sqrt(counts / counts.sum())
    np.testing.assert_allclose(s["emb"].numpy(), (rms / rms.mean()).reshape(-1, 1), rtol=1e-5)
    assert s["emb"].shape == (40, 1) and float(s["emb"][20]) == 0.0


def test_pruning_keeps_the_rows_the_data_look_up(tmp_path):
    """Rows 10-39 (never looked up) are made the largest: activation importance prunes them first,
    magnitude keeps them."""
    model = _lookup_model()
    emb = numpy_helper.to_array(model.graph.initializer[0]).copy()
    emb[10:] *= 20
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(emb, "emb"))
    path = tmp_path / "lookup.onnx"
    onnx.save(model, path)
    ids = RNG.integers(0, 10, size=(400, 4))
    kept = {}
    for importance in ("activation", "magnitude"):
        out = tmp_path / f"{importance}.onnx"
        compress(
            path, out, {"ids": ids}, rate=4, layer_rates={"emb": 4}, exclude=["w"], quiet=True, importance=importance,
            admm_iterations=2, retrain_epochs=1, min_batches=5, batch_size=64, fmt="dense", shrink=False,
        )  # fmt: skip
        kept[importance] = numpy_helper.to_array(next(t for t in onnx.load(out).graph.initializer if t.name == "emb"))
    assert np.count_nonzero(kept["activation"]) == 60 and np.count_nonzero(kept["activation"][10:]) == 0
    assert np.count_nonzero(kept["magnitude"][10:]) == 60


@pytest.mark.parametrize("labels", [True, False])
def test_auto_importance_is_activation_without_labels(tmp_path, labels):
    path, data = _dead_input_mlp(tmp_path)
    if not labels:
        data = {"x": data["x"]}
    fast = dict(admm_iterations=1, retrain_epochs=1, min_batches=2, batch_size=64, fmt="dense", shrink=False)
    rep = compress(path, tmp_path / "o.onnx", data, rate=2, layer_rates={"w1": 2}, exclude=["w2"], quiet=True, **fast)
    assert rep["config"]["importance"] == ("magnitude" if labels else "activation")
    w1 = numpy_helper.to_array(next(t for t in onnx.load(tmp_path / "o.onnx").graph.initializer if t.name == "w1"))
    if not labels:  # the dead inputs' large weights went first
        assert np.count_nonzero(w1[:4]) == 0
