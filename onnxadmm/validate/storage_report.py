"""``onnxadmm report``: where the bytes of a model's compressible weights go.

For every weight feeding a Conv, ConvTranspose, Gemm or MatMul, whatever wrote the file (onnxadmm's
codebook storage, ONNX sparse initializers, int8 QDQ, plain float tensors):

- the bytes really in the file: values (or codes), positions (indices), codebooks and scales;
- the Deep Compression figure the ADMM papers quote, computed from the decoded values: values at
  ``b`` bits (``b = ceil(log2 K)`` for ``K <= 256`` distinct non-zero values, plus a ``K x 32``-bit
  codebook; otherwise the raw float width), positions as relative indices at ``r`` bits with a filler
  entry wherever a run of zeros is longer than ``2**r - 1`` (``r`` in 1..16 chosen per tensor), or no
  positions when dense storage is smaller; no container or decoder overhead;
- the compression ratios of both against the weights at fp32;
- each layer's ``layout`` (codes or raw values; dense, bitmap or relative positions; shared decoder)
  and ``bits`` per stored code (fractional where several codes are packed into one base-K number).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxAdmmError
from ..modelio import load_model

WEIGHT_INPUT = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (1,),
    "MatMul": (0, 1),
    "RNN": (1, 2),  # input and recurrence weights W, R
    "GRU": (1, 2),
    "LSTM": (1, 2),
    "Gather": (0,),  # an embedding table, when its indices are computed (token ids), not constants
}
_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _weight_names(graph: onnx.GraphProto, candidates: set[str]) -> list[str]:
    """Candidate tensors consumed as the weight operand of a Conv/ConvTranspose/Gemm/MatMul, as the W/R
    weights of a recurrent layer or as the table of an embedding lookup, in order."""
    out: list[str] = []
    consts = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    for node in graph.node:
        if node.op_type == "Gather" and (
            len(node.input) < 2 or node.input[1] in consts or any(a.name == "axis" and a.i for a in node.attribute)
        ):
            continue  # a constant lookup, or not along the table's rows
        for i in WEIGHT_INPUT.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in candidates and node.input[i] not in out:
                out.append(node.input[i])
    return out


def _decoded(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Values of tensors computed from initializers only (decoders, DequantizeLinear), by onnxruntime."""
    if not names:
        return {}
    import onnxruntime as ort

    g = model.graph
    const = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    nodes, known = [], set(const)
    for node in g.node:  # every node whose inputs are all constants, in graph order
        if node.input and all((not i) or i in known for i in node.input):
            nodes.append(node)
            known.update(node.output)
    sub = onnx.helper.make_graph(
        nodes, "decode", [], [], list(g.initializer), sparse_initializer=list(g.sparse_initializer)
    )
    m = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    m.ir_version = max(model.ir_version, 7)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    try:  # the outputs' element types (float16 weights decode to float16)
        inferred = onnx.shape_inference.infer_shapes(m)
        types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
        for vi in m.graph.output:
            if types.get(vi.name):
                vi.type.tensor_type.elem_type = types[vi.name]
    except Exception:  # noqa: BLE001 - inference is a nicety; float32 is the common case
        pass
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, {})))


