"""Sampling ops (GridSample, AffineGrid, Col2Im, MaxUnpool, CumProd, RoiAlign, CenterCropPad, windows).

Each test builds a one-node model, runs it in onnxruntime (or, where onnxruntime refuses the case,
in ``onnx.reference.ReferenceEvaluator``) and in ``OnnxGraphModule``, and compares shape, dtype and
values; for differentiable ops it also checks that gradients reach the float inputs and are finite.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import DRAWS, check_op, expect_unsupported, one_node_model
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxadmm.importer.graph import OnnxGraphModule

_r = DRAWS.uniform


def _i64(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def check(op, feeds, consts=None, attrs=None, opset=20, rtol=1e-5, atol=1e-5, grad=None, reference=False):
    """:func:`builders.check_op` of a one-output node (opset 20 by default); its output."""
    return check_op(op, feeds, consts, attrs, opset=opset, rtol=rtol, atol=atol, grad=grad, reference=reference)[0]


_unsupported = expect_unsupported


# ---- GridSample ---------------------------------------------------------------------------------
MODES_16 = {"linear": "bilinear", "nearest": "nearest", "cubic": "bicubic"}


@pytest.mark.parametrize("opset", [16, 20])
@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_2d(opset, mode, padding, align):
    """Grid points up to 1.5 past the borders (padding and reflection are exercised)."""
    x, grid = _r(2, 3, 5, 6), _r(2, 4, 7, 2, low=-1.5, high=1.5)
    attrs = dict(mode=MODES_16[mode] if opset == 16 else mode, padding_mode=padding, align_corners=align)
    grad = ["x"] if mode == "nearest" else ["x", "grid"]  # nearest is piecewise constant in the grid
    check("GridSample", {"x": x, "grid": grid}, attrs=attrs, opset=opset, grad=grad)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_nearest_ties(padding, align):
    """Every grid point is a pixel centre or exactly half way between two (round half to even,
    then pad the integer index: torch's own nearest would reflect first and move some ties)."""
    x = _r(1, 2, 4, 5)
    g = np.arange(-2.0, 2.01, 0.125, dtype=np.float32)
    gx, gy = np.meshgrid(g, g[::2])
    grid = np.stack([gx, gy], -1)[None].astype(np.float32)
    attrs = dict(mode="nearest", padding_mode=padding, align_corners=align)
    check("GridSample", {"x": x, "grid": grid}, attrs=attrs, opset=20, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_3d(mode, padding, align):
    x, grid = _r(2, 2, 3, 4, 5), _r(2, 3, 2, 4, 3, low=-1.4, high=1.4)
    attrs = dict(mode=mode, padding_mode=padding, align_corners=align)
    grad = ["x"] if mode == "nearest" else ["x", "grid"]
    check("GridSample", {"x": x, "grid": grid}, attrs=attrs, opset=20, grad=grad)


def test_grid_sample_double():
    x, grid = _r(1, 2, 4, 4, dtype=np.float64), _r(1, 3, 3, 2, low=-1.2, high=1.2, dtype=np.float64)
    check("GridSample", {"x": x, "grid": grid}, attrs=dict(mode="cubic"), opset=22, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_1d_reference(mode, padding, align):
    """One spatial dim: onnxruntime accepts only 4-D and 5-D inputs, so the reference evaluator
    is the oracle (its nearest rounds half to even too). The reference clamps or reflects a cubic
    sample point before taking its taps, onnxruntime only pads the taps (as here): they agree for
    points inside the borders, so cubic with border / reflection padding stays inside."""
    lim = 1.0 if mode == "cubic" and padding != "zeros" else 1.6
    x, grid = _r(2, 3, 6), _r(2, 9, 1, low=-lim, high=lim)
    attrs = dict(mode=mode, padding_mode=padding, align_corners=align)
    grad = ["x"] if mode == "nearest" else ["x", "grid"]
    check("GridSample", {"x": x, "grid": grid}, attrs=attrs, opset=20, grad=grad, reference=True)


def test_grid_sample_refusals():
    feeds = {"x": _r(1, 1, 3, 3), "grid": _r(1, 2, 2, 2)}
    _unsupported("GridSample", feeds, {}, dict(mode="linear"), 16, "bilinear, nearest, bicubic")
    _unsupported("GridSample", feeds, {}, dict(mode="bicubic"), 20, "linear, nearest, cubic")
    _unsupported("GridSample", feeds, {}, dict(padding_mode="wrap"), 20, "padding_mode 'wrap'")
    m = OnnxGraphModule(
        one_node_model(
            "GridSample", {"x": _r(1, 1, 2, 2, 2), "grid": _r(1, 1, 1, 1, 3)}, {}, {"mode": "cubic"}, 20
        )
    )
    with pytest.raises(NotImplementedError, match="cubic"):
        m(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 1, 1, 3))


# ---- AffineGrid ---------------------------------------------------------------------------------
@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("size", [(2, 3, 4, 5), (2, 1, 1, 3), (2, 3, 2, 3, 4), (2, 1, 3, 1, 2)])
def test_affine_grid(align, size):
    """Length-1 axes included (onnxruntime puts them at +1 with align_corners)."""
    nd = len(size) - 2
    theta = _r(2, nd, nd + 1)
    check("AffineGrid", {"theta": theta}, {"size": _i64(*size)}, dict(align_corners=align), grad=["theta"])


def test_affine_grid_runtime_size_then_grid_sample_shape():
    theta, size = _r(3, 2, 3), _i64(3, 2, 6, 4)
    out = check("AffineGrid", {"theta": theta, "size": size}, grad=["theta"])
    assert out.shape == (3, 6, 4, 2)


# ---- Col2Im -------------------------------------------------------------------------------------
COL2IM_2D = [
    ("plain", (5, 5), (2, 2), {}),
    ("strides", (5, 6), (2, 3), dict(strides=[2, 3])),
    ("sym_pads", (4, 5), (3, 3), dict(pads=[1, 1, 1, 1])),
    ("asym_pads", (4, 5), (3, 2), dict(pads=[0, 1, 2, 1])),
    ("dilations", (6, 7), (2, 3), dict(dilations=[2, 3])),
    ("all", (7, 6), (3, 2), dict(dilations=[2, 1], pads=[1, 2, 0, 1], strides=[2, 2])),
]


def _blocks(image, block, attrs) -> int:
    nd = len(image)
    dil = attrs.get("dilations", [1] * nd)
    pads = attrs.get("pads", [0] * 2 * nd)
    strides = attrs.get("strides", [1] * nd)
    n = 1
    for i, (s, k) in enumerate(zip(image, block)):
        n *= (s + pads[i] + pads[nd + i] - dil[i] * (k - 1) - 1) // strides[i] + 1
    return n


@pytest.mark.parametrize("name,image,block,attrs", COL2IM_2D, ids=[c[0] for c in COL2IM_2D])
def test_col2im_2d(name, image, block, attrs):
    x = _r(2, 3 * int(np.prod(block)), _blocks(image, block, attrs))
    consts = {"image_shape": _i64(*image), "block_shape": _i64(*block)}
    check("Col2Im", {"x": x}, consts, attrs, opset=18, grad=["x"])


def test_col2im_runtime_shapes():
    image, block = (5, 4), (2, 3)
    x = _r(1, 2 * 6, _blocks(image, block, {}))
    feeds = {"x": x, "image_shape": _i64(*image), "block_shape": _i64(*block)}
    check("Col2Im", feeds, opset=18, grad=["x"])


COL2IM_ND = [
    ("3d", (4, 5, 4), (2, 3, 2), dict(strides=[2, 1, 2], pads=[1, 0, 0, 0, 1, 1])),
    ("1d", (9,), (3,), dict(strides=[2], pads=[1, 2])),
    ("4d", (4, 3, 3, 2), (2, 2, 2, 2), dict(strides=[2, 1, 1, 1])),
]


@pytest.mark.parametrize("name,image,block,attrs", COL2IM_ND, ids=[c[0] for c in COL2IM_ND])
def test_col2im_nd(name, image, block, attrs):
    x = _r(2, 2 * int(np.prod(block)), _blocks(image, block, attrs))
    consts = {"image_shape": _i64(*image), "block_shape": _i64(*block)}
    check("Col2Im", {"x": x}, consts, attrs, opset=18, grad=["x"])


@pytest.mark.parametrize(
    "image,block,attrs",
    [
        ((4, 5, 4), (2, 3, 2), dict(strides=[2, 1, 2], pads=[1, 0, 0, 0, 1, 1], dilations=[1, 1, 2])),
        ((9,), (3,), dict(dilations=[2])),
    ],
    ids=["3d", "1d"],
)
def test_col2im_nd_dilations_reference(image, block, attrs):
    """Dilations on a rank other than 2: onnxruntime's N-D kernel misplaces dilated taps (it
    disagrees with the reference, with its own 2-D kernel and with ``F.fold``), so the reference
    evaluator is the oracle."""
    x = _r(1, 2 * int(np.prod(block)), _blocks(image, block, attrs))
    consts = {"image_shape": _i64(*image), "block_shape": _i64(*block)}
    check("Col2Im", {"x": x}, consts, attrs, opset=18, grad=["x"], reference=True)


# ---- MaxUnpool ----------------------------------------------------------------------------------
def _max_pool(x, attrs):
    """(Y, Indices) of onnxruntime's MaxPool."""
    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_value_info("y", onnx.TypeProto()), helper.make_value_info("i", onnx.TypeProto())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


UNPOOL = [
    ("k2s2", (2, 3, 6, 8), dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("overlap", (1, 2, 5, 6), dict(kernel_shape=[3, 3], strides=[1, 2])),  # repeated indices
    ("pads", (2, 2, 6, 5), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1])),
    ("1d", (2, 3, 9), dict(kernel_shape=[3], strides=[3])),
    ("3d", (1, 2, 4, 4, 6), dict(kernel_shape=[2, 2, 3], strides=[2, 2, 3])),
]


@pytest.mark.parametrize("opset", [9, 11])
@pytest.mark.parametrize("name,shape,attrs", UNPOOL, ids=[c[0] for c in UNPOOL])
def test_max_unpool(opset, name, shape, attrs):
    """Unpool MaxPool's outputs; where the inferred shape is smaller than the pooled input
    (overlapping windows, pads) ``output_shape`` gives the input's shape, as exporters do."""
    y, idx = _max_pool(_r(*shape), attrs)
    nd = len(shape) - 2
    pads = attrs.get("pads", [0] * 2 * nd)
    geo = zip(y.shape[2:], attrs["strides"], attrs["kernel_shape"], pads[:nd], pads[nd:])
    inferred = [(o - 1) * s + k - b - e for o, s, k, b, e in geo]
    consts = {} if tuple(inferred) == shape[2:] else {"output_shape": _i64(*shape)}
    out = check("MaxUnpool", {"x": y, "i": idx}, consts, attrs, opset=opset, rtol=0, atol=0, grad=["x"])
    assert out.shape == shape and np.count_nonzero(out) == len(np.unique(idx))


@pytest.mark.parametrize("runtime", [False, True])
def test_max_unpool_output_shape(runtime):
    """An odd input size that pooling drops: indices are flat over the given output_shape
    (onnxruntime; the reference lays them out in the inferred 6x6 and pads, which differs)."""
    attrs = dict(kernel_shape=[2, 2], strides=[2, 2])
    y, idx = _max_pool(_r(2, 2, 7, 7), attrs)
    shape = _i64(2, 2, 7, 7)
    feeds, consts = ({"x": y, "i": idx, "s": shape}, {}) if runtime else ({"x": y, "i": idx}, {"s": shape})
    out = check("MaxUnpool", feeds, consts, attrs, opset=11, rtol=0, atol=0, grad=["x"])
    assert out.shape == (2, 2, 7, 7)


def test_max_unpool_node_case_with_output_shape_follows_onnxruntime():
    """The data of onnx's ``test_maxunpool_export_with_output_shape``: its expected output (from
    the reference) lays the indices out in the inferred 4x4 and pads; onnxruntime, and we, index
    the given 5x5 directly, so that node case is expected to fail."""
    x = np.array([[[[5.0, 6.0], [7.0, 8.0]]]], dtype=np.float32)
    idx = np.array([[[[5, 7], [13, 15]]]], dtype=np.int64)
    attrs = dict(kernel_shape=[2, 2], strides=[2, 2])
    out = check("MaxUnpool", {"x": x, "i": idx}, {"s": _i64(1, 1, 5, 5)}, attrs, opset=11, rtol=0, atol=0)
    assert out.reshape(-1)[[5, 7, 13, 15]].tolist() == [5.0, 6.0, 7.0, 8.0]
    ref = ReferenceEvaluator(
        one_node_model("MaxUnpool", {"x": x, "i": idx}, {"s": _i64(1, 1, 5, 5)}, attrs, 11)
    )
    assert not np.array_equal(ref.run(None, {"x": x, "i": idx})[0], out)


def test_max_unpool_repeated_index_last_wins():
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=np.float32)
    idx = np.array([[[[5, 5], [0, 5]]]], dtype=np.int64)
    out = check(
        "MaxUnpool", {"x": x, "i": idx}, attrs=dict(kernel_shape=[2, 2], strides=[2, 2]), opset=11, grad=["x"]
    )
    assert out[0, 0, 1, 1] == 4.0


