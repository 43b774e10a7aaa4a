"""How the GA scores candidates: racing against the worst parent stops only candidates that are worse
than it (and leaves every other score untouched), and the re-ranking keeps the finalist that is best on the
whole search split. Tests never change the shared engine's configuration: each builds its own `Scorer`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mqtool.model import load_model
from mqtool.search import SearchConfig
from mqtool.search.api import load_dataset
from mqtool.search.driver import SearchEngine
from mqtool.search.ga import GeneticSearch, Genome
from mqtool.search.scoring import Scorer, choose_finalist, chunks

from .conftest import example_path


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = load_model(example_path("mnist_cnn"))
    data = load_dataset(example_path("mnist_cnn", "train.npz"), model).take(np.arange(1500))
    cfg = SearchConfig.flat(epochs=1, fitness_samples=256, rerank_samples=300, batch_size=128)
    eng = SearchEngine(model, data, cfg, str(tmp_path_factory.mktemp("wd")))
    eng.train_metaquantnet()
    return eng


def _scorer(eng: SearchEngine, **changes) -> Scorer:
    """A scorer of its own (own terms cache, own statistics) on the shared engine's context."""
    s = Scorer(eng.ctx, lambda e, d: None, replace(eng.cfg.scoring, **changes))
    s.mqn = eng.mqn
    return s


def _genome(eng: SearchEngine, bits: list[int]) -> Genome:
    return Genome(tuple(bits), tuple([eng.cfg.space.act_bits] * eng.ctx.n))


def _policies(eng: SearchEngine, count: int, seed: int) -> list[Genome]:
    rng = np.random.default_rng(seed)
    return [_genome(eng, [int(b) for b in rng.choice(eng.ctx.widths, eng.ctx.n)]) for _ in range(count)]


