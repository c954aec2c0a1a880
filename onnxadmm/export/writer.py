"""Write new weight values back into the ORIGINAL ONNX graph.

``export_onnx`` changes only the tensors it is given and leaves every other byte of the model as it
was: opsets, ``ir_version``, producer, doc strings, ``metadata_props``, ``value_info``, node names and
node order (even when the nodes are not topologically sorted), graph inputs that double as
initializers (old IR), and the storage of tensors whose values did not change.

Rules:

1. A weight is named by its ONNX tensor name: a dense initializer, a sparse initializer, or the
   output of a ``Constant`` node (PaddlePaddle keeps its weights there; the node's ``value``,
   ``sparse_value``, ``value_float(s)`` or ``value_int(s)`` attribute is updated in place).
2. Each new value must have the original tensor's shape; it is cast back to the original dtype
   (float16 weights arrive as float32 from torch). A cast that overflows (a finite value becoming
   inf/nan) or an integer tensor receiving non-integral values is refused.
3. A tensor whose cast value is bit-identical to the stored one is left untouched (so an unchanged
   model is written back byte for byte, whichever field, ``float_data`` or ``raw_data``, held it).
4. Tensors named in ``sparse`` (and tensors that were sparse already) are written as COO sparse
   tensors: ``graph.sparse_initializer`` for initializers, ``Constant.sparse_value`` (opset >= 11)
   for Constant nodes. Indices are int64, sorted, *linear* (shape ``[NNZ]``), the smaller of the
   two layouts the spec allows; onnxruntime 1.32 accepts both (tested) and densifies them at load.
   An existing sparse tensor keeps its own index layout (linear or ``[NNZ, rank]``).
   Zero means ``== 0``: a ``-0.0`` is dropped like ``+0.0`` (the sign of a zero weight is moot).
5. If the original file kept its tensors in external data, so does the output (one ``<name>.data``
   file next to it); models over 2 GB always do. The write is atomic (``modelio.save_model``).

Why the tensors are edited in the ModelProto rather than through an ``onnx_ir`` round trip:
``onnx_ir`` (1.1) cannot keep everything this writer must keep. Measured on the shared models:
``deserialize_model`` fails outright on seq(map) value types (``logreg_iris.onnx``, ZipMap),
``serialize_model`` adds ``value_info`` entries for every initializer and rewrites unset fields
(empty node names, opset domains) as set-but-empty, and it has no sparse-tensor serde at all.
So the graph is never rebuilt: only the touched TensorProtos are re-encoded, and ``onnx_ir``'s
tensor serde (``ir.serde.serialize_tensor`` / ``deserialize_tensor``) does the dtype-correct
encoding and decoding (float16, bfloat16, float8, int4 packing), not hand-written byte fiddling.
Structural rewrites (shrinking channels, inserting Q/DQ nodes) are a different job and belong in
``onnx_ir`` passes.

Limitations: only the main graph is searched (not If/Loop bodies or model-local functions);
onnx's own strict shape inference (``onnx.checker.check_model(full_check=True)``) types a sparse
initializer as ``sparse_tensor`` and rejects it as a dense operand, although onnxruntime runs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import OnnxAdmmError
from ..modelio import PROTOBUF_LIMIT, external_locations, load_model, save_model

__all__ = ["export_onnx", "initializer_values", "with_weights", "FLOAT_TYPES"]

log = logging.getLogger(__name__)

#: ONNX element types counted as float weights by :func:`initializer_values`.
FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)

# TensorProto fields that hold (or point to) the data; everything else (name, dims, data_type,
# doc_string, metadata_props) is kept when a tensor is re-encoded.
_DATA_FIELDS = (
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "raw_data",
    "double_data",
    "uint64_data",
    "external_data",
    "data_location",
    "segment",
)

# Constant attributes holding a plain list / scalar instead of a TensorProto.
_CONST_LIST_ATTRS = {
    "value_float": (onnx.TensorProto.FLOAT, False),
    "value_floats": (onnx.TensorProto.FLOAT, True),
    "value_int": (onnx.TensorProto.INT64, False),
    "value_ints": (onnx.TensorProto.INT64, True),
}


@dataclass
class _Site:
    """Where one named tensor lives in the graph."""

    kind: str  # "initializer" | "sparse_initializer" | "constant"
    name: str
    dims: tuple[int, ...]
    data_type: int
    proto: object  # TensorProto | SparseTensorProto | NodeProto
    attr: onnx.AttributeProto | None = None  # the Constant node's value attribute

    @property
    def is_sparse(self) -> bool:
        return self.kind == "sparse_initializer" or (
            self.attr is not None and self.attr.type == onnx.AttributeProto.SPARSE_TENSOR
        )


def _find_sites(graph: onnx.GraphProto) -> dict[str, _Site]:
    sites: dict[str, _Site] = {}
    for t in graph.initializer:
        sites.setdefault(t.name, _Site("initializer", t.name, tuple(t.dims), t.data_type, t))
    for s in graph.sparse_initializer:
        name = s.values.name
        sites.setdefault(name, _Site("sparse_initializer", name, tuple(s.dims), s.values.data_type, s))
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        for a in node.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                dims, dtype = tuple(a.t.dims), a.t.data_type
            elif a.name == "sparse_value" and a.type == onnx.AttributeProto.SPARSE_TENSOR:
                dims, dtype = tuple(a.sparse_tensor.dims), a.sparse_tensor.values.data_type
            elif a.name in _CONST_LIST_ATTRS:
                dtype, is_list = _CONST_LIST_ATTRS[a.name]
                n = len(a.floats) if a.name == "value_floats" else len(a.ints)
                dims = (n,) if is_list else ()
            else:
                continue
            sites.setdefault(node.output[0], _Site("constant", node.output[0], dims, dtype, node, a))
            break
    return sites


def _tensor_to_numpy(t: onnx.TensorProto) -> np.ndarray:
    return ir.serde.deserialize_tensor(t).numpy()


def _sparse_to_numpy(s: onnx.SparseTensorProto) -> np.ndarray:
    values = _tensor_to_numpy(s.values)
    indices = _tensor_to_numpy(s.indices).astype(np.int64)
    dense = np.zeros(tuple(s.dims), dtype=values.dtype)
    if indices.ndim == 2:
        dense[tuple(indices.T)] = values
    else:
        dense.reshape(-1)[indices] = values
    return dense


def _site_value(site: _Site) -> np.ndarray:
    if site.kind == "initializer":
        return _tensor_to_numpy(site.proto)
    if site.kind == "sparse_initializer":
        return _sparse_to_numpy(site.proto)
    a = site.attr
    if a.type == onnx.AttributeProto.TENSOR:
        return _tensor_to_numpy(a.t)
    if a.type == onnx.AttributeProto.SPARSE_TENSOR:
        return _sparse_to_numpy(a.sparse_tensor)
    dtype = np.float32 if site.data_type == onnx.TensorProto.FLOAT else np.int64
    if a.name == "value_float":
        return np.array(a.f, dtype=dtype)
    if a.name == "value_int":
        return np.array(a.i, dtype=dtype)
    return np.array(list(a.floats) if a.name == "value_floats" else list(a.ints), dtype=dtype)


def _as_model(model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def initializer_values(model, *, constants: bool = True) -> dict[str, np.ndarray]:
    """Every float weight of ``model`` (a path or ModelProto) as ``{tensor name: array}``.

    Covers dense initializers, sparse initializers (densified) and, when ``constants`` is true,
    float outputs of ``Constant`` nodes. Arrays keep the stored dtype (float16 stays float16,
    bfloat16 is an ``ml_dtypes`` array), in graph order.
    """
    proto = _as_model(model)
    _check_no_unloaded_external(proto)
    out: dict[str, np.ndarray] = {}
    for name, site in _find_sites(proto.graph).items():
        if site.data_type not in FLOAT_TYPES or (site.kind == "constant" and not constants):
            continue
        out[name] = _site_value(site)
    return out


def _cast(name: str, value, site: _Site) -> np.ndarray:
    """``value`` as an array of the site's dtype and shape, or a clear error."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # e.g. a torch tensor that requires grad
        raise OnnxAdmmError(f"weight {name!r}: cannot turn the new value into an array ({exc})") from None
    if tuple(arr.shape) != site.dims:
        raise OnnxAdmmError(
            f"weight {name!r}: new value has shape {tuple(arr.shape)}, the model's tensor has {site.dims}"
        )
    dtype = ir.DataType(site.data_type)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(dtype.numpy())
            wide_in = arr.astype(np.float64)
            wide_out = out.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise OnnxAdmmError(
            f"weight {name!r}: cannot cast {arr.dtype} values to the model's {dtype.name} ({exc})"
        ) from None
    if dtype.is_floating_point():
        bad = np.isfinite(wide_in) & ~np.isfinite(wide_out)
        if bad.any():
            raise OnnxAdmmError(
                f"weight {name!r}: {int(bad.sum())} value(s) overflow the model's {dtype.name} "
                f"(largest magnitude {np.abs(wide_in[bad]).max():g})"
            )
    elif not np.array_equal(wide_in, wide_out):
        raise OnnxAdmmError(f"weight {name!r}: new values are not representable in the model's {dtype.name}")
    return out


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _encode(arr: np.ndarray, data_type: int, name: str = "") -> onnx.TensorProto:
    return ir.serde.serialize_tensor(ir.Tensor(arr, dtype=ir.DataType(data_type), name=name or None))