def deep_compression(w: np.ndarray) -> dict:
    """Deep-Compression-style storage of ``w`` (see the module docstring), in bits and bytes: the
    cheapest of values as raw floats or as ``b``-bit codes into a codebook (when ``K <= 256``), each
    dense or sparse with ``r``-bit relative positions."""
    flat = np.asarray(w).ravel()
    n = flat.size
    nz = np.flatnonzero(flat)
    k = len(np.unique(flat[nz]))
    raw = 16 if flat.dtype == np.float16 else 32
    forms = [(raw, 0, raw)]  # (bits per stored value, codebook bits, bits per value when dense)
    if 0 < k <= 256:
        dense_bits = max(1, math.ceil(math.log2(k + (1 if len(nz) < n else 0))))
        forms.append((max(1, math.ceil(math.log2(k))), k * 32, dense_bits))
    skips = np.diff(np.concatenate([[-1], nz])) - 1 if len(nz) < n else None
    best = None
    for bits, codebook, dense in forms:
        options = [("dense", 0, 0, dense * n + codebook)]
        if skips is not None:
            for r in range(1, 17):
                fillers = int((skips // (2**r)).sum())
                options.append(("sparse", r, fillers, (len(nz) + fillers) * (bits + r) + codebook))
        for enc, r, fillers, total in options:
            if best is None or total < best["total_bits"]:
                best = {
                    "encoding": enc,
                    "value_bits": dense if enc == "dense" else bits,
                    "gap_bits": r,
                    "fillers": fillers,
                    "codebook_bits": codebook,
                    "total_bits": total,
                }
    best["bytes"] = best["total_bits"] / 8
    return best


def _param_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Element count of every initializer, sparse initializer and Constant-node tensor, by name."""
    g = model.graph
    out = {t.name: int(np.prod(t.dims)) for t in g.initializer}
    out.update({sp.values.name: int(np.prod(sp.dims)) for sp in g.sparse_initializer})
    for node in g.node:
        if node.op_type == "Constant" and node.output and node.attribute and node.attribute[0].type == 4:
            out.setdefault(node.output[0], int(np.prod(node.attribute[0].t.dims)))
    return out


QDQ_SUFFIXES = ("_DequantizeLinear_Output", "_quantized")  # of the DequantizeLinear output, the integer tensor


def _qdq_names(name: str, stored: str) -> list[str]:
    """The names a QDQ writer (ours, onnxruntime.quantization) started from: a weight ``<w>`` becomes
    ``<w>_quantized`` feeding a DequantizeLinear whose output is ``<w>_DequantizeLinear_Output``."""
    return [
        cand[: len(cand) - len(suffix)]
        for cand, suffix in zip((name, stored), QDQ_SUFFIXES, strict=True)
        if cand.endswith(suffix) and len(cand) > len(suffix)
    ]


def _original_name(name: str, stored: str, original_params: dict) -> str:
    """The weight's name in the original model (``name`` itself or a QDQ writer's source name)."""
    return next((c for c in [name, *_qdq_names(name, stored)] if c in original_params), name)


def storage_report(model_path, reference=None, original_params: dict[str, int] | None = None) -> dict:
    """Per-layer and total storage of ``model_path``'s compressible weights (see the module docstring).

    A layer made physically smaller by structured pruning is measured against its original size, taken
    from ``original_params`` ({weight name: element count}) or else from the ``reference`` model: its
    fp32 bytes and the pruning rate count the original layer's weights."""
    from ..export.storage import analyze

    path = Path(model_path)
    model = load_model(path)
    if original_params is None and reference is not None:
        original_params = _param_counts(load_model(Path(reference), load_external=False))
    original_params = original_params or {}
    g = model.graph
    entries = analyze(model)
    # int8 QDQ weights: DequantizeLinear of an integer initializer
    inits = {t.name: t for t in g.initializer}
    dq = {}
    for node in g.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            if inits[node.input[0]].data_type in _INT_TYPES:
                dq[node.output[0]] = node
    candidates = set(entries) | set(dq)
    names = _weight_names(g, candidates)
    if not names:
        raise OnnxAdmmError(f"{path}: no compressible weights (Conv/ConvTranspose/Gemm/MatMul) found")
    need = [n for n in names if n in dq or entries.get(n, {}).get("storage") == "codebook"]
    decoded = _decoded(model, need)
    layers = []
    for n in names:
        if n in dq:
            node = dq[n]
            q = inits[node.input[0]]
            parts = [inits[i] for i in node.input[1:] if i in inits]
            w = decoded[n]
            val_bytes = len(q.raw_data) or numpy_helper.to_array(q).nbytes
            scale_bytes = sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in parts)
            row = {
                "name": n,
                "storage": "int8",
                "layout": "int8 dense",
                "bits": 8,
                "bytes": {"values": val_bytes, "positions": 0, "codebook": scale_bytes},
            }
        else:
            e = entries[n]
            b = e["bytes"]
            if e["storage"] == "codebook":
                w = decoded[n]
                vb, pb, cb = b["codes"], b["positions"], b["codebook"] + b.get("graph", 0)
            else:
                t = inits.get(n)
                w = None
                if t is not None:
                    w = numpy_helper.to_array(t)
                else:
                    for sp in g.sparse_initializer:
                        if sp.values.name == n:
                            w = np.zeros(tuple(sp.dims), numpy_helper.to_array(sp.values).dtype)
                            w.flat[numpy_helper.to_array(sp.indices).ravel()] = numpy_helper.to_array(sp.values)
                if w is None:  # a Constant node
                    for node in g.node:
                        if node.op_type == "Constant" and node.output and node.output[0] == n:
                            w = numpy_helper.to_array(node.attribute[0].t)
                vb, pb, cb = b["codes"], b["positions"], b["codebook"]
            row = {
                "name": n,
                # raw values + packed positions (pruned, not quantized): "packed" rather than "codebook"
                "storage": "packed" if e.get("raw") else e["storage"],
                "layout": _layout(e),
                "bits": e.get("code_bits") or e.get("bits") or (16 if np.asarray(w).dtype == np.float16 else 32),
                "bytes": {"values": vb, "positions": pb, "codebook": cb},
            }
        w = np.asarray(w)
        row["shape"] = list(w.shape)
        row["params"] = int(w.size)
        row["nonzero"] = int(np.count_nonzero(w))
        row["distinct"] = int(len(np.unique(w[w != 0]))) if row["nonzero"] else 0
        row["bytes"]["file"] = sum(row["bytes"].values())
        stored = inits[dq[n].input[0]].name if n in dq else n
        key = _original_name(n, stored, original_params)
        if n in dq:  # named after the weight, not the DequantizeLinear output ("tensor": the graph's name)
            shown = key if key != n else next(iter(_qdq_names(n, stored)), n)
            if shown != n:
                row["name"], row["tensor"] = shown, n
        row["original_params"] = max(int(original_params.get(key, row["params"])), row["params"])
        row["fp32_bytes"] = 4 * row["original_params"]
        row["deep_compression"] = deep_compression(w.astype(np.float32) if w.dtype == np.float64 else w)
        row["ratio_file"] = row["fp32_bytes"] / max(row["bytes"]["file"], 1)
        row["ratio_theoretical"] = row["fp32_bytes"] / max(row["deep_compression"]["bytes"], 1e-9)
        layers.append(row)
    fp32 = sum(x["fp32_bytes"] for x in layers)
    file_w = sum(x["bytes"]["file"] for x in layers)
    theo = sum(x["deep_compression"]["bytes"] for x in layers)
    total = {
        "params": sum(x["params"] for x in layers),
        "original_params": sum(x["original_params"] for x in layers),
        "nonzero": sum(x["nonzero"] for x in layers),
        "fp32_bytes": fp32,
        "file_weight_bytes": file_w,
        "theoretical_bytes": theo,
        "ratio_file": fp32 / max(file_w, 1),
        "ratio_theoretical": fp32 / max(theo, 1e-9),
        "values": sum(x["bytes"]["values"] for x in layers),
        "positions": sum(x["bytes"]["positions"] for x in layers),
        "codebook": sum(x["bytes"]["codebook"] for x in layers),
    }
    total["pruning_rate"] = total["original_params"] / max(total["nonzero"], 1)
    rep = {"model": str(path), "file_bytes": path.stat().st_size, "layers": layers, "total": total}
    if reference is not None:
        ref = Path(reference)
        rep["reference"] = {"model": str(ref), "file_bytes": ref.stat().st_size}
        rep["file_ratio"] = rep["reference"]["file_bytes"] / max(rep["file_bytes"], 1)
    return rep


