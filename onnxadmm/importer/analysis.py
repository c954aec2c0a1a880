"""Static analysis of an ONNX graph: constants, topological order, trainable weights.

Nothing here needs the operator implementations, so ``inspect`` can describe any model, even one
with unsupported ops.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper

from ..errors import UnsupportedModelError

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}

# (op_type -> {input index: role}); weight roles are the compressible ones.
WEIGHT_INPUTS: dict[str, dict[int, str]] = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "DeformConv": {1: "weight", 3: "bias"},  # inputs 2 and 4 (offsets, mask) are activations
    "Gemm": {0: "weight", 1: "weight", 2: "bias"},
    "MatMul": {0: "weight", 1: "weight"},
    "BatchNormalization": {1: "scale", 2: "bias"},
    "InstanceNormalization": {1: "scale", 2: "bias"},
    "LayerNormalization": {1: "scale", 2: "bias"},
    # recurrent layers: input and recurrence weights W, R (no channel axes: pruned and quantized weight
    # by weight), biases B and LSTM peepholes P trained but not compressed
    "RNN": {1: "weight", 2: "weight", 3: "bias"},
    "GRU": {1: "weight", 2: "weight", 3: "bias"},
    "LSTM": {1: "weight", 2: "weight", 3: "bias", 7: "bias"},
    # onnxruntime's fused ops (com.microsoft; the last also in the default domain)
    "FusedMatMul": {0: "weight", 1: "weight"},
    "SkipLayerNormalization": {2: "scale", 3: "bias", 4: "bias"},
    "SkipSimplifiedLayerNormalization": {2: "scale", 3: "bias"},
    "SimplifiedLayerNormalization": {1: "scale"},
}
# com.microsoft ops whose inputs differ from a default-domain op of the same name: the fused
# Attention's packed QKV projection (default-domain Attention reads K and V there)
MS_WEIGHT_INPUTS: dict[str, dict[int, str]] = {"Attention": {1: "weight", 2: "bias"}}
PASS_THROUGH = {"Identity", "Cast"}
# Ops through which no gradient flows: an output reached only through them is not trainable.
NON_DIFFERENTIABLE = {
    "ArgMax", "ArgMin", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And",
    "Or", "Xor", "Shape", "Size", "NonZero", "IsNaN", "IsInf", "Round", "Floor", "Ceil", "Sign",
}  # fmt: skip


# Ops whose output shape depends on the data: when their input depends on the weights, the shapes of
# everything after them differ between the original and the model being trained (detections left
# by NonMaxSuppression), so those tensors cannot be training targets.
# {op: the inputs its output shape depends on (None: all)}
DATA_DEPENDENT_SHAPE: dict[str, tuple[int, ...] | None] = {
    "NonMaxSuppression": None,
    "NonZero": (0,),
    "Unique": (0,),
    "Compress": (1,),  # the condition; the data only passes through
}


@dataclass
class WeightInfo:
    """A float tensor that becomes a trainable parameter."""

    name: str  # ONNX tensor name (initializer or Constant-node output)
    op_type: str  # consuming op
    node: str  # consuming node name
    role: str  # weight | bias | scale
    shape: tuple[int, ...]
    dtype: int  # ONNX element type
    out_axis: int | None = None  # axis of output channels/filters (weights only)
    in_axis: int | None = None  # axis of input channels
    slot: int | None = None  # the consuming node's input index that the weight (or its view) feeds

    @property
    def params(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def compressible(self) -> bool:
        return self.role == "weight"


def opset_versions(model: onnx.ModelProto) -> dict[str, int]:
    out = {}
    for o in model.opset_import:
        out["" if o.domain in ("", "ai.onnx") else o.domain] = int(o.version)
    return out


def sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """Dense array of a COO sparse tensor (indices linear [NNZ] or per-dimension [NNZ, rank])."""
    values = onnx.numpy_helper.to_array(sp.values)
    idx = onnx.numpy_helper.to_array(sp.indices).astype(np.int64)
    dense = np.zeros(int(np.prod(sp.dims)) if sp.dims else 1, dtype=values.dtype)
    if idx.ndim == 2:
        idx = np.ravel_multi_index(tuple(idx.T), tuple(sp.dims))
    dense[idx] = values.reshape(-1)
    return dense.reshape(tuple(sp.dims))


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return onnx.numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
        if a.name == "sparse_value":
            return sparse_to_dense(a.sparse_tensor)
    raise UnsupportedModelError(f"Constant node {node.name!r} has no supported value attribute")


def constant_types(graph: onnx.GraphProto) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{name: (elem_type, shape)} for initializers and Constant-node outputs (no data decoded)."""
    out = {}
    for t in graph.initializer:
        out[t.name] = (t.data_type, tuple(t.dims))
    for s in graph.sparse_initializer:
        out[s.values.name] = (s.values.data_type, tuple(s.dims))
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = (a.t.data_type, tuple(a.t.dims))
                elif a.name in ("value_float", "value_floats"):
                    out[n.output[0]] = (
                        onnx.TensorProto.FLOAT,
                        () if a.name == "value_float" else (len(a.floats),),
                    )
                elif a.name in ("value_int", "value_ints"):
                    out[n.output[0]] = (
                        onnx.TensorProto.INT64,
                        () if a.name == "value_int" else (len(a.ints),),
                    )
    return out


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers (dense and sparse) and Constant-node outputs, decoded."""
    out = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for s in graph.sparse_initializer:
        out[s.values.name] = sparse_to_dense(s)
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
            out[n.output[0]] = constant_node_value(n)
    return out


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not also initializers (old IR lists weights as inputs)."""
    inits = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    return [i for i in graph.input if i.name not in inits]


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by a node's attributes (If's branches, Loop's and Scan's bodies)."""
    found = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            found.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            found.extend(a.graphs)
    return found


def outer_references(graph: onnx.GraphProto) -> list[str]:
    """Names a (sub)graph reads from its enclosing scopes: read by its nodes (or nested subgraphs)
    or listed as its outputs, but defined by none of its inputs, initializers and nodes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    defined |= {o for n in graph.node for o in n.output if o}
    refs: dict[str, None] = {}
    for n in graph.node:
        for name in node_inputs(n):
            if name and name not in defined:
                refs[name] = None
    for o in graph.output:
        if o.name not in defined:
            refs[o.name] = None
    return list(refs)


