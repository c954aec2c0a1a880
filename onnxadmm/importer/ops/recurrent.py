"""Recurrent operators: RNN, GRU, LSTM (opset 7; ``layout`` from opset 14).

One function serves the three: the input projection ``X W^T + Wb`` of every time step is computed at
once, then the steps run in a Python loop (autograd follows it), one pass per direction. Follows the
ONNX operator specification, checked against onnxruntime (tests/test_ops_recurrent.py):

- gate order: RNN one gate; GRU ``z, r, h``; LSTM ``i, o, f, c``, peepholes ``P = [Pi, Po, Pf]``;
- ``B`` holds ``[Wb, Rb]``; missing ``B``, ``initial_h``/``initial_c`` and ``P`` are zeros;
- ``activations`` (per direction: RNN ``f``, GRU ``f, g``, LSTM ``f, g, h``) with
  ``activation_alpha``/``activation_beta`` consumed in order by the functions that take them;
- ``clip`` bounds the gates' pre-activations to ``[-clip, clip]``;
- GRU ``linear_before_reset``: the reset gate multiplies ``H R_h^T + Rb_h`` instead of ``H``;
- LSTM ``input_forget``: the forget gate is ``1 - i`` (coupled with the input gate, as onnxruntime
  computes it);
- ``sequence_lens``: steps at or past a sample's length leave its state unchanged and output 0, so
  ``Y_h``/``Y_c`` hold the state at its last step (the reverse pass starts at that step);
- ``layout`` 0: ``X [seq, batch, input]``, ``Y [seq, dirs, batch, hidden]``, ``Y_h [dirs, batch,
  hidden]``; 1: ``X [batch, seq, input]``, ``Y [batch, seq, dirs, hidden]``, ``Y_h [batch, dirs,
  hidden]`` (onnxruntime 1.32 refuses layout 1; it is checked against onnx's reference evaluator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import NodeContext, register

_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
# activation -> (takes alpha, takes beta, default alpha, default beta)
_PARAMS = {
    "affine": (True, True, 1.0, 0.0),
    "leakyrelu": (True, False, 0.01, 0.0),
    "thresholdedrelu": (True, False, 1.0, 0.0),
    "scaledtanh": (True, True, 1.0, 1.0),
    "hardsigmoid": (True, True, 0.2, 0.5),
    "elu": (True, False, 1.0, 0.0),
}


def _activation(name: str, alpha: float, beta: float):
    key = name.lower()
    simple = {
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": torch.relu,
        "softsign": F.softsign,
        "softplus": F.softplus,
    }
    if key in simple:
        return simple[key]
    if key == "affine":
        return lambda x: alpha * x + beta
    if key == "leakyrelu":
        return lambda x: F.leaky_relu(x, alpha)
    if key == "thresholdedrelu":
        return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))
    if key == "scaledtanh":
        return lambda x: alpha * torch.tanh(beta * x)
    if key == "hardsigmoid":
        return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)
    if key == "elu":
        return lambda x: F.elu(x, alpha)
    raise NotImplementedError(f"activation {name!r}")


def _activations(node: NodeContext, kind: str, n_dir: int) -> list[list]:
    """Per direction, the op's activation functions with their alpha/beta."""
    per_dir = len(_DEFAULT_ACTIVATIONS[kind])
    names = node.attr("activations") or _DEFAULT_ACTIVATIONS[kind] * n_dir
    if len(names) == per_dir and n_dir == 2:
        names = names * 2
    if len(names) != per_dir * n_dir:
        raise NotImplementedError(f"{len(names)} activations for {n_dir} direction(s) of {kind}")
    alphas, betas = list(node.attr("activation_alpha", [])), list(node.attr("activation_beta", []))
    fns = []
    for name in names:
        takes_a, takes_b, a, b = _PARAMS.get(name.lower(), (False, False, 0.0, 0.0))
        if takes_a and alphas:
            a = alphas.pop(0)
        if takes_b and betas:
            b = betas.pop(0)
        fns.append(_activation(name, a, b))
    return [fns[d * per_dir : (d + 1) * per_dir] for d in range(n_dir)]


def _clipped(fn, clip: float):
    return lambda v: fn(torch.clamp(v, -clip, clip))


