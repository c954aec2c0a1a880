"""Resize (opset 10; 11 and later, one factory reading the attributes added up to 19) and Upsample (7, 9).

Every variant is separable: each resized axis maps output index ``y`` to a source coordinate
``x(y)`` (the coordinate transformation mode) and takes a weighted sum of a few neighbours
(nearest / linear / cubic kernel, stretched by 1/scale for antialiasing). A :class:`_Plan` holds,
per resized axis, the neighbour indices and weights, computed once per input shape; the forward is
``index_select`` + weighted sum along each axis (differentiable, any rank, any dtype).

Where ``F.interpolate`` computes the same thing it is used instead (one fused kernel). That is
decided per input shape by *probing*: the candidate torch mode resizes ``arange(n)`` (nearest: must
pick the same indices) or an identity matrix (linear/cubic: must give the same weights) along each
axis, so a torch rounding quirk can never change the result.

Semantics follow onnxruntime, the project's oracle, where it and the ONNX reference implementation
disagree: source coordinates are computed in float32 in onnxruntime's order of operations (rounding
ties of nearest modes fall the same way); ``align_corners`` and ``tf_crop_and_resize`` divide by the
integer output length minus one (the reference uses the fractional ``scale * length``, so two node
tests expect other values); ``pytorch_half_pixel`` maps a length-1 output to 0, as the spec says;
an axis with scale exactly 1 is left untouched whatever its roi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import NodeContext, register

_CT_MODES = {
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
    "tf_half_pixel_for_nn",
}
_NEAREST_MODES = {"round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple"}
_MAX_PLANS = 32


@dataclass(frozen=True)
class _Spec:
    """The static attributes of one Resize/Upsample node."""

    mode: str = "nearest"  # nearest | linear | cubic
    ct_mode: str = "half_pixel"
    nearest_mode: str = "round_prefer_floor"  # "simple": opset < 11 (floor up, ceil down)
    cubic_a: float = -0.75
    exclude_outside: bool = False
    extrapolation: float = 0.0
    antialias: bool = False
    axes: tuple[int, ...] | None = None
    policy: str = "stretch"  # keep_aspect_ratio_policy


def _source_coords(spec: _Spec, n_in: int, n_out: int, scale: float, roi: tuple[float, float]):
    """Source coordinate of every output index along one axis.

    Evaluated in float32 in onnxruntime's order of operations, so that rounding ties (nearest mode)
    and range checks (tf_crop_and_resize) fall the same way as there.
    """
    f = np.float32
    y = np.arange(n_out, dtype=f)
    s, n, length, half = f(scale), f(n_in), f(n_out), f(0.5)
    m = spec.ct_mode
    if m == "half_pixel":
        return (y + half) / s - half
    if m == "pytorch_half_pixel":
        return (y + half) / s - half if n_out > 1 else np.zeros(n_out, f)
    if m == "half_pixel_symmetric":
        offset = n / f(2) * (f(1) - length / (s * n))
        return (float(offset) + (y.astype(np.float64) + 0.5) / float(s) - 0.5).astype(f)
    if m == "align_corners":
        return y * (n - f(1)) / (length - f(1)) if n_out > 1 else np.zeros(n_out, f)
    if m == "asymmetric":
        return y / s
    if m == "tf_half_pixel_for_nn":
        return (y + half) / s
    start, end = f(roi[0]), f(roi[1])  # tf_crop_and_resize
    if n_out > 1:
        return start * (n - f(1)) + y * (end - start) * (n - f(1)) / (length - f(1))
    return np.full(n_out, 0.5 * (float(start) + float(end)) * (n_in - 1), f)


def _nearest_index(spec: _Spec, x: np.ndarray, scale: float) -> np.ndarray:
    mode = spec.nearest_mode
    if mode == "simple":  # onnxruntime's rule before nearest_mode existed
        mode = "ceil" if scale < 1 else "floor"
    if mode == "round_prefer_floor":
        return np.ceil(x - 0.5)
    if mode == "round_prefer_ceil":
        return np.floor(x + 0.5)
    return np.floor(x) if mode == "floor" else np.ceil(x)


def _kernel(spec: _Spec, d: np.ndarray) -> np.ndarray:
    d = np.abs(d)
    if spec.mode == "linear":
        return np.clip(1 - d, 0, None)
    a = spec.cubic_a
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _axis_weights(spec: _Spec, n_in: int, n_out: int, scale: float, roi: tuple[float, float]):
    """(indices [n_out, k] int64, weights [n_out, k] float64 | None, extrapolated [n_out] | None)."""
    x = _source_coords(spec, n_in, n_out, scale, roi).astype(np.float64)
    outside = None
    if spec.ct_mode == "tf_crop_and_resize":
        outside = (x < 0) | (x > n_in - 1)
        outside = outside if outside.any() else None
    if spec.mode == "nearest":
        idx = np.clip(_nearest_index(spec, x, scale), 0, n_in - 1).astype(np.int64)
        return idx[:, None], None, outside
    # Neighbours base + i for i in [i0, 2 - i0), base = ceil(x) - 1 so that r = x - base is in (0, 1]
    # (the reference's convention; it only decides which zero-weight neighbour is listed).
    support = 1.0 if spec.mode == "linear" else 2.0
    stretch = min(scale, 1.0) if spec.antialias else 1.0
    i0 = math.floor(-support / stretch) + 1
    offsets = np.arange(i0, 2 - i0)
    base = np.ceil(x) - 1
    w = _kernel(spec, stretch * (offsets[None, :] - (x - base)[:, None]))
    if spec.antialias:
        w = w / w.sum(axis=1, keepdims=True)
    idx = base[:, None].astype(np.int64) + offsets[None, :]
    if spec.exclude_outside:
        w = np.where((idx < 0) | (idx >= n_in), 0.0, w)
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    return np.clip(idx, 0, n_in - 1), w, outside


def _dense(idx: np.ndarray, w: np.ndarray | None, n_in: int) -> np.ndarray:
    """The [n_out, n_in] matrix of one axis's resampling weights."""
    dense = np.zeros((idx.shape[0], n_in))
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    np.add.at(dense, (rows, idx.reshape(-1)), 1.0 if w is None else w.reshape(-1))
    return dense


