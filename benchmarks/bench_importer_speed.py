"""Benchmark: training-step speed of an imported ONNX model versus the same network written in torch.

One training iteration = ``zero_grad`` + forward + cross-entropy + backward (the optimizer step is
left out of both sides), batch 128, ``torch.set_num_threads(2)``. Models:

* ``lenet5``: LeNet-5, Caffe variant (conv 1->20 5x5, maxpool 2, conv 20->50 5x5, maxpool 2,
  fc 800->500, ReLU, fc 500->10), input [N,1,28,28];
* ``resnet8``: a CIFAR-style ResNet-8 (3x3 stem conv + BN + ReLU, three stages of one basic block
  with 16/32/64 channels, stride 2 at stages 2 and 3 with 1x1 conv + BN shortcuts, global average
  pool, fc 64->10), input [N,3,32,32].

The ONNX graph of each model is written with ``onnx.helper`` from the native module's weights (no
``torch.onnx``); BatchNorm becomes ``BatchNormalization`` in inference mode, so the native model
runs its BN in eval mode (running statistics) and both compute the same function. Before timing,
outputs and weight gradients are compared. Timed iterations alternate between the two models
(native, imported, native, imported, ..., swapping which goes first every round) after a warm-up;
the table shows medians and two ratios: of the medians, and the median of the per-round ratios.

    python benchmarks/bench_importer_speed.py                 # both models
    python benchmarks/bench_importer_speed.py --quick         # fewer iterations
    python benchmarks/bench_importer_speed.py --profile       # + torch.profiler op table per model
    python benchmarks/bench_importer_speed.py --write         # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import onnxadmm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_section import write_section  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "Importer speed"
TARGET = 1.15
OPSET = 13


# ---- native models -----------------------------------------------------------------------------


class LeNet5(nn.Module):
    """Caffe's lenet: no ReLU after the convolutions."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet8(nn.Module):
    def __init__(self, widths=(16, 32, 64), classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomize_bn(net: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so that eval-mode BN is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


# ---- ONNX writers ----------------------------------------------------------------------------


class GraphWriter:
    """Collects nodes and initializers; initializers are named after the native state_dict keys."""

    def __init__(self, net: nn.Module):
        self.state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.used: set[str] = set()
        self.k = 0

    def w(self, key: str) -> str:
        if key not in self.used:
            self.used.add(key)
            self.inits.append(numpy_helper.from_array(self.state[key].astype(np.float32), key))
        return key

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.k += 1
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, prefix: str, m: nn.Conv2d) -> str:
        ins = [x, self.w(f"{prefix}.weight")] + ([self.w(f"{prefix}.bias")] if m.bias is not None else [])
        p = list(m.padding) * 2
        return self.node(
            "Conv", ins, prefix, kernel_shape=list(m.kernel_size), strides=list(m.stride), pads=p
        )

    def bn(self, x: str, prefix: str, m: nn.BatchNorm2d) -> str:
        ins = [x] + [self.w(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
        return self.node("BatchNormalization", ins, prefix, epsilon=m.eps)

    def model(self, name: str, x: str, out: str, in_shape: list, out_shape: list) -> onnx.ModelProto:
        self.nodes[-1].output[0] = out
        g = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bench")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def lenet5_onnx(net: LeNet5) -> onnx.ModelProto:
    gw = GraphWriter(net)
    y = gw.conv("input", "conv1", net.conv1)
    y = gw.node("MaxPool", [y], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    y = gw.conv(y, "conv2", net.conv2)
    y = gw.node("MaxPool", [y], "pool2", kernel_shape=[2, 2], strides=[2, 2])
    y = gw.node("Flatten", [y], "flatten", axis=1)
    y = gw.node("Gemm", [y, gw.w("fc1.weight"), gw.w("fc1.bias")], "fc1", transB=1)
    y = gw.node("Relu", [y], "relu1")
    gw.node("Gemm", [y, gw.w("fc2.weight"), gw.w("fc2.bias")], "fc2", transB=1)
    return gw.model("lenet5", "input", "logits", ["N", 1, 28, 28], ["N", 10])


def resnet8_onnx(net: ResNet8) -> onnx.ModelProto:
    gw = GraphWriter(net)
    y = gw.node("Relu", [gw.bn(gw.conv("input", "conv", net.conv), "bn", net.bn)], "relu")
    for i, b in enumerate(net.blocks):
        p = f"blocks.{i}"
        h = gw.node("Relu", [gw.bn(gw.conv(y, f"{p}.conv1", b.conv1), f"{p}.bn1", b.bn1)], f"{p}.relu1")
        h = gw.bn(gw.conv(h, f"{p}.conv2", b.conv2), f"{p}.bn2", b.bn2)
        s = y if b.down is None else gw.bn(gw.conv(y, f"{p}.down.0", b.down[0]), f"{p}.down.1", b.down[1])
        y = gw.node("Relu", [gw.node("Add", [h, s], f"{p}.add")], f"{p}.relu2")
    y = gw.node("GlobalAveragePool", [y], "gap")
    y = gw.node("Flatten", [y], "flatten", axis=1)
    gw.node("Gemm", [y, gw.w("fc.weight"), gw.w("fc.bias")], "fc", transB=1)
    return gw.model("resnet8", "input", "logits", ["N", 3, 32, 32], ["N", 10])


MODELS = {
    "lenet5": (LeNet5, lenet5_onnx, (1, 28, 28)),
    "resnet8": (ResNet8, resnet8_onnx, (3, 32, 32)),
}
DEFAULT_ITERS = {"lenet5": 100, "resnet8": 40}  # timed iterations per model and side


def build(name: str, seed: int = 0):
    """(native module in eval mode, imported OnnxGraphModule in train mode, ONNX proto)."""
    cls, writer, shape = MODELS[name]
    torch.manual_seed(seed)
    net = cls()
    randomize_bn(net, seed)
    net.eval()  # BN from running statistics, like BatchNormalization in inference mode
    proto = writer(net)
    imp = onnxadmm.import_onnx(proto)
    imp.train()  # as onnxadmm trains it (BatchNormalization stays in inference mode)
    return net, imp, proto, shape


# ---- measurement -------------------------------------------------------------------------------


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def check(name: str, net, imp, proto, x, y) -> dict:
    """Max abs differences from native: imported outputs and weight gradients, onnxruntime outputs."""
    with torch.no_grad():
        ref = net(x)
        d_out = float((ref - imp(x)).abs().max())
    sess = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    d_ort = float(np.abs(sess.run(None, {"input": x.numpy()})[0] - ref.numpy()).max())
    train_step(net, x, y)
    train_step(imp, x, y)
    d_grad = 0.0
    for k, p in net.named_parameters():
        q = imp.parameter_for(k)
        d_grad = max(d_grad, float((p.grad - q.grad).abs().max()))
    if max(d_out, d_grad, d_ort) > 1e-3:
        raise SystemExit(
            f"{name}: differs from native (imported output {d_out:.2e}, grad {d_grad:.2e}, "
            f"onnxruntime output {d_ort:.2e})"
        )
    return {"out_diff": d_out, "grad_diff": d_grad, "ort_diff": d_ort}


def aten_calls(model, x, y) -> int:
    """Number of aten op calls (nested ones included) in one training iteration."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    train_step(model, x, y)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, x, y)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def time_pair(net, imp, x, y, iters: int, warmup: int) -> tuple[list[float], list[float]]:
    """Per-iteration seconds for native and imported, interleaved (order swapped every round)."""
    for _ in range(warmup):
        train_step(net, x, y)
        train_step(imp, x, y)
    tn, ti = [], []
    for i in range(iters):
        order = ((net, tn), (imp, ti)) if i % 2 == 0 else ((imp, ti), (net, tn))
        for model, acc in order:
            t0 = time.perf_counter()
            train_step(model, x, y)
            acc.append(time.perf_counter() - t0)
    return tn, ti


def profile(name: str, net, imp, x, y, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    out = []
    for label, model in (("native", net), ("imported", imp)):
        for _ in range(3):
            train_step(model, x, y)
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                train_step(model, x, y)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        out.append(f"### {name} {label} (10 iterations)\n{table}")
    return "\n".join(out)


def env_line() -> str:
    return (
        f"{platform.machine()} Linux, {os.cpu_count()} CPUs (shared with other jobs), "
        f"torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, Python {platform.python_version()}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet8", help="comma-separated: lenet5, resnet8")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed iterations per model and side (default lenet5 100, resnet8 40; quick 20)",
    )
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 10, quick 3)")
    ap.add_argument(
        "--threads",
        default="2,1",
        help="comma-separated torch thread counts, each timed separately (default 2,1)",
    )
    ap.add_argument("--quick", action="store_true", help="20 timed iterations, 3 warm-up")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler op table per model")
    ap.add_argument(
        "--write", action="store_true", help=f"update the '{SECTION}' section of docs/benchmarks.md"
    )
    args = ap.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}; known: {', '.join(MODELS)}")

    rows, profiles = [], []
    for th in threads:
        torch.set_num_threads(th)
        for name in names:
            net, imp, proto, shape = build(name)
            g = torch.Generator().manual_seed(1)
            x = torch.randn((args.batch, *shape), generator=g)
            y = torch.randint(0, 10, (args.batch,), generator=g)
            diffs = check(name, net, imp, proto, x, y)
            calls = (aten_calls(net, x, y), aten_calls(imp, x, y))
            iters = args.iters or (20 if args.quick else DEFAULT_ITERS[name])
            tn, ti = time_pair(net, imp, x, y, iters, warmup)
            mn, mi = statistics.median(tn), statistics.median(ti)
            paired = statistics.median(b / a for a, b in zip(tn, ti))
            rows.append(
                {
                    "threads": th,
                    "model": name,
                    "params": sum(p.numel() for p in net.parameters()),
                    "nodes": len(proto.graph.node),
                    "native": mn * 1e3,
                    "imported": mi * 1e3,
                    "ratio": mi / mn,
                    "paired": paired,
                    "calls": calls,
                    "iters": iters,
                    **diffs,
                }
            )
            print(
                f"{th} thread(s), {name}: native {mn * 1e3:.2f} ms, imported {mi * 1e3:.2f} ms, "
                f"ratio {mi / mn:.3f} (paired {paired:.3f}); max |diff| out {diffs['out_diff']:.1e} "
                f"grad {diffs['grad_diff']:.1e} onnxruntime {diffs['ort_diff']:.1e}",
                flush=True,
            )
            if args.profile:
                profiles.append(profile(f"{name}, {th} thread(s),", net, imp, x, y, rows=15))

    table = [
        "| threads | model | params | ONNX nodes | timed iters | native ms/iter | imported ms/iter | ratio (medians) "
        "| ratio (paired median) | aten calls native / imported | max abs diff: output / gradients / onnxruntime output |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        table.append(
            f"| {r['threads']} | {r['model']} | {r['params']:,} | {r['nodes']} | {r['iters']} | {r['native']:.2f} | {r['imported']:.2f} "
            f"| {r['ratio']:.3f} | {r['paired']:.3f} | {r['calls'][0]} / {r['calls'][1]} | {r['out_diff']:.1e} / {r['grad_diff']:.1e} / {r['ort_diff']:.1e} |"
        )
    table = "\n".join(table)
    print()
    print(table)
    for p in profiles:
        print()
        print(p)

    if args.write:
        cmd = "python benchmarks/bench_importer_speed.py" + "".join(
            f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
        )
        verdict = "; ".join(
            f"{th} thread(s): "
            + ", ".join(
                f"{r['model']} {r['ratio']:.3f} ({'within' if r['ratio'] <= TARGET else 'above'} the "
                f"{TARGET} target)"
                for r in rows
                if r["threads"] == th
            )
            for th in threads
        )
        body = f"""One training iteration (zero_grad + forward + cross-entropy + backward, no optimizer
step) at batch {args.batch} of a model imported with `onnxadmm.import_onnx` versus the same network
written in torch. The ONNX graphs (opset {OPSET}) are written with `onnx.helper` from the native
modules' weights, without `torch.onnx`. BatchNorm is `BatchNormalization` in inference mode, and the
native ResNet runs its BN in eval mode, so both sides compute the same function. This is checked
before timing (last column: imported outputs and weight gradients, and onnxruntime's outputs,
against native). "aten calls" counts the aten ops of one iteration (torch.profiler): both sides run
the same kernels, the imported model only swaps `flatten` (and ResNet's `adaptive_avg_pool2d`) for
`reshape` / `mean`.

- LeNet-5, Caffe variant: conv 1->20 5x5, maxpool, conv 20->50 5x5, maxpool, fc 800->500, ReLU,
  fc 500->10, input [N,1,28,28].
- ResNet-8, CIFAR-style: stem conv+BN+ReLU, one basic block per stage with 16/32/64 channels,
  1x1 conv+BN shortcuts, global average pool, fc, input [N,3,32,32].

{warmup} warm-up iterations, then the timed iterations ("timed iters", per side), interleaved
(native/imported, order swapped every round); medians. "paired" is the median over rounds of
imported/native. Target: ratio <= {TARGET}. One block of rows per `torch.set_num_threads` value
({", ".join(map(str, threads))}). On this shared 2-core machine 2 threads are much slower than 1: every
parallel op waits until both of its threads get a core while other jobs hold them, so the 2-thread
times measure scheduling stalls more than arithmetic, and their ratios are noisier.

{table}

Result (ratio of the medians): {verdict}.

- Command: `{cmd}`
- Date: {datetime.date.today().isoformat()}
- Machine: {env_line()}
"""
        write_section(DOCS, SECTION, body)
        print(f"\nupdated '{SECTION}' in {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
