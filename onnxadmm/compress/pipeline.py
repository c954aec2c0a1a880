"""``compress()``: import, ADMM-prune progressively, write back, validate in onnxruntime, report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..data import Dataset, input_specs_of, load_data
from ..errors import ConfigError, DataError, NothingToCompressError, OnnxAdmmError
from ..export.writer import export_onnx
from ..importer import analysis
from ..importer.graph import OnnxGraphModule
from ..modelio import load_model, save_model
from ..validate.evaluate import evaluate_model, extract_outputs, file_bytes
from .admm import Engine, plan
from .config import CompressConfig
from .objective import refine_heads, training_heads
from .pruning import allocate, matches, progressive_rates

FORMATS = ("auto", "dense", "sparse", "codebook", "int8")


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or torch.is_tensor(v)


def _whole_pair(data) -> bool:
    """``(inputs, labels)`` of whole arrays (not a sequence of two batches): a 2-tuple whose labels
    are an array with as many rows as the inputs and fewer dimensions."""
    if not (isinstance(data, tuple) and len(data) == 2 and _is_array(data[1])):
        return False
    x, y = data
    first = next(iter(x.values()), None) if isinstance(x, dict) else x
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    return _is_array(first) and first.ndim > y.ndim and len(first) == len(y)


def _gather(data, specs, data_options) -> Dataset:
    """A Dataset from a Dataset, dict of arrays, path/name, an (inputs, labels) pair of whole
    arrays, or any iterable of batches."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike, dict)):
        return load_data(data, specs, **(data_options or {}))
    if _whole_pair(data):
        data = [data]
    # iterable of batches: (inputs, labels) or inputs; inputs an array, a tuple/list, or a dict
    cols: dict[str, list] = {s.name: [] for s in specs}
    labels: list = []
    for batch in data:
        pair = isinstance(batch, tuple) or (isinstance(batch, list) and len(specs) == 1)
        x, y = batch if pair and len(batch) == 2 else (batch, None)
        if isinstance(x, dict):
            items = x
        elif isinstance(x, (list, tuple)):
            items = dict(zip([s.name for s in specs], x))
        else:
            items = {specs[0].name: x}
        for k, v in items.items():
            cols.setdefault(k, []).append(np.asarray(v.detach().cpu() if torch.is_tensor(v) else v))
        if y is not None:
            labels.append(np.asarray(y.detach().cpu() if torch.is_tensor(y) else y))
    if not any(cols.values()):
        raise DataError("the data iterable yielded no batches")
    try:
        arrays = {k: np.concatenate(v) for k, v in cols.items() if v}
        if labels:
            arrays["y"] = np.concatenate(labels)
    except ValueError as e:
        raise DataError(f"the data batches do not stack into one array per input ({e})") from None
    return load_data(arrays, specs, **(data_options or {}))


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pick_format(fmt: str, weights: dict[str, np.ndarray], original: onnx.ModelProto) -> set[str]:
    """Tensors to store as sparse initializers (of those not already in packed form). auto: each
    tensor where COO (values + int64 indices) is smaller than dense; only initializers can be sparse
    (Constant-node weights stay dense)."""
    if fmt == "dense":
        return set()
    inits = {t.name for t in original.graph.initializer}
    dtypes = _weight_dtypes(original)  # the training state is float32; the file keeps float16 as is
    out = set()
    for name, w in weights.items():
        if name not in inits:
            continue
        nnz = int(np.count_nonzero(w))
        itemsize = dtypes.get(name, np.dtype(np.float32)).itemsize
        if fmt == "sparse" or nnz * (itemsize + 8) < w.size * itemsize:
            out.add(name)
    return out


