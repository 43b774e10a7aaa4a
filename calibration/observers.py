"""Per-tensor activation range observers: minmax, percentile, entropy (KL) and MSE.

Every observer keeps the exact min/max; the other methods also keep a streaming histogram of fixed size
over a symmetric range [-R, R], R a power of two. When a batch exceeds R, R doubles and adjacent bins merge
pairwise into the middle half: bin edges stay exact, the histogram's size never grows, and the result does
not depend on how the data was batched beyond that. Memory per tensor: `bins` counters.

Ranges are returned as (lo, hi) floats; `numerics.activation_qparams` turns them into (scale, zero_point).
- minmax: (min, max).
- percentile p: lo at the (100 - p)th and hi at the pth percentile of the values (each tail loses
  (100 - p)% of the samples), clamped to [min, max].
- entropy: TensorRT's KL-divergence threshold search (P = the clipped histogram, Q = the unclipped slice
  merged into 2^bits levels and expanded back) over ranges [f * lo, f * hi] shrinking around zero, so it
  handles one-sided (post-ReLU) tensors with all 2^bits levels on the side that has data. Each candidate
  is resampled to 4 bins per level, so spikes in the data cost every candidate alike.
- mse: the [f * lo, f * hi] minimising the histogram-weighted squared error of `numerics.fake_quantize` at
  the given bits, clipping included.
"""

from __future__ import annotations

import math

import numpy as np

from mqtool.numerics import activation_qparams, fake_quantize, int_range

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 8192


