"""Benchmark: where a GA candidate's time goes, and what the product's scoring shortcuts save (issue 15).

    python bench/bench_candidate.py [--models NAME ...] [--genomes 24] [--max-samples N] [--quick]

Per model (the two examples, and every zoo model whose cache bench/zoo/run.py has built): MetaQuantNet
trained for one epoch, then random policies feasible at 4 average weight bits, drawn by the GA's own
sampler, each scored by `Scorer.evaluate` in two ways:
- before, the naive candidate: the first 128 rows of the search split (the default fitness_samples; the
  whole split where it is smaller), activations fake-quantized as emitted, no racing;
- after, the product's defaults: the same rows, float activations while screening (decided as
  `SearchEngine._search` decides it), racing against a reference genome (the median of the sample under
  the naive fitness; the GA races against its worst parent).
Reported per model: ms per candidate before and after (median of interleaved passes) and their ratio, how
many candidates racing stopped early, where a candidate's time goes (MetaQuantNet's `generate`, forward
passes, fitness terms, the rest: the product's own calls, timed on a few candidates), and what the
shortcuts cost in fidelity: Kendall tau between the two fitness orders, whether both pick the same best,
and how much worse under the naive fitness the default's pick is than the naive pick (on the anchors'
scale: 0 = uniform 8-bit PTQ, 1 = uniform PTQ at the lowest width).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

BITS = 4.0  # the budget the policies are drawn under (average weight bits)
# A model's timed passes (one naive, one default, in alternating order) are repeated up to --repeats times,
# but only while one pair takes under this many seconds: a slow model's single pass already averages over
# minutes of work, and three of them would triple a zoo run.
REPEAT_UNDER_S = 60.0
# Already quantized (ConvInteger + DynamicQuantizeLinear): mqtool refuses it (bench/zoo/models.py).
REFUSED = {"ddddocr_old"}
QUICK_SAMPLES = 400  # --quick: the first 400 samples of mnist_cnn (80 in the search split)
STAGES = ("generate", "forward", "terms", "other")


def zoo_names() -> list[str]:
    """The zoo models bench/zoo/run.py has fetched and built data for (its cache is git-ignored)."""
    from zoo.models import ZOO, model_dir

    return [
        n
        for n in ZOO
        if n not in REFUSED
        and all(os.path.exists(os.path.join(model_dir(n), f)) for f in ("model.onnx", "data.npz"))
    ]


def load(name: str, args):
    """(model, Samples) as the CLI loads them; a zoo model's data.npz capped at --max-samples samples."""
    from mqtool.data import load_labelled
    from mqtool.model import load_model
    from mqtool.search.api import load_dataset
    from mqtool.search.context import Samples

    if name in common.EXAMPLES:
        ex = common.EXAMPLES[name]
        model = load_model(os.path.join(ex, "model.onnx"))
        data = load_dataset(os.path.join(ex, "train.npz"), model)
        return model, data.take(np.arange(QUICK_SAMPLES)) if args.quick else data
    from zoo.models import model_dir

    model = load_model(os.path.join(model_dir(name), "model.onnx"))
    # load_dataset's own two lines, with an optional cap on the samples read (a shorter setup; but the
    # search split, 20% of the data, shrinks with it, and racing cannot stop anyone at <= 64 samples).
    inputs, y = load_labelled(os.path.join(model_dir(name), "data.npz"), model, args.max_samples)
    return model, Samples(dict(inputs), None if y is None else np.asarray(y, dtype=np.int64))