# ---- CumProd ------------------------------------------------------------------------------------
@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cumprod(exclusive, reverse, axis):
    x = _r(3, 4, 5, low=0.5, high=1.5)
    x[1, 2, 3] = 0.0  # a zero: products after it vanish, gradients must stay finite
    attrs = dict(exclusive=exclusive, reverse=reverse)
    check("CumProd", {"x": x}, {"axis": np.array(axis, np.int64)}, attrs, opset=26, grad=["x"])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float64])
def test_cumprod_dtypes_and_runtime_axis(dtype):
    x = DRAWS.rng.integers(-3, 4, (4, 5)).astype(dtype)
    check(
        "CumProd", {"x": x, "axis": np.array(1, np.int32)}, attrs=dict(exclusive=1), opset=26, rtol=0, atol=0
    )


# ---- RoiAlign -----------------------------------------------------------------------------------
ROIS = np.array(
    [
        [0.5, 1.0, 6.5, 5.0],
        [2.3, 0.2, 3.1, 7.9],  # thin
        [-2.0, -1.5, 4.0, 3.0],  # partly outside
        [5.0, 4.0, 9.5, 12.0],  # past the far borders
        [3.0, 3.0, 2.0, 2.0],  # malformed (x2 < x1)
        [1.0, 2.0, 1.0, 2.0],  # empty
    ],
    dtype=np.float32,
)
BATCH = _i64(0, 1, 0, 1, 1, 0)


