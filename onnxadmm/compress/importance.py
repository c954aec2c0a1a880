"""Which weights a layer keeps: the importance that pruning ranks them by.

``magnitude``: |w|. ``activation``: |w| times the root mean square of the input feature
that ``w`` multiplies, measured on the training data (Wanda, Sun et al. 2023; the diagonal of the
layer's input second moment, as in optimal brain surgeon approximations). A weight's share of the
layer's output is about |w| x rms(x): a large weight on an input that is almost always zero (an
image's border pixels, a channel that a ReLU leaves dead) costs nothing to remove, and magnitude
pruning keeps it while cutting weights that carry signal. Where no gradient reaches such a weight
(its input is exactly zero), ADMM training never shrinks it either. The default, ``auto``, is
``activation`` when training without labels and ``magnitude`` with labels (the pipeline decides).

The supports chosen this way are Euclidean projections in the norm ||D^1/2 (W - Z)|| with D the
inputs' mean squares: the kept values are W's own, only the ranking changes. Structured groups
(filters, channels, shapes) are ranked by the same weighted norm, which for a filter is the energy
it adds to its output channel.

The statistics are taken once, from the original model on up to :data:`SAMPLES` training samples:
per input feature of a Gemm/MatMul, per input channel of a Conv/ConvTranspose (every kernel position
of a channel gets the channel's value); per row of an embedding table (a lookup is a one-hot input
times the table, so a row's factor is the square root of its share of the lookups: rows of tokens
the data never use go first). A weight whose input cannot be matched to one of its axes
(a view chain that mixes axes, a weight used by several nodes, a layer inside a subgraph) keeps the
plain magnitude.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ..importer import analysis
from .objective import _attr

SAMPLES = 2048  # training samples the input statistics are measured on
IMPORTANCE = ("auto", "activation", "magnitude")  # auto: activation without labels, else magnitude


INDEX = "index"  # feature_input's axis for an embedding lookup: the indices pick the table's rows


def feature_input(node: onnx.NodeProto, slot: int) -> tuple[str, int] | None:
    """(the activation input, its feature axis) of ``node`` whose input ``slot`` is a weight: the
    axis whose entries the weight's input axis multiplies; None for other layer kinds."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op in ("Conv", "ConvTranspose") and slot == 1:
        return node.input[0], 1
    if op == "Gather" and slot == 0:  # an embedding table: a one-hot input times the table, rows as features
        return node.input[1], INDEX
    if op == "MatMul" and slot in (0, 1):
        return (node.input[0], -1) if slot == 1 else (node.input[1], -2)
    if op == "Gemm" and slot in (0, 1):
        if slot == 1:  # A' [M, K] = A or A^T
            return node.input[0], (0 if _attr(node, "transA", 0) else 1)
        return node.input[1], (1 if _attr(node, "transB", 0) else 0)  # B' [K, N] = B or B^T
    return None