def synchronizer(device) -> Callable[[], None]:
    """Waits for queued GPU work before a clock is read (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def stage_timers(scorer, sync: Callable[[], None]) -> Iterator[dict[str, float]]:
    """Seconds spent in MetaQuantNet's `generate`, the context's `forward_feeds` and the scorer's `terms_of`
    while the block runs. The three are wrapped as instance attributes that shadow the methods (removed on
    exit), so what is timed is the product's own `Scorer._score`, not a copy of it that could drift."""
    spent = dict.fromkeys(STAGES[:3], 0.0)
    depth = dict.fromkeys(STAGES[:3], 0)
    targets = {"generate": (scorer.mqn, "generate"), "forward": (scorer.ctx, "forward_feeds")}
    targets["terms"] = (scorer, "terms_of")

    def timed(stage: str, fn: Callable) -> Callable:
        def wrapper(*a, **k):
            # forward_feeds calls itself on memory-bounded runs: only the outermost call counts
            depth[stage] += 1
            if depth[stage] == 1:
                sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[stage] -= 1
                if depth[stage] == 0:
                    sync()
                    spent[stage] += time.perf_counter() - t0

        return wrapper

    for stage, (obj, attr) in targets.items():
        setattr(obj, attr, timed(stage, getattr(obj, attr)))
    try:
        yield spent
    finally:
        for obj, attr in targets.values():
            delattr(obj, attr)


def breakdown(scorer, genomes, ref, sync: Callable[[], None]) -> dict:
    """Mean ms per candidate in each stage, each candidate scored alone as `evaluate` scores it."""
    total = 0.0
    with stage_timers(scorer, sync) as spent:
        for g in genomes:
            scorer.first_look = True  # as in the timed pass (evaluate([g]) adapts it after every call)
            sync()
            t0 = time.perf_counter()
            scorer.evaluate([g], ref)
            sync()
            total += time.perf_counter() - t0
    ms = {k: 1000 * v / len(genomes) for k, v in spent.items()}
    ms["other"] = max(0.0, 1000 * total / len(genomes) - sum(ms.values()))
    whole = sum(ms.values()) or 1.0
    return {"candidates": len(genomes), "ms": ms, "pct": {k: 100 * v / whole for k, v in ms.items()}}


def draw_genomes(eng, count: int) -> tuple[list, Callable]:
    """`count` distinct random policies feasible at BITS average weight bits, drawn as the GA fills its
    first population (`GeneticSearch._random` under the budget's own cost), and each one's cost."""
    from mqtool.policy import FLOAT
    from mqtool.search.budgets import Budget
    from mqtool.search.ga import GeneticSearch

    ctx, cfg = eng.ctx, eng.cfg
    budget = Budget("bits", BITS)
    eng.check_budget(budget)  # raises (the model is skipped) when no policy fits
    ga = GeneticSearch(
        ctx.n,
        ctx.widths,
        eng.costs.cost(budget),
        budget.value,
        pins=ctx.pins,
        search_act=cfg.space.search_act,
        act_widths=(cfg.space.act_bits, FLOAT),
        config=cfg.ga,
        seed=cfg.seed,
    )
    return ga._fill(ga._random, count, set()), ga.cost_of


