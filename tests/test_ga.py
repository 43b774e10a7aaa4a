"""The genetic search on synthetic fitness functions: it respects the budget, pins and caching, finds the
known optimum of a separable problem, is deterministic per seed and resumes from its state."""

from __future__ import annotations

import numpy as np
import pytest

from mqtool.analysis import LayerInfo
from mqtool.errors import InputError
from mqtool.search.budgets import Budget, BudgetCost, feasible_range, parse_budgets
from mqtool.search.ga import GAConfig, GeneticSearch

WIDTHS = [2, 3, 4, 5, 6, 8]


def _layers(params, macs=None):
    macs = macs or params
    return [
        LayerInfo(f"l{i}", "Conv", "w", [p], p, "x", "y", m) for i, (p, m) in enumerate(zip(params, macs))
    ]


def _separable(sens):
    """Fitness = sum_l sens_l * 4^-bits_l: a layer with larger sensitivity wants more bits."""
    sens = np.asarray(sens)

    def evaluate(genomes):
        return [float((sens * 4.0 ** -np.array(g.wbits)).sum()) for g in genomes]

    return evaluate


def _brute_force(sens, params, limit):
    best, best_f = None, np.inf
    import itertools

    cost = np.asarray(params) / np.sum(params)
    for bits in itertools.product(WIDTHS, repeat=len(sens)):
        if np.dot(bits, cost) <= limit + 1e-9:
            f = float((np.asarray(sens) * 4.0 ** -np.array(bits)).sum())
            if f < best_f:
                best, best_f = bits, f
    return best, best_f


def test_finds_optimum_of_separable_problem_within_budget():
    params = [100, 300, 50, 200, 150]
    sens = [5.0, 0.2, 8.0, 1.0, 0.5]
    cost = BudgetCost("bits", _layers(params))
    ga = GeneticSearch(5, WIDTHS, cost, 3.5, config=GAConfig(population=40, generations=25), seed=1)
    calls = []

    def evaluate(gs):
        calls.append(len(gs))
        return _separable(sens)(gs)

    res = ga.run(evaluate)
    _, opt = _brute_force(sens, params, 3.5)
    assert cost(np.array(res.best.wbits), None) <= 3.5 + 1e-9
    assert res.best_fitness == pytest.approx(opt, rel=1e-6)
    # every candidate scored once: the cache holds exactly what was evaluated
    assert sum(calls) == res.evaluated == len(ga.cache)


def test_every_evaluated_candidate_is_feasible_and_pins_hold():
    params = [10, 20, 30, 40]
    cost = BudgetCost("bits", _layers(params))
    seen = []

    def evaluate(gs):
        seen.extend(gs)
        return [float(-np.dot(g.wbits, params)) for g in gs]

    ga = GeneticSearch(
        4, WIDTHS, cost, 3.0, pins={0: 8}, config=GAConfig(population=20, generations=5), seed=0
    )
    res = ga.run(evaluate)
    assert seen and all(cost(np.array(g.wbits), None) <= 3.0 + 1e-9 for g in seen)
    assert all(g.wbits[0] == 8 for g in seen)
    # maximising bits under the budget uses (nearly) all of it
    assert cost(np.array(res.best.wbits), None) > 2.8


def test_deterministic_and_resumable():
    params = [100, 300, 50, 200, 150, 70]
    sens = [5.0, 0.2, 8.0, 1.0, 0.5, 2.0]
    cost = BudgetCost("bits", _layers(params))
    cfg = GAConfig(population=20, generations=8)
    a = GeneticSearch(6, WIDTHS, cost, 3.0, config=cfg, seed=7).run(_separable(sens))
    b = GeneticSearch(6, WIDTHS, cost, 3.0, config=cfg, seed=7).run(_separable(sens))
    assert a.best == b.best and a.history == b.history

    first = GeneticSearch(6, WIDTHS, cost, 3.0, config=cfg, seed=7)
    for _ in range(3):
        first.step(_separable(sens))
    resumed = GeneticSearch(6, WIDTHS, cost, 3.0, config=cfg, seed=7)
    resumed.load_state(first.state())
    c = resumed.run(_separable(sens))
    assert c.best == a.best and c.history == a.history


def test_search_act_and_bitops_budget():
    layers = _layers([10, 10, 10], macs=[1000, 10, 10])
    cost = BudgetCost("bitops", layers)
    ga = GeneticSearch(
        3,
        WIDTHS,
        cost,
        0.5,
        search_act=True,
        act_widths=(8, 32),
        config=GAConfig(population=20, generations=6),
        seed=0,
    )

    def evaluate(gs):
        # prefers float activations and high bits, but the budget is on BitOPs
        return [-(np.sum(g.wbits) + np.sum(np.array(g.abits) == 32)) for g in gs]

    res = ga.run(evaluate)
    assert cost(np.array(res.best.wbits), np.array(res.best.abits)) <= 0.5 + 1e-9
    # the exact optimum over weight widths x {8-bit, float} activations, by brute force
    import itertools

    best = min(
        (-(sum(w) + sum(a == 32 for a in acts)), w, acts)
        for w in itertools.product(WIDTHS, repeat=3)
        for acts in itertools.product((8, 32), repeat=3)
        if cost(np.array(w), np.array(acts)) <= 0.5 + 1e-9
    )
    assert res.best_fitness == best[0]
    # the optimum keeps the cheap layers' activations float and compresses the MAC-heavy one
    assert res.best.abits[1:] == (32, 32) and res.best.wbits[0] < 8


def test_feasible_range_and_parse():
    layers = _layers([100, 300])
    cost = BudgetCost("bits", layers)
    lo, hi = feasible_range(cost, WIDTHS, {1: 8}, np.full(2, 8.0), np.full(2, 8.0), 2)
    assert lo == pytest.approx((2 * 100 + 8 * 300) / 400) and hi == 8
    assert [b.value for b in parse_budgets("bits", "2.5, 3,4")] == [2.5, 3.0, 4.0]
    for bad in ("x", "-1", "3,3", "nan"):
        with pytest.raises(InputError, match="^budget.bits: ") as e:
            parse_budgets("bits", bad)
        assert e.value.field == "budget.bits"
    assert Budget("bitops", 0.25).label == "bitops-0.25"


def test_cache_packing_round_trips_including_empty_and_old_format() -> None:
    from mqtool.search.ga import _pack_cache, _unpack_cache

    cache = {(2, 3, 8, 8): 0.5, (8, 2, 8, 32): float("inf")}
    assert _unpack_cache(_pack_cache(cache)) == cache
    assert _unpack_cache(_pack_cache({})) == {}
    assert _unpack_cache([[[2, 3], 0.25]]) == {(2, 3): 0.25}
