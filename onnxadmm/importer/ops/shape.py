"""Shape, indexing and data-movement operators (Reshape, Slice, Gather, Pad, ...)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import torch.nn.functional as F

from ..registry import NodeContext, register, torch_dtype

# ---- helpers ---------------------------------------------------------------------------------


def _np_to_torch(a, node: NodeContext | None = None) -> torch.Tensor:
    """A numpy array (any ONNX dtype, bfloat16 included) as a torch tensor."""
    a = np.asarray(a)
    if a.dtype.kind in "OSU":
        raise NotImplementedError("string tensors are not supported")
    if a.dtype.name == "bfloat16":
        t = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    elif a.dtype.kind == "V" or a.dtype.name.startswith("float8") or a.dtype.name.startswith("float4"):
        raise NotImplementedError(f"tensor dtype {a.dtype}")
    else:
        t = torch.from_numpy(np.array(a, copy=True))
    if node is not None and t.dtype == torch.float16 and node.graph.compute_float16_as_float32:
        t = t.float()
    return t


def _ints(v) -> list[int]:
    """Tensor / numpy / list / scalar -> list of python ints."""
    if isinstance(v, torch.Tensor):
        return [int(i) for i in v.reshape(-1).tolist()]
    return [int(i) for i in np.asarray(v).reshape(-1).tolist()]


def _static_ints(node: NodeContext, i: int) -> list[int] | None:
    c = node.const(i)
    return None if c is None else _ints(c)


def _scalar(v):
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)[0].item()
    return np.asarray(v).reshape(-1)[0].item()


def _norm_axes(axes, rank: int) -> list[int]:
    return [a + rank if a < 0 else a for a in axes]


class _DeviceCache:
    """A precomputed tensor, copied once to each device it is used on."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self._by_device = {t.device: t}

    def on(self, device: torch.device) -> torch.Tensor:
        t = self._by_device.get(device)
        if t is None:
            t = self.t.to(device)
            self._by_device[device] = t
        return t


