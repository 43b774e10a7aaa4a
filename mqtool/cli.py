"""The `mqtool` command line: parse options, call one library function, print.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no traceback); 3 quality gate failed
(`convert --min-fidelity`: the file is written, its self-check agreement is below the gate); 1 internal
error (a short message and a hint to re-run with --debug, which prints the traceback).
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import click

from mqtool import __version__
from mqtool.dataspec import cli_data, cli_max_samples
from mqtool.errors import InputError


class _Group(click.Group):
    """A click group that turns exceptions into the exit-code contract."""

    def invoke(self, ctx: click.Context):
        try:
            return self._invoke(ctx)
        finally:
            if "mqtool.search.distributed" in sys.modules:  # never import torch just to shut it down
                sys.modules["mqtool.search.distributed"].shutdown()

    def _invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except InputError as e:
            _debug_traceback(ctx)
            click.echo(f"mqtool: error: {_in_cli_terms(e)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("mqtool: interrupted", err=True)
            ctx.exit(130)
        except MemoryError:
            _debug_traceback(ctx)
            click.echo("mqtool: out of memory (try fewer samples in --data or a smaller model)", err=True)
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

    global _STARTED
    _STARTED = time.monotonic()  # the time budget counts from here
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def inspect(model: str, as_json: bool) -> None:
    """List the quantizable layers of MODEL (Conv, ConvTranspose, Gemm, MatMul with a constant weight)
    with their weight shape, parameters and MACs per sample, and totals."""
    from mqtool.analysis import analyze
    from mqtool.model import load_model

    info = analyze(load_model(model, allow_quantized=True), allow_quantized=True)
    if as_json:
        click.echo(json.dumps({"model": model, **info.to_json()}, indent=2))
        return
    if info.quantized_nodes:
        name, op = info.quantized_nodes[0]
        _err(
            f"note: {model} is already quantized ({len(info.quantized_nodes)} quantization nodes, e.g. "
            f"'{name}' {op}); convert and search refuse it"
        )
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


def search_options(f):
    """Options shared by `search` and `convert --target-*` (they map onto `SearchConfig` fields)."""
    opts = [
        click.option(
            "--workdir",
            type=click.Path(file_okay=False),
            default=None,
            help="Checkpoints and the trained MetaQuantNet (default: a per-model folder in ~/.cache/mqtool).",
        ),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same policy)."
        ),
        click.option(
            "--epochs",
            type=click.IntRange(0, 10_000),
            default=4,
            show_default=True,
            help="MetaQuantNet training epochs.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(1, 1_000_000),
            default=128,
            show_default=True,
            help="Mini-batch of MetaQuantNet training and finetuning (global: split across torchrun ranks). "
            "Unless set, lowered for large inputs (memory) and small data (at least 16 steps an epoch).",
        ),
        click.option(
            "--population",
            type=click.IntRange(2, 100_000),
            default=50,
            show_default=True,
            help="GA population: also the new candidates bred per generation (half mutations, half "
            "crossovers, from the best fifth).",
        ),
        click.option("--generations", type=click.IntRange(1, 100_000), default=20, show_default=True),
        click.option(
            "--metric",
            type=click.Choice(["ce", "kl", "cosine", "sqnr"]),
            default=None,
            help="Fitness on the search split (default: ce with labels, kl without).",
        ),
        click.option(
            "--search-act",
            is_flag=True,
            help="Also decide per layer whether its input activation is quantized.",
        ),
        click.option(
            "--pin",
            "pins",
            multiple=True,
            metavar="NODE=BITS",
            help="Fix a layer's weight bits (2..8 or 32), e.g. --pin conv1=8. Repeatable.",
        ),
        click.option(
            "--search-split",
            type=click.FloatRange(0.01, 0.99),
            default=0.2,
            show_default=True,
            help="Fraction of --data held out to score candidate policies.",
        ),
        click.option(
            "--fitness-samples",
            type=click.IntRange(1, 10_000_000),
            default=128,
            show_default=True,
            help="Search-split samples each GA candidate is scored on (fewer: faster GA, noisier ranking); "
            "the --rerank finalists are scored on the whole split.",
        ),
        click.option(
            "--rerank",
            type=click.IntRange(0, 10_000),
            default=10,
            show_default=True,
            help="Re-score the GA's best N on the whole search split (up to 1024 samples) and keep the "
            "best of them (among statistical ties, the one using most of the budget); 0: keep the GA's "
            "own winner.",
        ),
        click.option(
            "--exact-screening",
            is_flag=True,
            help="Score every GA candidate with its activations quantized as emitted (slower). Default: "
            "candidates are screened with float activations while the activation widths are fixed "
            "(no --search-act), and the --rerank finalists get the exact fitness; with --rerank 0 or "
            "--search-act screening is always exact.",
        ),
        click.option(
            "--sensitivity-seed/--no-sensitivity-seed",
            default=True,
            show_default=True,
            help="Hybrid search: also seed the GA's first generation with the allocation that minimises "
            "the summed per-layer sensitivity under the budget (HAWQ-style prior, bits and BitOPs budgets); "
            "--no-sensitivity-seed: the paper's pure MetaQuantNet + GA. See docs/search.md.",
        ),
        click.option(
            "--finetune-start",
            type=click.Choice(["auto", "metaquantnet", "ptq"]),
            default="auto",
            show_default=True,
            help="Weights finetuning starts from: MetaQuantNet's for the chosen policy, the pretrained ones "
            "quantized (PTQ), or auto: whichever scores better on the search split.",
        ),
        click.option("--widths", default="2,3,4,5,6,8", show_default=True, help="Candidate weight widths."),
        click.option("--restart", is_flag=True, help="Ignore (and overwrite) checkpoints in the workdir."),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
            help="Where to train and score (auto: CUDA when available). Under torchrun each rank takes its "
            "LOCAL_RANK-th GPU; see docs/distributed.md.",
        ),
        click.option(
            "--time-budget",
            type=click.FloatRange(0, 100_000),
            default=15.0,
            show_default=True,
            metavar="MIN",
            help="Minutes for the whole run (setup, MetaQuantNet, GA, finetuning, emission, self-check): the "
            "epochs, GA size, fitness samples and finetuning are sized to fit and printed with an ETA; options "
            "you set explicitly are kept. 0: no limit (the values as configured).",
        ),
        click.option(
            "--latency-batch",
            type=click.IntRange(1, 65536),
            default=1,
            show_default=True,
            metavar="N",
            help="Batch size a --target-latency budget is measured at (ONNX Runtime CPU, 2 threads).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _search_config(**kw):
    """`SearchConfig` from the shared search options (flag names are the config's flat option names)."""
    from mqtool.search import SearchConfig

    pins = {}
    for p in kw.pop("pins", ()) or ():
        name, sep, bits = p.rpartition("=")
        if not sep or not name or not bits.strip().isdigit():
            raise InputError(f"--pin {p}: expected NODE=BITS, e.g. --pin conv1=8")
        pins[name] = int(bits)
    text = kw.pop("widths")
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError as e:
        raise InputError(f"--widths: expected comma-separated integers such as 2,4,8, got {text!r}") from e
    kw.pop("workdir", None)
    budget = kw.pop("time_budget", None)
    config = SearchConfig.flat(
        pins=pins, widths=widths, time_budget=budget or None, fixed=_explicit_options(), **kw
    )
    _join_ranks(config.device)
    return config


def _explicit_options() -> frozenset[str]:
    """Flat option names the user typed (the time plan never changes them)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return frozenset()
    typed = {
        name
        for name in ctx.params
        if ctx.get_parameter_source(name)
        in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    }
    return frozenset(typed)


# Library errors name config fields and arguments; the terminal shows the flag the user typed instead.
_FLAG_OF_FIELD = {
    "space.pins": "--pin",
    "budget.bits": "--target-bits",
    "budget.bitops": "--target-bitops",
    "budget.size": "--target-size",
    "budget.latency": "--target-latency",
    "budgets": "--target-bits/--target-bitops/--target-size/--target-latency",
    "data": "--data",
    "output": "-o",
    "plot": "--plot",
    "workdir": "--workdir",
}


def _flag_of(field: str) -> str | None:
    """The CLI flag of a library field name (`training.epochs` -> `--epochs`), None when there is none."""
    if field in _FLAG_OF_FIELD:
        return _FLAG_OF_FIELD[field]
    if "." not in field:  # config fields are dotted (`training.epochs`); others have no flag of their own
        return None
    from mqtool.search.config import FLAT

    for flat, (section, leaf) in FLAT.items():
        if field == (leaf if section is None else f"{section}.{leaf}"):
            return "--" + flat.replace("_", "-")
    return None


def _in_cli_terms(e: InputError) -> str:
    """The error's message with its leading field name replaced by the flag that sets it."""
    msg = str(e)
    field = getattr(e, "field", None)
    if field and msg.startswith(field):
        flag = _flag_of(field)
        if flag:
            return flag + msg[len(field) :]
    return msg


def _join_ranks(device: str) -> None:
    """Under torchrun: join the process group; ranks other than 0 stay silent and write nothing."""
    from mqtool.search import distributed

    if distributed.init_from_env(distributed.resolve_device(device)) and not distributed.is_main():
        global _QUIET
        _QUIET = True


_TARGETS = ("bits", "bitops", "size", "latency")


def _budgets(**targets: str | None) -> list:
    """The budgets of the one `--target-KIND` given (`targets`: kind -> its text or None)."""
    from mqtool.search import parse_budgets

    given = [k for k in _TARGETS if targets.get(k)]
    if len(given) != 1:
        raise InputError("give exactly one of " + ", ".join(f"--target-{k}" for k in _TARGETS))
    return parse_budgets(given[0], targets[given[0]])


_CONSOLE = None  # the run's progress display (mqtool.console), made by the command


def _console(budgets: int = 1):
    """The progress display of this run: bars with ETA on a terminal, plain lines otherwise."""
    global _CONSOLE
    from mqtool.console import Console

    _CONSOLE = Console(_STARTED, quiet=_QUIET, budgets=budgets)
    return _CONSOLE


_QUIET = False  # set on torchrun ranks other than 0
_STARTED = time.monotonic()  # reset when the command line is parsed


def _err(msg: str, bar: bool = False) -> None:
    if not _QUIET:
        click.echo(msg, err=True)


def _echo(msg: str) -> None:
    if not _QUIET:
        click.echo(msg)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    required=True,
    metavar="DATA",
    callback=cli_data,
    help="Training data: .npz (inputs, optional labels y), a folder of .npy, or FILE.py:FUNCTION / "
    "MODULE:FUNCTION returning the samples (docs/data.md).",
)
@click.option(
    "--max-samples",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    expose_value=False,
    callback=cli_max_samples,
    help="Use at most N samples of --data, the first ones (default: all of a file, 4096 from a function).",
)
@click.option("--target-bits", default=None, help="Average weight bits budget(s), e.g. 2.5 or 2.5,3,4.")
@click.option("--target-bitops", default=None, help="BitOPs budget(s) relative to uniform w8a8, e.g. 0.1.")
@click.option(
    "--target-size",
    default=None,
    metavar="SIZE",
    help="Size budget(s) of the emitted file, e.g. 1.2MB or 300KB,200KB (also searches each layer's format).",
)
@click.option(
    "--target-latency",
    default=None,
    metavar="MS",
    help="ONNX Runtime CPU latency budget(s) in ms at --latency-batch, from a per-layer table measured on this "
    "machine (also searches each layer's format).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Policy JSON (one budget) or a directory (several budgets: one policy each + pareto.json/png).",
)
@search_options
def search(
    model, data, target_bits, target_bitops, target_size, target_latency, output, workdir, **kw
) -> None:
    """Search per-layer weight bits for MODEL under one or more budgets (MetaQuantNet + genetic search)
    and write the policy file(s)."""
    from mqtool.model import load_model
    from mqtool.search import default_workdir, search_policies, write_search_outputs
    from mqtool.search.api import load_dataset

    budgets = _budgets(bits=target_bits, bitops=target_bitops, size=target_size, latency=target_latency)
    config = _search_config(**kw)
    m = load_model(model)
    ds = load_dataset(data, m)
    workdir = workdir or default_workdir(model, data)
    _err(f"workdir: {workdir}")
    outcome = search_policies(m, ds, budgets, config, workdir, _console(len(budgets)), started=_STARTED)
    if _QUIET:
        return  # rank 0 writes the outputs
    written = write_search_outputs(outcome, output)
    for r in outcome.results:
        _echo(
            f"{r.budget.describe()}: avg {r.avg_bits:.3f} bits, BitOPs {r.bitops_ratio:.3f} x w8a8, "
            f"fitness {_relative(r.relative)} ({outcome.engine.ctx.metric} {r.fitness:.4g}), {r.evaluated} "
            f"candidates in {r.seconds:.1f}s" + (f" [{r.note}]" if r.note else "")
        )
    click.echo("wrote " + ", ".join(written))