def compress(
    model,
    output,
    data,
    *,
    val_data=None,
    config: CompressConfig | None = None,
    fmt: str = "auto",
    report: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    data_options: dict | None = None,
    teacher: str | os.PathLike | None = None,
    log=None,
    **overrides,
) -> dict:
    """Prune ``model`` with ADMM to ``config.rate`` and write ``output``; returns the report dict.

    ``data``/``val_data``: a path (.npz or folder of .npy), ``"digits"``, a dict of arrays, a
    :class:`Dataset`, an ``(inputs, labels)`` pair of whole arrays or any iterable of
    ``(inputs, labels)`` batches. ``teacher``: an ONNX model to distil from instead of ``model``
    (same inputs and training outputs; e.g. the dense original when ``model`` is already
    compressed). Keyword ``overrides`` set config fields (``rate=50``, ``lr=1e-3``, ...).
    """
    t0 = time.perf_counter()
    log = log or (lambda s: None if quiet else print(s, flush=True))
    cfg = (config or CompressConfig()).updated(**overrides).validate()
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "int8" and (cfg.bits != 8 or cfg.edge_bits not in (None, 8)):
        raise ConfigError("--format int8 needs --bits 8 (integer kernels run 8-bit weights)")
    if (
        fmt == "codebook"
        and not cfg.quantizing
        and cfg.rate is not None
        and cfg.rate <= 1
        and not cfg.layer_rates
    ):
        raise ConfigError(
            "--format codebook needs quantized or pruned weights (--bits, --clusters or --rate)"
        )
    in_path = Path(model)
    out_path = Path(output)
    from ..export.storage import expand_storage

    proto = expand_storage(load_model(in_path))  # weights in onnxadmm's compact storage: plain again
    if out_path.exists() and out_path.resolve() == in_path.resolve() and not force:
        raise ConfigError(f"output {out_path} is the input model; refusing to overwrite it (use --force)")
    if out_path.is_dir():
        raise ConfigError(f"output {out_path} is a folder")
    report_path = Path(report) if report else out_path.with_name(out_path.stem + ".report.json")
    ckpt_path = Path(checkpoint) if checkpoint else out_path.with_name(out_path.name + ".ckpt")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    found = analysis.find_weights(proto)
    if not any(w.compressible for w in found):
        raise NothingToCompressError(
            f"nothing to compress in {in_path}: no float weights feed Conv/ConvTranspose/Gemm/MatMul"
        )
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    weights = module.compressible_weights()
    untrainable = analysis.untrainable_outputs(proto)
    built = {w.name for w in module.weights}
    left_out = [w.name for w in found if w.compressible and w.name not in built]
    if untrainable:
        ops = ", ".join(sorted(set(untrainable.values())))
        log(
            f"training on {', '.join(h.name for h in heads)}: the output(s) {', '.join(untrainable)} come "
            f"after {ops} and are kept as they are in the written model"
        )
    if left_out:
        log(f"not compressed (no training output depends on them): {', '.join(left_out)}")
    sizes = {w.name: w.params for w in weights}
    unknown = [n for n in cfg.layer_rates if n not in sizes]
    unmatched = [p for p in cfg.exclude if not any(matches(n, [p]) for n in sizes)]
    if unknown or unmatched:
        raise ConfigError(
            f"unknown layer(s) {', '.join(unknown + unmatched)}; compressible weights: {', '.join(sizes)}"
        )

    specs = input_specs_of(proto)
    specs = [s for s in specs if s.name in module.input_names]
    ds = _gather(data, specs, data_options)
    if val_data is not None:
        train, val = ds, _gather(val_data, specs, data_options)
        val_note = "given"
    else:
        train, val = ds.split(cfg.val_fraction, cfg.seed)
        val_note = f"{cfg.val_fraction:.0%} held out of the training data (seed {cfg.seed})"
    _check_indices(proto, ds)
    if val_data is not None:
        _check_indices(proto, val)
    first = proto.graph.output[0].name  # the output the labels describe
    if first in untrainable and train.labels is not None:
        log(f"labels ignored: they describe the output {first!r}, which training cannot reach")
        train, val = Dataset(train.inputs, None, train.source), Dataset(val.inputs, None, val.source)
    if train.labels is None:
        log("no labels: training by distillation from the original model")

    device = torch.device(cfg.device)
    module.to(device)
    sample = _original_outputs(module, train, slice(0, 1), device)  # the outputs' shapes and sizes
    heads = refine_heads(heads, sample, train.labels)
    if train.labels is not None and heads[0].kind == "regression":
        per_label, per_out = train.labels[:1].size, sample[0][:1].numel()
        if per_label != per_out:
            raise DataError(
                f"the labels hold {per_label} value(s) per sample, but the output {heads[0].name!r} "
                f"(a regression output) has {per_out}: give targets of the output's shape, or no labels"
            )
    if cfg.distill is None:
        cfg.distill = _auto_distill(sample, heads, train, log)
    teacher_out = None
    # the labels describe the first output: the others of a multi-output model are kept by distillation
    others = train.labels is not None and len(heads) > 1 and cfg.distill == 0
    if others and sum(o.numel() * 4 for o in sample) * len(train) > TEACHER_CACHE_LIMIT:
        log(f"labels train {heads[0].name!r}; the other outputs are too large to cache and go untrained")
        others = False
    elif others:
        log(f"labels train {heads[0].name!r}; the other outputs are distilled from the original")
    if train.labels is None or cfg.distill > 0 or others:
        source = module if teacher is None else _teacher_module(teacher, module, sample, train, device)
        teacher_out = _teacher_outputs(source, train, device)
        if teacher is not None:
            log(f"distilling from {teacher}")
    elif teacher is not None:
        log(f"the teacher {teacher} is not used: distill is 0 and the data has labels")

    # an input that is already sparse (an earlier run, another pruner) starts the steps where it is,
    # and its zeros stay pruned (also when it is only quantized: a binarized zero would become +-q)
    with torch.no_grad():
        start = {n: max(1, min(sizes[n], int(torch.count_nonzero(module.parameter_for(n))))) for n in sizes}
    groups, biases, views, couples = _structure(cfg, proto, weights, log)
    cfg.allocation_power = cfg.power()  # (auto resolved: the report shows the value used)
    scales = {}
    if cfg.importance == "auto":  # (the report's config shows the choice)
        cfg.importance = "activation" if train.labels is None else "magnitude"
    if cfg.importance == "activation" and cfg.rate > 1:  # what each layer keeps: |w| x its input's rms
        from .importance import input_scales

        scales = input_scales(proto, module, [w for w in weights if w.name in sizes], train.inputs, device,
                              cfg.batch_size, seed=cfg.seed)  # fmt: skip
    rate = cfg.rate  # the rate training prunes to (non-zero weights)
    if groups and cfg.shrink and cfg.rate > 1:
        # --rate counts the weights written: a removed filter takes the next layer's slices with it,
        # so training stops at the lower rate whose smaller layers hold total/--rate weights
        rate = _written_rate(
            cfg, proto, module.onnx_state(), sizes, start, groups, views, biases, couples, scales
        )
        log(
            f"{cfg.structure} pruning: {rate:.3g}x of the weights in training leaves layers "
            f"{cfg.rate:.3g}x smaller once the removed channels are cut out"
        )
    allocated = allocate(sizes, rate, cfg.layer_rates, cfg.exclude, cfg.allocation_power)
    final = {n: min(allocated[n], start[n]) for n in sizes}
    pruning = any(final[n] < start[n] for n in sizes)
    start_rate = sum(sizes.values()) / sum(start.values())
    if pruning and start_rate > 1.001:
        log(f"the input model is already {start_rate:.3g}x sparse: the progressive steps start from there")
    steps = []
    if pruning or not cfg.quantizing:
        if cfg.progressive and start_rate < rate:
            steps = progressive_rates(rate, cfg.step_factor, start=start_rate)
        else:
            steps = [rate]
    # progressive steps: each layer's kept count moves geometrically from its non-zeros to its final count
    keep = [
        {
            n: max(final[n], int(round(start[n] * (final[n] / start[n]) ** ((s + 1) / len(steps)))))
            for n in sizes
        }
        for s in range(len(steps))
    ]
    rates = list(steps)  # nominal step rates (labels, report); the kept counts above are exact
    quant: list = [None] * len(steps)
    specs_q = _quant_specs(cfg, weights) if cfg.quantizing else {}
    if specs_q:  # prune first, then put the surviving weights on their levels
        keep.append(dict(final))
        rates.append(cfg.rate)
        quant.append(specs_q)
    labels = [f"{r:.3g}x" for r in rates[: len(steps)]] + (["quantize"] if specs_q else [])
    # the final step's retraining (auto: a restart at a higher lr from cfg.restart_rate up)
    cfg.final_retrain_epochs, cfg.final_retrain_lr = cfg.final_epochs(pruning), cfg.final_lr(pruning)
    cfg.epochs_per_iteration = cfg.iteration_epochs()
    retarget = None
    if steps and pruning and not groups and cfg.shrink:
        # --rate counts the weights written here too: channels that no weight reads (or that read
        # nothing) are cut out with the weights on them, so the last pruning step keeps more in training
        retarget = (len(steps) - 1, _retarget_fn(cfg, proto, module, sizes, scales, log))
    engine = Engine(
        module, heads, train, val, teacher_out, cfg, keep, log, quiet, quant=quant, groups=groups, biases=biases,
        views=views, couples=couples, scales=scales, retarget=retarget,
    )  # fmt: skip
    units = plan(cfg, len(rates), engine.final_step)
    with torch.no_grad():  # zeros of a sparse input are pruned weights: they stay pruned
        for n in sizes:
            if start[n] < sizes[n]:
                engine.state.masks[n] = module.parameter_for(n).detach() != 0
    meta = {"model_sha256": _sha(in_path), "config": cfg.to_dict(), "rates": rates}

    if resume:
        if not ckpt_path.exists():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        # tensors come back on this run's device: a run may go on on another device than it began
        blob = torch.load(ckpt_path, weights_only=False, map_location=device)
        if blob["meta"]["model_sha256"] != meta["model_sha256"]:
            raise ConfigError(f"--resume: checkpoint {ckpt_path} was made from another model")
        if set(blob["meta"]["config"]) != set(meta["config"]):
            raise ConfigError(
                f"--resume: checkpoint {ckpt_path} was written by another onnxadmm version (its settings "
                "differ in kind); start again without --resume"
            )
        changed = sorted(k for k in meta["config"] if blob["meta"]["config"][k] != meta["config"][k])
        changed = [k for k in changed if k != "device"]
        if changed:
            raise ConfigError(
                f"--resume: checkpoint {ckpt_path} was made with other settings ({', '.join(changed)}); "
                "rerun with the same ones"
            )
        engine.load(blob)
        log(f"resuming after unit {engine.state.unit + 1}/{len(units)} from {ckpt_path}")

    what = (
        f"pruning {sum(sizes.values()):,} weights in {len(sizes)} layers to {cfg.rate:.4g}x" if steps else ""
    )
    if specs_q:
        q = f"{cfg.clusters} clusters" if cfg.clusters else f"{cfg.bits} bits" if cfg.bits > 1 else "binary"
        what = (what + ", then " if what else f"{sum(sizes.values()):,} weights in {len(sizes)} layers: ") + q
    log(what + (f" in {len(rates)} steps ({', '.join(labels)})" if len(rates) > 1 else ""))
    optimizer = None
    try:
        for i, unit in enumerate(units):
            if i <= engine.state.unit:
                continue
            first_of_phase = i == 0 or units[i - 1].kind != unit.kind or units[i - 1].step != unit.step
            if unit.kind == "admm" and first_of_phase:
                engine.start_admm(unit.step)
            if unit.kind == "retrain" and first_of_phase:
                engine.hard_prune(unit.step)
            if optimizer is None or first_of_phase:
                lr = cfg.lr if unit.kind == "admm" else cfg.retrain_lr_of(unit.step, engine.final_step)
                optimizer = engine.make_optimizer(lr)
                if engine.state.optimizer is not None and not first_of_phase:
                    optimizer.load_state_dict(engine.state.optimizer)
                engine.state.optimizer = None
            label = f"step {unit.step + 1}/{len(rates)} {labels[unit.step]} " + (
                f"admm {unit.index + 1}/{cfg.admm_iterations}"
                if unit.kind == "admm"
                else f"retrain {unit.index + 1}"
            )
            stats = engine.train_epoch(unit, optimizer, label)
            stats.update({"unit": i, "kind": unit.kind, "step": unit.step, "rate": rates[unit.step]})
            engine.state.history.append(stats)
            engine.state.unit = i
            engine.save(ckpt_path, optimizer, meta)
            log(_format_stats(label, stats))
    except KeyboardInterrupt:
        log(
            f"interrupted: checkpoint after unit {engine.state.unit + 1}/{len(units)} kept at {ckpt_path}; "
            "rerun the same command with --resume to continue"
        )
        raise

    # final weights: exact masks and levels (the last phase is always masked retraining)
    engine.finalize()
    state = module.onnx_state()
    pruned = {n for n in sizes if final[n] < sizes[n]}
    grids = dict(engine.state.grids)
    shrunk = None
    original = proto  # the input model, kept apart: shrink hands back a new graph
    trained = {w.name: int(np.count_nonzero(state[w.name])) for w in weights}
    if cfg.shrink and (groups or _dead_slices(state, weights)):  # remove the channels that no longer matter
        proto, state, grids, shrunk = _shrink(proto, state, grids, val, log, set(groups))
        # non-zero weights that went with the channels: a reader's weights on a constant channel,
        # whose contribution now sits in its bias
        shrunk["nonzero_removed"] = sum(trained.values()) - sum(
            int(np.count_nonzero(state[n])) for n in trained
        )
    sparse_ok = fmt == "codebook" or (fmt == "auto" and bool(grids or pruned) and _sparse_decoders_ok(proto))
    encodings = _encodings(fmt, grids, state, proto, sparse_ok)
    encodings.update(
        _compact_sparse(fmt, {n: state[n] for n in pruned if n not in encodings}, proto, sparse_ok)
    )
    coo = _pick_format(fmt, {n: state[n] for n in pruned}, proto)  # each one's form if left unpacked
    encodings, layout = _select_storage(fmt, encodings, state, proto, coo=coo)
    sparse = coo - set(encodings)
    work = Path(tempfile.mkdtemp(prefix="onnxadmm-"))
    try:  # the work folder goes whatever happens
        ref_path = in_path
        if out_path.exists() and out_path.resolve() == in_path.resolve():
            ref_path = work / "original.onnx"  # --force over the input: keep the original as the reference
            save_model(original, ref_path)
        original_bytes = file_bytes(in_path)
        int8_info = None
        packed_error = None  # why --format auto fell back from codes + codebooks to plain tensors
        if fmt == "int8":
            int8_info = _write_int8(proto, state, grids, out_path, train, module.input_names, work, log)
        elif not encodings:
            export_onnx(proto, state, out_path, sparse=sparse, force=force)
        else:  # codes + codebooks decoded by standard ops that onnxruntime folds at load
            from ..export.storage import apply_storage

            plain = export_onnx(proto, state, work / "plain.onnx", sparse=sparse)
            try:
                packed = apply_storage(load_model(plain), encodings, layout=layout)
            except OnnxAdmmError as exc:
                if fmt != "auto":
                    raise
                packed_error = str(exc)
                msg = f"packed storage not possible ({exc}); writing plain and COO sparse tensors instead"
                log(msg)
                if quiet:  # the report's summary also says so; API users in quiet mode get a warning
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                encodings = {}
                sparse = coo
                export_onnx(proto, state, out_path, sparse=sparse, force=force)
            else:
                save_model(packed, out_path)  # atomic: out_path is either untouched or complete
        train_seconds = time.perf_counter() - t0

        graph_outs = [o.name for o in proto.graph.output]
        view_outs = analysis.training_outputs(proto)
        if view_outs != graph_outs:
            # e.g. a model whose only output is an accuracy: validate the logits it computes
            ev_model, ev_ref = work / "compressed.onnx", work / "original.onnx"
            extract_outputs(out_path, ev_model, module.input_names, view_outs)
            extract_outputs(ref_path, ev_ref, module.input_names, view_outs)
            log(f"validating on output(s) {', '.join(view_outs)} (the model's own outputs are not trainable)")
        else:
            ev_model, ev_ref = out_path, ref_path
        ev = evaluate_model(
            ev_model, val, reference=ev_ref, providers=("cpu",), batch_sizes=(1,), warmup=2, runs=10
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ev["file_bytes"] = file_bytes(out_path)
    if ev.get("reference"):
        ev["reference"]["file_bytes"] = original_bytes
    layers = []
    for w in weights:
        nz = int(np.count_nonzero(state[w.name]))
        layers.append(
            {
                "name": w.name,
                "op": w.op_type,
                "shape": list(w.shape),
                "params": w.params,
                "nonzero": nz,
                "rate": w.params / max(nz, 1),
            }
        )
        if tuple(np.shape(state[w.name])) != tuple(w.shape):  # physically smaller after shrink
            layers[-1]["shape_after"] = list(np.shape(state[w.name]))
        if nz != trained[w.name]:  # weights on channels cut out, folded into a bias
            layers[-1]["nonzero_trained"] = trained[w.name]
    total = sum(x["params"] for x in layers)
    nonzero = sum(x["nonzero"] for x in layers)
    others = [w for w in module.weights if not w.compressible]
    others += [w for w in analysis.find_weights(proto) if w.name in left_out]
    rep = {
        "model": str(in_path),
        "output": str(out_path),
        "pruning_rate": total / max(nonzero, 1),
        "target_rate": cfg.rate,
        # the weights training kept: fewer are written when channels are cut out (with a pruned filter
        # the next layer's slices go; with unstructured pruning the channels left dead)
        "training_rate": total / max(sum(trained.values()), 1),
        "weights": {"total": total, "nonzero": nonzero},
        "layers": layers,
        "not_compressed": {
            "params": sum(w.params for w in others),
            "tensors": len(others),
            "untrainable_weights": left_out,  # no training output depends on them
        },
        "untrainable_outputs": untrainable,  # {graph output: the op that keeps it out of training}
        "teacher": None if teacher is None or teacher_out is None else str(teacher),
        "structure": cfg.structure,
        "shrunk": shrunk,
        "accuracy": {
            "original": (ev.get("reference") or {}).get("accuracy"),
            "compressed": ev.get("accuracy"),
        }
        if val.labels is not None
        else None,
        "regression": {  # a regression output scored against the labels: rmse, mae, r2
            "original": (ev.get("reference") or {}).get("regression"),
            "compressed": ev.get("regression"),
        }
        if ev.get("regression")
        else None,
        "agreement": ev.get("agreement"),
        "max_abs_diff": ev.get("max_abs_diff"),
        "fit_to_original": ev.get("fit_to_reference"),
        "file_bytes": {
            "original": original_bytes,
            "compressed": ev.get("file_bytes"),
        },
        "format": {
            "requested": fmt,
            "sparse_tensors": sorted(sparse) if fmt != "int8" else [],
            "codebook_tensors": sorted(encodings) if fmt != "int8" else [],
            "int8": int8_info,
            "packed_error": packed_error,
        },
        "quantization": {
            n: {"kind": g.kind, "bits": g.bits, "levels": g.levels, "per_channel": g.group_axis is not None}
            for n, g in grids.items()
        },
        "storage": _storage(out_path, {w.name: w.params for w in weights}),
        "latency": ev.get("latency"),
        "validation": {"samples": len(val), "source": val_note},
        "seconds": time.perf_counter() - t0,
        "train_seconds": train_seconds,
        "steps": rates,
        "epochs": engine.state.steps / engine.batches_per_epoch,
        "optimizer_steps": engine.state.steps,
        "history": engine.state.history,
        "config": cfg.to_dict(),
    }
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(rep, indent=2, default=_json_default))
    os.replace(tmp, report_path)
    rep["report_path"] = str(report_path)
    if ckpt_path.exists():
        ckpt_path.unlink()
    return rep


