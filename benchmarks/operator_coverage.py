"""Operator coverage: run the ONNX backend node test cases through ``OnnxGraphModule``.

Every node test case whose operators are all registered in onnxadmm's registry (for the case's
opset) is imported and run; its outputs are compared with the expected ones the way onnx's backend
runner does (same shape, same dtype, ``assert_allclose`` with the case's rtol/atol, by default
rtol=1e-3, atol=1e-7). Cases using an unregistered operator are skipped and counted.

The cases are generated in memory from the generators shipped in the onnx wheel
(``collect_testcases``); with ``ONNX_NODE_DATA=<dir>`` (or ``--data-dir``) they are read from an
``onnx/backend/test/data/node`` directory of an onnx source tree instead.

Usage::

    python benchmarks/operator_coverage.py                 # writes docs/operators.md
    python benchmarks/operator_coverage.py -k resize --out /tmp/resize.md

One deliberate difference from onnx's runner: models with float16 tensors compute in float32
(onnxadmm keeps float32 master weights), so a float32 output where float16 is expected is accepted
and compared at the case's tolerance.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch

from onnxadmm.importer.graph import OnnxGraphModule
from onnxadmm.importer.registry import lookup, registered_ops

__all__ = [
    "Case",
    "Result",
    "load_cases",
    "case_ops",
    "missing_ops",
    "run_case",
    "run_cases",
    "summarize",
    "render_markdown",
    "main",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "operators.md"
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7
# Handled by the graph importer itself rather than by a registered factory.
_BUILTIN = {("", "Constant")}


@dataclass
class Case:
    """One node test case: a model and its (inputs, expected outputs) data sets."""

    name: str
    model: onnx.ModelProto
    data_sets: list[tuple[list, list]]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL


@dataclass
class Result:
    name: str
    status: str  # passed | failed | skipped
    ops: list[str] = field(default_factory=list)  # op types of the case (domain-qualified if not default)
    reason: str = ""
    seconds: float = 0.0


# ---- loading -----------------------------------------------------------------------------------
def load_cases(data_dir: str | os.PathLike | None = None, select: str | None = None) -> list[Case]:
    """All node test cases, from ``data_dir`` (or ``$ONNX_NODE_DATA``) or generated in memory.

    ``select``: keep only cases whose name contains this substring.
    """
    data_dir = data_dir or os.environ.get("ONNX_NODE_DATA") or None
    cases = _read_data_dir(Path(data_dir)) if data_dir else _generate()
    if select:
        cases = [c for c in cases if select in c.name]
    return sorted(cases, key=lambda c: c.name)


def _generate() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        found = collect_testcases(None)
    return [
        Case(
            c.name,
            c.model,
            [([_normalize(v) for v in i], [_normalize(v) for v in o]) for i, o in c.data_sets],
            DEFAULT_RTOL if c.rtol is None else c.rtol,
            DEFAULT_ATOL if c.atol is None else c.atol,
        )
        for c in found
    ]


def _normalize(value):
    """Some generators store tensors as TensorProto (as onnx's runner, convert them to numpy)."""
    return onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _read_data_dir(root: Path) -> list[Case]:
    if not root.is_dir():
        raise FileNotFoundError(f"node test data directory not found: {root}")
    cases = []
    for case_dir in sorted(p for p in root.iterdir() if (p / "model.onnx").is_file()):
        model = onnx.load(case_dir / "model.onnx")
        rtol, atol = DEFAULT_RTOL, DEFAULT_ATOL
        if (case_dir / "data.json").is_file():
            meta = json.loads((case_dir / "data.json").read_text())
            rtol, atol = meta.get("rtol", rtol), meta.get("atol", atol)
        init = {t.name for t in model.graph.initializer}
        in_types = [vi.type for vi in model.graph.input if vi.name not in init]
        out_types = [vi.type for vi in model.graph.output]
        data_sets = []
        for ds in sorted(case_dir.glob("test_data_set_*")):
            ins = [_read_pb(ds / f"input_{i}.pb", t) for i, t in enumerate(in_types)]
            outs = [_read_pb(ds / f"output_{i}.pb", t) for i, t in enumerate(out_types)]
            data_sets.append((ins, outs))
        cases.append(Case(case_dir.name, model, data_sets, rtol, atol))
    return cases


def _read_pb(path: Path, type_proto: onnx.TypeProto):
    if not path.is_file():
        return None
    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return onnx.numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return onnx.numpy_helper.to_optional(opt)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return onnx.numpy_helper.to_array(tensor)


# ---- which ops a case needs --------------------------------------------------------------------
def _domain(d: str) -> str:
    return "" if d in ("", "ai.onnx") else d


def _nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _nodes(g)


def case_ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Distinct (domain, op_type) used by the model, subgraphs included, in order of appearance."""
    return list(dict.fromkeys((_domain(n.domain), n.op_type) for n in _nodes(model.graph)))


def _op_label(domain: str, op: str) -> str:
    return f"{domain}::{op}" if domain else op


@functools.cache
def _registry_loaded() -> bool:
    registered_ops()  # imports every op family, so that ``lookup`` sees them
    return True


def missing_ops(model: onnx.ModelProto) -> list[str]:
    """Ops of the model with no registered implementation for the model's opset of their domain."""
    _registry_loaded()
    opsets = {_domain(o.domain): int(o.version) for o in model.opset_import}
    missing = []
    for dom, op in case_ops(model):
        if (dom, op) in _BUILTIN:
            continue
        if lookup(op, dom, opsets.get(dom, 1)) is None:
            missing.append(f"{_op_label(dom, op)}-{opsets.get(dom, '?')}")
    return missing


# ---- running -----------------------------------------------------------------------------------
def _to_torch(value):
    if value is None:
        return None
    if isinstance(value, list):
        return [_to_torch(v) for v in value]
    arr = np.asarray(value)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
    if arr.dtype.kind not in "biuf" or arr.dtype.name not in _NUMPY_OK:
        raise TypeError(f"input dtype {arr.dtype} is not supported by torch")
    return torch.from_numpy(np.array(arr, copy=True))


_NUMPY_OK = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
}  # fmt: skip


