"""``onnxadmm``: a thin click shell over the library. Errors print one line and exit non-zero;
``--debug`` (anywhere on the command line) shows the traceback instead."""

from __future__ import annotations

import json
import sys

import click

from onnxadmm.errors import OnnxAdmmError

DEBUG = False


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            if DEBUG:
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OnnxAdmmError as exc:
            if DEBUG:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001  (last resort: never show a traceback without --debug)
            if DEBUG:
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"error: {type(exc).__name__}: {msg} (run with --debug for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxadmm")
def cli():
    """Compress ONNX models with ADMM and validate them in onnxruntime.

    Add --debug anywhere to see full tracebacks.
    """


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _parse_shapes(items) -> dict:
    shapes = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(
                f"{item!r}: expected NAME=D0,D1,... e.g. x=1,3,64,64", param_hint="--shape"
            )
        name, dims = item.split("=", 1)
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise click.BadParameter(f"{item!r}: dims must be integers", param_hint="--shape") from None
    return shapes


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(model, as_json):
    """Describe MODEL: producer, opsets, inputs/outputs, compressible layers, unsupported ops.

    Example: onnxadmm inspect models/digits_cnn.onnx
    """
    from onnxadmm.validate.inspect import describe, format_description

    d = describe(model)
    _emit_json(d) if as_json else click.echo(format_description(d))


@cli.command()
@click.argument("model")
@click.option("--data", help="Inputs to compare on (.npz / folder of .npy / 'digits'); default random.")
@click.option(
    "--batch", default=2, show_default=True, help="Batch size of random inputs (dynamic-batch models)."
)
@click.option(
    "--shape", "shapes", multiple=True, help="Input shape for random data: NAME=D0,D1,... (repeatable)."
)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def verify(model, data, batch, shapes, seed, as_json):
    """Check that onnxadmm handles MODEL: torch vs onnxruntime outputs, gradients, writer round trip.

    Exit 0 when every check passes. Example: onnxadmm verify models/digits_cnn.onnx
    """
    from onnxadmm.data import input_specs_of, load_data
    from onnxadmm.modelio import load_model
    from onnxadmm.validate.verify import format_result, verify_model

    proto = load_model(model)
    arrays = load_data(data, input_specs_of(proto), limit=64).inputs if data else None
    r = verify_model(model, data=arrays, batch=batch, seed=seed, shapes=_parse_shapes(shapes))
    _emit_json(r.to_dict()) if as_json else click.echo(format_result(r))
    if not r.ok:
        sys.exit(1)


def _data_options(scale, mean, std, layout) -> dict:
    def floats(text, opt):
        if text is None:
            return None
        try:
            return [float(v) for v in str(text).split(",")]
        except ValueError:
            raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint=opt) from None

    return {"scale": scale, "mean": floats(mean, "--mean"), "std": floats(std, "--std"), "layout": layout}


def data_conversion_options(f):
    f = click.option(
        "--layout",
        type=click.Choice(["nchw", "nhwc"]),
        help="Layout of image data; transposed to the model's.",
    )(f)
    f = click.option("--std", help="Divide by this (per channel: 0.229,0.224,0.225) after --mean.")(f)
    f = click.option("--mean", help="Subtract this (per channel: 0.485,0.456,0.406) after --scale.")(f)
    f = click.option(
        "--scale", type=float, help="Multiply raw data by this first (e.g. 0.00392157 for uint8 images)."
    )(f)
    return f


def _defaults():
    from onnxadmm.compress.config import CompressConfig

    return CompressConfig()


