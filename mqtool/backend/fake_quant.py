"""Fake quantization in torch: the differentiable mirror of `mqtool.numerics`.

Forward values equal `mqtool.numerics.fake_quantize` bit for bit: the same float32 operations in the same
order (`x / scale`, round half to even, `+ zero_point`, NaN/inf mapped like `np.nan_to_num`, clamp, then
`(q - zero_point) * scale`). That is why the forward runs inside one autograd `Function` instead of
the usual `x + (round(x) - x).detach()` trick: that trick adds and subtracts in float and can move a
result by one ulp.

Backward is the straight-through estimator with LSQ's scale gradient:

    d out / d x     = 1 where round(x / s) + zp lands inside [qmin, qmax], else 0
    d out / d s     = round(x / s) - x / s inside, (qmin - zp) below, (qmax - zp) above

summed over every axis but the channel axis, times LSQ's gradient scale 1 / sqrt(numel * qmax) when a
quantizer module has a learnable scale.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from mqtool import numerics

__all__ = [
    "ActFakeQuant",
    "WeightFakeQuant",
    "fake_quantize",
    "quantize_weight_ste",
]


def _bcast(v: Tensor, ndim: int, axis: int | None) -> Tensor:
    if axis is None or v.dim() == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _quant(x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """(x / s, round(x / s) + z, that clipped): the QuantizeLinear of numerics.quantize, in float32."""
    v = x / s
    r = torch.round(v).add_(z)
    # np.nan_to_num then np.clip, as numerics.quantize: NaN -> 0, +-inf -> the ends of the range.
    q = torch.nan_to_num(r, nan=0.0, posinf=float(qmax), neginf=float(qmin)).clamp_(qmin, qmax)
    return v, r, q


class _FakeQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        s = _bcast(scale, x.dim(), axis)
        z = _bcast(zero_point, x.dim(), axis)
        _, r, q = _quant(x, s, z, qmin, qmax)
        ctx.qrange = (qmin, qmax, axis)
        ctx.learn_scale = ctx.needs_input_grad[1]
        if ctx.learn_scale:
            # The scale gradient needs x / s again: recomputing it in backward keeps one saved tensor.
            ctx.save_for_backward(x, scale, zero_point)
        elif ctx.needs_input_grad[0]:
            ctx.save_for_backward(q == r)  # a bool mask: a quarter of the memory of x
        return q.sub_(z).mul_(s)

    @staticmethod
    def backward(ctx, grad):
        qmin, qmax, axis = ctx.qrange
        if not ctx.learn_scale:
            (inside,) = ctx.saved_tensors
            return grad * inside, None, None, None, None, None
        x, scale, zero_point = ctx.saved_tensors
        s = _bcast(scale, x.dim(), axis)
        z = _bcast(zero_point, x.dim(), axis)
        v, r, q = _quant(x, s, z, qmin, qmax)
        inside = q == r
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        g = torch.where(inside, r - z - v, q - z).mul_(grad)
        if axis is None or scale.dim() == 0:
            grad_s = g.sum().reshape(scale.shape)
        else:
            grad_s = g.sum(dim=[d for d in range(g.dim()) if d != axis]).reshape(scale.shape)
        return grad_x, grad_s, None, None, None, None


class _GradScale(torch.autograd.Function):
    """Identity forward (bit-exact, unlike `(s - s*g).detach() + s*g`); backward multiplies by g."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def _per_tensor_inference(x: Tensor, s: Tensor, lo: float, hi: float, z0: float) -> Tensor:
    """clamp(round(x / s), qmin - z, qmax - z) * s: the same value as (clamp(round(x / s) + z, qmin, qmax) - z)
    * s (integers in float32 are exact) in 4 passes over memory instead of 7, about a third of a GA
    candidate's time on the CNN example. NaN maps to quantized 0 and +-inf to the ends, as numerics."""
    q = torch.div(x, s).round_().nan_to_num_(nan=-z0, posinf=hi, neginf=lo).clamp_(lo, hi)
    return q.mul_(s)