def _candidates(spec: _Spec, rank: int) -> list[dict]:
    """``F.interpolate`` keyword sets that may compute this resize (verified by probing)."""
    if spec.ct_mode == "tf_crop_and_resize" or not 3 <= rank <= 5:
        return []
    if spec.mode == "nearest":
        return [{"mode": "nearest"}, {"mode": "nearest-exact"}]
    if spec.mode == "linear":
        name = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
    elif rank == 4 and spec.cubic_a == -0.75 and not spec.exclude_outside:
        name = "bicubic"
    else:
        return []
    if spec.antialias and rank != 4:
        return []
    aa = {"antialias": True} if spec.antialias else {}
    return [{"mode": name, "align_corners": ac, **aa} for ac in (False, True)]


class _Plan:
    """How to resize inputs of one shape: per-axis gathers, or one ``F.interpolate`` call."""

    def __init__(self, spec, shape, out, scales, use_scales, rois, device, dtype):
        self.out = out
        # onnxruntime leaves an axis with scale exactly 1 untouched, whatever its roi
        self.axes = [a for a in range(len(shape)) if not (shape[a] == out[a] and scales[a] == 1.0)]
        self.interp = None
        work = dtype if dtype.is_floating_point else torch.float32
        per_axis = {a: _axis_weights(spec, shape[a], out[a], scales[a], rois[a]) for a in self.axes}
        if dtype.is_floating_point and self.axes and min(self.axes) >= 2 and 0 not in out:
            spatial = range(2, len(shape))
            probe_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # torch's opmath
            size = {"scale_factor": [scales[a] for a in spatial]} if use_scales else {"size": out[2:]}
            for kw in _candidates(spec, len(shape)):
                if all(
                    self._probe(kw, use_scales, shape[a], out[a], scales[a], per_axis.get(a), probe_dtype)
                    for a in spatial
                ):
                    self.interp = {**kw, **size}
                    break
        self.gathers = []
        for a in self.axes if self.interp is None else ():
            idx, w, outside = per_axis[a]
            view = [1] * len(shape)
            view[a] = out[a]
            if w is not None:
                w = torch.tensor(w, dtype=work, device=device).reshape(
                    view[: a + 1] + [w.shape[1]] + view[a + 1 :]
                )
            if outside is not None:
                outside = torch.tensor(outside, device=device).reshape(view)
            self.gathers.append((a, torch.tensor(idx.reshape(-1), device=device), idx.shape[1], w, outside))
        self.integer = not dtype.is_floating_point and any(w is not None for *_, w, _ in self.gathers)

    @staticmethod
    def _probe(kw, use_scales, n_in, n_out, scale, weights, dtype) -> bool:
        """Does ``F.interpolate(**kw)`` resample one axis exactly like the plan? (on CPU)

        Nearest modes resize ``arange(n_in)`` and must pick the same indices; the others resize an
        identity matrix (one probe per input position) and must give the same weights.
        """
        nearest = kw["mode"].startswith("nearest")
        rank = {"linear": 3, "trilinear": 5}.get(kw["mode"], 4)
        if nearest:
            probe = torch.arange(n_in, dtype=dtype).reshape(1, 1, *[1] * (rank - 3), n_in)
        elif n_in <= 2048:
            probe = torch.eye(n_in, dtype=dtype).reshape(n_in, 1, *[1] * (rank - 3), n_in)
        else:
            return False
        if use_scales:
            got = F.interpolate(probe, scale_factor=[1.0] * (rank - 3) + [scale], **kw)
        else:
            got = F.interpolate(probe, size=[1] * (rank - 3) + [n_out], **kw)
        got = got.reshape(probe.shape[0], -1).T.double().numpy()
        if got.shape[0] != n_out:
            return False
        if nearest:
            want = np.arange(n_in) if weights is None else weights[0][:, 0]
            return np.array_equal(got[:, 0], want)
        want = np.eye(n_in) if weights is None else _dense(weights[0], weights[1], n_in)
        return np.allclose(got, want, atol=1e-5)

    def __call__(self, x: torch.Tensor, extrapolation: float) -> torch.Tensor:
        if self.interp is not None:
            return F.interpolate(x, **self.interp)
        dtype = x.dtype
        if self.integer:
            x = x.float()
        for a, idx, k, w, mask in self.gathers:
            x = x.index_select(a, idx)
            if w is not None:
                x = (x.unflatten(a, (w.shape[a], k)) * w).sum(a + 1)
            if mask is not None:
                x = torch.where(mask, torch.tensor(extrapolation, dtype=x.dtype, device=x.device), x)
        if self.integer:
            info = torch.iinfo(dtype)
            x = x.round().clamp(info.min, info.max).to(dtype)
        return x


