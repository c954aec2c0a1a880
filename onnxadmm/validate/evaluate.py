"""``evaluate``: accuracy, agreement with a reference model, file size and latency in onnxruntime.

Accuracy and the comparison with the reference always run on the CPU provider (deterministic and
always there); latency is measured per provider asked. Data preparation is the caller's job: the
Dataset must already match the model's inputs (see :func:`onnxadmm.data.load_data`).

Models whose inputs declare a fixed leading dim b0 (e.g. 1) are run b0 samples at a time, padding
the last chunk with repeated samples, and their latency is measured at batch b0 only.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..data import Dataset
from ..errors import ConfigError, DataError, OnnxAdmmError
from ..modelio import external_locations, load_model
from . import ortrun

CHUNK = 256  # samples per run for models with a dynamic batch dim
RANDOM_SAMPLES = 64  # samples compared with the reference when there is no dataset


def _provider_names(providers) -> list[str]:
    """Short provider names ('cpu', 'cuda'), deduplicated; full ORT names are accepted too."""
    if isinstance(providers, str):
        providers = [providers]
    full_to_short = {v.lower(): k for k, v in ortrun.PROVIDERS.items()}
    out: list[str] = []
    for p in providers:
        key = str(p).strip().lower()
        key = full_to_short.get(key, key)
        if key not in ortrun.PROVIDERS:
            raise OnnxAdmmError(f"unknown provider {p!r}; choose from {', '.join(ortrun.PROVIDERS)}")
        if key not in out:
            out.append(key)
    return out


def file_bytes(path) -> int:
    """Size of the model file plus every external-data file it refers to (each counted once)."""
    path = Path(path)
    total = path.stat().st_size
    model = load_model(path, load_external=False)
    for loc in sorted(set(external_locations(model))):
        target = path.parent / loc
        if target.is_file():
            total += target.stat().st_size
    return total


def _check_dataset(dataset: Dataset, specs, what: str) -> None:
    names = [s[0] for s in specs]
    got = list(dataset.inputs)
    if set(got) != set(names):
        missing = [n for n in names if n not in got]
        extra = [n for n in got if n not in names]
        parts = []
        if missing:
            parts.append(f"missing {', '.join(repr(n) for n in missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(repr(n) for n in extra)}")
        raise DataError(
            f"dataset inputs do not match {what}'s inputs ({'; '.join(parts)}); "
            f"the model takes {', '.join(repr(n) for n in names)}"
        )
    n = len(dataset)
    if n == 0:
        raise DataError("dataset holds no samples")
    for name, dims, _ in specs:
        x = dataset.inputs[name]
        if len(x) != n:
            raise DataError(f"input {name!r} has {len(x)} samples, other inputs have {n}")
        if len(dims) != x.ndim or any(
            isinstance(d, int) and d > 0 and d != s for d, s in zip(dims[1:], x.shape[1:])
        ):
            raise DataError(
                f"input {name!r}: data have shape {list(x.shape)}, {what} expects {dims} "
                "(prepare the data with onnxadmm.data.load_data)"
            )
    if dataset.labels is not None and len(dataset.labels) != n:
        raise DataError(f"labels have {len(dataset.labels)} entries but inputs have {n} samples")


def _take(inputs: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}


def _run(sess: ort.InferenceSession, feeds: dict, what: str) -> list[np.ndarray]:
    try:
        return sess.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxAdmmError(f"onnxruntime failed to run {what}: {first}") from None


def _run_all(sess, inputs: dict[str, np.ndarray], fixed: int | None, what: str) -> dict[str, np.ndarray]:
    """All outputs over all samples: ``fixed`` samples per run (the last chunk padded by wrapping
    around, the padding's outputs dropped) for fixed-batch models, else up to CHUNK per run."""
    n = len(next(iter(inputs.values())))
    chunk = fixed or CHUNK
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list] = {k: [] for k in names}
    for start in range(0, n, chunk):
        real = min(chunk, n - start)
        idx = np.arange(start, start + (chunk if fixed else real)) % n
        outs = _run(sess, _take(inputs, idx), what)
        for k, o in zip(names, outs):
            o = np.asarray(o)
            if o.ndim >= 1 and o.shape[0] == len(idx):
                parts[k].append(o[:real])
            else:  # not batched along dim 0: keep the whole value of every run
                parts[k].append(o.reshape(1, *o.shape) if o.ndim == 0 else o)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f"


