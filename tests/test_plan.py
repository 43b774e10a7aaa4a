"""The time budget: the plan keeps the configured values when they fit, shrinks what the user did not set
when they do not, and every stage stops at its deadline with what it has."""

from __future__ import annotations

import numpy as np
import pytest

from mqtool.search import SearchConfig
from mqtool.search.config import GAConfig
from mqtool.search.ga import GeneticSearch
from mqtool.search.plan import Costs, candidates, describe, plan


def _costs(**kw) -> Costs:
    base = dict(
        train_step=0.1,
        per_sample=0.001,
        per_candidate=0.002,
        steps_per_epoch=20,
        search_samples=400,
        check_samples=100,
        elapsed=10.0,
    )
    return Costs(**(base | kw))


def test_defaults_are_kept_when_they_fit() -> None:
    cfg = SearchConfig()
    new, p = plan(cfg, _costs(), budget_s=3600)
    assert new == cfg and p.changed == {}
    assert p.predicted_total < 3600
    # the prediction adds up what each stage costs at these settings
    per_cand = 0.001 * 128 + 0.002
    assert p.stages["ga"] == pytest.approx(candidates(50, 20) * per_cand)
    assert p.stages["metaquantnet"] == pytest.approx(4 * 20 * 0.1)


def test_a_tight_budget_shrinks_what_the_user_did_not_set() -> None:
    cfg = SearchConfig.flat(population=50)
    costs = _costs(train_step=1.0, per_sample=0.02)
    new, p = plan(cfg, costs, budget_s=600, fixed=frozenset({"population"}))
    assert new.ga.population == 50  # set by the user: kept
    assert new.ga.generations < 20
    assert "population" not in p.changed and "generations" in p.changed
    # a budget too tight for MetaQuantNet's configured epochs shortens them too
    short, _ = plan(
        cfg, _costs(train_step=5.0, per_sample=0.02), budget_s=600, fixed=frozenset({"population"})
    )
    assert short.training.epochs < 4
    # the planned run fits (the prediction is what the plan sized against)
    assert p.predicted_total <= 600
    # a looser budget never plans more than the configured values
    roomy, _ = plan(cfg, costs, budget_s=10**6)
    assert roomy.ga.generations == 20 and roomy.training.epochs == 4
    assert "GA 50x" in describe(p, new, finetune=True)


def test_a_candidate_costs_at_most_the_search_split() -> None:
    # 384 VAD chunks leave a 77-sample search split: a candidate is scored on 77 samples, not the
    # configured 128, and the plan (and its line) must say what will happen, not what was asked
    cfg = SearchConfig()
    _, small = plan(cfg, _costs(search_samples=77), budget_s=3600)
    assert small.stages["ga"] == pytest.approx(candidates(50, 20) * (0.001 * 77 + 0.002))
    assert "on 77 samples" in describe(small, cfg, finetune=True)
    _, big = plan(cfg, _costs(), budget_s=3600)
    assert "on 128 samples" in describe(big, cfg, finetune=True)


def test_the_emission_reserve_follows_the_timed_calibration() -> None:
    # emission calibrates on ORT three times; a setup spent on the teacher pass says nothing about that
    cfg = SearchConfig()
    _, timed = plan(cfg, _costs(elapsed=100.0, calibration=2.0, check_samples=0), budget_s=3600)
    assert timed.stages["emit and self-check"] == pytest.approx(4 * 2.0 + 0.05 * 100.0)
    _, heavy = plan(cfg, _costs(elapsed=60.0, calibration=40.0, check_samples=0), budget_s=3600)
    assert heavy.stages["emit and self-check"] > 2 * 60.0
    # unknown (cached on resume): the whole setup stands in for it
    _, cached = plan(cfg, _costs(elapsed=100.0, check_samples=0), budget_s=3600)
    assert cached.stages["emit and self-check"] == pytest.approx(100.0 + 0.05 * 100.0)


def test_the_plan_scales_with_the_budget() -> None:
    costs = _costs(train_step=0.5, per_sample=0.01)
    sizes = []
    for minutes in (5, 15, 45):
        new, _ = plan(SearchConfig(), costs, budget_s=60 * minutes)
        sizes.append(candidates(new.ga.population, new.ga.generations) * new.scoring.fitness_samples)
    assert sizes[0] < sizes[1] <= sizes[2]