def _values(v) -> tuple | None:
    """A constant or runtime 1-D input as a tuple of python numbers (None when absent or empty)."""
    if v is None:
        return None
    vals = v.reshape(-1).tolist() if isinstance(v, torch.Tensor) else np.asarray(v).reshape(-1).tolist()
    return tuple(vals) if vals else None


class _Resize:
    """The callable of one node: ``(x, roi, scales, sizes) -> y``; plans cached per input shape."""

    def __init__(self, spec: _Spec, consts: dict[int, tuple | None] | None = None):
        self.spec = spec
        self.consts = consts or {}
        self.plans: dict[tuple, _Plan] = {}

    def __call__(self, x, roi=None, scales=None, sizes=None):
        roi, scales, sizes = (
            self.consts[i] if i in self.consts else _values(v) for i, v in enumerate((roi, scales, sizes), 1)
        )
        key = (tuple(x.shape), roi, scales, sizes, x.dtype, x.device)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= _MAX_PLANS:
                self.plans.clear()
            plan = self.plans[key] = self._plan(x, roi, scales, sizes)
        return plan(x, self.spec.extrapolation)

    def _plan(self, x, roi, scales, sizes) -> _Plan:
        spec, shape = self.spec, list(x.shape)
        r = len(shape)
        axes = [a % r for a in spec.axes] if spec.axes is not None else list(range(r))
        out, factors = list(shape), [1.0] * r
        if sizes is not None:
            if len(sizes) != len(axes):
                raise ValueError(f"Resize: {len(sizes)} sizes for {len(axes)} axes")
            ratios = [
                float(np.float32(s) / np.float32(shape[a])) if shape[a] else 1.0 for s, a in zip(sizes, axes)
            ]
            if spec.policy != "stretch":
                common = min(ratios) if spec.policy == "not_larger" else max(ratios)
                ratios = [common] * len(axes)
                sizes = [math.floor(float(np.float32(common) * np.float32(shape[a])) + 0.5) for a in axes]
            for a, s, f in zip(axes, sizes, ratios):
                out[a], factors[a] = int(s), f
        elif scales is not None:
            if len(scales) != len(axes):
                raise ValueError(f"Resize: {len(scales)} scales for {len(axes)} axes")
            for a, f in zip(axes, scales):
                out[a], factors[a] = int(np.float32(f) * np.float32(shape[a])), float(np.float32(f))
        else:
            raise ValueError("Resize needs scales or sizes")
        rois = [(0.0, 1.0)] * r
        if roi is not None and spec.ct_mode == "tf_crop_and_resize":
            n = len(axes)
            if len(roi) != 2 * n:
                raise ValueError(f"Resize: roi has {len(roi)} values for {n} axes")
            for i, a in enumerate(axes):
                rois[a] = (float(roi[i]), float(roi[n + i]))
        return _Plan(spec, shape, out, factors, sizes is None, rois, x.device, x.dtype)


