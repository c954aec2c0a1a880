"""Codebook storage (onnxadmm.export.storage): exact decoding in onnxruntime, folding, byte counts."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxadmm.errors import OnnxAdmmError
from onnxadmm.export import storage as st
from onnxadmm.export.storage import (
    METADATA_KEY,
    Encoded,
    analyze,
    apply_storage,
    decode,
    encode_from_values,
    storage_bytes,
    theoretical,
    unfolded_decode_nodes,
)


def _data_bytes(t: TensorProto) -> int:
    """Bytes of a tensor's data in the file, measured by protobuf: raw bytes, or the serialized typed
    field (packed varints for integers) less its tag byte and length prefix."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    only = TensorProto()
    only.CopyFrom(t)
    for field in ("name", "dims", "data_type"):
        only.ClearField(field)
    size = only.ByteSize()
    return next(n for n in range(size) if 1 + (1 if n < 128 else 2 if n < 16384 else 3) + n == size)


SHAPES = {"wc": (8, 3, 3, 3), "wg": (16, 20), "wm": (20, 12)}
ELEM_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _model(
    weights: dict[str, np.ndarray], opset: int = 13, ir: int | None = None, as_inputs: bool = False
) -> onnx.ModelProto:
    """Conv(wc) on x1, Gemm(transB=1, wg) and MatMul(wm) on x2; any subset of the three weights."""
    dtype = next(iter(weights.values())).dtype.type
    elem = ELEM_TYPE[dtype]
    nodes, inputs, outputs = [], [], []
    if "wc" in weights:
        inputs.append(helper.make_tensor_value_info("x1", elem, [1, 3, 5, 5]))
        nodes.append(helper.make_node("Conv", ["x1", "wc"], ["y1"], name="conv"))
        outputs.append(helper.make_tensor_value_info("y1", elem, [1, 8, 3, 3]))
    if "wg" in weights or "wm" in weights:
        inputs.append(helper.make_tensor_value_info("x2", elem, [2, 20]))
    if "wg" in weights:
        nodes.append(helper.make_node("Gemm", ["x2", "wg"], ["y2"], name="gemm", transB=1))
        outputs.append(helper.make_tensor_value_info("y2", elem, [2, 16]))
    if "wm" in weights:
        nodes.append(helper.make_node("MatMul", ["x2", "wm"], ["y3"], name="matmul"))
        outputs.append(helper.make_tensor_value_info("y3", elem, [2, 12]))
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    if as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir or helper.find_min_ir_version_for(list(model.opset_import))
    return model