def scale_shape(w: analysis.WeightInfo, node: onnx.NodeProto, rms: np.ndarray) -> np.ndarray | None:
    """The per-entry factor (broadcastable to ``w.shape``) that the feature RMS ``rms`` gives
    weight ``w``; None when its input axis does not match the features."""
    shape, ax = tuple(w.shape), w.in_axis
    if ax is None or not shape:
        return None
    if shape[ax] == rms.size:
        out = [1] * len(shape)
        out[ax] = rms.size
        return rms.reshape(out)
    groups = _attr(node, "group", 1) if node.op_type == "Conv" else 1
    if groups > 1 and (w.out_axis, ax) == (0, 1) and shape[1] * groups == rms.size and shape[0] % groups == 0:
        # grouped convolution: filter o of group g reads channels g*I/G .. (g+1)*I/G - 1
        per = rms.reshape(groups, 1, shape[1])
        full = np.broadcast_to(per, (groups, shape[0] // groups, shape[1])).reshape(shape[0], shape[1])
        return full.reshape(shape[:2] + (1,) * (len(shape) - 2))
    return None


def input_scales(
    model: onnx.ModelProto,
    module,
    weights: list[analysis.WeightInfo],
    inputs: dict[str, np.ndarray],
    device,
    batch_size: int = 128,
    samples: int = SAMPLES,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """{weight: factor broadcastable to it}: the RMS of each input feature over ``samples`` rows of
    ``inputs`` (the model's own input format), divided by the layer's mean RMS, for every weight in
    ``weights`` whose input feature axis can be matched (see the module docstring)."""
    nodes: dict[str, onnx.NodeProto] = {}
    names: dict[str, int] = {}
    for n in model.graph.node:
        key = n.name or n.output[0]
        names[key] = names.get(key, 0) + 1
        nodes[key] = n
    readers = analysis._consumers(model.graph)  # subgraphs' reads count on their node
    outputs = {o.name for o in model.graph.output}
    wanted: dict[str, tuple[str, int, onnx.NodeProto]] = {}
    for w in weights:
        node = nodes.get(w.node)
        shared = len(readers.get(w.name, ())) != 1 or w.name in outputs
        if node is None or names[w.node] > 1 or w.slot is None or shared:
            continue
        feat = feature_input(node, w.slot)
        if feat is not None:
            wanted[w.name] = (feat[0], feat[1], node)
    if not wanted:
        return {}
    acts = sorted({a for a, _, _ in wanted.values()})
    n = len(next(iter(inputs.values())))
    idx = np.random.default_rng(seed).permutation(n)[: min(samples, n)]
    idx.sort()
    by_name = {w.name: w for w in weights}
    sums: dict[tuple[str, int], torch.Tensor] = {}  # (activation, feature axis) -> sum of squares
    rows: dict[tuple[str, int], int] = {}
    keys: dict[str, tuple[str, int]] = {}  # weight -> the statistics it reads
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(idx), batch_size):
                part = idx[i : i + batch_size]
                xs = [torch.from_numpy(np.asarray(inputs[k][part])).to(device) for k in module.input_names]
                vals = module.values(acts, *xs)
                done = set()
                for name, (a, axis, _) in wanted.items():
                    v = vals.get(a)
                    if axis == INDEX:  # the rms of a one-hot feature: sqrt(the row's share of lookups)
                        if not torch.is_tensor(v) or v.is_floating_point():
                            continue
                        rows_n = by_name[name].shape[0]
                        key = keys[name] = (a, -1)
                        if key not in done:
                            done.add(key)
                            counts = torch.bincount(v.reshape(-1).long() % rows_n, minlength=rows_n).double()
                            sums[key] = sums[key] + counts if key in sums else counts
                            rows[key] = rows.get(key, 0) + v.numel()
                        continue
                    if not torch.is_tensor(v) or not v.is_floating_point() or v.dim() < 2:
                        continue
                    key = keys[name] = (a, axis % v.dim())
                    if key in done:  # an activation feeding several layers is counted once
                        continue
                    done.add(key)
                    x = v.detach().double().movedim(key[1], -1)
                    x = x.reshape(-1, x.shape[-1])
                    sums[key] = sums[key] + x.pow(2).sum(0) if key in sums else x.pow(2).sum(0)
                    rows[key] = rows.get(key, 0) + x.shape[0]
    finally:
        module.train(was_training)
    out = {}
    for name, key in keys.items():
        rms = np.sqrt(np.maximum((sums[key] / max(rows[key], 1)).cpu().numpy(), 0.0))
        mean = float(rms.mean())
        if not np.isfinite(mean) or mean <= 0:
            continue
        if wanted[name][1] == INDEX:
            s = (rms / mean).astype(np.float32).reshape(-1, 1)  # one factor per row of the table
        else:
            s = scale_shape(by_name[name], wanted[name][2], (rms / mean).astype(np.float32))
        if s is not None:
            out[name] = torch.from_numpy(np.array(s, dtype=np.float32)).to(device)
    return out