def _check(spec: _Spec) -> _Spec:
    if spec.mode not in ("nearest", "linear", "cubic"):
        raise NotImplementedError(f"mode {spec.mode!r}")
    if spec.ct_mode not in _CT_MODES:
        raise NotImplementedError(f"coordinate_transformation_mode {spec.ct_mode!r}")
    if spec.nearest_mode not in _NEAREST_MODES:
        raise NotImplementedError(f"nearest_mode {spec.nearest_mode!r}")
    if spec.policy not in ("stretch", "not_larger", "not_smaller"):
        raise NotImplementedError(f"keep_aspect_ratio_policy {spec.policy!r}")
    if spec.antialias and spec.mode == "nearest":
        raise NotImplementedError("antialias with mode 'nearest'")
    return spec


def _legacy_mode(node: NodeContext) -> str:
    mode = node.attr("mode", "nearest").lower()
    return "linear" if mode == "bilinear" else mode


def _legacy_spec(node: NodeContext) -> _Spec:
    """Upsample and Resize-10: asymmetric coordinates, onnxruntime's original nearest rounding."""
    return _check(_Spec(mode=_legacy_mode(node), ct_mode="asymmetric", nearest_mode="simple"))


@register("Resize", since=10)
@register("Upsample", since=9)
def resize_10(node: NodeContext):
    """Inputs (X, scales)."""
    resize = _Resize(_legacy_spec(node), {2: _values(node.const(1))} if node.const(1) is not None else None)
    return lambda x, scales: resize(x, None, scales)


@register("Upsample", since=7)
def upsample_7(node: NodeContext):
    """``scales`` is an attribute."""
    resize = _Resize(_legacy_spec(node), {2: tuple(node.attr("scales"))})
    return lambda x: resize(x)


@register("Resize", since=11)
def resize_11(node: NodeContext):
    """Inputs (X, roi, scales, sizes); from opset 18 also ``axes``, ``antialias``, aspect policy."""
    axes = node.attr("axes")
    spec = _Spec(
        mode=node.attr("mode", "nearest"),
        ct_mode=node.attr("coordinate_transformation_mode", "half_pixel"),
        nearest_mode=node.attr("nearest_mode", "round_prefer_floor"),
        cubic_a=node.attr("cubic_coeff_a", -0.75),
        exclude_outside=bool(node.attr("exclude_outside", 0)),
        extrapolation=node.attr("extrapolation_value", 0.0),
        antialias=bool(node.attr("antialias", 0)),
        axes=tuple(axes) if axes is not None else None,
        policy=node.attr("keep_aspect_ratio_policy", "stretch"),
    )
    consts = {i: _values(node.const(i)) for i in (1, 2, 3) if node.const(i) is not None}
    resize = _Resize(_check(spec), consts)
    return lambda x, roi=None, scales=None, sizes=None: resize(x, roi, scales, sizes)
