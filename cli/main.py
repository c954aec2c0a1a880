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
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(model, as_json):
    """Describe MODEL: producer, opsets, inputs/outputs, compressible layers, unsupported ops.

    Example: onnxadmm inspect models/digits_cnn.onnx
    """
    from onnxadmm.validate.inspect import describe, format_description

    d = describe(model)
    _emit_json(d) if as_json else click.echo(format_description(d))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
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


def main(argv=None):
    global DEBUG
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        DEBUG = True
    return cli.main(args=argv, prog_name="onnxadmm")


if __name__ == "__main__":
    main()
