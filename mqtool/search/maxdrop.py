"""`--max-drop X`: the smallest policy whose quality drop, measured on ONNX Runtime on held-out samples, is at
most X points.

One MetaQuantNet serves a front of size budgets between the smallest and the uniform 8-bit file. The front
is probed by bisection (quality falls as the budget shrinks): each probe searches its budget, finetunes the
winner, emits it in memory and measures it on ONNX Runtime on the check split, which nothing in the search
has seen. The drop is in points of top-1 accuracy when labels exist, else of the model's agreement with
fp32 (`mqtool.fidelity`). The smallest probe within X is the answer; when none is, the largest probed
policy, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mqtool.errors import InputError
from mqtool.search.budgets import Budget
from mqtool.search.driver import BudgetResult, SearchEngine

# Where the front's budgets sit between the smallest file and the uniform 8-bit one.
_FRACTIONS = (0.05, 0.15, 0.25, 0.35, 0.5, 0.65, 0.8)


@dataclass
class Probe:
    budget: Budget
    result: BudgetResult
    params: object
    drop: float  # points
    measure: str
    bytes: int
    finetuned_fitness: float = float("nan")
    predicted: object = None  # the simulation's fidelity on the check split (mqtool.fidelity.ModelFidelity)


def drop_points(engine: SearchEngine, policy, params) -> tuple[float, str]:
    """(drop in points, what was measured) of `policy` with finetuned `params`, emitted and run on ONNX
    Runtime on the check split against the fp32 model, plus one standard error of the share of samples
    whose answer changed (the pick must hold beyond these samples)."""
    from mqtool.emit import quantize_model
    from mqtool.selfcheck import self_check

    ctx = engine.ctx
    check = ctx.check_set
    if not len(check):
        raise InputError(
            "data: too few samples to hold out a check split for max_drop (at least 200 are needed)",
            field="data",
        )
    q = quantize_model(
        ctx.model, policy, qparams=params, data={k: v[:64] for k, v in ctx.train.inputs.items()}
    )
    res = self_check(ctx.model, q, check.inputs, check.y, specs=ctx.outputs)
    first = res.quantized.outputs[0]
    # The drop a user will see on other data can be larger than on these few hundred samples: the share of
    # changed answers is taken at its upper one-sigma Wilson bound. The plain standard error collapses
    # with the count: one changed answer in 256 gave 0.78 pt "within 1" and 1.1 pt on the test set
    # (mnist_cnn); 0.6 pt measured once became 1.5 pt.
    changed = 1.0 - res.quantized.agreement
    margin = 100 * (wilson_upper(changed, len(check)) - changed)
    if check.y is not None and "top-1 accuracy" in first.measures and "top-1 accuracy" in first.reference:
        drop = 100 * (first.reference["top-1 accuracy"] - first.measures["top-1 accuracy"])
        return drop + margin, "top-1 accuracy (+ one-sigma bound on changed answers)"
    return 100 * changed + margin, "agreement with fp32 (+ one-sigma bound on changed answers)"


def wilson_upper(p: float, n: int, z: float = 1.0) -> float:
    """Upper end of the Wilson score interval of a proportion `p` seen on `n` samples (z standard
    deviations): unlike p + z*sqrt(p(1-p)/n) it does not shrink to p when few or no events were seen."""
    if n <= 0:
        return 1.0
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * float(np.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)))
    return min(1.0, (centre + half) / (1 + z2 / n))


def smallest_within(engine: SearchEngine, max_drop: float) -> Probe:
    """The bisection of the module docstring (MetaQuantNet must be trained)."""
    lo, hi = engine.costs.check(Budget("size", float("inf")))
    # the last probe is the all-highest-width policy (no size limit): the reference the others shrink from
    sizes = [lo + f * (hi - lo) for f in _FRACTIONS] + [float("inf")]
    probes: dict[int, Probe] = {}

    def probe(i: int) -> Probe:
        if i not in probes:
            budget = Budget("size", float(np.floor(sizes[i])) if np.isfinite(sizes[i]) else sizes[i])
            try:
                res = engine.search(budget)
            except InputError:  # below what the (corrected) size estimate can reach: counts as failing
                probes[i] = Probe(budget, None, None, float("inf"), "infeasible", 0)
                return probes[i]
            params, fitness, predicted = engine.finetune_and_predict(res.policy)
            drop, measure = drop_points(engine, res.policy, params)
            size = int(res.policy.meta.get("emitted_bytes", 0))
            probes[i] = Probe(budget, res, params, drop, measure, size, fitness, predicted)
            engine.progress(
                "max_drop_probe", {"budget": budget.label, "drop": drop, "measure": measure, "bytes": size}
            )
        return probes[i]

    a, b = 0, len(sizes) - 1
    if probe(b).drop > max_drop:
        return probes[b]  # the largest probe is always feasible: it is the all-8-bit policy
    while a < b:  # invariant: sizes[b] passes
        mid = (a + b) // 2
        if probe(mid).drop <= max_drop:
            b = mid
        else:
            a = mid + 1
    return probes[b]