def test_chunks_cover_every_row_once() -> None:
    for n in (1, 63, 64, 65, 128, 300, 801):
        parts = chunks(n, 64)
        assert parts[0].start == 0 and parts[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_racing_stops_only_worse_candidates_and_keeps_the_rest_exact(engine) -> None:
    eng = engine
    exact_scorer, racer = _scorer(eng, racing=False), _scorer(eng, racing=True)
    assert racer.plans[True][-1].stop == 256 and len(racer.plans[True]) == 4 and len(racer.plans[False]) == 2
    ref = _genome(eng, [6] * eng.ctx.n)
    cands = [_genome(eng, [2] * eng.ctx.n), *_policies(eng, 12, seed=3)]
    exact = exact_scorer.evaluate([ref, *cands])
    ref_fit, exact = exact[0], exact[1:]
    racer.terms[ref.key()] = exact_scorer.terms[ref.key()]
    raced = racer.evaluate(cands, ref)
    stopped = racer.race_stats["stopped"]
    # all-2-bit is far worse than all-6-bit: told apart on the first chunk
    assert raced[0] > ref_fit
    assert stopped >= 1
    assert racer.race_stats["samples"] < 256 * len(cands)
    for got, full in zip(raced, exact):
        if got == full:
            continue  # scored to the end: the same value as without racing
        assert got > ref_fit  # stopped: only ever when worse than the reference, so never a parent
        assert full > ref_fit - 0.05 * abs(ref_fit)  # and its true score was not clearly better


def test_reference_scored_on_demand_after_a_resume(engine) -> None:
    """A resumed GA hands the scorer a reference it never scored: it is scored in full first, with exactly
    the terms a fresh scorer gives it, and the candidate is then raced against those terms."""
    eng = engine
    ref = _genome(eng, [5] * eng.ctx.n)
    cand = _genome(eng, [2] * eng.ctx.n)
    fresh = _scorer(eng, racing=False)
    ref_fit, cand_fit = fresh.evaluate([ref, cand])
    resumed = _scorer(eng, racing=True)
    assert ref.key() not in resumed.terms
    got = resumed.evaluate([cand], ref)
    np.testing.assert_array_equal(resumed.terms[ref.key()], fresh.terms[ref.key()])
    assert len(resumed.terms[ref.key()]) == 256
    # all-2-bit is far worse than all-5-bit: stopped, and scored worse than the reference
    assert resumed.race_stats["stopped"] == 1
    assert got[0] > ref_fit and cand_fit > ref_fit


def test_rerank_picks_the_best_on_the_whole_split(engine) -> None:
    eng = engine
    scorer = _scorer(eng)
    finalists = _policies(eng, 5, seed=11)
    best, fit = scorer.rerank(finalists)
    full = []
    for g in finalists:
        eng.ctx.set_activation_quant(g.abits)
        with eng.ctx.net.override_weights(eng.mqn.generate(list(g.wbits))):
            full.append(scorer.fitness())
    assert len(eng.ctx.search_set) == 300  # the whole split (capped), not the GA's 256
    # the same terms summed in another order can differ in the last float bits
    assert fit == pytest.approx(min(full), rel=1e-6) and best == finalists[int(np.argmin(full))]


def test_ga_hands_the_worst_parent_to_the_evaluator_only_with_racing() -> None:
    from mqtool.search.config import GAConfig

    cfg = GAConfig(population=12, generations=3, parents=4, mutations=4, crossovers=4)
    seen: list = []

    def evaluate(gs, reference=None):
        seen.append(reference)
        return [float(sum(g.wbits)) for g in gs]

    ga = GeneticSearch(5, [2, 4, 8], lambda w, a: float(np.mean(w)), 6.0, config=cfg, seed=0, racing=True)
    ga.run(evaluate)
    assert seen[0] is None and all(r is not None for r in seen[1:])
    plain: list = []
    GeneticSearch(5, [2, 4, 8], lambda w, a: float(np.mean(w)), 6.0, config=cfg, seed=0).run(
        lambda gs: plain.append(1) or [float(sum(g.wbits)) for g in gs]
    )
    assert len(plain) == 3


def test_choose_finalist_breaks_statistical_ties_towards_the_bigger_policy() -> None:
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 0.1, 400)
    noise = rng.normal(0, 0.05, 400)
    small, big = base, base + noise - noise.mean() + 0.001  # the bigger one is 0.001 worse: within noise
    clearly_worse_big = base + 0.05 + rng.normal(0, 0.001, 400)
    fits = [float(t.mean()) for t in (small, big)]
    assert choose_finalist([small, big], fits, [(0,), (1,)], used=[3.0, 4.0]) == 1
    assert choose_finalist([small, big], fits, [(0,), (1,)], used=None) == 0
    fits = [float(t.mean()) for t in (small, clearly_worse_big)]
    assert choose_finalist([small, clearly_worse_big], fits, [(0,), (1,)], used=[3.0, 4.0]) == 0


def test_rerank_prefers_the_bigger_policy_when_the_split_cannot_tell_them_apart(engine) -> None:
    from mqtool.search.budgets import BudgetCost

    eng = engine
    scorer = _scorer(eng)
    n = eng.ctx.n

    def terms(g: Genome) -> np.ndarray:
        eng.ctx.set_activation_quant(g.abits)
        with eng.ctx.net.override_weights(eng.mqn.generate(list(g.wbits))):
            return scorer.full_terms()

    big = _genome(eng, [8] * n)
    ref = terms(big)
    # the layer whose 8 -> 6 bits the whole split notices least: a pair that only differs by noise
    gaps = []
    for i in range(n):
        d = terms(_genome(eng, [8] * i + [6] + [8] * (n - i - 1))) - ref
        gaps.append(abs(float(d.mean())) / (float(d.std(ddof=1)) / np.sqrt(len(d)) + 1e-30))
    quiet = int(np.argmin(gaps))
    small = _genome(eng, [8] * quiet + [6] + [8] * (n - quiet - 1))
    assert gaps[quiet] <= 1.0, "no layer pair is a statistical tie on this split"
    cost = BudgetCost("bits", eng.ctx.info.layers)
    got, _ = scorer.rerank([small, big], lambda g: float(cost(np.array(g.wbits), np.array(g.abits))))
    assert got == big
    # without a cost, plain lowest fitness
    plain, _ = scorer.rerank([small, big])
    assert plain == (small if terms(small).sum() <= ref.sum() else big)


