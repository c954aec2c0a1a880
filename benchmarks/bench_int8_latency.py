"""Benchmark: onnxruntime CPU latency of int8 exports (``onnxadmm.export.int8``) versus fp32.

Two models are written with ``onnx.helper`` (opset 17, dynamic batch, He-initialised random weights):

* LeNet-5, Caffe variant: conv 1->20 5x5, maxpool 2, conv 20->50 5x5, maxpool 2, fc 800->500,
  ReLU, fc 500->10; input [N,1,28,28].
* ResNet-8, CIFAR-style: stem conv 3->16 3x3 + ReLU, three stages of one basic block each
  (16/32/64 channels, stride 1/2/2, 1x1 stride-2 shortcut convs where the shape changes), BN
  folded into the convs (convs with bias), global average pool, fc 64->10; input [N,3,32,32].

Every Conv/Gemm weight is put on a per-output-channel symmetric int8 grid (scale = max|w| / 127 per
channel); the fp32 reference model carries these same grid weights, so fp32 and int8 differ only
by activation quantization. ``export_int8`` writes a QDQ and a QOperator model (uint8 activations,
MinMax calibration on 256 random inputs) and checks the weights exactly. With ``--choices`` two
alternatives are timed as well: QDQ with int8 (symmetric) activations, and QDQ with
``op_types_to_quantize`` limited to Conv/Gemm/MatMul (``quantize_activation_ops=False``).

Timing: one CPU session per model and form (``graph_optimization_level`` ORT_ENABLE_ALL, sequential
execution, ``intra_op_num_threads`` 1 and then 2), batch 64, the same input for all. After a
warm-up, the forms run round-robin (order rotated every round) for ``--rounds`` rounds, so that
they share the machine's load; each run is timed with ``time.perf_counter``. Reported: p50 and p90
per form, the ratio of the fp32 p50 to the int8 p50, and the median of the per-round ratios. The
table also gives the integer-kernel nodes after onnxruntime's optimisation, the file size, the
largest output difference to fp32 relative to the output range, and top-1 agreement with fp32.

    python benchmarks/bench_int8_latency.py                 # print the table
    python benchmarks/bench_int8_latency.py --threads 1,2,2ns --choices --write   # docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_section import write_section  # noqa: E402

from onnxadmm.export.int8 import channel_axis, export_int8, project_to_int8_grid  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "int8 latency (onnxruntime CPU)"
TARGET = 1.5


class Builder:
    """A tiny onnx.helper graph writer with He-initialised weights."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def param(self, name: str, shape: tuple[int, ...], fan_in: int | None = None) -> str:
        if fan_in is None:  # bias
            a = self.rng.normal(0.0, 0.05, shape)
        else:
            a = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        self.inits.append(numpy_helper.from_array(a.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> str:
        w = self.param(f"{name}.weight", (cout, cin, k, k), cin * k * k)
        b = self.param(f"{name}.bias", (cout,))
        return self.node("Conv", [x, w, b], name, kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)

    def fc(self, x: str, name: str, cin: int, cout: int) -> str:
        w = self.param(f"{name}.weight", (cout, cin), cin)
        b = self.param(f"{name}.bias", (cout,))
        return self.node("Gemm", [x, w, b], name, transB=1)

    def model(self, name: str, chw: tuple[int, int, int], out: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *chw])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 10])],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_int8")
        onnx.checker.check_model(m)
        return m


