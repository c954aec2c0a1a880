"""OnnxGraphModule: an ONNX graph run by torch, trainable, with parameters named after ONNX tensors."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..modelio import load_model
from . import analysis
from .ops.sequence import TensorSequence
from .registry import ONNX_TO_TORCH_DTYPE, GraphContext, NodeContext, _load_ops, lookup, torch_dtype

# attributes of our modules that a tensor's attribute name must not take
_RESERVED = {
    "ctx", "opsets", "output_names", "input_names", "inputs_info", "input_dtypes", "weights",
    "node_names", "formal", "implicit",
}  # fmt: skip


_PLAIN_MODULE = nn.Module()


def _sanitize(name: str, taken: set[str]) -> str:
    """A torch attribute name for an ONNX tensor name: unique, not an attribute of an nn.Module
    (an initializer may be called ``half``, ``train`` or ``training``), not one of ours, not private."""
    base = re.sub(r"\W", "_", name) or "t"
    if base[0].isdigit() or base[0] == "_":
        base = "t_" + base
    cand, k = base, 1
    while cand in taken or cand in _RESERVED or hasattr(_PLAIN_MODULE, cand):
        k += 1
        cand = f"{base}_{k}"
    taken.add(cand)
    return cand


def _fixed_batch(inputs: list[onnx.ValueInfoProto]) -> int | None:
    """The batch baked into the export: every input declares the same fixed leading dim (e.g. 1)."""
    dims = set()
    for vi in inputs:
        t = vi.type.tensor_type
        if not t.HasField("shape") or not t.shape.dim:
            return None
        d0 = t.shape.dim[0]
        if not d0.HasField("dim_value") or d0.dim_value <= 0:
            return None
        dims.add(int(d0.dim_value))
    return dims.pop() if len(dims) == 1 else None


class OnnxGraphModule(nn.Module):
    """A torch module that runs an ONNX graph.

    Float tensors feeding weight/bias/scale inputs (see :mod:`.analysis`) are ``nn.Parameter``;
    all other constants are buffers. ``onnx_name(param_name)`` and :meth:`named_onnx_parameters`
    map back to ONNX tensor names (torch forbids dots in attribute names, ONNX allows anything).

    ``outputs`` selects which tensors to return (default: the graph outputs); only the nodes and
    inputs they need are kept. float16 models compute in float32 (parameters are float32 masters).
    """

    def __init__(self, model, outputs: Sequence[str] | None = None):
        super().__init__()
        from ..export.storage import expand_storage

        model = expand_storage(load_model(model))  # weights in onnxadmm's packed form: parameters
        _load_ops()
        graph = model.graph
        self.opsets = analysis.opset_versions(model)
        self.output_names = list(outputs) if outputs else [o.name for o in graph.output]
        all_inputs = analysis.graph_inputs(graph)
        const_types = analysis.constant_types(graph)
        known = {o for n in graph.node for o in n.output} | {i.name for i in all_inputs} | set(const_types)
        for name in self.output_names:
            if name not in known:
                raise UnsupportedModelError(f"output {name!r} is not a tensor of this graph")
        nodes = analysis.needed_nodes(graph, self.output_names)
        compute_nodes = [n for n in nodes if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx"))]
        analysis.check_supported(model, compute_nodes)  # fail before any work
        needed_names = {i for n in nodes for i in analysis.node_inputs(n)} | set(self.output_names)
        self.inputs_info = [vi for vi in all_inputs if vi.name in needed_names]
        self.input_names = [vi.name for vi in self.inputs_info]
        available = set(self.input_names) | set(const_types)
        compute_nodes = analysis.topo_sort(compute_nodes, available)

        float16 = any(t == onnx.TensorProto.FLOAT16 for t, _ in const_types.values()) or any(
            vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for vi in self.inputs_info
        )
        self.ctx = GraphContext(
            fixed_batch=_fixed_batch(self.inputs_info), compute_float16_as_float32=float16
        )
        try:
            self.input_dtypes = [torch_dtype(_elem_type(vi.type), self.ctx) for vi in self.inputs_info]
        except NotImplementedError as exc:
            raise UnsupportedModelError(f"graph input of unsupported {exc}") from None

        self.weights = analysis.find_weights(model, nodes)
        weight_names = {w.name for w in self.weights}
        values = analysis.constant_values(graph)
        read = dict.fromkeys(i for n in compute_nodes for i in analysis.node_inputs(n))
        used_consts = [n for n in read if n in values]
        used_consts += [n for n in self.output_names if n in values and n not in used_consts]

        taken: set[str] = set()
        self._onnx_of: dict[str, str] = {}  # torch attribute name -> onnx name
        self._attr_of: dict[str, str] = {}  # onnx name -> torch attribute name
        slot_of: dict[str, int] = {}

        def slot(name: str) -> int:
            if name not in slot_of:
                slot_of[name] = len(slot_of)
            return slot_of[name]

        const_slots = []
        for name in used_consts:
            arr = values[name]
            t = _constant_tensor(name, arr)
            if t.dtype == torch.float16 and self.ctx.compute_float16_as_float32:
                t = t.float()
            attr = _sanitize(name, taken)
            self._onnx_of[attr] = name
            self._attr_of[name] = attr
            if name in weight_names:
                self.register_parameter(attr, nn.Parameter(t.float() if t.is_floating_point() else t))
                const_slots.append((slot(name), True, attr))
            else:
                self.register_buffer(attr, t)
                const_slots.append((slot(name), False, attr))
        self._const_slots = const_slots
        self._input_slots = [slot(n) for n in self.input_names]

        self._subgraphs = nn.ModuleList()  # If/Loop/Scan bodies: their constants move with this module
        outer = {k: v for k, v in values.items() if k not in weight_names}
        program, self.node_names = _compile(
            compute_nodes, self.opsets, self.ctx, outer, const_types, slot, self._subgraphs
        )
        self._program = program
        self._output_slots = [slot(n) for n in self.output_names]
        self._n_slots = len(slot_of)
        self._slot_of = dict(slot_of)  # every value's slot: :meth:`values` reads intermediate ones

    # ---- names -------------------------------------------------------------------------------
    def onnx_name(self, attr: str) -> str:
        return self._onnx_of[attr]

    def parameter_for(self, onnx_name: str) -> nn.Parameter:
        return self._parameters[self._attr_of[onnx_name]]

    def named_onnx_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for attr, p in self._parameters.items():
            yield self._onnx_of[attr], p

    def compressible_weights(self) -> list[analysis.WeightInfo]:
        return [w for w in self.weights if w.compressible]

    def onnx_state(self) -> dict[str, np.ndarray]:
        """Current parameter values by ONNX name, as float32 numpy arrays."""
        return {n: p.detach().cpu().float().numpy().copy() for n, p in self.named_onnx_parameters()}

    # ---- run ---------------------------------------------------------------------------------
    def forward(self, *inputs, **named):
        env = self._execute(inputs, named)
        out = [env[s] for s in self._output_slots]
        return out[0] if len(out) == 1 else tuple(out)

    def values(self, names: Sequence[str], *inputs) -> dict:
        """The tensors ``names`` (graph inputs or node outputs of the main graph that this module
        computes) on ``inputs``; names it does not compute are left out."""
        env = self._execute(inputs, {})
        return {n: env[self._slot_of[n]] for n in names if n in self._slot_of and env[self._slot_of[n]] is not None}

    def _execute(self, inputs, named) -> list:
        if named:
            inputs = tuple(inputs) + tuple(named[n] for n in self.input_names[len(inputs) :])
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        env: list = [None] * self._n_slots
        params, buffers = self._parameters, self._buffers
        for s, is_param, attr in self._const_slots:
            env[s] = params[attr] if is_param else buffers[attr]
        first = True
        for s, x, dt, vi in zip(self._input_slots, inputs, self.input_dtypes, self.inputs_info):
            if vi.type.HasField("sequence_type"):  # a list of tensors
                env[s] = TensorSequence(_as_tensor(t, dt) for t in x)
                continue
            x = _as_tensor(x, dt)
            if first:
                self.ctx.batch = int(x.shape[0]) if x.dim() else None
                first = False
            env[s] = x
        _run(self._program, env)
        return env


def _declared(t: onnx.TypeProto) -> tuple[torch.dtype | None, list[int] | None]:
    """A value's declared torch dtype and static shape (None where the file leaves them open)."""
    tt = t.tensor_type
    dtype = ONNX_TO_TORCH_DTYPE.get(tt.elem_type) if t.HasField("tensor_type") else None
    dims = list(tt.shape.dim) if t.HasField("tensor_type") and tt.HasField("shape") else None
    static = dims is not None and all(d.HasField("dim_value") for d in dims)
    return dtype, [d.dim_value for d in dims] if static else None


