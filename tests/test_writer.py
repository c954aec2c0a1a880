"""export_onnx / initializer_values: write weights back into the original graph, checked in onnxruntime."""

from __future__ import annotations

import builtins
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxadmm import modelio
from onnxadmm.errors import OnnxAdmmError
from onnxadmm.export import export_onnx, initializer_values

NO_FLOAT_TENSORS = {"onnxruntime-pypi-wheel/logreg_iris.onnx"}
BATCH = {"microsoft+Windows-Machine-Learning/candy.onnx": 1}  # 720x720 image-to-image: keep it cheap
# the only output is an accuracy scalar over the batch (ArgMax/Equal/ReduceMean): a big batch makes
# a weight change visible in it
BATCH["akinobu123+tf2onnx/mnist.onnx"] = 256
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
MNIST_MLP = "ram6ces+mnist/mnist.onnx"
MNIST_CNN = "CODEMAN251+mnist-cnn-onnx/mnist_cnn.onnx"
SQUEEZENET = "microsoft+Windows-Machine-Learning/SqueezeNet_fp16.onnx"
PADDLE = "utools-blowsnow+ocr-web/ch_PP-OCRv3_det_infer.onnx"


# ---------------------------------------------------------------- helpers


def _session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # old-IR models warn about initializers listed as graph inputs
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs: dynamic batch -> ``batch``, other dynamic dims -> 64 (a multiple of 32)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [
            d if isinstance(d, int) and d > 0 else (batch if k == 0 else 64) for k, d in enumerate(inp.shape)
        ]
        feeds[inp.name] = rng.standard_normal(shape).astype(ORT_DTYPES[inp.type])
    return feeds


def _run(model, feeds) -> list[np.ndarray]:
    return _session(model).run(None, feeds)


def _same_outputs(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b)
    )