def _pick_output(outputs: dict[str, np.ndarray], label_output: str | None, what: str) -> str | None:
    if label_output is not None:
        if label_output not in outputs:
            raise ConfigError(
                f"{what} has no output {label_output!r}; its outputs are {', '.join(map(repr, outputs))}"
            )
        return label_output
    for k, v in outputs.items():
        if _is_float(v):
            return k
    for k, v in outputs.items():
        if v.dtype.kind in "iu":
            return k
    return None


_PASS_THROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast")
_PROBABILITY_OPS = ("Sigmoid", "HardSigmoid")


def _producers(proto) -> dict[str, str]:
    """Graph output name -> the op type that computes it (through reshapes, casts and Identity)."""
    made = {o: n for n in proto.graph.node for o in n.output}
    found = {}
    for out in proto.graph.output:
        node = made.get(out.name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = made.get(node.input[0])
        found[out.name] = node.op_type if node is not None else ""
    return found


def binary_threshold(values: np.ndarray, producer: str) -> float:
    """0.5 for probabilities (made by Sigmoid, else when all values lie within [0, 1]), 0 for logits."""
    probability = producer in _PROBABILITY_OPS or bool(((values >= 0) & (values <= 1)).all())
    return 0.5 if probability else 0.0


def _binary_ok(labels, producer: str) -> bool:
    """A one-column output is a binary classifier with 0/1 labels, or without labels when a Sigmoid
    makes it; otherwise (other labels, or an unlabelled output of another op) a regression output."""
    if labels is not None:
        return bool(np.isin(np.asarray(labels), (0, 1)).all())
    return producer in _PROBABILITY_OPS


def _predictions(
    out: np.ndarray, n: int, producer: str = "", binary: bool = True
) -> tuple[np.ndarray | None, str | None]:
    """Top-1 class per sample from one output and None, or (None, why not); for a binary
    classifier, (classes, how they were decided).

    One float value per sample is a binary classifier: class 1 where the output exceeds 0.5 when it
    is a probability (made by Sigmoid, or every value within [0, 1]), else where it exceeds 0 (a logit).
    An output with two or more axes of length above 1 besides the batch (an image, a segmentation
    map) has no top-1 per sample: the comparison with a reference rests on the output differences.
    """
    if out.ndim == 0 or out.shape[0] != n:
        return None, f"output shape {list(out.shape)} is not batched over the {n} samples"
    if sum(d > 1 for d in out.shape[1:]) > 1:
        return None, (
            f"output of shape {list(out.shape)} has more than one axis beyond the batch (an image or "
            "per-position output), not one score vector per sample"
        )
    flat = out.reshape(n, -1)
    if out.dtype.kind in "iub":
        if flat.shape[1] != 1:
            return None, f"integer output of shape {list(out.shape)} is not one class index per sample"
        return flat[:, 0].astype(np.int64), None
    if flat.shape[1] == 0:
        return None, f"output of shape {list(out.shape)} is empty"
    if flat.shape[1] == 1:
        if not binary:
            return None, "one value per sample, and no 0/1 labels or Sigmoid: a regression output, no classes"
        v = flat[:, 0]
        if not np.isfinite(v).all():
            return None, "one value per sample with non-finite values; no binary decision"
        cut = binary_threshold(v, producer)
        return (v > cut).astype(np.int64), f"a binary classifier, class 1 above {cut:g}"
    return np.argmax(flat, axis=1), None


def _label_indices(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim >= 2 and labels.reshape(len(labels), -1).shape[1] > 1:
        return np.argmax(labels.reshape(len(labels), -1), axis=1)  # one-hot / soft labels
    return labels.reshape(len(labels)).astype(np.int64)


def _accuracy(pred: np.ndarray | None, labels: np.ndarray | None) -> float | None:
    if pred is None or labels is None:
        return None
    return float(np.mean(pred == _label_indices(labels)))


def _pair_outputs(model_out: dict, ref_out: dict, notes: list) -> list[tuple[str, str]]:
    common = [k for k in model_out if k in ref_out]
    if len(common) == len(model_out) == len(ref_out):
        return [(k, k) for k in common]
    if len(model_out) == len(ref_out):
        notes.append("output names differ from the reference's: outputs compared by position")
        return list(zip(model_out, ref_out))
    notes.append("the reference has a different number of outputs: only same-named outputs are compared")
    return [(k, k) for k in common]


def regression_fit(pred: np.ndarray, target: np.ndarray) -> dict | None:
    """RMSE, MAE and R^2 (1 - SSE / the targets' sum of squares about their mean) of ``pred`` against
    ``target`` (same number of values); None if they do not match or hold non-finite values."""
    p = np.asarray(pred, np.float64).reshape(-1)
    t = np.asarray(target, np.float64).reshape(-1)
    if p.size != t.size or not p.size or not (np.isfinite(p).all() and np.isfinite(t).all()):
        return None
    err = p - t
    sst = float(np.sum((t - t.mean()) ** 2))
    sse = float(np.sum(err**2))
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else float("-inf"))
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))), "r2": r2}