def lenet5(seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    y = b.conv("input", "conv1", 1, 20, 5)
    y = b.node("MaxPool", [y], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    y = b.conv(y, "conv2", 20, 50, 5)
    y = b.node("MaxPool", [y], "pool2", kernel_shape=[2, 2], strides=[2, 2])
    y = b.node("Flatten", [y], "flatten", axis=1)
    y = b.node("Relu", [b.fc(y, "fc1", 800, 500)], "relu1")
    y = b.fc(y, "fc2", 500, 10)
    return b.model("lenet5", (1, 28, 28), y)


def resnet8(seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    y = b.node("Relu", [b.conv("input", "stem", 3, 16, 3, pad=1)], "stem.relu")
    cin = 16
    for i, (cout, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
        p = f"stage{i + 1}"
        h = b.node("Relu", [b.conv(y, f"{p}.conv1", cin, cout, 3, stride, 1)], f"{p}.relu1")
        h = b.conv(h, f"{p}.conv2", cout, cout, 3, 1, 1)
        s = y if (stride == 1 and cin == cout) else b.conv(y, f"{p}.down", cin, cout, 1, stride)
        y = b.node("Relu", [b.node("Add", [h, s], f"{p}.add")], f"{p}.relu2")
        cin = cout
    y = b.node("GlobalAveragePool", [y], "gap")
    y = b.node("Flatten", [y], "flatten", axis=1)
    y = b.fc(y, "fc", 64, 10)
    return b.model("resnet8", (3, 32, 32), y)


MODELS = {"lenet5": (lenet5, (1, 28, 28)), "resnet8": (resnet8, (3, 32, 32))}
# export_int8 settings per int8 form; the last two only with --choices (the alternatives not taken)
VARIANTS = {
    "int8 qdq": {"fmt": "qdq"},
    "int8 qoperator": {"fmt": "qoperator"},
    "int8 qdq, int8 activations": {"fmt": "qdq", "activation_type": "int8"},
    "int8 qdq, Conv/Gemm/MatMul only": {"fmt": "qdq", "quantize_activation_ops": False},
}


def grid_weights(model: onnx.ModelProto) -> tuple[dict, dict]:
    """Per-output-channel int8 grid for every Conv/Gemm/MatMul weight of ``model``."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights, scales = {}, {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in inits:
            w = inits[node.input[1]]
            weights[node.input[1]], scales[node.input[1]] = project_to_int8_grid(
                w, channel_axis(node, w.ndim)
            )
    return weights, scales


def with_weights(model: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    return m


def session(path: Path, threads: int, spin: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def time_forms(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int, warmup: int) -> dict:
    names = list(sessions)
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, {"input": x})
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            sessions[n].run(None, {"input": x})
            times[n].append((time.perf_counter() - t0) * 1e3)
    return times


def machine_line() -> str:
    import torch

    return (
        f"{platform.machine()} Linux, {os.cpu_count()} CPUs (shared with other jobs), "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
        f"Python {platform.python_version()}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=100, help="timed runs per form (interleaved)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--threads",
        default="1,2",
        help="comma-separated intra_op_num_threads values; a value like 2ns also runs 2 threads, "
        "with the pool's spin-waiting off (session.intra_op.allow_spinning=0)",
    )
    ap.add_argument("--calib", type=int, default=256, help="calibration samples")
    ap.add_argument(
        "--choices",
        action="store_true",
        help="also time the alternatives not taken: int8 activations; quantizing Conv/Gemm/MatMul only",
    )
    ap.add_argument(
        "--write", action="store_true", help=f"write the '{SECTION}' section of docs/benchmarks.md"
    )
    args = ap.parse_args(argv)

    load = os.getloadavg()
    rng = np.random.default_rng(0)
    rows, results = [], []
    threads = [(int(t.removesuffix("ns")), not t.endswith("ns")) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        tmp = Path(tmp)
        built = {}
        for name in args.models.split(","):
            make, chw = MODELS[name]
            base = make()
            weights, scales = grid_weights(base)
            fp32 = tmp / f"{name}_fp32.onnx"
            onnx.save(with_weights(base, weights), str(fp32))
            calib = {"input": rng.standard_normal((args.calib, *chw), dtype=np.float32)}
            forms = {"fp32": (fp32, None)}
            variants = dict(VARIANTS)
            if not args.choices:
                variants = {k: v for k, v in variants.items() if k in ("int8 qdq", "int8 qoperator")}
            for label, kw in variants.items():
                out = tmp / f"{name}_{label.replace(' ', '_').replace('/', '_')}.onnx"
                info = export_int8(base, weights, scales, out, calib, **kw)
                forms[label] = (out, info)
                print(
                    f"{name} {label}: {info['quantized_weights']} weights exact, kernels {info['integer_kernel_ops']}"
                )
            x = rng.standard_normal((args.batch, *chw), dtype=np.float32)
            built[name] = (forms, x)

        for nt, spin in threads:
            t = f"{nt}" if spin else f"{nt}, no spin"
            for name, (forms, x) in built.items():
                sessions = {k: session(p, nt, spin) for k, (p, _) in forms.items()}
                ref = sessions["fp32"].run(None, {"input": x})[0]
                times = time_forms(sessions, x, args.rounds, args.warmup)
                f50 = pct(times["fp32"], 50)
                for k, (p, info) in forms.items():
                    out = sessions[k].run(None, {"input": x})[0]
                    rel = float(np.abs(out - ref).max() / (ref.max() - ref.min()))
                    top1 = float((out.argmax(1) == ref.argmax(1)).mean())
                    p50, p90 = pct(times[k], 50), pct(times[k], 90)
                    paired = statistics.median(a / b for a, b in zip(times["fp32"], times[k]))
                    kern = (
                        "-"
                        if info is None
                        else ", ".join(f"{o} {c}" for o, c in info["integer_kernel_ops"].items())
                    )
                    row = (
                        f"| {t} | {name} | {k} | {min(times[k]):.2f} | {p50:.2f} | {p90:.2f} | {f50 / p50:.2f} | "
                        f"{min(times['fp32']) / min(times[k]):.2f} | {paired:.2f} | "
                        f"{kern} | {p.stat().st_size:,} | {rel:.1e} | {top1:.3f} |"
                    )
                    rows.append(row)
                    print(row, flush=True)
                    if k in ("int8 qdq", "int8 qoperator"):
                        results.append((t, name, k, f50 / p50, paired))

    header = (
        "| threads | model | form | min ms | p50 ms | p90 ms | fp32/int8 (p50) | fp32/int8 (min) | "
        "fp32/int8 (paired median) | "
        "integer kernels after optimisation | file bytes | max abs diff / fp32 output range | top-1 = fp32 |\n"
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"
    )
    table = header + "\n" + "\n".join(rows)
    lines = {}
    for t, n, k, r, pr in results:
        mark = "meets" if r >= TARGET else "misses"
        lines.setdefault(t, []).append(f"{n} {k.removeprefix('int8 ')} {r:.2f}x (paired {pr:.2f}x, {mark})")
    summary = "\n".join(f"- threads {t}: " + "; ".join(v) for t, v in lines.items())
    print(table)
    print(summary)
    if args.write:
        cmd = "python benchmarks/bench_int8_latency.py " + " ".join(
            shlex.quote(a) for a in (argv or sys.argv[1:])
        )
        choices = (
            '\nThe rows "int8 activations" and "Conv/Gemm/MatMul only" (`--choices`) are the alternatives'
            " `export_int8` does not take by default: QDQ with symmetric int8 activations, and QDQ with"
            " `op_types_to_quantize` limited to Conv/Gemm/MatMul (Relu, pooling, Add, Flatten left in float)."
            if args.choices
            else ""
        )
        body = f"""
onnxruntime CPU latency at batch {args.batch} of fp32 models versus their int8 exports from
`onnxadmm.export.int8.export_int8`. Models written with `onnx.helper` (opset 17, dynamic batch,
He-initialised random weights; the timings do not depend on training):

- LeNet-5, Caffe variant: conv 1->20 5x5, maxpool 2, conv 20->50 5x5, maxpool 2, fc 800->500, ReLU,
  fc 500->10, input [N,1,28,28].
- ResNet-8, CIFAR-style: stem conv 3->16 3x3 + ReLU, one basic block per stage (16/32/64 channels,
  1x1 stride-2 shortcut convs), BN folded into the convs, global average pool, fc 64->10, input [N,3,32,32].

Every Conv/Gemm weight is on a per-output-channel symmetric int8 grid (scale = max|w|/127); the fp32
model holds the same grid weights, so the two differ only by activation quantization. `export_int8`
writes QDQ and QOperator models (int8 weights with the given scales via `TensorQuantOverrides`,
uint8 activations, MinMax calibration on {args.calib} random inputs) and checks that every int8 weight
times its scale equals the given float weight exactly (it did, for all weights of both models).
"integer kernels" counts the nodes of onnxruntime's optimised graph (ORT_ENABLE_EXTENDED).{choices}

Sessions: CPU provider, ORT_ENABLE_ALL, sequential, `intra_op_num_threads` as in the first column.
{args.warmup} warm-up runs per form, then {args.rounds} timed runs per form, round-robin (order
rotated every round) so that the forms share the machine's load; min/p50/p90 over those runs. "paired
median" is the median over rounds of fp32 time / int8 time; "min" is the fastest run, the
closest this shared machine gets to an unloaded one. Output error on the benchmark's random
input batch. The machine is shared with other jobs, so single timings are noisy; compare within a block.
With 2 threads, onnxruntime's thread pool spin-waits by default, and on this 2-core machine shared
with other jobs a parallel op then stalls until both of its threads get a core: the 2-thread rows
are slower than the 1-thread rows and their p50/p90 swing between runs (bimodal timings make single
p50 ratios unreliable; the paired median is steadier). Rows "2, no spin" turn the spinning off
(`session.intra_op.allow_spinning=0`).

{table}

Result: fp32 p50 / int8 p50 (target: int8 at least {TARGET}x faster), default forms (uint8 activations):

{summary}

- Command: `{cmd.strip()}`
- Date: {datetime.date.today().isoformat()}
- Machine: {machine_line()}; 1-minute load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end
"""
        write_section(DOCS, SECTION, body)
        print(f"wrote section '{SECTION}' of {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
