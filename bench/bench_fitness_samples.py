"""Benchmark: how many search-split samples the GA fitness needs (ranking fidelity vs time per candidate).

    python bench/bench_fitness_samples.py [--policies 60] [--quick]

For each example: MetaQuantNet trained with the default settings (4 epochs), 60 random feasible policies at
2.5 average weight bits, each scored on the whole search split (20% of train.npz = 800 samples) and on its
first 256 / 128 / 64 samples, with the activations quantized as emitted; and on 128 with float activations
(how the GA screens candidates by default). Reports Kendall tau of each against the 800-sample ranking, the
overlap of the 10 best, and the median time to score one candidate.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402


def run_example(name: str, n_policies: int, sizes: list[int], screen: int, quick: bool) -> list[dict]:
    import onnx
    from scipy.stats import kendalltau

    from mqtool.search import SearchConfig
    from mqtool.search.api import load_dataset
    from mqtool.search.budgets import BudgetCost
    from mqtool.search.driver import SearchEngine
    from mqtool.search.ga import GeneticSearch

    ex = common.EXAMPLES[name]
    model = onnx.load(os.path.join(ex, "model.onnx"))
    data = load_dataset(os.path.join(ex, "train.npz"), model)
    epochs = 4
    if quick:
        data, epochs = data.take(np.arange(400)), 1
    full = max(sizes)
    with tempfile.TemporaryDirectory() as wd:
        cfg = SearchConfig.flat(epochs=epochs, fitness_samples=full, rerank_samples=full, racing=False)
        eng = SearchEngine(model, data, cfg, wd)
        eng.train_metaquantnet()
        ga = GeneticSearch(
            eng.ctx.n, eng.ctx.widths, BudgetCost("bits", eng.ctx.info.layers), 2.5, config=eng.cfg.ga, seed=1
        )
        genomes = ga._fill(ga._random, n_policies, set())
        whole = eng.ctx.search_set
        fits, secs = {}, {}
        runs = [(k, False) for k in sorted(sizes, reverse=True)]
        runs.append((screen, True))  # the GA's default screening: float activations
        for k, float_acts in runs:
            # The GA scores a candidate on the first k rows of the search split.
            eng.scorer.set_samples(k)
            eng.scorer.set_float_screening(float_acts)
            t0 = time.perf_counter()
            fits[k, float_acts] = np.array(eng.scorer.evaluate(genomes))
            secs[k, float_acts] = (time.perf_counter() - t0) / len(genomes)
    ref = fits[full, False]
    top = set(np.argsort(ref)[:10])
    return [
        {
            "example": name,
            "samples": min(k, len(whole)),
            "activations": "float" if float_acts else "quantized",
            "kendall_tau": float(kendalltau(fits[k, float_acts], ref)[0]),
            "tau_vs_quantized_same_samples": float(kendalltau(fits[k, float_acts], fits[k, False])[0]),
            "top10_overlap": len(set(np.argsort(fits[k, float_acts])[:10]) & top),
            "ms_per_candidate": 1000 * secs[k, float_acts],
        }
        for k, float_acts in runs
    ]


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--policies", type=int, default=60)
    args = ap.parse_args()
    common.setup_torch()
    sizes, screen = [800, 256, 128, 64], 128
    n = args.policies
    if args.quick:
        sizes, screen, n = [80, 32], 32, 12
    rows = [r for name in common.LOOPED_EXAMPLES for r in run_example(name, n, sizes, screen, args.quick)]
    for r in rows:
        print(r, flush=True)
    body = (
        "## GA fitness: samples per candidate vs ranking fidelity\n\n"
        f"{n} random feasible policies at 2.5 average weight bits, MetaQuantNet after 4 epochs (default "
        "settings); each scored on the whole search split and on its first k samples, with the activations "
        "quantized as emitted (8 bits) and, as the GA screens candidates by default, with float activations. "
        "Kendall tau and top-10 overlap are against the whole-split ranking with quantized activations; the "
        "time is per candidate (2 threads).\n\n"
        + common.table(
            [
                "example",
                "fitness samples",
                "activations",
                "Kendall tau vs whole split",
                "tau vs quantized, same samples",
                "top-10 overlap",
                "ms per candidate",
            ],
            [
                [
                    r["example"],
                    r["samples"],
                    r["activations"],
                    round(r["kendall_tau"], 3),
                    round(r["tau_vs_quantized_same_samples"], 3),
                    f"{r['top10_overlap']}/10",
                    round(r["ms_per_candidate"], 1),
                ]
                for r in rows
            ],
        )
        + f"\n\nMedian over examples of the 256-sample time: "
        f"{statistics.median(r['ms_per_candidate'] for r in rows if r['samples'] == 256) if not args.quick else 0:.1f} ms.\n"
    )
    common.finish("fitness_samples", "bench_fitness_samples.py", args, {"rows": rows}, body)


if __name__ == "__main__":
    main()