def _fits(model_out: dict, ref_out: dict, pairs) -> dict:
    """Per float output of the same shape: its fit to the reference's (:func:`regression_fit`)."""
    out = {}
    for a, b in pairs:
        x, r = model_out[a], ref_out[b]
        if _is_float(x) and _is_float(r) and x.shape == r.shape:
            f = regression_fit(x, r)
            if f is not None:
                out[a] = f
    return out


def _diffs(model_out: dict, ref_out: dict, pairs, notes: list) -> tuple[float | None, float | None]:
    diff, scale = None, 0.0
    for a, b in pairs:
        x, r = model_out[a], ref_out[b]
        if not (_is_float(x) and _is_float(r)):
            continue
        if x.shape != r.shape:
            notes.append(
                f"output {a!r} has shape {list(x.shape)}, the reference's {list(r.shape)}: not compared"
            )
            continue
        if not x.size:
            continue
        x64, r64 = x.astype(np.float64), r.astype(np.float64)
        both_nan = np.isnan(x64) & np.isnan(r64)
        d = np.where(both_nan, 0.0, np.abs(x64 - r64))
        d = np.where(np.isnan(d), np.inf, d)
        diff = max(diff or 0.0, float(np.max(d)))
        finite = np.abs(r64[np.isfinite(r64)])
        if finite.size:
            scale = max(scale, float(np.max(finite)))
    if diff is None:
        return None, None
    return diff, (diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))


