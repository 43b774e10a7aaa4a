"""The hybrid search's prior (`GAConfig.sensitivity_seed`): a HAWQ-style allocation from per-layer
sensitivity, added to the GA's first generation so MetaQuantNet's fitness refines it rather than having to
find it. The pure method of the paper leaves it out."""

from __future__ import annotations

import numpy as np

from mqtool.search.ga import Genome


def sensitivity_allocation(
    sens: dict, names: list[str], widths: list[int], pins: dict[int, int], cost, limit: float
) -> list[int] | None:
    """Per-layer widths that (greedily) minimise the summed sensitivity `sens["layers"][name][str(bits)]`
    under `cost(wbits) <= limit`: start at the widest, lower the layer whose next step down costs the least
    sensitivity per unit of budget saved until the policy fits, then raise layers while there is room
    (the HAWQ-style prior the hybrid search seeds its first generation with). None when no data."""
    layers = sens.get("layers", {})
    if not all(n in layers for n in names):
        return None
    ws = sorted(widths)
    level = [len(ws) - 1] * len(names)

    def s(i: int, k: int) -> float:
        v = layers[names[i]].get(str(ws[k]))
        return float("inf") if v is None else float(v)

    def bits() -> list[int]:
        return [pins.get(i, ws[k]) for i, k in enumerate(level)]

    def total() -> float:
        return float(cost(np.array(bits(), dtype=np.float64)))

    free = [i for i in range(len(names)) if i not in pins]
    while total() > limit + 1e-9:
        best, best_ratio = None, float("inf")
        for i in free:
            if level[i] == 0:
                continue
            before = total()
            level[i] -= 1
            saved = before - total()
            level[i] += 1
            if saved <= 0:
                continue
            ratio = (s(i, level[i] - 1) - s(i, level[i])) / saved
            if ratio < best_ratio:
                best, best_ratio = i, ratio
        if best is None:
            return None
        level[best] -= 1
    improved = True
    while improved:  # use the room left, most sensitivity removed per unit first
        improved = False
        order = sorted(
            (i for i in free if level[i] < len(ws) - 1), key=lambda i: s(i, level[i] + 1) - s(i, level[i])
        )
        for i in order:
            level[i] += 1
            if total() <= limit + 1e-9 and s(i, level[i]) < s(i, level[i] - 1):
                improved = True
                break
            level[i] -= 1
    return bits()


def prior_seeds(ctx, sensitivity, cost, limit: float, cfg) -> list[Genome]:
    """The sensitivity-greedy genome under `cost(wbits, abits) <= limit` (activations at the configured
    width), or nothing: in the pure method (`cfg.ga.sensitivity_seed` off), when `sensitivity()` was skipped
    on this model, or when nothing fits."""
    if not cfg.ga.sensitivity_seed:
        return []
    sens = sensitivity()
    if "skipped" in sens:
        return []
    act_bits = cfg.space.act_bits
    abits = np.full(ctx.n, act_bits, dtype=np.float64)
    wbits = sensitivity_allocation(sens, ctx.names, ctx.widths, ctx.pins, lambda w: cost(w, abits), limit)
    if wbits is None:
        return []
    return [Genome(tuple(int(b) for b in wbits), tuple([act_bits] * ctx.n))]