def _fill_tensor(t: onnx.TensorProto, arr: np.ndarray) -> None:
    """Replace the data of ``t`` in place, keeping its name, dims, dtype and doc/metadata."""
    enc = _encode(arr, t.data_type)
    for f in ("name", "dims", "data_type", "doc_string"):
        enc.ClearField(f)
    for f in _DATA_FIELDS:
        t.ClearField(f)
    t.MergeFrom(enc)


def _make_sparse(
    name: str, arr: np.ndarray, data_type: int, *, two_d: bool = False, indices_name: str = ""
) -> onnx.SparseTensorProto:
    if arr.ndim == 0:
        raise OnnxAdmmError(f"weight {name!r}: a scalar cannot be stored as a sparse tensor")
    flat = arr.reshape(-1)
    nz = np.flatnonzero(flat != 0)  # sorted ascending, as onnx.checker wants
    indices = np.stack(np.unravel_index(nz, arr.shape), axis=1) if two_d else nz
    sp = onnx.SparseTensorProto()
    sp.dims.extend(arr.shape)
    sp.values.CopyFrom(_encode(flat[nz], data_type, name))
    sp.indices.CopyFrom(_encode(indices.astype(np.int64), onnx.TensorProto.INT64, indices_name))
    return sp


def _write_site(site: _Site, arr: np.ndarray, to_sparse: bool, opset: int, drop: set[str], graph) -> None:
    if site.kind == "initializer":
        if not to_sparse:
            _fill_tensor(site.proto, arr)
            return
        sp = _make_sparse(site.name, arr, site.data_type)
        sp.values.doc_string = site.proto.doc_string
        graph.sparse_initializer.append(sp)
        drop.add(site.name)
        return
    if site.kind == "sparse_initializer":
        old = site.proto
        two_d = len(old.indices.dims) == 2
        sp = _make_sparse(site.name, arr, site.data_type, two_d=two_d, indices_name=old.indices.name)
        sp.values.doc_string = old.values.doc_string
        old.CopyFrom(sp)
        return
    # Constant node: the attribute keeps its position in the node
    a = site.attr
    if to_sparse:
        if opset < 11:
            raise OnnxAdmmError(
                f"weight {site.name!r} is a Constant node output: storing it sparse needs "
                f"Constant.sparse_value (opset 11+), the model imports opset {opset}"
            )
        two_d = a.type == onnx.AttributeProto.SPARSE_TENSOR and len(a.sparse_tensor.indices.dims) == 2
        sp = _make_sparse(site.name, arr, site.data_type, two_d=two_d)
        a.Clear()
        a.name = "sparse_value"
        a.type = onnx.AttributeProto.SPARSE_TENSOR
        a.sparse_tensor.CopyFrom(sp)
    elif a.type == onnx.AttributeProto.TENSOR:
        _fill_tensor(a.t, arr)
    elif a.name == "value_float":
        a.f = float(arr)
    elif a.name == "value_int":
        a.i = int(arr)
    elif a.name == "value_floats":
        del a.floats[:]
        a.floats.extend(arr.tolist())
    else:  # value_ints
        del a.ints[:]
        a.ints.extend(arr.tolist())


