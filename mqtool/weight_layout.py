"""How the simulation lays out the weights of the weight-only layers (`mqtool.weight_layers`) so that
per-channel fake quantization along `LayerInfo.channel_axis` of the laid-out tensor is exactly what emission
stores. Emission quantizes the same laid-out tensor (`passes.insert_qdq`), so both sides compute the same
scales from the same values; finetuned `QuantParams` of these layers come in this layout too.

- LSTM/GRU/RNN: W `[D, G, I]` and R `[D, G, H]` (G = gates x hidden) are quantized at the same bits, every
  row with its own scale. Laid out as one `[D, 2G, max(I, H)]` tensor, W's rows then R's, each zero-padded
  on the last axis: 2G channels on axis 1. A padding zero is 0 at every scale, so the rows quantize as W and
  R would on their own.
- An embedding table `[V, E]` (Gather) with a block size b (`table_block`): the blocks of b consecutive
  values along E of its `nbits` format (com.microsoft.GatherBlockQuantized, what `storage auto` emits for a
  table), each with its own scale. Laid out as `[V * E / b, b]`: one channel per block on axis 0. A table
  emitted `int8` or `packed` has one scale per row instead: the simulation is then finer than the file
  (a finetuned table keeps its values; its rows get MSE scales).
- Every other layer: the weight as it is.

A core module (NumPy only): the PyTorch backend lays out its `QuantLayer` weights with it and the passes
take emitted weights back out of the layout.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from mqtool.weight_layers import RECURRENT_OPS

# GatherBlockQuantized's default block: 32 values of the last axis per scale (ORT needs a power of two >= 16).
GATHER_BLOCK = 32


class _Layer(Protocol):
    op_type: str
    weight_shape: list[int]
    params: int
    channel_axis: int


def gather_block(layer: _Layer, block: int = GATHER_BLOCK) -> int:
    """The block size of an embedding table's GatherBlockQuantized: `block`, halved until it divides the
    last axis (ORT needs a power of two >= 16 that does); 0 when none does."""
    last = layer.weight_shape[-1] if layer.weight_shape else 0
    while block >= 16 and last % block:
        block //= 2
    return block if block >= 16 else 0


def table_block(layer: _Layer) -> int:
    """The block size the simulation quantizes an embedding table with (0: per row): the
    GatherBlockQuantized block of a 2-D table (its `nbits` format); 0 for other layers and ranks."""
    if layer.op_type != "Gather" or len(layer.weight_shape) != 2:
        return 0
    return gather_block(layer)


def recurrence_shape(layer: _Layer) -> list[int]:
    """R's shape `[D, G, H]` of a recurrent layer (its `params` count W and R)."""
    d, g, _ = layer.weight_shape
    return [d, g, (layer.params - math.prod(layer.weight_shape)) // (d * g)]


def simulated_shape(layer: _Layer) -> list[int]:
    """The shape of the laid-out weight (module docstring)."""
    if layer.op_type in RECURRENT_OPS:
        d, g, i = layer.weight_shape
        return [d, 2 * g, max(i, recurrence_shape(layer)[2])]
    b = table_block(layer)
    if b:
        return [math.prod(layer.weight_shape) // b, b]
    return list(layer.weight_shape)


def simulated_channels(layer: _Layer) -> int:
    """Channels (scales) of the laid-out weight along the layer's channel axis."""
    return simulated_shape(layer)[layer.channel_axis]


def simulated_weight(layer: _Layer, w: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
    """The laid-out weight of `layer` from its weight `w` (and, for LSTM/GRU/RNN, its recurrence `r`)."""
    w = np.asarray(w, dtype=np.float32)
    if layer.op_type in RECURRENT_OPS:
        if r is None:
            raise ValueError(f"layer '{getattr(layer, 'name', '?')}': a recurrent layer's layout needs R")
        r = np.asarray(r, dtype=np.float32)
        d, g, i = w.shape
        out = np.zeros((d, 2 * g, max(i, r.shape[2])), np.float32)
        out[:, :g, :i] = w
        out[:, g:, : r.shape[2]] = r
        return out
    b = table_block(layer)
    return w.reshape(-1, b) if b else w


def is_simulated_layout(layer: _Layer, shape) -> bool:
    """Whether an array of `shape` given for `layer`'s weight is in the laid-out form (not the model's)."""
    return list(shape) != list(layer.weight_shape) and list(shape) == simulated_shape(layer)


def emitted_weights(layer: _Layer, v: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(W in the model's layout, R or None) from a laid-out weight `v` (values or integers)."""
    v = np.asarray(v)
    if layer.op_type in RECURRENT_OPS:
        _, g, i = layer.weight_shape
        h = recurrence_shape(layer)[2]
        return v[:, :g, :i], v[:, g:, :h]
    if table_block(layer):
        return v.reshape(layer.weight_shape), None
    return v, None


def emitted_scales(layer: _Layer, s: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(W's scales, R's scales or None) from the laid-out weight's per-channel scales: per row for a
    recurrent layer (`[G]` each), per block `[V, E / b]` for a blocked table, else as given."""
    s = np.asarray(s, dtype=np.float32)
    if layer.op_type in RECURRENT_OPS:
        g = layer.weight_shape[1]
        return s[:g], s[g:]
    b = table_block(layer)
    if b:
        return s.reshape(layer.weight_shape[0], layer.weight_shape[1] // b), None
    return s, None