def timed_passes(naive, default, genomes, warm, repeats: int, sync: Callable[[], None]) -> dict:
    """Interleaved timed passes of both scorers over all `genomes` (one `evaluate` call each, as the GA
    scores a generation), the naive one first; fitness values and racing counts from the first pass (they
    are deterministic). The racing reference is picked from the first naive pass: the median genome."""
    secs: dict[str, list[float]] = {"before": [], "after": []}
    first: dict = {}

    def run_before() -> list[float]:
        return naive.evaluate(genomes)

    def run_after() -> list[float]:
        # A search starts with a first look after 64 samples; evaluate adapts it per generation.
        default.first_look = True
        return default.evaluate(genomes, first["ref"])

    def pick_reference(fits: list[float]) -> None:
        i = int(np.argsort(fits, kind="stable")[len(fits) // 2])
        first["reference"], first["ref"] = i, genomes[i]
        # The GA's reference is a parent, scored in full before: its per-sample terms are kept (untimed).
        default.evaluate([genomes[i]])
        default.first_look = True
        default.evaluate([warm], genomes[i])  # warm-up of the racing path's feeds

    for i in range(repeats):
        # alternate the order, so a load drift or a cache warmed by the other scorer hits both alike
        order = [("before", run_before), ("after", run_after)]
        pair = 0.0
        for which, fn in order if i % 2 == 0 else order[::-1]:
            stats = dict(default.race_stats)
            sync()
            t0 = time.perf_counter()
            fits = fn()
            sync()
            dt = time.perf_counter() - t0
            secs[which].append(dt)
            pair += dt
            if which in first:
                continue
            first[which] = fits
            if which == "before":
                pick_reference(fits)
            else:
                first["race"] = {k: default.race_stats[k] - stats[k] for k in stats}
                # a candidate scored to the end keeps its per-sample terms; a stopped one does not
                first["stopped"] = [g.key() not in default.terms for g in genomes]
        if pair > REPEAT_UNDER_S:
            break
    ms = {k: [1000 * s / len(genomes) for s in v] for k, v in secs.items()}
    return {"ms_passes": ms, **first}


def fidelity(before: list[float], after: list[float], anchors) -> dict:
    """How the default's ranking and pick compare with the naive ones (lower fitness is better)."""
    from scipy.stats import kendalltau

    b, a = np.asarray(before), np.asarray(after)
    tau = float(kendalltau(b, a)[0]) if len(b) > 1 else float("nan")
    best_b, best_a = int(np.argmin(b)), int(np.argmin(a))
    gap = float(b[best_a] - b[best_b])
    rel = anchors.relative  # NaN when the objective cannot tell uniform 8-bit from lowest-width PTQ
    return {
        "kendall_tau": tau if np.isfinite(tau) else None,
        "same_best": best_a == best_b,
        "best_before": best_b,
        "best_after": best_a,
        # 1 = the naive best; how far down the naive order the default's pick lies
        "naive_rank_of_after_best": int((b < b[best_a]).sum()) + 1,
        "naive_gap": gap,
        "naive_gap_relative": gap / anchors.span if anchors.informative else None,
        "relative_best_before": _finite(rel(float(b[best_b]))),
        "relative_best_after": _finite(rel(float(b[best_a]))),
        "anchors": {"ptq8": anchors.ptq8, "ptq_low": anchors.ptq_low, "low_bits": anchors.low_bits},
    }


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def run_model(name: str, args) -> dict:
    from mqtool.search import SearchConfig
    from mqtool.search.config import ScoringConfig
    from mqtool.search.driver import SearchEngine
    from mqtool.search.scoring import Scorer

    t_load = time.perf_counter()
    model, data = load(name, args)
    load_s = time.perf_counter() - t_load
    with tempfile.TemporaryDirectory() as wd:
        cfg = SearchConfig.flat(epochs=1)
        t0 = time.perf_counter()
        eng = SearchEngine(model, data, cfg, wd)
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.train_metaquantnet()
        train_s = time.perf_counter() - t0
        ctx, sc = eng.ctx, eng.cfg.scoring
        sync = synchronizer(ctx.device)
        took = f"loaded in {load_s:.1f} s, context {setup_s:.1f} s, MetaQuantNet 1 epoch {train_s:.1f} s"
        print(f"{name}: {len(data)} samples {took}", flush=True)

        drawn, cost_of = draw_genomes(eng, args.genomes + 1)
        if len(drawn) < 3:
            raise RuntimeError(f"only {len(drawn)} feasible random policies at {BITS:g} bits")
        warm, genomes = drawn[-1], drawn[:-1]  # the warm-up candidate is not among the timed ones

        # After: the engine's own scorer at the default scoring config, screening as _search decides it
        # for a bits budget (no per-layer formats).
        default = eng.scorer
        float_screen = not (sc.exact_screening or eng.cfg.space.search_act or not sc.rerank)
        default.set_float_screening(float_screen)
        # Before: a second scorer on the same context, quantized activations, no racing.
        naive = Scorer(ctx, lambda event, info: None, ScoringConfig(exact_screening=True, racing=False))
        naive.mqn = eng.mqn
        naive.set_float_screening(False)

        naive.evaluate([warm])  # warm-up: feed tensors cached, activation plans built, allocator warmed
        passes = timed_passes(naive, default, genomes, warm, args.repeats, sync)
        ref = passes["ref"]
        ms_b = statistics.median(passes["ms_passes"]["before"])
        ms_a = statistics.median(passes["ms_passes"]["after"])
        per = f"{ms_b:.1f} -> {ms_a:.1f} ms per candidate over {len(genomes)} candidates"
        print(f"{name}: {per} (racing {passes['race']})", flush=True)

        # evenly spread over the draw, so the racing-stopped and the fully scored mix as in the pass
        picks = sorted(set(np.linspace(0, len(genomes) - 1, min(args.breakdown, len(genomes))).round()))
        few = [genomes[int(i)] for i in picks]
        parts = {
            "before": breakdown(naive, few, None, sync),
            "after": breakdown(default, few, ref, sync),
        }
        fid = fidelity(passes["before"], passes["after"], eng.scorer.anchors())
        row = {
            "model": name,
            "layers": ctx.n,
            "data_samples": len(data),
            "search_split": len(ctx.search_set),
            "search_samples": int(default.plans[False][-1].stop),
            "batched": ctx.batched,
            "metric": ctx.metric,
            "device": str(ctx.device),
            "load_s": load_s,
            "setup_s": setup_s,
            "metaquantnet_s": train_s,
            "genomes": len(genomes),
            "reference": passes["reference"],
            "float_screening": float_screen,
            "ms_before": ms_b,
            "ms_after": ms_a,
            "ratio": ms_b / ms_a if ms_a > 0 else None,
            "passes": len(passes["ms_passes"]["before"]),
            "ms_passes": passes["ms_passes"],
            "racing": passes["race"],
            "stopped": passes["stopped"],
            "breakdown": parts,
            "fidelity": fid,
            "fitness_before": passes["before"],
            "fitness_after": passes["after"],
            "avg_bits": [cost_of(g) for g in genomes],
        }
        del eng, default, naive
    gc.collect()
    return row


def _pct(row: dict) -> str:
    p = row["breakdown"]["after"]["pct"]
    return "/".join(f"{p[s]:.0f}" for s in STAGES[:3])


def doc_body(result: dict) -> str:
    rows = result["rows"]
    ok = [r for r in rows if "error" not in r]
    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append([r["model"], *["—"] * 10, f"failed: {r['error'][:120]}"])
            continue
        f = r["fidelity"]
        tau = "—" if f["kendall_tau"] is None else round(f["kendall_tau"], 3)
        gap = "—" if f["naive_gap_relative"] is None else f"{f['naive_gap_relative']:+.3f}"
        table_rows.append(
            [
                r["model"],
                r["layers"],
                r["search_samples"],
                round(r["ms_before"], 1),
                round(r["ms_after"], 1),
                f"{r['ratio']:.2f}x",
                f"{r['racing']['stopped']}/{r['genomes']}",
                tau,
                "yes" if f["same_best"] else f"no (naive rank {f['naive_rank_of_after_best']})",
                gap,
                _pct(r),
                "",
            ]
        )
    n = ok[0]["genomes"] if ok else 0
    body = (
        "## GA candidate: where its time goes, before/after the scoring shortcuts\n\n"
        f"{n} random policies feasible at {BITS:g} average weight bits (the GA's own sampler), MetaQuantNet "
        "after 1 epoch. Before: the naive candidate, scored on the first 128 rows of the search split (the "
        "whole split where it is smaller) with activations quantized as emitted, no racing. After: the "
        "product's defaults on the same rows: float-activation screening and racing against a reference "
        "(the median policy under the naive fitness; the GA races against its worst parent). ms per "
        "candidate: median of interleaved passes, one `evaluate` call over all the policies (2 threads). "
        "Racing tests after each chunk of about 64 rows, so it cannot stop anyone on 64 rows or fewer (one "
        "chunk). 'After' starts with the first look on, as a search does: on 128 rows it scores in two "
        "forward passes instead of one, and the GA turns the first look off after a generation in which "
        "fewer than a third stopped there, so a model where none stops (mnist_vit) pays this once, not "
        "every generation. Tau: Kendall's between the two fitness orders (a stopped candidate gets the reference's "
        "fitness plus "
        "its estimated difference, as in the GA). 'gap': the naive fitness of the default's best minus the "
        "naive best, on the anchors' scale (0 = uniform 8-bit PTQ, 1 = uniform lowest-width PTQ). "
        "Breakdown: share of a default candidate's time in MetaQuantNet's generate / forward passes / "
        "fitness terms (the rest: weight overrides, racing tests), timed inside the product's calls.\n\n"
        + common.table(
            [
                "model",
                "layers",
                "search samples",
                "ms/candidate before",
                "after",
                "before/after",
                "racing stopped",
                "tau",
                "same best",
                "gap (anchors)",
                "breakdown generate/forward/terms %",
                "note",
            ],
            table_rows,
        )
    )
    if ok:
        setup = ", ".join(f"{r['model']} {r['setup_s'] + r['metaquantnet_s']:.0f} s" for r in ok)
        body += f"\n\nSetup (context + 1 MetaQuantNet epoch): {setup}.\n"
    return body


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--models", nargs="+", help="default: mnist_cnn mnist_vit and every built zoo model")
    ap.add_argument("--genomes", type=int, default=24, help="random feasible policies per model")
    ap.add_argument(
        "--max-samples",
        type=int,
        help="zoo models: read only this many samples of data.npz (default all: its train, search and "
        "check splits are then the product's; a cap shrinks the search split too)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per scorer (fewer on slow models)")
    ap.add_argument("--breakdown", type=int, default=4, help="candidates the time breakdown is measured on")
    ap.add_argument(
        "--merge", action="store_true", help="keep the recorded rows of models not run (candidate.json)"
    )
    args = ap.parse_args()
    common.setup_torch()
    if args.quick:
        # a smoke test of every path (both pass orders included), not a measurement
        args.models, args.genomes, args.breakdown, args.repeats = ["mnist_cnn"], 8, 2, 2
    models = args.models or [*common.LOOPED_EXAMPLES, *zoo_names()]
    rows = []
    for name in models:
        t0 = time.perf_counter()
        try:
            rows.append(run_model(name, args))
        except Exception as e:  # one model failing must not lose the others' hours
            traceback.print_exc()
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
        rows[-1]["wall_s"] = time.perf_counter() - t0
        print(f"{name}: done in {rows[-1]['wall_s']:.0f} s", flush=True)
    extra = "" if args.quick else _extra(args)
    settings = {"bits": BITS, "genomes": args.genomes, "max_samples": args.max_samples, "epochs": 1}
    if args.merge and not args.quick:
        with open(os.path.join(args.out_dir, "candidate.json"), encoding="utf-8") as f:
            old = json.load(f)
        fresh = {r["model"] for r in rows}
        for r in old["rows"]:
            r.setdefault("commit", old.get("commit"))
        rows = [r for r in old["rows"] if r["model"] not in fresh] + [
            {**r, "commit": common.git_commit()} for r in rows
        ]
    result = {"commit": common.git_commit(), "settings": settings, "rows": rows}
    common.finish("candidate", "bench_candidate.py", args, result, doc_body(result), extra)


def _extra(args) -> str:
    """The non-default options, for the command line the doc section shows."""
    out = f" --models {' '.join(args.models)}" if args.models else ""
    out += " --merge" if args.merge else ""
    for flag, value, default in (
        ("--genomes", args.genomes, 24),
        ("--max-samples", args.max_samples, None),
        ("--repeats", args.repeats, 3),
        ("--breakdown", args.breakdown, 4),
    ):
        if value != default:
            out += f" {flag} {value}"
    return out


if __name__ == "__main__":
    main()
