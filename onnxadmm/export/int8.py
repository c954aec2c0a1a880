"""Export a model whose weights sit on a symmetric int8 grid as an int8 ONNX model with integer kernels.

``export_int8`` takes float32 weights that are already quantized (``w = s * n``, integer ``n`` in
[-127, 127], zero point 0; ``s`` one scale per tensor or one per output channel), writes them into
the model, and hands the model to ``onnxruntime.quantization.quantize_static`` with a
``TensorQuantOverrides`` entry per weight giving its exact scale and zero point (and axis), so that
onnxruntime stores exactly ``n`` and ``s`` instead of re-deriving them from the weights' range.
Activations are quantized statically from calibration data (MinMax by default). The function then
checks that every int8 weight initializer times its scale equals the given float weight exactly,
and opens the result in onnxruntime to count the integer kernels its optimiser runs.

Choices (measured with onnxruntime 1.32 on x86-64; see docs/benchmarks.md):

* Activations are uint8 (asymmetric), weights int8 (symmetric), as onnxruntime recommends for x86:
  its x86 integer GEMM/conv kernels (MLAS; AVX2 ``vpmaddubsw``, AVX-512/AVX-VNNI ``vpdpbusd``) multiply
  unsigned 8-bit activations by signed 8-bit weights, and asymmetric uint8 spends all 256 levels on
  a ReLU output (the ReLU is then folded into the quantization range). Measured here (batch 64,
  1 thread, AVX-512 VNNI CPU): uint8 QDQ runs LeNet-5 1.8x and ResNet-8 1.7x faster than fp32;
  with int8 activations, onnxruntime's optimiser fuses only 3 of ResNet-8's 9 QDQ convolutions
  into QLinearConv (the other 6 stay float Conv between Q/DQ) and the model runs at 0.75x fp32;
  S8S8 QOperator runs at 0.15-0.3x fp32 (onnxruntime itself warns against it on x64).
  ``activation_type="int8"`` stays available (ARM).
* ``fmt="qdq"`` (default) writes QuantizeLinear/DequantizeLinear pairs around float operators
  (portable; onnxruntime fuses them into QLinearConv / QLinearMatMul / QGemm at load);
  ``fmt="qoperator"`` writes the integer operators directly. Both reach the same kernels and the
  same speed on the benchmark models; QOperator files are slightly smaller.
* Among the weight-bearing operators (Conv, Gemm, MatMul) only nodes whose weight is given in
  ``weights`` are quantized; other Conv/Gemm/MatMul nodes stay float unless ``quantize_others=True``
  (then onnxruntime derives their weight scales itself). The weightless operators that onnxruntime
  can run in int8 (Relu, Clip, MaxPool, Add, GlobalAveragePool, Flatten, Reshape, ...) are quantized
  too (``quantize_activation_ops=True``), so that quantized tensors flow from one integer kernel to
  the next instead of being dequantized and requantized around float Add / pooling: limiting
  ``op_types_to_quantize`` to Conv/Gemm/MatMul leaves ResNet-8's residual Adds and pooling in float
  and measured about 1.5x instead of 1.7x. Embeddings (Gather), LSTM and attention are never quantized.
* A weight is per channel when its scale is a 1-D array; the channel axis comes from the consumer:
  0 for Conv, and for Gemm with ``transB=1``; 1 for Gemm with ``transB=0``; the last axis for
  MatMul's constant right operand ``[K, N]`` (``axes`` overrides it). With ``fmt="qoperator"``
  onnxruntime's per-channel switch is global, so per-tensor weights are then written as per-channel
  weights with all channel scales equal (the same numbers; exactness is unaffected).
* A channel whose scale is 0 (a pruned filter) must be all zeros; its scale is replaced by the
  mean of the tensor's non-zero scales (any positive scale reproduces zeros exactly; this one keeps
  the int32 bias step ``input_scale * weight_scale`` of that channel ordinary).
* ``quant_pre_process`` (onnxruntime's shape inference) runs first with its graph optimisation
  switched off: the optimisation may fold or rename initializers, which would break the exact
  weight overrides. If it fails, or changes a weight, the un-processed model is quantized
  (``quantize_static`` runs ONNX shape inference itself).
* onnxruntime would enlarge a weight scale when ``input_scale * weight_scale`` is too small for an
  int32 bias (``QDQDisableWeightAdjustForInt32Bias``); that is switched off, the scales are kept.

Errors: a weight that is not on its grid, has the wrong shape, is not a float32 initializer, or
feeds something other than input 1 of Conv/Gemm/MatMul raises :class:`Int8ExportError` (a
``ValueError``) naming the weight. A quantized model whose weights do not dequantize exactly to the
given ones raises :class:`Int8ExactnessError`.

Limitations: main graph only (no If/Loop bodies); models over 2 GB are not handled; one
consumer axis per weight (a weight shared by nodes that need different channel axes is refused);
only 8-bit grids (``n`` in [-127, 127]). The
int32 bias step is ``input_scale * weight_scale``, so a large bias on a channel with a tiny weight
scale can exceed int32; onnxruntime then clips it with a warning (weights stay exact, the bias not).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxAdmmError

__all__ = [
    "integer_kernel_weights",
    "INTEGER_KERNELS",
    "Int8ExactnessError",
    "Int8ExportError",
    "channel_axis",
    "export_int8",
    "integer_kernel_counts",
    "project_to_int8_grid",
]

log = logging.getLogger(__name__)

#: The integer matrix-product kernels (the ones that carry a layer's weight).
INTEGER_MATMUL_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "NhwcQLinearConv",
    }
)
#: Operators that compute with integer arithmetic in onnxruntime (ONNX and com.microsoft domains).
INTEGER_KERNELS = INTEGER_MATMUL_KERNELS | {
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearConcat",
    "QLinearLeakyRelu",
    "QLinearSigmoid",
    "QLinearSoftmax",
}

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# Operators without weights that onnxruntime's quantizer can keep in int8 (QDQ and QOperator).
_ACTIVATION_OPS = (
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Add",
    "Mul",
    "Concat",
    "Split",
    "Pad",
    "Resize",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Slice",
)
_QMAX = 127


class Int8ExportError(OnnxAdmmError, ValueError):
    """A weight, scale or calibration input cannot be exported as given (the message names it)."""


class Int8ExactnessError(OnnxAdmmError, RuntimeError):
    """The quantized model does not reproduce the given int8 weights exactly."""


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------


def _broadcast(scale: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    if axis is None:
        return scale.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return scale.reshape(shape)


def project_to_int8_grid(
    w: np.ndarray, axis: int | None = None, qmax: int = _QMAX
) -> tuple[np.ndarray, np.ndarray]:
    """Round ``w`` to a symmetric int8 grid: (grid weights float32, scale float32).

    The scale is ``max|w| / qmax`` per tensor (``axis=None``) or per slice along ``axis``; the
    returned weights are ``float32(scale * n)`` with integer ``n`` in [-qmax, qmax]. A helper for
    tests and benchmarks (ADMM's quantization projection chooses its own scales).
    """
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.abs(w).max(initial=0.0)
    else:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red, initial=0.0)
    scale = (np.asarray(amax, dtype=np.float32) / np.float32(qmax)).astype(np.float32)
    sb = _broadcast(scale, w.ndim, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(sb > 0, np.rint(w / np.where(sb > 0, sb, 1)), 0)
    n = np.clip(n, -qmax, qmax).astype(np.float32) + np.float32(0)  # + 0 turns -0.0 into +0.0
    return (n * sb).astype(np.float32), scale


def _grid_integers(name: str, w: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """The integers n with float32(scale * n) == w, or Int8ExportError naming the weight."""
    sb = _broadcast(scale, w.ndim, axis)
    safe = np.where(sb > 0, sb, np.float32(1)).astype(np.float32)
    n = np.rint(w / safe)
    zero_scale = np.broadcast_to(sb == 0, w.shape)
    if np.any(w[zero_scale] != 0):
        raise Int8ExportError(f"weight {name!r}: a channel with scale 0 has non-zero weights")
    n = np.where(zero_scale, 0, n)
    if np.abs(n).max(initial=0) > _QMAX:
        raise Int8ExportError(
            f"weight {name!r} is not on its int8 grid: |w / scale| reaches {np.abs(n).max():.0f} > {_QMAX}"
        )
    back = (n.astype(np.float32) * sb).astype(np.float32)
    bad = back != w
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise Int8ExportError(
            f"weight {name!r} is not on its int8 grid: {int(bad.sum())} of {w.size} values differ from "
            f"scale * round(w / scale) (first at index {idx}: w={w[idx]!r}, grid value {back[idx]!r})"
        )
    return n.astype(np.int8)


# ----------------------------------------------------------------------------------------------------
# The graph
# ----------------------------------------------------------------------------------------------------


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                out.setdefault(name, []).append((node, i))
    return out


def integer_kernel_weights(model: onnx.ModelProto, names) -> list[str]:
    """Those of ``names`` that integer kernels can take: initializers that feed input 1 of
    Conv/Gemm/MatMul nodes and nothing else (a recurrent layer's matrices, a Gemm's first input or a
    weight read by other ops stay float)."""
    consumers = _consumers(model.graph)
    inits = {t.name for t in model.graph.initializer}
    return [
        n
        for n in names
        if n in inits and consumers.get(n) and all(c.op_type in WEIGHT_OPS and i == 1 for c, i in consumers[n])
    ]


def channel_axis(node: onnx.NodeProto, weight_rank: int) -> int:
    """The output-channel axis of the weight at input 1 of a Conv, Gemm or MatMul node."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return weight_rank - 1
    raise ValueError(f"no weight channel axis for {node.op_type}")


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes unique names (onnxruntime's quantizer selects and excludes nodes by name)."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in used:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            used.add(name)


def integer_kernel_counts(
    model_path: str | Path, level: str = "extended"
) -> tuple[dict[str, int], list[str]]:
    """Integer-kernel node counts and all op types of the model as onnxruntime optimises it.

    The model is opened in a CPU session with ``optimized_model_filepath`` set and the saved graph
    is counted; ``level`` is "basic", "extended" or "all".
    """
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    with tempfile.TemporaryDirectory(prefix="onnxadmm-int8-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
    ops = Counter(n.op_type for n in optimized.graph.node)
    return {k: v for k, v in sorted(ops.items()) if k in INTEGER_KERNELS}, sorted(ops)


class _Reader:
    """A CalibrationDataReader over in-memory arrays, in batches."""

    def __init__(self, data: Mapping[str, np.ndarray], batch: int):
        self.data = dict(data)
        self.count = len(next(iter(self.data.values())))
        self.batch = batch
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.count:
            return None
        sl = slice(self.pos, self.pos + self.batch)
        self.pos += self.batch
        return {k: np.ascontiguousarray(v[sl]) for k, v in self.data.items()}

    def rewind(self) -> None:
        self.pos = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (item := self.get_next()) is not None:
            yield item

    def __len__(self) -> int:
        return -(-self.count // self.batch)


def _calibration(model: onnx.ModelProto, calibration: Mapping[str, np.ndarray], batch: int | None):
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    names = {i.name for i in inputs}
    missing = names - set(calibration)
    unknown = set(calibration) - names
    if missing or unknown:
        raise Int8ExportError(
            f"calibration inputs must be the graph inputs {sorted(names)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    data = {}
    counts = set()
    for inp in inputs:
        elem = inp.type.tensor_type.elem_type
        arr = np.asarray(calibration[inp.name], dtype=onnx.helper.tensor_dtype_to_np_dtype(elem))
        if arr.ndim == 0 or len(arr) == 0:
            raise Int8ExportError(f"calibration input {inp.name!r} is empty")
        data[inp.name] = arr
        counts.add(len(arr))
    if len(counts) != 1:
        raise Int8ExportError(f"calibration inputs have different sample counts: {sorted(counts)}")
    dims = inputs[0].type.tensor_type.shape.dim
    fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
    batch = batch or fixed or 64
    if fixed:  # a fixed batch dimension takes whole batches only
        if batch != fixed:
            raise Int8ExportError(
                f"the model's batch dimension is fixed at {fixed}; calibration_batch is {batch}"
            )
        usable = counts.pop() // fixed * fixed
        if usable == 0:
            raise Int8ExportError(f"calibration needs at least {fixed} samples (the model's fixed batch)")
        data = {k: v[:usable] for k, v in data.items()}
    return _Reader(data, max(1, batch))


# ----------------------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------------------


def _quantized_weight(model: onnx.ModelProto, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(int8 values, scale, zero point, axis) of the quantized form of weight ``name``."""
    inits = {t.name: t for t in model.graph.initializer}
    qname = f"{name}_quantized"
    if qname not in inits:
        raise Int8ExactnessError(f"weight {name!r}: no quantized initializer {qname!r} in the int8 model")
    for node in model.graph.node:
        for i, inp in enumerate(node.input):
            if inp != qname:
                continue
            if node.op_type == "DequantizeLinear":
                s_name, z_name = node.input[1], node.input[2] if len(node.input) > 2 else ""
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            elif node.op_type in ("QLinearConv", "QLinearMatMul", "QGemm"):
                s_name, z_name = node.input[i + 1], node.input[i + 2]
                axis = {"QLinearConv": 0, "QLinearMatMul": -1}.get(node.op_type, 0)
                if node.op_type == "QGemm":
                    axis = 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
            else:
                continue
            q = numpy_helper.to_array(inits[qname])
            scale = numpy_helper.to_array(inits[s_name])
            zp = numpy_helper.to_array(inits[z_name]) if z_name else np.zeros_like(scale, dtype=q.dtype)
            return q, scale, zp, axis % q.ndim
    raise Int8ExactnessError(f"weight {name!r}: no DequantizeLinear or QLinear node reads {qname!r}")


def _check_exact(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> None:
    for name, w in weights.items():
        q, scale, zp, axis = _quantized_weight(model, name)
        if q.dtype != np.int8 or np.any(zp != 0):
            raise Int8ExactnessError(f"weight {name!r}: stored as {q.dtype} with zero point {zp.ravel()[:4]}")
        sb = _broadcast(scale, q.ndim, axis if scale.size > 1 else None)
        deq = (q.astype(np.float32) * sb.astype(np.float32)).astype(np.float32)
        if deq.shape != w.shape or not np.array_equal(deq, w):
            diff = int(np.count_nonzero(deq != w)) if deq.shape == w.shape else w.size
            raise Int8ExactnessError(
                f"weight {name!r}: int8 values x scale differ from the given weights in {diff} of {w.size} "
                "places (onnxruntime re-derived the scale?)"
            )


def export_int8(
    model: onnx.ModelProto | str | Path,
    weights: Mapping[str, np.ndarray],
    scales: Mapping[str, np.ndarray | float],
    output_path: str | Path,
    calibration: Mapping[str, np.ndarray],
    fmt: str = "qdq",
    axes: Mapping[str, int] | None = None,
    activation_type: str = "uint8",
    calibration_batch: int | None = None,
    calibrate_method: str = "minmax",
    quantize_others: bool = False,
    quantize_activation_ops: bool = True,
    preprocess: bool = True,
    check_kernels: bool = True,
) -> dict:
    """Write int8-grid ``weights`` into ``model`` and save it statically quantized to ``output_path``.

    Args:
        model: the float model (ModelProto, not modified, or path).
        weights: float32 weight per initializer name, each equal to ``scale * n`` with integer ``n``
            in [-127, 127] (checked exactly, as float32 values: a -0.0 counts as 0); they replace
            the initializers' data. Per-channel scales follow the output-channel axis.
        scales: per name a scalar (per-tensor) or a 1-D array (one scale per output channel).
        output_path: where the int8 model is written.
        calibration: arrays by graph input name, first axis = samples (a few hundred are enough).
        fmt: "qdq" (QuantizeLinear/DequantizeLinear around float ops) or "qoperator"
            (QLinearConv / QLinearMatMul / QGemm written directly).
        axes: per-channel axis per weight name, when the consumer-derived one should be overridden.
        activation_type: "uint8" (x86 default) or "int8".
        calibration_batch: samples per calibration run (default: the model's fixed batch, else 64).
        calibrate_method: "minmax", "entropy" or "percentile" (onnxruntime's calibrators).
        quantize_others: also quantize Conv/Gemm/MatMul nodes whose weight is not given, with
            scales onnxruntime derives; by default they stay float.
        quantize_activation_ops: also quantize the weightless operators onnxruntime runs in int8
            (Relu, MaxPool, Add, GlobalAveragePool, Flatten, ...); False limits quantization to
            Conv/Gemm/MatMul (slower: more QuantizeLinear/DequantizeLinear around float ops).
        preprocess: run ``quant_pre_process`` (shape inference only) first.
        check_kernels: open the result in onnxruntime and count its integer kernels.

    Returns:
        dict with ``path``, ``format``, ``activation_type``, ``quantized_weights`` (count),
        ``per_channel_weights`` (count), ``integer_kernels`` (total integer matrix-product
        kernels after onnxruntime's optimisation), ``integer_kernel_ops`` (count per op type),
        ``op_types`` (all op types after optimisation) and ``file_bytes``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fmts = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if fmt not in fmts:
        raise Int8ExportError(f"fmt must be one of {sorted(fmts)}, not {fmt!r}")
    act_types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if activation_type not in act_types:
        raise Int8ExportError(f"activation_type must be one of {sorted(act_types)}, not {activation_type!r}")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if calibrate_method not in methods:
        raise Int8ExportError(f"calibrate_method must be one of {sorted(methods)}, not {calibrate_method!r}")
    if not weights:
        raise Int8ExportError("no weights given")
    missing_scales = sorted(set(weights) - set(scales))
    if missing_scales:
        raise Int8ExportError(f"no scale for weight(s) {missing_scales}")

    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else copy.deepcopy(model)
    graph = proto.graph
    _name_nodes(graph)
    inits = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    axes = dict(axes or {})

    # 1. Check every weight against its grid and its consumers; work out the channel axes.
    grid: dict[str, tuple[np.ndarray, np.ndarray, int | None]] = {}
    weight_nodes: set[str] = set()
    for name, value in weights.items():
        if name not in inits:
            raise Int8ExportError(f"weight {name!r} is not an initializer of the model")
        init = inits[name]
        if init.data_type != onnx.TensorProto.FLOAT:
            raise Int8ExportError(f"weight {name!r} is not float32 in the model")
        w = np.asarray(value)
        if w.dtype != np.float32:
            raise Int8ExportError(f"weight {name!r} must be float32, got {w.dtype}")
        if tuple(w.shape) != tuple(init.dims):
            raise Int8ExportError(
                f"weight {name!r} has shape {tuple(w.shape)}, the model's is {tuple(init.dims)}"
            )
        uses = consumers.get(name, [])
        bad = [f"{n.op_type}:{i}" for n, i in uses if n.op_type not in WEIGHT_OPS or i != 1]
        if not uses or bad:
            raise Int8ExportError(
                f"weight {name!r} must feed input 1 of Conv/Gemm/MatMul only; it feeds {bad or 'nothing'}"
            )
        node_axes = {channel_axis(n, w.ndim) for n, _ in uses}
        s = np.asarray(scales[name], dtype=np.float32)
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise Int8ExportError(f"weight {name!r}: scales must be finite and >= 0")
        if s.size == 1:
            axis = None
            s = s.reshape(())
        else:
            if s.ndim != 1:
                raise Int8ExportError(
                    f"weight {name!r}: a per-channel scale must be 1-D, got shape {s.shape}"
                )
            if name in axes:
                axis = axes[name] % w.ndim
            elif len(node_axes) == 1:
                axis = node_axes.pop()
            else:
                raise Int8ExportError(
                    f"weight {name!r} feeds nodes with different channel axes {sorted(node_axes)}"
                )
            if w.shape[axis] != s.size:
                raise Int8ExportError(
                    f"weight {name!r}: {s.size} scales for {w.shape[axis]} channels along axis {axis}"
                )
        _grid_integers(name, w, s, axis)
        if np.any(s == 0):
            pos = s[s > 0]
            s = np.where(s > 0, s, pos.mean(dtype=np.float32) if pos.size else np.float32(1)).astype(
                np.float32
            )
        grid[name] = (w, s, axis)
        weight_nodes.update(n.name for n, _ in uses)

    # 2. Write the weights into the model.
    for name, (w, _, _) in grid.items():
        inits[name].CopyFrom(numpy_helper.from_array(w, name))

    # 3. Overrides: exact scale, zero point 0, int8, axis for per-channel.
    per_channel_any = any(axis is not None for _, _, axis in grid.values())
    global_per_channel = fmt == "qoperator" and per_channel_any
    overrides: dict[str, list[dict]] = {}
    for name, (w, s, axis) in grid.items():
        if axis is None and global_per_channel:
            axis = channel_axis(consumers[name][0][0], w.ndim)
            s = np.full(w.shape[axis], s, dtype=np.float32)
        if axis is None:
            overrides[name] = [{"quant_type": QuantType.QInt8, "scale": np.float32(s), "zero_point": 0}]
        else:
            overrides[name] = [
                {"quant_type": QuantType.QInt8, "axis": int(axis), "scale": np.float32(c), "zero_point": 0}
                for c in s
            ]

    excluded = []
    if not quantize_others:
        excluded = [n.name for n in graph.node if n.op_type in WEIGHT_OPS and n.name not in weight_nodes]
    reader = _calibration(proto, calibration, calibration_batch)

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    left_float: list[str] = []
    with tempfile.TemporaryDirectory(prefix="onnxadmm-int8-") as tmp:
        src = Path(tmp) / "float.onnx"
        onnx.save(proto, str(src))
        if preprocess:
            src = _preprocess(src, Path(tmp) / "preprocessed.onnx", grid)
        # a tensor whose calibrated range is not finite (an attention mask of -inf) would get an
        # infinite scale and ruin the model: the nodes that read or write it stay in float, and the
        # quantization runs again (a few rounds at most: each excludes every such tensor found)
        for _ in range(4):
            reader.rewind()
            quantize_static(
                str(src),
                str(output_path),
                reader,
                quant_format=fmts[fmt],
                op_types_to_quantize=list(WEIGHT_OPS + (_ACTIVATION_OPS if quantize_activation_ops else ())),
                per_channel=global_per_channel,
                reduce_range=False,
                activation_type=act_types[activation_type],
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=methods[calibrate_method],
                extra_options={
                    "TensorQuantOverrides": overrides,
                    "QDQDisableWeightAdjustForInt32Bias": True,
                    "WeightSymmetric": True,
                },
            )
            bad = nonfinite_ranges(onnx.load(str(output_path)))
            if not bad:
                break
            touching = [n.name for n in graph.node if bad & (set(n.input) | set(n.output))]
            new = [n for n in touching if n not in excluded and n not in weight_nodes]
            if not new:
                break  # nothing left to exclude: the error below
            left_float += sorted(bad - set(left_float))
            excluded = excluded + new
        if bad:
            raise Int8ExportError(
                f"tensors {sorted(bad)[:5]} have no finite range on the calibration data; int8 export "
                "cannot represent them"
            )
    if left_float:
        log.warning("left in float (no finite range on the calibration data): %s", ", ".join(left_float))

    # 4. Exactness: int8 weight x scale == given weight, for every weight.
    quantized = onnx.load(str(output_path))
    _check_exact(quantized, {k: v[0] for k, v in grid.items()})

    result = {
        "path": str(output_path),
        "format": fmt,
        "left_float_nonfinite": left_float,
        "activation_type": activation_type,
        "quantized_weights": len(grid),
        "per_channel_weights": sum(axis is not None for _, _, axis in grid.values()),
        "file_bytes": output_path.stat().st_size,
    }
    if check_kernels:
        kernels, op_types = integer_kernel_counts(output_path)
        result["integer_kernels"] = sum(v for k, v in kernels.items() if k in INTEGER_MATMUL_KERNELS)
        result["integer_kernel_ops"] = kernels
        result["op_types"] = op_types
    return result


def nonfinite_ranges(model: onnx.ModelProto) -> set[str]:
    """Tensors that a quantized ``model`` quantizes with a scale that is not finite and positive
    (QuantizeLinear's input; a QOperator node's ``T_scale`` input names ``T``)."""
    inits = {t.name: t for t in model.graph.initializer}

    def broken(name: str) -> bool:
        t = inits.get(name)
        if t is None:
            return False
        v = numpy_helper.to_array(t)
        return v.dtype.kind == "f" and not bool(np.all(np.isfinite(v) & (v > 0)))

    bad = set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 1 and broken(n.input[1]):
            bad.add(n.input[0])
        elif n.op_type != "DequantizeLinear":
            bad.update(i[: -len("_scale")] for i in n.input if i.endswith("_scale") and broken(i))
    return bad


def _preprocess(src: Path, dst: Path, grid: Mapping[str, tuple]) -> Path:
    """onnxruntime's quant_pre_process without graph optimisation; ``src`` again if it fails or alters weights."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_optimization=True)
        processed = onnx.load(str(dst))
    except Exception as exc:  # noqa: BLE001 - any failure: quantize the model as it is
        log.warning("quant_pre_process failed (%r); quantizing without it", exc)
        return src
    inits = {t.name: t for t in processed.graph.initializer}
    for name, (w, _, _) in grid.items():
        if name not in inits or not np.array_equal(numpy_helper.to_array(inits[name]), w):
            log.warning("quant_pre_process changed weight %r; quantizing without it", name)
            return src
    return dst