def _check_no_unloaded_external(model: onnx.ModelProto) -> None:
    if external_locations(model):
        raise OnnxAdmmError(
            "the ModelProto refers to external data that was not loaded; pass the model's file path "
            "(or load it with its external data) instead"
        )


def _ai_onnx_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _put_weights(model: onnx.ModelProto, new_weights: Mapping[str, np.ndarray], sparse: set[str]) -> None:
    """Put ``new_weights`` (and the ``sparse`` storage) into ``model`` in place."""
    graph = model.graph
    sites = _find_sites(graph)
    unknown = sorted((set(new_weights) | sparse) - set(sites))
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise OnnxAdmmError(
            f"unknown weight name(s) {shown}: not an initializer, sparse initializer or Constant output of the model"
        )

    opset = _ai_onnx_opset(model)
    drop: set[str] = set()
    changed = 0
    for name in list(new_weights) + sorted(sparse - set(new_weights)):
        site = sites[name]
        old = _site_value(site)
        new = _cast(name, new_weights[name], site) if name in new_weights else old
        to_sparse = name in sparse or site.is_sparse
        if to_sparse == site.is_sparse and _bit_equal(old, new):
            continue  # rule 3: keep the stored bytes
        _write_site(site, new, to_sparse, opset, drop, graph)
        changed += 1
    if drop:
        kept = [t for t in graph.initializer if t.name not in drop]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    log.info("%d tensor(s) rewritten, %d stored sparse", changed, len(drop))