# implicit_inputs of recently seen control-flow nodes: {id(node): (node, names)}. The node is held
# so that its id cannot be reused while cached; bounded, cleared when full.
_IMPLICIT: dict[int, tuple[onnx.NodeProto, list[str]]] = {}
_IMPLICIT_MAX = 4096


def implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """The outer-scope tensors a control-flow node's subgraphs read (none for other nodes)."""
    hit = _IMPLICIT.get(id(node))
    if hit is not None and hit[0] is node:
        return list(hit[1])
    refs: dict[str, None] = {}
    for g in subgraphs(node):
        refs.update(dict.fromkeys(outer_references(g)))
    if refs:
        if len(_IMPLICIT) >= _IMPLICIT_MAX:
            _IMPLICIT.clear()
        _IMPLICIT[id(node)] = (node, list(refs))
    return list(refs)


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, explicit then implicit (outer-scope tensors its subgraphs read): what it
    depends on. Empty names (omitted optional inputs) are kept in place."""
    if not node.attribute:
        return list(node.input)
    extra = [i for i in implicit_inputs(node) if i not in node.input]
    return list(node.input) + extra


def topo_sort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, stable in the file's order; handles files whose nodes are not sorted."""
    producers = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producers[o] = i
    deps = [set() for _ in nodes]
    users = defaultdict(list)
    for i, n in enumerate(nodes):
        for name in node_inputs(n):
            if name and name not in available and name in producers and producers[name] != i:
                deps[i].add(producers[name])
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = deque(i for i, d in enumerate(deps) if not d)
    order = []
    import heapq

    heap = list(ready)
    heapq.heapify(heap)
    while heap:
        i = heapq.heappop(heap)
        order.append(i)
        for u in users[i]:
            deps[u].discard(i)
            if not deps[u]:
                heapq.heappush(heap, u)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if i not in set(order)]
        raise UnsupportedModelError(f"graph has a cycle or dangling inputs at nodes {stuck[:5]}")
    return [nodes[i] for i in order]