def _matmul_model(w: np.ndarray, name: str = "w") -> onnx.ModelProto:
    """One MatMul of a [1, rows] input by the float32 weight ``w`` (named ``name``), opset 13."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", name], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, name)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        feeds[v.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _run(model: onnx.ModelProto, feeds, level=None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if level is not None:
        so.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _quantized(rng, shape, bits, group_axis, sparse, dtype=np.float32):
    """A weight on a random codebook of 2**bits non-zero levels (per row of group_axis), and that codebook."""
    groups = 1 if group_axis is None else shape[group_axis]
    levels = rng.uniform(0.1, 1.0, (groups, 2**bits)) * rng.choice([-1, 1], (groups, 2**bits))
    levels = levels.astype(dtype).astype(np.float32)
    codes = rng.integers(0, 2**bits, shape)
    g = np.zeros(shape, dtype=np.int64)
    if group_axis is not None:
        g += np.arange(groups).reshape([-1] + [1] * (len(shape) - group_axis - 1))
    w = levels[g, codes].astype(dtype)
    if sparse:  # about 90% zeros, never all
        keep = rng.random(shape) >= 0.9
        keep.flat[rng.integers(w.size)] = True
        w = np.where(keep, w, 0).astype(dtype)
    return w, (levels if group_axis is not None else levels[0])


def _new_initializers(before: onnx.ModelProto, after: onnx.ModelProto) -> list[TensorProto]:
    old = {t.name for t in before.graph.initializer}
    return [t for t in after.graph.initializer if t.name not in old]


def _decoded_by_reference(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    """The weights as onnx.reference computes them from the decoder nodes alone."""
    nodes = [n for ns in st.decoder_nodes(model).values() for n in ns]
    outputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in names]
    graph = helper.make_graph(nodes, "decoders", [], outputs, list(model.graph.initializer))
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return dict(zip(names, ReferenceEvaluator(sub).run(None, {})))


def _check_exact(reference: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    """Same outputs bit for bit (default and basic optimisation), decoders folded, checker passes."""
    feeds = _feeds(reference)
    for level in (None, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        for a, b in zip(_run(reference, feeds, level), _run(compressed, feeds, level), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert unfolded_decode_nodes(compressed) == []
    onnx.checker.check_model(compressed, full_check=True)


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("group_axis", [None, 0], ids=["tensor", "channel"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_exact_in_onnxruntime(bits, group_axis, sparse):
    rng = np.random.default_rng(bits * 10 + (group_axis is None) + 2 * sparse)
    weights, encodings = {}, {}
    for name, shape in SHAPES.items():
        w, codebook = _quantized(rng, shape, bits, group_axis, sparse)
        enc = encode_from_values(w, codebook, group_axis, sparse, bits=bits, compact=False)
        assert enc.bits == bits and enc.sparse == sparse
        assert np.array_equal(decode(enc), w)
        weights[name], encodings[name] = w, enc
    reference = _model(weights)
    out = apply_storage(reference, encodings, packing="bits", bundle=False)
    _check_exact(reference, out)

    # decoders first, named after their weight, consumers untouched
    decoders = st.decoder_nodes(out)
    n_dec = sum(len(v) for v in decoders.values())
    assert {n.name for n in out.graph.node[:n_dec]} == {n.name for v in decoders.values() for n in v}
    assert [n.name for n in out.graph.node[n_dec:]] == [n.name for n in reference.graph.node]
    assert set(decoders) == set(SHAPES) and all(decoders.values())
    # each weight's decoder ends in the node that outputs the weight
    assert all(v[-1].output[0] == w for w, v in decoders.items())
    assert not set(SHAPES) & {t.name for t in out.graph.initializer}

    ref_decoded = _decoded_by_reference(out, list(SHAPES))
    for name, w in weights.items():
        assert np.array_equal(ref_decoded[name], w)

    # byte accounting = raw data of the new initializers; codes packed at exactly `bits`
    new = _new_initializers(reference, out)
    sizes = {name: storage_bytes(enc, packing="bits") for name, enc in encodings.items()}
    assert sum(s["total"] for s in sizes.values()) == sum(_data_bytes(t) for t in new)
    meta = json.loads(dict((p.key, p.value) for p in out.metadata_props)[METADATA_KEY])
    for name, enc in encodings.items():
        entries = enc.stored + meta[name]["fillers"]
        if meta[name]["joint"]:  # one stream of bits + gap_bits per entry, shared in that ratio
            width = bits + meta[name]["gap_bits"]
            both = entries * width // 8 if width in (8, 16) else math.ceil(entries / 8) * width
            assert sizes[name]["codes"] + sizes[name]["positions"] == both
            assert sizes[name]["codes"] == round(both * bits / width)
        else:
            assert sizes[name]["codes"] == (entries if bits == 8 else math.ceil(entries / 8) * bits)
        assert meta[name]["bits"] == bits and meta[name]["sparse"] == sparse
        assert meta[name]["stored"] == enc.stored and meta[name]["groups"] == enc.groups
        assert meta[name]["nonzero"] == np.count_nonzero(weights[name])
        assert (meta[name]["gap_bits"] > 0) == sparse
        report = analyze(out)[name]
        nodes = report["bytes"].pop("nodes") - sizes[name].pop("nodes")
        assert report["bytes"] == sizes[name]
        assert abs(nodes) <= 20 * len(name)  # storage_bytes assumes a weight named "w"
        assert report["nonzero"] == np.count_nonzero(weights[name]) and report["params"] == enc.size


@pytest.mark.parametrize("packing", ["auto", "bytes"])
@pytest.mark.parametrize("bits,sparse", [(1, False), (2, False), (1, True), (2, True), (4, True), (8, True)])
def test_smaller_file(tmp_path, bits, sparse, packing):
    """Even these tiny weights (216 to 320 elements) take less room, decoders included.

    Tensor-wide codebooks only: per-channel ones (8 to 20 rows of K float32 values, plus three
    nodes for the row offsets of a sparse tensor) outweigh what the codes save at this size.
    """
    rng = np.random.default_rng(bits)
    weights, encodings = {}, {}
    for name, shape in SHAPES.items():
        w, codebook = _quantized(rng, shape, bits, None, sparse)
        weights[name] = w
        # 8 bits: the levels in use, not a 256-entry codebook that would outweigh the tensor
        encodings[name] = encode_from_values(w, codebook, None, sparse, compact=bits == 8)
    reference = _model(weights)
    out = apply_storage(reference, encodings, packing=packing, bundle=False)
    _check_exact(reference, out)
    onnx.save(reference, tmp_path / "dense.onnx")
    onnx.save(out, tmp_path / "small.onnx")
    dense_size, small_size = (os.path.getsize(tmp_path / f) for f in ("dense.onnx", "small.onnx"))
    assert small_size < dense_size
    new = _new_initializers(reference, out)
    assert sum(storage_bytes(e, packing=packing)["total"] for e in encodings.values()) == sum(
        _data_bytes(t) for t in new
    )


# --------------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("where", [0, 215, 100])
def test_one_weight_left(where):
    w = np.zeros(SHAPES["wc"], np.float32)
    w.reshape(-1)[where] = -0.75
    enc = encode_from_values(w, [-0.75], sparse=True)
    assert enc.stored == 1 and enc.bits == 1
    reference = _model({"wc": w})
    _check_exact(reference, apply_storage(reference, {"wc": enc}))


def test_all_pruned():
    w = np.zeros(SHAPES["wm"], np.float32)
    enc = encode_from_values(w, [0.5], sparse=True)
    assert enc.stored == 0
    reference = _model({"wm": w})
    out = apply_storage(reference, {"wm": enc})
    _check_exact(reference, out)
    assert storage_bytes(enc)["codes"] == 0 and analyze(out)["wm"]["nonzero"] == 0


def test_gap_beyond_16_bits():
    shape = (400, 500)  # a MatMul weight of 200,000 elements, 3 survivors
    w = np.zeros(shape, np.float32)
    w.reshape(-1)[[1, 150_000, 199_999]] = [0.5, -0.25, 0.5]
    enc = encode_from_values(w, [-0.25, 0.5], sparse=True)
    reference = _matmul_model(w)
    out = apply_storage(reference, {"w": enc})
    _check_exact(reference, out)
    meta = json.loads(out.metadata_props[0].value)["w"]
    assert meta["fillers"] > 0 and meta["gap_bits"] <= 16
    assert np.array_equal(_decoded_by_reference(out, ["w"])["w"], w)
    for r in (2, 7, 16):
        for mode in ("append", "marker"):
            assert np.array_equal(_decode_streams(enc, r, mode), w)


def _decode_streams(enc: Encoded, r: int, mode: str) -> np.ndarray:
    """numpy mirror of the sparse decoder, from the streams the writer stores."""
    gaps, codes, fillers = st._entries(enc, r, mode)
    assert fillers == st._filler_count(st._distances(enc.positions), r, mode == "marker")
    is_filler = (gaps == 2**r - 1) if mode == "marker" else np.zeros(gaps.size, bool)
    pos = np.cumsum(gaps - is_filler)
    stride = enc.levels + (mode == "append")
    table = st._codebook_array(enc, mode).astype(enc.dtype)
    idx = np.where(is_filler, table.size - 1, codes + stride * enc.group_index(pos))
    out = np.zeros(enc.size, enc.dtype)
    out[pos] = table[idx]
    return out.reshape(enc.shape)


@pytest.mark.parametrize("mode", ["zero", "append", "marker"])
def test_filler_modes(mode):
    """Each way of giving fillers a zero, in numpy for many gap widths and in onnxruntime."""
    rng = np.random.default_rng(13)
    shape = (16, 20)
    w = np.zeros(shape, np.float32)
    w[rng.random(shape) < 0.05] = 1.0
    w[0, 0], w[3, 7], w[15, 19] = 1.0, -1.0, -1.0  # first and last elements, long gaps
    codebook = {"zero": [-1.0, 0.0, 1.0, 2.0], "append": [-1.0, 1.0, 2.0], "marker": [-1.0, 1.0]}[mode]
    enc = encode_from_values(w, codebook, sparse=True, compact=False)
    assert st._filler_modes(enc)[0] == mode
    for r in range(1 if mode != "marker" else 2, 9):
        assert np.array_equal(_decode_streams(enc, r, mode), w), r
    model = _model({"wg": w})
    out = apply_storage(model, {"wg": enc}, packing="bits")
    _check_exact(model, out)


@pytest.mark.parametrize("sparse", [False, True])
def test_float16_weights(sparse):
    rng = np.random.default_rng(3)
    weights, encodings = {}, {}
    for name in ("wg", "wm"):
        w, codebook = _quantized(rng, SHAPES[name], 3, 0, sparse, dtype=np.float16)
        weights[name] = w
        encodings[name] = encode_from_values(w, codebook, 0, sparse)
        assert encodings[name].dtype == np.float16
    reference = _model(weights)
    out = apply_storage(reference, encodings, packing="bits")
    _check_exact(reference, out)
    cb = [t for t in out.graph.initializer if t.name.endswith("codebook")]
    assert cb and all(t.data_type == TensorProto.FLOAT16 for t in cb)


def test_float32_codebook_stored_as_float16_when_exact():
    rng = np.random.default_rng(4)
    w, codebook = _quantized(rng, SHAPES["wm"], 2, None, False, dtype=np.float16)
    w = w.astype(np.float32)  # fp32 weight whose levels happen to be fp16 values
    enc = encode_from_values(w, codebook)
    reference = _model({"wm": w})
    out = apply_storage(reference, {"wm": enc})
    _check_exact(reference, out)
    (cb,) = [t for t in out.graph.initializer if t.name.endswith("codebook")]
    assert cb.data_type == TensorProto.FLOAT16
    w2 = w.copy()
    w2[w2 == w2.flat[0]] = np.float32(0.1)  # not a float16 value
    enc2 = encode_from_values(w2, np.unique(w2))
    (cb2,) = [
        t
        for t in _new_initializers(reference, apply_storage(reference, {"wm": enc2}))
        if "codebook" in t.name
    ]
    assert cb2.data_type == TensorProto.FLOAT


def test_group_axis_not_first():
    rng = np.random.default_rng(5)
    weights, encodings = {}, {}
    for name, axis in (("wc", 1), ("wm", 1)):
        for sparse in (False, True):
            w, codebook = _quantized(rng, SHAPES[name], 2, axis, sparse)
            weights[name] = w
            encodings[name] = encode_from_values(w, codebook, axis, sparse, compact=False)
        reference = _model({name: weights[name]})
        _check_exact(reference, apply_storage(reference, {name: encodings[name]}, packing="bits"))


# --------------------------------------------------------------------------------------------------
# opsets and IR versions


def test_dense_keeps_old_opset_and_ir3():
    rng = np.random.default_rng(6)
    w, codebook = _quantized(rng, SHAPES["wm"], 3, 0, False)
    reference = _model({"wm": w}, opset=7, ir=3, as_inputs=True)
    out = apply_storage(reference, {"wm": encode_from_values(w, codebook, 0)}, packing="bits")
    assert out.opset_import[0].version == 7 and out.ir_version == 3
    inputs = {v.name for v in out.graph.input}
    assert "wm" not in inputs and {t.name for t in out.graph.initializer} <= inputs  # IR 3 rule
    _check_exact(reference, out)


def test_sparse_raises_opset_and_ir():
    rng = np.random.default_rng(8)
    w, codebook = _quantized(rng, SHAPES["wm"], 2, None, True)
    reference = _model({"wm": w}, opset=7, ir=3, as_inputs=True)
    out = apply_storage(reference, {"wm": encode_from_values(w, codebook, sparse=True)})
    assert out.opset_import[0].version == 11 and out.ir_version == 6
    assert [v.name for v in out.graph.input] == ["x2"]  # initializers stay constants for onnxruntime
    _check_exact(reference, out)


def test_opset_raise_through_version_converter():
    rng = np.random.default_rng(9)
    w, codebook = _quantized(rng, SHAPES["wm"], 2, None, True)
    reference = _model({"wm": w}, opset=10)
    relu = helper.make_node("Clip", ["y3"], ["z"], name="clip", min=-0.5, max=0.5)  # Clip-6 -> Clip-11
    reference.graph.node.append(relu)
    reference.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 12]))
    out = apply_storage(reference, {"wm": encode_from_values(w, codebook, sparse=True)})
    assert out.opset_import[0].version == 11
    assert any(n.op_type == "Clip" and len(n.input) == 3 for n in out.graph.node)
    _check_exact(reference, out)


def test_opset_min():
    rng = np.random.default_rng(10)
    w, codebook = _quantized(rng, SHAPES["wm"], 2, None, False)
    out = apply_storage(_model({"wm": w}, opset=9), {"wm": encode_from_values(w, codebook)}, opset_min=13)
    assert out.opset_import[0].version == 13
    _check_exact(_model({"wm": w}, opset=13), out)


# --------------------------------------------------------------------------------------------------
# helpers and errors


def test_pack_roundtrip():
    rng = np.random.default_rng(11)
    for width in range(1, 17):
        for count in (1, 7, 8, 9, 100):
            values = rng.integers(0, 2**width, count)
            packed = st._pack(values, width)
            assert packed.nbytes == st._packed_nbytes(count, width)
            assert packed.nbytes - math.ceil(count * width / 8) < width
            assert np.array_equal(st._unpack(packed, width, count), values)


@pytest.mark.parametrize(
    "dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64, np.uint32, np.uint64]
)
def test_compact_tensor_roundtrip_and_size(dtype):
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    cases = [
        np.array([4, 1, 5, 5], dtype),  # a shape: one byte per number as varints
        np.array(7, dtype),  # a scalar
        np.array([info.min, info.max, 0], dtype),  # extremes (a negative number takes 10 bytes)
        rng.integers(info.min, info.max, size=50, dtype=dtype, endpoint=True),
        np.zeros(0, dtype),
    ]
    for a in cases:
        t = st.compact_tensor(a, "c")
        back = numpy_helper.to_array(t)
        assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
        assert st._tensor_nbytes(t) == _data_bytes(t) <= a.nbytes
        out = helper.make_tensor_value_info("y", t.data_type, None)
        graph = helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "g", [], [out], [t])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        ref = ReferenceEvaluator(m).run(None, {})[0]
        for y in (got, ref):
            assert y.dtype == a.dtype and np.array_equal(y, a)
    small = st.compact_tensor(np.array([4, 1, 5, 5], dtype), "c")
    assert st._tensor_nbytes(small) == 4  # one byte a number (raw for 1-byte types, else varints)
    assert small.HasField("raw_data") == (np.dtype(dtype).itemsize == 1)


def test_encode_errors_and_choices():
    w = np.array([[0.5, -0.5], [0.0, 0.25]], np.float32)
    with pytest.raises(OnnxAdmmError, match="not on codebook"):
        encode_from_values(w, [0.0, 0.5, -0.5])
    with pytest.raises(OnnxAdmmError, match="need 2 bits"):
        encode_from_values(w, [0.0, 0.5, -0.5, 0.25], bits=1)
    # sparse: zeros need not be on the codebook; compact drops unused levels
    enc = encode_from_values(w, [-0.5, 0.0, 0.25, 0.5, 1.0], sparse=True)
    assert enc.levels == 3 and enc.bits == 2 and enc.stored == 3
    ternary = np.where(np.arange(20_000) % 97 == 0, 0.5, 0.0).astype(np.float32)
    ternary[::194] = -0.5
    enc = encode_from_values(ternary, [-0.5, 0.0, 0.5])
    assert enc.sparse and enc.bits == 1  # auto: sparse is smaller, and the 0 level is dropped
    assert np.array_equal(decode(enc), ternary)
    dense = np.where(np.arange(1000) % 3 == 0, 0.5, 0.0).astype(np.float32)
    enc = encode_from_values(dense, [-0.5, 0.0, 0.5])
    assert not enc.sparse and enc.bits == 1  # a third non-zero: the dense form is smaller
    with pytest.raises(OnnxAdmmError, match="codes must lie"):
        Encoded((2,), np.float32, np.array([0, 3]), 1, np.array([1.0, 2.0])).validate()


def test_apply_errors():
    w = np.ones(SHAPES["wm"], np.float32)
    model = _model({"wm": w})
    enc = encode_from_values(w, [1.0])
    with pytest.raises(OnnxAdmmError, match="not an initializer"):
        apply_storage(model, {"nope": enc})
    with pytest.raises(OnnxAdmmError, match="the encoding is"):
        apply_storage(model, {"wm": encode_from_values(np.ones((12, 20), np.float32), [1.0])})
    with pytest.raises(OnnxAdmmError, match="packing"):
        apply_storage(model, {"wm": enc}, packing="nibbles")


def test_theoretical_deep_compression():
    codes = np.array([0, 1, 2])
    enc = Encoded((32,), np.float32, codes, 2, np.array([1.0, 2.0, 3.0]), positions=np.array([0, 5, 20]))
    t = theoretical(enc, gap_bits=2)  # skips 0, 4, 14 -> fillers 0 + 1 + 3 (each covers 4 positions)
    assert t["fillers"] == 4 and t["entries"] == 7
    assert t["bits"] == {"codes": 14, "positions": 14, "codebook": 96, "total": 124}
    best = theoretical(enc)
    assert best["bits"]["total"] == min(theoretical(enc, r)["bits"]["total"] for r in range(1, 17))
    dense = theoretical(Encoded((4,), np.float32, np.array([0, 1, 1, 0]), 1, np.array([1.0, 2.0])))
    assert dense["bits"] == {"codes": 4, "positions": 0, "codebook": 64, "total": 68}


def test_analyze_plain_weights_and_metadata_merge():
    rng = np.random.default_rng(12)
    wg, cb = _quantized(rng, SHAPES["wg"], 2, None, True)
    wm = np.where(rng.random(SHAPES["wm"]) < 0.8, 0, 1).astype(np.float32)
    model = _model({"wg": wg, "wm": wm, "wc": rng.standard_normal(SHAPES["wc"]).astype(np.float32)})
    # wm as an onnx COO sparse initializer
    (dense_wm,) = [t for t in model.graph.initializer if t.name == "wm"]
    model.graph.initializer.remove(dense_wm)
    idx = np.flatnonzero(wm)
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            numpy_helper.from_array(wm.reshape(-1)[idx], "wm"),
            numpy_helper.from_array(idx, "wm_idx"),
            wm.shape,
        )
    )
    out = apply_storage(model, {"wg": encode_from_values(wg, cb, sparse=True)})
    report = analyze(out)
    assert set(report) == {"wg", "wm", "wc"}
    assert report["wc"]["storage"] == "dense" and report["wc"]["bytes"]["total"] == 4 * 216
    assert report["wm"]["storage"] == "coo" and report["wm"]["nonzero"] == idx.size
    assert (
        report["wm"]["bytes"]["codes"] == 4 * idx.size and report["wm"]["bytes"]["positions"] == 8 * idx.size
    )
    assert report["wg"]["storage"] == "codebook" and report["wg"]["sparse"]
    # everything the file holds for weights and decoders, plus the rest of the graph, is the file
    weights_share = sum(r["bytes"]["total"] + r["bytes"]["nodes"] for r in report.values())
    assert weights_share < out.ByteSize() < weights_share + 800
    # a second call adds to the metadata instead of replacing it
    wc = np.where(rng.random(SHAPES["wc"]) < 0.5, 0.5, -0.5).astype(np.float32)
    again = apply_storage(out, {"wc": encode_from_values(wc, [-0.5, 0.5])})
    meta = json.loads(dict((p.key, p.value) for p in again.metadata_props)[METADATA_KEY])
    assert set(st._weights_meta(meta)) == {"wg", "wc"}
    assert {w for w, v in st.decoder_nodes(again).items() if v} == {"wg", "wc"}
    feeds = _feeds(again)
    assert np.array_equal(_run(again, feeds)[0], _run(_model({"wc": wc}), {"x1": feeds["x1"]})[0])


@pytest.mark.parametrize("opset", [7, 9, 10, 13, 21])
def test_dense_decoder_at_each_opset(opset):
    """The dense decoder's opset-dependent forms (MatMul/ReduceSum, Mod, Slice, Range) all run."""
    rng = np.random.default_rng(opset)
    w, codebook = _quantized(rng, SHAPES["wm"], 3, 0, False)  # 240 codes: 30 rows of 8, no padding
    w2, codebook2 = _quantized(rng, (12, 20), 5, 1, False)  # 240 codes at 5 bits, groups on axis 1
    reference = _model({"wm": w}, opset=opset)
    out = apply_storage(reference, {"wm": encode_from_values(w, codebook, 0, compact=False)}, packing="bits")
    assert out.opset_import[0].version == opset
    _check_exact(reference, out)
    w3 = np.concatenate([w2, w2[:1]])  # 13 x 20 = 260 codes: padding to drop
    enc = encode_from_values(w3, codebook2, 1, compact=False)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w3"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 13])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 20])],
        [numpy_helper.from_array(w3, "w3")],
    )
    reference = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    reference.ir_version = helper.find_min_ir_version_for(list(reference.opset_import))
    _check_exact(reference, apply_storage(reference, {"w3": enc}, packing="bits"))


