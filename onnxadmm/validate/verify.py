"""``verify``: can onnxadmm handle this model? torch vs onnxruntime, gradients, writer round trip."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import NothingToCompressError
from ..importer import analysis
from ..importer.graph import OnnxGraphModule
from ..modelio import load_model
from . import ortrun

TOL_FP32 = 1e-4  # max |torch - ort| <= TOL * scale, scale = max |ort output| (at least 1)
TOL_FP16 = 1e-2  # fp16 models: onnxruntime computes in fp16, torch in fp32 (fp16 eps ~ 1e-3)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    value: float | None = None
    limit: float | None = None


@dataclass
class VerifyResult:
    model: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "checks": [c.__dict__ for c in self.checks],
        }


def compare(ref: np.ndarray, got: np.ndarray, tol: float) -> tuple[bool, float, float]:
    """(ok, max abs diff, allowed) comparing ``got`` with the reference ``ref``."""
    ref = np.asarray(ref)
    got = np.asarray(got)
    if ref.shape != got.shape:
        return False, float("inf"), 0.0
    if ref.dtype.kind in "fc":
        r, g = ref.astype(np.float64), got.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(r)))) if r.size else 1.0
        diff = float(np.max(np.abs(r - g))) if r.size else 0.0
        return diff <= tol * scale, diff, tol * scale
    diff = float(np.count_nonzero(ref != got))
    return diff == 0, diff, 0.0


def _torch_run(module: OnnxGraphModule, feeds: dict, names: list[str], grad: bool = False):
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in module.input_names]
    with torch.set_grad_enabled(grad):
        out = module(*args)
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip(module.output_names, out))


def verify_model(
    path,
    data: dict[str, np.ndarray] | None = None,
    batch: int = 2,
    seed: int = 0,
    shapes: dict | None = None,
    max_samples: int = 64,
) -> VerifyResult:
    t0 = time.perf_counter()
    from ..export.storage import expand_storage

    as_written = load_model(path)
    model = expand_storage(as_written)  # weights in onnxadmm's packed form: plain tensors for torch
    result = VerifyResult(model=str(path))
    weights = analysis.find_weights(model)
    if not any(w.compressible for w in weights):
        ops = sorted({(n.domain + "::" if n.domain else "") + n.op_type for n in model.graph.node})
        raise NothingToCompressError(
            f"nothing to compress in {path}: no float weight tensor feeds Conv/ConvTranspose/Gemm/MatMul "
            f"(ops: {', '.join(ops)})"
        )
    float16 = any(w.dtype == onnx.TensorProto.FLOAT16 for w in weights)
    tol = TOL_FP16 if float16 else TOL_FP32
    graph_outs = [o.name for o in model.graph.output]
    train_outs = analysis.training_outputs(model)
    extra = [n for n in train_outs if n not in graph_outs]
    module = OnnxGraphModule(model, outputs=graph_outs + extra)
    result.checks.append(Check("import", True, f"{len(module._program)} nodes, {len(weights)} parameters"))

    sess = ortrun.session(as_written)  # the reference: onnxruntime on the file as it is
    specs = ortrun.input_specs(sess)
    b0 = ortrun.fixed_batch_of(specs)
    if data is not None:
        feeds_all = {k: np.asarray(v)[:max_samples] for k, v in data.items()}
    else:
        if b0 is None:
            # a batch of 2 shows that samples stay independent; 1 for very large inputs (images of 1M+ values)
            one = ortrun.random_inputs(specs, batch=1, seed=seed, shapes=shapes)
            big = sum(v.size for v in one.values()) > 1_000_000
            b = 1 if big and batch == 2 else batch
        else:
            b = 3 * b0
        feeds_all = ortrun.random_inputs(specs, batch=b, seed=seed, shapes=shapes)
    n_total = len(next(iter(feeds_all.values())))

    # run onnxruntime: whole batch, or chunk by chunk of the fixed batch size
    def ort_outputs(s, feeds):
        if b0 is None:
            return s.run(graph_outs, feeds)
        chunks = [
            s.run(graph_outs, {k: v[i : i + b0] for k, v in feeds.items()}) for i in range(0, n_total, b0)
        ]
        return [np.concatenate([c[j] for c in chunks]) for j in range(len(graph_outs))]

    if b0 is not None and n_total % b0:
        n_total -= n_total % b0
        feeds_all = {k: v[:n_total] for k, v in feeds_all.items()}
    ref = ort_outputs(sess, feeds_all)
    got = _torch_run(module, feeds_all, graph_outs)
    for name, r in zip(graph_outs, ref):
        g = got[name].detach().cpu()
        g = g.numpy() if g.dtype != torch.bfloat16 else g.float().numpy()
        ok, diff, allowed = compare(r, g.astype(r.dtype) if r.dtype.kind in "fc" else g, tol)
        detail = f"max |diff| {diff:.3g} (allowed {allowed:.3g})"
        if not ok and r.dtype.kind == "f" and not float16:
            ok, detail = _float64_arbitration(module, feeds_all, name, r, g, tol, detail)
        label = f"output {name}"
        if b0 is not None:
            label += (
                f" (batch {n_total} in torch vs {n_total // b0} runs of the fixed batch {b0} in onnxruntime)"
            )
        result.checks.append(Check(label, ok, detail, diff, allowed))

    # gradients reach every compressible weight
    module.zero_grad(set_to_none=True)
    outs = _torch_run(module, feeds_all, module.output_names, grad=True)
    loss = sum(outs[n].float().sum() for n in train_outs if outs[n].is_floating_point())
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
    comp = [w.name for w in weights if w.compressible]
    missing = [
        n
        for n in comp
        if module.parameter_for(n).grad is None or not torch.isfinite(module.parameter_for(n).grad).all()
    ]
    result.checks.append(
        Check(
            "backward reaches weights",
            not missing,
            f"{len(comp) - len(missing)}/{len(comp)} compressible weights get a finite gradient"
            + (f" (training output {', '.join(train_outs)})" if extra else "")
            + (f"; missing: {', '.join(missing[:3])}" if missing else ""),
        )
    )

    # writer round trip: unchanged weights -> bit-identical onnxruntime outputs
    from ..export.writer import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "roundtrip.onnx"
        export_onnx(model, module.onnx_state(), out_path)
        again = ort_outputs(ortrun.session(out_path), feeds_all)
    same = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(ref, again))
    result.checks.append(
        Check("writer round trip", same, "bit-identical onnxruntime outputs" if same else "outputs changed")
    )
    result.seconds = time.perf_counter() - t0
    return result


ORT_DEVIATION_LIMIT = 1e-2  # relative: beyond this onnxruntime computes something else, not rounding


def _float64_arbitration(module, feeds, name, ref_ort, got32, tol, detail):
    """When torch (fp32) and onnxruntime (fp32) disagree, run torch in float64 as the arbiter.

    Float32 kernels differ in rounding (e.g. onnxruntime's InstanceNormalization on nearly
    constant activations loses digits to cancellation). The import is judged correct when the
    fp32 torch result is within tolerance of the float64 result, and onnxruntime's own deviation
    from float64 stays below 1e-2 of the output scale (rounding, not a different function).
    """
    import copy

    m64 = copy.deepcopy(module).double()
    m64.input_dtypes = [torch.float64 if d.is_floating_point else d for d in m64.input_dtypes]
    feeds64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    try:
        out64 = _torch_run(m64, feeds64, [name])[name].detach().cpu().numpy()
    except Exception:  # an op without float64 support: keep the plain verdict
        return False, detail
    ok32, d32, allowed = compare(out64, got32, tol)
    _, d_ort, _ = compare(out64, ref_ort, tol)
    scale = allowed / tol
    ok = ok32 or (d32 <= d_ort and d_ort <= ORT_DEVIATION_LIMIT * scale)
    return ok, (
        f"{detail}; float64 arbitration: torch fp32 off by {d32:.3g}, onnxruntime off by {d_ort:.3g}"
        + (" (fp32 rounding: torch is at least as close to float64 as onnxruntime)" if ok else "")
    )


def format_result(r: VerifyResult) -> str:
    w = max(len(c.name) for c in r.checks)
    w = min(w, 70)
    lines = [f"{'check':<{w}}  result  detail"]
    for c in r.checks:
        lines.append(f"{c.name[:w]:<{w}}  {'ok' if c.ok else 'FAIL':<6}  {c.detail}")
    lines.append(f"{'verdict':<{w}}  {'ok' if r.ok else 'FAIL':<6}  {r.seconds:.1f} s")
    return "\n".join(lines)
