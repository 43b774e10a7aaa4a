"""Compression budgets: average weight bits or BitOPs relative to uniform w8a8.

A budget is a linear constraint on the per-layer bits, sum_l c_l * b_l <= limit, which makes feasibility
checks and the feasible range exact and cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mqtool.analysis import LayerInfo
from mqtool.errors import InputError

KINDS = ("bits", "bitops")


@dataclass(frozen=True)
class Budget:
    """`kind` "bits": average weight bits <= value; "bitops": BitOPs <= value x uniform w8a8."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown budget kind {self.kind!r}")

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.value:g}"

    def describe(self) -> str:
        if self.kind == "bits":
            return f"average weight bits <= {self.value:g}"
        return f"BitOPs <= {self.value:g} x uniform w8a8"


class BudgetCost:
    """Cost of a policy (weight bits and act bits per layer, in layer order) under one budget kind."""

    def __init__(self, kind: str, layers: list[LayerInfo]):
        self.kind = kind
        params = np.array([layer.params for layer in layers], dtype=np.float64)
        macs = np.array([layer.macs or 0 for layer in layers], dtype=np.float64)
        if kind == "bits":
            self._w = params / params.sum()
        else:
            if macs.sum() == 0:
                raise InputError(
                    "budget.bitops: needs MAC counts, but the model's layer shapes are unknown",
                    field="budget.bitops",
                )
            self._w = macs / (macs.sum() * 64.0)

    def __call__(self, wbits: np.ndarray, abits: np.ndarray) -> np.ndarray:
        """Cost of one policy ([L]) or of many ([N, L]); for "bits" act bits are ignored."""
        wbits = np.asarray(wbits, dtype=np.float64)
        if self.kind == "bits":
            return wbits @ self._w
        return (wbits * np.asarray(abits, dtype=np.float64)) @ self._w


def feasible_range(
    cost: BudgetCost,
    widths: list[int],
    pins: dict[int, int],
    abits_min: np.ndarray,
    abits_max: np.ndarray,
    n: int,
) -> tuple[float, float]:
    """(lowest, highest) cost reachable with candidate `widths`, pinned layers fixed."""
    lo = np.full(n, min(widths), dtype=np.float64)
    hi = np.full(n, max(widths), dtype=np.float64)
    for i, b in pins.items():
        lo[i] = hi[i] = b
    return float(cost(lo, abits_min)), float(cost(hi, abits_max))


def parse_budgets(kind: str, text: str) -> list[Budget]:
    """'2.5,3,4' -> budgets; bad numbers are an InputError naming the budget (`field` budget.<kind>)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = float(part)
        except ValueError as e:
            raise InputError(f"budget.{kind}: '{part}' is not a number", field=f"budget.{kind}") from e
        if not np.isfinite(v) or v <= 0:
            raise InputError(f"budget.{kind}: {part} must be a positive number", field=f"budget.{kind}")
        out.append(Budget(kind, v))
    if len({b.value for b in out}) != len(out):
        raise InputError(f"budget.{kind}: repeated values in '{text}'", field=f"budget.{kind}")
    return out
