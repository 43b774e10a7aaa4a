"""Benchmark: wall time of one budget's genetic search at the product defaults, per example.

    python bench/bench_ga_time.py [--quick]

MetaQuantNet is trained once per example (default settings, timed too); then one GA per budget (2.5, 3, 3.5,
4, 5 average weight bits) in the same process, as `mqtool search --target-bits 2.5,3,3.5,4,5` runs them.
Each row: seconds, candidates scored, how many the racing stopped early, how many were (or would have
been) told apart at the first look, and the winner's fitness on the whole search split. The goal (issue 5) is <= 30 s per
budget on 2 cores.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402


def run_example(name: str, budgets: list[float], quick: bool) -> tuple[float, list[dict]]:
    import onnx

    from mqtool.search import SearchConfig
    from mqtool.search.api import load_dataset
    from mqtool.search.budgets import Budget
    from mqtool.search.driver import SearchEngine

    ex = common.EXAMPLES[name]
    model = onnx.load(os.path.join(ex, "model.onnx"))
    data = load_dataset(os.path.join(ex, "train.npz"), model)
    cfg = SearchConfig()
    if quick:
        data = data.take(np.arange(400))
        cfg = SearchConfig.flat(epochs=1, population=8, generations=2, parents=3, mutations=3, crossovers=3)
    rows = []
    with tempfile.TemporaryDirectory() as wd:
        eng = SearchEngine(model, data, cfg, wd)
        t0 = time.perf_counter()
        eng.train_metaquantnet()
        mqn_s = time.perf_counter() - t0
        for b in budgets:
            before = dict(eng.scorer.race_stats)
            res = eng.search(Budget("bits", b))
            delta = {k: eng.scorer.race_stats[k] - before[k] for k in before}
            rows.append(
                {
                    "example": name,
                    "budget": b,
                    "seconds": res.seconds,
                    "evaluated": res.evaluated,
                    "scored": delta["scored"],
                    "stopped_early": delta["stopped"],
                    "first_look": delta["first_look"],
                    "ms_per_scored": 1000 * res.seconds / max(1, delta["scored"]),
                    "avg_bits": res.avg_bits,
                    "fitness": res.fitness,
                }
            )
            print(rows[-1], flush=True)
    return mqn_s, rows


def main() -> None:
    ap = common.arg_parser(__doc__)
    args = ap.parse_args()
    common.setup_torch()
    budgets = [2.5, 3.0] if args.quick else [2.5, 3.0, 3.5, 4.0, 5.0]
    rows, mqn = [], {}
    for name in common.LOOPED_EXAMPLES:
        mqn[name], part = run_example(name, budgets, args.quick)
        rows += part
    body = (
        "## Genetic search: wall time per budget (goal <= 30 s)\n\n"
        "Product defaults (population 50 x 20 generations, 128 fitness samples with racing, the best 10 "
        "re-ranked on the whole search split); MetaQuantNet trained once per example, then one GA per budget "
        "in the same process. 'stopped early': told apart from the worst parent before their last chunk; "
        "'first look': would stop after 64 samples (the next generation looks there only when a third of "
        "this one would).\n\n"
        + common.table(
            [
                "example",
                "budget (avg bits)",
                "seconds",
                "evaluated",
                "scored",
                "stopped early",
                "first look",
                "ms per scored",
                "avg bits",
            ],
            [
                [
                    r["example"],
                    r["budget"],
                    round(r["seconds"], 1),
                    r["evaluated"],
                    r["scored"],
                    r["stopped_early"],
                    r["first_look"],
                    round(r["ms_per_scored"], 1),
                    round(r["avg_bits"], 3),
                ]
                for r in rows
            ],
        )
        + "\n\nMetaQuantNet training (once per example): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in mqn.items())
        + f". Worst budget: {max(r['seconds'] for r in rows):.1f} s.\n"
    )
    common.finish("ga_time", "bench_ga_time.py", args, {"rows": rows, "metaquantnet_s": mqn}, body)


if __name__ == "__main__":
    main()