def _to_numpy(value):
    if isinstance(value, (list, tuple)):
        return [_to_numpy(v) for v in value]
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)
    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def _compare(i: int, got, want, rtol: float, atol: float) -> str:
    """'' when ``got`` matches ``want``, else a one-line reason."""
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)):
            return f"output {i}: expected a sequence, got {type(got).__name__}"
        if len(got) != len(want):
            return f"output {i}: sequence length {len(got)} != expected {len(want)}"
        for g, w in zip(got, want):
            reason = _compare(i, g, w, rtol, atol)
            if reason:
                return reason
        return ""
    if want is None:
        return "" if got is None else f"output {i}: expected None"
    want = np.asarray(want)
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"output {i}: shape {got.shape} != expected {want.shape}"
    if want.dtype == object:
        return "" if np.array_equal(got, want) else f"output {i}: values differ"
    wname, gname = want.dtype.name, got.dtype.name
    if wname == "bfloat16":
        want, rtol = want.astype(np.float32), max(rtol, 2**-6)
        wname = "float32" if gname == "float32" else wname
    if gname != wname and not (wname == "float16" and gname == "float32"):
        return f"output {i}: dtype {gname} != expected {wname}"
    if want.dtype.kind in "biu" or want.size == 0:
        if np.array_equal(got, want):
            return ""
        return f"output {i}: {int(np.sum(got != want))} of {want.size} values differ"
    g, w = got.astype(np.float64), want.astype(np.float64)
    close = np.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    if close.all():
        return ""
    err = np.abs(g - w)[~close]
    finite = err[np.isfinite(err)]
    worst = f"max abs err {finite.max():.3g}" if finite.size else "nan/inf mismatch"
    return f"output {i}: {worst} ({int((~close).sum())} of {w.size} values off, rtol={rtol:g} atol={atol:g})"


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:240]}"


