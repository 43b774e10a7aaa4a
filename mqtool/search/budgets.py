"""Budgets: average weight bits or BitOPs relative to uniform w8a8 (linear in the per-layer bits), and what a
deployment pays: bytes of the emitted file, ONNX Runtime latency (sums over layers of a per-layer cost of
the (bits, format) chosen, plus what is not a layer).

Every budget is a sum of per-layer terms, which makes feasibility checks and the feasible range exact and
cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mqtool.analysis import LayerInfo
from mqtool.errors import InputError

KINDS = ("bits", "bitops", "size", "latency")
# size and latency depend on each layer's storage format as well as its bits: the GA searches formats too
TABLE_KINDS = ("size", "latency")


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
        if self.kind == "size":
            return f"file size <= {self.value:,.0f} bytes"
        if self.kind == "latency":
            return f"ONNX Runtime latency <= {self.value:g} ms"
        return f"BitOPs <= {self.value:g} x uniform w8a8"


class BudgetCost:
    """Cost of a policy (weight bits and act bits per layer, in layer order) under one budget kind."""

    def __init__(self, kind: str, layers: list[LayerInfo], skip: Sequence[int] = ()):
        """`skip`: layers the average leaves out (those inside a branch no sample of the data runs: the
        search cannot judge them, so they are kept at the top width and do not spend the budget)."""
        self.kind = kind
        params = np.array([layer.params for layer in layers], dtype=np.float64)
        macs = np.array([layer.macs or 0 for layer in layers], dtype=np.float64)
        if len(skip) and len(skip) < len(layers):
            params[list(skip)] = 0.0
            macs[list(skip)] = 0.0
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


class TableCost:
    """A budget that sums, per layer, the cost of the (bits, format) chosen, plus a constant `rest` (what is
    not a quantizable layer: the graph, the other tensors, the float ops' time). `table[i][(bits, fmt)]`
    with format codes as the GA uses them (`options`)."""

    def __init__(self, kind: str, table: list[dict[tuple[int, int], float]], rest: float):
        self.kind = kind
        self.table = table
        self.rest = float(rest)

    def __call__(self, wbits: np.ndarray, abits: np.ndarray, fmts: np.ndarray | None = None) -> float:
        fmts = np.zeros(len(wbits), int) if fmts is None else fmts
        return self.rest + sum(t[(int(b), int(f))] for t, b, f in zip(self.table, wbits, fmts))

    def range(self) -> tuple[float, float]:
        """(cheapest, dearest) policy's cost."""
        lo = self.rest + sum(min(t.values()) for t in self.table)
        hi = self.rest + sum(max(t.values()) for t in self.table)
        return lo, hi


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


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "KIB": 1024,
    "MB": 1000**2,
    "MIB": 1024**2,
    "GB": 1000**3,
    "GIB": 1024**3,
}


def parse_size(text: str) -> float:
    """'1.2MB', '300KB', '512KiB', '123456' (bytes) -> bytes (MB = 10^6, MiB = 2^20)."""
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("BKMGI")
    unit = t[len(num) :]
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown unit '{text[len(num) :].strip()}' (B, KB, MB, GB, KiB, MiB, GiB)")
    return float(num) * _SIZE_UNITS[unit]


def parse_budgets(kind: str, text: str) -> list[Budget]:
    """'2.5,3,4' -> budgets ('1.2MB,800KB' for size); bad numbers are an InputError naming the budget
    (`field` budget.<kind>)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = parse_size(part) if kind == "size" else float(part)
        except ValueError as e:
            raise InputError(f"budget.{kind}: '{part}' is not a number", field=f"budget.{kind}") from e
        if not np.isfinite(v) or v <= 0:
            raise InputError(f"budget.{kind}: {part} must be a positive number", field=f"budget.{kind}")
        out.append(Budget(kind, v))
    if len({b.value for b in out}) != len(out):
        raise InputError(f"budget.{kind}: repeated values in '{text}'", field=f"budget.{kind}")
    return out