def fake_quantize(
    x: Tensor,
    scale: Tensor | np.ndarray | float,
    zero_point: Tensor | np.ndarray | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> Tensor:
    """QuantizeLinear + DequantizeLinear of `x`, equal to `numerics.fake_quantize`, with STE gradients.

    `scale` / `zero_point` are scalars (per tensor) or 1-D along `axis` (per channel). Gradients flow to
    `x` (where not clipped) and to `scale` when it requires grad (LSQ, without gradient scaling).
    """
    scale = (
        scale
        if isinstance(scale, Tensor)
        else torch.as_tensor(np.float32(scale) if np.ndim(scale) == 0 else np.asarray(scale, np.float32))
    )
    scale = scale.to(device=x.device, dtype=x.dtype)
    zp = zero_point if isinstance(zero_point, Tensor) else torch.as_tensor(np.asarray(zero_point, np.float32))
    zp = zp.to(device=x.device, dtype=x.dtype)
    if axis is not None:
        axis = axis % x.dim()
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        # Inference (GA fitness, calibration): the same float32 ops, in place, without autograd's bookkeeping.
        s = _bcast(scale, x.dim(), axis)
        if zp.dim() == 0:
            z0 = float(zp)
            return _per_tensor_inference(x, s, float(qmin) - z0, float(qmax) - z0, z0)
        z = _bcast(zp, x.dim(), axis)
        q = torch.div(x, s).round_().add_(z)
        q = q.nan_to_num_(nan=0.0, posinf=float(qmax), neginf=float(qmin)).clamp_(int(qmin), int(qmax))
        return q.sub_(z).mul_(s)
    return _FakeQuantFn.apply(x, scale, zp, int(qmin), int(qmax), axis)


def quantize_weight_ste(w: Tensor, bits: int, scale: Tensor | np.ndarray, axis: int | None = 0) -> Tensor:
    """Symmetric signed k-bit fake quantization of a weight (full range [-2^(k-1), 2^(k-1)-1], zp 0)."""
    qmin, qmax = numerics.int_range(bits, signed=True)
    return fake_quantize(w, scale, 0, qmin, qmax, axis)


def _lsq_grad_scale(numel: int, qmax: int) -> float:
    return 1.0 / math.sqrt(max(1, numel) * max(1, qmax))


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric k-bit weight quantizer with a learnable (LSQ) scale.

    `init_scale` has one entry per output channel (see `from_weight` for the numerics MSE initialisation).
    `forward(w)` quantizes with the module's `bits` and `scale`; `forward(w, bits=b, scale=s)` overrides
    either, so one layer can serve many bit-widths (MetaQuantNet samples a policy every batch). Changing
    `self.bits` between forwards works too.
    """

    def __init__(
        self,
        bits: int,
        channel_axis: int = 0,
        init_scale: Tensor | np.ndarray | None = None,
        learnable: bool = True,
        channels: int | None = None,
    ):
        super().__init__()
        numerics.int_range(bits, signed=True)  # validates bits
        self.bits = int(bits)
        self.channel_axis = int(channel_axis)
        if init_scale is None:
            if channels is None:
                raise ValueError("WeightFakeQuant needs init_scale or channels (or use from_weight)")
            init = torch.ones(channels, dtype=torch.float32)
        elif isinstance(init_scale, Tensor):
            init = init_scale.detach().to(torch.float32).reshape(-1).clone()
        else:
            init = torch.as_tensor(np.asarray(init_scale, dtype=np.float32)).reshape(-1).clone()
        self.scale = nn.Parameter(init, requires_grad=learnable)

    @classmethod
    def from_weight(
        cls,
        w: Tensor | np.ndarray,
        bits: int,
        channel_axis: int = 0,
        method: str = "mse",
        learnable: bool = True,
    ) -> WeightFakeQuant:
        """A quantizer whose scale is `numerics.weight_scale(w, bits, channel_axis, method)`."""
        w_np = w.detach().cpu().numpy() if isinstance(w, Tensor) else np.asarray(w)
        scale = numerics.weight_scale(w_np.astype(np.float32), bits, channel_axis, method)
        return cls(bits, channel_axis, scale, learnable)

    def forward(self, w: Tensor, bits: int | None = None, scale: Tensor | None = None) -> Tensor:
        """Fake-quantized `w` (same shape); gradients reach `w` (STE) and the scale (LSQ)."""
        bits = self.bits if bits is None else bits
        s = self.scale if scale is None else scale
        if isinstance(s, Tensor) and s.requires_grad:
            _, qmax = numerics.int_range(bits, signed=True)
            s = _GradScale.apply(s, _lsq_grad_scale(w.numel(), qmax))
        return quantize_weight_ste(w, bits, s, self.channel_axis)

    def export(self, w: Tensor | np.ndarray, bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(int32 values in the k-bit signed range, float32 per-channel scale), via `numerics`."""
        bits = self.bits if bits is None else bits
        w_np = w.detach().cpu().numpy() if isinstance(w, Tensor) else np.asarray(w)
        scale = self.scale.detach().cpu().numpy().astype(np.float32)
        return numerics.quantize_weight(w_np.astype(np.float32), bits, self.channel_axis, scale=scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channel_axis={self.channel_axis}, channels={self.scale.numel()}"


class ActFakeQuant(nn.Module):
    """Per-tensor unsigned k-bit activation quantizer with a zero point (ONNX Runtime's uint8 style).

    The scale is fixed by default (from calibration, see `from_range`); `learnable=True` makes it an LSQ
    parameter. The zero point is never learned. When built from a range, `set_bits` recomputes scale and
    zero point for another bit-width with `numerics.activation_qparams`.
    """

    def __init__(self, bits: int, scale: float, zero_point: int, learnable: bool = False):
        super().__init__()
        self.bits = int(bits)
        self.qmin, self.qmax = numerics.int_range(self.bits, signed=False)
        if not self.qmin <= int(zero_point) <= self.qmax:
            raise ValueError(f"zero point {zero_point} outside the {bits}-bit unsigned range")
        self.scale = nn.Parameter(
            torch.tensor(float(np.float32(scale)), dtype=torch.float32), requires_grad=learnable
        )
        self.register_buffer("zero_point", torch.tensor(float(zero_point), dtype=torch.float32))
        self.range: tuple[float, float] | None = None

    @classmethod
    def from_range(cls, lo: float, hi: float, bits: int = 8, learnable: bool = False) -> ActFakeQuant:
        """A quantizer covering [lo, hi] (widened to include 0), via `numerics.activation_qparams`."""
        scale, zp = numerics.activation_qparams(lo, hi, bits)
        q = cls(bits, float(scale), zp, learnable)
        q.range = (float(lo), float(hi))
        return q

    def set_bits(self, bits: int) -> None:
        """Switch to `bits`, recomputing scale and zero point from the calibration range."""
        if self.range is None:
            raise ValueError("set_bits needs a quantizer built with from_range")
        scale, zp = numerics.activation_qparams(*self.range, bits)
        self.bits = int(bits)
        self.qmin, self.qmax = numerics.int_range(self.bits, signed=False)
        with torch.no_grad():
            self.scale.fill_(float(scale))
            self.zero_point.fill_(float(zp))

    def clamps_at_zero(self) -> bool:
        """True when every output is >= 0 and negative inputs give 0 (a preceding Relu is redundant)."""
        return self.qmin == 0 and self._inference_consts()[3] == 0.0

    def _inference_consts(self) -> tuple[Tensor, float, float, float]:
        """(scale, qmin - zp, qmax - zp, zp) for the no-grad path, rebuilt only when scale, zero point or
        bits change: reading them per call (`.to`, `.item`) cost ~1 ms per GA candidate."""
        key = (id(self.scale), self.scale._version, id(self.zero_point), self.zero_point._version)
        key += (self.qmin, self.qmax, self.scale.device)
        cached = self.__dict__.get("_consts")
        if cached is None or cached[0] != key:
            z0 = float(self.zero_point)
            cached = (key, (self.scale.detach(), float(self.qmin) - z0, float(self.qmax) - z0, z0))
            self._consts = cached
        return cached[1]

    def qparams(self) -> tuple[np.float32, int]:
        """(scale, zero point) as the emitter writes them."""
        return np.float32(self.scale.detach().cpu().item()), int(self.zero_point.item())

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale
        if x.dtype == torch.float32 and not (
            torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)
        ):
            return _per_tensor_inference(x, *self._inference_consts())  # constants read once
        if s.requires_grad and torch.is_grad_enabled():
            s = _GradScale.apply(s, _lsq_grad_scale(x.numel(), self.qmax))
        return fake_quantize(x, s.to(x.dtype), self.zero_point.to(x.dtype), self.qmin, self.qmax, None)

    def extra_repr(self) -> str:
        scale, zp = self.qparams()
        return f"bits={self.bits}, scale={scale:.6g}, zero_point={zp}"


class DynamicActFakeQuant(nn.Module):
    """ONNX DynamicQuantizeLinear + dequantization with STE gradients: uint8, one scale and zero point
    computed from the tensor itself at every call (its range widened to include 0, as
    `numerics.activation_qparams`), over the whole tensor as ORT computes it: the samples of a batch share
    the range. What a `dynamic` layer (com.microsoft.DynamicQuantizeMatMul) does to its input."""

    bits = 8

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            lo = torch.clamp(x.detach().min(), max=0.0)
            hi = torch.clamp(x.detach().max(), min=0.0)
            scale = torch.clamp((hi - lo) / 255.0, min=float(numerics.MIN_SCALE))
            scale = torch.where(hi == lo, torch.ones_like(scale), scale)
            zp = torch.round(-lo / scale).clamp_(0, 255)
        return fake_quantize(x, scale.to(x.dtype), zp.to(x.dtype), 0, 255, None)
