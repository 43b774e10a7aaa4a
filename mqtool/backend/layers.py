"""`QuantLayer`: one quantizable ONNX node (Conv, ConvTranspose, Gemm, MatMul; the weight-only Gather
tables and LSTM/GRU/RNN) as a swappable module.

The layer owns its weight (and constant bias) as `nn.Parameter`s and runs the same registry function as
any other node of its type, so a converted graph computes exactly what ONNX does. Per forward, the weight
it uses is

    w = weight_override if set, else weight
    w = weight_quant(w)  if a weight quantizer is set
    x = input_quant(x)   if an input quantizer is set (a `dynamic` layer's own run-time quantization)

`weight_override` is how a hyper-network (MetaQuantNet) injects generated weights: gradients flow back to
whatever produced the tensor. The caller clears it (or uses `OnnxModule.override_weights`).

The weight of a weight-only layer is laid out as emission quantizes it (`mqtool.weight_layout`): an
LSTM/GRU/RNN holds W and R in one `[D, 2G, max(I, H)]` tensor (one channel per row of each on axis 1; its
B stays a constant input), a blocked embedding table `[V, E]` is held as `[V * E / b, b]` (one channel
per block). Per-channel fake quantization of that tensor is then exactly the emitted quantization; the
forward pass takes W and R (or the table) back out of it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from mqtool.analysis import LayerInfo
from mqtool.weight_layers import RECURRENT_OPS
from mqtool.weight_layout import recurrence_shape


class QuantLayer(nn.Module):
    """The ONNX node `info.name` with a trainable `weight` (and `bias` when the bias is constant)."""

    def __init__(
        self,
        info: LayerInfo,
        fn: Callable[..., Tensor],
        weight: np.ndarray,
        bias: np.ndarray | None,
        weight_pos: int,
        bias_pos: int | None,
    ):
        super().__init__()
        self.info = info
        self.name = info.name
        self.op_type = info.op_type
        self.channel_axis = info.channel_axis
        self.weight = nn.Parameter(torch.from_numpy(np.array(weight, dtype=np.float32)))
        self.bias = None if bias is None else nn.Parameter(torch.from_numpy(np.array(bias, dtype=np.float32)))
        self.weight_override: Tensor | None = None
        self.weight_quant: nn.Module | None = None
        self.input_quant: nn.Module | None = None
        self._fn = fn
        # Positions in the node's input list: the runtime inputs fill the remaining slots, in order.
        self._weight_pos = weight_pos
        self._bias_pos = bias_pos if bias is not None else None
        # A recurrent layer's W and R (slices of the laid-out weight), or a blocked table's model shape.
        self._split: tuple[int, int, int] | None = None
        self._model_shape: tuple[int, ...] | None = None
        if info.op_type in RECURRENT_OPS:
            _, g, i = info.weight_shape
            self._split = (g, i, recurrence_shape(info)[2])
        elif tuple(self.weight.shape) != tuple(info.weight_shape):
            self._model_shape = tuple(info.weight_shape)
        plain = self._split is None and self._model_shape is None
        self._simple = plain and weight_pos == 1 and self._bias_pos in (None, 2)

    def effective_weight(self) -> Tensor:
        """The weight the next forward will use (override, then fake quantization)."""
        w = self.weight_override
        if w is None:
            w = self.weight
        elif w.shape != self.weight.shape:
            raise ValueError(
                f"layer '{self.name}': weight override of shape {tuple(w.shape)}, "
                f"expected {tuple(self.weight.shape)}"
            )
        if self.weight_quant is not None:
            w = self.weight_quant(w)
        return w

    def forward(self, *inputs: Tensor) -> Tensor:
        w = self.effective_weight()
        if self.input_quant is not None:
            inputs = (self.input_quant(inputs[0]), *inputs[1:])
        if self._simple:
            if self._bias_pos is None:
                return self._fn(inputs[0], w, *inputs[1:])
            return self._fn(inputs[0], w, self.bias, *inputs[1:])
        args = list(inputs)
        if self._split is not None:
            g, i, h = self._split
            args[1:1] = [w[:, :g, :i], w[:, g:, :h]]  # X, W, R, B, ...
            return self._fn(*args)
        if self._model_shape is not None:
            w = w.reshape(self._model_shape)
        args.insert(self._weight_pos, w)
        if self._bias_pos is not None:
            args.insert(self._bias_pos, self.bias)
        return self._fn(*args)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, op={self.op_type}, weight={tuple(self.weight.shape)}"