def needed_nodes(graph: onnx.GraphProto, outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes needed to compute ``outputs`` (file order kept)."""
    producer = {}
    for n in graph.node:
        for o in n.output:
            if o:
                producer[o] = n
    keep = set()
    stack = list(outputs)
    seen = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        n = producer.get(name)
        if n is None:
            continue
        keep.add(id(n))
        stack.extend(i for i in node_inputs(n) if i)
    return [n for n in graph.node if id(n) in keep]


def _consumers(graph) -> dict[str, list]:
    """{tensor name: the nodes that read it} (a node reading a tensor twice is listed twice)."""
    c: dict[str, list] = {}
    for n in graph.node:
        for i in node_inputs(n):
            c.setdefault(i, []).append(n)
    return c


def _producers(graph):
    p = {}
    for n in graph.node:
        for o in n.output:
            if o:
                p[o] = n
    return p


def constant_reader(graph: onnx.GraphProto):
    """A memoised ``name -> value`` of the graph's small integer constants (initializers and
    Constant-node outputs of at most 64 int32/int64 elements: a view's shape or axes), else None."""
    inits = {t.name: t for t in graph.initializer}
    const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output and n.attribute}
    cache: dict[str, np.ndarray | None] = {}

    def read(name: str) -> np.ndarray | None:
        if name not in cache:
            value = None
            if name in inits:
                t = inits[name]
                if (
                    t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
                    and math.prod(t.dims) <= 64
                ):
                    value = onnx.numpy_helper.to_array(t)
            elif name in const_nodes:
                v = constant_node_value(const_nodes[name])
                value = v if v.dtype.kind in "iu" and v.size <= 64 else None
            cache[name] = value
        return cache[name]

    return read


def resolve_source(name: str, producers: dict, consts: dict) -> str | None:
    """Follow Identity/Cast back to a constant tensor; None when ``name`` is not constant-derived."""
    seen = set()
    while name not in consts:
        if name in seen:
            return None
        seen.add(name)
        n = producers.get(name)
        if n is None or n.op_type not in PASS_THROUGH or not n.input:
            return None
        name = n.input[0]
    return name


# between a model's integer input and the Gather that looks its values up in a table
INDEX_PATH = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"}


