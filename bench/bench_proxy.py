"""Benchmark: how well does each fitness proxy rank policies? (Kendall tau against the finetuned result.)

    python bench/bench_proxy.py [--example mnist_cnn] [--policies 20] [--seeds 2] [--quick]

Draws random feasible policies at about 2.5 average weight bits (2.3..2.5, widths 2..8), and for each:
  - the MetaQuantNet fitness the GA uses (`SearchEngine.evaluate`, cross-entropy on the search split),
  - the PTQ-loss proxy: the same loss of the post-training-quantized model (pretrained weights, MSE scales),
  - the HAWQ sensitivity sum (Hessian trace / params * ||Q(W) - W||^2, see bench/hawq.py),
  - the ground truth: test-set cross-entropy (ONNX Runtime on test.npz) of the emitted model after
    `SearchEngine.finetune(policy)` (start = MetaQuantNet's weights, our pipeline; `--start ptq` for
    the pretrained ones), mean over finetune seeds.
Reports Kendall tau of each proxy against the ground truth (higher is better). Writes
bench/results/proxy.json and the `proxy` section of docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402


def _screened(engine, g) -> float:
    """The GA loop's default score: first 128 samples, float activations (see SearchConfig.exact_screening)."""
    engine.scorer.set_float_screening(True)
    try:
        return engine.scorer.evaluate([g])[0]
    finally:
        engine.scorer.set_float_screening(False)


def random_policies(engine, count: int, lo: float, hi: float, seed: int) -> list[list[int]]:
    """Distinct random per-layer widths with lo <= average weight bits <= hi."""
    rng = np.random.default_rng(seed)
    widths = engine.ctx.widths
    params = np.array([layer.params for layer in engine.ctx.info.layers], dtype=np.float64)
    frac = params / params.sum()
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    tries = 0
    while len(out) < count and tries < 100_000:
        tries += 1
        target = rng.uniform(lo, hi)
        bits = np.full(engine.ctx.n, widths[0])
        for i in rng.permutation(engine.ctx.n):
            b = rng.choice(widths)
            cand = bits.copy()
            cand[i] = b
            if cand @ frac <= target + 1e-9:
                bits = cand
        avg = float(bits @ frac)
        key = tuple(int(b) for b in bits)
        if lo - 1e-9 <= avg <= hi + 1e-9 and key not in seen:
            seen.add(key)
            out.append(list(key))
    return out


def _ranks(values: list[float]) -> list[float]:
    from scipy.stats import rankdata

    return [float(v) for v in rankdata(values)]


