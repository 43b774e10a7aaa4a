"""The search end to end: budgets -> genetic search -> re-ranking -> policy; finetuning of a chosen policy.

`SearchEngine` composes the stages: the shared `SearchContext`, MetaQuantNet's training (`train.py`), the
candidate `Scorer` (`scoring.py`), the pure `GeneticSearch` (`ga.py`) and finetuning (`finetune.py`). Every
stage reports progress through one callback (the CLI draws it) and checkpoints to the work directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from mqtool.analysis import ModelInfo
from mqtool.fileio import atomic_write_text
from mqtool.outputs import OutputKind
from mqtool.policy import FLOAT, LayerBits, Policy, average_weight_bits, bitops_ratio
from mqtool.search import checkpoint, distributed
from mqtool.search import plan as planning
from mqtool.search.budgets import TABLE_KINDS, Budget
from mqtool.search.config import SearchConfig
from mqtool.search.context import Samples, SearchContext
from mqtool.search.costs import FORMATS, BudgetCosts, fit_latency, fit_size, price_metadata
from mqtool.search.finetune import finetune
from mqtool.search.ga import GeneticSearch, Genome
from mqtool.search.metaquantnet import MetaQuantNet
from mqtool.search.prior import prior_seeds
from mqtool.search.scoring import Scorer
from mqtool.search.train import past_deadline, train_metaquantnet

Progress = Callable[[str, dict], None]


@dataclass
class BudgetResult:
    budget: Budget
    policy: Policy
    fitness: float
    avg_bits: float
    bitops_ratio: float
    evaluated: int
    seconds: float
    note: str = ""
    relative: float | None = None  # the fitness on the anchors' scale (0 = uniform 8-bit PTQ)


def _noop(event: str, info: dict) -> None:
    pass


class SearchEngine:
    """One model and data set: MetaQuantNet trained once, then any number of budgets searched with it."""

    def __init__(
        self,
        model: onnx.ModelProto,
        data: Samples,
        config: SearchConfig,
        workdir: str,
        progress: Progress | None = None,
        *,
        info: ModelInfo | None = None,
        started: float | None = None,
    ):
        """`started` (time.monotonic) is when the run began, for the time budget (default: now)."""
        self.started = time.monotonic() if started is None else started
        self.cfg = config
        self.progress = progress or _noop
        self.plan: planning.Plan | None = None
        self.ctx = SearchContext(model, data, config, workdir, info=info)
        self.cfg = self.ctx.cfg  # the context may cap the mini-batch for large inputs
        self.scorer = Scorer(self.ctx, self.progress)
        self.mqn: MetaQuantNet | None = None
        self.costs = BudgetCosts(self.ctx)
        self._sensitivity: dict | None = None
        self._gas_done = 0  # GA runs finished (the time budget keeps the later ones their share)
        ctx = self.ctx
        self.progress(
            "objective",
            {
                "metric": ctx.metric,
                "outputs": [s.describe() for s in ctx.outputs],
                "labels": ctx.objective.labels,
                "batched": ctx.batched,
                "split": {
                    "train": len(ctx.train),
                    "search": len(ctx.search_set),
                    "check": len(ctx.check_set),
                },
            },
        )

    # ---- time budget -------------------------------------------------------------------------------
    def plan_run(self, budgets: int, finetune: bool) -> planning.Plan | None:
        """Fit the run into `plan.time_budget` minutes (`plan.py`); None without a time budget. The planned
        options are kept in the work directory, so a resumed run continues with the same ones."""
        cfg = self.cfg
        if cfg.plan.time_budget is None:
            return None
        costs = planning.measure(self, time.monotonic() - self.started)
        new, plan = planning.plan(
            cfg,
            costs,
            budget_s=60 * cfg.plan.time_budget,
            fixed=cfg.plan.fixed,
            budgets=budgets,
            finetune=finetune,
            sensitivity_passes=self.ctx.n * len(self.ctx.widths),
        )
        path = os.path.join(self.ctx.workdir, "plan.json")
        key = checkpoint.fingerprint(self.ctx.fp, budgets, finetune, cfg.to_json())
        saved = checkpoint.read_json(path) if not cfg.restart else None
        if saved is not None and saved.get("fingerprint") == key:  # as planned when the run began
            new = SearchConfig.from_json(saved["config"])
            plan = dataclasses.replace(plan, sensitivity=saved.get("sensitivity", plan.sensitivity))
        elif distributed.is_main():
            doc = {"fingerprint": key, "config": new.to_json(), "sensitivity": plan.sensitivity}
            atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
        self._use(new)
        self.plan = plan
        self.progress(
            "plan",
            {
                "text": planning.describe(plan, new, finetune),
                "stages": plan.stages,
                "budget_s": plan.budget_s,
                "elapsed": time.monotonic() - self.started,
            },
        )
        return plan

    def _use(self, cfg: SearchConfig) -> None:
        self.cfg = cfg
        self.ctx.cfg = cfg
        self.scorer.cfg = cfg.scoring
        self.scorer.set_samples(cfg.scoring.fitness_samples)

    def _deadline(self, stage: str) -> float | None:
        if self.plan is None:
            return None
        return planning.stage_deadline(self.plan, stage, self.started, self._gas_done)

    # ---- MetaQuantNet ------------------------------------------------------------------------------
    def train_metaquantnet(self) -> MetaQuantNet:
        self.mqn = train_metaquantnet(self.ctx, self.progress, self._deadline("metaquantnet"))
        self.scorer.mqn = self.mqn
        return self.mqn

    # ---- budgets -----------------------------------------------------------------------------------
    def check_budget(self, budget: Budget) -> tuple[float, float]:
        """(lowest, highest) value of this budget's measure reachable (`costs.BudgetCosts.check`)."""
        return self.costs.check(budget)

    def search(self, budget: Budget) -> BudgetResult:
        """The best policy under `budget`: a genetic search scored with MetaQuantNet's weights, its best few
        re-ranked on the whole search split. Resumes from the budget's checkpoint.

        A size budget is checked against the file the policy really emits: when the estimate was short (it
        counts activation Q/DQ pairs approximately), the search runs again with the limit lowered by the
        overshoot, so the file meets the budget."""
        if budget.kind == "latency":
            return fit_latency(self, budget)
        if budget.kind == "size":
            price_metadata(self, budget)
        res = self._search(budget)
        if budget.kind == "size":
            return fit_size(self, budget, res)
        return res

    def _search(self, budget: Budget, tag: str = "") -> BudgetResult:
        assert self.mqn is not None, "train_metaquantnet first"
        ctx, cfg, scorer = self.ctx, self.cfg, self.scorer
        t0 = time.time()
        lo, hi = self.check_budget(budget)
        cost = self.costs.cost(budget)
        options = self.costs.format_options(budget.kind) if budget.kind in TABLE_KINDS else None
        top = max(ctx.widths)
        wtop = tuple(ctx.pins.get(i, top) for i in range(ctx.n))
        if options is not None:  # the highest widths in each layer's first (fastest) format
            g = Genome(wtop, tuple(o[0][1] for o in options), tuple(o[0][0] for o in options))
        else:
            g = Genome(wtop, tuple([cfg.space.act_bits] * ctx.n))
        used = float(cost(np.array(g.wbits), np.array(g.abits), *([np.array(g.fmts)] if g.fmts else [])))
        if budget.value >= used - 1e-9:
            policy = self.policy(g, budget, scorer.rerank([g])[1], 1)
            note = (
                f"budget {budget.value:g} is above what is needed ({used:.3f}): every layer gets {top} bits"
            )
            return self._result(budget, policy, time.time() - t0, 1, note)
        ga = GeneticSearch(
            ctx.n,
            ctx.widths,
            cost,
            budget.value,
            pins=ctx.pins,
            search_act=cfg.space.search_act,
            act_widths=(cfg.space.act_bits, FLOAT),
            config=cfg.ga,
            seed=cfg.seed,
            racing=cfg.scoring.racing,
            options=options,
            # the hybrid's seed (bits/BitOPs budgets; formats are left to the GA)
            extra_seeds=prior_seeds(ctx, self.sensitivity, cost, budget.value, cfg) if not options else [],
        )
        self.progress("stage", {"name": "ga"})
        anchors = scorer.anchors()
        self.progress(
            "anchors",
            {
                "budget": budget.label,
                "ptq8": anchors.ptq8,
                "ptq_low": anchors.ptq_low,
                "low_bits": anchors.low_bits,
                "informative": anchors.informative,
            },
        )
        scorer.first_look = True
        sc = cfg.scoring
        varied_acts = cfg.space.search_act or options is not None
        scorer.set_float_screening(not (sc.exact_screening or varied_acts or not sc.rerank))
        path = os.path.join(ctx.workdir, f"ga-{budget.label}{tag}.pt")
        gfp = checkpoint.fingerprint(ctx.fp, budget.label, cfg.fingerprint_parts("ga"))
        state = None if cfg.restart else checkpoint.load_shared(path, gfp)
        if state is not None:
            ga.load_state(state["ga"])
            # A resumed search must race exactly as the uninterrupted one: same chunking, and the
            # parents' per-sample terms as they were computed (not recomputed in other batch sizes).
            scorer.first_look = bool(state.get("first_look", True))
            for key, terms in state.get("parent_terms", []):
                scorer.terms[tuple(key)] = np.asarray(terms, dtype=np.float64).copy()
            self.progress("ga_resume", {"generation": ga.generation, "budget": budget.label})

        def on_generation(g: GeneticSearch) -> None:
            ga_state = g.state()
            if distributed.world() > 1:
                distributed.same_on_every_rank(checkpoint.fingerprint(ga_state), "the GA population")
            parents = [p.key() for p in g.population[: g.cfg.n_parents]]
            kept = [[list(k), torch.from_numpy(scorer.terms[k])] for k in parents if k in scorer.terms]
            checkpoint.save_main(
                path,
                {"fingerprint": gfp, "ga": ga_state, "first_look": scorer.first_look, "parent_terms": kept},
            )
            h = g.history[-1]
            self.progress(
                "ga_generation",
                {
                    **h,
                    "budget": budget.label,
                    "generation": g.generation,
                    "generations": g.cfg.generations,
                    "best_relative": anchors.relative(h["best_fitness"])
                    if h["best_fitness"] is not None
                    else None,
                },
            )

        deadline = self._deadline("ga")
        stop = None if deadline is None else (lambda: past_deadline(deadline))
        scorer.should_stop = stop  # also mid-generation: see Scorer._evaluate_here
        res = ga.run(scorer.evaluate, on_generation, stop)
        scorer.should_stop = None
        self._gas_done += 1
        if ga.generation < cfg.ga.generations:
            self.progress("deadline", {"stage": f"GA {budget.label}", "generation": ga.generation})
        best, fitness = res.best, res.best_fitness
        if sc.rerank:
            self.progress("stage", {"name": "rerank"})
            best, fitness = scorer.rerank(ga.population[: sc.rerank], ga.cost_of)
        policy = self.policy(best, budget, fitness, res.evaluated)
        return self._result(budget, policy, time.time() - t0, res.evaluated, self._blindness(ga))

    def _blindness(self, ga: GeneticSearch) -> str:
        """A note when this budget's fitness could not tell candidates apart (else "")."""
        anchors = self.scorer.anchors()
        if not anchors.informative:
            return (
                f"the objective scores uniform 8-bit and uniform {anchors.low_bits}-bit PTQ alike "
                f"({anchors.ptq8:.4g} vs {anchors.ptq_low:.4g}): the search could not rank policies"
            )
        scores = [ga.cache[g.key()] for g in ga.population if np.isfinite(ga.cache[g.key()])]
        if len(scores) >= 2 and (max(scores) - min(scores)) < 1e-3 * anchors.span:
            return (
                "the GA's final candidates all scored within 0.1% of the 8-bit..lowest-width span: no winner"
            )
        return ""

    def policy(self, g: Genome, budget: Budget, fitness: float, evaluated: int) -> Policy:
        """The `Policy` of a genome, with what produced it (budget, fitness, the whole config) in `meta`."""
        fmts = [FORMATS[c] for c in g.fmts] if g.fmts else [None] * len(g.wbits)
        layers = {
            n: LayerBits(w, a if w != FLOAT else FLOAT, f if w != FLOAT else None)
            for n, w, a, f in zip(self.ctx.names, g.wbits, g.abits, fmts)
        }
        meta = {
            "budget": {"kind": budget.kind, "value": budget.value},
            "fitness": {
                "metric": self.ctx.metric,
                "value": fitness,
                "relative": _finite_or_none(self.scorer.anchors().relative(fitness)),
            },
            "seed": self.cfg.seed,
            "evaluated": evaluated,
            "search_config": self.cfg.to_json(),
        }
        sens = self.sensitivity()
        if "skipped" in sens:
            meta["sensitivity_skipped"] = sens["skipped"]
        else:
            meta["sensitivity"] = sens
        return Policy(layers, meta=meta)

    def sensitivity(self) -> dict:
        """Each layer's fitness increase alone at each width (`mqtool.sensitivity`), once per run on 64 search
        samples: the hybrid's seed and `report`'s "why". Skipped (and said so) above a few hundred forward
        passes, or when it would take over a tenth of the GA's planned time."""
        if self._sensitivity is None:
            passes = self.ctx.n * len(self.ctx.widths)
            slow = self.plan is not None and not self.plan.sensitivity
            if passes > _SENSITIVITY_PASSES or slow:
                why = f"{self.ctx.n} layers x {len(self.ctx.widths)} widths" + (
                    " (time budget)" if slow else ""
                )
                self._sensitivity = {"skipped": why}
            else:
                from mqtool.sensitivity import context_sensitivity

                self._sensitivity = context_sensitivity(self.ctx, samples=64).to_meta()
        return self._sensitivity

    def _result(
        self, budget: Budget, policy: Policy, seconds: float, evaluated: int, note: str
    ) -> BudgetResult:
        layers = self.ctx.info.layers
        note = "; ".join(t for t in (note, self.costs.unreached_note(budget, policy)) if t)
        return BudgetResult(
            budget,
            policy,
            policy.meta["fitness"]["value"],
            average_weight_bits(policy, layers),
            bitops_ratio(policy, layers),
            evaluated,
            seconds,
            note,
            policy.meta["fitness"].get("relative"),
        )

    # ---- finetuning ----------------------------------------------------------------------------------
    def finetune(
        self,
        policy: Policy,
        epochs: int | None = None,
        start: str | None = None,
        seed: int | None = None,
        on_finished: Callable[[], None] | None = None,
    ):
        """Quantization-aware training of `policy`: (`QuantParams` for the emitter, final fitness). `start`
        defaults to the config's (`FinetuneConfig.start`)."""
        anchors = self.scorer.anchors()
        self.progress("stage", {"name": "finetune"})

        def progress(event: str, d: dict) -> None:  # finetuning's fitness on the readable scale too
            if "fitness" in d:
                d = {**d, "relative": anchors.relative(d["fitness"])}
            if "start_fitness" in d:
                d = {**d, "start_relative": anchors.relative(d["start_fitness"])}
            self.progress(event, d)

        return finetune(
            self.ctx,
            policy,
            self.scorer.fitness,
            progress,
            mqn=self.mqn,
            epochs=epochs,
            start=start or self.cfg.finetune.start,
            seed=seed,
            deadline=self._deadline("finetune"),
            on_finished=on_finished,
        )

    # ---- the held-out check split --------------------------------------------------------------------
    @torch.no_grad()
    def check_values(self) -> dict[str, np.ndarray]:
        """The network's outputs on the check split as it stands (output name -> the scored tensor's
        values, sample-major): fp32 when no weights are overridden and activations are float."""
        ctx = self.ctx
        scored = [s for s in ctx.outputs if s.kind is not OutputKind.NONE]
        outs = ctx.forward_all(ctx.check_set)
        return {s.name: o.cpu().numpy() for s, o in zip(scored, outs)}

    def finetune_and_predict(self, policy: Policy):
        """Finetune `policy` and predict the emitted model's fidelity on the check split: (QuantParams,
        final fitness, `mqtool.fidelity.ModelFidelity` of the simulation against fp32, or None without a
        check split). The self-check compares this prediction with ONNX Runtime's on the same samples."""
        from mqtool.fidelity import model_fidelity

        ctx = self.ctx
        if not len(ctx.check_set):
            return (*self.finetune(policy), None)
        ctx.set_activation_quant(None)
        reference = self.check_values()
        simulated: dict[str, np.ndarray] = {}
        params, fitness = self.finetune(policy, on_finished=lambda: simulated.update(self.check_values()))
        predicted = model_fidelity(ctx.outputs, reference, simulated, ctx.check_set.y)
        return params, fitness, predicted


# Layers x widths above which the per-layer sensitivity in a policy's meta is skipped.
_SENSITIVITY_PASSES = 240


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
