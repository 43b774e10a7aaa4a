"""Benchmark: our search (MetaQuantNet + GA + finetune) against uniform QAT, HAWQ and random search at the
same average weight bits, and the search cost against a per-budget search that finetunes every candidate.

    python bench/bench_methods.py [--example mnist_cnn] [--targets 2.5 3 4] [--seeds 3] [--quick]

One SearchEngine per example (train.npz; search split 20%), with the settings printed in the doc.
  ours      `search_policies` (MetaQuantNet once, GA per budget) + `finetune(policy)` (from MetaQuantNet's weights);
            the default hybrid search (GA's first generation also seeded with the sensitivity prior)
  ours_pure the same MetaQuantNet and GA without that seed (`--no-sensitivity-seed`, the paper's method)
  uniform   baseline 1: uniform k-bit PTQ (pretrained weights, MSE scales, the engine's calibrated ranges)
  uni-QAT   baseline 2: uniform k-bit, `finetune(policy, same epochs, start="ptq")`
  HAWQ      baseline 4: Hutchinson Hessian traces, Omega = trace/params*||Q(W)-W||^2, MILP allocation at the
            target (bench/hawq.py), then `finetune(start="ptq")` with the same epochs
  random    baseline 5: as many random feasible policies as the GA evaluated at that budget, scored with the
            same MetaQuantNet fitness (`engine.evaluate`); the best is finetuned like ours
Each policy is emitted with `quantize_model(engine.ctx.model, policy, qparams=...)` and scored by ONNX Runtime on
test.npz. Search cost: 5 budgets; ours = MetaQuantNet training + the 5 GA runs (measured); HAQ-style = the
number of candidates the GA evaluated x the measured cost of finetuning + scoring one candidate (finetune
measured on a sample of candidates, not run for all; measured with the first seed only). Every seed is a
full independent run (search split, MetaQuantNet, GA, finetune, HAWQ probes all seeded by it); tables show the
mean over seeds with the spread (min..max). Writes bench/results/methods[_<example>].json and a plot
docs/img/methods_<example>.png.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402


def emit_eval(engine, policy, params, xt: np.ndarray, yt: np.ndarray) -> dict[str, float]:
    from mqtool.emit import quantize_model
    from mqtool.policy import average_weight_bits

    q = quantize_model(engine.ctx.model, policy, qparams=params)
    return {**common.ort_eval(q, xt, yt), "avg_bits": average_weight_bits(policy, engine.ctx.info.layers)}


def ptq_params(engine):
    from passes.qparams import ActParams, QuantParams

    return QuantParams(activations={t: ActParams(range=r) for t, r in engine.ctx.act_ranges.items()})


def random_search(engine, target: float, count: int, seed: int):
    """The best of `count` random feasible policies by the MetaQuantNet fitness."""
    from mqtool.search.budgets import Budget, BudgetCost
    from mqtool.search.ga import GeneticSearch

    cost = BudgetCost("bits", engine.ctx.info.layers)
    ga = GeneticSearch(engine.ctx.n, engine.ctx.widths, cost, target, config=engine.cfg.ga, seed=seed)
    genomes = ga._fill(ga._random, count, set())
    fits = []
    for i in range(0, len(genomes), 50):
        fits += engine.scorer.evaluate(genomes[i : i + 50])
    # the same final step as the GA: the best few re-scored on the whole search split
    order = sorted(range(len(genomes)), key=lambda i: (fits[i], genomes[i].key()))
    best, fit = engine.scorer.rerank(
        [genomes[i] for i in order[: max(1, engine.cfg.scoring.rerank)]], ga.cost_of
    )
    return engine.policy(best, Budget("bits", target), fit, len(genomes))


def plot(summary: list[dict], fp32: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, marker in (
        ("ours", "o-"),
        ("ours_pure", "D:"),
        ("uniform_ptq", "x--"),
        ("uniform_qat", "s--"),
        ("hawq", "^-"),
        ("random", "v-"),
    ):
        pts = sorted(
            (r["avg_bits"], r["acc_mean"], r["acc_min"], r["acc_max"])
            for r in summary
            if r["method"] == method
        )
        if pts:
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            err = [
                [max(0.0, p[1] - p[2]) for p in pts],
                [max(0.0, p[3] - p[1]) for p in pts],
            ]  # fmean rounding
            ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=method)
    ax.axhline(fp32, color="gray", lw=0.8, ls=":", label="fp32")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("test accuracy (ORT)")
    lo = fp32 - 0.03  # the methods differ by tenths of a point: zoom there, list what falls below
    ax.set_ylim(lo, min(1.0, fp32 + 0.012))
    below = [
        f"{r['method']} {r['target']:g} bits: {r['acc_mean']:.3f}" for r in summary if r["acc_mean"] < lo
    ]
    if below:
        ax.text(
            0.98,
            0.03,
            "off scale:\n" + "\n".join(below),
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.8, "lw": 0.5},
        )
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def run_seed(args, seed: int, with_cost: bool) -> dict:
    import hawq
    import onnx

    from mqtool.policy import Policy
    from mqtool.search import SearchConfig
    from mqtool.search.api import load_dataset
    from mqtool.search.budgets import Budget
    from mqtool.search.driver import SearchEngine

    ex = common.EXAMPLES[args.example]
    model = onnx.load(os.path.join(ex, "model.onnx"))
    data = load_dataset(os.path.join(ex, "train.npz"), model)
    xt, yt = common.load_npz(os.path.join(ex, "test.npz"))
    targets, cost_budgets, sample = args.targets, args.cost_budgets, args.cost_sample
    cfg = SearchConfig.flat(
        epochs=args.mqn_epochs,
        population=args.population,
        generations=args.generations,
        finetune_epochs=args.finetune_epochs,
        seed=seed,
    )
    hawq_iter, uniform_extra = args.hawq_iter, args.uniform
    if args.quick:
        data = data.take(np.arange(300))
        xt, yt = xt[:200], yt[:200]
        targets, cost_budgets, sample, hawq_iter, uniform_extra = [3.0], [3.0, 4.0], 1, 3, []
        cfg = cfg.replace(
            epochs=1,
            population=8,
            generations=2,
            parents=4,
            mutations=4,
            crossovers=4,
            finetune_epochs=1,
        )
    if not with_cost:
        cost_budgets = []
    ft = cfg.finetune.epochs
    rows: list[dict] = []

    def add(method: str, target: float, policy, params, extra: dict | None = None) -> None:
        r = {"method": method, "target": target, "seed": seed, **emit_eval(engine, policy, params, xt, yt)}
        r.update(extra or {})
        r["wbits"] = [policy.get(n).weight_bits for n in engine.ctx.names]
        rows.append(r)
        print(
            f"seed {seed} {method:12s} target {target:g}: avg {r['avg_bits']:.3f} acc {r['accuracy']:.4f} "
            f"loss {r['loss']:.4f}",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as work:
        t0 = time.time()
        engine = SearchEngine(model, data, cfg, work)
        t_setup = time.time() - t0
        fp32 = common.ort_eval(engine.ctx.model, xt, yt)
        t0 = time.time()
        engine.train_metaquantnet()
        t_mqn = time.time() - t0
        searched = {}
        for b in sorted(set(cost_budgets) | set(targets)):
            searched[b] = engine.search(Budget("bits", b))
            print(f"GA {b:g}: {searched[b].evaluated} evaluated in {searched[b].seconds:.1f} s", flush=True)
        only = set(args.methods)
        for t in targets:  # ours (the hybrid by default: the GA seeded with the sensitivity prior)
            params, _ = engine.finetune(searched[t].policy, ft)
            add("ours", t, searched[t].policy, params, {"ga_fitness": searched[t].fitness})
        if "pure" in only:  # the paper's pure MetaQuantNet + GA, same MetaQuantNet, same GA settings
            engine.cfg = cfg.replace(sensitivity_seed=False)
            for t in targets:
                res = engine.search(Budget("bits", t))
                params, _ = engine.finetune(res.policy, ft)
                add("ours_pure", t, res.policy, params, {"ga_fitness": res.fitness})
            engine.cfg = cfg
        # baselines 1 and 2: uniform k-bit (PTQ for every k asked, QAT around the targets)
        around = {int(np.floor(t)) for t in targets} | {int(np.ceil(t)) for t in targets}
        for k in sorted((around | set(uniform_extra)) - {0, 1}) if "uniform" in only else []:
            pol = Policy.uniform(engine.ctx.names, k)
            add("uniform_ptq", float(k), pol, ptq_params(engine))
            if k in around:
                params, _ = engine.finetune(pol, ft, start="ptq")
                add("uniform_qat", float(k), pol, params)
        t0 = time.time()  # baseline 4: HAWQ
        if "hawq" in only:
            traces = hawq.hessian_traces(engine, max_iter=hawq_iter)
            omega = hawq.sensitivities(engine, traces, engine.ctx.widths)
        t_hawq = time.time() - t0
        for t in targets if "hawq" in only else []:
            pol = hawq.allocate(engine, omega, t)
            params, _ = engine.finetune(pol, ft, start="ptq")
            add("hawq", t, pol, params)
        for t in targets if "random" in only else []:  # baseline 5: random search, same evaluations
            t0 = time.time()
            pol = random_search(engine, t, searched[t].evaluated, seed=7 + seed)
            secs = time.time() - t0
            params, _ = engine.finetune(pol, ft)
            extra = {
                "evaluated": pol.meta["evaluated"],
                "search_s": secs,
                "ga_fitness": pol.meta["fitness"]["value"],
            }
            add("random", t, pol, params, extra)
        per = []  # search cost: per-candidate finetune + scoring, on a sample of GA candidates
        if cost_budgets:
            rng = np.random.default_rng(3)
            cands = [searched[b].policy for b in cost_budgets]
            for i in rng.choice(len(cands), size=min(sample, len(cands)), replace=False):
                t0 = time.time()
                engine.finetune(cands[int(i)], ft)
                per.append(time.time() - t0)
    out = {
        "seed": seed,
        "config": cfg.to_json(),
        "fp32": fp32,
        "seconds": {"setup": t_setup, "metaquantnet": t_mqn, "hawq_traces": t_hawq},
        "ga_seconds": {str(b): r.seconds for b, r in searched.items()},
        "rows": rows,
    }
    if cost_budgets:
        per_cand = statistics.median(per)
        evaluated = {b: searched[b].evaluated for b in cost_budgets}
        ours_cost = t_mqn + sum(searched[b].seconds for b in cost_budgets)
        haq_cost = sum(evaluated.values()) * per_cand
        out["search_cost"] = {
            "budgets": cost_budgets,
            "metaquantnet_s": t_mqn,
            "ga_s": {str(b): searched[b].seconds for b in cost_budgets},
            "evaluated": {str(b): v for b, v in evaluated.items()},
            "per_candidate_finetune_s": per_cand,
            "per_candidate_sample": per,
            "ours_s": ours_cost,
            "haq_style_s": haq_cost,
            "ratio": ours_cost / haq_cost,
        }
    return out


def runs_from_log(path: str) -> list[dict]:
    """The per-seed rows and GA timings printed by a run (`seed S method target T: avg A acc X loss L`)."""
    import re

    row = re.compile(r"^seed (\d+) (\S+)\s+target (\S+): avg (\S+) acc (\S+) loss (\S+)")
    ga = re.compile(r"^GA (\S+): (\d+) evaluated in (\S+) s")
    runs: dict[int, dict] = {}
    pending: dict[str, float] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if m := ga.match(line):
                pending[m.group(1)] = float(m.group(3))
            elif m := row.match(line):
                seed = int(m.group(1))
                run = runs.setdefault(
                    seed, {"seed": seed, "rows": [], "ga_seconds": dict(pending), "fp32": None}
                )
                run["rows"].append(
                    {
                        "method": m.group(2),
                        "target": float(m.group(3)),
                        "seed": seed,
                        "avg_bits": float(m.group(4)),
                        "accuracy": float(m.group(5)),
                        "loss": float(m.group(6)),
                    }
                )
                pending = {}
    return [runs[k] for k in sorted(runs)]


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    out = []
    for (method, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        acc = [r["accuracy"] for r in rs]
        out.append(
            {
                "method": method,
                "target": target,
                "seeds": len(rs),
                "avg_bits": statistics.fmean(r["avg_bits"] for r in rs),
                "acc_mean": statistics.fmean(acc),
                "acc_min": min(acc),
                "acc_max": max(acc),
                "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "loss_mean": statistics.fmean(r["loss"] for r in rs),
            }
        )
    return out


def _non_default_args(ap, args) -> str:
    """The options this run changed, so the doc's command line reproduces it."""
    out = []
    for action in ap._actions:
        if not action.option_strings or action.dest in ("help", "quick", "no_docs", "out_dir"):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            out.append(flag)
        elif isinstance(value, list):
            out.append(" ".join([flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]))
        else:
            out.append(f"{flag} {value}")
    return "".join(" " + o for o in out)


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--example", default="mnist_cnn", choices=sorted(common.EXAMPLES))
    ap.add_argument("--targets", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    ap.add_argument("--uniform", type=int, nargs="*", default=[5, 6, 8], help="extra uniform PTQ widths")
    ap.add_argument("--cost-budgets", type=float, nargs="*", default=[2.5, 3.0, 3.5, 4.0, 5.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["pure", "uniform", "hawq", "random"],
        choices=["pure", "uniform", "hawq", "random"],
        help="baselines to run next to ours",
    )
    ap.add_argument("--mqn-epochs", type=int, default=4)
    ap.add_argument("--population", type=int, default=50)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--cost-sample", type=int, default=3, help="candidates finetuned to measure the HAQ cost")
    ap.add_argument("--hawq-iter", type=int, default=50, help="max Hutchinson iterations")
    ap.add_argument("--from-partial", action="store_true", help="reuse the per-seed results already written")
    ap.add_argument("--from-log", help="rebuild the tables from the printed output of an earlier run")
    args = ap.parse_args()
    common.setup_torch()
    seeds = 1 if args.quick else args.seeds
    runs = []
    partial = os.path.join(args.out_dir, f"methods_{args.example}.partial.json")
    if args.from_partial:  # tables and plot again from the per-seed results of an earlier run
        with open(partial, encoding="utf-8") as f:
            runs = json.load(f)["runs"]
        seeds = len(runs)
    if args.from_log:
        runs = runs_from_log(args.from_log)
        seeds = len(runs)
    for s in range(len(runs), seeds):
        runs.append(run_seed(args, s, with_cost=s == 0 and bool(args.cost_budgets)))
        common.write_json(args.out_dir, os.path.basename(partial)[:-5], {"runs": runs})  # survives a cut-off
    rows = [r for run in runs for r in run["rows"]]
    summary = summarise(rows)
    if runs[0].get("fp32") is None:  # rebuilt from a log: the float model's figures and the settings asked
        import onnx

        ex = common.EXAMPLES[args.example]
        fp32 = common.ort_eval(
            onnx.load(os.path.join(ex, "model.onnx")), *common.load_npz(os.path.join(ex, "test.npz"))
        )
        runs[0]["fp32"] = fp32
        runs[0]["config"] = {
            "epochs": args.mqn_epochs,
            "population": args.population,
            "generations": args.generations,
            "finetune_epochs": args.finetune_epochs,
            "widths": [2, 3, 4, 5, 6, 8],
        }
    fp32 = runs[0]["fp32"]
    cost = runs[0].get("search_cost")
    result = {"example": args.example, "seeds": seeds, "fp32": fp32, "runs": runs, "summary": summary}
    name = "methods" if args.example == "mnist_cnn" else f"methods_{args.example}"
    png = common.img_path(args, f"methods_{args.example}.png")
    plot(
        summary,
        fp32["accuracy"],
        png,
        f"{args.example}: ORT test accuracy vs average weight bits ({seeds} seeds)",
    )
    cfg = runs[0]["config"]
    table_rows = [
        [
            r["method"],
            r["target"],
            round(r["avg_bits"], 3),
            f"{r['acc_mean']:.4f}",
            f"{r['acc_min']:.4f}..{r['acc_max']:.4f}",
            round(r["acc_std"], 4),
            round(r["loss_mean"], 4),
        ]
        for r in summary
    ]
    body = (
        f"## Ours vs uniform PTQ / uniform QAT / HAWQ / random search ({args.example})\n\n"
        f"fp32: accuracy {fp32['accuracy']:.4f}, CE {fp32['loss']:.4f}. Settings: MetaQuantNet {cfg['training']['epochs']} "
        f"epochs, GA population {cfg['ga']['population']} x {cfg['ga']['generations']} generations, finetune "
        f"{cfg['finetune']['epochs']} epochs for every method except PTQ, 8-bit activations, widths "
        f"{list(cfg['space']['widths'])}; {seeds} seed(s) (each a full independent run). Accuracy = ONNX Runtime on the "
        "emitted file, test.npz.\n\n"
        + common.table(
            ["method", "target bits", "avg bits", "test acc (mean)", "min..max", "std", "test CE (mean)"],
            table_rows,
        )
        + f"\n\n![accuracy vs bits](img/{os.path.basename(png)})\n"
    )
    if args.from_log:
        body += (
            f"\nRebuilt with `--from-log {args.from_log}` from the printed output of the run above (its per-seed "
            "rows; the run predates the per-seed JSON). That run's search-cost figures were not printed, so "
            "the search-cost table is not in this section.\n"
        )
    if cost:
        ga_total = sum(cost["ga_s"].values())
        n_eval = sum(cost["evaluated"].values())
        body += (
            f"\n### Search cost, {len(cost['budgets'])} budgets ({', '.join(f'{b:g}' for b in cost['budgets'])} bits)"
            "\n\n"
            + common.table(
                ["", "seconds"],
                [
                    ["ours: MetaQuantNet training (once)", round(cost["metaquantnet_s"], 1)],
                    ["ours: GA, all budgets", round(ga_total, 1)],
                    ["ours: total", round(cost["ours_s"], 1)],
                    [
                        f"HAQ-style: {n_eval} candidates x {cost['per_candidate_finetune_s']:.2f} s finetune each",
                        round(cost["haq_style_s"], 1),
                    ],
                    ["ratio ours / HAQ-style (goal <= 0.1)", round(cost["ratio"], 4)],
                ],
            )
            + "\n\nThe HAQ-style cost is an estimate: the per-candidate finetune (same epochs as above) was "
            f"measured on {len(cost['per_candidate_sample'])} candidate(s) and multiplied by the number of "
            "candidates our GA evaluated; it was not run for every candidate. First seed only."
        )
    extra = _non_default_args(ap, args)
    common.finish(name, "bench_methods.py", args, result, body, extra)


if __name__ == "__main__":
    main()