def ptq_proxy(engine, wbits: list[int]) -> float:
    """The search loss of the post-training-quantized model (pretrained weights, MSE scales)."""
    import torch

    from mqtool import numerics
    from mqtool.search.metaquantnet import weight_quant_ste

    engine.ctx.set_activation_quant(tuple([engine.cfg.space.act_bits] * engine.ctx.n))
    weights = {}
    for layer, b in zip(engine.ctx.info.layers, wbits):
        w = engine.ctx.net.layers[layer.name].weight.detach()
        s = torch.from_numpy(numerics.weight_scale(w.numpy(), b, layer.channel_axis, "mse"))
        weights[layer.name] = weight_quant_ste(w, s, b, layer.channel_axis)
    with torch.no_grad(), engine.ctx.net.override_weights(weights):
        return engine.scorer.fitness()


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--example", default="mnist_cnn", choices=sorted(common.EXAMPLES))
    ap.add_argument("--policies", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=2, help="finetune seeds per policy")
    ap.add_argument("--mqn-epochs", type=int, default=4, help="the product default")
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--start", default="metaquantnet", choices=("metaquantnet", "ptq"))
    ap.add_argument("--lo", type=float, default=2.3)
    ap.add_argument("--hi", type=float, default=2.5)
    ap.add_argument("--hawq-iter", type=int, default=50, help="max Hutchinson iterations")
    ap.add_argument(
        "--from-partial", action="store_true", help="summarize proxy_partial.json of a stopped run"
    )
    args = ap.parse_args()
    if args.from_partial:
        from_partial(args)
        return
    common.setup_torch()
    import hawq
    import onnx
    from scipy.stats import kendalltau

    from mqtool.emit import quantize_model
    from mqtool.policy import LayerBits, Policy
    from mqtool.search import SearchConfig
    from mqtool.search.api import load_dataset
    from mqtool.search.driver import SearchEngine
    from mqtool.search.ga import Genome

    ex = common.EXAMPLES[args.example]
    model = onnx.load(os.path.join(ex, "model.onnx"))
    data = load_dataset(os.path.join(ex, "train.npz"), model)
    xt, yt = common.load_npz(os.path.join(ex, "test.npz"))
    n_pol, seeds, mqn_epochs, ft_epochs, hawq_iter = (
        args.policies,
        args.seeds,
        args.mqn_epochs,
        args.finetune_epochs,
        args.hawq_iter,
    )
    if args.quick:
        data = data.take(np.arange(300))
        xt, yt = xt[:200], yt[:200]
        n_pol, seeds, mqn_epochs, ft_epochs, hawq_iter = 4, 1, 1, 1, 3
    cfg = SearchConfig.flat(epochs=mqn_epochs, finetune_epochs=ft_epochs)
    t_all = time.time()
    with tempfile.TemporaryDirectory() as work:
        engine = SearchEngine(model, data, cfg, work)
        t0 = time.time()
        engine.train_metaquantnet()
        t_mqn = time.time() - t0
        t0 = time.time()
        traces = hawq.hessian_traces(engine, max_iter=hawq_iter)
        omega = hawq.sensitivities(engine, traces, engine.ctx.widths)
        t_hawq = time.time() - t0
        sens = engine.sensitivity()["layers"]  # the hybrid search's per-layer table (64 search samples)
        rows = []
        for k, wbits in enumerate(random_policies(engine, n_pol, args.lo, args.hi, seed=1)):
            policy = Policy({n: LayerBits(b, cfg.space.act_bits) for n, b in zip(engine.ctx.names, wbits)})
            g = Genome(tuple(wbits), tuple([cfg.space.act_bits] * engine.ctx.n))
            row = {
                "wbits": wbits,
                "avg_bits": float(
                    np.dot(wbits, [la.params for la in engine.ctx.info.layers])
                    / engine.ctx.info.totals.params
                ),
                # on the whole search split (the re-ranking's look) and on the GA loop's first look
                "mqn_fitness": engine.scorer.rerank([g])[1],
                "mqn_fitness_ga": engine.scorer.evaluate([g])[0],
                "mqn_fitness_screen": _screened(engine, g),
                "ptq_proxy": ptq_proxy(engine, wbits),
                "hawq_sum": hawq.sensitivity_sum(omega, policy),
                "sens_sum": float(sum(sens[n][str(b)] for n, b in zip(engine.ctx.names, wbits))),
                "test_loss": [],
                "test_acc": [],
                "finetuned_fitness": [],
            }
            for s in range(seeds):
                params, fit = engine.finetune(policy, ft_epochs, start=args.start, seed=100 + s)
                q = quantize_model(
                    engine.ctx.model, policy, qparams=params, data=os.path.join(ex, "train.npz")
                )
                ev = common.ort_eval(q, xt, yt)
                row["test_loss"].append(ev["loss"])
                row["test_acc"].append(ev["accuracy"])
                row["finetuned_fitness"].append(fit)
            row["test_loss_mean"] = float(np.mean(row["test_loss"]))
            row["test_acc_mean"] = float(np.mean(row["test_acc"]))
            rows.append(row)
            if len(rows) >= 3:  # partial results survive an interrupted run
                part = {
                    k: kendalltau([r[k] for r in rows], [r["test_loss_mean"] for r in rows])[0]
                    for k in ("mqn_fitness", "ptq_proxy", "hawq_sum")
                }
                common.write_json(args.out_dir, "proxy_partial", {"rows": rows, "kendall_tau": part})
                print("partial tau", {k: round(float(v), 3) for k, v in part.items()}, flush=True)
            print(
                f"[{k + 1}/{n_pol}] avg {row['avg_bits']:.3f} mqn {row['mqn_fitness']:.4f} "
                f"ptq {row['ptq_proxy']:.4f} hawq {row['hawq_sum']:.3g} -> test loss "
                f"{row['test_loss_mean']:.4f} acc {row['test_acc_mean']:.4f}",
                flush=True,
            )
    seconds = {"metaquantnet": t_mqn, "hawq_traces": t_hawq, "total": time.time() - t_all}
    summarize(
        args,
        rows,
        seconds,
        dict(seeds=seeds, mqn_epochs=mqn_epochs, ft_epochs=ft_epochs, hawq_iter=hawq_iter),
    )