def _constant_tensor(name: str, arr: np.ndarray) -> torch.Tensor:
    try:
        return torch.from_numpy(np.array(arr, copy=True))
    except TypeError:
        raise UnsupportedModelError(f"constant {name!r} of type {arr.dtype} (no torch equivalent)") from None


def _elem_type(t: onnx.TypeProto) -> int:
    """A tensor's (or a sequence's tensors') element type; float when the file does not say."""
    if t.HasField("sequence_type"):
        t = t.sequence_type.elem_type
    return t.tensor_type.elem_type or onnx.TensorProto.FLOAT


def _as_tensor(x, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    return x if x.dtype == dtype else x.to(dtype)


def _run(program: list, env: list) -> None:
    """Run a compiled program over the slot list ``env`` (inputs and constants already filled)."""
    for fn, ins, outs in program:
        res = fn(*[env[i] if i >= 0 else None for i in ins])
        several = type(res) in (tuple, list)  # not a TensorSequence (a list subclass): one value
        if len(outs) == 1:
            env[outs[0]] = res[0] if several else res
        else:
            if not several:
                res = (res,)
            for o, r in zip(outs, res):
                if o >= 0:
                    env[o] = r


def _compile(
    nodes: list[onnx.NodeProto],
    opsets: dict[str, int],
    ctx: GraphContext,
    values: dict[str, np.ndarray],
    const_types: dict,
    slot,
    holder: nn.ModuleList,
) -> tuple[list, list[str]]:
    """Build each node's torch callable: ``[(fn, input slots, output slots)]`` and the node names.

    ``values``: constants known at import time that the factories may read (weights excluded: they
    train). A control-flow node's callable takes its implicit inputs (the outer tensors its bodies
    read) after its own; its bodies are built by :class:`SubgraphModule`, kept in ``holder``.
    """
    program, names = [], []
    for n in nodes:
        dom = "" if n.domain in ("", "ai.onnx") else n.domain
        opset = opsets.get(dom, 1)
        consts = {i: values[name] for i, name in enumerate(n.input) if name and name in values}
        in_dtypes = {i: const_types[name][0] for i, name in enumerate(n.input) if name in const_types}
        implicit = analysis.implicit_inputs(n) if n.attribute else []

        def build(g: onnx.GraphProto, _outer=values, _types=const_types) -> SubgraphModule:
            sub = SubgraphModule(g, opsets, ctx, _outer, _types)
            holder.append(sub)
            return sub

        nctx = NodeContext(
            node=n, opset=opset, graph=ctx, consts=consts, input_dtypes=in_dtypes,
            implicit=implicit, build_subgraph=build,
        )  # fmt: skip
        try:
            fn = lookup(n.op_type, dom, opset)(nctx)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"unsupported use of {n.op_type} (opset {opset}) at node '{nctx.name}': {exc}"
            ) from None
        ins = tuple(slot(i) if i else -1 for i in list(n.input) + implicit)
        outs = tuple(slot(o) if o else -1 for o in n.output)
        program.append((fn, ins, outs))
        names.append(nctx.name)
    return program, names


