"""Library entry points of the search, wrapped by `mqtool search` and `mqtool convert --target-*`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import onnx

from mqtool.errors import InputError
from mqtool.fileio import atomic_path, atomic_write_text
from mqtool.search.budgets import Budget
from mqtool.search.config import SearchConfig
from mqtool.search.context import Samples
from mqtool.search.driver import BudgetResult, Progress, SearchEngine


@contextlib.contextmanager
def _denormals_restored():
    """The search sets the CPU's flush-denormal flag (SearchContext); a library call leaves it as torch's
    default (off) for the caller's own code, which may rely on subnormal floats."""
    try:
        yield
    finally:
        import torch

        torch.set_flush_denormal(False)


def default_workdir(model_path: str, data_path: str) -> str:
    """A per-model-and-data folder under the user's cache directory (XDG_CACHE_HOME or ~/.cache)."""
    h = hashlib.sha256()
    for p in (model_path, data_path):
        with open(p, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    stem = os.path.splitext(os.path.basename(model_path))[0]
    return os.path.join(base, "mqtool", f"{stem}-{h.hexdigest()[:12]}")


def load_dataset(path: str, model: onnx.ModelProto) -> Samples:
    """The whole data file in memory (the search trains on it for several epochs)."""
    from mqtool.data import load_labelled

    inputs, y = load_labelled(path, model)
    return Samples(dict(inputs), None if y is None else np.asarray(y, dtype=np.int64))


@dataclass
class SearchOutcome:
    results: list[BudgetResult]
    engine: SearchEngine


def _announce_ceiling(config: SearchConfig, progress: Progress | None) -> None:
    """Before the setup, the end of the run the time budget guarantees ("ceiling" event), when the plan
    may size every stage: the plan, with its own ETA, comes only after the setup, which on large inputs
    alone takes minutes (a layout detector on 800 x 608 pages: 2 min). Runs that fill their budget (every
    zoo model whose setup is long) end within a few percent of it."""
    if progress is None or config.plan.time_budget is None or config.plan.fixed & _SIZED:
        return
    progress("ceiling", {"budget_s": 60 * config.plan.time_budget})


# What the time plan sizes (`plan.plan`); a typed one keeps its value and may outlast the budget.
_SIZED = frozenset({"epochs", "population", "generations", "fitness_samples", "rerank", "finetune_epochs"})


def search_policies(
    model: onnx.ModelProto,
    data: Samples,
    budgets: list[Budget],
    config: SearchConfig,
    workdir: str,
    progress: Progress | None = None,
    *,
    info=None,
    started: float | None = None,
    finetune: bool = False,
) -> SearchOutcome:
    """Train (or reload) MetaQuantNet, then run one genetic search per budget. With `info` (its analysis),
    `model` is taken as already prepared (`passes.pipeline.prepare`) and is not prepared again. With a time
    budget (`config.plan`), the run is planned to fit from `started` (time.monotonic; default now),
    finetuning and emission included when `finetune`."""
    if not budgets:
        raise InputError("budgets: no budget given", field="budgets")
    with _denormals_restored():
        _announce_ceiling(config, progress)
        engine = SearchEngine(model, data, config, workdir, progress, info=info, started=started)
        for b in budgets:  # fail fast on an infeasible budget, before the long training
            engine.check_budget(b)
        engine.plan_run(len(budgets), finetune)
        engine.train_metaquantnet()
        results = [engine.search(b) for b in budgets]
    return SearchOutcome(results, engine)


def search_and_finetune(
    model: onnx.ModelProto,
    data: Samples,
    budget: Budget,
    config: SearchConfig,
    workdir: str,
    progress: Progress | None = None,
    *,
    info=None,
    started: float | None = None,
):
    """Search one budget and finetune its winner: (policy, QuantParams, prepared model, summary dict)."""
    outcome = search_policies(
        model, data, [budget], config, workdir, progress, info=info, started=started, finetune=True
    )
    res = outcome.results[0]
    engine = outcome.engine
    with _denormals_restored():
        params, final_fitness, predicted = engine.finetune_and_predict(res.policy)
    res.policy.meta["finetuned_fitness"] = final_fitness
    relative = engine.scorer.anchors().relative(final_fitness)
    res.policy.meta["finetuned_relative"] = float(relative) if relative == relative else None
    summary = {
        "budget": budget.label,
        "avg_weight_bits": res.avg_bits,
        "bitops_ratio": res.bitops_ratio,
        "predicted_fitness": res.fitness,
        "finetuned_fitness": final_fitness,
        "predicted_relative": res.relative,
        "finetuned_relative": res.policy.meta["finetuned_relative"],
        "metric": engine.ctx.metric,
        "note": res.note,
        "plan": None if engine.plan is None else engine.plan.to_json(),
    }
    check = engine.ctx.check_set
    if len(check):
        summary |= {"check_feeds": check.inputs, "check_labels": check.y, "predicted_fidelity": predicted}
    return res.policy, params, outcome.engine.ctx.model, summary


def search_within_drop(
    model: onnx.ModelProto,
    data: Samples,
    max_drop: float,
    config: SearchConfig,
    workdir: str,
    progress: Progress | None = None,
    *,
    info=None,
    started: float | None = None,
):
    """The smallest policy whose drop on ONNX Runtime is at most `max_drop` points (`maxdrop.py`), finetuned:
    (policy, QuantParams, prepared model, summary dict) like `search_and_finetune`."""
    from mqtool.search.maxdrop import smallest_within

    with _denormals_restored():
        _announce_ceiling(config, progress)
        engine = SearchEngine(model, data, config, workdir, progress, info=info, started=started)
        engine.plan_run(3, True)  # a bisection probes about three budgets, each finetuned
        engine.train_metaquantnet()
        best = smallest_within(engine, max_drop)
    res, policy = best.result, best.result.policy
    note = "" if best.drop <= max_drop else f"no probed size kept the drop within {max_drop:g} points"
    policy.meta["max_drop"] = {"limit": max_drop, "drop": best.drop, "measure": best.measure}
    summary = {
        "budget": f"max-drop-{max_drop:g}",
        "avg_weight_bits": res.avg_bits,
        "bitops_ratio": res.bitops_ratio,
        "predicted_fitness": res.fitness,
        "finetuned_fitness": best.finetuned_fitness,
        "predicted_relative": res.relative,
        "finetuned_relative": _finite(engine.scorer.anchors().relative(best.finetuned_fitness)),
        "metric": engine.ctx.metric,
        "note": "; ".join(x for x in (res.note, note, f"drop {best.drop:.2f} pt ({best.measure})") if x),
        "plan": None if engine.plan is None else engine.plan.to_json(),
    }
    check = engine.ctx.check_set
    summary |= {"check_feeds": check.inputs, "check_labels": check.y, "predicted_fidelity": best.predicted}
    return policy, best.params, engine.ctx.model, summary


def _finite(x: float) -> float | None:
    return float(x) if x == x and abs(x) != float("inf") else None


def pareto_front(results: list[BudgetResult], engine: SearchEngine | None = None) -> list[dict]:
    """One row per budget, cheapest first: bits, BitOPs, bytes of the file (emitted, or estimated), ms
    (predicted by the latency table when one was measured), fitness (raw and on the anchors' scale), and
    whether it is on the front (no cheaper budget reached a better fitness)."""

    def size(r: BudgetResult) -> float | None:
        if "emitted_bytes" in r.policy.meta:
            return float(r.policy.meta["emitted_bytes"])
        return None if engine is None else engine.costs.estimate(Budget("size", 1.0), r.policy)

    def ms(r: BudgetResult) -> float | None:
        if "predicted_latency_ms" in r.policy.meta:
            return float(r.policy.meta["predicted_latency_ms"])
        table = None if engine is None else engine.costs.latency_table
        return None if table is None else float(table.predict(r.policy))

    rows = sorted(
        (
            {
                "budget": r.budget.label,
                "kind": r.budget.kind,
                "value": r.budget.value,
                "avg_weight_bits": r.avg_bits,
                "bitops_ratio": r.bitops_ratio,
                "bytes": size(r),
                "ms": ms(r),
                "fitness": r.fitness,
                "relative_fitness": r.relative,
                "evaluated": r.evaluated,
                "seconds": round(r.seconds, 2),
                "note": r.note,
            }
            for r in results
        ),
        key=lambda d: d["value"],
    )
    best = float("inf")
    for row in rows:  # a point is on the front when no cheaper budget reached a better fitness
        row["pareto"] = row["fitness"] < best
        best = min(best, row["fitness"])
    return rows


def write_search_outputs(outcome: SearchOutcome, out: str) -> list[str]:
    """One budget: the policy file at `out`. Several: `out/` with policy-<kind>-<value>.json, pareto.*"""
    results = outcome.results
    if len(results) == 1:
        atomic_write_text(out, results[0].policy.dumps())
        return [out]
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{out}: several budgets write a directory, but this is a file", field="output")
    os.makedirs(out, exist_ok=True)
    written = []
    for r in results:
        p = os.path.join(out, f"policy-{r.budget.kind}-{r.budget.value:g}.json")
        atomic_write_text(p, r.policy.dumps())
        written.append(p)
    front = pareto_front(results, outcome.engine)
    p = os.path.join(out, "pareto.json")
    atomic_write_text(p, json.dumps({"metric": outcome.engine.ctx.metric, "points": front}, indent=2) + "\n")
    written.append(p)
    try:
        written.append(_plot_pareto(front, outcome.engine.ctx.metric, os.path.join(out, "pareto.png")))
    except ImportError:
        pass  # matplotlib is an optional extra; the JSON holds the same numbers
    return written


def _plot_pareto(front: list[dict], metric: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the x axis is what the budgets were in: bytes, ms, or average bits (bits and BitOPs budgets)
    kind = front[0]["kind"] if front else "bits"
    key, label = {"size": ("bytes", "file size (bytes)"), "latency": ("ms", "ONNX Runtime latency (ms)")}.get(
        kind, ("avg_weight_bits", "average weight bits")
    )
    rel = all(p["relative_fitness"] is not None for p in front)
    y = [p["relative_fitness"] if rel else p["fitness"] for p in front]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [p[key] for p in front]
    ax.plot(x, y, "o-")
    for p, xv, yv in zip(front, x, y):
        ax.annotate(p["budget"], (xv, yv), fontsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel("fitness (0 = uniform 8-bit PTQ)" if rel else f"search fitness ({metric}, lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path


def searched_policy(
    data_path: str,
    budget: Budget | float,
    config: SearchConfig,
    workdir: str,
    progress: Progress | None = None,
    summary: dict | None = None,
    started: float | None = None,
):
    """A `mqtool.emit.PolicySource`: search `budget` on the prepared model (a float: the smallest policy within
    that many points of drop, `search_within_drop`), finetune, hand the finetuned weights, scales and
    activation ranges to the emitter. `summary` (if given) is filled for the CLI."""

    def source(prepared: onnx.ModelProto, info):
        ds = load_dataset(data_path, prepared)
        search = search_within_drop if isinstance(budget, float) else search_and_finetune
        policy, params, _, s = search(
            prepared, ds, budget, config, workdir, progress, info=info, started=started
        )
        if summary is not None:
            summary.update(s, policy=policy)
        if progress is not None:
            progress("emit_start", {})
        return policy, params

    return source


def finetuned_policy(
    base,
    data_path: str,
    epochs: int,
    config: SearchConfig,
    workdir: str,
    progress: Progress | None = None,
):
    """A `PolicySource` that finetunes the policy `base` gives (quantization-aware, from the pretrained
    weights with MSE scales): `convert --bits N --finetune-epochs E` and `--policy FILE --finetune-epochs E`."""

    def source(prepared: onnx.ModelProto, info):
        policy, _ = base(prepared, info)
        ds = load_dataset(data_path, prepared)
        with _denormals_restored():
            engine = SearchEngine(prepared, ds, config, workdir, progress, info=info)
            params, fitness = engine.finetune(policy, epochs=epochs, start="ptq")
        policy.meta = dict(policy.meta, finetune_epochs=epochs, finetuned_fitness=fitness)
        return policy, params

    return source


def run_policy_source(model_path: str, source) -> None:
    """Run a policy source for its side of the collectives only (torchrun ranks other than 0)."""
    from mqtool.analysis import analyze
    from mqtool.model import load_model
    from passes.pipeline import prepare

    prepared = prepare(load_model(model_path))
    source(prepared, analyze(prepared))