def _random_feeds(specs, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random samples of the right shape (the leading dim is ``n`` even where it is fixed)."""
    shapes = {name: [n] + ortrun.concrete_shape(dims, n)[1:] for name, dims, _ in specs}
    return ortrun.random_inputs(specs, n, seed=seed, shapes=shapes)


def _bench_feeds(specs, dataset: Dataset | None, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    if dataset is not None:
        return _take(dataset.inputs, np.arange(batch) % len(dataset))
    return _random_feeds(specs, batch, seed=seed)


def _latency(sess, feeds: dict, batch: int, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        sess.run(None, feeds)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times[i] = time.perf_counter() - t0
    return {
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p90_ms": float(np.percentile(times, 90) * 1e3),
        "samples_per_s": float(batch / max(float(np.percentile(times, 50)), 1e-12)),  # at the median
    }


def _provider_session(path, provider: str, threads, cpu_sess) -> tuple[ort.InferenceSession | None, str]:
    """(session, "") for ``provider``, or (None, reason it is skipped)."""
    full = ortrun.PROVIDERS[provider]
    if provider == "cpu":
        return cpu_sess, ""
    available = ort.get_available_providers()
    if full not in available:
        return None, f"{full} is not available in this onnxruntime build (available: {', '.join(available)})"
    try:
        with warnings.catch_warnings():  # the fallback is reported in the result instead
            warnings.simplefilter("ignore")
            sess = ortrun.session(path, providers=[full, "CPUExecutionProvider"], threads=threads)
    except OnnxAdmmError as exc:
        return None, f"cannot create a {full} session: {exc}"
    if full not in sess.get_providers():
        return None, f"{full} session fell back to CPU (no usable device or missing CUDA/cuDNN libraries)"
    return sess, ""


def _check_options(batch_sizes, warmup, runs, threads) -> list[int]:
    try:
        sizes = [int(b) for b in batch_sizes]
    except (TypeError, ValueError):
        raise ConfigError(f"batch sizes must be positive integers, got {batch_sizes!r}") from None
    if any(b <= 0 for b in sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if int(warmup) < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")
    if int(runs) < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    if threads is not None and int(threads) < 0:
        raise ConfigError(f"threads must be >= 0 (0 = onnxruntime's default), got {threads}")
    return list(dict.fromkeys(sizes))


def extract_outputs(src, dst, inputs: list[str], outputs: list[str]) -> None:
    """A copy of ``src`` reduced to what computes ``outputs`` from ``inputs`` (weights unchanged),
    written atomically to ``dst``."""
    from ..importer import analysis
    from ..modelio import save_model

    m = load_model(Path(src))
    g = m.graph
    keep = analysis.needed_nodes(g, outputs)
    known = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    new_outputs = [
        known[n] if n in known else onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
        for n in outputs
    ]
    new_inputs = [vi for vi in g.input if vi.name in inputs or vi.name in {t.name for t in g.initializer}]
    del g.node[:]
    g.node.extend(keep)
    del g.output[:]
    g.output.extend(new_outputs)
    del g.input[:]
    g.input.extend(new_inputs)
    save_model(m, Path(dst))


def trainable_view(model: onnx.ModelProto) -> tuple[list[str], list[str]] | None:
    """(outputs, inputs) of the part of ``model`` that can be scored when its own outputs cannot: a
    model whose output is, say, an accuracy computed from logits and a labels input is scored on the
    logits, from the inputs those need. None when the model's outputs are scorable as they are."""
    from ..importer import analysis

    g = model.graph
    outs = analysis.training_outputs(model)
    if outs == [o.name for o in g.output]:
        return None
    inits = {t.name for t in g.initializer}
    used = {i for n in analysis.needed_nodes(g, outs) for i in n.input}
    inputs = [vi.name for vi in g.input if vi.name in used and vi.name not in inits]
    return outs, inputs


def evaluate_model(
    model_path,
    dataset: Dataset | None,
    *,
    reference=None,
    providers=("cpu",),
    batch_sizes=(1, 32),
    warmup: int = 3,
    runs: int = 20,
    threads: int | None = None,
    label_output: str | None = None,
) -> dict:
    """Evaluate ``model_path`` (optionally against the original ``reference``) in onnxruntime.

    Returns a JSON-serialisable dict: ``model``, ``file_bytes``, ``samples``, ``accuracy`` (top-1,
    None without labels), ``reference`` (``model``, ``file_bytes``, ``accuracy``, ``max_abs``) or None,
    ``agreement`` (fraction of samples with the same top-1 as the reference), ``max_abs_diff`` and
    ``max_rel_diff`` (over all float outputs, relative to the reference's max |output|),
    ``fit_to_reference`` ({output: {rmse, mae, r2}} of each float output against the reference's,
    R^2 about the reference's mean), ``regression`` (rmse, mae, r2 against the labels when the scored
    output is a regression output, also under ``reference``; else None), ``batch``
    (the fixed batch size or None), ``latency`` ({provider: {str(batch): {p50_ms, p90_ms,
    samples_per_s}}} or {provider: {"skipped": reason}}) and ``notes``.
    """
    provs = _provider_names(providers)
    sizes = _check_options(batch_sizes, warmup, runs, threads)
    notes: list[str] = []

    model_path = Path(model_path)
    producers = _producers(load_model(model_path, load_external=False))  # one-line errors for bad files
    sess = ortrun.session(model_path, threads=threads)
    specs = ortrun.input_specs(sess)
    fixed = ortrun.fixed_batch_of(specs)

    ref_path = ref_sess = ref_specs = ref_fixed = None
    ref_producers: dict[str, str] = {}
    if reference is not None:
        ref_path = Path(reference)
        ref_producers = _producers(load_model(ref_path, load_external=False))
        ref_sess = ortrun.session(ref_path, threads=threads)
        ref_specs = ortrun.input_specs(ref_sess)
        ref_fixed = ortrun.fixed_batch_of(ref_specs)
        if sorted(s[0] for s in ref_specs) != sorted(s[0] for s in specs):
            raise DataError(
                f"the reference's inputs ({', '.join(s[0] for s in ref_specs)}) differ from the model's "
                f"({', '.join(s[0] for s in specs)})"
            )

    if dataset is not None:
        _check_dataset(dataset, specs, "the model")
        if ref_specs is not None:
            _check_dataset(dataset, ref_specs, "the reference")
        inputs = dataset.inputs
        labels = dataset.labels
        if labels is None:
            notes.append("the dataset has no labels: accuracy not computed")
    elif ref_sess is not None:
        n_rand = RANDOM_SAMPLES
        for b in (fixed, ref_fixed):
            if b:
                n_rand = int(np.ceil(n_rand / b) * b)
        inputs = _random_feeds(specs, n_rand, seed=0)
        labels = None
        notes.append(
            f"no dataset: model and reference compared on {n_rand} random inputs; latency on random inputs"
        )
    else:
        inputs, labels = None, None
        notes.append("no dataset: accuracy not computed, latency measured on random inputs")

    result: dict = {
        "model": str(model_path),
        "file_bytes": file_bytes(model_path),
        "samples": len(dataset) if dataset is not None else 0,
        "accuracy": None,
        "reference": None,
        "agreement": None,
        "max_abs_diff": None,
        "max_rel_diff": None,
        "fit_to_reference": None,
        "regression": None,
        "batch": fixed,
        "latency": {},
        "notes": notes,
    }

    if fixed:
        notes.append(f"the model has a fixed batch size of {fixed}: run {fixed} sample(s) at a time")
        if inputs is not None and len(next(iter(inputs.values()))) % fixed:
            notes.append("the last chunk was padded with repeated samples (their outputs are discarded)")

    if ref_fixed and inputs is not None:
        notes.append(
            f"the reference has a fixed batch size of {ref_fixed}: run {ref_fixed} sample(s) at a time"
        )
    if inputs is not None:
        n = len(next(iter(inputs.values())))
        out = _run_all(sess, inputs, fixed, "the model")
        key = _pick_output(out, label_output, "the model")
        producer = producers.get(key, "") if key is not None else ""
        pred, how = (
            _predictions(out[key], n, producer, _binary_ok(labels, producer))
            if key is not None
            else (None, "the model has no numeric output")
        )
        if how and pred is not None:
            notes.append(f"one value per sample in {key!r}: {how}")
        elif how:
            notes.append(f"no top-1 predictions from the model's output {key!r}: {how}")
        if dataset is not None and labels is not None:
            result["accuracy"] = _accuracy(pred, labels)
            if pred is None and key is not None and _is_float(out[key]):  # a regression output
                result["regression"] = regression_fit(out[key], labels)

        if ref_sess is not None:
            ref_out = _run_all(ref_sess, inputs, ref_fixed, "the reference")
            pairs = _pair_outputs(out, ref_out, notes)
            ref_key = dict(pairs).get(key) if key is not None else None
            ref_pred = None
            if ref_key is not None:
                ref_producer = ref_producers.get(ref_key, "")
                ref_pred, why = _predictions(ref_out[ref_key], n, ref_producer, _binary_ok(labels, ref_producer))
                if ref_pred is None and why:
                    notes.append(f"no top-1 predictions from the reference's output {ref_key!r}: {why}")
            if pred is not None and ref_pred is not None:
                result["agreement"] = float(np.mean(pred == ref_pred))
            result["max_abs_diff"], result["max_rel_diff"] = _diffs(out, ref_out, pairs, notes)
            result["fit_to_reference"] = _fits(out, ref_out, pairs)
            ref_max = [
                float(np.max(np.abs(v[np.isfinite(v)])))
                for v in ref_out.values()
                if _is_float(v) and np.isfinite(v).any()
            ]
            result["reference"] = {
                "model": str(ref_path),
                "file_bytes": file_bytes(ref_path),
                "accuracy": _accuracy(ref_pred, labels) if dataset is not None else None,
                "max_abs": max(ref_max) if ref_max else None,
            }
            if result.get("regression") is not None and ref_key is not None and _is_float(ref_out[ref_key]):
                result["reference"]["regression"] = regression_fit(ref_out[ref_key], labels)

    lat_sizes = [fixed] if fixed else sizes
    if fixed and sizes != [fixed]:
        notes.append(f"latency measured at the model's fixed batch size {fixed} only (asked: {sizes})")
    for p in provs:
        psess, reason = _provider_session(model_path, p, threads, sess)
        if psess is None:
            result["latency"][p] = {"skipped": reason}
            continue
        entry = {}
        for b in lat_sizes:
            feeds = _bench_feeds(specs, dataset, b)
            try:
                entry[str(b)] = _latency(psess, feeds, b, int(warmup), int(runs))
            except Exception as exc:  # onnxruntime raises its own exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise OnnxAdmmError(
                    f"onnxruntime failed to run the model at batch {b} on {p}: {first}"
                ) from None
        result["latency"][p] = entry
    return result


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _fmt_acc(a) -> str:
    return "n/a" if a is None else f"{a:.4f}"


