"""Describe a model: producer, opsets, inputs/outputs, compressible layers, unsupported ops."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..importer import analysis
from ..modelio import load_model


def _vi(vi: onnx.ValueInfoProto) -> dict:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return {"name": vi.name, "dtype": vi.type.WhichOneof("value") or "?", "shape": None}
    shape = None
    if t.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return {"name": vi.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type), "shape": shape}


def describe(path) -> dict:
    from ..export.storage import expand_storage

    written = load_model(path)
    model = expand_storage(written)  # weights in onnxadmm's packed form are described as plain tensors
    outs = analysis.training_outputs(model)
    packed = sorted({t.name for t in model.graph.initializer} - {t.name for t in written.graph.initializer})
    g = model.graph
    weights = analysis.find_weights(model)
    trained = {w.name for w in analysis.find_weights(model, analysis.needed_nodes(g, outs))}
    by_node = {n.name or n.output[0]: n for n in g.node}
    direct = {w.name for w in weights if w.name in getattr(by_node.get(w.node), "input", ())}
    try:
        from ..export.shrink import coupled_layers, removable_channels

        channels = removable_channels(model)
        tied = {n: i + 1 for i, group in enumerate(coupled_layers(model)) for n in group}
    except Exception:  # noqa: BLE001 - a hint only: never fail inspect over it
        channels, tied = {}, {}
    layers = [
        {
            "name": w.name,
            "op": w.op_type,
            "node": w.node,
            "shape": list(w.shape),
            "params": w.params,
            "dtype": onnx.TensorProto.DataType.Name(w.dtype),
            # structured pruning: can its output channels leave the file? (None: yes; else what keeps them)
            "channels_kept_by": channels.get(
                w.name,
                "a recurrent layer (pruned weight by weight)"
                if w.op_type in ("RNN", "GRU", "LSTM")
                else "an embedding table (pruned weight by weight)"
                if w.op_type == "Gather"
                else "read inside an If/Loop/Scan body (channels stay in the file)"
                if w.node not in by_node
                else "read through a view or fake quantization (channels stay in the file)"
                if w.name not in direct
                else "not the weight operand of its layer",
            ),
            # layers whose channels go together (residual sums, depthwise convolutions with their
            # feeders): filter pruning keeps the same filters in every layer of a group
            "tied_group": tied.get(w.name),
            # False: read only after the training outputs (after an op training cannot go through)
            "trained": w.name in trained,
        }
        for w in weights
        if w.compressible
    ]
    others = [w for w in weights if not w.compressible]
    ops: dict[str, int] = {}
    for n in g.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        ops[key] = ops.get(key, 0) + 1
    return {
        "file": str(path) if not isinstance(path, onnx.ModelProto) else None,
        "file_bytes": Path(path).stat().st_size
        if not isinstance(path, onnx.ModelProto)
        else written.ByteSize(),
        "packed_weights": packed,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
        "opsets": {(k or "ai.onnx"): v for k, v in analysis.opset_versions(model).items()},
        "inputs": [_vi(v) for v in analysis.graph_inputs(g)],
        "outputs": [_vi(v) for v in g.output],
        "ops": ops,
        "layers": layers,
        "other_params": [
            {"name": w.name, "op": w.op_type, "role": w.role, "shape": list(w.shape), "params": w.params}
            for w in others
        ],
        "totals": {
            "compressible_layers": len(layers),
            "compressible_params": sum(x["params"] for x in layers),
            "other_trainable_params": sum(w.params for w in others),
        },
        "training_outputs": outs,
        "untrainable_outputs": analysis.untrainable_outputs(model),
        "unsupported": analysis.unsupported_ops(model),
        # those among the nodes training needs: they stop compression (the others are kept as they are)
        "unsupported_blocking": analysis.unsupported_ops(model, analysis.needed_nodes(model.graph, outs)),
    }


def format_description(d: dict) -> str:
    lines = [
        f"model      {d['file']}  ({d['file_bytes']:,} bytes)",
        f"producer   {d['producer'] or '?'}   ir {d['ir_version']}   opsets "
        + ", ".join(f"{k}:{v}" for k, v in d["opsets"].items()),
    ]
    for kind in ("inputs", "outputs"):
        for v in d[kind]:
            lines.append(f"{kind[:-1]:<10} {v['name']}  {v['dtype']}  {v['shape']}")
    lines.append("ops        " + ", ".join(f"{k}x{v}" for k, v in d["ops"].items()))
    if d.get("packed_weights"):
        lines.append(
            f"packed     {len(d['packed_weights'])} weight(s) stored by onnxadmm as codes/positions, "
            "decoded at load (ops above and layers below as decoded)"
        )
    if d["layers"]:
        w = max(len(x["name"]) for x in d["layers"])
        w = min(max(w, 5), 60)
        lines.append("")
        lines.append(f"{'layer':<{w}}  {'op':<14} {'shape':<22} {'params':>10}  output channels (--structure)")
        for x in d["layers"]:
            why = x.get("channels_kept_by")
            ch = "removable" if why is None else f"kept: {why}"
            if x.get("tied_group"):
                ch += f" (tied group {x['tied_group']})"
            if not x.get("trained", True):
                ch = "not trained, not compressed: read after the training outputs"
            lines.append(f"{x['name'][:w]:<{w}}  {x['op']:<14} {str(x['shape']):<22} {x['params']:>10,}  {ch}")
    if any(x.get("tied_group") for x in d["layers"]):
        lines.append(
            "tied groups: layers whose channels go together (summed by residual connections, or a "
            "depthwise convolution and its feeder); --structure filter keeps the same filters in each"
        )
    t = d["totals"]
    lines.append("")
    lines.append(
        f"compressible: {t['compressible_layers']} layers, {t['compressible_params']:,} weights; "
        f"biases/normalisation: {t['other_trainable_params']:,} params (not compressed)"
    )
    if not d["layers"]:
        lines.append("nothing to compress: no float weight tensors feed Conv/ConvTranspose/Gemm/MatMul")
    if d.get("untrainable_outputs"):
        after = ", ".join(sorted(set(d["untrainable_outputs"].values())))
        lines.append(
            f"training on {', '.join(d['training_outputs'])}: output(s) {', '.join(d['untrainable_outputs'])} "
            f"come after {after} and are written as they are"
        )
    blocking = {(u["op"], u["domain"]) for u in d.get("unsupported_blocking", d["unsupported"])}
    for u in d["unsupported"]:
        where = "" if (u["op"], u["domain"]) in blocking else " (after the training outputs: kept, not trained)"
        lines.append(
            f"unsupported: {u['op']} (domain {u['domain']}, opset {u['opset']}), "
            f"{u['nodes']} node(s), first '{u['first']}'{where}"
        )
    if not d["unsupported"]:
        lines.append("all operators supported")
    return "\n".join(lines)
