"""The `mqtool` command line: parse options, call one library function, print.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no traceback); 1 internal error (a short
message and a hint to re-run with --debug, which prints the traceback).
"""

from __future__ import annotations

import json
import sys
import traceback

import click

from mqtool import __version__
from mqtool.errors import InputError


class _Group(click.Group):
    """A click group that turns exceptions into the exit-code contract."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except InputError as e:
            _debug_traceback(ctx)
            click.echo(f"mqtool: error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("mqtool: interrupted", err=True)
            ctx.exit(130)
        except MemoryError:
            _debug_traceback(ctx)
            click.echo("mqtool: out of memory (try a smaller --batch-size or fewer samples)", err=True)
            ctx.exit(1)
        except Exception as e:
            _debug_traceback(ctx)
            msg = " ".join(str(e).split())[:300]
            click.echo(
                f"mqtool: internal error: {type(e).__name__}: {msg} (re-run with --debug for the traceback)",
                err=True,
            )
            ctx.exit(1)


def _debug_traceback(ctx: click.Context) -> None:
    root = ctx.find_root()
    if root.params.get("debug"):
        traceback.print_exc(file=sys.stderr)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mqtool")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
def cli(debug: bool) -> None:
    """Mixed-precision quantization of ONNX models: a bit-width per layer, searched under a budget,
    emitted as QDQ ONNX that ONNX Runtime runs on its integer kernels."""
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def inspect(model: str, as_json: bool) -> None:
    """List the quantizable layers of MODEL (Conv, ConvTranspose, Gemm, MatMul with a constant weight)
    with their weight shape, parameters and MACs per sample, and totals."""
    from mqtool.analysis import analyze
    from mqtool.model import load_model

    info = analyze(load_model(model))
    if as_json:
        click.echo(json.dumps({"model": model, **info.to_json()}, indent=2))
        return
    from mqtool.tables import format_table

    rows = [
        [layer.name, layer.op_type, "x".join(map(str, layer.weight_shape)), layer.params, _num(layer.macs)]
        for layer in info.layers
    ]
    click.echo(format_table(["layer", "op", "weight shape", "params", "MACs"], rows))
    t = info.totals
    click.echo(
        f"\n{t.layers} quantizable layers, {t.params:,} weight params ({t.fp32_weight_bytes / 2**20:.2f} MiB "
        f"fp32), {_num(t.macs)} MACs per sample; {t.model_params:,} float params in the whole model"
    )


def _num(v: int | None) -> str:
    return "?" if v is None else f"{v:,}"


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="mqtool")


if __name__ == "__main__":
    main()