class StreamingHistogram:
    """Counts over [-R, R] in `bins` equal bins; R grows by doubling to cover every value seen."""

    def __init__(self, bins: int = DEFAULT_BINS):
        if bins % 4:
            raise ValueError("bins must be a multiple of 4")
        self.bins = bins
        self.limit = 0.0
        self.counts = np.zeros(bins, dtype=np.int64)
        self.exact_zeros = 0  # values == 0.0 (post-ReLU tensors are often half zeros)
        self._zeros = 0  # values seen while every value was 0 (no scale to bin them yet)

    def update(self, x: np.ndarray, amax: float | None = None) -> None:
        """Count the values of `x`; `amax` (max |x|) may be passed when the caller already knows it."""
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        if amax is None:
            amax = float(max(-x.min(), x.max()))
        self.exact_zeros += int(np.count_nonzero(x == 0))
        if amax == 0.0 and self.limit == 0.0:
            self._zeros += x.size
            return
        if self.limit == 0.0:
            self.limit = 2.0 ** math.ceil(math.log2(amax))
            self.counts[self.bins // 2] += self._zeros
            self._zeros = 0
        while amax > self.limit:
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros(self.bins, dtype=np.int64)
            self.counts[self.bins // 4 : self.bins // 4 + self.bins // 2] = merged
            self.limit *= 2.0
        # x + R >= 0, so truncation is floor; bins / 2R is a power of two, so the product is exact in
        # float32 (x + R may round: a value within float32 precision of an edge can land next door).
        idx = ((x + np.float32(self.limit)) * np.float32(self.bins / (2 * self.limit))).astype(np.intp)
        np.minimum(idx, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, self.bins + 1)

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self._zeros


class Observer:
    """Exact min/max plus, unless `histogram=False`, a `StreamingHistogram`."""

    def __init__(self, histogram: bool = True, bins: int = DEFAULT_BINS):
        self.min = math.inf
        self.max = -math.inf
        self.hist = StreamingHistogram(bins) if histogram else None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        lo, hi = float(np.min(x)), float(np.max(x))
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.hist is not None:
            self.hist.update(x, amax=max(-lo, hi))

    def range(
        self, method: str = "percentile", bits: int = 8, percentile: float = 99.99
    ) -> tuple[float, float]:
        """The calibrated (lo, hi) of everything observed so far."""
        if not math.isfinite(self.min):
            raise ValueError("no values observed")
        if method == "minmax" or self.hist is None or self.hist.limit == 0.0 or self.min == self.max:
            return self.min, self.max
        if method == "percentile":
            lo, hi = _percentile_range(self.hist, percentile)
        elif method == "entropy":
            lo, hi = _search_range(self.hist, self.min, self.max, bits, _kl_cost)
        elif method == "mse":
            lo, hi = _search_range(self.hist, self.min, self.max, bits, _mse_cost)
        else:
            raise ValueError(f"unknown calibration method {method!r} ({', '.join(METHODS)})")
        return max(lo, self.min), min(hi, self.max)


def _percentile_range(h: StreamingHistogram, p: float) -> tuple[float, float]:
    if not 50.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {p}")
    cdf = np.cumsum(h.counts)
    total = cdf[-1]
    tail = total * (100.0 - p) / 100.0
    edges = h.edges
    # hi: the upper edge of the first bin whose cdf reaches total - tail; lo: the lower edge of the first
    # bin whose cdf exceeds tail (a bin that is partly in the tail is kept whole: the range errs wide).
    hi = edges[int(np.searchsorted(cdf, total - tail, side="left")) + 1]
    lo = edges[int(np.searchsorted(cdf, tail, side="right"))]
    return float(lo), float(hi)


def _search_range(h: StreamingHistogram, vmin: float, vmax: float, bits: int, cost) -> tuple[float, float]:
    """The candidate [f * lo, f * hi] (lo = min(vmin, 0), hi = max(vmax, 0)) of least `cost`."""
    edges = h.edges
    zero = h.bins // 2
    width = edges[1] - edges[0]
    a = max(0, int(np.floor((min(vmin, 0.0) - edges[0]) / width)))
    b = min(h.bins, int(np.ceil((max(vmax, 0.0) - edges[0]) / width)))
    levels = 2**bits
    span = b - a
    if span <= levels:
        return vmin, vmax
    # Exact zeros quantize to the zero point without error for every candidate range, so they say nothing
    # about the range; left in, their spike dominates the KL of any range with several bins per level.
    counts = h.counts.copy()
    counts[zero] -= min(h.exact_zeros, counts[zero])
    best, best_cost = (a, b), math.inf
    # Shrink factors from 1 down to where the range holds about one histogram bin per level.
    for f in np.linspace(1.0, levels / span, 200):
        left = zero - int(round((zero - a) * f))
        right = zero + int(round((b - zero) * f))
        if right - left < 2:
            continue
        c = cost(counts, left, right, edges, bits)
        if c < best_cost:
            best, best_cost = (left, right), c
    return float(edges[best[0]]), float(edges[best[1]])


_KL_BINS_PER_LEVEL = 4


def _kl_cost(counts: np.ndarray, left: int, right: int, edges: np.ndarray, bits: int) -> float:
    levels = 2**bits
    # Resample the candidate range into a fixed number of bins per level. Spreading a level's mass evenly
    # over its bins penalises spikes (one repeated value, e.g. a constant image background) by about
    # mass * log(bins per level); with that number fixed, the penalty is the same for every candidate and
    # the search weighs clipping against resolution instead of preferring whatever range has ~1 bin/level.
    n = levels * _KL_BINS_PER_LEVEL
    if right - left < n:
        return math.inf
    bounds = left + (np.arange(n + 1) * (right - left)) // n
    sliced = np.add.reduceat(counts[left:right].astype(np.float64), bounds[:-1] - left)
    # P: the clipped distribution (outliers piled into the edge bins). Q: the *unclipped* slice merged into
    # levels and spread evenly over the level's non-empty bins of P. Building Q without the outliers is what
    # makes clipping cost something (TensorRT / ORT's calibrate.py do the same).
    p = sliced.copy()
    p[0] += counts[:left].sum()
    p[-1] += counts[right:].sum()
    chunk = np.arange(n) // _KL_BINS_PER_LEVEL
    nonzero = p > 0
    mass = np.bincount(chunk, weights=sliced, minlength=levels)
    support = np.bincount(chunk, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, mass[chunk] / np.maximum(support[chunk], 1.0), 0.0)
    ps, qs = p.sum(), q.sum()
    if ps == 0 or qs == 0:
        return math.inf
    p, q = p[nonzero] / ps, q[nonzero] / qs
    # Smoothing: a bin P has and Q lacks (an edge bin holding only outliers) costs as if Q had a tiny mass.
    q = np.maximum(q, 1e-8)
    return float(np.sum(p * np.log(p / q)))


def _mse_cost(counts: np.ndarray, left: int, right: int, edges: np.ndarray, bits: int) -> float:
    used = counts > 0
    centers = ((edges[:-1] + edges[1:]) / 2)[used].astype(np.float32)
    scale, zp = activation_qparams(float(edges[left]), float(edges[right]), bits)
    qmin, qmax = int_range(bits, signed=False)
    err = fake_quantize(centers, scale, zp, qmin, qmax) - centers
    return float(np.sum(counts[used] * err.astype(np.float64) ** 2))