@cli.command()
@click.argument("model")
@click.argument("output")
@click.option(
    "--rate",
    help="Overall pruning rate over compressible weights: 20x (keep 5%), 20, or 95% sparsity. "
    "[default: 20x; none (1x) with --bits or --clusters alone]",
)
@click.option(
    "--structure",
    type=click.Choice(["none", "filter", "channel", "shape"]),
    help="Prune single weights (none) or whole groups: filters (output channels, dense units), input "
    "channels, or filter shapes (input channel x kernel position across all filters). Removed "
    "channels are cut out of the ONNX layers, which become physically smaller. [default: none]",
)
@click.option(
    "--importance",
    type=click.Choice(["auto", "activation", "magnitude"]),
    help="What a pruned layer keeps: activation ranks each weight by |w| times the rms of the input "
    "it multiplies on the training data (weights on near-dead inputs go first); magnitude by |w|; "
    "auto: activation when the data have no labels, else magnitude. [default: auto]",
)
@click.option(
    "--shrink/--no-shrink",
    default=None,
    help="Cut the channels that pruning leaves without effect (a filter pruned whole, an input no "
    "weight reads) out of the written layers, checked in onnxruntime. --no-shrink keeps every layer's "
    "shape. [default: --shrink]",
)
@click.option(
    "--bits",
    type=click.IntRange(1, 8),
    help="Quantize the (remaining) weights to N-bit uniform levels with ADMM; 1 binarizes to {-q, +q}.",
)
@click.option(
    "--clusters", type=click.IntRange(2, 256), help="Share at most K values per layer (ADMM k-means clustering)."
)
@click.option(
    "--granularity",
    type=click.Choice(["tensor", "channel"]),
    help="One quantization step per layer or per output channel. [default: tensor]",
)
@click.option(
    "--edge-bits",
    type=click.IntRange(1, 8),
    help="Bits for the first and last compressible layers (default: the same as --bits).",
)
@click.option(
    "--freeze-oscillations",
    type=float,
    help="Quantized retraining: freeze a weight whose level reverses more often than this per step "
    f"(moving average over ~100 steps; 0: off). [default: {_defaults().freeze_oscillations}]",
)
@click.option(
    "--data",
    required=True,
    help="Training data: .npz (arrays named after inputs, or x; labels y), folder of .npy, or 'digits'.",
)
@click.option("--val-data", help="Held-out data for validation; default: a fraction of --data is held out.")
@click.option(
    "--teacher",
    type=click.Path(dir_okay=False),
    help="Distil from this ONNX model instead of MODEL (same inputs and outputs), e.g. the dense "
    "original when MODEL is already compressed.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML/JSON file with any setting, per-layer rates and exclusions.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "dense", "sparse", "codebook", "int8"]),
    default="auto",
    show_default=True,
    help="Weight storage. auto: the smallest file (quantized layers as packed codes + codebook, "
    "pruned float layers as values + packed relative positions, both decoded by standard ops that "
    "onnxruntime folds at load; or sparse initializers / dense where smaller); "
    "dense: plain float tensors; sparse: ONNX sparse initializers; codebook: the packed form for "
    "every compressed layer; int8: integer kernels (QDQ, needs --bits 8).",
)
@click.option(
    "--report", type=click.Path(dir_okay=False), help="JSON report path [default: OUTPUT with .report.json]."
)
@click.option("--exclude", multiple=True, help="Weight name or glob to leave dense (repeatable).")
@click.option(
    "--admm-iterations", type=int, help=f"ADMM iterations per step. [default: {_defaults().admm_iterations}]"
)
@click.option(
    "--epochs-per-iteration",
    type=float,
    help="Training epochs per ADMM iteration. [default: 1; 2 when pruning alone to 200x or more]",
)
@click.option(
    "--retrain-epochs",
    type=float,
    help=f"Masked retraining epochs per step. [default: {_defaults().retrain_epochs}]",
)
@click.option(
    "--final-retrain-epochs",
    type=float,
    help="Retraining epochs of the final step (the pruning step that reaches --rate; the quantization "
    "step when nothing is pruned). [default: 2x --retrain-epochs from 100x up and with --structure filter, "
    "else as --retrain-epochs]",
)
@click.option("--rho", type=float, help=f"Initial ADMM penalty rho. [default: {_defaults().rho}]")
@click.option(
    "--rho-multiplier",
    type=float,
    help=f"rho grows by this each iteration. [default: {_defaults().rho_multiplier}]",
)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), help=f"[default: {_defaults().optimizer}]")
@click.option("--lr", type=float, help=f"W-step learning rate. [default: {_defaults().lr}]")
@click.option(
    "--lr-relative",
    type=float,
    help="Adam: each weight or bias tensor's step is at least this fraction of its rms in the input "
    f"model (0: off). [default: {_defaults().lr_relative}]",
)
@click.option(
    "--retrain-lr",
    type=float,
    help=f"Masked retraining learning rate (cosine decay to 0 per step). [default: {_defaults().retrain_lr}]",
)
@click.option(
    "--final-retrain-lr",
    type=float,
    help="Retraining learning rate of the final step (a restart: very sparse networks must move their "
    "few weights far). [default: 10x --retrain-lr from 100x up (restart_rate, set in a --config file) "
    "and with --structure filter at any rate, else as --retrain-lr]",
)
@click.option("--batch-size", type=int, help=f"[default: {_defaults().batch_size}]")
@click.option(
    "--distill", type=float, help="Weight of distillation from the original when labels exist. [default: 1 for classifiers, else 0]"
)
@click.option(
    "--progressive/--one-shot", default=None, help="Reach high rates in steps (default) or in one ADMM run."
)
@click.option(
    "--step-factor",
    type=float,
    help=f"Largest rate ratio between progressive steps. [default: {_defaults().step_factor}]",
)
@click.option(
    "--val-fraction",
    type=float,
    help=f"Fraction held out when no --val-data. [default: {_defaults().val_fraction}]",
)
@click.option("--max-batches-per-epoch", type=int, help="Cap on batches per epoch (quick runs).")
@click.option(
    "--min-batches",
    type=int,
    help=f"Floor on steps per ADMM iteration / retraining epoch (small data). [default: {_defaults().min_batches}]",
)
@click.option(
    "--device", help="torch device for training: cpu, cuda, cuda:N, mps, or auto (cuda where torch sees a GPU). [default: cpu]"
)
@click.option("--seed", type=int, help="Random seed; the same seed reproduces a run. [default: 0]")
@data_conversion_options
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint path [default: OUTPUT.ckpt].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--force", is_flag=True, help="Allow OUTPUT to be the input file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; the summary table still prints.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def compress(
    model,
    output,
    rate,
    data,
    val_data,
    teacher,
    config_file,
    fmt,
    report,
    exclude,
    scale,
    mean,
    std,
    layout,
    checkpoint,
    resume,
    force,
    quiet,
    as_json,
    progressive,
    **knobs,
):
    """Prune and/or quantize MODEL with ADMM and write OUTPUT, validated in onnxruntime.

    Example: onnxadmm compress models/digits_cnn.onnx out.onnx --rate 20x --data digits
    """
    from onnxadmm.compress.config import CompressConfig, load_config_file
    from onnxadmm.compress.pipeline import compress as run
    from onnxadmm.compress.pipeline import format_report

    settings = load_config_file(config_file) if config_file else {}
    cfg = CompressConfig().updated(**settings)
    over = {k: v for k, v in knobs.items() if v is not None}
    if rate is not None:
        over["rate"] = rate
    if progressive is not None:
        over["progressive"] = progressive
    if exclude:
        over["exclude"] = list(cfg.exclude) + list(exclude)
    rep = run(
        model,
        output,
        data,
        val_data=val_data,
        teacher=teacher,
        config=cfg.updated(**over),
        fmt=fmt,
        report=report,
        checkpoint=checkpoint,
        resume=resume,
        force=force,
        quiet=quiet or as_json,
        data_options=_data_options(scale, mean, std, layout),
    )
    _emit_json(rep) if as_json else click.echo(format_report(rep))