def _layout(e: dict) -> str:
    """How a weight's values and positions are stored, in a few words: ``codes`` (indices into a
    codebook) or ``raw`` values, then ``dense``, ``bitmap`` (one presence bit per weight) or
    ``gaps N b`` (relative positions of N bits); ``bundle`` where one decoder serves several weights;
    ``fp32``/``fp16`` and ``coo`` for plain and ONNX sparse tensors."""
    if e["storage"] != "codebook":
        width = {32: "fp32", 16: "fp16"}.get(e.get("bits"), f"{e.get('bits')}-bit")
        return f"{width} coo" if e["storage"] == "coo" else width
    region = e.get("region") or ("gaps" if e.get("sparse") else "dense")
    where = f"gaps {e['gap_bits']}b" if region == "gaps" else region
    return f"{'raw' if e.get('raw') else 'codes'} {where}" + (" bundle" if "region" in e else "")


def _bits(b: float) -> str:
    return f"{b:g}" if float(b).is_integer() else f"{b:.2f}"


def format_storage_report(rep: dict) -> str:
    w = min(max([len(x["name"]) for x in rep["layers"]] + [5]), 40)
    head = (
        f"{'layer':<{w}} {'layout':<19} {'params':>10} {'nonzero':>9} {'bits':>4} {'values':>9} "
        f"{'positions':>9} {'codebook':>8} {'file B':>9} {'x file':>8} {'theory B':>9} {'x theory':>9}"
    )
    lines = [head]
    for x in rep["layers"]:
        b = x["bytes"]
        lines.append(
            f"{x['name'][:w]:<{w}} {x.get('layout', x['storage']):<19} {x.get('original_params', x['params']):>10,} "
            f"{x['nonzero']:>9,} {_bits(x['bits']):>4} "
            f"{b['values']:>9,} {b['positions']:>9,} {b['codebook']:>8,} {b['file']:>9,} "
            f"{x['ratio_file']:>7.1f}x {x['deep_compression']['bytes']:>9,.0f} {x['ratio_theoretical']:>8.1f}x"
        )
    t = rep["total"]
    lines.append(
        f"{'total':<{w}} {'':<19} {t.get('original_params', t['params']):>10,} {t['nonzero']:>9,} {'':>4} {t['values']:>9,} "
        f"{t['positions']:>9,} {t['codebook']:>8,} {t['file_weight_bytes']:>9,} {t['ratio_file']:>7.1f}x "
        f"{t['theoretical_bytes']:>9,.0f} {t['ratio_theoretical']:>8.1f}x"
    )
    lines.append("")
    lines.append(
        f"weights: {t['fp32_bytes']:,} bytes at fp32 -> {t['file_weight_bytes']:,} in the file "
        f"({t['ratio_file']:.1f}x), {t['theoretical_bytes']:,.0f} by Deep Compression's count "
        f"({t['ratio_theoretical']:.1f}x); pruning rate {t['pruning_rate']:.1f}x"
    )
    line = f"file: {rep['file_bytes']:,} bytes"
    if rep.get("reference"):
        line += f" (reference {rep['reference']['file_bytes']:,}: {rep['file_ratio']:.1f}x smaller)"
    lines.append(line)
    lines.append(
        "theory: values at b = ceil(log2 K) bits with a K x 32-bit codebook (raw float when K > 256), "
        "positions as r-bit relative indices with filler entries (Deep Compression)"
    )
    return "\n".join(lines)


def plot_storage(rep: dict, png_path) -> Path:
    """Per-layer density and bits per value as a PNG (needs matplotlib: pip install onnxadmm[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OnnxAdmmError("--plot needs matplotlib: pip install 'onnxadmm[plot]'") from None
    names = [x["name"] for x in rep["layers"]]
    density = [x["nonzero"] / max(x["params"], 1) for x in rep["layers"]]
    bits = [x["deep_compression"]["value_bits"] for x in rep["layers"]]
    fig, ax = plt.subplots(1, 2, figsize=(max(6, 0.6 * len(names) + 4), 3.6))
    ax[0].bar(range(len(names)), density, color="tab:blue")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("density (non-zero fraction)")
    ax[1].bar(range(len(names)), bits, color="tab:orange")
    ax[1].set_ylabel("bits per stored value")
    for a in ax:
        a.set_xticks(range(len(names)))
        a.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    fig.suptitle(Path(rep["model"]).name)
    fig.tight_layout()
    out = Path(png_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