def test_unfolded_decode_nodes_reports_what_stays():
    """The folding check can fail: a decoder whose input may be overridden is not folded."""
    rng = np.random.default_rng(14)
    w, codebook = _quantized(rng, SHAPES["wm"], 2, None, False)
    for bundle in (False, "always"):
        out = apply_storage(_model({"wm": w}), {"wm": encode_from_values(w, codebook)}, bundle=bundle)
        assert not unfolded_decode_nodes(out)
        (codes,) = [t for t in out.graph.initializer if t.name.endswith(("codes", "data"))]
        out.graph.input.append(helper.make_tensor_value_info(codes.name, codes.data_type, list(codes.dims)))
        assert unfolded_decode_nodes(out)


@pytest.mark.slow
def test_ten_million_weights_load_fast():
    """A 10M-element weight (dense 4-bit per channel, and 90% sparse 3-bit) decodes at load quickly."""
    import time

    rng = np.random.default_rng(15)
    rows, cols = 4000, 2500
    for sparse in (False, True):
        w, codebook = _quantized(rng, (rows, cols), 4 if not sparse else 3, None if sparse else 0, sparse)
        enc = encode_from_values(w, codebook, None if sparse else 0, sparse)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
            [numpy_helper.from_array(w, "w")],
        )
        reference = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        out = apply_storage(reference, {"w": enc})
        assert out.ByteSize() < reference.ByteSize() / (6 if not sparse else 30)
        start = time.perf_counter()
        sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
        assert time.perf_counter() - start < 20
        x = rng.standard_normal((1, rows)).astype(np.float32)
        assert np.array_equal(sess.run(None, {"x": x})[0], _run(reference, {"x": x})[0])