@pytest.mark.parametrize("opset,ct", [(10, None), (16, "half_pixel"), (16, "output_half_pixel"), (16, None)])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ratio", [0, 2])
def test_roi_align(opset, ct, mode, ratio):
    """Max mode follows onnxruntime's quirk (max of the weighted corner terms)."""
    x = _r(2, 3, 8, 7)
    attrs = dict(mode=mode, output_height=3, output_width=2, sampling_ratio=ratio, spatial_scale=0.75)
    if ct:
        attrs["coordinate_transformation_mode"] = ct
    check("RoiAlign", {"x": x, "rois": ROIS}, {"batch": BATCH}, attrs, opset=opset, grad=["x"])


def test_roi_align_double_and_default_attrs():
    x = _r(1, 2, 6, 6, dtype=np.float64)
    rois = np.array([[0.0, 0.0, 5.0, 5.0], [1.2, 2.3, 4.4, 3.1]], dtype=np.float64)
    check(
        "RoiAlign",
        {"x": x, "rois": rois},
        {"batch": _i64(0, 0)},
        opset=16,
        rtol=1e-10,
        atol=1e-12,
        grad=["x", "rois"],
    )


def test_roi_align_refusals():
    feeds = {"x": _r(1, 1, 4, 4), "rois": ROIS[:1]}
    _unsupported("RoiAlign", feeds, {"b": _i64(0)}, dict(mode="sum"), 16, "mode 'sum'")
    _unsupported("RoiAlign", feeds, {"b": _i64(0)}, dict(coordinate_transformation_mode="x"), 16, "'x'")