class SubgraphModule(nn.Module):
    """A body of If, Loop or Scan, run by torch: ``forward(formal_inputs, outer)`` returns its
    outputs. ``outer`` maps the names it reads from enclosing scopes (``implicit``) to tensors, so
    an outer weight used in a body trains as the outer parameter it is. The body's own initializers
    are buffers (they are not written back, so they do not train)."""

    def __init__(
        self, graph: onnx.GraphProto, opsets, ctx: GraphContext, outer_values: dict, outer_types: dict
    ):
        super().__init__()
        self.formal = [i.name for i in graph.input]
        self.implicit = analysis.outer_references(graph)
        self.output_names = [o.name for o in graph.output]
        self.output_types = [_declared(o.type) for o in graph.output]
        own_values = analysis.constant_values(graph)
        own_types = analysis.constant_types(graph)
        values = {**{k: v for k, v in outer_values.items() if k not in self.formal}, **own_values}
        types = {**{k: v for k, v in outer_types.items() if k not in self.formal}, **own_types}
        slot_of: dict[str, int] = {}

        def slot(name: str) -> int:
            if name not in slot_of:
                slot_of[name] = len(slot_of)
            return slot_of[name]

        self._formal_slots = [slot(n) for n in self.formal]
        self._implicit_slots = [slot(n) for n in self.implicit]
        self._const_slots = []
        taken: set[str] = set()
        for name, arr in own_values.items():
            t = _constant_tensor(name, arr)
            if t.dtype == torch.float16 and ctx.compute_float16_as_float32:
                t = t.float()
            attr = _sanitize(name, taken)
            self.register_buffer(attr, t)
            self._const_slots.append((slot(name), attr))
        nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx"))]
        nodes = analysis.topo_sort(nodes, set(self.formal) | set(self.implicit) | set(own_values))
        self._subgraphs = nn.ModuleList()
        self._program, self.node_names = _compile(nodes, opsets, ctx, values, types, slot, self._subgraphs)
        self._output_slots = [slot(n) for n in self.output_names]
        self._n_slots = len(slot_of)

    def empty_stack(self, k: int, axis: int, device) -> torch.Tensor:
        """The stack of zero values of output ``k`` along ``axis`` (a loop that ran zero times):
        its declared dtype and element shape, or float32 [0] where the body leaves them open."""
        dtype, shape = self.output_types[k]
        if shape is None:
            return torch.zeros((0,), dtype=dtype or torch.float32, device=device)
        shape = list(shape)
        shape.insert(axis % (len(shape) + 1), 0)
        return torch.zeros(shape, dtype=dtype or torch.float32, device=device)

    def forward(self, formal: Sequence, outer: dict) -> list:
        env: list = [None] * self._n_slots
        for s, attr in self._const_slots:
            env[s] = self._buffers[attr]
        for s, name in zip(self._implicit_slots, self.implicit):
            env[s] = outer[name]
        for s, x in zip(self._formal_slots, formal):
            env[s] = x
        _run(self._program, env)
        return [env[s] for s in self._output_slots]


def import_onnx(model, outputs: Sequence[str] | None = None) -> OnnxGraphModule:
    """Import an ONNX model (path or ModelProto) as a trainable torch module."""
    return OnnxGraphModule(model, outputs=outputs)