def _structure(cfg: CompressConfig, proto, weights, log) -> tuple[dict, dict, dict, list]:
    """Structured pruning: the axes each layer's group norms sum over, (filter pruning) the constants
    zeroed with each removed filter, the block views of dense layers that read a flattened
    convolution output (channel pruning: one group per convolution channel, i.e. per block of input
    features, so whole channels go), and (filter pruning) the groups of layers whose channels go
    together (summed by residual connections; a depthwise convolution and the layer feeding it),
    which keep the same filters. Filter pruning leaves the last
    layers (the classifier heads, whose outputs are the classes) to unstructured pruning; excluded
    layers stay dense either way."""
    from ..export.shrink import channel_blocks, coupled_layers, coupled_readers
    from .pruning import group_dims

    if cfg.structure == "none":
        return {}, {}, {}, []
    heads = analysis.last_layers(proto, weights) if cfg.structure == "filter" else set()
    blocks = channel_blocks(proto) if cfg.structure == "channel" else {}
    groups, views = {}, {}
    for w in weights:
        if w.name in heads or matches(w.name, cfg.exclude):
            continue
        if w.name in blocks and len(w.shape) == 2:
            # one group per convolution channel: a block of features, or (channels last) every c-th
            c, interleaved = blocks[w.name]
            k = w.shape[w.in_axis] // c
            if w.in_axis == 1:
                views[w.name], groups[w.name] = (
                    ((w.shape[0], k, c), (0, 1)) if interleaved else ((w.shape[0], c, k), (0, 2))
                )
            else:
                views[w.name], groups[w.name] = (
                    ((k, c, w.shape[1]), (0, 2)) if interleaved else ((c, k, w.shape[1]), (1, 2))
                )
            continue
        dims = group_dims(cfg.structure, len(w.shape), w.out_axis, w.in_axis)
        if dims is not None:
            groups[w.name] = dims
    left = [w.name for w in weights if w.name not in groups and not matches(w.name, cfg.exclude)]
    if left:
        log(f"{cfg.structure} pruning; pruned weight by weight instead: {', '.join(left)}")
    biases = analysis.biases_of(proto) if cfg.structure == "filter" else {}
    couples = []
    if cfg.structure == "filter":
        # a residual stream or a depthwise chain: all its layers filter-pruned, else none is coupled
        # (a dense or unstructured member keeps the channels whatever the others do)
        outs = {w.name: w.shape[w.out_axis] for w in weights if w.out_axis is not None}
        couples = [
            c
            for c in coupled_layers(proto)
            if all(n in groups and n in outs for n in c) and len({outs[n] for n in c}) == 1
        ]
        if couples:
            log(
                f"filter pruning: {len(couples)} group(s) of layers tied by residual sums or depthwise "
                f"convolutions keep the same filters ({sum(map(len, couples))} layers)"
            )
    elif cfg.structure == "channel":
        # the readers of one tensor or residual stream, all channel-pruned on their own input axis:
        # they drop the same channels, so that the channels leave the producers too
        ins = {w.name: w.shape[w.in_axis] for w in weights if w.in_axis is not None}
        couples = [
            c for c in coupled_readers(proto)
            if all(n in groups and n not in views and n in ins for n in c) and len({ins[n] for n in c}) == 1
        ]  # fmt: skip
        if couples:
            log(
                f"channel pruning: {len(couples)} group(s) of layers reading the same channels drop the "
                f"same ones ({sum(map(len, couples))} layers)"
            )
    return groups, biases, views, couples