# --------------------------------------------------------------------------------------------------
# raw values (format 5): pruned float weights without a codebook


def _pruned(rng, shape, density, dtype=np.float32):
    w = rng.standard_normal(shape).astype(dtype)
    return np.where(rng.random(shape) < density, w, 0).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("density", [0.0, 0.004, 0.1, 0.6])
def test_raw_values_exact_in_onnxruntime(dtype, density):
    rng = np.random.default_rng(int(density * 1000) + (dtype is np.float16))
    weights = {n: _pruned(rng, SHAPES[n], density, dtype) for n in SHAPES}
    weights["wm"].reshape(-1)[-1] = 0.5  # the last element stored
    encodings = {n: st.encode_sparse(w) for n, w in weights.items()}
    for n, enc in encodings.items():
        assert enc.raw and enc.value_bits in ((16,) if dtype is np.float16 else (16, 32))  # 16: float16-exact
        assert np.array_equal(decode(enc), weights[n])
    reference = _model(weights)
    out = apply_storage(reference, encodings)
    _check_exact(reference, out)
    assert all(np.array_equal(v, weights[k]) for k, v in _decoded_by_reference(out, list(SHAPES)).items())
    for n, e in analyze(out).items():
        assert e["storage"] == "codebook" and e["raw"] and e["nonzero"] == np.count_nonzero(weights[n])
        assert {k: e["bytes"][k] for k in ("codes", "positions", "total")} == {
            k: storage_bytes(encodings[n])[k] for k in ("codes", "positions", "total")
        }
        assert e["bytes"]["codebook"] == 0


def test_raw_values_long_gaps_use_zero_fillers():
    w = np.zeros((400, 500), np.float32)
    w.reshape(-1)[[0, 3, 150_000, 199_999]] = [0.1, -2.5, 3.25, 1e-3]
    enc = st.encode_sparse(w)
    for r in (2, 5, 16):
        gaps, codes, fillers = st._entries(enc, r, "zero")
        assert fillers == st._filler_count(st._distances(enc.positions), r, False)
        assert np.count_nonzero(codes < 0) == fillers  # fillers read a 0 from the value stream
        pos = np.cumsum(gaps)
        assert np.array_equal(pos[codes >= 0], enc.positions)
    reference = _matmul_model(w)
    _check_exact(reference, apply_storage(reference, {"w": enc}))