def format_evaluation(d: dict) -> str:
    """A human-readable report of :func:`evaluate_model`'s result."""
    lines = [f"model:        {d['model']}", f"file size:    {_fmt_bytes(d.get('file_bytes'))}"]
    ref = d.get("reference")
    if ref:
        ratio = ""
        if d.get("file_bytes") and ref.get("file_bytes"):
            ratio = f"  (compression {ref['file_bytes'] / d['file_bytes']:.2f}x)"
        lines += [
            f"reference:    {ref['model']}",
            f"ref. size:    {_fmt_bytes(ref.get('file_bytes'))}{ratio}",
        ]
    lines.append(f"samples:      {d.get('samples', 0)}")
    if d.get("batch"):
        lines.append(f"fixed batch:  {d['batch']}")
    acc = f"accuracy:     {_fmt_acc(d.get('accuracy'))}"
    if ref and ref.get("accuracy") is not None:
        acc += f"   reference: {_fmt_acc(ref['accuracy'])}"
        if d.get("accuracy") is not None:
            acc += f"   ({(d['accuracy'] - ref['accuracy']) * 100:+.2f} points)"
    lines.append(acc)
    reg = d.get("regression")
    if reg:
        line = f"regression:   RMSE {reg['rmse']:.4g}  MAE {reg['mae']:.4g}  R^2 {reg['r2']:.4f}"
        rreg = (ref or {}).get("regression")
        if rreg:
            line += f"   reference: RMSE {rreg['rmse']:.4g}  R^2 {rreg['r2']:.4f}"
        lines.append(line)
    if ref:
        lines.append(f"agreement:    {_fmt_acc(d.get('agreement'))}  (same top-1 as the reference)")
        if d.get("max_abs_diff") is not None:
            rel = d.get("max_rel_diff")
            rel_s = f"  ({rel:.3g} of the reference's max |output|)" if rel is not None else ""
            lines.append(f"max |diff|:   {d['max_abs_diff']:.4g}{rel_s}")
        fits = d.get("fit_to_reference") or {}
        for name, f in list(fits.items())[:4]:
            lines.append(f"fit {name!r}: RMSE {f['rmse']:.4g}, R^2 {f['r2']:.6f} against the reference's output")
        if len(fits) > 4:
            lines.append(f"  ({len(fits) - 4} more outputs in the JSON)")
    lat = d.get("latency") or {}
    if lat:
        lines.append("latency:")
        for p, entry in lat.items():
            if "skipped" in entry:
                lines.append(f"  {p:<5} skipped: {entry['skipped']}")
                continue
            for b, s in entry.items():
                lines.append(
                    f"  {p:<5} batch {b:>4}: p50 {s['p50_ms']:.3f} ms  p90 {s['p90_ms']:.3f} ms  "
                    f"{s['samples_per_s']:,.0f} samples/s"
                )
    for note in d.get("notes") or []:
        lines.append(f"note: {note}")
    return "\n".join(lines)