def _same_outputs(a: list, b: list) -> tuple[bool, float]:
    """Whether two runs' outputs agree up to rounding (shrinking re-orders sums and folds constants into
    biases): floats within 1e-4 (or 8 machine epsilons of their type, for float16) of the largest
    output magnitude, everything else exactly; and the largest float difference."""
    ok, worst = True, 0.0
    for x, y in zip(a, b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return False, float("inf")
        if not np.issubdtype(x.dtype, np.floating):
            ok &= bool(np.array_equal(x, y))
            continue
        if not x.size:
            continue
        d = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
        tol = max(1e-4, 8 * float(np.finfo(x.dtype).eps)) * max(1.0, float(np.max(np.abs(x))))
        ok &= d <= tol
        worst = max(worst, d)
    return ok, worst


def _written_rate(
    cfg,
    proto,
    state: dict,
    sizes: dict,
    start: dict,
    groups: dict,
    views: dict,
    biases: dict,
    couples: list,
    scales: dict | None = None,
) -> float:
    """Structured pruning: the training rate (non-zero weights) at which the layers written after
    shrinking hold ``total / cfg.rate`` weights. Each trial masks the current weights as training's
    projection would (whole groups of largest norm, the heads by magnitude, the removed filters'
    biases zeroed), cuts the dead channels out (``export.shrink``) and counts what is left; a
    bisection on the rate, between 1x and ``cfg.rate`` (the written count never exceeds the trained
    one), keeps the lowest rate that meets the budget."""
    from ..export.shrink import shrink_channels
    from ..export.writer import initializer_values, with_weights
    from .pruning import alive_channels, supports

    budget = sum(sizes.values()) / cfg.rate

    def written(r: float) -> float:
        try:
            keep = allocate(sizes, r, cfg.layer_rates, cfg.exclude, cfg.allocation_power)
        except ConfigError:  # fixed-rate layers already prune more than r
            return math.inf
        st = dict(state)
        ks = {n: min(keep[n], start[n]) for n in sizes}
        ws = {n: torch.as_tensor(np.asarray(state[n], np.float32)) for n in sizes if ks[n] < sizes[n]}
        alloweds = {n: (w != 0) if start[n] < sizes[n] else None for n, w in ws.items()}
        masks = supports(ws, ks, groups, views, alloweds, couples, scales)  # what training's projection keeps
        for n, w in ws.items():
            dims, mask = groups.get(n), masks[n]
            st[n] = (w * mask).numpy()
            alive = alive_channels(mask, dims) if dims is not None and n not in views else None
            if alive is not None:
                alive = alive.numpy()
                for b in biases.get(n, ()):
                    if b in st and np.asarray(st[b]).size == alive.size:
                        st[b] = np.asarray(st[b]) * alive.reshape(np.shape(st[b]))
        values = initializer_values(shrink_channels(with_weights(proto, st)).model)
        return sum(int(np.count_nonzero(values[n])) for n in sizes if n in values)

    if written(cfg.rate) * 1.002 >= budget:  # nothing (or next to nothing) is cut out
        return cfg.rate
    lo, hi = 1.0, cfg.rate  # written(lo) above the budget, written(hi) within it
    if written(lo) <= budget:
        return lo
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        if written(mid) > budget:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.002:
            break
    return hi


def _check_indices(proto, ds: Dataset) -> None:
    """Inputs that index a table (token ids into an embedding: Gather of an initializer, the ids
    reaching it as :func:`analysis.index_input` follows them): every value within the table's size,
    else a DataError naming the input (torch would stop with a bare IndexError, onnxruntime with an
    out-of-bounds error)."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = analysis._producers(graph)
    for n in graph.node:
        if n.op_type != "Gather" or len(n.input) < 2 or n.input[0] not in inits:
            continue
        name = analysis.index_input(n.input[1], producers, set(ds.inputs))
        x = np.asarray(ds.inputs[name]) if name is not None else None
        if x is None or not np.issubdtype(x.dtype, np.integer) or not x.size:
            continue
        dims = list(inits[n.input[0]].dims)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        size = dims[axis % len(dims)] if dims else 0
        lo, hi = int(x.min()), int(x.max())
        if lo < -size or hi >= size:
            bad = lo if lo < -size else hi
            raise DataError(
                f"input {name!r}: value {bad} is out of range for {n.input[0]!r}, which has "
                f"{size} entries (valid: {-size} to {size - 1})"
            )


def _retarget_fn(cfg, proto, module, sizes: dict, scales: dict, log):
    """Unstructured pruning's last step: the counts to keep, from the current weights, so that the
    written model holds ``total / cfg.rate`` weights once the channels left dead are cut out (a filter
    whose outputs no weight reads goes, and so do a reader's weights on a channel whose filter kept
    nothing: that channel is a constant, folded into the reader's bias). The same search as
    structured pruning's (:func:`_written_rate`), on the weights the step starts from: the pruned
    weights stay pruned (a layer keeps at most its non-zeros)."""

    def fn() -> dict[str, int]:
        state = module.onnx_state()
        now = {n: max(1, int(np.count_nonzero(state[n]))) for n in sizes}
        rate = _written_rate(cfg, proto, state, sizes, now, {}, {}, {}, [], scales)
        keep = allocate(sizes, rate, cfg.layer_rates, cfg.exclude, cfg.allocation_power)
        if rate < cfg.rate / 1.002:
            log(
                f"pruning: training keeps 1/{rate:.4g} of the weights so that at most 1/{cfg.rate:.4g} are "
                "written once the dead channels are cut out"
            )
        return {n: min(keep[n], now[n]) for n in sizes}

    return fn


def _dead_slices(state: dict, weights) -> bool:
    """Whether a compressible layer has a filter or an input channel with no non-zero weight left
    (what :func:`_shrink` may cut out); a cheap test that spares the export of models without any."""
    for w in weights:
        a = np.asarray(state[w.name])
        for axis in {w.out_axis, w.in_axis} - {None}:
            if (
                a.ndim > axis
                and a.shape[axis] > 1
                and not np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).any(1).all()
            ):
                return True
    return False


def _shrink(proto, state: dict, grids: dict, val: Dataset, log, structured=()):
    """The pruned model with its removable channels removed (``export.shrink``), checked in onnxruntime
    against the unshrunk one on validation samples; returns (model, weights, grids, summary).

    ``structured``: the layers pruned in whole groups; the log names those that keep all their
    channels. Unstructured pruning at high rates leaves dead channels too (a filter with no weight
    left, an input that no weight reads), and those go the same way."""
    import dataclasses

    from ..export.shrink import shrink_channels
    from ..export.writer import initializer_values, with_weights
    from ..validate import ortrun

    pruned = with_weights(proto, state)
    res = shrink_channels(pruned)
    what = "structured pruning" if structured else "pruning"
    blocked = {w: why for w, why in res.blocked.items() if w in structured}
    for w, why in list(blocked.items())[:5]:
        log(f"structured pruning: {w} keeps all its output channels (they reach {why})")
    if len(blocked) > 5:
        log(f"structured pruning: {len(blocked) - 5} more layers keep all their output channels")
    if not res.removed:
        if structured:
            log("structured pruning: no channel could be removed physically")
        return proto, state, grids, {"channels_removed": {}, "checked": False, "kept_whole": blocked}
    try:
        before, after = ortrun.session(pruned), ortrun.session(res.model)
        specs = ortrun.input_specs(before)
        batch = ortrun.fixed_batch_of(specs) or min(len(val), 32)  # fixed-batch exports run theirs
        feeds = ortrun.random_inputs(specs, batch=batch, seed=0)
        for name in feeds:
            if name in val.inputs and len(val) >= batch:
                feeds[name] = val.inputs[name][:batch]
        a, b = before.run(None, feeds), after.run(None, feeds)
        ok, diff = _same_outputs(a, b)
    except Exception as exc:  # noqa: BLE001 - any failure: keep the unshrunk model
        log(f"{what}: the smaller model does not run ({exc}); keeping the full-size layers")
        return proto, state, grids, {"channels_removed": {}, "checked": False, "error": str(exc)}
    if not ok:
        log(f"{what}: the smaller model's outputs differ by {diff:.3g}; keeping the full-size layers")
        return proto, state, grids, {"channels_removed": {}, "checked": False, "max_abs_diff": diff}
    values = initializer_values(res.model)
    state = {n: (values[n] if n in values else v) for n, v in state.items()}
    for n, g in list(grids.items()):
        idx = res.kept.get(n, {}).get(g.group_axis) if g.group_axis is not None else None
        if idx is not None:
            t = torch.as_tensor(idx)
            grids[n] = dataclasses.replace(
                g, codebook=g.codebook[t], step=None if g.step is None else g.step.reshape(-1)[t]
            )
    removed = sum(res.removed.values())
    log(
        f"{what}: {removed} channels removed physically (outputs checked in onnxruntime, max diff {diff:.2g})"
    )
    summary = {
        "channels_removed": dict(res.removed),
        "checked": True,
        "max_abs_diff": diff,
        "kept_whole": blocked,
    }
    return res.model, state, grids, summary


def _storage(path: Path, original_params: dict | None = None) -> dict | None:
    """The storage summary of the written file (``onnxadmm report``), or None if it cannot be made."""
    from ..validate.storage_report import storage_report

    try:
        return storage_report(path, original_params=original_params)
    except Exception as exc:  # noqa: BLE001 - the summary must not fail a finished compression
        return {"error": str(exc)}


def _weight_dtypes(proto: onnx.ModelProto) -> dict[str, np.dtype]:
    """numpy dtype of every float initializer and sparse initializer, by name."""
    out = {}
    for t in proto.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            out[t.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    for sp in proto.graph.sparse_initializer:
        if sp.values.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            out[sp.values.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(sp.values.data_type))
    return out


def _plain_cost(name: str, w: np.ndarray) -> int:
    """Bytes a dense initializer of ``w`` takes in the file (data, name, dims and framing, roughly)."""
    return w.nbytes + len(name.encode()) + 8 + 2 * w.ndim


def _coo_cost(name: str, w: np.ndarray) -> int:
    """Bytes of the same weight as an ONNX COO sparse initializer (values + int64 indices)."""
    nnz = int(np.count_nonzero(w))
    return nnz * (w.itemsize + 8) + 2 * len(name.encode()) + 24 + 2 * w.ndim


def _sparse_decoders_ok(proto: onnx.ModelProto) -> bool:
    """Whether the packed sparse decoders (opset 11) can go into this model: it is at opset 11 or
    more, or raising it changes no node's schema, or onnx.version_converter's raised model gives
    the same onnxruntime outputs on random inputs (its adapters are not all exact: Upsample becomes
    a Resize-11 with another coordinate mode, for example)."""
    from ..export.storage import default_opset, raise_opset
    from ..validate import ortrun

    if default_opset(proto) >= 11:
        return True
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    try:
        raised = raise_opset(copy, 11)
        before = ortrun.session(proto)
        feeds = ortrun.random_inputs(ortrun.input_specs(before), batch=2, seed=0)
        a = before.run(None, feeds)
        b = ortrun.session(raised).run(None, feeds)
    except Exception:  # noqa: BLE001 - any failure: keep the model's opset, use COO instead
        return False
    return all(
        x.shape == y.shape and np.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True)
        for x, y in zip(a, b, strict=True)
    )


def _encodings(
    fmt: str, grids: dict, state: dict, proto: onnx.ModelProto, sparse_ok: bool | None = None
) -> dict:
    """Codebook storage (packed codes, codebook, positions when sparse) for each quantized weight held
    in an initializer: with ``auto`` and ``codebook``; each tensor dense or sparse, whichever is smaller.
    ``auto`` uses no sparse form where the model's opset cannot safely be raised to 11
    (:func:`_sparse_decoders_ok`); :func:`_select_storage` then leaves in plain floats (their values
    still exactly on the grid) the tensors whose packed form would take more bytes."""
    if fmt not in ("auto", "codebook") or not grids:
        return {}
    from ..export.storage import encode_from_values

    dtypes = _weight_dtypes(proto)
    if sparse_ok is None:
        sparse_ok = fmt == "codebook" or _sparse_decoders_ok(proto)
    out = {}
    for n, g in grids.items():
        if n not in dtypes:
            continue
        w = np.asarray(state[n]).astype(dtypes[n])  # the stored dtype (float16 models)
        book = g.codebook.detach().cpu().numpy().astype(dtypes[n]).astype(np.float32)
        # zeros (pruned entries) off the codebook, e.g. binary {-q, +q}: only the sparse form holds them
        zeros_off = bool((w == 0).any()) and not bool((book == 0).any(axis=1).all())
        if zeros_off and not sparse_ok:
            continue
        out[n] = encode_from_values(
            w, book, g.group_axis, sparse=True if zeros_off else (None if sparse_ok else False)
        )
    return out


def _select_storage(
    fmt: str, encodings: dict, state: dict, proto: onnx.ModelProto, bundle: bool = True, coo: set | None = None
) -> tuple[dict, tuple | None]:
    """With ``auto``, the encodings that make the file smaller (the others' weights stay plain, or
    COO sparse: ``coo`` names those that would be, by default every weight with zeros where COO is
    smaller): shared decoders (bundles, unless ``bundle`` is False) where the opset allows, else each
    weight's own decoder against its plain (or COO) bytes, priced in the dtype the file stores; and
    that layout ``(bundles, singles)`` for :func:`~onnxadmm.export.storage.apply_storage`.
    ``codebook`` keeps them all (layout None: apply_storage chooses)."""
    if fmt != "auto" or not encodings:
        return encodings, None
    from ..export.storage import default_opset, select_storage

    if coo is None:
        coo = _pick_format("auto", {n: np.asarray(state[n]) for n in encodings}, proto)
    dtypes = _weight_dtypes(proto)
    opset = max([default_opset(proto)] + [11 for e in encodings.values() if e.sparse])
    plain = {}
    for n in encodings:
        w = np.asarray(state[n]).astype(dtypes.get(n, np.dtype(np.float32)))
        plain[n] = min(_plain_cost(n, w), _coo_cost(n, w)) if n in coo else _plain_cost(n, w)
    bundles, singles = select_storage(encodings, opset, plain=plain, bundle=bundle)
    keep = {n for names in bundles for n in names} | set(singles)
    return {n: e for n, e in encodings.items() if n in keep}, (bundles, singles)


def _compact_sparse(
    fmt: str, weights: dict[str, np.ndarray], original: onnx.ModelProto, sparse_ok: bool | None = None
) -> dict:
    """Pruned float weights stored as raw values + packed relative positions (storage format 5):
    every one with ``codebook``; with ``auto`` each where that adds fewer bytes to the file than both
    the dense tensor and an ONNX sparse initializer (values + int64 indices), in models whose opset is
    11 or can safely be raised to it (``sparse_ok``; None: :func:`_sparse_decoders_ok` decides)."""
    from ..export.storage import default_opset, encode_sparse, file_cost

    opset = default_opset(original)
    if fmt not in ("auto", "codebook") or not weights:
        return {}
    if sparse_ok is None:
        sparse_ok = fmt == "codebook" or _sparse_decoders_ok(original)
    if not sparse_ok:
        return {}
    dtypes = _weight_dtypes(original)
    out = {}
    for name, w in weights.items():
        if name not in dtypes or np.size(w) >= 2**31:
            continue
        w = np.asarray(w).astype(dtypes[name])
        enc = encode_sparse(w)
        if fmt == "codebook" or file_cost(enc, name, opset) < min(_plain_cost(name, w), _coo_cost(name, w)):
            out[name] = enc
    return out


def _write_int8(proto, state, grids, out_path: Path, train: Dataset, input_names, work: Path, log) -> dict:
    """int8 weights and activations with integer kernels (QDQ), the trained 8-bit grid kept exactly."""
    from ..export.int8 import export_int8, integer_kernel_weights
    from ..export.writer import with_weights

    bad = [n for n, g in grids.items() if g.kind != "uniform" or g.codebook.shape[1] > 255]
    if not grids or bad or any(g.bits != 8 for g in grids.values()):
        raise ConfigError(
            "--format int8 needs every compressed layer quantized with --bits 8 (and no --edge-bits)"
        )
    # every trained tensor (biases, normalisation, layers integer kernels cannot take) as trained
    proto = with_weights(proto, state)
    kernels = integer_kernel_weights(proto, list(grids))
    if not kernels:
        raise ConfigError(
            "--format int8: no quantized weight feeds a Conv/Gemm/MatMul weight input, so integer "
            "kernels have nothing to run; use --format auto"
        )
    others = sorted(set(grids) - set(kernels))
    if others:
        log(f"int8: {len(others)} weight(s) outside Conv/Gemm/MatMul kept as float32 on their 8-bit grid: "
            + ", ".join(others[:5]) + (" ..." if len(others) > 5 else ""))  # fmt: skip
    weights = {n: np.asarray(state[n], dtype=np.float32) for n in kernels}
    scales = {
        n: (float(g.step.reshape(-1)[0]) if g.group_axis is None else g.step.detach().cpu().numpy())
        for n, g in grids.items()
        if n in weights
    }
    axes = {n: g.group_axis for n, g in grids.items() if g.group_axis is not None and n in weights}
    idx = np.random.default_rng(0).permutation(len(train))[: min(len(train), 512)]
    calibration = {n: train.inputs[n][np.sort(idx)] for n in input_names}
    tmp = work / "int8.onnx"
    info = export_int8(proto, weights, scales, tmp, calibration, fmt="qdq", axes=axes or None)
    save_model(load_model(tmp), out_path)
    info["path"] = str(out_path)
    info["float_weights"] = others
    return info


def _quant_specs(cfg: CompressConfig, weights) -> dict:
    """Per-layer value sets: ``bits``/``clusters`` for every compressible layer not excluded, with
    ``edge_bits`` for the first and last of them (graph order) when given."""
    from .admm import QuantSpec

    names = [w.name for w in weights if not matches(w.name, cfg.exclude)]
    edges = {names[0], names[-1]} if names else set()
    out = {}
    for w in weights:
        if w.name not in names:
            continue
        axis = w.out_axis if cfg.granularity == "channel" else None
        bits = cfg.edge_bits if (cfg.edge_bits and w.name in edges) else cfg.bits
        if cfg.clusters and not (cfg.edge_bits and w.name in edges):
            out[w.name] = QuantSpec(clusters=int(cfg.clusters))
        else:
            out[w.name] = QuantSpec(bits=int(bits), axis=axis, zero_level=bool(cfg.zero_level))
    return out


def _json_default(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _format_stats(label: str, s: dict) -> str:
    parts = [label, f"loss {s['loss']:.4f}"]
    if s.get("val_accuracy") is not None:
        parts.append(f"val acc {s['val_accuracy']:.4f}")
    if "rho" in s:
        parts.append(f"rho {s['rho']:.3g}")
    if "residual" in s:
        parts.append(f"residual {s['residual']:.4f}")
    if "frozen" in s:
        parts.append(f"frozen {s['frozen']:.1%}")
    return "  ".join(parts)


TEACHER_CACHE_LIMIT = 1 << 30  # bytes of the original's outputs kept for distillation by default


def _auto_distill(sample: list[torch.Tensor], heads, train: Dataset, log) -> float:
    """Default distillation weight with labels: 1 (the original's soft outputs alongside the labels,
    which measurably helps pruned classifiers keep accuracy) when every training output is a classifier
    head and caching the original's outputs on the training data takes at most 1 GiB; else 0.
    ``sample``: the original's outputs on one training sample."""
    if train.labels is None:
        return 0.0  # no labels: distillation is the whole loss anyway
    if any(h.kind == "regression" for h in heads):
        return 0.0
    per_sample = sum(o.numel() * 4 for o in sample)
    if per_sample * len(train) > TEACHER_CACHE_LIMIT:
        log(
            "labels only: the original's outputs on the training data are too large to cache for distillation"
        )
        return 0.0
    return 1.0


def _original_outputs(module: OnnxGraphModule, ds: Dataset, rows: slice, device) -> list[torch.Tensor]:
    """The (still unchanged) module's training outputs on ``ds``'s ``rows``, on the CPU."""
    module.eval()
    with torch.no_grad():
        out = module(*[torch.from_numpy(ds.inputs[n][rows]).to(device) for n in module.input_names])
    module.train()
    return [o.detach().cpu() for o in (out if isinstance(out, tuple) else (out,))]


def _teacher_module(path, module: OnnxGraphModule, sample: list[torch.Tensor], ds: Dataset, device):
    """The model at ``path`` imported as a distillation teacher for ``module``: it must read the
    same inputs and give training outputs of the same shapes (``sample``: the student's on one row)."""
    from ..export.storage import expand_storage

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"teacher {p}: not found")
    proto = expand_storage(load_model(p))
    heads = training_heads(proto)
    teacher = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    missing = [n for n in teacher.input_names if n not in ds.inputs]
    if missing:
        raise ConfigError(
            f"teacher {p}: reads input(s) {', '.join(missing)}, which the model to compress does not have"
        )
    teacher.to(device)
    out = _original_outputs(teacher, ds, slice(0, 1), device)
    if [tuple(o.shape) for o in out] != [tuple(o.shape) for o in sample]:
        raise ConfigError(
            f"teacher {p}: its training outputs have shapes {[list(o.shape) for o in out]}, the model's "
            f"{[list(o.shape) for o in sample]}; the teacher must compute the same outputs"
        )
    return teacher


def _teacher_outputs(module: OnnxGraphModule, ds: Dataset, device) -> list[torch.Tensor]:
    """The original model's training outputs on every training sample (computed once)."""
    chunks = [_original_outputs(module, ds, slice(i, i + 256), device) for i in range(0, len(ds), 256)]
    return [torch.cat([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def format_report(rep: dict) -> str:
    lines = []
    w = max([len(x["name"]) for x in rep["layers"]] + [5])
    w = min(w, 48)
    lines.append(f"{'layer':<{w}}  {'shape':<20} {'params':>10} {'nonzero':>9} {'rate':>9}")
    for x in rep["layers"]:
        shape = "x".join(map(str, x["shape"]))
        if "shape_after" in x:  # physically smaller after structured pruning
            shape += " -> " + "x".join(map(str, x["shape_after"]))
        lines.append(
            f"{x['name'][:w]:<{w}}  {shape:<20} {x['params']:>10,} {x['nonzero']:>9,} {x['rate']:>8.1f}x"
        )
    lines.append(
        f"{'total':<{w}}  {'':<20} {rep['weights']['total']:>10,} {rep['weights']['nonzero']:>9,} "
        f"{rep['pruning_rate']:>8.1f}x"
    )
    lines.append("")
    shrunk = rep.get("shrunk") or {}
    if shrunk.get("channels_removed"):
        how = (
            f"structured pruning ({rep['structure']})"
            if rep.get("structure", "none") != "none"
            else "pruning"
        )
        lines.append(
            f"{how}: {sum(shrunk['channels_removed'].values())} channels "
            "removed from the ONNX layers (outputs checked in onnxruntime against the full-size layers)"
        )
    acc = rep.get("accuracy")
    if acc and acc.get("compressed") is not None and acc.get("original") is not None:
        lines.append(
            f"accuracy (onnxruntime, {rep['validation']['samples']} held-out samples): "
            f"original {acc['original']:.4f}  compressed {acc['compressed']:.4f}"
        )
    reg = rep.get("regression")
    if reg and reg.get("compressed"):
        o, c = reg.get("original") or {}, reg["compressed"]
        lines.append(
            f"regression (onnxruntime, {rep['validation']['samples']} held-out samples): "
            + (f"original RMSE {o['rmse']:.4g} R^2 {o['r2']:.4f}  " if o else "")
            + f"compressed RMSE {c['rmse']:.4g} R^2 {c['r2']:.4f}"
        )
    if rep.get("agreement") is not None:
        lines.append(
            f"top-1 agreement with the original: {rep['agreement']:.4f}   max |output diff| {rep['max_abs_diff']:.4g}"
        )
    elif rep.get("max_abs_diff") is not None:
        fits = rep.get("fit_to_original") or {}
        r2 = min((f["r2"] for f in fits.values()), default=None)
        lines.append(
            f"max |output diff| from the original: {rep['max_abs_diff']:.4g}"
            + (f"   R^2 against the original's outputs: {r2:.6f}" if r2 is not None else "")
        )
    fb = rep["file_bytes"]
    lines.append(
        f"file size: {fb['original']:,} -> {fb['compressed']:,} bytes ({fb['original'] / max(fb['compressed'], 1):.2f}x)"
        + (
            f", {len(rep['format']['sparse_tensors'])} sparse tensors"
            if rep["format"]["sparse_tensors"]
            else ""
        )
        + (
            f", {len(rep['format']['codebook_tensors'])} in packed form (decoded at load)"
            if rep["format"].get("codebook_tensors")
            else ""
        )
        + (", int8 integer kernels (QDQ)" if rep["format"].get("int8") else "")
    )
    if rep["format"].get("packed_error"):
        lines.append(
            "warning: packed storage was not possible, plain tensors written instead: "
            + rep["format"]["packed_error"]
        )
    st = rep.get("storage") or {}
    if st.get("total"):
        from ..validate.storage_report import format_storage_report

        lines += ["", format_storage_report(st)]
    lines.append(f"time: {rep['seconds']:.1f} s   report: {rep.get('report_path', '')}")
    return "\n".join(lines)


__all__ = ["compress", "format_report", "CompressConfig", "OnnxAdmmError"]