def test_raw_values_much_smaller_than_coo():
    """A 95%-pruned float32 weight: about 4 + r/8 bytes per non-zero, against 12 for COO int64."""
    rng = np.random.default_rng(5)
    w = _pruned(rng, (500, 800), 0.05)
    enc = st.encode_sparse(w)
    sizes, fillers = storage_bytes(enc), st._plan(enc, 13).fillers
    nnz = np.count_nonzero(w)
    assert sizes["codes"] == 4 * (nnz + fillers) and fillers < 0.01 * nnz  # a 0 value per filler
    assert sizes["positions"] <= nnz  # gaps of at most 8 bits here (mean gap 20)
    assert sizes["total"] + sizes["nodes"] < 0.45 * nnz * 12
    t = theoretical(st.encode_sparse(w))
    assert t["bits"]["codebook"] == 0 and t["bits"]["codes"] == 32 * t["entries"]


def test_raw_values_rejects_bad_forms():
    w = np.zeros((4, 5), np.float32)
    w[1, 2] = 1.0
    enc = st.encode_sparse(w)
    with pytest.raises(OnnxAdmmError, match="sparse form"):
        Encoded(w.shape, w.dtype, enc.codes, 0, enc.codebook, None, None).validate()
    with pytest.raises(OnnxAdmmError, match="arange"):
        Encoded(w.shape, w.dtype, enc.codes + 1, 0, np.ones((1, 1)), None, enc.positions).validate()
    with pytest.raises(OnnxAdmmError, match="float32 or float16"):
        st.encode_sparse(w.astype(np.float64))


def test_expand_storage_restores_plain_initializers():
    """Every codebook-stored weight (quantized dense, quantized sparse, raw sparse) becomes a plain
    initializer with the same values; the decoders, their constants and the metadata go."""
    rng = np.random.default_rng(11)
    wc, cb = _quantized(rng, SHAPES["wc"], 3, 0, False)
    wg, cbg = _quantized(rng, SHAPES["wg"], 2, None, True)
    wm = _pruned(rng, SHAPES["wm"], 0.2)
    reference = _model({"wc": wc, "wg": wg, "wm": wm})
    encodings = {
        "wc": encode_from_values(wc, cb, 0, False),
        "wg": encode_from_values(wg, cbg, None, True),
        "wm": st.encode_sparse(wm),
    }
    packed = apply_storage(reference, encodings)
    plain = st.expand_storage(packed)
    assert not st.decoder_nodes(plain)
    assert len(plain.graph.node) == len(reference.graph.node)
    assert {t.name for t in plain.graph.initializer} == {"wc", "wg", "wm"}
    assert METADATA_KEY not in {p.key for p in plain.metadata_props}
    values = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    for n, w in {"wc": wc, "wg": wg, "wm": wm}.items():
        assert values[n].dtype == w.dtype and np.array_equal(values[n], w), n
    feeds = _feeds(reference)
    for a, b in zip(_run(reference, feeds), _run(plain, feeds), strict=True):
        assert np.array_equal(a, b)
    onnx.checker.check_model(plain, full_check=True)
    assert st.expand_storage(reference) is reference  # nothing to expand


@pytest.mark.parametrize("name", ["w", "model.encoder.layers.11.attention.self.query.weight"])
@pytest.mark.parametrize("kind", ["raw", "codes"])
def test_file_cost_is_what_the_file_grows_by(name, kind):
    """file_cost (names, nodes, data and the metadata entry) against the real serialized sizes."""
    rng = np.random.default_rng(1)
    if kind == "raw":
        w = _pruned(rng, (32, 32), 0.1)
        enc = st.encode_sparse(w)
    else:
        w, book = _quantized(rng, (32, 32), 2, None, True)
        enc = encode_from_values(w, book, None, True)
    model = _matmul_model(w, name)
    without = onnx.ModelProto()
    without.CopyFrom(model)
    del without.graph.initializer[:]
    grown = apply_storage(model, {name: enc}).ByteSize() - without.ByteSize()
    assert abs(st.file_cost(enc, name) - grown) <= 8, (st.file_cost(enc, name), grown)


