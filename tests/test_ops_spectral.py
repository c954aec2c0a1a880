"""Spectral ops and deformable convolution (DFT, STFT, MelWeightMatrix, DeformConv).

Each test builds a one-node model, runs it in onnxruntime (or, where onnxruntime refuses the case or
disagrees with the spec, in ``onnx.reference.ReferenceEvaluator``) and in ``OnnxGraphModule``, and
compares shape, dtype and values; for differentiable ops it also checks that finite, non-zero
gradients reach the float inputs named in ``grad`` and every trainable parameter of the module.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from builders import DRAWS, check_op, expected_outputs, one_node_model
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from onnxadmm.importer.graph import OnnxGraphModule, UnsupportedModelError

_r = DRAWS.uniform


def _i64(v) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def check(
    op, feeds, consts=None, attrs=None, opset=17, names=None, rtol=1e-5, atol=1e-5, grad=None, reference=False
):
    """:func:`builders.check_op` of a one-output node (opset 17 by default); with ``grad``, every
    parameter of the module must receive a gradient too. Its output."""
    return check_op(
        op, feeds, consts, attrs, opset=opset, names=names, rtol=rtol, atol=atol, grad=grad,
        reference=reference, param_grads=True,
    )[0]  # fmt: skip


def _complex(x: np.ndarray) -> np.ndarray:
    """The ONNX [..., 1 | 2] layout as a numpy array (complex for a trailing 2)."""
    return x[..., 0] + 1j * x[..., 1] if x.shape[-1] == 2 else x[..., 0]


# ---- DFT ----------------------------------------------------------------------------------------
# (input's last dim, inverse, onesided): the variants onnxruntime runs besides the IRFFT
DFT_KINDS = [(1, 0, 0), (1, 1, 0), (1, 0, 1), (2, 0, 0), (2, 1, 0)]


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("kind", DFT_KINDS, ids=lambda k: "cplx{}_inv{}_one{}".format(*k))
@pytest.mark.parametrize("length", [None, 5, 8, 11])
@pytest.mark.parametrize("axis", [1, -2])
def test_dft(opset, kind, length, axis):
    """Signal axes of 6 and 7 samples, cut to 5 or padded to 8 (onnxruntime's radix-2 path) or 11
    (its naive path); inverse scales by 1 / dft_length; onesided keeps bins 0..n // 2. Opset 17
    takes the axis as an attribute, 20 as an input (given as an initializer)."""
    last, inverse, onesided = kind
    x = _r(2, 6, 7, last)
    consts = {} if length is None else {"n": _i64(length)}
    attrs = dict(inverse=inverse, onesided=onesided)
    if opset == 17:
        attrs["axis"] = axis
        names = ["x", "n" if length else ""]
    else:
        consts["axis"] = _i64(axis)
        names = ["x", "n" if length else "", "axis"]
    out = check("DFT", {"x": x}, consts, attrs, opset, names, grad=["x"])
    a = 1 if axis == 1 else 2
    n = length or x.shape[a]
    assert out.shape[a] == (n // 2 + 1 if onesided else n) and out.shape[-1] == 2


def test_dft_default_axis_and_rank_3():
    """Default axes: 1 for DFT-17, -2 (the last signal axis) for DFT-20; a rank-3 complex input."""
    x = _r(3, 6, 5, 2)
    check("DFT", {"x": x}, opset=17, grad=["x"])
    check("DFT", {"x": x}, opset=20, grad=["x"])
    out = check("DFT", {"x": x[0]}, attrs=dict(inverse=1), opset=20, grad=["x"])
    np.testing.assert_allclose(_complex(out), np.fft.ifft(_complex(x[0]), axis=1), rtol=1e-5, atol=1e-6)


def test_dft_runtime_length_and_axis():
    """dft_length and axis as graph inputs: read from the tensors on every call."""
    x = _r(2, 5, 6, 1)
    feeds = {"x": x, "n": _i64(8), "axis": _i64(1)}
    check("DFT", feeds, attrs=dict(onesided=1), opset=20, grad=["x"])


def test_dft_axis_0_and_double():
    x = _r(6, 3, 2, dtype=np.float64)
    check("DFT", {"x": x}, {"n": _i64(9)}, dict(axis=0), opset=17, rtol=1e-9, atol=1e-9, grad=["x"])


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("bins,length", [(6, None), (6, 10), (6, 11), (5, 9), (4, 15), (8, 15)])
def test_irfft(opset, bins, length):
    """onesided + inverse: ``bins`` one-sided bins -> ``dft_length`` real samples (default
    2 * (bins - 1)), the lengths where onnxruntime agrees with the spec, numpy and torch."""
    x = _r(2, bins, 3, 2)
    consts = {} if length is None else {"n": _i64(length)}
    names = ["x", "n" if length else ""] + (["axis"] if opset == 20 else [])
    attrs = dict(inverse=1, onesided=1)
    if opset == 20:
        consts["axis"] = _i64(1)
    else:
        attrs["axis"] = 1
    out = check("DFT", {"x": x}, consts, attrs, opset, names, grad=["x"])
    np.testing.assert_allclose(out[..., 0], np.fft.irfft(_complex(x), length, axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bins,length", [(6, 12), (6, 9), (6, 4), (3, 8)])
def test_irfft_other_lengths_reference(bins, length):
    """IRFFT with a dft_length that is not the default nor an odd one covered by the bins:
    missing bins are zero and extra ones dropped (spec, reference, numpy, torch); onnxruntime mirrors
    another set of bins there (it halves the last given bin, or folds the extra ones back), so the
    reference evaluator is the oracle."""
    x = _r(2, bins, 3, 2)
    out = check(
        "DFT", {"x": x}, {"n": _i64(length)}, dict(inverse=1, onesided=1), 17, rtol=1e-5, atol=1e-6,
        grad=["x"], reference=True,
    )  # fmt: skip
    np.testing.assert_allclose(out[..., 0], np.fft.irfft(_complex(x), length, axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [None, 7])
def test_dft_onesided_complex_input_reference(length):
    """A forward onesided DFT of a complex input: the first n // 2 + 1 bins of the full transform,
    as the reference computes them (onnxruntime refuses the case)."""
    x = _r(2, 6, 3, 2)
    consts = {} if length is None else {"n": _i64(length)}
    out = check("DFT", {"x": x}, consts, dict(onesided=1), 17, grad=["x"], reference=True)
    assert out.shape == (2, (length or 6) // 2 + 1, 3, 2)


def test_dft_bad_inputs():
    m = OnnxGraphModule(one_node_model("DFT", {"x": _r(2, 4, 2)}, {}, dict(axis=2), 17))
    with pytest.raises(ValueError, match="axis 2"):
        m(torch.zeros(2, 4, 2))
    m = OnnxGraphModule(one_node_model("DFT", {"x": _r(2, 4, 3)}, {}, {}, 17))
    with pytest.raises(ValueError, match="must end in 1"):
        m(torch.zeros(2, 4, 3))
    m = OnnxGraphModule(one_node_model("DFT", {"x": _r(2, 4, 1)}, {"n": _i64(0)}, {}, 17))
    with pytest.raises(ValueError, match="dft_length 0"):
        m(torch.zeros(2, 4, 1))


# ---- STFT ---------------------------------------------------------------------------------------
def _hann(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


@pytest.mark.parametrize("last", [1, 2])
@pytest.mark.parametrize("onesided", [0, 1])
@pytest.mark.parametrize("framing", ["window", "length", "both"])
@pytest.mark.parametrize("frame,step", [(8, 3), (7, 4)])
def test_stft(last, onesided, framing, frame, step):
    """frame_step, window and frame_length as initializers, as exporters write them; the frame
    length comes from the window, from frame_length or from both; onesided keeps frame // 2 + 1
    bins (for a complex signal too)."""
    x = _r(2, 23, last)
    consts = {"step": _i64(step)}
    names = ["x", "step", "", ""]
    if framing in ("window", "both"):
        consts["window"] = _hann(frame)
        names[2] = "window"
    if framing in ("length", "both"):
        consts["length"] = _i64(frame)
        names[3] = "length"
    out = check("STFT", {"x": x}, consts, dict(onesided=onesided), 17, names, grad=["x"])
    assert out.shape == (2, (23 - frame) // step + 1, frame // 2 + 1 if onesided else frame, 2)


def test_stft_gradient_reaches_window_and_runtime_scalars():
    """A window fed at run time receives gradient; frame_step and frame_length (int32) are read
    from the tensors on every call."""
    feeds = {
        "x": _r(3, 20, 1),
        "step": np.array(5, np.int32),
        "window": _r(6, low=0.2),
        "length": np.array(6, np.int32),
    }
    check("STFT", feeds, grad=["x", "window"])


def test_stft_rank_2_signal_and_double():
    """A [batch, length] signal is real, as onnxruntime reads it."""
    consts = {"step": _i64(2), "length": _i64(8)}
    names = ["x", "step", "", "length"]
    check("STFT", {"x": _r(2, 16)}, consts, {}, 17, names, grad=["x"])
    x = _r(1, 16, 2, dtype=np.float64)
    check("STFT", {"x": x}, consts, dict(onesided=0), 17, names, rtol=1e-9, atol=1e-9, grad=["x"])


def test_stft_frame_as_long_as_the_signal():
    out = check(
        "STFT", {"x": _r(2, 12, 1)}, {"step": _i64(4), "length": _i64(12)}, names=["x", "step", "", "length"]
    )
    assert out.shape == (2, 1, 7, 2)


def test_stft_default_frame_length_reference():
    """Neither window nor frame_length: one frame of the whole signal (the spec and the reference;
    onnxruntime fails on a negative output size)."""
    out = check("STFT", {"x": _r(2, 10, 1)}, {"step": _i64(3)}, grad=["x"], reference=True)
    assert out.shape == (2, 1, 6, 2)


def test_stft_bad_inputs():
    names = ["x", "step", "window", "length"]
    consts = {"step": _i64(2), "window": _hann(8), "length": _i64(6)}
    m = OnnxGraphModule(one_node_model("STFT", {"x": _r(1, 16, 1)}, consts, {}, 17, names))
    with pytest.raises(ValueError, match="window of 8 samples for frame_length 6"):
        m(torch.zeros(1, 16, 1))
    consts = {"step": _i64(2), "length": _i64(8)}
    m = OnnxGraphModule(
        one_node_model("STFT", {"x": _r(1, 6, 1)}, consts, {}, 17, ["x", "step", "", "length"])
    )
    with pytest.raises(ValueError, match="signal length 6"):
        m(torch.zeros(1, 6, 1))


# ---- MelWeightMatrix ----------------------------------------------------------------------------
MEL = [
    ("backend_case", 8, 16, 8192, 0.0, 4096.0),
    ("whisper", 80, 400, 16000, 0.0, 8000.0),
    ("speech", 40, 512, 16000, 20.0, 7600.0),
    ("narrow", 10, 64, 1000, 100.0, 400.0),
    ("more_mels_than_bins", 200, 256, 8000, 0.0, 4000.0),
]
OUT_TYPES = [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT8, TensorProto.UINT16]


def _mel_inputs(n_mels, dft, rate, low, high, int_type=np.int64) -> dict:
    return {
        "mels": np.array(n_mels, int_type),
        "dft": np.array(dft, int_type),
        "rate": np.array(rate, int_type),
        "low": np.array(low, np.float32),
        "high": np.array(high, np.float32),
    }


@pytest.mark.parametrize("name,n_mels,dft,rate,low,high", MEL, ids=[c[0] for c in MEL])
@pytest.mark.parametrize("out_type", OUT_TYPES)
def test_mel_weight_matrix(name, n_mels, dft, rate, low, high, out_type):
    """Bit for bit onnxruntime's matrix (integer types hold the integer quotients, 0 or 1)."""
    consts = _mel_inputs(n_mels, dft, rate, low, high)
    out = check("MelWeightMatrix", {}, consts, dict(output_datatype=out_type), rtol=0, atol=0)
    assert out.shape == (dft // 2 + 1, n_mels) and out.max() == 1


@pytest.mark.parametrize("out_type", [TensorProto.INT8, TensorProto.UINT8])
def test_mel_weight_matrix_wide_triangles_wrap(out_type):
    """Triangles over 255 bins wide: onnxruntime divides by the width cast to the output type
    (wrapping), so quotients other than 0 and 1 appear; the reference (which casts the float
    ratio) differs, onnxruntime is matched."""
    consts = _mel_inputs(2, 2048, 16000, 0.0, 8000.0)
    out = check("MelWeightMatrix", {}, consts, dict(output_datatype=out_type), rtol=0, atol=0)
    assert out.max() > 1
    ref = ReferenceEvaluator(
        one_node_model("MelWeightMatrix", {}, consts, dict(output_datatype=out_type), 17)
    )
    assert not np.array_equal(ref.run(None, {})[0], out)


def test_mel_weight_matrix_runtime_inputs():
    """All five inputs fed at run time (int32 counts): computed on the first call of each value set."""
    feeds = _mel_inputs(12, 100, 8000, 50.0, 3000.0, np.int32)
    check("MelWeightMatrix", feeds, rtol=0, atol=0)
    m = OnnxGraphModule(one_node_model("MelWeightMatrix", feeds, {}, {}, 17))
    other = _mel_inputs(6, 60, 4000, 0.0, 2000.0, np.int32)
    sess = ort.InferenceSession(one_node_model("MelWeightMatrix", other, {}, {}, 17).SerializeToString())
    np.testing.assert_array_equal(m(*other.values()).numpy(), sess.run(None, other)[0])


def test_mel_weight_matrix_refusals():
    """An upper edge past the last bin is refused, as in onnxruntime; an output type without a
    torch dtype at import."""
    m = OnnxGraphModule(one_node_model("MelWeightMatrix", {}, _mel_inputs(8, 16, 8000, 0.0, 4800.0), {}, 17))
    with pytest.raises(ValueError, match="upper_edge_hertz"):
        m()
    with pytest.raises(UnsupportedModelError, match="STRING"):
        OnnxGraphModule(
            one_node_model(
                "MelWeightMatrix", {}, _mel_inputs(8, 16, 8000, 0.0, 4000.0), dict(output_datatype=8), 17
            )
        )


# ---- DeformConv ---------------------------------------------------------------------------------
DEFORM = [
    ("plain", (2, 3, 6, 7), 4, (3, 3), {}),
    ("pads", (1, 2, 5, 5), 3, (2, 3), dict(pads=[1, 2, 0, 1])),
    ("strides_dilations", (2, 2, 9, 8), 2, (3, 2), dict(strides=[2, 3], dilations=[2, 1], pads=[1, 1, 1, 1])),
    ("group", (1, 4, 5, 6), 6, (3, 3), dict(group=2, pads=[1, 1, 1, 1])),
    ("offset_group", (2, 4, 5, 5), 2, (2, 2), dict(offset_group=2)),
    ("both_groups", (1, 6, 6, 5), 4, (3, 1), dict(group=2, offset_group=3, strides=[1, 2])),
    ("1x1", (1, 3, 4, 4), 2, (1, 1), {}),
]


def _deform_feeds(x_shape, oc, kernel, attrs, spread=2.0, mask=True):
    """X, offset (up to ``spread`` pixels: many samples fall partly or wholly outside) and mask."""
    nd = len(kernel)
    pads = attrs.get("pads", [0] * 2 * nd)
    strides = attrs.get("strides", [1] * nd)
    dils = attrs.get("dilations", [1] * nd)
    og = attrs.get("offset_group", 1)
    geo = zip(x_shape[2:], kernel, strides, dils, pads[:nd], pads[nd:])
    out = [(i + b + e - d * (k - 1) - 1) // s + 1 for i, k, s, d, b, e in geo]
    taps = int(np.prod(kernel))
    feeds = {"x": _r(*x_shape), "offset": _r(x_shape[0], og * taps * nd, *out, low=-spread, high=spread)}
    if mask:
        feeds["mask"] = _r(x_shape[0], og * taps, *out, low=0.0, high=1.0)
    w = _r(oc, x_shape[1] // attrs.get("group", 1), *kernel)
    return feeds, w, _r(oc)


@pytest.mark.parametrize("opset", [19, 22])
@pytest.mark.parametrize("name,x_shape,oc,kernel,attrs", DEFORM, ids=[c[0] for c in DEFORM])
def test_deform_conv(opset, name, x_shape, oc, kernel, attrs):
    """W and B as initializers, X, offset and mask fed (all receive gradient)."""
    feeds, w, b = _deform_feeds(x_shape, oc, kernel, attrs)
    names = ["x", "w", "offset", "b", "mask"]
    attrs = dict(attrs, kernel_shape=list(kernel))
    check("DeformConv", feeds, {"w": w, "b": b}, attrs, opset, names, grad=["x", "offset", "mask"])


def test_deform_conv_weight_and_bias_train_as_parameters():
    """DeformConv's W (input 1) and B (input 3) are a layer's weight and bias: the initializers
    become parameters, W compressible with Conv's channel axes, and receive gradient (``check``
    asserts it for every parameter)."""
    attrs = dict(group=2, pads=[1, 1, 1, 1])
    feeds, w, b = _deform_feeds((1, 4, 5, 6), 6, (3, 3), attrs)
    names = ["x", "w", "offset", "b", "mask"]
    m = OnnxGraphModule(one_node_model("DeformConv", feeds, {"w": w, "b": b}, attrs, 19, names))
    assert sorted(n for n, _ in m.named_onnx_parameters()) == ["b", "w"]
    assert [(x.name, x.out_axis, x.in_axis) for x in m.compressible_weights()] == [("w", 0, 1)]
    check("DeformConv", feeds, {"w": w, "b": b}, attrs, 19, names, grad=["x"])


def test_deform_conv_weight_and_bias_gradients():
    """W and B fed as inputs; no mask, no kernel_shape (taken from W)."""
    feeds, w, b = _deform_feeds((2, 2, 5, 6), 3, (3, 2), {}, mask=False)
    feeds = {"x": feeds["x"], "w": w, "offset": feeds["offset"], "b": b}
    check("DeformConv", feeds, opset=19, grad=["x", "w", "offset", "b"])


def test_deform_conv_without_bias_large_offsets_double():
    """Offsets up to 6 pixels (samples far outside read 0), float64 (W fed: a float64 initializer
    would train as a float32 parameter), no bias."""
    feeds, w, _ = _deform_feeds((1, 2, 5, 5), 2, (3, 3), {}, spread=6.0, mask=False)
    feeds = {k: v.astype(np.float64) for k, v in (("x", feeds["x"]), ("w", w), ("offset", feeds["offset"]))}
    check("DeformConv", feeds, opset=19, rtol=1e-10, atol=1e-12, grad=["x", "w", "offset"])


def test_deform_conv_integer_offsets_shift_the_taps():
    """Integer offsets read whole pixels: onnxruntime and the reference evaluator agree exactly."""
    attrs = dict(pads=[1, 0, 0, 1])
    feeds, w, b = _deform_feeds((1, 2, 5, 6), 3, (2, 2), attrs)
    feeds["offset"] = np.round(feeds["offset"])
    names = ["x", "w", "offset", "b", "mask"]
    ours = check("DeformConv", feeds, {"w": w, "b": b}, attrs, 19, names)
    ref = check("DeformConv", feeds, {"w": w, "b": b}, attrs, 19, names, reference=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_deform_conv_reference():
    """The reference evaluator agrees too, on a grouped case with mask and bias."""
    attrs = dict(group=2, offset_group=2, pads=[0, 1, 1, 0])
    feeds, w, b = _deform_feeds((1, 4, 5, 5), 2, (2, 3), attrs)
    names = ["x", "w", "offset", "b", "mask"]
    check("DeformConv", feeds, {"w": w, "b": b}, attrs, 22, names, grad=["x", "offset"], reference=True)


def test_deform_conv_1d_and_3d_match_2d():
    """onnxruntime (and the reference) take 2-D only: a 1-D DeformConv must equal onnxruntime's
    2-D one on a height-1 image with zero vertical offsets, and a 3-D one on a (D, 1, W) volume
    with a (kd, 1, kw) kernel and zero height offsets must equal the 2-D one on (D, W)."""
    x, w, b = _r(2, 3, 7), _r(4, 3, 3), _r(4)
    offset, mask = _r(2, 3, 3, low=-2, high=2), _r(2, 3, 3, low=0, high=1)
    attrs = dict(pads=[1, 0], strides=[2])
    names = ["x", "w", "offset", "b", "mask"]
    m1 = OnnxGraphModule(
        one_node_model(
            "DeformConv", {"x": x, "offset": offset, "mask": mask}, {"w": w, "b": b}, attrs, 19, names
        )
    )
    got = m1(torch.from_numpy(x), torch.from_numpy(offset), torch.from_numpy(mask)).detach().numpy()
    off2 = np.stack([np.zeros_like(offset), offset], axis=2).reshape(2, 6, 1, 3)
    feeds2 = {"x": x[:, :, None], "offset": off2, "mask": mask[:, :, None]}
    attrs2 = dict(pads=[0, 1, 0, 0], strides=[1, 2])
    want = expected_outputs(
        one_node_model("DeformConv", feeds2, {"w": w[:, :, None], "b": b}, attrs2, 19, names), feeds2
    )[0]
    np.testing.assert_allclose(got, want[:, :, 0], rtol=1e-5, atol=1e-5)

    x, w = _r(1, 2, 5, 6), _r(3, 2, 2, 3)
    offset, mask = _r(1, 12, 4, 4, low=-2, high=2), _r(1, 6, 4, 4, low=0, high=1)
    feeds2 = {"x": x, "offset": offset, "mask": mask}
    want = expected_outputs(
        one_node_model("DeformConv", feeds2, {"w": w, "b": b[:3]}, {}, 19, names), feeds2
    )[0]
    off = offset.reshape(1, 6, 2, 4, 4)
    off3 = np.stack([off[:, :, 0], np.zeros_like(off[:, :, 0]), off[:, :, 1]], axis=2).reshape(1, 18, 4, 1, 4)
    feeds3 = {"x": x[:, :, :, None], "offset": off3, "mask": mask[:, :, :, None]}
    m3 = OnnxGraphModule(
        one_node_model("DeformConv", feeds3, {"w": w[:, :, :, None], "b": b[:3]}, {}, 19, names)
    )
    got = m3(*[torch.from_numpy(v) for v in feeds3.values()]).detach().numpy()
    np.testing.assert_allclose(got[:, :, :, 0], want, rtol=1e-5, atol=1e-5)


def test_deform_conv_bad_shapes():
    feeds, w, _ = _deform_feeds((1, 2, 5, 5), 2, (3, 3), {}, mask=False)
    m = OnnxGraphModule(
        one_node_model("DeformConv", feeds, {"w": w}, dict(pads=[1, 1, 1, 1]), 19, ["x", "w", "offset"])
    )
    with pytest.raises(ValueError, match="offset"):
        m(*[torch.from_numpy(v) for v in feeds.values()])
    m = OnnxGraphModule(
        one_node_model("DeformConv", feeds, {"w": w}, dict(group=2), 19, ["x", "w", "offset"])
    )
    with pytest.raises(ValueError, match="group 2"):
        m(*[torch.from_numpy(v) for v in feeds.values()])
    m = OnnxGraphModule(
        one_node_model("DeformConv", feeds, {"w": w}, dict(kernel_shape=[2, 2]), 19, ["x", "w", "offset"])
    )
    with pytest.raises(ValueError, match=r"kernel \[2, 2\]"):
        m(*[torch.from_numpy(v) for v in feeds.values()])