def embedding_lookup(node: onnx.NodeProto, producers: dict, consts: dict, graph_inputs: set) -> bool:
    """Whether ``node`` is an embedding lookup: Gather along axis 0 of a 2-D float constant table
    (rows: the entries) with indices that come from a model input (token ids, through Cast, Identity
    or shape-only ops). Such a table is a weight (compressed weight by weight, no channel axes);
    other Gathers of constants (positional tables indexed by Range, anchors picked by TopK) are not."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    if any(a.name == "axis" and a.i != 0 for a in node.attribute):
        return False
    src = resolve_source(node.input[0], producers, consts)
    if src is None:
        return False
    dtype, shape = consts[src]
    if dtype not in FLOAT_TYPES or len(shape) != 2 or min(shape) < 2:
        return False
    return index_input(node.input[1], producers, graph_inputs) is not None


def index_input(name: str, producers: dict, graph_inputs: set) -> str | None:
    """The model input that the index tensor ``name`` carries the values of (through Cast, Identity
    or shape-only ops, :data:`INDEX_PATH`), or None if it is computed otherwise."""
    for _ in range(8):
        if name in graph_inputs:
            return name
        p = producers.get(name)
        if p is None or p.op_type not in INDEX_PATH or not p.input:
            return None
        name = p.input[0]
    return None


def _axes(op_type: str, idx: int, shape: tuple, node: onnx.NodeProto) -> tuple[int | None, int | None]:
    nd = len(shape)
    if op_type in ("Conv", "DeformConv"):
        return 0, 1
    if op_type == "ConvTranspose":
        return 1, 0
    if op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        if idx == 1:
            return (0, 1) if attrs.get("transB", 0) else (1, 0)
        return (1, 0) if attrs.get("transA", 0) else (0, 1)
    if op_type == "MatMul" and nd >= 2:
        return (nd - 1, nd - 2) if idx == 1 else (nd - 2, nd - 1)
    return None, None


# Shape-only ops an exporter may leave between a weight and its layer (torch without constant
# folding writes nn.Linear on 3-D input as MatMul(x, Transpose(W))): followed back to the constant.
VIEW_OPS = {"Transpose", "Unsqueeze", "Squeeze", "Reshape"}
# a quantization-aware-training export's fake quantization of a float weight (QuantizeLinear then
# DequantizeLinear with constant scales): the float weight trains (straight through the rounding)
FAKE_QUANT = {"QuantizeLinear", "DequantizeLinear"}


def resolve_view(name: str, producers: dict, consts: dict, const_value) -> tuple[str, list] | None:
    """Follow Identity/Cast, constant-operand VIEW_OPS and FAKE_QUANT from ``name`` back to a constant:
    ``(source, chain)`` with ``chain`` the view nodes from the source on, or None."""
    chain, seen = [], set()
    while name not in consts:
        n = producers.get(name)
        if name in seen or n is None or not n.input or n.op_type not in PASS_THROUGH | VIEW_OPS | FAKE_QUANT:
            return None
        if n.op_type in VIEW_OPS and any(i and const_value(i) is None for i in n.input[1:]):
            return None  # a shape computed at run time
        if n.op_type in FAKE_QUANT and any(i and i not in consts for i in n.input[1:]):
            return None  # scales computed at run time
        seen.add(name)
        chain.append(n)
        name = n.input[0]
    chain = chain[::-1]
    if not _fake_quant_pairs(chain):
        return None
    return name, chain


def _fake_quant_pairs(chain: list) -> bool:
    """Each QuantizeLinear of a weight's chain feeds a DequantizeLinear directly (Identity aside)
    and each DequantizeLinear reads one: the straight-through gradient crosses no other op."""
    ops = [n.op_type for n in chain if n.op_type != "Identity"]
    for k, op in enumerate(ops):
        if op == "QuantizeLinear" and (k + 1 == len(ops) or ops[k + 1] != "DequantizeLinear"):
            return False
        if op == "DequantizeLinear" and (k == 0 or ops[k - 1] != "QuantizeLinear"):
            return False
    return True


def _view_axes(shape, chain: list, const_value) -> tuple[list[int], list[int | None]]:
    """The shape a view chain gives ``shape``, and for each of its axes the source axis it shows
    (None: inserted, or merged by a Reshape)."""
    shape, axes = [int(d) for d in shape], list(range(len(shape)))

    def operand(n, attr):
        v = const_value(n.input[1]) if len(n.input) > 1 and n.input[1] else None
        if v is None:
            v = next((list(a.ints) for a in n.attribute if a.name == attr), None)
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]

    for n in chain:
        if n.op_type == "Transpose":
            perm = (
                next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
                or list(range(len(shape)))[::-1]
            )
            shape, axes = [shape[p] for p in perm], [axes[p] for p in perm]
        elif n.op_type == "Unsqueeze":
            new = sorted(a % (len(shape) + len(operand(n, "axes"))) for a in operand(n, "axes"))
            for a in new:
                shape.insert(a, 1)
                axes.insert(a, None)
        elif n.op_type == "Squeeze":
            given = operand(n, "axes")
            drop = {a % len(shape) for a in given} if given else {i for i, d in enumerate(shape) if d == 1}
            shape = [d for i, d in enumerate(shape) if i not in drop]
            axes = [a for i, a in enumerate(axes) if i not in drop]
        elif n.op_type == "Reshape":
            target = operand(n, "shape")
            zero_copies = not any(a.name == "allowzero" and a.i for a in n.attribute)
            target = [shape[i] if d == 0 and zero_copies else d for i, d in enumerate(target)]
            if -1 in target:
                known = math.prod(d for d in target if d != -1)
                target[target.index(-1)] = math.prod(shape) // max(known, 1)
            kept = [(d, a) for d, a in zip(shape, axes) if d != 1]
            if [d for d in target if d != 1] == [d for d, _ in kept]:
                it = iter(a for _, a in kept)
                axes = [None if d == 1 else next(it) for d in target]
            else:
                axes = [None] * len(target)
            shape = target
    return shape, axes


def find_weights(model: onnx.ModelProto, nodes: list[onnx.NodeProto] | None = None) -> list[WeightInfo]:
    """Every float constant feeding a weight/bias/scale input, plus Keras-style bias Adds.

    Keras and TensorFlow exports write a dense layer as MatMul followed by Add(bias); a float
    constant added to the output of Conv/Gemm/MatMul is treated as that layer's bias. A weight may
    reach its layer through shape-only views (:data:`VIEW_OPS`); its channel axes are then those of
    the constant itself.
    """
    graph = model.graph
    found: dict[str, WeightInfo] = {}
    const_value = constant_reader(graph)

    def add(src, op, node, role, idx, consts, chain=()):
        dtype, shape = consts[src]
        if dtype not in FLOAT_TYPES or src in found:
            return
        out_axis, in_axis = None, None
        if role == "weight":
            view, axes = _view_axes(shape, chain, const_value) if chain else (shape, list(range(len(shape))))
            out_axis, in_axis = (None if a is None else axes[a] for a in _axes(op, idx, tuple(view), node))
        found[src] = WeightInfo(src, op, node.name or node.output[0], role, shape, dtype, out_axis, in_axis, idx)

    def visit(node, producers: dict, consts: dict) -> None:
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            return
        ms = node.domain == "com.microsoft" and node.op_type in MS_WEIGHT_INPUTS
        slots = (MS_WEIGHT_INPUTS if ms else WEIGHT_INPUTS).get(node.op_type)
        if slots:
            srcs = {
                i: resolve_view(node.input[i], producers, consts, const_value)
                for i in slots
                if i < len(node.input) and node.input[i]
            }
            if node.op_type in ("MatMul", "FusedMatMul", "Gemm") and srcs.get(0) and srcs.get(1):
                srcs.pop(0)  # both constant: the right operand is the weight
            for i, src in srcs.items():
                if src is not None:
                    add(src[0], node.op_type, node, slots[i], i, consts, src[1])
        elif node.op_type == "Gather" and embedding_lookup(node, producers, consts, graph_inputs):
            add(resolve_source(node.input[0], producers, consts), "Gather", node, "weight", 0, consts)
        elif node.op_type == "Add" and len(node.input) == 2:
            for k in (0, 1):
                other = producers.get(node.input[1 - k])
                src = resolve_source(node.input[k], producers, consts)
                layer = other is not None and other.op_type in ("MatMul", "FusedMatMul", "Conv", "Gemm")
                if src is not None and layer and resolve_source(node.input[1 - k], producers, consts) is None:
                    add(src, other.op_type, node, "bias", k, consts)

    def scan(nodes, producers: dict, consts: dict) -> None:
        for node in nodes:
            visit(node, producers, consts)
            for g in subgraphs(node):  # a body sees its own names first, then the enclosing scopes'
                own = _producers(g)
                local = {i.name for i in g.input} | {t.name for t in g.initializer} | set(own)
                inner = {**{k: v for k, v in producers.items() if k not in local}, **own}
                scan(list(g.node), inner, {k: v for k, v in consts.items() if k not in local})

    graph_inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    # a body's own initializers are not trained (never weights): only the main graph's constants
    scan(list(graph.node) if nodes is None else nodes, _producers(graph), constant_types(graph))
    # a tensor also used as a weight elsewhere keeps its weight role
    return list(found.values())


def training_outputs(model: onnx.ModelProto) -> list[str]:
    """Outputs to train on: the graph outputs, except that

    - an output reached from the weights only through non-differentiable ops (e.g. an accuracy
      computed by ArgMax/Equal/ReduceMean) is replaced by the float tensors feeding those ops that
      do depend on the weights (the logits);
    - an output computed after an op whose output shape depends on weight-fed data (a detector's
      NonMaxSuppression) or after an op the importer cannot run (postprocessing in a custom domain)
      is replaced by the weight-dependent tensors that op reads (the boxes and scores): the
      original's and the trained model's detections differ in number, and an unsupported op cannot
      be built. The written file keeps those ops; :func:`untrainable_outputs` says which.
    """
    graph = model.graph
    producers = _producers(graph)
    consts = constant_types(graph)
    depends = _depends_on({w.name for w in find_weights(model)}, producers)
    untrainable = _untrainable(model, depends)
    targets: list[str] = []
    for out in graph.output:
        found = (
            _frontier(out.name, producers, untrainable, depends) if out.name in untrainable else [out.name]
        )
        targets.extend(t for t in found if t not in targets)
    result: list[str] = []
    for name in targets:
        cut: list[str] = []
        if _differentiable_path(name, producers, consts, depends, cut):
            cut = [name]
        result.extend(c for c in cut if c not in result)
    return result or [o.name for o in graph.output]


def _depends_on(weights: set[str], producers: dict):
    """A memoised test: does a tensor depend on any of ``weights``?"""
    cache: dict[str, bool] = {}

    def depends(name: str) -> bool:
        stack, active = [(name, False)], set()  # iterative post-order DFS: graphs can be deep
        while stack:
            v, children_done = stack.pop()
            if v in cache:
                continue
            n = producers.get(v)
            if v in weights or n is None:
                cache[v] = v in weights
            elif children_done:
                cache[v] = any(cache.get(i, False) for i in node_inputs(n) if i)
            elif v not in active:  # (active again: a cycle, which a valid graph has not)
                active.add(v)
                stack.append((v, True))
                stack.extend((i, False) for i in node_inputs(n) if i and i not in cache)
        return cache[name]

    return depends


def _untrainable(model: onnx.ModelProto, depends) -> dict[str, str]:
    """{tensor: the op that makes it no training target}: the outputs of ops the importer cannot
    run, and of DATA_DEPENDENT_SHAPE ops whose shape-deciding inputs depend on the weights (also
    inside an If/Loop/Scan body: then the control-flow node's outputs), and everything computed
    from them."""
    graph = model.graph
    opaque = _unsupported_nodes(model)
    ragged = {id(n): op for n in graph.node if (op := _data_dependent(n)) is not None}
    if not opaque and not ragged:
        return {}
    why: dict[str, str] = {}
    for n in topo_sort(list(graph.node), {i.name for i in graph.input} | set(constant_types(graph))):
        ins = node_inputs(n)
        reason = next((why[i] for i in ins if i in why), None)
        if reason is None and id(n) in opaque:
            reason = f"{n.op_type} (not supported for training)"
        if reason is None and id(n) in ragged:
            slots = DATA_DEPENDENT_SHAPE.get(n.op_type) if n.op_type == ragged[id(n)] else None
            deciding = [ins[i] for i in slots if i < len(ins)] if slots is not None else ins
            if any(i and depends(i) for i in deciding):
                reason = ragged[id(n)]
        if reason is not None:
            why.update((o, reason) for o in n.output if o)
    return why


def _data_dependent(node: onnx.NodeProto) -> str | None:
    """The DATA_DEPENDENT_SHAPE op a node is or holds in its bodies (recursively), or None."""
    if node.op_type in DATA_DEPENDENT_SHAPE:
        return node.op_type
    for g in subgraphs(node):
        for m in g.node:
            if (op := _data_dependent(m)) is not None:
                return op
    return None


def _unsupported_nodes(model: onnx.ModelProto) -> set[int]:
    """ids of the graph's nodes that the importer cannot run (or whose bodies hold such a node)."""
    opsets = opset_versions(model)

    def runnable(n) -> bool:
        return _registered(n, opsets) and all(runnable(m) for g in subgraphs(n) for m in g.node)

    return {id(n) for n in model.graph.node if not runnable(n)}


def _frontier(name: str, producers: dict, untrainable: dict, depends) -> list[str]:
    """The computed, weight-dependent tensors that the untrainable tensor ``name`` comes from and
    that are no longer untrainable themselves (a detector's boxes and scores before its NMS)."""
    found: dict[str, None] = {}
    stack, seen = [name], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        n = producers.get(v)
        for i in node_inputs(n) if n is not None else []:
            if i in untrainable:
                stack.append(i)
            elif i and i in producers and depends(i):
                found[i] = None
    return list(found)


def untrainable_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """{graph output: the op that makes it no training target} (see :func:`training_outputs`)."""
    weights = {w.name for w in find_weights(model)}
    producers = _producers(model.graph)
    why = _untrainable(model, _depends_on(weights, producers))
    return {o.name: why[o.name] for o in model.graph.output if o.name in why}


def _differentiable_path(name, producers, consts, depends, cut) -> bool:
    """True when a gradient can flow from ``name`` back to a weight. On the way, behind each
    non-differentiable op (and chains of them, e.g. Equal <- ArgMax), collect in ``cut`` the first
    weight-dependent tensors produced by differentiable ops: those are the training outputs."""
    seen = set()
    stack = [(name, False)]
    ok = False
    while stack:
        v, cutting = stack.pop()
        if (v, cutting) in seen:
            continue
        seen.add((v, cutting))
        n = producers.get(v)
        if n is None:
            if not cutting and v in consts and depends(v):
                ok = True
            continue
        if n.op_type in NON_DIFFERENTIABLE:
            stack.extend((i, True) for i in node_inputs(n) if i)
        elif cutting:
            if depends(v) and v not in cut:
                cut.append(v)
        else:
            stack.extend((i, False) for i in node_inputs(n) if i)
    return ok


def _registered(node: onnx.NodeProto, opsets: dict[str, int]) -> bool:
    """Whether the registry runs ``node``'s op at the model's opset (Constant is always taken)."""
    from .registry import _load_ops, lookup

    _load_ops()
    dom = "" if node.domain in ("", "ai.onnx") else node.domain
    return (node.op_type == "Constant" and dom == "") or lookup(
        node.op_type, dom, opsets.get(dom, 1)
    ) is not None


def unsupported_ops(model: onnx.ModelProto, nodes: list[onnx.NodeProto] | None = None) -> list[dict]:
    """[{op, domain, opset, nodes, first}] for every op the registry cannot run at the model's opset."""
    opsets = opset_versions(model)
    missing: dict[tuple[str, str], list[str]] = {}
    stack = list(model.graph.node if nodes is None else nodes)[::-1]
    while stack:  # the nodes of If/Loop/Scan bodies too
        n = stack.pop()
        stack.extend(m for g in subgraphs(n) for m in reversed(g.node))
        if not _registered(n, opsets):
            dom = "" if n.domain in ("", "ai.onnx") else n.domain
            missing.setdefault((dom, n.op_type), []).append(n.name or n.output[0])
    return [
        {
            "op": op,
            "domain": dom or "ai.onnx",
            "opset": opsets.get(dom),
            "nodes": len(names),
            "first": names[0],
        }
        for (dom, op), names in missing.items()
    ]


def check_supported(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Raise one UnsupportedModelError naming every unsupported op, its domain/opset, a node and the count."""
    missing = unsupported_ops(model, nodes)
    if missing:
        parts = [
            f"{m['op']} (domain '{m['domain']}', opset {m['opset']}) at node '{m['first']}', "
            f"{m['nodes']} node{'s' if m['nodes'] != 1 else ''} affected"
            for m in missing
        ]
        raise UnsupportedModelError("unsupported operator: " + "; ".join(parts))


def biases_of(model: onnx.ModelProto) -> dict[str, list[str]]:
    """{compressible weight name: the per-output-channel constants to zero with a removed filter}: the
    layer's bias (a Conv, ConvTranspose or Gemm bias input, or the constant of an ``Add`` right after a
    Conv/Gemm/MatMul, as Keras and TF write it) and, for a layer whose only reader is an inference
    BatchNormalization, that BN's scale and bias (so a removed filter's channel is exactly 0 after
    BN too: BN(0) = scale * (0 - mean) / std + bias). Only 1-D constants that no other node uses; a
    weight shared by several layers gets none."""
    graph = model.graph
    consts = constant_types(graph)
    producers = _producers(graph)
    consumers = _consumers(graph)
    const_value = constant_reader(graph)
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            src = resolve_source(i, producers, consts) if i else None
            if src is not None:
                uses[src] = uses.get(src, 0) + 1

    def own_1d(name: str | None) -> bool:
        return name is not None and uses.get(name) == 1 and len(consts[name][1]) == 1

    out: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain not in (
            "",
            "ai.onnx",
        ):
            continue
        w = layer_weight(node, producers, consts, const_value)
        if w is None or uses.get(w) != 1:
            continue
        found, tail = [], node.output[0]
        if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
            bias = resolve_source(node.input[2], producers, consts)
            if own_1d(bias):
                found.append(bias)
        else:
            nxt = consumers.get(tail, [])
            if len(nxt) == 1 and nxt[0].op_type == "Add" and len(nxt[0].input) == 2:
                other = [i for i in nxt[0].input if i != tail]
                bias = resolve_source(other[0], producers, consts) if other else None
                if own_1d(bias):
                    found.append(bias)
                    tail = nxt[0].output[0]
        nxt = consumers.get(tail, [])
        if node.op_type == "Conv" and len(nxt) == 1 and nxt[0].op_type == "BatchNormalization":
            bn = nxt[0]
            params = (
                [resolve_source(i, producers, consts) for i in bn.input[1:3]] if len(bn.input) >= 3 else []
            )
            if len(params) == 2 and all(own_1d(p) for p in params) and bn.input[0] == tail:
                found += params
        if found:
            out[w] = found
    return out


def layer_weight(node: onnx.NodeProto, producers: dict, consts: dict, const_value) -> str | None:
    """The constant a Conv/ConvTranspose/Gemm/MatMul node reads as its weight (input 1; a Gemm's
    or MatMul's input 0 when only that one is constant), through views as :func:`find_weights`
    follows them; None for other nodes."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
        return None
    found = [resolve_view(i, producers, consts, const_value) if i else None for i in node.input[:2]]
    if len(found) > 1 and found[1] is not None:
        return found[1][0]
    return found[0][0] if found and found[0] is not None and node.op_type != "Conv" else None


def last_layers(model: onnx.ModelProto, weights: list[WeightInfo]) -> set[str]:
    """Compressible weights whose layer's output reaches no other compressible layer: the classifier
    heads, whose output units (the classes) filter pruning must not remove."""
    graph = model.graph
    consumers = _consumers(graph)
    layer_nodes: dict[int, str] = {}
    by_name = {w.name for w in weights if w.compressible}
    producers = _producers(graph)
    consts = constant_types(graph)
    const_value = constant_reader(graph)
    for n in graph.node:
        w = layer_weight(n, producers, consts, const_value)
        if w is None:  # recurrent layers and the fused ops read their weights at other inputs
            w = next(
                (s for i in n.input if i and (s := resolve_source(i, producers, consts)) in by_name), None
            )
            w = w if n.op_type in WEIGHT_INPUTS or n.domain == "com.microsoft" else None
        if w in by_name:
            layer_nodes[id(n)] = w
    out = set()
    for n in graph.node:
        w = layer_nodes.get(id(n))
        if w is None:
            continue
        stack, seen, reaches = list(n.output), set(), False
        while stack and not reaches:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in consumers.get(t, []):
                if id(c) in layer_nodes and layer_nodes[id(c)] != w:
                    reaches = True
                    break
                stack.extend(c.output)
        if not reaches:
            out.add(w)
    return out
