"""Physically smaller layers after structured pruning: remove the channels that no longer matter.

A channel between two layers can go when every layer that reads it either gives it all-zero weights
(channel pruning), or receives a known constant there (a filter pruned whole: its output is its bias,
0 when training zeroed that too) that folds exactly into the reader's bias. The producing layer then
loses that output channel (filter, dense unit), the reader that input channel (or, after a Flatten,
the block of features the channel became), and the channel-wise ops between them (activations,
pooling, BatchNormalization, scalar arithmetic) are sliced or carry the constant along. The pass
repeats until nothing changes, as a removed input channel can leave a filter constant in turn.

What is handled: Conv and ConvTranspose (group 1), Gemm and MatMul(+Add bias) layers whose weights
are initializers that nothing else uses (a ConvTranspose reads only channels that are exactly 0
away: through a transposed kernel a constant input is not constant at the borders); between
them unary activations, Max/Average/global pooling, inference BatchNormalization and
InstanceNormalization, Dropout, Identity, Crop, scalar Mul/Add/Sub/Div, t * f(t) activations (SiLU,
HardSwish), spatial Pad, depthwise convolutions (sliced with the channel), a Concat of channels (the
layer's channels are then a slice of the readers' inputs), Transposes that move the channels last or
back (TensorFlow/Keras exports), and a Flatten (axis 1) or a Reshape to (batch, features) before a
dense layer: a constant target (initializer or Constant node) that static shapes prove flattens, or
[batch, -1] computed from a Shape (x.view(x.size(0), -1)); after a channels-last flatten a channel's
features are interleaved rather than a block.

Residual connections: an Add (Sub, Sum) of two computed branches adds channel c of one to channel
c of the other, so the layers that produce its inputs (the stem and every block's last convolution
of a ResNet stage, a projection shortcut) are walked together as one group: a channel goes from
all of them at once, when it is constant in every one (filter pruning coupled across the group,
see :func:`coupled_layers`), and the sum carries the sum of their constants on. (A depthwise
convolution's filters are coupled with the layer that feeds it the same way in training.) A channel that
reaches anything else (a sum with a graph input, a graph output, another grouped convolution, an
attention-style product) is kept. The pass edits the ModelProto directly; callers check the result
in onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..importer.analysis import _producers, node_inputs, topo_sort

__all__ = ["shrink_channels", "ShrinkResult", "coupled_layers", "coupled_readers"]


@dataclass
class ShrinkResult:
    model: onnx.ModelProto
    kept: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # weight -> axis -> kept indices
    removed: dict[str, int] = field(default_factory=dict)  # producing layer's weight -> channels removed
    blocked: dict[str, str] = field(default_factory=dict)  # layer -> what keeps its channels (a reader)


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unary(node, consts) -> callable | None:
    """numpy function of a channel-wise unary op on a constant (NaN marks non-constant channels)."""
    a = _attrs(node)
    op = node.op_type
    if op in ("Identity", "Dropout"):
        return lambda c: c
    if op == "Relu":
        return lambda c: np.where(np.isnan(c), c, np.maximum(c, 0))
    if op == "LeakyRelu":
        al = a.get("alpha", 0.01)
        return lambda c: np.where(c >= 0, c, al * c)
    if op == "Sigmoid":
        return lambda c: 1 / (1 + np.exp(-c))
    if op == "Tanh":
        return np.tanh
    if op == "Elu":
        al = a.get("alpha", 1.0)
        return lambda c: np.where(c > 0, c, al * (np.exp(c) - 1))
    if op == "Selu":
        al, ga = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
        return lambda c: ga * np.where(c > 0, c, al * (np.exp(c) - 1))
    if op == "Softplus":
        return lambda c: np.log1p(np.exp(c))
    if op == "HardSwish":
        return lambda c: c * np.clip(c / 6 + 0.5, 0, 1)
    if op == "Softsign":
        return lambda c: c / (1 + np.abs(c))
    if op in ("Abs", "Neg"):
        return np.abs if op == "Abs" else np.negative
    if op == "Mish":
        return lambda c: c * np.tanh(np.log1p(np.exp(c)))
    if op == "HardSigmoid":
        al, be = a.get("alpha", 0.2), a.get("beta", 0.5)
        return lambda c: np.clip(al * c + be, 0, 1)
    if op == "Clip":
        lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in consts:
                return None
            lo = float(consts[node.input[1]])
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in consts:
                return None
            hi = float(consts[node.input[2]])
        return lambda c: np.clip(c, lo, hi)
    if op in ("Mul", "Add", "Sub", "Div") and len(node.input) == 2:
        other = node.input[1]
        if other not in consts or consts[other].size != 1:
            return None
        k = float(consts[other].reshape(()))
        f = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op]
        return lambda c: f(c, k)
    return None


def _spatial_resize(G: _Graph, n) -> bool:
    """A Resize/Upsample that scales only the axes after the channels (constant scales of 1 on the
    batch and channel axes); one given output sizes would name the channel count: not followed."""
    a = _attrs(n)
    if n.op_type == "Upsample" and "scales" in a:  # opset 7: an attribute
        scales = np.asarray(a["scales"], dtype=np.float64)
    else:
        idx = 1 if n.op_type == "Upsample" else 2  # Resize: X, roi, scales, sizes
        if len(n.input) <= idx or not n.input[idx] or n.input[idx] not in G.values:
            return False
        if n.op_type == "Resize" and len(n.input) > 3 and n.input[3]:
            return False
        scales = G.values[n.input[idx]].astype(np.float64).reshape(-1)
    if "axes" in a:  # Resize-18: scales for the listed axes only (negative ones: rank unknown here)
        axes = list(a["axes"])
        if len(axes) != len(scales) or any(ax < 0 for ax in axes):
            return False
        return all(s == 1 for ax, s in zip(axes, scales) if ax in (0, 1))
    return scales.size >= 3 and scales[0] == 1 and scales[1] == 1


REDUCES = {"ReduceMean", "ReduceMax", "ReduceMin"}  # a constant channel reduces to the same constant


def _spatial_reduce(G: _Graph, n, t: str) -> int | None:
    """The output rank of a ReduceMean/Max/Min of ``t`` over axes after the channels only (global
    pooling as torch's dynamo exporter writes ``x.mean((2, 3))``); None if it reduces the batch or
    the channel axis, or if its axes cannot be told."""
    a = _attrs(n)
    if "axes" in a:  # before opset 18
        axes = list(a["axes"])
    elif len(n.input) > 1 and n.input[1]:
        if n.input[1] not in G.values:
            return None
        axes = [int(x) for x in G.values[n.input[1]].reshape(-1)]
    else:
        axes = []
    shape = G.shapes.get(t)
    rank = len(shape) if shape else None
    if not axes:  # every axis, unless noop_with_empty_axes makes it the identity
        return rank if a.get("noop_with_empty_axes", 0) and rank else None
    if any(x < 0 for x in axes):
        if rank is None:
            return None
        axes = [x % rank for x in axes]
    if min(axes) < 2:
        return None
    if a.get("keepdims", 1):
        return rank if rank else max(axes) + 1
    return rank - len(set(axes)) if rank else None


def _padded(attrs: dict) -> bool:
    """Whether a Conv or pooling node pads its input (explicit pads, or SAME auto-padding)."""
    return any(attrs.get("pads", [])) or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")


POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.g = g
        self.inits = {t.name: t for t in g.initializer}
        self.values = {n: numpy_helper.to_array(t) for n, t in self.inits.items()}
        # Constant nodes (a Reshape's target, a Clip bound): read-only values, never sliced
        self.const_nodes = {}
        for n in g.node:
            if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value":
                self.const_nodes[n.output[0]] = n
                self.values.setdefault(n.output[0], numpy_helper.to_array(n.attribute[0].t))
        self.consumers: dict[str, list] = {}
        self.uses: dict[str, int] = {}
        for n in g.node:
            for i in node_inputs(n):  # what If/Loop/Scan bodies read counts as a read by the node
                if i:
                    self.consumers.setdefault(i, []).append(n)
                    self.uses[i] = self.uses.get(i, 0) + 1
        self.outputs = {o.name for o in g.output}
        self.producers = _producers(g)
        self.inputs = {i.name for i in g.input}  # old exports list initializers as graph inputs too
        self.block = ""  # what stopped the last walk
        self.refresh_shapes()

    def refresh_shapes(self):
        """Static shapes, to check that a Reshape flattens (batch, channels, ...) to (batch, -1); again
        after every removal, as the channel counts change."""
        model = self.model
        try:
            # shape inference reads the nodes in file order: old exports (keras2onnx) are not sorted
            # (and the file's own value_info, e.g. dynamo exports', goes: it holds the channel counts
            # from before the removals, which inference would reject as conflicting)
            nodes = list(model.graph.node)
            order = topo_sort(nodes, {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input})
            if [id(n) for n in order] != [id(n) for n in nodes] or len(model.graph.value_info):
                model = onnx.ModelProto()
                model.CopyFrom(self.model)
                del model.graph.node[:]
                model.graph.node.extend(order)
                del model.graph.value_info[:]
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
            infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        except Exception:  # noqa: BLE001 - without shapes, only Flatten and Reshape [0, -1] are accepted
            infos = []
        self.shapes: dict[str, list] = {}
        for vi in infos:
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
                ]

    def own(self, name: str) -> bool:
        """An initializer read by exactly one node input, and not a graph input or output (so it can
        be sliced)."""
        return name in self.inits and self.uses.get(name, 0) == 1 and name not in self.outputs

    def set(self, name: str, arr: np.ndarray):
        t = self.inits[name]
        new = numpy_helper.from_array(arr.astype(self.values[name].dtype, copy=False), name)
        t.CopyFrom(new)
        self.values[name] = arr.astype(self.values[name].dtype, copy=False)
        if name in self.inputs:  # an initializer also listed as a graph input (old exports): its new shape
            self._declare(name, new)

    def _declare(self, name: str, t: onnx.TensorProto):
        vi = onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims))
        for i, old in enumerate(self.g.input):
            if old.name == name:
                self.g.input[i].CopyFrom(vi)
                return
        self.g.input.append(vi)
        self.inputs.add(name)

    def add_init(self, base: str, arr: np.ndarray) -> str:
        name, k = base, 0
        taken = set(self.inits) | {o for n in self.g.node for o in n.output} | {i.name for i in self.g.input}
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        t = numpy_helper.from_array(arr, name)
        self.g.initializer.append(t)
        if self.model.ir_version < 4:  # IR 3: every initializer is also a graph input
            self._declare(name, t)
        self.inits[name] = self.g.initializer[-1]
        self.values[name] = arr
        self.uses[name] = 1
        return name


@dataclass
class _Layer:
    """A layer whose output channels may be removed."""

    node: onnx.NodeProto
    kind: str  # conv | fc
    weight: str
    out_axis: int
    in_axis: int
    bias: str | None  # 1-D initializer, one value per output channel, or a scalar
    out: str  # the tensor the channels live in (after a bias Add)


def _producer(G: _Graph, node) -> _Layer | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    w = node.input[1]
    if not G.own(w):
        return None
    W = G.values[w]
    a = _attrs(node)
    if op in ("Conv", "ConvTranspose"):
        # Conv weight (out, in, ...); ConvTranspose (in, out, ...): output channel c is its column c,
        # and with no weight there its output is the bias everywhere (nothing overlaps)
        out_axis = 0 if op == "Conv" else 1
        if a.get("group", 1) != 1 or W.ndim < 3:
            return None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and not (G.own(bias) and G.values[bias].shape == (W.shape[out_axis],)):
            return None
        return _Layer(node, "conv", w, out_axis, 1 - out_axis, bias, node.output[0])
    if op == "Gemm" and W.ndim == 2 and not a.get("transA", 0):
        out_axis = 0 if a.get("transB", 0) else 1
        n_out = W.shape[out_axis]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            # a scalar bias is shared by every unit and stays as it is
            if not G.own(bias) or G.values[bias].size not in (1, n_out) or G.values[bias].ndim > 1:
                return None
        return _Layer(node, "fc", w, out_axis, 1 - out_axis, bias, node.output[0])
    if op == "MatMul" and W.ndim == 2:
        bias, out = None, node.output[0]
        nxt = G.consumers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type == "Add" and out not in G.outputs:
            other = [i for i in nxt[0].input if i != out]
            if len(other) == 1 and G.own(other[0]) and G.values[other[0]].shape in ((W.shape[1],), ()):
                bias, out = other[0], nxt[0].output[0]
        return _Layer(node, "fc", w, 1, 0, bias, out)
    return None


@dataclass
class _Reader:
    node: onnx.NodeProto
    kind: str  # conv | convT | gemm | matmul
    weight: str
    in_axis: int
    block: int  # features per channel (flattened conv output), else 1
    const: np.ndarray  # per-channel constant reaching it (NaN: not constant)
    foldable: bool  # a constant input channel can be folded into its bias
    bias_slot: tuple | None  # how to fold: ("conv", name|None) / ("gemm", name|None, scale) / ("add", name)
    offset: int = 0  # index of the producer's channel 0 in the reader's input channels (after a Concat)
    interleaved: bool = False  # flattened channels-last (NHWC): feature = position * channels + channel


@dataclass
class _Operand:
    """A per-channel constant of a channel-wise Add/Sub/Mul/Div: an initializer of shape (1, C, 1, ...)
    or (C, 1, ...), or an initializer of C values reshaped (Reshape with a constant target, or
    Unsqueeze) into that shape by a node that nothing else reads, as PaddlePaddle writes conv biases."""

    init: str  # the initializer holding the C values
    axis: int  # its channel axis
    reshape: onnx.NodeProto | None = None  # the Reshape/Unsqueeze between it and the arithmetic
    target_axis: int = 1  # the channel axis of the Reshape's output (and target)


def _channel_operand(G: _Graph, n, t: str, total: int) -> tuple[np.ndarray, bool, _Operand] | None:
    """For an Add/Sub/Mul/Div of ``t`` (NCHW-like, ``total`` channels on axis 1) and a per-channel
    constant: (the C constants, whether ``t`` is the first input, how to slice them); else None."""
    if n.op_type not in ("Add", "Sub", "Mul", "Div") or len(n.input) != 2 or list(n.input).count(t) != 1:
        return None
    first = n.input[0] == t
    other = n.input[1] if first else n.input[0]
    rank = len(G.shapes.get(t) or []) or None
    src, reshape = other, None
    p = G.producers.get(other)
    if other not in G.values and p is not None and p.op_type in ("Reshape", "Unsqueeze"):
        if len(G.consumers.get(other, [])) != 1 or other in G.outputs or not p.input or p.input[0] not in G.values:
            return None
        if any(i not in G.values for i in p.input[1:] if i):
            return None
        src, reshape = p.input[0], p
        shape = G.shapes.get(other)
        if not shape or any(not isinstance(d, int) for d in shape):
            return None
    elif other in G.values:
        shape = list(G.values[other].shape)
    else:
        return None
    if not G.own(src) or G.values[src].size != total:
        return None
    # the constant's shape must put its C values on t's channel axis (1) and broadcast elsewhere
    if rank is not None and len(shape) > rank:
        return None
    full = [1] * ((rank or len(shape)) - len(shape)) + list(shape)
    if len(full) < 2 or full[1] != total or any(d != 1 for i, d in enumerate(full) if i != 1):
        return None
    if reshape is None:
        axis = len(shape) - len(full) + 1
    else:
        axis = int(np.flatnonzero(np.array(G.values[src].shape) == total)[0])
        if G.values[src].ndim != 1 and any(d != 1 for i, d in enumerate(G.values[src].shape) if i != axis):
            return None
    k = G.values[src].astype(np.float64).reshape(-1)
    return k, first, _Operand(src, axis, reshape, 1 - (len(full) - len(shape)))


@dataclass
class _Chain:
    readers: list = field(default_factory=list)
    bns: list = field(default_factory=list)  # (BatchNormalization / InstanceNormalization node, offset) to slice
    reshapes: list = field(default_factory=list)  # (Reshape node, channels) whose target names the features
    operands: list = field(default_factory=list)  # (_Operand, offset): per-channel constants to slice
    depthwise: list = field(default_factory=list)  # (depthwise Conv node, offset) to slice
    tensors: list = field(default_factory=list)


def _walk(G: _Graph, layers: list[_Layer], consts: list[np.ndarray]) -> _Chain | None:
    """Follow the layers' outputs to the layers that read them; None if anything else reads them.
    Several layers whose outputs are summed (residual connections: an Add of two branches) are
    walked together: the Add passes on the sum of its inputs' constants once every input arrived."""
    chain = _Chain()
    layer = layers[0]  # (the layers of one walk are of one kind, with one channel count)
    if any(x.kind != layer.kind or c.size != consts[0].size for x, c in zip(layers, consts, strict=True)):
        G.block = "a sum of layers of different kinds or channel counts"
        return None
    # tensor, per-channel constants, flattened (False, True: one block of features per channel, or
    # "interleave": channels-last), offset of the layer's channel 0 in it, its channels, and whether
    # the channels are on the last axis (after a Transpose to NHWC, as TensorFlow/Keras exports write)
    todo = [(x.out, c, False, 0, c.size, False) for x, c in zip(layers, consts, strict=True)]
    pending: dict[int, dict] = {}  # id(sum node) -> {input index: (constants, flat, off, total, last)}
    seen = set()
    while todo:
        t, c, flat, off, total, last = todo.pop()
        G.block = f"paths that meet again at {t!r}"
        if t in seen:
            return None  # re-convergent paths: not handled
        seen.add(t)
        chain.tensors.append(t)
        G.block = f"graph output {t!r}"
        if t in G.outputs:
            return None
        readers = G.consumers.get(t, [])
        G.block = f"{t!r}, which nothing reads"
        if not readers:
            return None
        for n in readers:
            G.block = f"{n.op_type} node {n.name or n.output[0]!r}"  # the reason, if this one stops us
            if n.domain not in ("", "ai.onnx") or list(n.input).count(t) > 1:
                return None
            gate = _gate(G, n, t)
            if gate == "inner":
                continue  # the f(t) of a t * f(t) (SiLU, HardSwish): followed at the Mul
            if gate is None and _joins(G, n):  # a sum of branches: wait for every input, then go on
                got = pending.setdefault(id(n), {})
                got[list(n.input).index(t)] = (c, flat, off, total, last)
                if len(got) < len(n.input):
                    continue
                del pending[id(n)]
                metas = {v[1:] for v in got.values()}
                if len(metas) != 1:
                    return None
                parts = [got[i][0] for i in range(len(n.input))]
                with np.errstate(all="ignore"):
                    if n.op_type == "Mul":  # a 0 channel stays 0 whatever the other side
                        c = np.where((parts[0] == 0) | (parts[1] == 0), 0.0, parts[0] * parts[1])
                    else:
                        c = parts[0] - parts[1] if n.op_type == "Sub" else np.sum(parts, axis=0)
                todo.append((n.output[0], c, flat, off, total, last))
                continue
            operand = None
            if gate is None and layer.kind == "conv" and not flat and not last:
                operand = _channel_operand(G, n, t, total)
            if operand is not None:  # a per-channel constant (a bias, a scale): sliced with the channel
                k, first, how = operand
                k = k[off : off + c.size]
                with np.errstate(all="ignore"):
                    if n.op_type in ("Add", "Mul"):
                        c = c + k if n.op_type == "Add" else c * k
                    elif n.op_type == "Sub":
                        c = c - k if first else k - c
                    else:
                        c = c / k if first else k / c
                chain.operands.append((how, off))
                todo.append((n.output[0], c, flat, off, total, last))
                continue
            if n.input[0] != t and n.op_type != "Concat" and gate is None:
                return None
            op, a = n.op_type, _attrs(n)
            extra_outputs = [o for o in n.output[1:] if o and (G.consumers.get(o) or o in G.outputs)]
            if extra_outputs:
                return None
            f = _unary(n, G.values)
            if gate is not None:  # t * f(t): a channel-wise activation written as two nodes
                with np.errstate(all="ignore"):
                    todo.append((n.output[0], c * gate(c.copy()), flat, off, total, last))
            elif f is not None:
                with np.errstate(all="ignore"):
                    todo.append((n.output[0], f(c.copy()), flat, off, total, last))
            elif op in ("Resize", "Upsample") and layer.kind == "conv" and not flat and not last:
                if not _spatial_resize(G, n):
                    return None
                # interpolating a constant channel gives the constant (the weights sum to 1)
                todo.append((n.output[0], c, flat, off, total, last))
            elif op == "Crop" and layer.kind == "conv" and not flat and not last:
                todo.append((n.output[0], c, flat, off, total, last))  # (experimental op 1: a spatial crop)
            elif op in POOLS and layer.kind == "conv" and not flat and not last:
                padded = _padded(a)
                if op == "AveragePool" and padded and a.get("count_include_pad", 0):
                    c = np.where(c == 0, 0.0, np.nan)
                if op in ("LpPool", "GlobalLpPool"):
                    c = np.where(c == 0, 0.0, np.nan)
                todo.append((n.output[0], c, flat, off, total, last))
            elif op in REDUCES and layer.kind == "conv" and not flat and not last:
                rank = _spatial_reduce(G, n, t)
                if rank is None:
                    return None
                # (batch, channels) left: one feature per channel, as after a Flatten
                todo.append((n.output[0], c, True if rank == 2 else flat, off, total, last))
            elif op == "BatchNormalization" and not flat and not last and layer.node.op_type != "MatMul":
                if len(n.input) < 5 or not all(G.own(i) and G.values[i].shape == (total,) for i in n.input[1:5]):
                    return None
                if a.get("training_mode", 0):
                    return None
                s, b, m, v = (G.values[i].astype(np.float64)[off : off + c.size] for i in n.input[1:5])
                eps = a.get("epsilon", 1e-5)
                chain.bns.append((n, off))
                todo.append((n.output[0], s * (c - m) / np.sqrt(v + eps) + b, flat, off, total, last))
            elif op == "InstanceNormalization" and not flat and not last and layer.kind == "conv":
                if len(n.input) < 3 or not all(G.own(i) and G.values[i].shape == (total,) for i in n.input[1:3]):
                    return None
                # a constant channel normalises to 0: the output is the channel's bias
                b = G.values[n.input[2]].astype(np.float64)[off : off + c.size]
                chain.bns.append((n, off))
                todo.append((n.output[0], np.where(np.isnan(c), np.nan, b), flat, off, total, last))
            elif op == "Pad" and not flat and layer.kind == "conv":
                padded = _pad_of(G, n, last)
                if padded is None:
                    return None
                # constant padding keeps a channel constant only where it equals the pad value;
                # edge/reflect/wrap padding repeats the channel's own values
                todo.append((n.output[0], np.where(c == padded, c, np.nan) if np.isfinite(padded) else c, flat, off, total, last))
            elif op == "Conv" and layer.kind == "conv" and not flat and not last and _depthwise(G, n, total):
                # one filter per channel (MobileNet): a channel-wise op whose filter and bias go too
                W = G.values[n.input[1]].astype(np.float64)[off : off + c.size]
                bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
                b = G.values[bias].astype(np.float64)[off : off + c.size] if bias else np.zeros(c.size)
                padded = _padded(a)
                k = W.reshape(c.size, -1).sum(axis=1)
                # a constant through the filter: c * sum(filter) + bias, except at padded borders (0 stays 0)
                out = np.where(c == 0, b, np.nan) if padded else c * k + b
                chain.depthwise.append((n, off))
                todo.append((n.output[0], out, flat, off, total, last))
            elif op == "Flatten" and not flat and a.get("axis", 1) == 1 and layer.node.op_type != "MatMul":
                # (a Gemm's output is 2-D: Flatten is the identity)
                todo.append((n.output[0], c, "interleave" if last else True, off, total, last))
            elif op == "Reshape" and not flat and layer.kind == "conv":
                if n.input[1] in G.values:  # a constant target, rewritten after the channels go
                    if not _flattens(G, t, G.values[n.input[1]].reshape(-1), total, last):
                        return None
                    chain.reshapes.append((n, total))
                elif not _batch_flatten_target(G, n.input[1], G.producers):
                    return None  # (a computed [batch, -1] follows the tensor's own shape)
                todo.append((n.output[0], c, "interleave" if last else True, off, total, last))
            elif op == "Transpose" and not flat and layer.kind == "conv" and "perm" in a:
                # channels moved to the last axis (NCHW -> NHWC) or back; any other move is not followed
                perm = list(a["perm"])
                rank = len(perm)
                new = perm.index(rank - 1 if last else 1) if rank >= 3 else -1
                if new not in (1, rank - 1):
                    return None
                todo.append((n.output[0], c, flat, off, total, new == rank - 1))
            elif op == "Concat" and not flat and not last and a.get("axis") == 1 and layer.node.op_type != "MatMul":
                # (a MatMul's channels are its output's last axis, whatever its rank)
                # channels of several layers side by side: ours start after those of the inputs before
                counts = []
                for i in n.input:
                    shape = G.shapes.get(i) if i != t else [None, total]
                    if not shape or len(shape) < 2 or not isinstance(shape[1], int):
                        return None
                    counts.append(shape[1])
                k = list(n.input).index(t)
                todo.append((n.output[0], c, flat, off + sum(counts[:k]), sum(counts), last))
            elif op == "Shape" and not flat and not a.get("start", 0):
                # read for its batch size only (x.view(x.size(0), -1)): the channel count is not used
                if not all(_batch_index(G, g) for g in G.consumers.get(n.output[0], [])) or n.output[0] in G.outputs:
                    return None
            elif op == "Conv" and layer.kind == "conv" and not flat and not last and G.own(n.input[1]):
                if a.get("group", 1) != 1 or G.values[n.input[1]].shape[1] != total:
                    return None
                padded = _padded(a)
                bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
                if bias is not None and not G.own(bias):
                    return None
                chain.readers.append(_Reader(n, "conv", n.input[1], 1, 1, c, not padded, ("conv", bias), off))
            elif op == "ConvTranspose" and layer.kind == "conv" and not flat and not last and G.own(n.input[1]):
                # weight (in, out / group, ...): an input channel is a row; a constant one does not give
                # a constant output (the kernel overlaps unevenly), so only zero channels go
                if a.get("group", 1) != 1 or G.values[n.input[1]].shape[0] != total:
                    return None
                chain.readers.append(_Reader(n, "convT", n.input[1], 0, 1, c, False, None, off))
            elif (
                op in ("Gemm", "MatMul")
                and (flat or layer.kind == "fc" or (last and op == "MatMul"))  # (a MatMul on NHWC: a 1x1 conv)
                and len(n.input) > 1
                and G.own(n.input[1])
            ):
                W = G.values[n.input[1]]
                if W.ndim != 2:
                    return None
                if op == "Gemm":
                    if a.get("transA", 0):
                        return None
                    in_axis = 1 if a.get("transB", 0) else 0
                    bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
                    beta = a.get("beta", 1.0)
                    ok = beta != 0 and (bias is None or (G.own(bias) and G.values[bias].ndim <= 2))
                    slot = ("gemm", bias, a.get("alpha", 1.0) / beta if beta else 0.0)
                else:
                    in_axis = 0
                    nxt = G.consumers.get(n.output[0], [])
                    other = [i for i in nxt[0].input if i != n.output[0]] if len(nxt) == 1 and nxt[0].op_type == "Add" else []
                    ok = len(other) == 1 and G.own(other[0]) and n.output[0] not in G.outputs
                    slot = ("add", other[0] if ok else None)
                K = W.shape[in_axis]
                if K % total:
                    return None
                block = K // total
                if block != 1 and not flat:
                    return None
                kind = "gemm" if op == "Gemm" else "matmul"
                chain.readers.append(_Reader(n, kind, n.input[1], in_axis, block, c, ok, slot, off, flat == "interleave"))
            else:
                return None
    if pending:
        n = next(x for x in G.g.node if id(x) in pending)
        G.block = f"{n.op_type} node {n.name or n.output[0]!r} (adds a tensor from another source)"
        return None
    G.block = "no Conv/Gemm/MatMul reading it"
    return chain if chain.readers else None


def _constant(G: _Graph, name: str, depth: int = 4) -> bool:
    """Whether a tensor is a constant: an initializer (or Constant node), or a Reshape, Unsqueeze,
    Squeeze, Identity or Cast of constants (a bias reshaped for broadcasting)."""
    if name in G.values:
        return True
    p = G.producers.get(name)
    if depth == 0 or p is None or p.op_type not in ("Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast"):
        return False
    return all(_constant(G, i, depth - 1) for i in p.input if i)


def _joins(G: _Graph, n) -> bool:
    """An Add, Sub or Sum of two or more computed tensors of one shape (a residual connection), or a
    Mul of two whose channels line up (squeeze-and-excitation: a feature map times per-channel gates
    computed from it, broadcast over the positions), as opposed to arithmetic with a constant."""
    if n.op_type not in ("Add", "Sub", "Sum", "Mul") or len(n.input) < 2 or (n.op_type != "Sum" and len(n.input) != 2):
        return False
    if any(not i or _constant(G, i) for i in n.input) or len(set(n.input)) != len(n.input):
        return False
    known = [sh for sh in (G.shapes.get(i) for i in n.input) if sh is not None]

    def fits(x, y, broadcast):  # symbolic or unknown dims match anything
        return x == y or not isinstance(x, int) or not isinstance(y, int) or (broadcast and 1 in (x, y))

    def same(a, b):
        if len(a) != len(b):
            return False
        # a product may broadcast over every axis but the batch and the channels (axis 1)
        return all(fits(x, y, n.op_type == "Mul" and i > 1) for i, (x, y) in enumerate(zip(a, b)))

    if n.op_type == "Mul" and len(known) < 2:
        return False  # a product of tensors of unknown shapes may not line their channels up
    return all(same(sh, known[0]) for sh in known)


def _sums(G: _Graph, layers: dict[str, _Layer], depthwise: bool = False) -> dict[str, list[str]]:
    """{layer weight: the weights of every layer whose output channels are summed with its own}:
    the producers of each residual stream (an Add of branches joins their channels: channel c of
    one is added to channel c of the other, so both must lose it together). Found by labelling
    each layer's output and carrying the label through the channel-wise ops the walk follows."""
    label: dict[str, int] = {}  # tensor -> index of a layer's group
    parent = list(range(len(layers)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_node = {id(x.node): i for i, x in enumerate(layers.values())}
    names = list(layers)
    outs = {x.out: by_node[id(x.node)] for x in layers.values()}
    order = topo_sort(list(G.g.node), set(G.values) | G.inputs)
    for n in order:
        if not n.output:
            continue
        if n.output[0] in outs or id(n) in by_node:
            if n.output[0] in outs:
                label[n.output[0]] = outs[n.output[0]]
            continue
        ins = [label[i] for i in n.input if i in label]
        if not ins:
            continue
        if _joins(G, n):
            for i in ins[1:]:
                parent[root(i)] = root(ins[0])
            label[n.output[0]] = ins[0]
        elif (
            n.op_type in ("Add", "Sub", "Mul", "Div")
            and len(ins) == 1
            and len(n.input) == 2
            and any(_constant(G, i) for i in n.input)
        ):  # arithmetic with a constant (a bias, a scale), whichever side the constant is on
            label[n.output[0]] = ins[0]
        elif n.input[0] in label and (
            _unary(n, G.values) is not None
            or n.op_type in POOLS | {"BatchNormalization", "InstanceNormalization", "Pad", "Transpose", "Mul", "Crop"}
            or (n.op_type in ("Resize", "Upsample") and _spatial_resize(G, n))
            or (n.op_type == "Conv" and _attrs(n).get("group", 1) > 1)
        ):
            label[n.output[0]] = label[n.input[0]]
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(root(i), []).append(name)
    out = {name: groups[root(i)] for i, name in enumerate(names)}
    if depthwise:  # each depthwise convolution joins the group of the layer that feeds it
        for n in order:
            if n.op_type == "Conv" and n.input and n.input[0] in label and len(n.input) > 1:
                shape = G.values.get(n.input[1])
                if shape is not None and _depthwise(G, n, shape.shape[0]) and n.input[1] not in out:
                    group = groups[root(label[n.input[0]])]
                    group.append(n.input[1])
                    out[n.input[1]] = group
    return out


def _pad_of(G: _Graph, n, last: bool) -> float | None:
    """For a Pad node that pads neither the batch nor the channel axis: its constant value (inf for
    the edge, reflect and wrap modes, which add no new value); None for any other Pad."""
    a = _attrs(n)
    if "pads" in a:  # opset < 11
        pads, value = np.asarray(a["pads"]), a.get("value", 0.0)
    else:
        if len(n.input) < 2 or n.input[1] not in G.values or (len(n.input) > 3 and n.input[3]):
            return None  # computed pads, or an axes input
        pads = G.values[n.input[1]]
        value = 0.0
        if len(n.input) > 2 and n.input[2]:
            if n.input[2] not in G.values:
                return None
            value = float(G.values[n.input[2]].reshape(-1)[0])
    pads = pads.reshape(-1)
    rank = pads.size // 2
    if rank < 2:
        return None
    ch = rank - 1 if last else 1
    if pads[0] or pads[rank] or pads[ch] or pads[ch + rank]:
        return None
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return float(value) if mode == "constant" else np.inf


def _depthwise(G: _Graph, n, channels: int) -> bool:
    """A Conv with one filter per input channel (group = channels, weight [channels, 1, ...]) whose
    weight and bias nothing else uses."""
    if len(n.input) < 2 or not G.own(n.input[1]) or _attrs(n).get("group", 1) != channels or channels < 2:
        return False
    W = G.values[n.input[1]]
    if W.ndim < 3 or W.shape[0] != channels or W.shape[1] != 1:
        return False
    bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
    return bias is None or (G.own(bias) and G.values[bias].shape == (channels,))


def _gate(G: _Graph, n, t: str):
    """For a node reading ``t``: "inner" if it starts the f of a t * f(t), f a chain of up to four
    unary nodes each read by the next one only (SiLU as Sigmoid and Mul; HardSwish as HardSigmoid and
    Mul, or as Add 3, Clip 0..6, Div 6 and Mul as PaddlePaddle writes it); for that Mul, the function
    f; else None."""

    def chain_of(mul):
        if mul.op_type != "Mul" or len(mul.input) != 2 or list(mul.input).count(t) != 1:
            return None
        x = mul.input[1] if mul.input[0] == t else mul.input[0]
        chain = []
        for _ in range(4):
            p = G.producers.get(x)
            if p is None or not p.input or _unary(p, G.values) is None:
                return None
            if len(G.consumers.get(x, [])) != 1 or x in G.outputs:
                return None
            chain.insert(0, p)
            if p.input[0] == t:
                return chain
            x = p.input[0]
        return None

    if n.op_type == "Mul":
        chain = chain_of(n)
        if chain is not None:
            fs = [_unary(p, G.values) for p in chain]

            def f(c):
                for g in fs:
                    c = g(c)
                return c

            return f
    if _unary(n, G.values) is not None and n.output:
        x = n.output[0]
        for _ in range(4):
            readers = G.consumers.get(x, [])
            if len(readers) != 1:
                return None
            chain = chain_of(readers[0])
            if chain is not None and chain[0] is n:
                return "inner"
            if _unary(readers[0], G.values) is None or not readers[0].output:
                return None
            x = readers[0].output[0]
    return None


def _flattens(G: _Graph, t: str, target: np.ndarray, channels: int, last: bool = False) -> bool:
    """Whether Reshape(t, target) flattens a (batch, channels, ...) tensor (``last``: a (batch, ...,
    channels) one) to (batch, features): target [0, -1]; or, with ``t``'s static shape known, [-1, K]
    for K = channels x spatial size, or [B, -1] for its fixed batch B."""
    if target.size != 2:
        return False
    if target[0] == 0 and target[1] == -1:
        return True
    shape = G.shapes.get(t)
    if not shape or len(shape) < 2 or shape[-1 if last else 1] != channels:
        return False
    inner = shape[1:]
    if target[0] == -1:
        return all(isinstance(d, int) for d in inner) and int(target[1]) == int(np.prod(inner))
    return target[1] == -1 and isinstance(shape[0], int) and int(target[0]) == shape[0]


def _batch_index(G: _Graph, node) -> bool:
    """Whether ``node`` is Gather(shape, 0): it takes the batch size from a Shape's output."""
    if node.op_type != "Gather" or _attrs(node).get("axis", 0) != 0 or len(node.input) < 2:
        return False
    idx = G.values.get(node.input[1])
    return idx is not None and idx.size == 1 and int(idx.reshape(-1)[0]) == 0


def _batch_flatten_target(G: _Graph, target: str, producers: dict) -> bool:
    """Whether a computed Reshape target is [batch, -1], batch read from a Shape: what older PyTorch
    exports write for x.view(x.size(0), -1) (Shape, Gather 0, Unsqueeze, Concat with [-1])."""
    cat = producers.get(target)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or _attrs(cat).get("axis") != 0:
        return False
    tail = G.values.get(cat.input[1])
    if tail is None or tail.reshape(-1).tolist() != [-1]:
        return False
    t = cat.input[0]
    for _ in range(8):
        p = producers.get(t)
        if p is None:
            return False
        if _batch_index(G, p):
            src = producers.get(p.input[0])
            return src is not None and src.op_type == "Shape" and not _attrs(src).get("start", 0)
        if p.op_type not in ("Unsqueeze", "Cast", "Identity", "Reshape"):
            return False
        t = p.input[0]
    return False


def _features(r: _Reader, K: int, ch: int) -> np.ndarray:
    """Indices, along the reader's input axis (``K`` long), of the producer's channel ``ch``: one
    block of ``r.block`` features (channels first), or every ``K / r.block``-th (channels last)."""
    j = r.offset + ch
    if r.interleaved:
        return np.arange(r.block) * (K // r.block) + j
    return np.arange(j * r.block, (j + 1) * r.block)


def _slab(W: np.ndarray, r: _Reader, ch: int) -> np.ndarray:
    return np.take(W, _features(r, W.shape[r.in_axis], ch), axis=r.in_axis)


def _removable(G: _Graph, chain: _Chain, n_ch: int) -> list[int]:
    out = []
    for ch in range(n_ch):
        ok = True
        for r in chain.readers:
            if not np.any(_slab(G.values[r.weight], r, ch)):
                continue
            c = r.const[ch]
            if np.isnan(c) or not (c == 0 or r.foldable):
                ok = False
                break
        if ok:
            out.append(ch)
    return out


def _fold(G: _Graph, r: _Reader, dead: list[int]):
    """Add the constant input channels' contribution to the reader's bias."""
    if not r.foldable:
        return
    W = G.values[r.weight].astype(np.float64)
    if r.kind == "conv":
        n_out = W.shape[0]
        add = np.zeros(n_out)
        for ch in dead:
            c = r.const[ch]
            if c and not np.isnan(c):
                add += c * W[:, r.offset + ch].reshape(n_out, -1).sum(axis=1)
    else:
        n_out = W.shape[1 - r.in_axis]
        add = np.zeros(n_out)
        for ch in dead:
            c = r.const[ch]
            if c and not np.isnan(c):
                add += c * _slab(W, r, ch).sum(axis=r.in_axis)
    if not np.any(add):
        return
    kind, bias = r.bias_slot[0], r.bias_slot[1]
    if kind == "gemm":
        add = add * r.bias_slot[2]
    if bias is None:
        name = G.add_init(f"{r.weight}_bias", add.astype(G.values[r.weight].dtype))
        while len(r.node.input) < 3:
            r.node.input.append("")
        r.node.input[2] = name
        return
    B = G.values[bias]
    G.set(bias, (B.astype(np.float64) + add).reshape(np.broadcast_shapes(B.shape, add.shape)))


def _apply(G: _Graph, layers: list[_Layer], chain: _Chain, dead: list[int], result: ShrinkResult):
    n_ch = G.values[layers[0].weight].shape[layers[0].out_axis]
    keep = np.array([i for i in range(n_ch) if i not in set(dead)], dtype=np.int64)
    for r in chain.readers:
        _fold(G, r, dead)
        K = G.values[r.weight].shape[r.in_axis]
        gone = {int(k) for d in dead for k in _features(r, K, d)}
        cols = np.array([k for k in range(K) if k not in gone], dtype=np.int64)
        G.set(r.weight, np.take(G.values[r.weight], cols, axis=r.in_axis))
        _record(result, r.weight, r.in_axis, cols)
    for layer in layers:
        G.set(layer.weight, np.take(G.values[layer.weight], keep, axis=layer.out_axis))
        _record(result, layer.weight, layer.out_axis, keep)
        if layer.bias is not None and G.values[layer.bias].size == n_ch and n_ch > 1:
            G.set(layer.bias, G.values[layer.bias].reshape(-1)[keep])
    for bn, off in chain.bns:
        for i in bn.input[1:5] if bn.op_type == "BatchNormalization" else bn.input[1:3]:
            rest = np.array([k for k in range(G.values[i].size) if k - off not in set(dead)], dtype=np.int64)
            G.set(i, G.values[i][rest])
    for dw, off in chain.depthwise:
        for i in [x for x in dw.input[1:3] if x]:
            rest = np.array([k for k in range(G.values[i].shape[0]) if k - off not in set(dead)], dtype=np.int64)
            G.set(i, G.values[i][rest])
        for attr in dw.attribute:
            if attr.name == "group":
                attr.i -= len(dead)
    for how, off in chain.operands:
        arr = G.values[how.init]
        rest = np.array([k for k in range(arr.shape[how.axis]) if k - off not in set(dead)], dtype=np.int64)
        G.set(how.init, np.take(arr, rest, axis=how.axis))
        if how.reshape is not None and how.reshape.op_type == "Reshape":
            _retarget(G, how.reshape, how.target_axis, len(rest))
    for rs, channels in chain.reshapes:
        target = G.values[rs.input[1]].reshape(-1).copy()
        if target[1] != -1:
            target[1] = -1 if target[0] != -1 else target[1] - len(dead) * (target[1] // channels)
            old = rs.input[1]
            name = G.add_init(f"{old}_shrunk", target.astype(np.int64))
            G.uses[old] -= 1
            rs.input[1] = name
            if G.uses[old] == 0 and old not in G.outputs:  # the old target is read by nothing now
                if old in G.inits:
                    G.g.initializer.remove(G.inits.pop(old))
                    if old in G.inputs:
                        G.g.input.remove(next(i for i in G.g.input if i.name == old))
                        G.inputs.discard(old)
                elif old in G.const_nodes:
                    G.g.node.remove(G.const_nodes.pop(old))
                G.values.pop(old)
    changed = set(chain.tensors) | {x.node.output[0] for x in layers}  # (a MatMul's output before its bias Add)
    keep_vi = [vi for vi in G.g.value_info if vi.name not in changed]
    del G.g.value_info[:]
    G.g.value_info.extend(keep_vi)
    for layer in layers:
        result.removed[layer.weight] = result.removed.get(layer.weight, 0) + len(dead)


def _retarget(G: _Graph, rs, axis: int, channels: int):
    """Give a Reshape of a per-channel constant a target with ``channels`` on ``axis`` (a new
    initializer: the old target may be shared)."""
    old = rs.input[1]
    target = G.values[old].reshape(-1).astype(np.int64).copy()
    if target[axis] in (-1, 0):  # inferred, or copied from the input: nothing to change
        return
    target[axis] = channels
    name = G.add_init(f"{old}_shrunk", target)
    G.uses[old] -= 1
    rs.input[1] = name
    if G.uses[old] == 0 and old not in G.outputs and old in G.inits and old not in G.inputs:
        G.g.initializer.remove(G.inits.pop(old))
        G.values.pop(old)


def _record(result: ShrinkResult, name: str, axis: int, idx: np.ndarray):
    per = result.kept.setdefault(name, {})
    per[axis] = per[axis][idx] if axis in per else idx


def _promote_constants(model: onnx.ModelProto) -> None:
    """Turn the main graph's Constant nodes that hold a tensor (PaddlePaddle writes every weight so)
    into initializers of the same name, in place, so that they can be sliced like any weight."""
    g = model.graph
    outputs = {o.name for o in g.output}
    keep, promoted = [], []
    for n in g.node:
        if (
            n.op_type == "Constant"
            and n.domain in ("", "ai.onnx")
            and len(n.attribute) == 1
            and n.attribute[0].name == "value"
            and n.output[0] not in outputs
        ):
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            promoted.append(t)
        else:
            keep.append(n)
    if not promoted:
        return
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(promoted)
    if model.ir_version < 4:  # IR 3: every initializer is also a graph input
        g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in promoted)


def shrink_channels(model: onnx.ModelProto) -> ShrinkResult:
    """A copy of ``model`` with every removable channel removed (see the module doc); ``kept`` maps
    each sliced weight to the original indices it keeps along each sliced axis. Weights held in
    Constant nodes come out as initializers of the same name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _promote_constants(out)
    result = ShrinkResult(out)
    G = _Graph(out)
    while True:
        changed = False
        layers = _layers(G)
        sums = _sums(G, layers)
        done = set()
        for name in layers:
            if name in done:
                continue
            done.update(sums[name])
            # (afresh: folding a constant into a reader may have given that layer a bias)
            group = [_producer(G, layers[x].node) for x in sums[name]]
            if any(x is None for x in group):
                continue
            n_ch = G.values[group[0].weight].shape[group[0].out_axis]
            if n_ch < 2:
                continue
            chain = _walk(G, group, [_constants(G, x) for x in group])
            if chain is None:
                for x in group:
                    result.blocked[x.weight] = G.block
                continue
            for x in group:
                result.blocked.pop(x.weight, None)
            dead = _removable(G, chain, n_ch)
            if len(dead) == n_ch:
                dead = dead[1:]  # keep one channel: no zero-sized tensors
            if dead:
                _apply(G, group, chain, dead, result)
                G.refresh_shapes()
                changed = True
        if not changed:
            break
    if result.removed:  # a value_info of a sliced weight (dynamo exports list initializers) is stale
        inits = {t.name for t in G.g.initializer}
        keep_vi = [vi for vi in G.g.value_info if vi.name not in inits]
        del G.g.value_info[:]
        G.g.value_info.extend(keep_vi)
    return result


def _layers(G: _Graph) -> dict[str, _Layer]:
    """{weight: layer} for every layer whose output channels may be removed, in graph order."""
    out = {}
    for node in G.g.node:
        layer = _producer(G, node)
        if layer is not None and layer.weight not in out:
            out[layer.weight] = layer
    return out


def _constants(G: _Graph, layer: _Layer) -> np.ndarray:
    """Per output channel of ``layer``: the constant it outputs (its bias) where its weights are all
    zero, else NaN."""
    W = G.values[layer.weight]
    n_ch = W.shape[layer.out_axis]
    zero = ~np.moveaxis(W, layer.out_axis, 0).reshape(n_ch, -1).any(axis=1)
    if layer.bias is not None:
        B = G.values[layer.bias].astype(np.float64).reshape(-1)
        bias = B if B.size == n_ch else np.full(n_ch, B[0] if B.size else 0.0)
    else:
        bias = np.zeros(n_ch)
    if layer.node.op_type == "Gemm":
        bias = bias * _attrs(layer.node).get("beta", 1.0)
    return np.where(zero, bias, np.nan)


def _read_only_graph(model: onnx.ModelProto) -> _Graph:
    """The analysis graph of a copy of ``model`` with its Constant-node weights promoted, as
    :func:`shrink_channels` sees it (``model`` itself is left alone)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _promote_constants(m)
    return _Graph(m)


def coupled_layers(model: onnx.ModelProto) -> list[list[str]]:
    """Groups of two or more weights whose output channels go together: layers summed by residual
    connections, and each depthwise convolution with the layer that feeds it (its filter c reads
    that layer's channel c only). Filter pruning must remove the same filters from all of them for
    the channels to leave the file."""
    G = _read_only_graph(model)
    sums = _sums(G, _layers(G), depthwise=True)
    out, seen = [], set()
    for name, group in sums.items():
        if len(group) > 1 and name not in seen:
            out.append(list(group))
            seen.update(group)
    return out


def coupled_readers(model: onnx.ModelProto) -> list[list[str]]:
    """Groups of two or more weights that read the same channels one to one: the layers reading a
    layer's output, or any tensor of a residual stream (through activations, pooling, the sums). A
    channel leaves the file only when every reader gives it no weight, so channel pruning must
    remove the same input channels from all of them. Readers of a slice (after a Concat) or of a
    flattened block of features are left out."""
    G = _read_only_graph(model)
    layers = _layers(G)
    sums = _sums(G, layers, depthwise=True)
    out, seen = [], set()
    for name in layers:
        if name in seen:
            continue
        seen.update(sums[name])
        group = [layers[x] for x in sums[name] if x in layers]
        n_ch = G.values[group[0].weight].shape[group[0].out_axis]
        chain = _walk(G, group, [np.full(n_ch, np.nan)] * len(group))
        if chain is None:
            continue
        readers = []
        for r in chain.readers:
            W = G.values[r.weight]
            if r.block == 1 and r.offset == 0 and W.shape[r.in_axis] == n_ch and r.weight not in readers:
                readers.append(r.weight)
        if len(readers) > 1:
            out.append(readers)
    return out


def channel_blocks(model: onnx.ModelProto) -> dict[str, tuple[int, bool]]:
    """{dense layer weight: (channels, interleaved)}: the Gemm/MatMul layers that read a flattened
    convolution output (through activations, pooling, BatchNormalization, Flatten or a flattening
    Reshape), with that convolution's channel count. Their input features come in one block per
    channel, or, when a Transpose put the channels last before the flatten (TensorFlow/Keras
    exports), as every channels-th feature (``interleaved``); channel pruning treats each
    channel's features as one group and removes whole channels."""
    G = _Graph(model)
    out: dict[str, tuple[int, bool]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in G.values:
            continue
        W = G.values[node.input[1]]
        if W.ndim != 2 or (node.op_type == "Gemm" and _attrs(node).get("transA", 0)):
            continue
        in_axis = 1 if node.op_type == "Gemm" and _attrs(node).get("transB", 0) else 0
        t, flat, last = node.input[0], False, False
        for _ in range(64):
            p = G.producers.get(t)
            if p is None:
                break
            if p.op_type in ("Conv", "ConvTranspose") and len(p.input) > 1 and p.input[1] in G.values:
                C = G.values[p.input[1]].shape[0 if p.op_type == "Conv" else 1]
                if flat and C > 1 and W.shape[in_axis] % C == 0 and W.shape[in_axis] > C:
                    out[node.input[1]] = (int(C), last)
                break
            if p.op_type in ("Flatten", "Reshape") and not flat:
                flat = True
            elif p.op_type == "Transpose" and flat and not last:
                perm = list(_attrs(p).get("perm", []))
                if len(perm) < 3 or perm[0] != 0 or perm[-1] != 1:  # (N, C, ...) -> (N, ..., C) only
                    break
                last = True
            elif not (p.op_type in POOLS or p.op_type == "BatchNormalization" or _unary(p, G.values)):
                break
            t = p.input[0]
    return out


def removable_channels(model: onnx.ModelProto) -> dict[str, str | None]:
    """{layer weight: None if structured pruning can remove its output channels from the file, else
    what keeps them}: the question ``onnxadmm inspect`` answers before a run. A depthwise
    convolution's channels go with those of the layer that feeds it."""
    G = _read_only_graph(model)
    layers = _layers(G)
    sums = _sums(G, layers, depthwise=True)
    out: dict[str, str | None] = {}
    later = []  # depthwise convolutions: removable with the layer that feeds them
    for node in G.g.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = node.input[1]
        if w not in G.values or w in out:
            continue
        layer = _producer(G, node)
        if layer is None:
            if w in sums:
                later.append(w)
            elif node.op_type in ("Conv", "ConvTranspose") and _attrs(node).get("group", 1) != 1:
                out[w] = "a grouped convolution"
            else:
                out[w] = "its weights or bias are shared, not an initializer, or a graph output"
            continue
        group = [layers[x] for x in sums[layer.weight] if x in layers]
        n_ch = G.values[layer.weight].shape[layer.out_axis]
        chain = _walk(G, group, [np.full(n_ch, np.nan)] * len(group))
        out[w] = None if chain is not None else G.block
    for w in later:
        feeder = next(x for x in sums[w] if x in layers)
        out[w] = out.get(feeder, "a grouped convolution")
    return out
