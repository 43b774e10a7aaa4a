"""Quantization parameters handed to emission: overrides of the weights, weight scales, biases and
activation ranges that a search/finetune produced. Plain data; every field is optional.

Without overrides, `insert_qdq` quantizes each weight with `numerics.quantize_weight(w, bits, axis,
method="mse")` and each activation from its calibrated range. With them, the given float weight and scale
are quantized with `numerics.quantize` (so the emitted integers are exactly what the simulation rounded),
and an activation takes the given (lo, hi) range or (scale, zero_point) as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mqtool.analysis import LayerInfo
from mqtool.errors import InputError
from mqtool.numerics import int_range
from mqtool.weight_layers import RECURRENT_OPS
from mqtool.weight_layout import is_simulated_layout, simulated_channels


@dataclass
class LayerParams:
    """Per-layer overrides. `weight` has the model's weight layout; `scale` and `bias` one value per output
    channel (the weight's `LayerInfo.channel_axis`). LSTM/GRU/RNN layers and blocked embedding tables may
    give `weight` and `scale` in the layout the simulation quantizes (`mqtool.weight_layout`: W and R
    together, one scale per row of each; one scale per block of a table)."""

    weight: np.ndarray | None = None
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    # The weight bits `scale` was made for (None: the policy's weight_bits). When emission stores other
    # bits (7 for an 8-bit layer on integer kernels, `qdq_plan.stored_weight_bits`), the scale is
    # multiplied by 2^(scale_bits - stored) so the clipping range stays the same.
    scale_bits: int | None = None


@dataclass
class ActParams:
    """Per-tensor activation override: either a float range or a ready (scale, zero_point)."""

    range: tuple[float, float] | None = None
    scale: float | None = None
    zero_point: int | None = None


@dataclass
class QuantParams:
    """Layer name -> `LayerParams`; activation tensor name -> `ActParams`."""

    layers: dict[str, LayerParams] = field(default_factory=dict)
    activations: dict[str, ActParams] = field(default_factory=dict)

    def layer(self, name: str) -> LayerParams:
        return self.layers.get(name) or LayerParams()

    def check(self, layers: list[LayerInfo], act_bits: dict[str, int]) -> None:
        """Raise `InputError` naming the layer/tensor when an override has the wrong shape or bad values."""
        by_name = {layer.name: layer for layer in layers}
        for name, p in self.layers.items():
            if name not in by_name:
                raise InputError(f"quant params: unknown layer '{name}'")
            info = by_name[name]
            if p.weight is not None:
                w = np.asarray(p.weight)
                # LSTM/GRU/RNN and blocked tables may come laid out as the simulation quantizes them
                if list(w.shape) != list(info.weight_shape) and not is_simulated_layout(info, w.shape):
                    raise InputError(
                        f"quant params: layer '{name}' weight shape {list(w.shape)}, model has {info.weight_shape}"
                    )
                if not np.all(np.isfinite(w)):
                    raise InputError(f"quant params: layer '{name}' weight contains NaN or Inf")
            for what, v in (("scale", p.scale), ("bias", p.bias)):
                if v is None or (what == "bias" and info.op_type in RECURRENT_OPS):
                    continue  # an LSTM/GRU/RNN bias override is ignored by emission (B stays as it is)
                v = np.asarray(v)
                if v.shape != (info.channels,) and (what == "bias" or v.shape != (simulated_channels(info),)):
                    raise InputError(
                        f"quant params: layer '{name}' {what} shape {list(v.shape)}, expected [{info.channels}]"
                    )
                if not np.all(np.isfinite(v)) or (what == "scale" and not np.all(v > 0)):
                    raise InputError(
                        f"quant params: layer '{name}' {what} must be finite (and > 0 for scales)"
                    )
        for tensor, a in self.activations.items():
            where = f"quant params: activation '{tensor}'"
            if a.range is not None:
                lo, hi = a.range
                if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                    raise InputError(f"{where}: range ({lo}, {hi}) must be finite with lo <= hi")
            elif a.scale is not None and a.zero_point is not None:
                bits = act_bits.get(tensor, 8)
                qmin, qmax = int_range(bits, signed=False)
                if not (math.isfinite(a.scale) and a.scale > 0) or not qmin <= int(a.zero_point) <= qmax:
                    raise InputError(f"{where}: scale must be > 0 and zero_point in [{qmin}, {qmax}]")
            else:
                raise InputError(f"{where}: give a range or both scale and zero_point")
