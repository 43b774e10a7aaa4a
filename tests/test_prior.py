"""The hybrid search's sensitivity prior (`mqtool.search.prior`): the greedy allocation, the seed it adds
to the GA's first generation, and the switch back to the paper's pure method."""

from __future__ import annotations

import itertools

import numpy as np

from mqtool.search.ga import GeneticSearch, Genome
from mqtool.search.prior import sensitivity_allocation

WIDTHS = [2, 3, 4, 8]


def _convex_sensitivity(names: list[str], rng: np.random.Generator) -> dict:
    """Per layer, a sensitivity that falls with the width, by less at each step (the usual shape)."""
    layers = {}
    for n in names:
        scale = float(rng.uniform(0.1, 5.0))
        layers[n] = {str(w): scale * 2.0 ** (-w) for w in WIDTHS}
    return {"layers": layers}


def test_greedy_allocation_meets_the_budget_and_matches_brute_force_on_separable_costs() -> None:
    rng = np.random.default_rng(0)
    names = [f"l{i}" for i in range(5)]
    params = rng.integers(10, 1000, size=len(names)).astype(np.float64)

    def cost(w: np.ndarray) -> float:  # parameter-weighted average bits, as the bits budget
        return float((w * params).sum() / params.sum())

    sens = _convex_sensitivity(names, rng)
    for limit in (2.5, 3.0, 4.0, 6.0):
        got = sensitivity_allocation(sens, names, WIDTHS, {}, cost, limit)
        assert got is not None and cost(np.array(got, float)) <= limit + 1e-9
        total = sum(sens["layers"][n][str(b)] for n, b in zip(names, got))
        best = min(
            sum(sens["layers"][n][str(b)] for n, b in zip(names, combo))
            for combo in itertools.product(WIDTHS, repeat=len(names))
            if cost(np.array(combo, float)) <= limit + 1e-9
        )
        # greedy on a knapsack is not exact, but with convex per-layer curves it stays close
        assert total <= best * 1.5 + 1e-12, (limit, got, total, best)
        uniform = max(w for w in WIDTHS if w <= limit)
        assert total <= sum(sens["layers"][n][str(uniform)] for n in names) + 1e-12


def test_allocation_honours_pins_and_gives_up_when_nothing_fits() -> None:
    names = ["a", "b", "c"]
    sens = _convex_sensitivity(names, np.random.default_rng(1))

    def cost(w: np.ndarray) -> float:
        return float(np.mean(w))

    got = sensitivity_allocation(sens, names, WIDTHS, {1: 8}, cost, 4.0)
    assert got is not None and got[1] == 8 and np.mean(got) <= 4.0
    assert sensitivity_allocation(sens, names, WIDTHS, {0: 8, 1: 8}, cost, 4.0) is None
    assert sensitivity_allocation({"layers": {"a": {}}}, names, WIDTHS, {}, cost, 4.0) is None


def test_extra_seeds_join_the_first_generation_only_when_feasible() -> None:
    def cost(w, a):
        return float(np.mean(w))

    good = Genome((2, 8, 2), (8, 8, 8))
    bad = Genome((8, 8, 8), (8, 8, 8))
    ga = GeneticSearch(3, WIDTHS, cost, 4.0, extra_seeds=[good, bad])
    seeds = ga.seeds()
    assert good in seeds and bad not in seeds
    assert good not in GeneticSearch(3, WIDTHS, cost, 4.0).seeds()


def test_the_engine_seeds_its_ga_only_in_hybrid_mode(tmp_path, monkeypatch) -> None:
    from mqtool.model import load_model
    from mqtool.policy import LayerBits, Policy, average_weight_bits
    from mqtool.search import Budget, SearchConfig, driver
    from mqtool.search.api import load_dataset
    from mqtool.search.driver import SearchEngine

    from .conftest import example_path

    model = load_model(example_path("mnist_cnn"))
    data = load_dataset(example_path("mnist_cnn", "train.npz"), model).take(np.arange(300))
    made: list = []
    real = driver.prior_seeds
    monkeypatch.setattr(driver, "prior_seeds", lambda *a: made.append(real(*a)) or made[-1])
    tiny = dict(epochs=1, population=6, generations=1, parents=2, mutations=2, crossovers=2, rerank=2)
    seeded: list[Genome] = []
    real_ga = driver.GeneticSearch

    def recording_ga(*a, **k):
        seeded.append(k["extra_seeds"])
        return real_ga(*a, **k)

    monkeypatch.setattr(driver, "GeneticSearch", recording_ga)
    for hybrid in (True, False):
        cfg = SearchConfig.flat(**tiny, fitness_samples=32, sensitivity_seed=hybrid)
        eng = SearchEngine(model, data, cfg, str(tmp_path / str(hybrid)))
        eng.train_metaquantnet()
        eng.search(Budget("bits", 3.0))
    assert len(made) == 2 and made[0], "the hybrid did not build its seed"
    assert seeded[0] == made[0] and seeded[1] == made[1] == []
    g = made[0][0]
    pol = Policy({n: LayerBits(b, 8) for n, b in zip(eng.ctx.names, g.wbits)})
    assert average_weight_bits(pol, eng.ctx.info.layers) <= 3.0 + 1e-9
