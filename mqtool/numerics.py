"""The one definition of k-bit quantization that both emission (NumPy) and simulation (torch) follow.

ONNX semantics, float32 throughout:
    QuantizeLinear:   q = clip(round_half_even(x / scale) + zero_point, qmin, qmax)
    DequantizeLinear: x' = (q - zero_point) * scale

Weights: symmetric, per output channel, zero point 0, the *full* signed range of k bits,
qmin = -2^(k-1), qmax = 2^(k-1) - 1 (2 bits: {-2,-1,0,1}; 8 bits: [-128, 127]), as LSQ and ONNX's INT4/INT2
types do. The default scale is MSE-optimal per channel: s = c * max|w| / 2^(k-1) with c searched on a grid
(c = 1 is plain max-abs scaling with the top positive value clipped by one step). At 2 bits the full range
with an MSE scale beats the restricted ternary range {-1,0,1}; measured in tests/test_numerics.py.

Activations: per tensor, asymmetric, unsigned k bits (qmin 0, qmax 2^k - 1, stored as uint8), the range
widened to include 0 exactly as ONNX Runtime's `compute_scale_zp` does.

`mqtool.backend.fake_quant` mirrors these functions in torch; tests check they agree bit for bit.
"""

from __future__ import annotations

import numpy as np