def test_opset_raise_through_converter_keeps_sparse_initializers():
    """A model at opset 10 whose Gemm changes schema at 11 (so onnx.version_converter runs) and
    which also holds a COO sparse initializer: the converter must not lose it."""
    rng = np.random.default_rng(2)
    w1 = _pruned(rng, (20, 16), 0.3)
    w2 = _pruned(rng, (16, 12), 0.3)
    sp = onnx.helper.make_sparse_tensor(
        numpy_helper.from_array(w2[w2 != 0], "w2"),
        numpy_helper.from_array(np.flatnonzero(w2).astype(np.int64), "w2_idx"),
        list(w2.shape),
    )
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="m2"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.ones(16, np.float32), "b1")],
        sparse_initializer=[sp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 6
    out = apply_storage(model, {"w1": st.encode_sparse(w1)})
    assert st.default_opset(out) == 11 and [s.values.name for s in out.graph.sparse_initializer] == ["w2"]
    assert "w2" not in {v.name for v in out.graph.input}
    feeds = _feeds(model)
    for a, b in zip(_run(model, feeds), _run(out, feeds), strict=True):
        assert np.array_equal(a, b)


def test_decoders_of_files_written_before_tags():
    """Files whose metadata has no tag name their decoder nodes ``onnxadmm_decode/<weight>/<i>``:
    analyze, decoder_nodes and expand_storage still find them."""
    rng = np.random.default_rng(7)
    w = np.where(rng.random(SHAPES["wg"]) < 0.3, 0.25, 0.0).astype(np.float32)
    reference = _model({"wg": w})
    new = apply_storage(reference, {"wg": encode_from_values(w, [0.0, 0.25], sparse=True)}, bundle=False)
    meta = json.loads(dict((p.key, p.value) for p in new.metadata_props)[METADATA_KEY])
    tag = meta["wg"].pop("tag")
    old = onnx.ModelProto()
    old.CopyFrom(new)
    def rename(x: str) -> str:  # the names of those files: onnxadmm_decode/wg/<i>, .../codes
        return f"{st.PREFIX}wg/{x[len(tag):]}" if x.startswith(tag) else x

    for n in old.graph.node:
        n.name = rename(n.name)
        n.input[:] = [rename(x) for x in n.input]
        n.output[:] = [rename(x) for x in n.output]
    for t in old.graph.initializer:
        t.name = rename(t.name)
    for p in old.metadata_props:
        if p.key == METADATA_KEY:
            p.value = json.dumps(meta)
    assert [n.name for n in st.decoder_nodes(old)["wg"]] == [
        f"{st.PREFIX}wg/{n.name[len(tag):]}" for n in st.decoder_nodes(new)["wg"]
    ]
    old_bytes, new_bytes = st.analyze(old)["wg"]["bytes"], st.analyze(new)["wg"]["bytes"]
    assert old_bytes.pop("nodes") > new_bytes.pop("nodes")  # the tags are the shorter names
    assert old_bytes == new_bytes
    assert np.array_equal(numpy_helper.to_array(st.expand_storage(old).graph.initializer[-1]), w)


# --------------------------------------------------------------------------------------------------
# bundles: several weights, one shared decoder (onnxadmm.export.bundle)

# LeNet-5 after filter pruning, then pruning and 3 bits inside: one layer in each region
BUNDLE_LAYERS = {"c1": ((4, 1, 5, 5), 0.8), "c2": ((11, 4, 5, 5), 0.33), "f1": ((107, 176), 0.045), "f2": ((10, 107), 0.35)}


def _bundle_weights(rng, bits, dtype=np.float32, layers=BUNDLE_LAYERS, k=None):
    """Weights on ``k`` (default 2**bits - 1) non-zero levels each (plus 0), at the densities of ``layers``."""
    weights, encodings = {}, {}
    k = k or 2**bits - 1
    for name, (shape, density) in layers.items():
        levels = (rng.uniform(0.1, 1.0, k) * rng.choice([-1, 1], k)).astype(dtype)
        weights[name], encodings[name] = _on_levels(rng, levels, shape, density)
    return weights, encodings


def _on_levels(rng, levels, shape, density):
    """A weight of ``shape`` drawn from ``levels``, about ``density`` of it kept (at least one
    element), and its codebook encoding; returns (weight, encoding)."""
    w = levels[rng.integers(0, levels.size, shape)]
    keep = rng.random(shape) < density
    keep.flat[rng.integers(w.size)] = True
    w = np.where(keep, w, 0).astype(levels.dtype)
    return w, encode_from_values(w, np.append(levels.astype(np.float32), 0))


def _bundle_model(weights: dict[str, np.ndarray], opset: int = 13) -> onnx.ModelProto:
    """Each weight added to an input of its shape (so every weight is used and checked)."""
    dtype = next(iter(weights.values())).dtype.type
    nodes, inputs, outputs = [], [], []
    for name, w in weights.items():
        inputs.append(helper.make_tensor_value_info(f"x_{name}", ELEM_TYPE[dtype], list(w.shape)))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", ELEM_TYPE[dtype], list(w.shape)))
        nodes.append(helper.make_node("Add", [f"x_{name}", name], [f"y_{name}"], name=f"add_{name}"))
    inits = [numpy_helper.from_array(w, n) for n, w in weights.items()]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


def _bundle_entries(model: onnx.ModelProto) -> dict[str, dict]:
    meta = json.loads(dict((p.key, p.value) for p in model.metadata_props)[METADATA_KEY])
    return {tag: d for tag, d in meta.items() if d.get("format") == "onnxadmm-bundle-1"}


@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bundle_exact_in_onnxruntime(bits, dtype, opset):
    rng = np.random.default_rng(bits * 7 + opset)
    weights, encodings = _bundle_weights(rng, bits, dtype)
    reference = _bundle_model(weights, opset)
    out = apply_storage(reference, encodings, bundle="always")
    _check_exact(reference, out)
    (tag, entry), = _bundle_entries(out).items()
    assert {m[0] for m in entry["members"]} == set(weights)
    assert entry["bits"] <= max(1, bits)  # (codes 1..K stored less 1 where no member is dense)
    regions = {m[0]: m[1] for m in entry["members"]}
    assert regions["f1"] == "gaps"  # 4.5% dense
    assert all(not n.name for n in out.graph.node if n.output[0].startswith(tag) or n.output[0] in weights)

    # onnx's reference evaluator decodes the same tensors from the shared nodes
    nodes = list({id(n): n for ns in st.decoder_nodes(out).values() for n in ns}.values())
    sub = helper.make_model(
        helper.make_graph(
            nodes, "d", [], [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in weights],
            list(out.graph.initializer),
        ),
        opset_imports=list(out.opset_import),
    )
    for name, got in zip(weights, ReferenceEvaluator(sub).run(None, {})):
        assert got.dtype == weights[name].dtype and np.array_equal(got, weights[name])

    # analyze: per member, counts from the metadata; bytes that add up to what the bundle adds
    report = analyze(out)
    for name, w in weights.items():
        e = report[name]
        assert e["storage"] == "codebook" and e["nonzero"] == np.count_nonzero(w) and e["bits"] == entry["bits"]
        assert e["K"] == np.unique(w[w != 0]).size and e["region"] == regions[name]
    new = _new_initializers(reference, out)
    assert sum(report[n]["bytes"]["total"] for n in weights) == sum(_data_bytes(t) for t in new)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(out)
    keep_nodes = [n for n in stripped.graph.node if n.name.startswith("add_")]
    del stripped.graph.node[:]
    stripped.graph.node.extend(keep_nodes)
    keep_inits = [t for t in stripped.graph.initializer if not t.name.startswith(tag)]
    del stripped.graph.initializer[:]
    stripped.graph.initializer.extend(keep_inits)
    grown = out.ByteSize() - stripped.ByteSize()
    assert sum(report[n]["bytes"]["total"] + report[n]["bytes"]["nodes"] for n in weights) == grown

    # expand_storage gives the plain tensors back and drops the bundle's nodes and entry
    plain = st.expand_storage(out)
    values = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    for name, w in weights.items():
        assert values[name].dtype == w.dtype and np.array_equal(values[name], w)
    assert [n.name for n in plain.graph.node] == [n.name for n in reference.graph.node]
    assert not any(t.startswith(tag) for t in values)
    assert METADATA_KEY not in {p.key for p in plain.metadata_props}


def _payload_bits(entry: dict) -> int:
    """Bits of a bundle's payload from its metadata: the codes (one unused code first where a
    member is not dense; ``g`` codes to a ``w``-bit number with a radix), a bit per bitmap element,
    ``gap_bits`` per gap entry (fillers included)."""
    members = entry["members"]
    n_codes = sum(m[4] for m in members) + any(m[1] != "dense" for m in members)
    _, g, w = entry.get("radix", [0, 1, entry["bits"]])
    bits = -(-n_codes // g) * w
    bits += sum(math.prod(m[2]) for m in members if m[1] == "bitmap")
    return bits + sum((m[4] + m[5]) * entry["gap_bits"] for m in members if m[1] == "gaps")


@pytest.mark.parametrize("k", [1, 2, 3, 6, 7, 14])
def test_bundle_every_layout_exact(k):
    """Every layout the planner can pick (each region mix; codes 0..K, or 1..K stored less 1; bit
    fields or several codes to a base-(K+1)/base-K number) decodes exactly, in onnxruntime and in
    onnx's reference evaluator, with the payload size its metadata implies."""
    from onnxadmm.export import bundle as bd

    rng = np.random.default_rng(k)
    weights, encodings = _bundle_weights(rng, 0, k=k)
    members = [bd.member(n, e) for n, e in encodings.items()]
    seen = {}
    for _, plan in bd._plans(members):
        key = (plan.family, frozenset(plan.regions.values()))
        if key in seen:
            continue
        b, entry = bd._build(plan, 13, "_T")
        seen[key] = entry
        inits = [t for _, t in b.initializers.values()]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(w.shape)) for n, w in weights.items()]
        model = helper.make_model(
            helper.make_graph(b.nodes, "d", [], outs, inits), opset_imports=[helper.make_opsetid("", 13)]
        )
        onnx.checker.check_model(model, full_check=True)
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
        ref = ReferenceEvaluator(model).run(None, {})
        for name, a, r in zip(weights, got, ref):
            assert np.array_equal(a, weights[name]) and np.array_equal(r, weights[name]), (key, name)
        (data,) = [t for t in inits if t.name == "_Tdata"]
        assert st._tensor_nbytes(data) == -(-_payload_bits(entry) // 8)
        kk = entry.get("grid", k)  # symbols: the member's levels, or the shared integer grid
        assert ("grid" in entry) == (plan.grid is not None)
        assert entry["bits"] == max(1, (kk - 1 if entry.get("shift") else kk).bit_length())
        radix = bd.radix(kk if entry.get("shift") else kk + 1)
        assert entry.get("radix", [0, 1, 0])[1] == (radix[0] if plan.grouped else 1)
    families = {f for f, _ in seen}
    regions = set().union(*(r for _, r in seen))
    assert regions == {"dense", "bitmap", "gaps"}
    assert (False, False, False) in families and (True, False, False) in families
    assert ((False, True, False) in families) == (bd.radix(k + 1)[0] > 1)
    assert ((True, True, False) in families) == (bd.radix(k)[0] > 1)
    # one level per member is a step times +-1: the grid plans are built too
    assert any(f[2] for f in families) == (k == 1)


def _affine_weights(rng, bits, dtype, layers=BUNDLE_LAYERS):
    """Uniform quantization's weights: each layer a step times the integers +-1 .. +-2**(bits-1)
    (pruned layers' grid), the step arbitrary in ``dtype``; layer ``c2`` never uses +-1."""
    weights, encodings = {}, {}
    ints = np.concatenate([-np.arange(1, 2 ** (bits - 1) + 1), np.arange(1, 2 ** (bits - 1) + 1)])
    for name, (shape, density) in layers.items():
        step = np.asarray(rng.uniform(0.003, 0.2), dtype=dtype)
        own = ints[np.abs(ints) > 1] if name == "c2" and bits > 1 else ints
        levels = own.astype(dtype) * step
        weights[name], encodings[name] = _on_levels(rng, levels, shape, density)
    return weights, encodings


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bundle_affine_grid_exact(bits, dtype, opset, tmp_path):
    """Members whose levels are a step times small integers share one int8 grid and store a step
    each (uniform quantization's codebooks: ``K`` floats each become one), decode exactly in
    onnxruntime and onnx's reference evaluator, and the report's bytes add up to the bundle's."""
    from onnxadmm.export import bundle as bd

    rng = np.random.default_rng(bits * 11 + opset)
    weights, encodings = _affine_weights(rng, bits, dtype)
    members = [bd.member(n, e) for n, e in encodings.items()]
    for m in members:
        step, ints = m.affine
        assert np.array_equal((ints.astype(dtype) * np.asarray(step, dtype)).astype(np.float32), m.levels)
    assert bd._grid(members).size == 2**bits
    # every grid layout (regions, shifted codes, radix) decodes exactly on its own
    seen = set()
    for _, plan in bd._plans(members):
        key = (plan.family, frozenset(plan.regions.values()))
        if plan.grid is None or key in seen:
            continue
        seen.add(key)
        b, entry = bd._build(plan, opset, "_T")
        assert entry["grid"] == 2**bits
        outs = [helper.make_tensor_value_info(n, ELEM_TYPE[dtype], list(w.shape)) for n, w in weights.items()]
        model = helper.make_model(
            helper.make_graph(b.nodes, "d", [], outs, [t for _, t in b.initializers.values()]),
            opset_imports=[helper.make_opsetid("", opset)],
        )
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
        ref = ReferenceEvaluator(model).run(None, {})
        for name, a, r in zip(weights, got, ref):
            assert a.dtype == dtype and np.array_equal(a, weights[name]) and np.array_equal(r, weights[name])
        # folded at load: with the weights used by Adds, no decoder node is left after basic optimisation
        used = _bundle_model(weights, opset)
        used.graph.node.extend(b.nodes)
        used.graph.ClearField("initializer")
        used.graph.initializer.extend(t for _, t in b.initializers.values())
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(used.SerializeToString(), so, providers=["CPUExecutionProvider"])
        left = onnx.load(so.optimized_model_filepath).graph.node
        assert not [n.op_type for n in left if any(x.startswith("_T") for x in [*n.input, *n.output])]
    assert len(seen) >= 3
    # the planner keeps the grid where it makes the file smaller (float32 from 3 bits: 8+ floats a
    # member against one step; float16 weights pay a Cast each); end to end through apply_storage,
    # analyze and expand_storage
    reference = _bundle_model(weights, opset)
    out = apply_storage(reference, encodings, bundle="always")
    _check_exact(reference, out)
    (tag, entry), = _bundle_entries(out).items()
    if "grid" not in entry:
        assert bits < 3 or dtype == np.float16
        return
    assert entry["grid"] == 2**bits and entry["bits"] <= bits
    inits = {t.name: t for t in out.graph.initializer}
    assert numpy_helper.to_array(inits[tag + "codebook"]).dtype == np.int8
    assert numpy_helper.to_array(inits[tag + "step"]).size == len(weights)
    for name, got in _decoded_by_reference(out, list(weights)).items():
        assert got.dtype == weights[name].dtype and np.array_equal(got, weights[name])
    report = analyze(out)
    new = _new_initializers(reference, out)
    assert sum(report[n]["bytes"]["total"] for n in weights) == sum(_data_bytes(t) for t in new)
    books = sum(report[n]["bytes"]["codebook"] for n in weights)
    assert books == _data_bytes(inits[tag + "codebook"]) + _data_bytes(inits[tag + "step"])
    for name, w in weights.items():
        assert report[name]["K"] == np.unique(w[w != 0]).size and report[name]["nonzero"] == np.count_nonzero(w)
    plain = st.expand_storage(out)
    values = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    assert all(values[n].dtype == w.dtype and np.array_equal(values[n], w) for n, w in weights.items())


def test_bundle_affine_grid_pays_and_falls_back():
    """At 3 bits the grid's codebook bytes are a fraction of the per-member tables' (the planner
    keeps it); one member off any grid (a k-means codebook) makes the whole bundle use tables."""
    from onnxadmm.export import bundle as bd

    rng = np.random.default_rng(5)
    weights, encodings = _affine_weights(rng, 3, np.float32)
    members = [bd.member(n, e) for n, e in encodings.items()]
    best = {}
    for _, plan in bd._plans(members):
        b, entry = bd._build(plan, 13, "_T")
        key = plan.grid is not None
        cost = b.bytes_by_role()
        if key not in best or cost["total"] < best[key]["total"]:
            best[key] = cost
    assert best[True]["codebook"] + 60 < best[False]["codebook"]  # 9 + 16 bytes against 4 x 9 floats
    assert best[True]["total"] < best[False]["total"]
    out = apply_storage(_bundle_model(weights), encodings, bundle="always")
    assert "grid" in next(iter(_bundle_entries(out).values()))

    clustered = dict(encodings)
    w = weights["f2"].copy()
    w[w != 0] += np.float32(0.0123) * np.sign(w[w != 0]) * (np.abs(w[w != 0]) > np.median(np.abs(w[w != 0])))
    levels = np.unique(w[w != 0])
    clustered["f2"] = encode_from_values(w, np.append(levels, 0))
    assert bd.member("f2", clustered["f2"]).affine is None
    mixed = dict(weights, f2=w)
    out = apply_storage(_bundle_model(mixed), clustered, bundle="always")
    _check_exact(_bundle_model(mixed), out)
    assert "grid" not in next(iter(_bundle_entries(out).values()))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_bundle_grid_never_makes_the_file_larger(bits, dtype, monkeypatch):
    """The grid adds candidate layouts; it must not push the per-codebook ones out of those the
    planner builds (session 21's first version did: equal payloads crowded the top ranks)."""
    from onnxadmm.export import bundle as bd

    rng = np.random.default_rng(40 + bits)
    layers = {"a": ((24, 8, 3, 3), 0.5), "b": ((64, 90), 0.08), "c": ((10, 64), 0.9)}
    weights, encodings = _affine_weights(rng, bits, dtype, layers=layers)
    reference = _bundle_model(weights)
    with_grid = apply_storage(reference, encodings, bundle="always")
    monkeypatch.setattr(bd, "_grid", lambda members: None)
    without = apply_storage(reference, encodings, bundle="always")
    assert "grid" not in next(iter(_bundle_entries(without).values()))
    assert with_grid.ByteSize() <= without.ByteSize()


def test_affine_levels():
    """The step is found from the smallest level (divided by 1..4), rebuilt exactly or refused."""
    from onnxadmm.export.bundle import _affine

    s = np.float32(0.0371)
    step, ints = _affine(np.array([-3, -1, 2, 4], np.float32) * s, np.float32)
    assert np.float32(step) == s and ints.tolist() == [-3, -1, 2, 4]
    step, ints = _affine(np.array([-4, 2, 3], np.float32) * s, np.float32)  # no +-1 level
    assert np.float32(step) == s and ints.tolist() == [-4, 2, 3]
    assert _affine(np.array([0.1, 0.25, 0.37], np.float32), np.float32) is None  # k-means centroids
    assert _affine(np.array([1.0, 1000.0], np.float32), np.float32) is None  # integers too large
    assert _affine(np.array([0.5, 1.0], np.float32), np.float64) is None  # only float32 / float16
    half = np.float16(0.0371)
    step, ints = _affine(np.array([-2, 1, 2], np.float16) * half, np.float16)
    assert np.float16(step) == half and ints.tolist() == [-2, 1, 2]


def test_radix():
    from onnxadmm.export.bundle import radix

    assert radix(6) == (5, 13) and radix(3) == (17, 27) and radix(7) == (11, 31)
    assert radix(8) == (1, 3) and radix(2) == (1, 1) and radix(1) == (1, 1)
    for a in range(2, 300):
        g, w = radix(a)
        assert w <= 31 and a**g <= 2**w < 2 * a**g  # the fewest bits holding g codes
        assert g == 1 or w / g < (a - 1).bit_length()  # grouping only where it saves bits
        assert w / g <= min((a**h - 1).bit_length() / h for h in range(1, 9) if a**h < 2**31)


def test_bundle_smaller_than_one_decoder_per_weight(tmp_path):
    """LeNet-5's layers after filter pruning and pruning + 3 bits inside them (~1,700 non-zeros):
    one shared decoder takes less room than four, every stream bit-packed, and the weights' bytes
    in the file (payload, codebooks, constants) shrink with it."""
    rng = np.random.default_rng(5)
    weights, encodings = _bundle_weights(rng, 3)
    reference = _bundle_model(weights)
    bundled = apply_storage(reference, encodings)
    singles = apply_storage(reference, encodings, bundle=False)
    _check_exact(reference, bundled)
    assert _bundle_entries(bundled) and not _bundle_entries(singles)
    assert singles.ByteSize() - bundled.ByteSize() > 500  # ~5.3 KB -> ~4.6 KB
    # a layout chosen beforehand (the pipeline's, priced against plain floats) is written as given
    layout = st.select_storage(encodings, 13)
    assert layout[0] and apply_storage(reference, encodings, layout=layout) == bundled
    with pytest.raises(OnnxAdmmError, match="layout"):
        apply_storage(reference, encodings, layout=(layout[0], []) if layout[1] else ([], []))
    # any split between bundles and singles is a layout, whatever the names' order (a single that
    # sorts before the bundle's members was refused in session 16: the pipeline then wrote plain floats)
    names = sorted(encodings)
    for single in (names[0], names[-1]):
        given = ([[n for n in names if n != single]], [single])
        mixed = apply_storage(reference, encodings, layout=given)
        _check_exact(reference, mixed)
        assert set(_bundle_entries(mixed)) and analyze(mixed)[single].get("region") is None
        assert all(analyze(mixed)[n].get("region") for n in names if n != single)
    (_, entry), = _bundle_entries(bundled).items()
    a, b = analyze(bundled), analyze(singles)
    assert sum(a[n]["bytes"]["total"] for n in weights) < sum(b[n]["bytes"]["total"] for n in weights)
    payload = sum(a[n]["bytes"]["codes"] + a[n]["bytes"]["positions"] for n in weights)
    assert payload == math.ceil(_payload_bits(entry) / 8)
    assert {m[0]: m[1] for m in entry["members"]}["f1"] == "gaps"


def test_bundle_leaves_out_what_does_not_pay():
    """Raw (unquantized) and per-channel weights keep their own decoder, all-zero ones too; a
    model below opset 11 that needs no sparse decoder gets no bundle (its opset stays)."""
    rng = np.random.default_rng(3)
    weights, encodings = _bundle_weights(rng, 3)
    w_raw = np.where(rng.random((30, 40)) < 0.1, rng.standard_normal((30, 40)), 0).astype(np.float32)
    w_chan, book = _quantized(rng, (16, 30), 2, 0, False)
    weights.update(raw=w_raw, chan=w_chan, zero=np.zeros((5, 6), np.float32))
    encodings.update(
        raw=st.encode_sparse(w_raw),
        chan=encode_from_values(w_chan, book, 0, False),
        zero=encode_from_values(weights["zero"], [0.5], sparse=True),
    )
    reference = _bundle_model(weights)
    out = apply_storage(reference, encodings)
    _check_exact(reference, out)
    (_, entry), = _bundle_entries(out).items()
    assert {m[0] for m in entry["members"]} <= set(BUNDLE_LAYERS)
    meta = json.loads(dict((p.key, p.value) for p in out.metadata_props)[METADATA_KEY])
    assert {"raw", "chan", "zero"} <= set(meta)

    dense = {n: w for n, w in _bundle_weights(rng, 4, layers={"a": ((40, 30), 1.0), "b": ((30, 20), 1.0)})[0].items()}
    encs = {n: encode_from_values(w, np.append(np.unique(w[w != 0]), 0), sparse=False) for n, w in dense.items()}
    low = _bundle_model(dense, opset=9)
    out = apply_storage(low, encs)
    assert st.default_opset(out) == 9 and not _bundle_entries(out)
    _check_exact(low, out)


def test_decoder_names_avoid_names_in_subgraphs():
    """An If branch whose tensor is named like a decoder's (``_A1``): a subgraph sees its outer
    graph's names, so the decoder must take another prefix or the model is not in SSA form."""
    w = np.array([[0.5, 0, -0.5, 0.25]] * 4, np.float32)
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["_A1"]), helper.make_node("Identity", ["_A1"], ["t_out"])],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e_out"])], "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 4])]
    )  # fmt: skip
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["z"], then_branch=then, else_branch=other), helper.make_node("MatMul", ["z", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    out = apply_storage(m, {"w": encode_from_values(w, [0.5, -0.5, 0.25, 0.0], sparse=False)}, bundle=False)
    onnx.checker.check_model(out, full_check=True)
    assert not any(o.startswith("_A") for n in out.graph.node for o in n.output)
    for c in (True, False):
        feeds = {"x": np.arange(4, dtype=np.float32)[None], "c": np.array(c)}
        ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        assert np.array_equal(got, ref)