def test_search_without_finetuning_gives_finetuning_time_to_the_others() -> None:
    costs = _costs(train_step=1.0, per_sample=0.02)
    with_ft, p1 = plan(SearchConfig(), costs, budget_s=900, finetune=True)
    without, p2 = plan(SearchConfig(), costs, budget_s=900, finetune=False)
    assert p2.stages["finetune"] == 0
    assert candidates(without.ga.population, without.ga.generations) >= candidates(
        with_ft.ga.population, with_ft.ga.generations
    )


def test_ga_stops_at_its_deadline_with_the_best_so_far() -> None:
    cfg = GAConfig(population=10, generations=50)
    calls = []
    ga = GeneticSearch(4, [2, 4, 8], lambda w, a: float(np.mean(w)), 6.0, config=cfg, seed=0)
    res = ga.run(
        lambda gs: calls.append(1) or [float(-sum(g.wbits)) for g in gs], should_stop=lambda: len(calls) >= 3
    )
    assert ga.generation == 3 and len(res.history) == 3
    assert res.best_fitness == min(ga.cache.values())


def test_a_budget_that_setup_alone_exceeds_says_so() -> None:
    """A large model on a slow machine: setup already used most of a 5-minute budget. The plan shrinks
    everything it may, and the line says plainly that the run cannot fit."""
    cfg = SearchConfig()
    fits, p_fits = plan(cfg, _costs(), budget_s=3600)
    assert "OVER BUDGET" not in describe(p_fits, fits, finetune=True)
    new, p = plan(cfg, _costs(elapsed=280.0, train_step=2.0, per_sample=0.3), budget_s=300)
    assert p.predicted_total > 1.1 * 300
    line = describe(p, new, finetune=True)
    assert "OVER BUDGET" in line and "--time-budget" in line


def test_the_ga_stops_mid_generation_once_its_deadline_passes() -> None:
    """Slow candidates (a detector fed one image per run): the rest of a generation is left unscored once
    the deadline passes, never cached, and the GA ends with the best of what it scored."""
    cfg = GAConfig(population=10, generations=5)
    ga = GeneticSearch(4, [2, 4, 8], lambda w, a: float(np.mean(w)), 6.0, config=cfg, seed=0)
    scored: list[int] = []

    def evaluate(gs):  # the Scorer's contract: NaN for a candidate left unscored
        out = []
        for g in gs:
            if len(scored) >= 13:
                out.append(float("nan"))
            else:
                scored.append(1)
                out.append(float(-sum(g.wbits)))
        return out

    res = ga.run(evaluate, should_stop=lambda: len(scored) >= 13)
    assert len(scored) == 13 and len(ga.cache) == 13 and ga.generation == 2
    assert all(g.key() in ga.cache for g in ga.population) and len(ga.population) >= 3
    assert res.best_fitness == min(ga.cache.values())


def test_the_scorer_leaves_candidates_unscored_past_the_deadline(tmp_path) -> None:
    from mqtool.model import load_model
    from mqtool.search.api import load_dataset
    from mqtool.search.driver import SearchEngine
    from mqtool.search.ga import Genome

    from .conftest import example_path

    model = load_model(example_path("mnist_cnn"))
    data = load_dataset(example_path("mnist_cnn", "train.npz"), model).take(np.arange(200))
    eng = SearchEngine(model, data, SearchConfig.flat(epochs=0, fitness_samples=16), str(tmp_path))
    eng.train_metaquantnet()
    n = eng.ctx.n
    genomes = [Genome(tuple([w] * n), tuple([8] * n)) for w in (8, 6, 4, 3)]
    eng.scorer.should_stop = lambda: True  # already past: one candidate is still scored
    got = eng.scorer.evaluate(genomes)
    assert np.isfinite(got[0]) and all(np.isnan(got[1:]))
    eng.scorer.should_stop = None
    assert all(np.isfinite(eng.scorer.evaluate(genomes)))