# Scales below this are replaced: a zero/denormal scale would make x / scale overflow to inf or NaN.
MIN_SCALE = np.float32(2.0**-30)
# Elements per block of channels in the MSE scale search (512 KiB of float32: in L2 with its scratch).
_MSE_BLOCK = 1 << 17


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a k-bit integer."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _bcast(v: np.ndarray | float, ndim: int, axis: int | None) -> np.ndarray:
    v = np.asarray(v)
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def quantize(
    x: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> np.ndarray:
    """QuantizeLinear: int32 array of round_half_even(x / scale) + zero_point saturated to [qmin, qmax]."""
    x = np.asarray(x, dtype=np.float32)
    s = _bcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _bcast(np.asarray(zero_point, dtype=np.float32), x.ndim, axis)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = np.rint(x / s) + z
    # Clip in float before the cast: casting inf or huge values to int is undefined.
    r = np.nan_to_num(r, nan=0.0, posinf=qmax, neginf=qmin)
    return np.clip(r, qmin, qmax).astype(np.int32)


def dequantize(
    q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, axis: int | None = None
) -> np.ndarray:
    """DequantizeLinear: float32 (q - zero_point) * scale."""
    q = np.asarray(q)
    s = _bcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _bcast(np.asarray(zero_point, dtype=np.float32), q.ndim, axis)
    return ((q.astype(np.float32) - z) * s).astype(np.float32)


def fake_quantize(
    x: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> np.ndarray:
    """QuantizeLinear followed by DequantizeLinear."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)


def _channels_first(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.asarray(w, dtype=np.float32), axis, 0).reshape(w.shape[axis], -1)


def weight_scale(w: np.ndarray, bits: int, axis: int = 0, method: str = "mse", grid: int = 40) -> np.ndarray:
    """Per-output-channel symmetric scale (float32, shape [channels]) for k-bit weights.

    "max": s = max|w| / 2^(k-1) (the largest magnitude lands on the grid; +max clips by one step).
    "mse": the c in (0, 2^(k-1) / qmax] minimising the squared quantization error of each channel, for
    s = c * max|w| / 2^(k-1). Channels that are all zero get scale 1 (never 0, NaN or inf).
    """
    qmin, qmax = int_range(bits, signed=True)
    rows = _channels_first(w, axis)
    amax = np.max(np.abs(rows), axis=1) if rows.size else np.zeros(rows.shape[0], np.float32)
    if not np.all(np.isfinite(amax)):
        raise ValueError("weights contain NaN or Inf")
    base = (amax / np.float32(-qmin)).astype(np.float32)
    if method == "max":
        best = base
    elif method == "mse":
        # c = 1 and c = -qmin/qmax (no clipping of +max) are always on the grid.
        cs = np.unique(np.concatenate([np.linspace(0.15, 1.0, grid), [-qmin / qmax]])).astype(np.float32)
        best = base.copy()
        best_err = np.full(rows.shape[0], np.inf, dtype=np.float64)
        scales = np.maximum(base[None, :] * cs[:, None], MIN_SCALE)
        # Blocks of channels that stay in cache across the candidates, and in-place float32 ops that give
        # exactly fake_quantize's values: x / s is finite here, so its nan_to_num is a no-op, and the int32
        # round trip of integers in [qmin, qmax] is exact. 4-5x faster than fake_quantize per candidate.
        step = max(1, _MSE_BLOCK // max(1, rows.shape[1]))
        for r0 in range(0, rows.shape[0], step):
            block = rows[r0 : r0 + step]
            t = np.empty_like(block)
            b_best, b_err = best[r0 : r0 + step], best_err[r0 : r0 + step]
            for s in scales[:, r0 : r0 + step, None]:
                np.divide(block, s, out=t)
                np.rint(t, out=t)
                np.clip(t, qmin, qmax, out=t)
                np.multiply(t, s, out=t)
                np.subtract(t, block, out=t)
                np.square(t, out=t)
                err = t.sum(axis=1, dtype=np.float64)  # the same float64 reduction as before: same ties
                better = err < b_err
                b_best[better] = s[better, 0]
                b_err[better] = err[better]
    else:
        raise ValueError(f"unknown weight scale method {method!r} (max or mse)")
    best = np.where(amax > 0, np.maximum(best, MIN_SCALE), np.float32(1.0))
    return best.astype(np.float32)


def quantize_weight(
    w: np.ndarray, bits: int, axis: int = 0, scale: np.ndarray | None = None, method: str = "mse"
) -> tuple[np.ndarray, np.ndarray]:
    """(int32 values in the k-bit signed range, per-channel float32 scale) for weight `w`."""
    if scale is None:
        scale = weight_scale(w, bits, axis, method)
    qmin, qmax = int_range(bits, signed=True)
    return quantize(w, scale, 0, qmin, qmax, axis), np.asarray(scale, dtype=np.float32)


def activation_qparams(lo: float, hi: float, bits: int = 8) -> tuple[np.float32, int]:
    """(scale, zero_point) of an unsigned k-bit per-tensor quantizer covering [lo, hi] and 0.

    Same rule as ONNX Runtime's `compute_scale_zp`: the range is widened to include 0, a degenerate range
    gets scale 1, and the zero point is round(qmin - lo / scale) clipped to the range.
    """
    qmin, qmax = int_range(bits, signed=False)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite")
    lo32, hi32 = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    if hi32 == lo32:
        return np.float32(1.0), 0
    scale = np.float32((hi32 - lo32) / np.float32(qmax - qmin))
    scale = max(scale, MIN_SCALE)
    zp = int(np.clip(np.rint(np.float32(qmin) - lo32 / scale), qmin, qmax))
    return np.float32(scale), zp


def _blocks(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, int]:
    """`w` as rows of `block` consecutive elements along `axis` (the last block zero-padded), and the number
    of blocks along `axis`: row r of the result is block r % nb of line r // nb."""
    w = np.moveaxis(np.asarray(w, dtype=np.float32), axis, -1)
    k = w.shape[-1]
    nb = -(-k // block)
    padded = np.zeros(w.shape[:-1] + (nb * block,), np.float32)
    padded[..., :k] = w
    return padded.reshape(-1, block), nb


def block_weight_scale(w: np.ndarray, bits: int, axis: int, block: int, method: str = "mse") -> np.ndarray:
    """Block-wise symmetric scales: one per `block` consecutive elements along `axis` (ONNX blocked
    DequantizeLinear); float32 of `w`'s shape with that axis shortened to ceil(K / block). Each block's scale
    is `weight_scale` of the block as one channel (the last block's padding zeros included)."""
    rows, nb = _blocks(w, axis, block)
    s = weight_scale(rows, bits, 0, method)
    shape = list(np.moveaxis(np.asarray(w), axis, -1).shape)
    shape[-1] = nb
    return np.moveaxis(s.reshape(shape), -1, axis).astype(np.float32)


def expand_blocks(scale: np.ndarray, axis: int, block: int, length: int) -> np.ndarray:
    """A block-wise scale (or zero point) repeated to one value per element along `axis` (`length` long)."""
    return np.repeat(np.asarray(scale), block, axis=axis).take(np.arange(length), axis=axis)


def quantize_weight_blockwise(
    w: np.ndarray, bits: int, axis: int, block: int, scale: np.ndarray | None = None, method: str = "mse"
) -> tuple[np.ndarray, np.ndarray]:
    """(int32 values in the k-bit signed range, block-wise float32 scale) for `w`, zero point 0."""
    if scale is None:
        scale = block_weight_scale(w, bits, axis, block, method)
    qmin, qmax = int_range(bits, signed=True)
    full = expand_blocks(scale, axis, block, np.shape(w)[axis])
    return quantize(w, full, 0, qmin, qmax), np.asarray(scale, dtype=np.float32)


def dequantize_blockwise(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int, axis: int, block: int
) -> np.ndarray:
    """Blocked DequantizeLinear: float32 (q - zero_point) * scale, both repeated `block` times along axis."""
    n = np.shape(q)[axis]
    s = expand_blocks(scale, axis, block, n)
    z = expand_blocks(zero_point, axis, block, n) if np.ndim(zero_point) else zero_point
    return dequantize(q, s, z)
