"""The time budget: measure what a training step and a candidate cost on this machine, then size
MetaQuantNet's training, the genetic search, the re-ranking and finetuning so the whole run fits.

Users budget a run in minutes (`--time-budget`, like Intel Neural Compressor's `timeout`), not in epochs
and generations. After the context is built (model prepared, teacher outputs, calibration: `elapsed`),
`measure` times one MetaQuantNet training step and one candidate on a throwaway MetaQuantNet, and `plan`
keeps the configured values (the defaults) when they fit and otherwise shrinks, in this order, the GA's
generations, its population, the fitness samples, MetaQuantNet's epochs and finetuning, never an option
the user set explicitly. Every stage also gets a deadline, so a wrong estimate costs quality, not time:
the GA stops at its share with its best so far, training and finetuning stop after the step that crosses
theirs. The measured costs are per process: under torchrun each rank does 1/world of the steps' samples
and of the candidates, and on a GPU the measured step is the GPU's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from mqtool.search import distributed
from mqtool.search.config import SearchConfig

# Shares of the time left after setup and the emission/self-check reserve, when the defaults do not fit.
_SHARES = {"metaquantnet": 0.35, "ga": 0.40, "rerank": 0.05, "finetune": 0.20}
_SLACK = 0.07  # kept free: estimates are made on a shared machine
# Measured on the examples: a 50 x 20 GA scores ~800-990 distinct candidates, ~0.9 of its slots per
# generation after the first are new.
_NEW_PER_GENERATION = 0.9
# Lower limits the planner does not go below (a GA of fewer candidates is a random search).
_MIN_GENERATIONS, _MIN_POPULATION, _MIN_SAMPLES = 4, 12, 32


@dataclass(frozen=True)
class Costs:
    """Measured seconds on this machine (this process's share under torchrun)."""

    train_step: float  # one MetaQuantNet training step on a global mini-batch
    per_sample: float  # one sample of a candidate's forward pass (no gradient)
    per_candidate: float  # generating a candidate's weights
    steps_per_epoch: int
    search_samples: int  # the whole search split (re-ranking)
    check_samples: int  # held out for the self-check
    elapsed: float  # spent before planning (load, prepare, teacher outputs, calibration, measuring)
    sample_elements: int = 0  # input elements per sample (memory)
    calibration: float = 0.0  # of `elapsed`: ONNX Runtime calibration (0: unknown, e.g. cached on resume)


@dataclass(frozen=True)
class Plan:
    """What the run will do and how long each stage is predicted to take (seconds)."""

    budget_s: float
    stages: dict[str, float]
    changed: dict[str, tuple] = field(default_factory=dict)  # option -> (configured, planned)
    deadlines: dict[str, float] = field(default_factory=dict)  # stage -> seconds it may take at most
    sample_s: float = 0.0  # measured: one sample through a candidate's forward pass
    budgets: int = 1  # GA runs planned (one per budget of a `search`)
    # the per-layer sensitivity pass (the hybrid's seed) fits: at most a tenth of the GA's planned time
    sensitivity: bool = True
    search_samples: int = 0  # the search split's size: a candidate is scored on at most this many

    @property
    def predicted_total(self) -> float:
        return sum(self.stages.values())

    def to_json(self) -> dict:
        return asdict(self)


def candidates(population: int, generations: int) -> float:
    """Distinct candidates a GA of this size scores (the first generation whole, then ~0.9 of each)."""
    return population + (generations - 1) * _NEW_PER_GENERATION * population


@torch.no_grad()
def _time(fn, repeats: int = 2) -> float:
    """Seconds of one call of `fn`, after one untimed warm-up call (the first call pays for allocation)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure(engine, elapsed: float) -> Costs:
    """Time one training step and one candidate with a throwaway MetaQuantNet (the real one, its optimiser
    and every random stream stay untouched, so a planned run trains exactly like an unplanned one)."""
    from mqtool.search.train import build_metaquantnet, step_loss, steps_per_epoch

    ctx = engine.ctx
    t_start = time.perf_counter()
    mqn = build_metaquantnet(ctx).to(ctx.device)
    bs = min(ctx.cfg.training.batch_size, len(ctx.train))
    idx, _ = distributed.local_share(np.arange(bs))
    top = [max(ctx.widths)] * ctx.n
    ctx.set_activation_quant(tuple([ctx.cfg.space.act_bits] * ctx.n))

    def step() -> None:
        with torch.enable_grad():
            loss = step_loss(ctx, mqn(top), idx)
            mqn.zero_grad(set_to_none=True)
            loss.backward()

    train_step = _time(step, repeats=2)
    k = min(len(ctx.search_set), 64)
    feeds = ctx.feeds(ctx.search_set, slice(0, k))
    # GA candidates are screened with float activations unless the config says otherwise (scoring.py)
    sc, space = ctx.cfg.scoring, ctx.cfg.space
    if not (sc.exact_screening or space.search_act or not sc.rerank):
        ctx.set_activation_quant(None)

    def forward() -> None:  # what a GA candidate does per chunk: the forward pass and its fitness terms
        with ctx.net.override_weights(mqn.generate(top)):
            engine.scorer.terms_of(ctx.forward_feeds(feeds), slice(0, k))

    per_forward = _time(forward)
    per_candidate = _time(lambda: mqn.generate(top), repeats=3)
    return Costs(
        train_step=train_step,
        per_sample=max(per_forward - per_candidate, 1e-6) / k,
        per_candidate=per_candidate,
        steps_per_epoch=steps_per_epoch(ctx),
        search_samples=len(ctx.search_set),
        check_samples=len(ctx.check_set),
        elapsed=elapsed + time.perf_counter() - t_start,
        sample_elements=ctx.sample_elements,
        calibration=ctx.calibration_s,
    )


def plan(
    cfg: SearchConfig,
    costs: Costs,
    *,
    budget_s: float,
    fixed: frozenset[str] = frozenset(),
    budgets: int = 1,
    finetune: bool = True,
    sensitivity_passes: int = 0,
) -> tuple[SearchConfig, Plan]:
    """The config to run within `budget_s` seconds in all (emission and self-check included), and its plan.

    `fixed`: flat option names the user set (never changed). The configured values are the most the run
    does: a generous budget finishes early rather than training longer than asked."""
    w = max(1, distributed.world())
    epoch = costs.steps_per_epoch * costs.train_step
    # a candidate is scored on at most the whole search split, whatever --fitness-samples says
    per_cand = lambda s: costs.per_sample * min(s, costs.search_samples) / w + costs.per_candidate  # noqa: E731
    rerank_cost = lambda r: budgets * r * (costs.search_samples * costs.per_sample / w + costs.per_candidate)  # noqa: E731
    # Emission runs ORT on the fp32 model, the quantized one and an 8-bit baseline over the check split:
    # about four forward passes of the check split. Each of the three emissions (the result, the 8-bit
    # baseline, and for an average-bits budget uniform PTQ at its width) calibrates again on ORT, as setup
    # did, on about 1.3x the samples (all but the check split; setup calibrates on the training part only).
    # Setup as a whole is no measure of that: a 416x416 detector's setup is mostly ORT calibration
    # (emission 119 s against setup 57 s), a sequence model's mostly the teacher pass (setup 104 s,
    # emission 2 s). Without a timed calibration (cached on resume), all of setup stands in for it.
    calibrations = 4 * costs.calibration if costs.calibration > 0 else costs.elapsed
    reserve = 4 * costs.check_samples * costs.per_sample + calibrations + 0.05 * costs.elapsed
    reserve = reserve if finetune else 0.0
    left = budget_s * (1 - _SLACK) - costs.elapsed - reserve

    E, F = cfg.training.epochs, cfg.finetune.epochs if finetune else 0
    P, G, S, R = cfg.ga.population, cfg.ga.generations, cfg.scoring.fitness_samples, cfg.scoring.rerank

    def total(E, P, G, S, R, F) -> dict[str, float]:
        return {
            "metaquantnet": E * epoch,
            "ga": budgets * candidates(P, G) * per_cand(S),
            "rerank": rerank_cost(R),
            "finetune": F * epoch,
        }

    want = total(E, P, G, S, R, F)
    planned = dict(epochs=E, population=P, generations=G, fitness_samples=S, rerank=R, finetune_epochs=F)
    if sum(want.values()) > left:
        shares = {k: v for k, v in _SHARES.items() if finetune or k != "finetune"}
        norm = sum(shares.values())
        # what the fixed options cost comes off the top; the others share the rest
        fixed_cost = sum(
            want[k]
            for k, names in (
                ("metaquantnet", {"epochs"}),
                ("ga", {"population", "generations", "fitness_samples"}),
                ("rerank", {"rerank"}),
                ("finetune", {"finetune_epochs"}),
            )
            if names <= fixed
        )
        room = max(left - fixed_cost, 0.0)
        budget = {k: room * shares[k] / norm for k in shares}
        if "epochs" not in fixed:
            planned["epochs"] = max(1, min(E, int(budget["metaquantnet"] // max(epoch, 1e-9))))
        if finetune and "finetune_epochs" not in fixed:
            planned["finetune_epochs"] = max(1, min(F, int(budget["finetune"] // max(epoch, 1e-9))))
        if "rerank" not in fixed and R:
            per = rerank_cost(1)
            planned["rerank"] = int(max(min(R, 3), min(R, budget["rerank"] // max(per, 1e-9))))
        # the GA takes whatever the others leave (it is the stage that scales most smoothly)
        others = total(planned["epochs"], P, G, S, planned["rerank"], planned["finetune_epochs"])
        ga_room = max(budget["ga"], room - others["metaquantnet"] - others["rerank"] - others["finetune"])
        if {"population", "generations", "fitness_samples"} <= fixed:
            ga_room = want["ga"]
        planned |= _size_ga(P, G, S, ga_room, budgets, per_cand, fixed)
    new = cfg.replace(**{k: v for k, v in planned.items() if k != "finetune_epochs" or finetune})
    stages = total(
        planned["epochs"],
        planned["population"],
        planned["generations"],
        planned["fitness_samples"],
        planned["rerank"],
        planned["finetune_epochs"],
    )
    stages = {"setup": costs.elapsed, **stages, "emit and self-check": reserve}
    changed = {
        k: (old, planned[k])
        for k, old in dict(
            epochs=E, population=P, generations=G, fitness_samples=S, rerank=R, finetune_epochs=F
        ).items()
        if planned[k] != old
    }
    # A stage may overrun its estimate by half before it is cut short; the GA's is per budget.
    deadlines = {
        "metaquantnet": 1.5 * stages["metaquantnet"] + 5,
        "ga": 1.5 * stages["ga"] / budgets + 5,
        "finetune": 1.5 * stages["finetune"] + 5,
    }
    fits = sensitivity_passes * 64 * costs.per_sample <= 0.1 * stages["ga"]
    return new, Plan(
        budget_s, stages, changed, deadlines, costs.per_sample, budgets, fits, costs.search_samples
    )


def _size_ga(P: int, G: int, S: int, seconds: float, budgets: int, per_cand, fixed: frozenset[str]) -> dict:
    """The largest GA within `seconds` over all budgets: generations go first (down to a few), then the
    population, then the fitness samples (noisier ranking; the re-ranking on the whole split remains)."""

    def cost(p, g, s):
        return budgets * candidates(p, g) * per_cand(s)

    p, g, s = P, G, S
    while cost(p, g, s) > seconds:
        if "generations" not in fixed and g > max(_MIN_GENERATIONS, G // 2):
            g -= 1
        elif "population" not in fixed and p > max(_MIN_POPULATION, P // 2):
            p -= 2
        elif "fitness_samples" not in fixed and s > _MIN_SAMPLES:
            s = max(_MIN_SAMPLES, s // 2)
        elif "generations" not in fixed and g > _MIN_GENERATIONS:
            g -= 1
        elif "population" not in fixed and p > _MIN_POPULATION:
            p -= 2
        else:
            break
    return {"population": max(2, p), "generations": max(1, g), "fitness_samples": s}


def describe(plan: Plan, cfg: SearchConfig, finetune: bool) -> str:
    """One line for the user: the planned run and its predicted total."""
    st = plan.stages
    samples = cfg.scoring.fitness_samples
    if plan.search_samples:
        samples = min(samples, plan.search_samples)
    parts = [
        f"setup {_m(st['setup'])}",
        f"MetaQuantNet {cfg.training.epochs} epoch(s) {_m(st['metaquantnet'])}",
        f"GA {cfg.ga.population}x{cfg.ga.generations} on {samples} samples {_m(st['ga'])}",
    ]
    if cfg.scoring.rerank:
        parts.append(f"re-rank {cfg.scoring.rerank} {_m(st['rerank'])}")
    if finetune:
        parts.append(f"finetune {cfg.finetune.epochs} epoch(s) {_m(st['finetune'])}")
        parts.append(f"emit + self-check {_m(st['emit and self-check'])}")
    cut = ", ".join(f"{k} {a}->{b}" for k, (a, b) in plan.changed.items())
    over = plan.predicted_total > 1.1 * plan.budget_s
    return (
        f"plan (time budget {plan.budget_s / 60:g} min): "
        + ", ".join(parts)
        + f"; predicted {plan.predicted_total / 60:.1f} min"
        + (f" (reduced to fit: {cut})" if cut else "")
        + (
            f"; OVER BUDGET: even the smallest run takes {plan.predicted_total / 60:.1f} min on this model and "
            "machine (setup and emission alone do not fit): raise --time-budget for a real search"
            if over
            else ""
        )
    )


def _m(seconds: float) -> str:
    return f"{seconds / 60:.1f}m" if seconds >= 60 else f"{seconds:.0f}s"


def eta(start: float, plan: Plan) -> float:
    """Seconds from now to the planned end of a run that started at `start` (time.monotonic)."""
    return max(0.0, start + plan.predicted_total - time.monotonic())


_ORDER = ("metaquantnet", "ga", "rerank", "finetune", "emit and self-check")


def stage_deadline(plan: Plan, stage: str, started: float, gas_done: int = 0) -> float:
    """When (time.monotonic) `stage` must stop: its own allowance (its estimate x 1.5 + 5 s), but no later
    than what leaves the stages after it their planned time before the budget ends, so an early stage that
    ran long does not push the run past its budget (a 5-minute budget once took 349-765 s on the zoo). Never
    less than a quarter of its own allowance: every stage does some work. `gas_done`: GA runs finished (a
    `search` runs one per budget; the ones still to come keep their share)."""
    now = time.monotonic()
    own = plan.deadlines[stage]
    later = sum(plan.stages.get(s, 0.0) for s in _ORDER[_ORDER.index(stage) + 1 :])
    if stage == "ga":
        per = 1.0 / max(plan.budgets, 1)
        later += plan.stages.get("ga", 0.0) * per * max(plan.budgets - gas_done - 1, 0)
        later -= plan.stages.get("rerank", 0.0) * per * gas_done  # the re-ranks done with those GAs
    left = started + plan.budget_s * (1 - _SLACK / 2) - now - later
    return now + max(min(own, left), 0.25 * own)