def test_ga_checkpoint_keeps_what_a_resumed_race_needs(tmp_path) -> None:
    import os

    import torch

    from mqtool.search import Budget

    model = load_model(example_path("mnist_cnn"))
    data = load_dataset(example_path("mnist_cnn", "train.npz"), model).take(np.arange(600))
    cfg = SearchConfig.flat(
        epochs=1, population=8, generations=3, parents=3, mutations=3, crossovers=3, fitness_samples=100
    )
    eng = SearchEngine(model, data, cfg, str(tmp_path))
    eng.train_metaquantnet()
    first = eng.search(Budget("bits", 3.0))
    name = next(f for f in os.listdir(tmp_path) if f.startswith("ga-"))
    state = torch.load(os.path.join(tmp_path, name), weights_only=True)
    assert isinstance(state["first_look"], bool)
    assert len(state["parent_terms"]) == 3
    for key, terms in state["parent_terms"]:
        np.testing.assert_array_equal(np.asarray(terms), eng.scorer.terms[tuple(key)])
    # a new engine on the same work directory resumes with those exact terms and the same winner
    again = SearchEngine(model, data, cfg, str(tmp_path))
    again.train_metaquantnet()
    res = again.search(Budget("bits", 3.0))
    for key, terms in state["parent_terms"]:
        np.testing.assert_array_equal(again.scorer.terms[tuple(key)], np.asarray(terms))
    assert res.policy.dumps() == first.policy.dumps()


def _search_recording_activations(eng: SearchEngine, budget) -> tuple[list, object]:
    seen: list = []
    eng.sensitivity()  # computed once per run, with float activations; not part of the screening recorded
    real = eng.ctx.set_activation_quant
    eng.ctx.set_activation_quant = lambda abits, *dyn: (seen.append(abits), real(abits, *dyn))[1]
    try:
        return seen, eng.search(budget)
    finally:
        eng.ctx.set_activation_quant = real


def test_float_activation_screening_only_while_activation_widths_are_fixed(tmp_path) -> None:
    import torch

    from mqtool.search import Budget

    model = load_model(example_path("mnist_cnn"))
    data = load_dataset(example_path("mnist_cnn", "train.npz"), model).take(np.arange(500))
    tiny = dict(
        epochs=1,
        population=6,
        generations=2,
        parents=2,
        mutations=2,
        crossovers=2,
        fitness_samples=64,
        rerank=3,
    )
    eng = SearchEngine(model, data, SearchConfig.flat(**tiny), str(tmp_path / "a"))
    eng.train_metaquantnet()
    seen, res = _search_recording_activations(eng, Budget("bits", 3.0))
    assert None in seen, "candidates were not screened with float activations"
    assert any(a is not None for a in seen), "the finalists were not re-ranked with quantized activations"
    # the reported fitness is the exact one: activations quantized as emitted, whole search split
    ctx = eng.ctx
    wbits = [res.policy.layers[n].weight_bits for n in ctx.names]
    abits = tuple(res.policy.layers[n].act_bits for n in ctx.names)
    with torch.no_grad(), ctx.net.override_weights(eng.mqn.generate(wbits)):
        ctx.set_activation_quant(abits)
        assert res.fitness == eng.scorer.fitness()
        ctx.set_activation_quant(None)
        assert res.fitness != eng.scorer.fitness()
    for option in ("exact_screening", "search_act"):
        other = SearchEngine(model, data, SearchConfig.flat(**tiny, **{option: True}), str(tmp_path / option))
        other.train_metaquantnet()
        seen, _ = _search_recording_activations(other, Budget("bits", 2.5))
        assert seen and None not in seen, option
