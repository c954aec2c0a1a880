"""Shared by the test modules: one-node ONNX models, their expected outputs, an operator check of
the importer against them, seeded test data, and a quick fit of a torch net to scikit-learn's
digits (for fixtures that export a trained model)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxadmm.importer.graph import OnnxGraphModule, UnsupportedModelError


class Draws:
    """Random test data from one generator that conftest resets to seed 0 before every test, so a
    test's data do not depend on which tests ran before it (``rng`` for other distributions)."""

    def __init__(self, seed: int = 0):
        self.reset(seed)

    def reset(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def uniform(self, *shape, low=-1.0, high=1.0, dtype=np.float32) -> np.ndarray:
        return self.rng.uniform(low, high, shape).astype(dtype)


DRAWS = Draws()


def one_node_model(op, feeds, consts, attrs, opset, names=None, n_out=1) -> onnx.ModelProto:
    """One ``op`` node reading ``names`` (default: ``feeds`` (graph inputs) then ``consts``
    (initializers); ``""`` skips an optional input), with outputs ``y0, y1, ...``."""
    names = list(feeds) + list(consts) if names is None else names
    inputs = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for k, v in feeds.items()
    ]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outs], initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def expected_outputs(model, feeds, reference: bool = False) -> list:
    """Every output by onnxruntime, or by onnx's reference evaluator (``reference``)."""
    if reference:
        return list(ReferenceEvaluator(model).run(None, feeds))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def module_outputs(out) -> list:
    """A module's result as a list of outputs."""
    return list(out) if isinstance(out, tuple) else [out]


def compare_outputs(got: list, expected: list, rtol: float, atol: float) -> None:
    """Tensors ``got`` against arrays ``expected``: same count, shapes and dtypes; integers exactly,
    floats to ``rtol``/``atol``."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        a, e = g.detach().numpy(), np.asarray(e)
        assert a.shape == e.shape, (a.shape, e.shape)
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        if e.dtype.kind in "biu":
            np.testing.assert_array_equal(a, e)
        else:
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def check_op(
    op,
    feeds,
    consts=None,
    attrs=None,
    *,
    opset: int,
    names=None,
    n_out: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    grad=None,
    reference: bool = False,
    param_grads: bool = False,
) -> list[np.ndarray]:
    """Run one ``op`` node through ``OnnxGraphModule`` and compare every output with onnxruntime
    (``reference=True``: the ONNX reference evaluator): same shape and dtype, integers exactly,
    floats to ``rtol``/``atol``. ``grad``: feeds that must receive finite, non-zero gradients from
    a random projection of the float outputs (drawn from :data:`DRAWS`); with ``param_grads`` every
    parameter of the module too. Returns the module's outputs."""
    consts = consts or {}
    model = one_node_model(op, feeds, consts, attrs or {}, opset, names, n_out)
    expected = expected_outputs(model, feeds, reference)
    m = OnnxGraphModule(model)
    xs = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in feeds.items()}
    for k in grad or ():
        xs[k].requires_grad_(True)
    got = module_outputs(m(*xs.values()))
    compare_outputs(got, expected, rtol, atol)
    if grad:
        loss = sum(
            (g * torch.from_numpy(DRAWS.rng.standard_normal(g.shape)).to(g.dtype)).double().sum()
            for g in got
            if g.is_floating_point()
        )
        loss.backward()
        tensors = [(k, xs[k]) for k in grad] + (list(m.named_onnx_parameters()) if param_grads else [])
        for k, t in tensors:
            assert t.grad is not None and torch.isfinite(t.grad).all(), k
            assert t.grad.abs().sum() > 0, k
    return [g.detach().numpy() for g in got]


def expect_unsupported(op, feeds, consts, attrs, opset, match) -> None:
    """Importing the one-node model raises UnsupportedModelError matching ``match``."""
    with pytest.raises(UnsupportedModelError, match=match):
        OnnxGraphModule(one_node_model(op, feeds, consts, attrs, opset))


def fit_digits(net: torch.nn.Module, epochs: int, lr: float, batch: int = 64, channel_axis: bool = True):
    """Train ``net`` on scikit-learn's digits (images / 16, ``[N, 1, 8, 8]`` or ``[N, 8, 8]``) with
    Adam and cross-entropy; returns the images (for an export's sample input)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images[:, None] if channel_axis else d.images
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i : i + batch]), y[i : i + batch]).backward()
            opt.step()
    return x