def test_a_stage_that_starts_late_leaves_the_later_stages_their_time() -> None:
    """Each stage's deadline is its own allowance, capped by what the stages after it need before the
    budget ends, and never under a quarter of its allowance."""
    import time

    from mqtool.search.plan import Plan, stage_deadline

    stages = {"setup": 10.0, "metaquantnet": 100.0, "ga": 200.0, "rerank": 10.0, "finetune": 50.0,
              "emit and self-check": 20.0}  # fmt: skip
    deadlines = {"metaquantnet": 155.0, "ga": 305.0, "finetune": 80.0}
    p = Plan(600.0, stages, {}, deadlines, 0.0, budgets=1)
    now = time.monotonic()
    # on time (the GA starts after setup + MetaQuantNet): its own allowance, 1.5 x its estimate + 5 s
    assert stage_deadline(p, "ga", started=now - 110.0) - now == pytest.approx(305.0, abs=0.5)
    # MetaQuantNet ran 150 s over: the GA must stop where rerank, finetune and emission still fit
    cap = 600.0 * (1 - 0.07 / 2) - 260.0 - (10.0 + 50.0 + 20.0)
    assert stage_deadline(p, "ga", started=now - 260.0) - now == pytest.approx(cap, abs=0.5)
    # past the budget already: a quarter of its allowance, not nothing
    assert stage_deadline(p, "ga", started=now - 590.0) - now == pytest.approx(305.0 / 4, abs=0.5)
    # a search of 3 budgets: the first GA keeps the other two their share
    p3 = Plan(600.0, stages, {}, {**deadlines, "ga": 105.0}, 0.0, budgets=3)
    first = stage_deadline(p3, "ga", started=now - 300.0, gas_done=0) - now
    last = stage_deadline(p3, "ga", started=now - 300.0, gas_done=2) - now
    assert first < last <= 105.0 + 0.5


def test_small_data_still_makes_optimizer_steps(tmp_path) -> None:
    """A few hundred samples at the default mini-batch of 128 made two steps an epoch (ddddocr: finetuning
    barely moved); unless the user set the mini-batch, an epoch has at least 16 steps of at least 8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mqtool.search.context import Samples
    from mqtool.search.driver import SearchEngine

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)

    def batch(n: int, **cfg) -> tuple[int, int]:
        x = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
        eng = SearchEngine(m, Samples({"x": x}), SearchConfig.flat(**cfg), str(tmp_path / f"{n}-{len(cfg)}"))
        return eng.cfg.training.batch_size, len(eng.ctx.train)

    b, train = batch(320)
    assert b < 128 and -(-train // b) >= 16
    assert batch(120)[0] == 8  # never under 8 samples
    assert batch(5000)[0] == 128  # enough data: the configured mini-batch
    assert batch(320, batch_size=128, fixed=frozenset({"batch_size"}))[0] == 128  # set by the user: kept


def test_a_time_budget_announces_its_ceiling_before_the_setup(capsys) -> None:
    import time

    from mqtool.console import Console
    from mqtool.search.api import _announce_ceiling
    from mqtool.search.config import PlanConfig

    events: list = []
    _announce_ceiling(SearchConfig(plan=PlanConfig(time_budget=5)), lambda e, d: events.append((e, d)))
    assert events == [("ceiling", {"budget_s": 300.0})]
    # the CLI lists every option typed: only a sizing one withholds the ceiling
    events.clear()
    typed = PlanConfig(
        time_budget=5, fixed=frozenset({"model", "data", "output", "target_bits", "time_budget"})
    )
    _announce_ceiling(SearchConfig(plan=typed), lambda e, d: events.append((e, d)))
    assert events == [("ceiling", {"budget_s": 300.0})]
    # an option the user set may outlast the budget: no ceiling is promised then
    events.clear()
    fixed = PlanConfig(time_budget=5, fixed=frozenset({"epochs"}))
    _announce_ceiling(SearchConfig(plan=fixed), lambda e, d: events.append((e, d)))
    _announce_ceiling(SearchConfig(), lambda e, d: events.append((e, d)))
    assert events == []
    Console(time.monotonic() - 60, tty=False)("ceiling", {"budget_s": 300.0})
    err = capsys.readouterr().err
    assert "time budget 5 min: ETA 4:00 at most" in err or "ETA 3:59 at most" in err