_BITS = click.IntRange(2, 8)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the QDQ model."
)
@click.option("--bits", type=_BITS, help="Uniform weight bits for every quantizable layer (2-8).")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), help="Per-layer bits (JSON).")
@click.option(
    "--act-bits",
    type=click.Choice(["2", "3", "4", "5", "6", "7", "8", "32"]),
    default="8",
    show_default=True,
    help="Activation bits of every quantized layer with --bits or --target-* (32: weight-only).",
)
@click.option(
    "--data",
    metavar="DATA",
    callback=cli_data,
    help="Calibration data: .npz, a folder of .npy, or FILE.py:FUNCTION / MODULE:FUNCTION returning the "
    "samples (docs/data.md).",
)
@click.option(
    "--max-samples",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    expose_value=False,
    callback=cli_max_samples,
    help="Use at most N samples of --data, the first ones (default: all of a file, 4096 from a function).",
)
@click.option(
    "--calibration",
    type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
    default="percentile",
    show_default=True,
    help="How activation ranges are calibrated.",
)
@click.option(
    "--storage",
    type=click.Choice(["auto", "int8", "packed"]),
    default="auto",
    show_default=True,
    help="auto: what ONNX Runtime runs fastest per layer; int8: integer kernels; packed: smallest file.",
)
@click.option(
    "--target-bits", default=None, help="Search the policy: average weight bits <= this (one value)."
)
@click.option("--target-bitops", default=None, help="Search the policy: BitOPs <= this x uniform w8a8.")
@click.option(
    "--target-size",
    default=None,
    metavar="SIZE",
    help="Search the policy: the written file <= SIZE (1.2MB, 300KB, bytes); each layer's format is searched too.",
)
@click.option(
    "--target-latency",
    default=None,
    metavar="MS",
    help="Search the policy: ONNX Runtime CPU latency <= MS at --latency-batch (measured per layer on this "
    "machine; the written model is timed at the end).",
)
@click.option(
    "--max-drop",
    type=click.FloatRange(0, 100),
    default=None,
    metavar="X",
    help="Search the smallest policy whose drop, measured on ONNX Runtime on held-out samples, is <= X points "
    "(top-1 accuracy with labels, else agreement with fp32).",
)
@click.option(
    "--finetune-epochs",
    type=click.IntRange(0, 10_000),
    default=None,
    help="Quantization-aware finetuning epochs (default 3 with --target-*, 0 with --bits/--policy).",
)
@click.option(
    "--min-fidelity",
    type=click.FloatRange(0, 1),
    default=None,
    metavar="X",
    help="Quality gate: exit 3 (the file is still written) when the self-check's model agreement with fp32 "
    "is below X (0..1).",
)
@click.option(
    "--no-self-check",
    is_flag=True,
    help="Skip the self-check (the written file run on ONNX Runtime against fp32 and 8-bit PTQ).",
)
@search_options
def convert(
    model: str,
    output: str,
    bits: int | None,
    policy_path: str | None,
    act_bits: str,
    data: str | None,
    calibration: str,
    storage: str,
    target_bits: str | None,
    target_bitops: str | None,
    target_size: str | None,
    target_latency: str | None,
    max_drop: float | None,
    finetune_epochs: int | None,
    min_fidelity: float | None,
    no_self_check: bool,
    workdir: str | None,
    **kw,
) -> None:
    """Quantize MODEL and write the QDQ model to -o. The policy comes from uniform --bits, a --policy file,
    or a search under a --target-* budget (MetaQuantNet + genetic search + finetuning)."""
    from mqtool import emit

    targets = {"bits": target_bits, "bitops": target_bitops, "size": target_size, "latency": target_latency}
    if max_drop is not None and any(targets.values()):
        raise click.UsageError("--max-drop is a budget of its own: give it without --target-*")
    searched = any(targets.values()) or max_drop is not None
    if sum([bits is not None, policy_path is not None, searched]) != 1:
        raise click.UsageError("give exactly one of --bits, --policy or a --target-* budget")
    if policy_path is not None and act_bits != "8":
        raise click.UsageError("--act-bits applies to --bits; a policy file sets act_bits per layer")
    source = emit.uniform_policy(bits, int(act_bits)) if bits is not None else None
    if policy_path is not None:
        source = emit.policy_file(policy_path)
    epochs = finetune_epochs if finetune_epochs is not None else (3 if searched else 0)
    self_check = data is not None and not no_self_check
    if min_fidelity is not None and not self_check:
        raise click.UsageError("--min-fidelity needs --data and the self-check (drop --no-self-check)")
    held, calibration_data = None, data
    if data is not None and not searched and epochs == 0:
        from mqtool.model import load_model
        from mqtool.selfcheck import hold_out

        emit.check_output_path(model, output)
        # The last samples check the result and never calibrate, checked or not: same file either way.
        held = hold_out(data, load_model(model), read=self_check)
        calibration_data = held.calibration
    summary: dict = {}
    if searched or epochs > 0:
        from mqtool.search import default_workdir
        from mqtool.search.api import finetuned_policy, searched_policy

        if data is None:
            raise InputError("--data is needed to search or finetune (training data, .npz)")
        check = emit.check_output_path
        check(model, output)
        config = _search_config(
            **kw,
            act_bits=int(act_bits),
            calibration=calibration,
            finetune_epochs=epochs,
        )
        workdir = workdir or default_workdir(model, data)
        _err(f"workdir: {workdir}")
        if searched:
            budgets = [float(max_drop)] if max_drop is not None else _budgets(**targets)
            if len(budgets) != 1:
                raise InputError("convert takes one budget; use `mqtool search` for several")
            source = searched_policy(data, budgets[0], config, workdir, _console(), summary, started=_STARTED)
        else:
            source = finetuned_policy(source, data, epochs, config, workdir, _console())
        if _QUIET:
            from mqtool.search.api import run_policy_source

            run_policy_source(model, source)  # its share of the training; rank 0 emits
            return
    result = emit.convert(
        model, output, source, data=calibration_data, calibration=calibration, storage=storage
    )
    if summary:
        pol = summary["policy"]
        bits_line = " ".join(f"{b.weight_bits}" for b in pol.layers.values())
        click.echo(
            f"searched {summary['budget']}: avg {summary['avg_weight_bits']:.3f} weight bits, BitOPs "
            f"{summary['bitops_ratio']:.3f} x w8a8; fitness {_fitness_text(summary)}"
            + (f" [{summary['note']}]" if summary["note"] else "")
        )
        click.echo(f"bits per layer (graph order): {bits_line}")
    click.echo(result.summary())
    if target_latency and summary:
        summary["latency"] = _time_written_model(model, output, data, summary, kw.get("latency_batch", 1))
    check = None
    if self_check:
        check = _convert_self_check(
            model, result, data, held, summary, min_fidelity, calibration, bits, act_bits, epochs
        )
    if check is not None and summary and not target_latency:
        result, check = _against_uniform(model, output, result, check, calibration_data, summary, calibration,
                                         storage, int(act_bits))  # fmt: skip
    if summary and _CONSOLE is not None:
        _CONSOLE.finish()
        _err(_summary_table(summary, result, check))
    if check is not None and min_fidelity is not None and not check.passes(min_fidelity):
        click.get_current_context().exit(3)