def _f32(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the torch side hands back: float32 for every float weight."""
    return {k: v.astype(np.float32) for k, v in values.items()}


def _assert_bit_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def _assert_same_structure(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    """Everything but tensor values is kept: model header, opsets, metadata, IO, nodes in order."""
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(a, f) == getattr(b, f), f
    assert list(a.opset_import) == list(b.opset_import)
    assert list(a.metadata_props) == list(b.metadata_props)
    ga, gb = a.graph, b.graph
    assert (ga.name, ga.doc_string) == (gb.name, gb.doc_string)
    for f in ("input", "output", "value_info"):
        assert list(getattr(ga, f)) == list(getattr(gb, f)), f
    assert [t.name for t in ga.initializer] == [t.name for t in gb.initializer]
    assert len(ga.node) == len(gb.node)
    for na, nb in zip(ga.node, gb.node):
        key = ("name", "op_type", "domain", "doc_string")
        assert [getattr(na, k) for k in key] == [getattr(nb, k) for k in key]
        assert (list(na.input), list(na.output)) == (list(nb.input), list(nb.output))
        if na.op_type != "Constant":
            assert na == nb


def _model(models_dir: Path, rel: str) -> Path:
    p = models_dir / rel
    if not p.exists():
        pytest.skip(f"{rel} not in {models_dir}")
    return p


def _largest(values: dict[str, np.ndarray], prefix_ok=lambda name: True) -> str:
    return max((k for k in values if prefix_ok(k) and values[k].ndim >= 2), key=lambda k: values[k].size)


# ---------------------------------------------------------------- every shared model


def test_unchanged_weights_round_trip(shared_model, tmp_path):
    """Writing back the unchanged weights (as float32) gives the same model and the same outputs."""
    if shared_model["file"] in NO_FLOAT_TENSORS:
        pytest.skip("no float tensors (coefficients live in ai.onnx.ml attributes); see test_no_float_model")
    src = shared_model["path"]
    values = initializer_values(src)
    assert values, "every model but logreg_iris has float weights"
    out = export_onnx(src, _f32(values), tmp_path / "same.onnx")

    original, written = onnx.load(src), onnx.load(out)
    _assert_same_structure(original, written)
    assert written == original  # untouched tensors keep their exact storage
    _assert_bit_equal(initializer_values(out), values)

    feeds = _feeds(_session(src), BATCH.get(shared_model["file"], 2))
    assert _same_outputs(_run(src, feeds), _run(out, feeds))


def test_every_weight_rewritten_and_restored(shared_model, tmp_path):
    """Negate every float weight (all tensors re-encoded), then write the originals back.

    The negated model computes something else and reads back exactly; restoring the values
    re-encodes every tensor again and gives bit-identical onnxruntime outputs.
    """
    if shared_model["file"] in NO_FLOAT_TENSORS:
        pytest.skip("no float tensors (coefficients live in ai.onnx.ml attributes)")
    src = shared_model["path"]
    values = initializer_values(src)
    # Resize/Upsample scales are float tensors too; negating them would break the graph's shapes
    proto = onnx.load(src)
    scales = {i for n in proto.graph.node if n.op_type in ("Resize", "Upsample") for i in n.input[1:]}
    negated = {k: v if k in scales else -v for k, v in _f32(values).items()}

    a = export_onnx(src, negated, tmp_path / "neg.onnx")
    back_a = initializer_values(a)
    assert {k: v.dtype for k, v in back_a.items()} == {k: v.dtype for k, v in values.items()}
    _assert_bit_equal(back_a, {k: v.astype(values[k].dtype) for k, v in negated.items()})

    b = export_onnx(a, _f32(values), tmp_path / "restored.onnx")
    _assert_bit_equal(initializer_values(b), values)
    for m in (onnx.load(a), onnx.load(b)):
        _assert_same_structure(proto, m)

    feeds = _feeds(_session(src), BATCH.get(shared_model["file"], 2))
    ref = _run(src, feeds)
    assert not _same_outputs(ref, _run(a, feeds))
    assert _same_outputs(ref, _run(b, feeds))


# ---------------------------------------------------------------- one weight, fp16, Constant nodes


def test_zeroing_one_conv_weight(models_dir, tmp_path):
    src = _model(models_dir, MNIST_CNN)
    proto = onnx.load(src)
    conv_w = next(n.input[1] for n in proto.graph.node if n.op_type == "Conv")
    values = initializer_values(src)
    out = export_onnx(src, {conv_w: np.zeros_like(values[conv_w])}, tmp_path / "z.onnx")

    back = initializer_values(out)
    assert not back[conv_w].any() and back[conv_w].dtype == np.float32
    written = onnx.load(out)
    for t_old, t_new in zip(proto.graph.initializer, written.graph.initializer):
        if t_old.name != conv_w:
            assert t_old == t_new  # the other tensors are not touched
    feeds = _feeds(_session(src))
    assert not _same_outputs(_run(src, feeds), _run(out, feeds))


def test_constant_node_weight(models_dir, tmp_path):
    """PaddlePaddle weights live in Constant nodes: the node's `value` is updated in place."""
    src = _model(models_dir, PADDLE)
    proto = onnx.load(src)
    assert len(proto.graph.initializer) == 0
    values = initializer_values(src)
    conv_w = next(n.input[1] for n in proto.graph.node if n.op_type == "Conv")
    new = np.full_like(values[conv_w], 0.25)
    out = export_onnx(src, {conv_w: new}, tmp_path / "c.onnx")
    written = onnx.load(out)
    assert len(written.graph.initializer) == 0
    _assert_same_structure(proto, written)
    assert initializer_values(out)[conv_w].tobytes() == new.tobytes()
    feeds = _feeds(_session(src))
    assert not _same_outputs(_run(src, feeds), _run(out, feeds))


def test_fp16_model_keeps_fp16(models_dir, tmp_path):
    src = _model(models_dir, SQUEEZENET)
    values = initializer_values(src)
    name = _largest(values)
    new = _f32(values)[name] * np.float32(0.5)
    out = export_onnx(src, {name: new}, tmp_path / "h.onnx")
    written = onnx.load(out)
    assert {t.data_type for t in written.graph.initializer} == {TensorProto.FLOAT16}
    assert written.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    back = initializer_values(out)[name]
    assert back.dtype == np.float16 and back.tobytes() == new.astype(np.float16).tobytes()
    res = _run(out, _feeds(_session(src)))
    assert res[0].dtype == np.float16

    with pytest.raises(OnnxAdmmError, match="overflow the model's FLOAT16"):
        export_onnx(src, {name: np.full_like(new, 1e6)}, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_no_float_model(models_dir, tmp_path):
    """logreg_iris (ZipMap seq(map) output, which onnx_ir cannot read) is written back byte for byte."""
    src = _model(models_dir, "onnxruntime-pypi-wheel/logreg_iris.onnx")
    assert initializer_values(src) == {}
    out = export_onnx(src, {}, tmp_path / "l.onnx")
    assert out.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------- sparse


def _prune(w: np.ndarray, keep: float = 0.05) -> np.ndarray:
    w = w.astype(np.float32)
    thr = np.quantile(np.abs(w), 1 - keep)
    return np.where(np.abs(w) >= thr, w, np.float32(0))


@pytest.mark.parametrize(
    "rel",
    [MNIST_MLP, SQUEEZENET, PADDLE],
    ids=["initializer", "fp16-old-IR-graph-input", "constant-node"],
)
def test_sparse_export(models_dir, tmp_path, rel):
    src = _model(models_dir, rel)
    values = initializer_values(src)
    name = _largest(values)
    pruned = _prune(values[name])
    assert (pruned == 0).mean() >= 0.94

    dense = export_onnx(src, {name: pruned}, tmp_path / "dense.onnx")
    sp = export_onnx(src, {name: pruned}, tmp_path / "sparse.onnx", sparse={name})
    proto = onnx.load(sp)
    if rel == PADDLE:
        node = next(n for n in proto.graph.node if n.output[0] == name)
        assert [a.name for a in node.attribute] == ["sparse_value"]
    else:
        assert name not in {t.name for t in proto.graph.initializer}
        (s,) = proto.graph.sparse_initializer
        assert s.values.name == name and s.indices.data_type == TensorProto.INT64
        assert len(s.indices.dims) == 1  # linear indices
    assert initializer_values(sp)[name].tobytes() == pruned.astype(values[name].dtype).tobytes()

    saved = values[name].size * values[name].itemsize * 0.95 - (values[name].size * 0.05 * 8)
    assert sp.stat().st_size < dense.stat().st_size - 0.8 * saved

    feeds = _feeds(_session(src))
    assert _same_outputs(_run(dense, feeds), _run(sp, feeds))

    # writing into a model that is already sparse keeps the tensor sparse
    again = _prune(values[name], keep=0.02)
    sp2 = export_onnx(sp, {name: again}, tmp_path / "sparse2.onnx")
    assert initializer_values(sp2)[name].tobytes() == again.astype(values[name].dtype).tobytes()
    assert sp2.stat().st_size < sp.stat().st_size
    dense2 = export_onnx(src, {name: again}, tmp_path / "dense2.onnx")
    assert _same_outputs(_run(dense2, feeds), _run(sp2, feeds))


def _tiny(**graph_kw) -> onnx.ModelProto:
    g = helper.make_graph(
        graph_kw.pop("nodes"),
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        **graph_kw,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_existing_2d_sparse_layout_kept(tmp_path):
    w = np.zeros((4, 5), np.float32)
    w[1, 2], w[3, 4] = 2, -3
    idx = np.argwhere(w).astype(np.int64)
    s = helper.make_sparse_tensor(
        numpy_helper.from_array(w[w != 0], "W"), numpy_helper.from_array(idx, "W_idx"), w.shape
    )
    m = _tiny(nodes=[helper.make_node("MatMul", ["x", "W"], ["y"])], sparse_initializer=[s])
    np.testing.assert_array_equal(initializer_values(m)["W"], w)
    w2 = w.copy()
    w2[0, 0] = 1.5
    out = export_onnx(m, {"W": w2}, tmp_path / "s.onnx")
    (s2,) = onnx.load(out).graph.sparse_initializer
    assert list(s2.indices.dims) == [3, 2] and s2.indices.name == "W_idx"
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], x @ w2, rtol=1e-6)


def test_constant_list_attributes_and_errors(tmp_path):
    """value_floats / value_float Constants are updated in their own form; bad inputs fail clearly."""
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(np.ones((4, 5), np.float32))),
        helper.make_node("Constant", [], ["b"], value_floats=[1.0, 2.0, 3.0, 4.0, 5.0]),
        helper.make_node("Constant", [], ["s"], value_float=2.0),
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["xwb"]),
        helper.make_node("Mul", ["xwb", "s"], ["y"]),
    ]
    m = _tiny(nodes=nodes)
    assert set(initializer_values(m)) == {"W", "b", "s"}
    assert set(initializer_values(m, constants=False)) == set()
    b, s = np.arange(5, dtype=np.float32) * 0.5, np.float32(3.0)
    out = export_onnx(m, {"b": b, "s": s}, tmp_path / "c.onnx")
    nb = onnx.load(out).graph.node
    assert list(nb[1].attribute[0].floats) == b.tolist() and nb[2].attribute[0].f == 3.0
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], (x @ np.ones((4, 5)) + b) * s)

    with pytest.raises(OnnxAdmmError, match="scalar"):
        export_onnx(m, {}, tmp_path / "e.onnx", sparse={"s"})
    # Constant.sparse_value exists from opset 11 only
    m.opset_import[0].version = 9
    with pytest.raises(OnnxAdmmError, match="opset 11"):
        export_onnx(m, {}, tmp_path / "s9.onnx", sparse={"W"})
    cases = [
        ({"nope": b}, "unknown weight name"),
        ({"x": np.ones((2, 4))}, "unknown weight name"),  # a graph input, not a weight
        ({"b": np.ones(4)}, r"has shape \(4,\), the model's tensor has \(5,\)"),
    ]
    for weights, msg in cases:
        with pytest.raises(OnnxAdmmError, match=msg) as exc:
            export_onnx(m, weights, tmp_path / "e.onnx")
        assert "\n" not in str(exc.value)
    assert not (tmp_path / "e.onnx").exists()