@cli.command()
@click.argument("model")
@click.option(
    "--data", help="Evaluation data (.npz / folder of .npy / 'digits'); default: random inputs, latency only."
)
@click.option(
    "--reference",
    type=click.Path(dir_okay=False),
    help="Original model: report its accuracy and the agreement.",
)
@click.option(
    "--providers", default="cpu,cuda", show_default=True, help="Execution providers to time (cpu, cuda)."
)
@click.option("--batch-sizes", default="1,32", show_default=True, help="Batch sizes for latency.")
@click.option(
    "--runs", default=20, show_default=True, help="Timed runs per batch size (after 3 warm-up runs)."
)
@click.option("--limit", type=int, help="Use only the first N samples.")
@data_conversion_options
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def evaluate(model, data, reference, providers, batch_sizes, runs, limit, scale, mean, std, layout, as_json):
    """Accuracy, agreement with a reference, latency (p50/p90) per execution provider, file size.

    Example: onnxadmm evaluate out.onnx --data digits --reference models/digits_cnn.onnx
    """
    import shutil
    import tempfile
    from pathlib import Path

    from onnxadmm.data import input_specs_of, load_data
    from onnxadmm.errors import DataError
    from onnxadmm.modelio import load_model
    from onnxadmm.validate.evaluate import evaluate_model, extract_outputs, format_evaluation, trainable_view

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise click.BadParameter(f"{batch_sizes!r}: expected e.g. 1,32", param_hint="--batch-sizes") from None
    provs = tuple(p.strip() for p in providers.split(",") if p.strip())
    ds, note, work, original_reference = None, None, None, reference
    if data:
        proto = load_model(model)
        options = _data_options(scale, mean, std, layout)
        try:
            ds = load_data(data, input_specs_of(proto), limit=limit, **options)
        except DataError:
            # e.g. an output that is an accuracy computed from a labels input: score the logits instead
            view = trainable_view(proto)
            if view is None:
                raise
            outs, ins = view
            specs = [s for s in input_specs_of(proto) if s.name in ins]
            ds = load_data(data, specs, limit=limit, **options)
            work = Path(tempfile.mkdtemp(prefix="onnxadmm-eval-"))
            try:
                extract_outputs(model, work / "model.onnx", ins, outs)
                if reference:
                    extract_outputs(reference, work / "reference.onnx", ins, outs)
                    reference = str(work / "reference.onnx")
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            note = (
                f"the data lack the model's other inputs: scored output(s) {', '.join(outs)} "
                f"computed from {', '.join(ins)}"
            )
    try:
        target = str(work / "model.onnx") if work else model
        d = evaluate_model(target, ds, reference=reference, providers=provs, batch_sizes=sizes, runs=runs)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    if note:  # the files the user named, not the extracted copies
        from onnxadmm.validate.evaluate import file_bytes

        d["model"], d["file_bytes"] = model, file_bytes(model)
        if d.get("reference") and original_reference:
            d["reference"]["model"] = original_reference
            d["reference"]["file_bytes"] = file_bytes(original_reference)
        d["notes"].insert(0, note)
    _emit_json(d) if as_json else click.echo(format_evaluation(d))


@cli.command()
@click.argument("model")
@click.option(
    "--reference", type=click.Path(dir_okay=False), help="Original model, for the whole-file ratio."
)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write per-layer density and bits as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def report(model, reference, plot, as_json):
    """Storage of the compressible weights: per layer and in total, parameters, non-zeros, bits per
    value, bytes of values, positions and codebooks/scales, in the file and by Deep Compression's count.

    Example: onnxadmm report out.onnx --reference models/digits_cnn.onnx
    """
    from onnxadmm.modelio import load_model
    from onnxadmm.validate.storage_report import format_storage_report, plot_storage, storage_report

    if reference:
        load_model(reference)  # a clear error for a missing or broken reference
    rep = storage_report(model, reference=reference)
    if plot:
        rep["plot"] = str(plot_storage(rep, plot))
    _emit_json(rep) if as_json else click.echo(format_storage_report(rep))


def main(argv=None):
    global DEBUG
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        DEBUG = True
    return cli.main(args=argv, prog_name="onnxadmm")


if __name__ == "__main__":
    main()