def with_weights(
    model: onnx.ModelProto, new_weights: Mapping[str, np.ndarray], *, sparse: Iterable[str] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` (in memory, its data loaded) with ``new_weights`` put in place, as
    :func:`export_onnx` writes it."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _check_no_unloaded_external(out)
    _put_weights(out, new_weights, set(sparse or ()))
    return out


def export_onnx(
    original,
    new_weights: Mapping[str, np.ndarray],
    path,
    *,
    sparse: Iterable[str] | None = None,
    external_data: bool | None = None,
    force: bool = False,
) -> Path:
    """Write ``original`` (a path or ModelProto) to ``path`` with ``new_weights`` put in place.

    ``new_weights`` maps ONNX tensor names to arrays of the original shapes (any float dtype; cast
    back to the stored dtype). ``sparse`` names tensors to store as COO sparse tensors; a name there
    that is not in ``new_weights`` converts the existing value. ``external_data``: None keeps the
    original's layout (external if it had external data or is over 2 GB), True/False force it.
    Refuses to write over the original file unless ``force``. Returns the written path.
    """
    path = Path(path)
    sparse = set(sparse or ())
    had_external = False
    src_files: set[Path] = set()
    if isinstance(original, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(original)
        _check_no_unloaded_external(model)
    else:
        src = Path(original)
        if not force and _same_path(path, src):
            raise OnnxAdmmError(f"refusing to overwrite the input model {src}; choose another output path")
        model = load_model(src, load_external=False)
        locations = external_locations(model)
        if locations:
            had_external = True
            src_files = {(src.parent / loc).resolve() for loc in locations}
            model = load_model(src)  # the protobuf part is small when the data is external
    if path.is_dir():
        raise OnnxAdmmError(f"{path}: is a folder; give the output .onnx file name")

    _put_weights(model, new_weights, sparse)
    log.info("export_onnx: writing %s", path)

    if external_data is None and had_external:
        external_data = True
    if external_data is False and model.ByteSize() > PROTOBUF_LIMIT:
        raise OnnxAdmmError(
            f"the model is over 2 GB ({model.ByteSize()} bytes) and cannot be written without external data"
        )
    if external_data is not False and src_files and not force:
        data_file = (path.parent / (path.name + ".data")).resolve()
        if data_file in src_files:
            raise OnnxAdmmError(
                f"refusing to overwrite the input model's external data file {data_file}; choose another output path"
            )
    return save_model(model, path, external_data=external_data)