def _fix_negative(idx: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.where(idx < 0, idx + dim, idx)


# ---- Constant --------------------------------------------------------------------------------


def _sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    values = onnx.numpy_helper.to_array(sp.values)
    idx = onnx.numpy_helper.to_array(sp.indices).astype(np.int64)
    dims = tuple(int(d) for d in sp.dims)
    out = np.zeros(int(np.prod(dims)) if dims else 1, dtype=values.dtype)
    if idx.ndim == 2:  # [NNZ, rank] coordinates
        idx = np.ravel_multi_index(tuple(idx.T), dims) if idx.size else idx.reshape(-1)
    out[idx.reshape(-1)] = values.reshape(-1)
    return out.reshape(dims)


def constant_value(node: NodeContext) -> np.ndarray:
    """The value of a Constant node as a numpy array."""
    for a in node.node.attribute:
        if a.name == "value":
            return onnx.numpy_helper.to_array(a.t)
        if a.name == "sparse_value":
            return _sparse_to_dense(a.sparse_tensor)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
        if a.name in ("value_string", "value_strings"):
            raise NotImplementedError("string constants are not supported")
    raise NotImplementedError("Constant without a value attribute")


@register("Constant", since=1)
def constant(node: NodeContext):
    value = _np_to_torch(constant_value(node), node)
    return lambda: value


# ---- Reshape / Flatten / Transpose / Squeeze / Unsqueeze -----------------------------------


def _reshape_target(node: NodeContext, x: torch.Tensor, shape: list[int], allowzero: bool) -> list[int]:
    if not allowzero:
        shape = [x.shape[i] if s == 0 and i < x.dim() else s for i, s in enumerate(shape)]
    return node.graph.batch_override(shape, x.shape[0] if x.dim() else None)


@register("Reshape", since=1)
def reshape_1(node: NodeContext):
    shape = node.attr("shape", [])
    return lambda x: x.reshape(_reshape_target(node, x, shape, False))


@register("Reshape", since=5)
def reshape(node: NodeContext):
    allowzero = bool(node.attr("allowzero", 0))
    static = _static_ints(node, 1)

    def fn(x, shape=None):
        s = static if static is not None else _ints(shape)
        return x.reshape(_reshape_target(node, x, s, allowzero))

    return fn


@register("Flatten", since=1)
def flatten(node: NodeContext):
    axis = node.attr("axis", 1)

    def fn(x):
        a = axis + x.dim() if axis < 0 else axis
        outer = math.prod(x.shape[:a])
        return x.reshape(outer, math.prod(x.shape[a:]))

    return fn


@register("Transpose", since=1)
def transpose(node: NodeContext):
    perm = node.attr("perm", None)
    if perm is None:
        return lambda x: x.permute(*reversed(range(x.dim())))
    return lambda x: x.permute(*perm)


def _squeeze(x: torch.Tensor, axes: list[int] | None) -> torch.Tensor:
    if axes is None:
        return x.squeeze()
    if not axes:
        return x
    return x.squeeze(tuple(_norm_axes(axes, x.dim())))


def _unsqueeze(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    inserted = set(_norm_axes(axes, rank))
    dims = iter(x.shape)
    return x.reshape([1 if i in inserted else next(dims) for i in range(rank)])


@register("Squeeze", since=1)
def squeeze_1(node: NodeContext):
    axes = node.attr("axes", None)
    return lambda x: _squeeze(x, axes)


@register("Squeeze", since=13)
def squeeze(node: NodeContext):
    static = _static_ints(node, 1)

    def fn(x, axes=None):
        if static is not None:
            return _squeeze(x, static)
        return _squeeze(x, None if axes is None else _ints(axes))

    return fn


@register("Unsqueeze", since=1)
def unsqueeze_1(node: NodeContext):
    axes = node.attr("axes", [])
    return lambda x: _unsqueeze(x, axes)


@register("Unsqueeze", since=13)
def unsqueeze(node: NodeContext):
    static = _static_ints(node, 1)
    return lambda x, axes: _unsqueeze(x, static if static is not None else _ints(axes))


# ---- Concat / Split --------------------------------------------------------------------------


@register("Concat", since=1)
def concat(node: NodeContext):
    axis = node.attr("axis", 1 if node.opset < 4 else None)
    if axis is None:
        raise NotImplementedError("Concat without axis")

    def fn(*xs):
        xs = [x for x in xs if x is not None]
        if len(xs) == 1:
            return xs[0]
        return torch.cat(xs, dim=axis)

    return fn


def _split_sizes(dim: int, n_out: int, split: list[int] | None, num_outputs: int | None) -> list[int]:
    if split:
        return split
    n = num_outputs or n_out
    if num_outputs is not None:  # opset 18: the last chunk may be smaller
        size = -(-dim // n)
        return [size] * (n - 1) + [dim - size * (n - 1)]
    if dim % n:
        raise ValueError(f"Split: dimension {dim} does not divide into {n} equal parts")
    return [dim // n] * n


def _make_split(node: NodeContext, axis: int, split_attr, static, num_outputs):
    n_out = len(node.outputs)

    def fn(x, split=None):
        s = split_attr or static
        if s is None and split is not None:
            s = _ints(split)
        a = axis + x.dim() if axis < 0 else axis
        return tuple(torch.split(x, _split_sizes(x.shape[a], n_out, s, num_outputs), dim=a))

    return fn


@register("Split", since=1)
def split_1(node: NodeContext):
    return _make_split(node, node.attr("axis", 0), node.attr("split", None), _static_ints(node, 1), None)


@register("Split", since=2)
def split_2(node: NodeContext):
    return _make_split(node, node.attr("axis", 0), node.attr("split", None), None, None)


@register("Split", since=13)
def split_13(node: NodeContext):
    num_outputs = node.attr("num_outputs", None) if node.opset >= 18 else None
    return _make_split(node, node.attr("axis", 0), None, _static_ints(node, 1), num_outputs)


# ---- Slice -----------------------------------------------------------------------------------


def _slice(x: torch.Tensor, starts, ends, axes, steps) -> torch.Tensor:
    rank = x.dim()
    axes = list(range(len(starts))) if axes is None else _norm_axes(axes, rank)
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * rank
    flips = []
    for a, s, e, st in zip(axes, starts, ends, steps):
        if st == 0:
            raise ValueError("Slice: step must not be 0")
        start, stop, step = slice(s, e, st).indices(x.shape[a])  # numpy/ONNX clamping
        if step > 0:
            index[a] = slice(start, stop, step)
            continue
        count = len(range(start, stop, step))
        if count == 0:
            index[a] = slice(0, 0)
            continue
        last = start + (count - 1) * step
        index[a] = slice(last, start + 1, -step)
        flips.append(a)
    y = x[tuple(index)]
    return y.flip(flips) if flips else y


@register("Slice", since=1)
def slice_1(node: NodeContext):
    starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes", None)
    return lambda x: _slice(x, starts, ends, axes, None)


@register("Slice", since=10)
def slice_10(node: NodeContext):
    static = [_static_ints(node, i) if node.has_input(i) else None for i in range(1, 5)]

    def fn(x, starts, ends, axes=None, steps=None):
        args = [
            st if st is not None else (None if v is None else _ints(v))
            for st, v in zip(static, (starts, ends, axes, steps))
        ]
        return _slice(x, *args)

    return fn


# ---- Gather / Scatter ------------------------------------------------------------------------


def _static_index(node: NodeContext, i: int) -> _DeviceCache | None:
    c = node.const(i)
    return None if c is None else _DeviceCache(torch.from_numpy(np.asarray(c).astype(np.int64)))


@register("Gather", since=1)
def gather(node: NodeContext):
    axis = node.attr("axis", 0)
    static = _static_index(node, 1)
    static_nonneg = static is not None and bool((static.t >= 0).all())

    def fn(x, indices):
        a = axis + x.dim() if axis < 0 else axis
        if static is not None:
            idx = static.on(x.device)
            if not static_nonneg:
                idx = _fix_negative(idx, x.shape[a])
        else:
            idx = _fix_negative(indices.long(), x.shape[a])
        out = x.index_select(a, idx.reshape(-1))
        if idx.dim() == 1:
            return out
        return out.reshape(tuple(x.shape[:a]) + tuple(idx.shape) + tuple(x.shape[a + 1 :]))

    return fn


@register("GatherElements", since=11)
def gather_elements(node: NodeContext):
    axis = node.attr("axis", 0)

    def fn(x, indices):
        a = axis + x.dim() if axis < 0 else axis
        return torch.gather(x, a, _fix_negative(indices.long(), x.shape[a]))

    return fn


def _linear_index(idx: torch.Tensor, dims) -> torch.Tensor:
    """[..., k] coordinates into the first k of ``dims`` -> [...] flat index (negatives wrap)."""
    k = idx.shape[-1]
    sizes = torch.tensor(list(dims[:k]), dtype=torch.int64, device=idx.device)
    idx = torch.where(idx < 0, idx + sizes, idx)
    strides = [1] * k
    for j in range(k - 2, -1, -1):
        strides[j] = strides[j + 1] * int(dims[j + 1])
    return (idx * torch.tensor(strides, dtype=torch.int64, device=idx.device)).sum(-1)


@register("GatherND", since=11)
def gather_nd(node: NodeContext):
    bd = node.attr("batch_dims", 0)

    def fn(x, indices):
        idx = indices.long()
        k = idx.shape[-1]
        batch_shape = tuple(x.shape[:bd])
        nb = math.prod(batch_shape)
        rest = tuple(x.shape[bd + k :])
        data = x.reshape((nb, math.prod(x.shape[bd : bd + k])) + rest)
        lin = _linear_index(idx, x.shape[bd:]).reshape(nb, -1)
        rows = torch.arange(nb, device=x.device).unsqueeze(1)
        out = data[rows, lin]
        return out.reshape(batch_shape + tuple(idx.shape[bd:-1]) + rest)

    return fn


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _reduction(node: NodeContext) -> str:
    r = node.attr("reduction", "none")
    if r != "none" and r not in _SCATTER_REDUCE:
        raise NotImplementedError(f"reduction {r!r}")
    return r


@register("Scatter", since=9)
@register("ScatterElements", since=11)
def scatter_elements(node: NodeContext):
    axis = node.attr("axis", 0)
    reduction = _reduction(node)

    def fn(x, indices, updates):
        a = axis + x.dim() if axis < 0 else axis
        idx = _fix_negative(indices.long(), x.shape[a])
        if reduction == "none":
            return x.scatter(a, idx, updates)
        return x.scatter_reduce(a, idx, updates, _SCATTER_REDUCE[reduction], include_self=True)

    return fn


@register("ScatterND", since=11)
def scatter_nd(node: NodeContext):
    reduction = _reduction(node)

    def fn(x, indices, updates):
        idx = indices.long()
        k = idx.shape[-1]
        rest = tuple(x.shape[k:])
        data = x.reshape((math.prod(x.shape[:k]),) + rest)
        lin = _linear_index(idx, x.shape).reshape(-1)
        upd = updates.reshape((lin.shape[0],) + rest)
        if reduction == "none":
            out = data.index_put((lin,), upd)
        elif reduction == "add":
            out = data.index_add(0, lin, upd)
        else:
            idx = lin.reshape((-1,) + (1,) * len(rest)).expand(upd.shape)
            out = data.scatter_reduce(0, idx, upd, _SCATTER_REDUCE[reduction], include_self=True)
        return out.reshape(x.shape)

    return fn


# ---- Shape / Size / Expand / Tile --------------------------------------------------------------


@register("Shape", since=1)
def shape(node: NodeContext):
    start = node.attr("start", 0) if node.opset >= 15 else 0
    end = node.attr("end", None) if node.opset >= 15 else None
    return lambda x: torch.tensor(list(x.shape[start:end]), dtype=torch.int64, device=x.device)


@register("Size", since=1)
def size(node: NodeContext):
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register("Expand", since=8)
def expand(node: NodeContext):
    static = _static_ints(node, 1)

    def fn(x, shape=None):
        s = static if static is not None else _ints(shape)
        s = node.graph.batch_override(s, x.shape[0] if x.dim() == len(s) else None)
        return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(s)))

    return fn


def _tile(node: NodeContext, x: torch.Tensor, repeats: list[int]) -> torch.Tensor:
    if x.dim() and repeats:
        # the target shape follows the exported batch like Reshape/Expand targets do
        target = [d * r for d, r in zip(x.shape, repeats)]
        new = node.graph.batch_override(target, x.shape[0])
        if new[0] != target[0] and new[0] % x.shape[0] == 0:
            repeats = [new[0] // x.shape[0]] + list(repeats[1:])
    return x.repeat(repeats)


@register("Tile", since=1)
def tile_1(node: NodeContext):
    def fn(x, tiles, axis):
        reps = [1] * x.dim()
        reps[int(_scalar(axis))] = int(_scalar(tiles))
        return x.repeat(reps)

    return fn


@register("Tile", since=6)
def tile(node: NodeContext):
    static = _static_ints(node, 1)
    return lambda x, repeats: _tile(node, x, static if static is not None else _ints(repeats))


# ---- Pad -------------------------------------------------------------------------------------


def _pad_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    i = torch.arange(-before, n + after, device=device)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "wrap":
        return i.remainder(n)
    if n == 1:  # reflect on a single element repeats it
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


_TORCH_PAD_MODE = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(x: torch.Tensor, pads: list[int], mode: str, value, axes: list[int] | None) -> torch.Tensor:
    rank = x.dim()
    axes = list(range(rank)) if axes is None else _norm_axes(axes, rank)
    m = len(axes)
    per_axis = [(0, 0)] * rank
    for j, a in enumerate(axes):
        per_axis[a] = (pads[j], pads[j + m])
    padded = [a for a in range(rank) if per_axis[a] != (0, 0)]
    if not padded:
        return x
    if mode == "constant":
        flat = []
        for a in range(rank - 1, padded[0] - 1, -1):
            flat += list(per_axis[a])
        return F.pad(x, flat, mode="constant", value=0.0 if value is None else value)
    if mode not in _TORCH_PAD_MODE:
        raise NotImplementedError(f"Pad mode {mode!r}")
    spatial = rank - 2
    if (
        x.is_floating_point()
        and rank in (3, 4, 5)
        and padded[0] >= 2
        and all(p >= 0 for a in padded for p in per_axis[a])
        and (mode == "edge" or all(max(per_axis[a]) < x.shape[a] for a in padded))
    ):
        flat = []
        for a in range(rank - 1, 1, -1):
            flat += list(per_axis[a])
        return F.pad(x, flat[: 2 * spatial], mode=_TORCH_PAD_MODE[mode])
    for a in padded:
        idx = _pad_index(x.shape[a], per_axis[a][0], per_axis[a][1], mode, x.device)
        x = x.index_select(a, idx)
    return x


@register("Pad", since=1)
def pad_1(node: NodeContext):
    pads = node.attr("paddings" if node.opset < 2 else "pads", [])
    mode, value = node.attr("mode", "constant"), node.attr("value", 0.0)
    return lambda x: _pad(x, pads, mode, value, None)


@register("Pad", since=2)
def pad_2(node: NodeContext):
    pads = node.attr("pads", [])
    mode, value = node.attr("mode", "constant"), node.attr("value", 0.0)
    return lambda x: _pad(x, pads, mode, value, None)


@register("Pad", since=11)
def pad_11(node: NodeContext):
    mode = node.attr("mode", "constant")
    static_pads = _static_ints(node, 1)
    c = node.const(2)
    static_value = None if c is None or np.asarray(c).size == 0 else np.asarray(c).reshape(-1)[0].item()
    static_axes = _static_ints(node, 3)

    def fn(x, pads, constant_value=None, axes=None):
        p = static_pads if static_pads is not None else _ints(pads)
        v = static_value
        if v is None and constant_value is not None and constant_value.numel():
            v = _scalar(constant_value)
        ax = static_axes if static_axes is not None else (None if axes is None else _ints(axes))
        return _pad(x, p, mode, v, ax)

    return fn


# ---- generators: ConstantOfShape / Range / EyeLike / OneHot ---------------------------------


@register("ConstantOfShape", since=9)
def constant_of_shape(node: NodeContext):
    v = node.attr("value", None)
    value = _np_to_torch(np.zeros(1, np.float32) if v is None else v, node).reshape(-1)[0]
    static = _static_ints(node, 0)
    pre = None if static is None else _DeviceCache(value.expand(static).contiguous())

    def fn(shape):
        if pre is not None:
            return pre.on(shape.device) if isinstance(shape, torch.Tensor) else pre.t
        return torch.full(_ints(shape), value.item(), dtype=value.dtype, device=shape.device)

    return fn


def _range(start, limit, delta, dtype, device) -> torch.Tensor:
    n = max(math.ceil((limit - start) / delta), 0)
    calc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if not calc.is_floating_point:
        calc = torch.int64
    out = start + torch.arange(n, dtype=calc, device=device) * delta
    return out.to(dtype)


@register("Range", since=11)
def range_(node: NodeContext):
    consts = [node.const(i) for i in range(3)]
    pre = None
    if all(c is not None for c in consts):
        dtype = _np_to_torch(np.asarray(consts[0]), node).dtype
        pre = _DeviceCache(_range(*(np.asarray(c).item() for c in consts), dtype, "cpu"))

    def fn(start, limit, delta):
        if pre is not None:
            return pre.on(start.device)
        return _range(_scalar(start), _scalar(limit), _scalar(delta), start.dtype, start.device)

    return fn


@register("EyeLike", since=9)
def eye_like(node: NodeContext):
    k = node.attr("k", 0)
    dt = node.attr("dtype", None)
    dtype = None if dt is None else torch_dtype(dt, node.graph)

    def fn(x):
        n, m = x.shape
        rows = torch.arange(n, device=x.device).unsqueeze(1)
        cols = torch.arange(m, device=x.device)
        return (cols - rows == k).to(dtype or x.dtype)

    return fn


@register("OneHot", since=9)
def one_hot(node: NodeContext):
    axis = node.attr("axis", -1)

    def fn(indices, depth, values):
        d = int(_scalar(depth))
        a = axis + indices.dim() + 1 if axis < 0 else axis
        idx = indices.long()
        idx = torch.where(idx < 0, idx + d, idx).unsqueeze(a)
        shape = [1] * idx.dim()
        shape[a] = d
        hot = idx == torch.arange(d, device=indices.device).reshape(shape)
        return torch.where(hot, values[1], values[0])

    return fn


# ---- DepthToSpace / SpaceToDepth ------------------------------------------------------------


@register("DepthToSpace", since=1)
def depth_to_space(node: NodeContext):
    bs = node.attr("blocksize")
    mode = node.attr("mode", "DCR")

    def fn(x):
        b, c, h, w = x.shape
        c_out = c // (bs * bs)
        if mode == "DCR":
            y = x.reshape(b, bs, bs, c_out, h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(b, c_out, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(b, c_out, h * bs, w * bs)

    return fn


@register("SpaceToDepth", since=1)
def space_to_depth(node: NodeContext):
    bs = node.attr("blocksize")
    mode = node.attr("mode", "DCR")

    def fn(x):
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // bs, bs, w // bs, bs)
        if mode == "DCR":
            y = y.permute(0, 3, 5, 1, 2, 4)
        else:
            y = y.permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, c * bs * bs, h // bs, w // bs)

    return fn


# ---- misc ------------------------------------------------------------------------------------


@register("NonZero", since=9)
def non_zero(node: NodeContext):
    def fn(x):
        if x.dim() == 0:
            return torch.zeros((0, int(bool(x))), dtype=torch.int64, device=x.device)
        return torch.nonzero(x).t().contiguous()

    return fn


@register("Trilu", since=14)
def trilu(node: NodeContext):
    upper = bool(node.attr("upper", 1))
    static = node.const(1)
    k_static = None if static is None else int(np.asarray(static).item())

    def fn(x, k=None):
        kk = k_static if k_static is not None else (0 if k is None else int(_scalar(k)))
        return torch.triu(x, kk) if upper else torch.tril(x, kk)

    return fn


@register("CumSum", since=11)
def cumsum(node: NodeContext):
    exclusive = bool(node.attr("exclusive", 0))
    reverse = bool(node.attr("reverse", 0))
    static = node.const(1)
    axis_static = None if static is None else int(np.asarray(static).item())

    def fn(x, axis):
        a = axis_static if axis_static is not None else int(_scalar(axis))
        a = a + x.dim() if a < 0 else a
        y = x.flip(a) if reverse else x
        out = torch.cumsum(y, a, dtype=x.dtype)
        if exclusive:
            n = out.shape[a]
            pad = torch.zeros_like(out.narrow(a, 0, min(n, 1)))
            out = torch.cat([pad, out.narrow(a, 0, max(n - 1, 0))], dim=a)
        return out.flip(a) if reverse else out

    return fn


@register("ReverseSequence", since=10)
def reverse_sequence(node: NodeContext):
    batch_axis = node.attr("batch_axis", 1)
    time_axis = node.attr("time_axis", 0)

    def fn(x, sequence_lens):
        t_len = x.shape[time_axis]
        lens = sequence_lens.long().to(x.device)
        shape = [1] * x.dim()
        shape[time_axis] = t_len
        t = torch.arange(t_len, device=x.device).reshape(shape)
        bshape = [1] * x.dim()
        bshape[batch_axis] = lens.shape[0]
        lens = lens.reshape(bshape)
        src = torch.where(t < lens, lens - 1 - t, t)
        return torch.gather(x, time_axis, src.expand(x.shape))

    return fn


@register("Compress", since=9)
def compress(node: NodeContext):
    axis = node.attr("axis", None)

    def fn(x, condition):
        if axis is None:
            x = x.reshape(-1)
            a = 0
        else:
            a = axis + x.dim() if axis < 0 else axis
        cond = condition.reshape(-1)[: x.shape[a]].to(torch.bool)
        keep = torch.nonzero(cond).reshape(-1).to(x.device)
        return x.index_select(a, keep)

    return fn


@register("Unique", since=11)
def unique(node: NodeContext):
    axis = node.attr("axis", None)
    is_sorted = bool(node.attr("sorted", 1))
    n_out = len(node.outputs)

    def fn(x):
        if axis is None:
            flat, dim = x.reshape(-1), 0
        else:
            flat, dim = x, axis + x.dim() if axis < 0 else axis
        y, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True, dim=dim)
        n = flat.shape[dim]
        pos = torch.arange(n, device=x.device)
        first = torch.full((y.shape[dim],), n, dtype=torch.int64, device=x.device)
        first = first.scatter_reduce(0, inverse, pos, "amin", include_self=True)
        if not is_sorted:
            order = torch.argsort(first)
            y = y.index_select(dim, order)
            first, counts = first[order], counts[order]
            inverse = torch.argsort(order)[inverse]
        outs = (y, first, inverse.reshape(-1), counts)
        return outs[:n_out]

    return fn
