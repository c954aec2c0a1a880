"""onnxruntime's fused transformer ops (com.microsoft, and its default-domain LayerNormalization /
SimplifiedLayerNormalization below opset 17) against onnxruntime, with gradients."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxadmm.importer.analysis import find_weights
from onnxadmm.importer.graph import OnnxGraphModule

RNG = np.random.default_rng(5)
MS = "com.microsoft"


def _r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _check(op, x, consts, attrs=None, outputs=(0,), domain=MS, opset=13, names=None):
    """One node of ``op`` reading graph input ``x`` and initializers ``consts`` (in order; None
    leaves an input out); compares the ``outputs`` asked with onnxruntime, then the gradients."""
    names = names or list(consts)
    inputs = ["x"] + [n if consts[n] is not None else "" for n in names]
    n_out = max(outputs) + 1
    outs = [f"y{i}" if i in outputs else "" for i in range(n_out)]
    node = helper.make_node(op, inputs, outs, domain=domain, **(attrs or {}))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_value_info(f"y{i}", onnx.TypeProto()) for i in outputs],
        [numpy_helper.from_array(v, k) for k, v in consts.items() if v is not None],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if domain == MS else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    m = OnnxGraphModule(model)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    got = m(xt)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.detach().numpy(), w, rtol=1e-4, atol=1e-5)
    sum(g.sum() for g in got).backward()
    assert xt.grad is not None and torch.isfinite(xt.grad).all()
    for name, p in m.named_onnx_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    return model


@pytest.mark.parametrize(
    "attrs", [{}, dict(transB=1), dict(transA=1, alpha=0.5), dict(transA=1, transB=1, alpha=2.0)], ids=str
)
def test_fused_matmul(attrs):
    x = _r(2, 3, 5, 4) if attrs.get("transA") else _r(2, 3, 4, 5)
    w = _r(6, 5) if attrs.get("transB") else _r(5, 6)
    model = _check("FusedMatMul", x, {"w": w}, attrs)
    weights = {w.name: w for w in find_weights(model)}
    assert weights["w"].compressible  # the weight operand is compressed like a MatMul's


@pytest.mark.parametrize("op", ["Gelu", "QuickGelu"])
def test_gelus(op):
    _check(op, _r(3, 7) * 3, {})
    if op == "QuickGelu":
        _check(op, _r(3, 7) * 3, {}, dict(alpha=1.3))


def test_fast_gelu_and_bias_gelu():
    _check("FastGelu", _r(2, 4, 8) * 3, {})
    _check("FastGelu", _r(2, 4, 8) * 3, {"b": _r(8)})
    _check("BiasGelu", _r(2, 4, 8) * 3, {"b": _r(8)})


@pytest.mark.parametrize("beta,bias", [(True, True), (True, False), (False, False)])
def test_skip_layer_normalization(beta, bias):
    consts = {"skip": _r(2, 4, 8), "gamma": 1 + _r(8) * 0.1, "beta": _r(8) if beta else None}
    consts["bias"] = _r(8) if bias else None
    _check("SkipLayerNormalization", _r(2, 4, 8), consts, dict(epsilon=1e-5), outputs=(0, 3))


def test_skip_simplified_layer_normalization():
    consts = {"skip": _r(2, 4, 8), "gamma": 1 + _r(8) * 0.1, "bias": _r(8)}
    _check("SkipSimplifiedLayerNormalization", _r(2, 4, 8), consts, dict(epsilon=1e-5), outputs=(0, 3))


@pytest.mark.parametrize("op", ["LayerNormalization", "SimplifiedLayerNormalization"])
def test_default_domain_normalizations_below_opset_17(op):
    """onnxruntime accepts these in the default domain at any opset (its own kernels)."""
    consts = {"scale": 1 + _r(8) * 0.1} | ({"b": _r(8)} if op == "LayerNormalization" else {})
    _check(op, _r(2, 4, 8), consts, dict(epsilon=1e-5), domain="", opset=13)
    _check(op, _r(2, 4, 8), {"scale": 1 + _r(4, 8) * 0.1}, dict(axis=-2, epsilon=1e-5), domain="", opset=13)


def test_transformer_optimized_by_onnxruntime_compresses(tmp_path, one_torch_thread):
    """A small transformer encoder exported by torch and fused by onnxruntime's transformer optimizer
    (LayerNormalization at opset 14, BiasGelu) imports, matches onnxruntime, and compresses."""
    import warnings

    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    from onnxruntime.transformers.fusion_options import FusionOptions

    from onnxadmm.compress.pipeline import compress
    from onnxadmm.modelio import load_model

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Linear(8, 32)
            self.enc = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.enc(self.emb(x)).mean(1))

    src, fused = tmp_path / "tf.onnx", tmp_path / "tf_opt.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(), (torch.randn(2, 8, 8),), str(src), input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "N"}}, opset_version=14, dynamo=False,
        )  # fmt: skip
        opts = FusionOptions("bert")
        opts.enable_attention = False
        optimizer.optimize_model(
            str(src), model_type="bert", num_heads=4, hidden_size=32, optimization_options=opts, opt_level=0
        ).save_model_to_file(str(fused))
    ops = {(n.domain, n.op_type) for n in load_model(fused).graph.node}
    assert ("", "LayerNormalization") in ops and (MS, "BiasGelu") in ops
    x = _r(5, 8, 8)
    want = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = OnnxGraphModule(load_model(fused))(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    fast = {"admm_iterations": 1, "retrain_epochs": 1, "min_batches": 1, "max_batches_per_epoch": 2}
    rep = compress(fused, tmp_path / "out.onnx", "digits", rate=4, quiet=True, **fast)
    assert rep["pruning_rate"] == pytest.approx(4.0, rel=0.05) and rep["accuracy"]["compressed"] is not None