def _recurrent(kind: str):
    gates = _GATES[kind]

    def factory(node: NodeContext):
        direction = node.attr("direction", "forward")
        if direction not in ("forward", "reverse", "bidirectional"):
            raise NotImplementedError(f"direction {direction!r}")
        n_dir = 2 if direction == "bidirectional" else 1
        layout = int(node.attr("layout", 0))
        clip = node.attr("clip")
        acts = _activations(node, kind, n_dir)
        if clip is not None:  # f and g see their pre-activations clipped (h, LSTM's output one, not)
            acts = [[_clipped(fn, clip) if k < 2 else fn for k, fn in enumerate(fs)] for fs in acts]
        before_reset = bool(node.attr("linear_before_reset", 0))
        input_forget = bool(node.attr("input_forget", 0))

        def cell(d: int, xw, h, c, r, rb, p):
            """One step of direction ``d``: (new h, new c); ``xw`` holds X W^T + Wb."""
            f = acts[d][0]
            g = acts[d][1] if len(acts[d]) > 1 else None
            if kind == "RNN":
                return f(xw + h @ r.T + rb), None
            if kind == "GRU":
                xz, xr, xh = xw.chunk(3, dim=-1)
                rz, rr, rh = r.chunk(3, dim=0)
                bz, br, bh = rb.chunk(3, dim=-1)
                z = f(xz + h @ rz.T + bz)
                rt = f(xr + h @ rr.T + br)
                if before_reset:
                    ht = g(xh + rt * (h @ rh.T + bh))
                else:
                    ht = g(xh + (rt * h) @ rh.T + bh)
                return (1 - z) * ht + z * h, None
            pre = xw + h @ r.T + rb
            i, o, fg, cc = pre.chunk(4, dim=-1)
            pi, po, pf = p.chunk(3, dim=-1) if p is not None else (None, None, None)
            it = f(i + pi * c if pi is not None else i)
            ft = 1 - it if input_forget else f(fg + pf * c if pf is not None else fg)
            c_new = ft * c + it * g(cc)
            ot = f(o + po * c_new if po is not None else o)
            return ot * acts[d][2](c_new), c_new

        def run(x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
            if layout:
                x = x.transpose(0, 1)
            steps, batch = x.shape[0], x.shape[1]
            hidden = r.shape[-1]  # (hidden_size, which R's shape repeats)
            dtype = x.dtype
            if b is None:
                b = torch.zeros(n_dir, 2 * gates * hidden, dtype=dtype, device=x.device)
            if h0 is None:
                h0 = torch.zeros(n_dir, batch, hidden, dtype=dtype, device=x.device)
            elif layout:
                h0 = h0.transpose(0, 1)
            if kind == "LSTM":
                if c0 is None:
                    c0 = torch.zeros(n_dir, batch, hidden, dtype=dtype, device=x.device)
                elif layout:
                    c0 = c0.transpose(0, 1)
            live = None
            if seq_lens is not None:
                t = torch.arange(steps, device=x.device).unsqueeze(1)
                live = (t < seq_lens.to(x.device).long().unsqueeze(0)).unsqueeze(-1).to(dtype)  # [T, N, 1]
            ys, hs, cs = [], [], []
            for d in range(n_dir):
                wb, rb = b[d].chunk(2)
                xw = x @ w[d].T + wb  # every step's input projection at once: [T, N, gates * hidden]
                h, c = h0[d], (c0[d] if kind == "LSTM" else None)
                out = [None] * steps
                order = range(steps) if (d == 0 and direction != "reverse") else range(steps - 1, -1, -1)
                for s in order:
                    h_new, c_new = cell(d, xw[s], h, c, r[d], rb, p[d] if p is not None else None)
                    if live is None:
                        h, c, out[s] = h_new, c_new, h_new
                    else:
                        m = live[s]
                        h = m * h_new + (1 - m) * h
                        if c_new is not None:
                            c = m * c_new + (1 - m) * c
                        out[s] = m * h_new
                ys.append(torch.stack(out))
                hs.append(h)
                cs.append(c)
            y = torch.stack(ys, dim=1)  # [T, dirs, N, hidden]
            y_h = torch.stack(hs)
            y_c = torch.stack(cs) if kind == "LSTM" else None
            if layout:
                y = y.permute(2, 0, 1, 3)
                y_h = y_h.transpose(0, 1)
                y_c = y_c.transpose(0, 1) if y_c is not None else None
            return (y, y_h, y_c) if kind == "LSTM" else (y, y_h)

        return run

    return factory


for _kind in _GATES:
    register(_kind, since=7)(_recurrent(_kind))
