"""How the GA scores candidates: racing against the worst parent stops only candidates that are worse
than it (and leaves every other score untouched), and the re-ranking keeps the finalist that is best on the
whole search split."""

from __future__ import annotations

import numpy as np
import pytest

from mqtool.model import load_model
from mqtool.search import SearchConfig
from mqtool.search.api import load_dataset
from mqtool.search.engine import SearchEngine, _chunks
from mqtool.search.ga import GAConfig, GeneticSearch, Genome

from .conftest import example_path


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = load_model(example_path("mnist_cnn"))
    data = load_dataset(example_path("mnist_cnn", "train.npz"), model).take(np.arange(1500))
    cfg = SearchConfig(epochs=1, fitness_samples=256, rerank_samples=300, batch_size=128)
    eng = SearchEngine(model, data, cfg, str(tmp_path_factory.mktemp("wd")))
    eng.train_metaquantnet()
    return eng


def _genome(eng: SearchEngine, bits: list[int]) -> Genome:
    return Genome(tuple(bits), tuple([eng.cfg.act_bits] * eng.n))


def _policies(eng: SearchEngine, count: int, seed: int) -> list[Genome]:
    rng = np.random.default_rng(seed)
    return [_genome(eng, [int(b) for b in rng.choice(eng.widths, eng.n)]) for _ in range(count)]


def test_chunks_cover_every_row_once() -> None:
    for n in (1, 63, 64, 65, 128, 300, 801):
        parts = _chunks(n, 64)
        assert parts[0].start == 0 and parts[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_racing_stops_only_worse_candidates_and_keeps_the_rest_exact(engine) -> None:
    eng = engine
    assert eng._plans[True][-1].stop == 256 and len(eng._plans[True]) == 4 and len(eng._plans[False]) == 2
    ref = _genome(eng, [6] * eng.n)
    cands = [_genome(eng, [2] * eng.n), *_policies(eng, 12, seed=3)]
    eng.cfg.racing = False
    exact = eng.evaluate([ref, *cands])
    ref_fit, exact = exact[0], exact[1:]
    ref_terms = eng._terms[ref.key()]
    eng._terms.clear()  # forget the full scores, which later budgets would reuse
    eng._terms[ref.key()] = ref_terms
    eng.cfg.racing = True
    before = dict(eng.race_stats)
    raced = eng.evaluate(cands, ref)
    stopped = eng.race_stats["stopped"] - before["stopped"]
    # all-2-bit is far worse than all-6-bit: told apart on the first chunk
    assert raced[0] > ref_fit
    assert stopped >= 1
    assert eng.race_stats["samples"] - before["samples"] < 256 * len(cands)
    for got, full in zip(raced, exact):
        if got == full:
            continue  # scored to the end: the same value as without racing
        assert got > ref_fit  # stopped: only ever when worse than the reference, so never a parent
        assert full > ref_fit - 0.05 * abs(ref_fit)  # and its true score was not clearly better


def test_reference_scored_on_demand_after_a_resume(engine) -> None:
    eng = engine
    ref = _genome(eng, [5] * eng.n)
    eng._terms.pop(ref.key(), None)
    got = eng.evaluate([_genome(eng, [2] * eng.n)], ref)
    assert ref.key() in eng._terms and len(eng._terms[ref.key()]) == 256
    assert np.isfinite(got[0])


def test_rerank_picks_the_best_on_the_whole_split(engine) -> None:
    eng = engine
    finalists = _policies(eng, 5, seed=11)
    best, fit = eng._rerank(finalists)
    full = []
    for g in finalists:
        eng.set_activation_quant(g.abits)
        with eng.net.override_weights(eng.mqn.generate(list(g.wbits))):
            full.append(eng._fitness())
    assert len(eng.search_set) == 300  # the whole split (capped), not the GA's 256
    assert fit == min(full) and best == finalists[int(np.argmin(full))]


def test_ga_hands_the_worst_parent_to_the_evaluator_only_with_racing() -> None:
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


def test_rerank_prefers_the_bigger_policy_when_the_split_cannot_tell_them_apart(engine) -> None:
    from mqtool.search.budgets import BudgetCost

    eng = engine
    small = _genome(eng, [6] * eng.n)
    big = _genome(eng, [6] * (eng.n - 1) + [8])  # one more layer at 8 bits: a near-identical loss
    cost = BudgetCost("bits", eng.info.layers)
    terms = []
    for g in (small, big):
        eng.set_activation_quant(g.abits)
        with eng.net.override_weights(eng.mqn.generate(list(g.wbits))):
            terms.append(eng._full_terms())
    d = terms[1] - terms[0]
    tied = float(d.mean()) <= float(d.std(ddof=1)) / np.sqrt(len(d))
    got, _ = eng._rerank([small, big], cost)
    assert got == (big if tied else small)
    # without a cost, plain lowest fitness
    plain, _ = eng._rerank([small, big])
    assert plain == (small if terms[0].sum() <= terms[1].sum() else big)


def test_ga_checkpoint_keeps_what_a_resumed_race_needs(tmp_path) -> None:
    import os

    import torch

    from mqtool.search import Budget

    model = load_model(example_path("mnist_cnn"))
    data = load_dataset(example_path("mnist_cnn", "train.npz"), model).take(np.arange(600))
    cfg = SearchConfig(
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
        np.testing.assert_array_equal(np.asarray(terms), eng._terms[tuple(key)])
    # a new engine on the same work directory resumes with those exact terms and the same winner
    again = SearchEngine(model, data, cfg, str(tmp_path))
    again.train_metaquantnet()
    res = again.search(Budget("bits", 3.0))
    for key, terms in state["parent_terms"]:
        np.testing.assert_array_equal(again._terms[tuple(key)], np.asarray(terms))
    assert res.policy.dumps() == first.policy.dumps()


def test_float_activation_screening_only_while_activation_widths_are_fixed(tmp_path) -> None:
    import torch

    from mqtool.search import Budget

    model = load_model(example_path("mnist_cnn"))
    data = load_dataset(example_path("mnist_cnn", "train.npz"), model).take(np.arange(500))
    cfg = SearchConfig(
        epochs=1,
        population=6,
        generations=2,
        parents=2,
        mutations=2,
        crossovers=2,
        fitness_samples=64,
        rerank=3,
    )
    eng = SearchEngine(model, data, cfg, str(tmp_path))
    eng.train_metaquantnet()
    seen: list = []
    real = eng.set_activation_quant
    eng.set_activation_quant = lambda abits: (seen.append(abits), real(abits))[1]
    res = eng.search(Budget("bits", 3.0))
    assert None in seen, "candidates were not screened with float activations"
    assert any(a is not None for a in seen), "the finalists were not re-ranked with quantized activations"
    # the reported fitness is the exact one: activations quantized as emitted, whole search split
    wbits = [res.policy.layers[n].weight_bits for n in eng.names]
    abits = tuple(res.policy.layers[n].act_bits for n in eng.names)
    with torch.no_grad(), eng.net.override_weights(eng.mqn.generate(wbits)):
        real(abits)
        assert res.fitness == eng._fitness()
        real(None)
        assert res.fitness != eng._fitness()
    for option in ("exact_screening", "search_act"):
        setattr(eng.cfg, option, True)
        seen.clear()
        eng.search(Budget("bits", 2.5))
        assert seen and None not in seen, option
        setattr(eng.cfg, option, False)