def test_integer_tensor_cast_is_checked(tmp_path):
    shape = numpy_helper.from_array(np.array([2, 5], np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["x10", "shape"], ["y"]),
        helper.make_node("Identity", ["x"], ["x10"]),
    ]
    m = _tiny(nodes=nodes, initializer=[shape])
    assert initializer_values(m) == {}
    with pytest.raises(OnnxAdmmError, match="not representable in the model's INT64"):
        export_onnx(m, {"shape": np.array([2.5, 4.0])}, tmp_path / "i.onnx")


# ---------------------------------------------------------------- external data, paths, atomicity


def test_external_data_forced_and_kept(models_dir, tmp_path):
    src = _model(models_dir, MNIST_MLP)
    values = _f32(initializer_values(src))
    name = _largest(values)
    values[name] = values[name] * np.float32(0.5)

    ext = export_onnx(src, values, tmp_path / "a" / "m.onnx", external_data=True)
    data = ext.parent / "m.onnx.data"
    assert data.is_file() and sorted(p.name for p in ext.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert ext.stat().st_size < 10_000 < data.stat().st_size
    assert modelio.external_locations(onnx.load(ext, load_external_data=False))
    dense = export_onnx(src, values, tmp_path / "dense.onnx")
    feeds = _feeds(_session(src))
    assert _same_outputs(_run(dense, feeds), _run(ext, feeds))  # onnxruntime loads it from its path
    _assert_bit_equal(initializer_values(ext), initializer_values(dense))

    # a model that had external data keeps that layout by default, next to the new output
    again = export_onnx(ext, {}, tmp_path / "b" / "n.onnx")
    assert (again.parent / "n.onnx.data").is_file()
    assert _same_outputs(_run(dense, feeds), _run(again, feeds))
    # ... and can be asked to inline everything
    inline = export_onnx(ext, {}, tmp_path / "c" / "n.onnx", external_data=False)
    assert sorted(p.name for p in inline.parent.iterdir()) == ["n.onnx"]
    # a ModelProto whose external data was not loaded cannot be written
    with pytest.raises(OnnxAdmmError, match="external data that was not loaded"):
        export_onnx(onnx.load(ext, load_external_data=False), {}, tmp_path / "d.onnx")


def test_refuses_to_overwrite_input(models_dir, tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copyfile(_model(models_dir, MNIST_MLP), src)
    before = src.read_bytes()
    with pytest.raises(OnnxAdmmError, match="refusing to overwrite the input model"):
        export_onnx(src, {}, src)
    with pytest.raises(OnnxAdmmError, match="refusing to overwrite"):
        export_onnx(str(tmp_path / "." / "m.onnx"), {}, src)
    assert src.read_bytes() == before
    values = _f32(initializer_values(src))
    name = _largest(values)
    export_onnx(src, {name: np.zeros_like(values[name])}, src, force=True)
    assert not initializer_values(src)[name].any()
    with pytest.raises(OnnxAdmmError, match="is a folder"):
        export_onnx(src, {}, tmp_path)


def test_write_is_atomic(models_dir, tmp_path, monkeypatch):
    """A failure half-way through writing leaves the destination as it was and no temp files."""
    src = _model(models_dir, MNIST_MLP)
    dest = tmp_path / "out.onnx"
    export_onnx(src, {}, dest)
    before = hashlib.sha256(dest.read_bytes()).hexdigest()
    values = _f32(initializer_values(src))
    name = _largest(values)

    real_open = builtins.open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

    def failing_open(file, mode="r", *args, **kw):
        f = real_open(file, mode, *args, **kw)
        return HalfWriter(f) if "w" in mode else f

    monkeypatch.setattr(modelio, "open", failing_open, raising=False)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(src, {name: np.zeros_like(values[name])}, dest)
    monkeypatch.undo()

    assert hashlib.sha256(dest.read_bytes()).hexdigest() == before
    assert os.listdir(tmp_path) == ["out.onnx"]
