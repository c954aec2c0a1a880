"""Shared fixtures: the real models and data in ``shared/`` beside the checkout.

``shared/`` is located at ``<checkout>/../shared`` (override with the env variable
``ONNXADMM_SHARED``). Tests that need it skip, with the reason, when it is absent.

Fixtures:
- ``shared_dir``: the ``shared/`` folder.
- ``models_dir``: ``shared/models``.
- ``manifest``: the parsed ``shared/models/manifest.json`` (a list of dicts).
- ``mnist``: path of the MNIST test data ``shared/data/mnist.npz``.
- ``binary_digits_model(path, sigmoid)``: writes a one-output-column classifier built on the
  bundled digits CNN (importable: ``from conftest import binary_digits_model``).
- ``one_torch_thread``: torch limited to one intra-op thread for a test module (tiny models train
  ~30x slower on a busy machine with the default threads); modules that train opt in with
  ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
- ``shared_model``: parametrizes a test over every model of the manifest; the value is the
  manifest entry with an added ``"path"`` (a ``Path``). Ids are the model files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

DIGITS_MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"


def binary_digits_model(path: Path, sigmoid: bool) -> Path:
    """The digits CNN turned into a 'digit 0 or not' classifier with one output column: the logit
    of class 0 minus the largest other logit (positive exactly where the CNN predicts 0)."""
    m = onnx.load(DIGITS_MODEL)
    consts = {"b0": [0], "b1": [1], "b10": [10], "ax": [1]}
    for name, v in consts.items():
        m.graph.initializer.append(numpy_helper.from_array(np.array(v, dtype=np.int64), name))
    m.graph.node.extend(
        [
            helper.make_node("Slice", ["logits", "b0", "b1", "ax"], ["zero"]),
            helper.make_node("Slice", ["logits", "b1", "b10", "ax"], ["rest"]),
            helper.make_node("ReduceMax", ["rest"], ["rest_max"], axes=[1], keepdims=1),
            helper.make_node("Sub", ["zero", "rest_max"], ["margin"]),
        ]
    )
    out = "margin"
    if sigmoid:
        m.graph.node.append(helper.make_node("Sigmoid", ["margin"], ["prob"]))
        out = "prob"
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, ["N", 1]))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def _onnxruntime_max_ir() -> int:
    """The newest IR version the installed onnxruntime loads (an older onnxruntime beside a newer
    onnx refuses the models onnx.helper.make_model stamps with onnx's own, e.g. IR 14 against 13)."""
    import onnxruntime as ort

    for ir in range(onnx.IR_VERSION, 6, -1):
        g = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
        m = _MAKE_MODEL(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # noqa: BLE001 - "Unsupported model IR version": try the one below
            continue
    return onnx.IR_VERSION


_MAKE_MODEL = helper.make_model
_MAX_IR = _onnxruntime_max_ir()


def _make_model_for_onnxruntime(graph, **kwargs):
    """onnx.helper.make_model, the IR version capped at what onnxruntime loads: the tests' graphs
    use nothing of a newer IR, and a model the library is given keeps its own IR version."""
    m = _MAKE_MODEL(graph, **kwargs)
    if "ir_version" not in kwargs and m.ir_version > _MAX_IR:
        m.ir_version = _MAX_IR
    return m


if _MAX_IR < onnx.IR_VERSION:  # only where this onnx and onnxruntime disagree
    helper.make_model = _make_model_for_onnxruntime


def shared_root() -> Path:
    env = os.environ.get("ONNXADMM_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def manifest_entries() -> list[dict]:
    """The manifest with a ``path`` added to each entry, or [] when shared/models is absent."""
    models = shared_root() / "models"
    try:
        entries = json.loads((models / "manifest.json").read_text())
    except (OSError, ValueError):
        return []
    return [dict(e, path=models / e["file"]) for e in entries]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set ONNXADMM_SHARED to the shared/ folder)")
    return path


@pytest.fixture(autouse=True)
def _fresh_draws():
    """builders.DRAWS starts every test at seed 0."""
    import builders

    builders.DRAWS.reset()


@pytest.fixture(scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(shared_root(), "shared folder")


@pytest.fixture(scope="session")
def models_dir(shared_dir) -> Path:
    return _need(shared_dir / "models", "shared models folder")


@pytest.fixture(scope="session")
def manifest(models_dir) -> list[dict]:
    _need(models_dir / "manifest.json", "models manifest")
    return manifest_entries()


@pytest.fixture(scope="session")
def mnist(shared_dir) -> Path:
    return _need(shared_dir / "data" / "mnist.npz", "MNIST test data")


def pytest_generate_tests(metafunc):
    if "shared_model" in metafunc.fixturenames:
        entries = manifest_entries()
        if entries:
            metafunc.parametrize("shared_model", entries, ids=[e["file"] for e in entries])
        else:
            reason = f"shared models not found at {shared_root() / 'models'} (set ONNXADMM_SHARED)"
            metafunc.parametrize("shared_model", [pytest.param(None, marks=pytest.mark.skip(reason=reason))])