# ---- CenterCropPad ------------------------------------------------------------------------------
CROP_PAD = [
    ("crop", (6, 7, 3), (3, 4, 3), None),
    ("pad", (3, 4, 2), (6, 7, 2), None),
    ("mixed", (5, 4, 3), (2, 7, 3), None),
    ("axes", (2, 5, 6), (4, 3), [1, 2]),
    ("negative_axes", (5, 6, 3), (2, 9), [-3, -2]),
]


@pytest.mark.parametrize("name,shape,target,axes", CROP_PAD, ids=[c[0] for c in CROP_PAD])
def test_center_crop_pad(name, shape, target, axes):
    attrs = {"axes": axes} if axes else {}
    check(
        "CenterCropPad",
        {"x": _r(*shape)},
        {"shape": _i64(*target)},
        attrs,
        opset=18,
        rtol=0,
        atol=0,
        grad=["x"],
    )


def test_center_crop_pad_int_runtime_shape():
    x = DRAWS.rng.integers(-9, 9, (5, 4)).astype(np.int32)
    check("CenterCropPad", {"x": x, "shape": _i64(2, 7)}, opset=18, rtol=0, atol=0)


# ---- windows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["HannWindow", "HammingWindow", "BlackmanWindow"])
@pytest.mark.parametrize("periodic", [0, 1])
@pytest.mark.parametrize("size", [1, 2, 7, 16])
def test_windows(op, periodic, size):
    """Size 1 symmetric divides by zero: NaN, as in onnxruntime."""
    consts = {"size": np.array(size, np.int64)}
    out = check(op, {}, consts, dict(periodic=periodic), opset=17, rtol=0, atol=0)
    assert out.dtype == np.float32 and out.shape == (size,)


@pytest.mark.parametrize("op", ["HannWindow", "HammingWindow", "BlackmanWindow"])
@pytest.mark.parametrize("dtype", [TensorProto.DOUBLE, TensorProto.INT64, TensorProto.UINT8])
def test_windows_output_datatype_runtime_size(op, dtype):
    attrs = dict(output_datatype=dtype, periodic=0)
    for size in (5, 9):
        check(op, {"size": np.array(size, np.int32)}, attrs=attrs, opset=17, rtol=0, atol=0)
