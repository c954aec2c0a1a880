"""RNN, GRU and LSTM against onnxruntime: directions, layouts, optional inputs, attributes, gradients."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from test_ops_nn import _model, check

from onnxadmm.importer.graph import OnnxGraphModule

RNG = np.random.default_rng(3)
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
T, N, D, H = 5, 3, 4, 6  # steps, batch, input size, hidden size


def _r(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _case(op, direction="forward", layout=0, bias=True, initial=True, lens=False, peep=False):
    """(feeds, consts, names) of one recurrent node with random weights."""
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    x = _r(N, T, D) if layout else _r(T, N, D)
    consts = {"W": _r(d, g * H, D), "R": _r(d, g * H, H)}
    consts["B"] = _r(d, 2 * g * H) if bias else None
    consts["seq"] = np.array([T, 2, 4][:N], dtype=np.int32) if lens else None
    state = (N, d, H) if layout else (d, N, H)
    consts["h0"] = _r(*state) if initial else None
    names = ["X", "W", "R", "B", "seq", "h0"]
    if op == "LSTM":
        consts["c0"] = _r(*state) if initial else None
        consts["P"] = _r(d, 3 * H) if peep else None
        names += ["c0", "P"]
    return {"X": x}, consts, names


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("layout", [0, 1])
def test_directions_and_layouts(op, direction, layout):
    """Layout 0 against onnxruntime; layout 1 (batch first), which onnxruntime refuses, against
    onnx's reference evaluator."""
    feeds, consts, names = _case(op, direction, layout)
    attrs = dict(hidden_size=H, direction=direction)
    n_out = 3 if op == "LSTM" else 2
    if not layout:
        check(op, feeds, consts, attrs, opset=14, n_out=n_out, names=names)
        return
    model = _model(op, feeds, consts, dict(attrs, layout=1), 14, n_out, names)
    want = ReferenceEvaluator(model).run(None, feeds)
    got = OnnxGraphModule(model)(torch.from_numpy(feeds["X"]))
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.detach().numpy(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_sequence_lengths(op, direction):
    """Shorter samples: zeros past their length, the final state from their last step."""
    feeds, consts, names = _case(op, direction, lens=True)
    check(
        op,
        feeds,
        consts,
        dict(hidden_size=H, direction=direction),
        opset=13,
        n_out=3 if op == "LSTM" else 2,
        names=names,
    )


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_without_optional_inputs(op):
    feeds, consts, names = _case(op, bias=False, initial=False)
    check(op, feeds, consts, dict(hidden_size=H), opset=7, n_out=3 if op == "LSTM" else 2, names=names)


def test_lstm_peepholes_clip_and_coupled_gates():
    feeds, consts, names = _case("LSTM", "bidirectional", peep=True)
    for attrs in (dict(clip=0.7), dict(input_forget=1), dict(clip=0.4, input_forget=1)):
        check(
            "LSTM",
            feeds,
            consts,
            dict(hidden_size=H, direction="bidirectional", **attrs),
            opset=13,
            n_out=3,
            names=names,
        )


def test_gru_linear_before_reset():
    feeds, consts, names = _case("GRU", "bidirectional")
    check(
        "GRU",
        feeds,
        consts,
        dict(hidden_size=H, direction="bidirectional", linear_before_reset=1),
        opset=13,
        n_out=2,
        names=names,
    )


@pytest.mark.parametrize(
    "op,attrs",
    [
        ("RNN", dict(activations=["Relu"])),
        ("RNN", dict(activations=["Tanh", "LeakyRelu"], activation_alpha=[0.2], direction="bidirectional")),
        ("GRU", dict(activations=["HardSigmoid", "Softsign"], activation_alpha=[0.3], activation_beta=[0.4])),
        (
            "LSTM",
            dict(
                activations=["HardSigmoid", "Tanh", "Affine"],
                activation_alpha=[0.25, 0.9],
                activation_beta=[0.5, 0.1],
            ),
        ),
        (
            "LSTM",
            dict(
                activations=["Sigmoid", "ScaledTanh", "Elu"],
                activation_alpha=[1.5, 0.8],
                activation_beta=[0.7],
            ),
        ),
    ],
    ids=["rnn-relu", "rnn-bidirectional-leaky", "gru-hardsigmoid", "lstm-affine", "lstm-scaledtanh-elu"],
)
def test_activations_with_parameters(op, attrs):
    direction = attrs.get("direction", "forward")
    feeds, consts, names = _case(op, direction)
    check(
        op, feeds, consts, dict(hidden_size=H, **attrs), opset=13, n_out=3 if op == "LSTM" else 2, names=names
    )


def test_only_the_last_state_requested():
    """A node whose Y output is left out (empty name) still gives Y_h and Y_c."""
    feeds, consts, names = _case("LSTM")
    model = _model("LSTM", feeds, consts, dict(hidden_size=H), 13, 3, names)
    model.graph.node[0].output[0] = ""
    del model.graph.output[0]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    got = OnnxGraphModule(model)(*[torch.from_numpy(v) for v in feeds.values()])
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.detach().numpy(), w, rtol=1e-4, atol=1e-5)