def _against_uniform(model, output, result, check, data, summary, calibration, storage, act_bits):
    """A searched average-bits file against uniform PTQ at the widest whole width of its budget
    (`mqtool.fallback`): the better one in task terms is what stays written."""
    from mqtool.fallback import against_uniform, uniform_width

    meta = summary["policy"].meta
    width = uniform_width(meta.get("budget"), meta["search_config"]["space"]["widths"])
    if width is None:
        return result, check
    try:
        fb = against_uniform(model, output, check, width, data, summary=summary, calibration=calibration,
                             storage=storage, act_bits=act_bits)  # fmt: skip
    except InputError as e:
        _err(f"WARNING: the comparison with uniform {width}-bit PTQ could not run: {_in_cli_terms(e)}")
        return result, check
    _err(fb.line())
    if fb.replaced:
        summary["replaced_by"] = (
            f"uniform {width}-bit PTQ ({fb.measure} {fb.uniform:.4f} vs {fb.searched:.4f})"
        )
        click.echo(fb.result.summary())
        _err(fb.check.text())
        return fb.result, fb.check
    return result, check


def _relative(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _time_written_model(model: str, output: str, data, summary: dict, batch: int) -> dict:
    """Time the written model on ONNX Runtime (the latency budget's promise) next to the fp32 model and
    the search's prediction."""
    from mqtool.latency import latency_feed, measure_models_latency
    from mqtool.model import load_model

    feed = latency_feed(load_model(model), data, batch)
    got = measure_models_latency({"fp32": model, "quantized": output}, feed, batch)
    predicted = summary["policy"].meta.get("predicted_latency_ms")
    _err(
        f"latency at batch {batch} (ONNX Runtime CPU, median): {got['quantized'][0]:.3f} ms measured"
        + (f", {predicted:.3f} ms predicted" if predicted is not None else "")
        + f"; fp32 {got['fp32'][0]:.3f} ms"
    )
    return {"measured_ms": got["quantized"][0], "predicted_ms": predicted, "fp32_ms": got["fp32"][0]}


def _fitness_text(s: dict) -> str:
    """The search's fitness on the readable scale (0 = uniform 8-bit PTQ, 1 = uniform lowest-width PTQ)."""
    pred, fine = s.get("predicted_relative"), s.get("finetuned_relative")
    raw = f"{s['metric']} {s['predicted_fitness']:.4g} -> {s['finetuned_fitness']:.4g}"
    if pred is None or fine is None:
        return f"({s['metric']}) predicted {s['predicted_fitness']:.4f}, after finetuning {s['finetuned_fitness']:.4f}"
    return f"predicted {pred:.3f}, after finetuning {fine:.3f} (0 = uniform 8-bit PTQ; raw {raw})"


def _summary_table(summary: dict, result, check) -> str:
    """The closing table of a searched conversion: budget, bits, size, fidelity predicted and checked,
    and the time each stage took."""
    from mqtool.console import summary_table

    rows = [
        ("budget", summary["budget"]),
        *([("written instead", summary["replaced_by"])] if "replaced_by" in summary else []),
        ("average weight bits", f"{result.avg_weight_bits:.3f}"),
        ("file", f"{result.bytes / 2**20:.2f} MiB (input {result.input_bytes / 2**20:.2f} MiB)"),
    ]
    fine = summary.get("finetuned_relative")
    rows.append(
        (
            "fitness after finetuning",
            f"{fine:.3f} (0 = uniform 8-bit PTQ)"
            if fine is not None
            else f"{summary['finetuned_fitness']:.4g}",
        )
    )
    if check is not None:
        pred = getattr(check, "predicted", None)
        if pred is not None:
            rows.append(("agreement predicted (simulation)", f"{pred.agreement:.4f}"))
        rows.append(("agreement checked (ONNX Runtime)", f"{check.agreement:.4f}"))
        if check.baseline is not None:
            rows.append(("agreement of uniform 8-bit PTQ", f"{check.baseline.agreement:.4f}"))
        rows.append(("self-check", check.verdict))
    lat = summary.get("latency")
    if lat:
        pred = "" if lat["predicted_ms"] is None else f", predicted {lat['predicted_ms']:.3f} ms"
        rows.append(
            (
                "latency (ONNX Runtime)",
                f"{lat['measured_ms']:.3f} ms measured{pred}; fp32 {lat['fp32_ms']:.3f} ms",
            )
        )
    for note in _CONSOLE.notes:
        rows.append(("note", note))
    return summary_table(rows, _CONSOLE.times)


def _convert_self_check(
    model, result, data, held, summary, min_fidelity, calibration, bits, act_bits, epochs
):
    """The self-check at the end of `convert` (docs/cli.md, "Self-check"): the table on stderr; exit 3
    below --min-fidelity, the file staying written."""
    from mqtool.selfcheck import check_conversion

    budget = result.avg_weight_bits if act_bits in ("8", "32") else min(result.avg_weight_bits, int(act_bits))
    try:
        check = check_conversion(
            model,
            result.output,
            data,
            held=held,
            summary=summary,
            calibration=calibration,
            bits=budget,
            baseline_is_quantized=bits == 8 and act_bits == "8" and epochs == 0 and result.storage == "auto",
            trained_on_data=bool(summary) or epochs > 0,
        )
    except InputError as e:
        _err(f"WARNING: the self-check could not run: {_in_cli_terms(e)} ({result.output} was written)")
        if min_fidelity is not None:
            click.get_current_context().exit(3)
        return
    _err(check.text())
    if min_fidelity is not None and not check.passes(min_fidelity):
        _err(
            f"mqtool: quality gate failed: model agreement {check.agreement:.4f} < --min-fidelity "
            f"{min_fidelity:g} ({result.output} was written)"
        )
    return check


@cli.command()
@click.argument("qmodel", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw bits per layer into this PNG.")
@click.option(
    "--compare-int8",
    is_flag=True,
    help="Also the totals of the float --reference and of ONNX Runtime's quantize_static int8 of it "
    "(calibrated on --data, or on synthetic inputs).",
)
@click.option("--reference", type=click.Path(dir_okay=False), help="The float model (for --compare-int8).")
@click.option(
    "--data",
    metavar="DATA",
    callback=cli_data,
    help="Inputs for --latency and ORT's int8 calibration: .npz, a folder of .npy, or FILE.py:FUNCTION "
    "(docs/data.md); default synthetic inputs.",
)
@click.option(
    "--latency", is_flag=True, help="Measure ONNX Runtime CPU latency: ms per layer (and of --compare-int8)."
)
@click.option("--latency-batch", type=click.IntRange(1), default=1, show_default=True, metavar="N")
def report(
    qmodel: str,
    as_json: bool,
    plot: str | None,
    compare_int8: bool,
    reference: str | None,
    data,
    latency: bool,
    latency_batch: int,
) -> None:
    """Per-layer weight/activation bits, storage and bytes of a quantized model, read from its graph."""
    from mqtool.report import compare_int8 as int8_comparison
    from mqtool.report import measure_layer_ms, plot_report
    from mqtool.report import report as build_report

    if compare_int8 and not reference:
        raise click.UsageError("--compare-int8 needs --reference FLOAT.onnx (the model QMODEL was made from)")
    rep = build_report(qmodel)
    if latency:
        measure_layer_ms(rep, qmodel, data, batch=latency_batch)
    cmp = None
    if compare_int8:
        cmp = int8_comparison(rep, reference, data, latency=latency, batch=latency_batch)
    if plot:
        plot_report(rep, plot)
    if as_json:
        doc = rep.to_json()
        if cmp is not None:
            doc["compare_int8"] = cmp.to_json()
        click.echo(json.dumps(doc, indent=2))
        return
    text = rep.table()
    if latency:
        t = rep.totals["latency"]
        text += (
            f"\nlatency (ONNX Runtime CPU, batch {t['batch']}, {t['threads']} threads): median "
            f"{t['median_ms']:.3f} ms, p90 {t['p90_ms']:.3f} ms; layers {t['median_ms'] - t['rest_ms']:.3f} ms "
            f"+ the rest {t['rest_ms']:.3f} ms"
        )
    if cmp is not None:
        text += "\n\n" + cmp.table()
    click.echo(text)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    required=True,
    metavar="DATA",
    callback=cli_data,
    help="The search's data: .npz, a folder of .npy, or FILE.py:FUNCTION / MODULE:FUNCTION (docs/data.md).",
)
@click.option(
    "--max-samples",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    expose_value=False,
    callback=cli_max_samples,
    help="Use at most N samples of --data, the first ones (default: all of a file, 4096 from a function).",
)
@click.option("--widths", default="2,3,4,5,6,8", show_default=True, help="Candidate weight widths.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="A search's workdir: adds MetaQuantNet's view when the MetaQuantNet trained there matches the "
    "model, data and options (nothing is written there).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="As for search: picks the search split.")
@click.option("--search-split", type=click.FloatRange(0.01, 0.99), default=0.2, show_default=True)
@click.option("--metric", type=click.Choice(["ce", "kl", "cosine", "sqnr"]), default=None)
@click.option(
    "--samples",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Score on the first N samples of the search split (default: all of it, up to 1024).",
)
@click.option(
    "--quantize-activations",
    is_flag=True,
    help="Quantize the activations as the emitter will (8 bits, calibrated) in every measurement; default float.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (one row per layer per width).")
@click.option(
    "--plot", type=click.Path(dir_okay=False), help="Also draw the increases per layer into this PNG."
)
def sensitivity(model, data, workdir, samples, quantize_activations, as_json, plot, **kw) -> None:
    """Per layer, how much the search's fitness rises when that layer alone is quantized to each width (the
    others float), next to MetaQuantNet's own view when --workdir holds a trained MetaQuantNet."""
    from mqtool.model import load_model
    from mqtool.search.api import load_dataset
    from mqtool.sensitivity import layer_sensitivity, plot_sensitivity

    config = _search_config(**kw)
    m = load_model(model)
    rep = layer_sensitivity(
        m,
        load_dataset(data, m),
        config,
        workdir=workdir,
        activations="quantized" if quantize_activations else "float",
        samples=samples,
        progress=lambda event, d: _err(f"  {d['done']}/{d['layers']} {d['layer']}"),
    )
    rep.model = model
    if plot:
        plot_sensitivity(rep, plot)
    click.echo(json.dumps(rep.to_json(), indent=2) if as_json else rep.table())


@cli.command()
@click.argument("qmodel", type=click.Path(dir_okay=False))
@click.option("--reference", required=True, type=click.Path(dir_okay=False), help="The float model.")
@click.option(
    "--data",
    required=True,
    metavar="DATA",
    callback=cli_data,
    help="Data: .npz, a folder of .npy, or FILE.py:FUNCTION / MODULE:FUNCTION; labels y optional (docs/data.md).",
)
@click.option(
    "--max-samples",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    expose_value=False,
    callback=cli_max_samples,
    help="Use at most N samples of --data, the first ones (default: all of a file, 4096 from a function).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of text.")
@click.option("--per-layer", is_flag=True, help="Also the SQNR of every quantized layer's output.")
def validate(qmodel: str, reference: str, data: str, as_json: bool, per_layer: bool) -> None:
    """Compare QMODEL with the float --reference on ONNX Runtime: accuracy, SQNR, kernels, latency."""
    from mqtool.validate import validate as run_validation

    result = run_validation(qmodel, reference, data, per_layer=per_layer)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.text())


def _num(v: int | None) -> str:
    return "?" if v is None else f"{v:,}"


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="mqtool")


if __name__ == "__main__":
    main()