def run_case(case: Case) -> Result:
    """Import and run one case; never raises."""
    ops = [_op_label(d, o) for d, o in case_ops(case.model) if (d, o) not in _BUILTIN]
    missing = missing_ops(case.model)
    if missing:
        return Result(case.name, "skipped", ops, "not registered: " + ", ".join(missing))
    start = time.perf_counter()
    try:
        module = OnnxGraphModule(case.model)
        init = {t.name for t in case.model.graph.initializer}
        names = [vi.name for vi in case.model.graph.input if vi.name not in init]
        for k, (inputs, expected) in enumerate(case.data_sets):
            feed = dict(zip(names, inputs))
            args = [_to_torch(feed[n]) for n in module.input_names]
            with torch.no_grad():
                out = module(*args)
            outs = list(out) if isinstance(out, tuple) else [out]
            if len(outs) != len(expected):
                raise AssertionError(f"{len(outs)} outputs, expected {len(expected)}")
            for i, (g, w) in enumerate(zip(outs, expected)):
                reason = _compare(i, _to_numpy(g), w, case.rtol, case.atol)
                if reason:
                    if len(case.data_sets) > 1:
                        reason = f"data set {k}: {reason}"
                    return Result(case.name, "failed", ops, reason, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 -- every failure is reported, none aborts the run
        return Result(case.name, "failed", ops, _one_line(exc), time.perf_counter() - start)
    return Result(case.name, "passed", ops, "", time.perf_counter() - start)


def run_cases(cases: Sequence[Case], progress: bool = False) -> list[Result]:
    results = []
    torch.manual_seed(0)  # random ops (training-mode Dropout) fail the same way on every run
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for k, case in enumerate(cases):
            results.append(run_case(case))
            if progress and (k + 1) % 200 == 0:
                log.info("%d/%d cases", k + 1, len(cases))
    return results


# ---- reporting ---------------------------------------------------------------------------------
def summarize(results: Sequence[Result]) -> dict:
    counts = Counter(r.status for r in results)
    run = counts["passed"] + counts["failed"]
    return {
        "total": len(results),
        "run": run,
        "passed": counts["passed"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
        "pass_rate": counts["passed"] / run if run else 0.0,
    }


def _group(result: Result) -> str:
    """The op a case tests: its only op, else 'composite'."""
    return result.ops[0] if len(result.ops) == 1 else "composite (several ops)"


def render_markdown(results: Sequence[Result], command: str, source: str, seconds: float) -> str:
    s = summarize(results)
    reg = registered_ops()
    per_op: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        for op in r.ops:
            per_op[op][r.status] += 1
    unregistered: Counter = Counter()
    for r in results:
        if r.status == "skipped":
            for item in r.reason.removeprefix("not registered: ").split(", "):
                unregistered[item.rsplit("-", 1)[0]] += 1
    versions = f"onnx {onnx.__version__}, torch {torch.__version__}, numpy {np.__version__}"
    try:
        import onnxruntime

        versions += f", onnxruntime {onnxruntime.__version__}"
    except ImportError:
        pass
    lines = [
        "# Operator coverage",
        "",
        "Generated by `benchmarks/operator_coverage.py`; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Versions: {versions}, Python {sys.version.split()[0]}",
        f"- Cases: {source}",
        f"- Run time: {seconds:.0f} s",
        "",
        "## Summary",
        "",
        f"- **Pass rate: {s['passed']}/{s['run']} = {100 * s['pass_rate']:.1f}%** of the cases run "
        "(all of whose operators are registered).",
        f"- Failed: {s['failed']}.",
        f"- Skipped: {s['skipped']} of {s['total']} cases use an operator that is not registered "
        f"({len(unregistered)} distinct ops, listed at the end).",
        "- Outputs are compared as onnx's backend runner does: same shape and dtype, "
        "`assert_allclose` with the case's rtol/atol (default rtol=1e-3, atol=1e-7). "
        "A float32 result where float16 is expected is accepted (float16 models compute in float32).",
        "",
        f"## Registered operators ({sum(1 for d, _ in reg if d == '')} in the default domain, {len(reg)} in all)",
        "",
        "| op | domain | since versions | cases run | passed |",
        "|---|---|---|---|---|",
    ]
    for (dom, op), since in sorted(reg.items(), key=lambda kv: (kv[0][0], kv[0][1].lower())):
        c = per_op.get(_op_label(dom, op), Counter())
        lines.append(
            f"| {op} | {dom or 'ai.onnx'} | {', '.join(map(str, since))} | "
            f"{c['passed'] + c['failed']} | {c['passed']} |"
        )
    failures = [r for r in results if r.status == "failed"]
    lines += ["", f"## Failures ({len(failures)}), grouped by op", ""]
    if not failures:
        lines.append("None.")
    by_op: dict[str, list[Result]] = defaultdict(list)
    for r in failures:
        by_op[_group(r)].append(r)
    for op in sorted(by_op, key=lambda o: (o.startswith("composite"), o.lower())):
        lines += [f"### {op} ({len(by_op[op])})", ""]
        for r in by_op[op]:
            extra = f" [{', '.join(r.ops)}]" if op.startswith("composite") else ""
            lines.append(f"- `{r.name}`{extra}: {r.reason.replace('|', '/')}")
        lines.append("")
    lines += [
        "## Operators of skipped cases that are not registered",
        "",
        "| op | cases |",
        "|---|---|",
    ]
    for op, n in sorted(unregistered.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {op} | {n} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report to write")
    parser.add_argument("--data-dir", default=None, help="onnx/backend/test/data/node (or $ONNX_NODE_DATA)")
    parser.add_argument("-k", "--select", default=None, help="only cases whose name contains this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    data_dir = args.data_dir or os.environ.get("ONNX_NODE_DATA")
    cases = load_cases(data_dir, args.select)
    source = f"{len(cases)} node test cases " + (
        f"read from `{data_dir}`"
        if data_dir
        else "generated by `onnx.backend.test.case.node.collect_testcases`"
    )
    results = run_cases(cases, progress=True)
    seconds = time.perf_counter() - start
    command = " ".join(
        ["python benchmarks/operator_coverage.py", *(argv if argv is not None else sys.argv[1:])]
    )
    if data_dir and not args.data_dir:
        command = f"ONNX_NODE_DATA={data_dir} {command}"
    text = render_markdown(results, command, source, seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    s = summarize(results)
    log.info(
        "passed %d/%d (%.1f%%), failed %d, skipped %d (unregistered op) in %.0f s -> %s",
        s["passed"], s["run"], 100 * s["pass_rate"], s["failed"], s["skipped"], seconds, out,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
