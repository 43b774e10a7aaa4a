"""Study (issue 17): does the policy or the finetuning start decide the test loss at 3 and 4 bits?

    python bench/bench_finetune_start.py [--example mnist_cnn] [--targets 3 4] [--seeds 3] [--quick]

In `bench/bench_methods.py` our policy is finetuned from the start `finetune.start=auto` picks (MetaQuantNet's
weights or PTQ's, whichever scores better on the search split) while HAWQ and uniform QAT always start from
PTQ; ours then had the higher test CE at 3 and 4 bits. Here each seed builds one SearchEngine (same settings
as bench_methods), searches our policy per target and allocates HAWQ's, and finetunes each policy from
both starts: a 2 x 2 (policy x start) per target and seed. Also recorded: the search-split fitness after
finetuning (what `auto` and the GA can see) and, for every finetuned model, the loss on `--probe` images of
test.npz that the later columns do not use (a held-out split a run could have), so the question "would a
held-out split pick the better start" has an answer. Test figures: ORT on the emitted file, the rest of
test.npz. Writes bench/results/finetune_start[_<example>].json and the `bench:finetune_start` doc section.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
from bench_methods import emit_eval  # noqa: E402


def run_seed(args, seed: int) -> list[dict]:
    import hawq
    import onnx

    from mqtool.search import SearchConfig
    from mqtool.search.api import load_dataset
    from mqtool.search.budgets import Budget
    from mqtool.search.driver import SearchEngine

    ex = common.EXAMPLES[args.example]
    model = onnx.load(os.path.join(ex, "model.onnx"))
    data = load_dataset(os.path.join(ex, "train.npz"), model)
    x, y = common.load_npz(os.path.join(ex, "test.npz"))
    xp, yp, xt, yt = x[: args.probe], y[: args.probe], x[args.probe :], y[args.probe :]
    cfg = SearchConfig.flat(epochs=4, population=50, generations=20, finetune_epochs=3, seed=seed)
    targets, hawq_iter = args.targets, 200
    if args.quick:
        data = data.take(np.arange(300))
        targets, hawq_iter = targets[:1], 3
        cfg = cfg.replace(epochs=1, population=8, generations=2, finetune_epochs=1)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        engine = SearchEngine(model, data, cfg, work)
        engine.train_metaquantnet()
        omega = hawq.sensitivities(engine, hawq.hessian_traces(engine, max_iter=hawq_iter), engine.ctx.widths)
        for t in targets:
            ours = engine.search(Budget("bits", t))
            policies = {"ours": ours.policy, "hawq": hawq.allocate(engine, omega, t)}
            for source, pol in policies.items():
                for start in ("ptq", "metaquantnet"):
                    params, fit = engine.finetune(pol, cfg.finetune.epochs, start=start)
                    test = emit_eval(engine, pol, params, xt, yt)
                    probe = emit_eval(engine, pol, params, xp, yp)
                    row = {
                        "seed": seed, "target": t, "policy": source, "start": start,
                        "search_fitness": fit, "probe_loss": probe["loss"], "probe_accuracy": probe["accuracy"],
                        "test_loss": test["loss"], "test_accuracy": test["accuracy"], "avg_bits": test["avg_bits"],
                        "wbits": [pol.get(n).weight_bits for n in engine.ctx.names],
                    }  # fmt: skip
                    rows.append(row)
                    print(
                        f"seed {seed} target {t:g} {source:5s} from {start:12s}: fitness {fit:.4f} "
                        f"probe CE {probe['loss']:.4f} test CE {test['loss']:.4f} acc {test['accuracy']:.4f}",
                        flush=True,
                    )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["target"], r["policy"], r["start"]) for r in rows}):
        g = [r for r in rows if (r["target"], r["policy"], r["start"]) == key]
        losses = [r["test_loss"] for r in g]
        se = statistics.stdev(losses) / len(losses) ** 0.5 if len(losses) > 1 else float("nan")
        out.append({
            "target": key[0], "policy": key[1], "start": key[2], "n": len(g),
            "test_loss": statistics.fmean(losses), "test_loss_se": se,
            "test_accuracy": statistics.fmean(r["test_accuracy"] for r in g),
            "search_fitness": statistics.fmean(r["search_fitness"] for r in g),
            "probe_loss": statistics.fmean(r["probe_loss"] for r in g),
        })  # fmt: skip
    return out


def picks(rows: list[dict], by: str) -> dict:
    """Per (seed, target, policy): does choosing the start by `by` pick the one with the lower test loss?"""
    right = total = 0
    regret = []
    for key in {(r["seed"], r["target"], r["policy"]) for r in rows}:
        g = [r for r in rows if (r["seed"], r["target"], r["policy"]) == key]
        if len(g) != 2:
            continue
        chosen = min(g, key=lambda r: r[by])
        best = min(g, key=lambda r: r["test_loss"])
        right += chosen is best
        total += 1
        regret.append(chosen["test_loss"] - best["test_loss"])
    return {"right": right, "of": total, "mean_regret": statistics.fmean(regret) if regret else None}


def doc_body(result: dict) -> str:
    rows = [
        [f"{s['target']:g}", s["policy"], s["start"], f"{s['test_loss']:.4f} +- {s['test_loss_se']:.4f}",
         f"{s['test_accuracy']:.4f}", f"{s['search_fitness']:.4f}", f"{s['probe_loss']:.4f}"]
        for s in result["summary"]
    ]  # fmt: skip
    fit, probe = result["pick_by_search_fitness"], result["pick_by_probe"]
    return "\n".join([
        f"## Finetuning start vs policy ({result['example']}, issue 17)",
        "",
        f"Each policy (ours: the default search; HAWQ: bench/hawq.py) finetuned {result['finetune_epochs']} "
        f"epochs from PTQ's weights and from MetaQuantNet's; {result['seeds']} seeds (each a full run); test = "
        f"ORT on test.npz minus its first {result['probe']} images (the probe: a held-out split a run could "
        "have). Mean +- standard error over seeds.",
        "",
        common.table(["bits", "policy", "start", "test CE", "test acc", "search-split fitness", "probe CE"], rows),
        "",
        f"Choosing the start by the search-split fitness (what `finetune.start=auto` can see) picks the one with "
        f"the lower test CE {fit['right']} of {fit['of']} times (mean regret {fit['mean_regret']:.4f}); by the "
        f"probe CE {probe['right']} of {probe['of']} times (mean regret {probe['mean_regret']:.4f}).",
    ])  # fmt: skip


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--example", default="mnist_cnn", choices=sorted(common.EXAMPLES))
    ap.add_argument("--targets", nargs="+", type=float, default=[3.0, 4.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--probe", type=int, default=300, help="test images held out of the test columns")
    args = ap.parse_args()
    common.setup_torch()
    seeds = 1 if args.quick else args.seeds
    rows = [r for s in range(seeds) for r in run_seed(args, s)]
    result = {
        "example": args.example, "seeds": seeds, "probe": args.probe, "finetune_epochs": 1 if args.quick else 3,
        "rows": rows, "summary": summarise(rows),
        "pick_by_search_fitness": picks(rows, "search_fitness"), "pick_by_probe": picks(rows, "probe_loss"),
    }  # fmt: skip
    name = "finetune_start" if args.example == "mnist_cnn" else f"finetune_start_{args.example}"
    common.finish(name, "bench_finetune_start.py", args, result, doc_body(result))


if __name__ == "__main__":
    main()