def summarize(args, rows: list[dict], seconds: dict, s: dict, note: str = "") -> None:
    """Kendall tau of each proxy, the JSON and the doc section."""
    from scipy.stats import kendalltau

    seeds, mqn_epochs, ft_epochs, hawq_iter = s["seeds"], s["mqn_epochs"], s["ft_epochs"], s["hawq_iter"]
    truth = [r["test_loss_mean"] for r in rows]
    if "sens_sum" in rows[0]:  # candidate hybrid fitnesses: MetaQuantNet's plus an additive prior
        for r in rows:
            r["mqn_plus_sens"] = r["mqn_fitness"] + r["sens_sum"]
        for key, a, b in (
            ("mqn_hawq_ranks", "mqn_fitness", "hawq_sum"),
            ("mqn_sens_ranks", "mqn_fitness", "sens_sum"),
        ):
            ra, rb = _ranks([r[a] for r in rows]), _ranks([r[b] for r in rows])
            for r, x, y in zip(rows, ra, rb):
                r[key] = (x + y) / 2
    taus = {}
    for key in (
        "mqn_fitness",
        "mqn_fitness_ga",
        "mqn_fitness_screen",
        "ptq_proxy",
        "hawq_sum",
        "sens_sum",
        "mqn_plus_sens",
        "mqn_sens_ranks",
        "mqn_hawq_ranks",
    ):
        if key not in rows[0]:  # rows from runs before the GA's sample count was split off
            continue
        tau, p = kendalltau([r[key] for r in rows], truth)
        taus[key] = {"tau": float(tau), "p": float(p)}
    result = {
        "example": args.example,
        "policies": len(rows),
        "finetune_seeds": seeds,
        "mqn_epochs": mqn_epochs,
        "finetune_epochs": ft_epochs,
        "finetune_start": args.start,
        "avg_bits_range": [args.lo, args.hi],
        "hawq_iterations_max": hawq_iter,
        "seconds": seconds,
        "note": note,
        "kendall_tau": taus,
        "test_acc_range": [min(r["test_acc_mean"] for r in rows), max(r["test_acc_mean"] for r in rows)],
        "rows": rows,
    }
    names = {
        "mqn_fitness": "MetaQuantNet fitness, whole search split (ours: re-ranking)",
        "mqn_fitness_ga": "MetaQuantNet fitness, GA's first 128 samples, quantized activations (--exact-screening)",
        "mqn_fitness_screen": "MetaQuantNet fitness, GA's first 128 samples, float activations (ours: GA loop)",
        "ptq_proxy": "PTQ loss",
        "hawq_sum": "HAWQ sensitivity sum",
        "sens_sum": "per-layer sensitivity sum (the hybrid's prior, 64 search samples)",
        "mqn_plus_sens": "MetaQuantNet fitness + per-layer sensitivity sum",
        "mqn_sens_ranks": "mean rank of MetaQuantNet fitness and per-layer sensitivity sum",
        "mqn_hawq_ranks": "mean rank of MetaQuantNet fitness and HAWQ sum",
    }
    body = (
        f"## Fitness proxy ranking quality ({args.example})\n\n"
        f"{len(rows)} random feasible policies at {args.lo}..{args.hi} average weight bits (8-bit activations); "
        f"ground truth = test cross-entropy (ORT, test.npz) of the emitted model after a {ft_epochs}-epoch "
        f"finetune starting from {args.start}, mean of {seeds} finetune seed(s). MetaQuantNet trained "
        f"{mqn_epochs} epochs. HAWQ traces: Hutchinson, 100 samples, <= {hawq_iter} iterations, Hessian-vector "
        f"products by central differences (bench/hawq.py). PTQ loss and MetaQuantNet fitness: cross-entropy on "
        f"the engine's search split of train.npz. Kendall tau of each proxy against the ground truth (goal: MetaQuantNet >= 0.5 "
        f"and >= both others):\n\n"
        + common.table(
            ["proxy", "Kendall tau", "p-value"],
            [[names[k], round(v["tau"], 3), round(v["p"], 3)] for k, v in taus.items()],
        )
        + f"\n\nTest accuracy over the policies: {result['test_acc_range'][0]:.4f}..{result['test_acc_range'][1]:.4f}."
        + (
            f" Time: MetaQuantNet {seconds['metaquantnet']:.0f} s, Hessian traces {seconds['hawq_traces']:.0f} s, "
            f"total {seconds['total']:.0f} s."
            if seconds
            else ""
        )
        + (f"\n\n**{note}**" if note else "")
    )
    extra = "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}"
        for k, d in (
            ("example", "mnist_cnn"),
            ("start", "metaquantnet"),
            ("policies", 20),
            ("seeds", 2),
            ("mqn_epochs", 6),
            ("finetune_epochs", 3),
            ("hawq_iter", 50),
            ("lo", 2.3),
            ("hi", 2.5),
        )
        if getattr(args, k) != d
    )
    name = (
        "proxy"
        if args.example == "mnist_cnn" and args.start == "metaquantnet"
        else (f"proxy_{args.example}_{args.start}")
    )
    if (args.lo, args.hi) != (2.3, 2.5):  # another budget: its own section next to the 2.5-bit one
        name += f"_{args.lo:g}_{args.hi:g}".replace(".", "p")
    if args.mqn_epochs != 4:  # MetaQuantNet trained longer or shorter: next to the default's section
        name += f"_mqn{args.mqn_epochs}"
    common.finish(name, "bench_proxy.py", args, result, body, extra)


def from_partial(args) -> None:
    """Summarize the rows an interrupted run left in <out-dir>/proxy_partial.json."""
    import json

    with open(os.path.join(args.out_dir, "proxy_partial.json"), encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    note = (
        f"Partial: the run was stopped at the deadline after {len(rows)} of {args.policies} policies; "
        "tau is over those."
    )
    s = dict(
        seeds=args.seeds, mqn_epochs=args.mqn_epochs, ft_epochs=args.finetune_epochs, hawq_iter=args.hawq_iter
    )
    summarize(args, rows, {}, s, note)


if __name__ == "__main__":
    main()
