"""Weight-only quantizable layers beyond the matrix products of `mqtool.analysis`: embedding tables and
recurrent cells.

- `Gather` whose data (input 0) is a constant float table of rank >= 2 and whose indices are computed:
  an embedding lookup. The table is the layer's weight (`weight_input` 0); its rows are the channels
  (`channel_axis` 0: one scale per row when per-channel) and the indices are the layer's "input".
- `LSTM`, `GRU`, `RNN` with constant W (input 1) and R (input 2): one layer named after the node, whose
  weight is W [directions, gates * hidden, input]; R [directions, gates * hidden, hidden] is quantized
  with it at the same bits and counted in `params` (so size budgets and average bits see both). Channels
  are axis 1 (gates * hidden): ONNX per-axis scales are 1-D, so a channel's scale is shared by the
  directions. B (input 3) is the layer's float bias. MACs count 0 for both (no integer arithmetic).

Both run weight-only (no integer kernel reads a quantized input): `passes.qdq_plan.allowed_formats` lists
what each can be emitted as. `analysis.analyze` calls `with_weight_only_layers` last; only the main graph
is searched (layers inside control flow are analysis' business).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from mqtool.model import constant_values, node_names

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
WEIGHT_ONLY_OPS = ("Gather", *RECURRENT_OPS)


def weight_only_layers(
    model: onnx.ModelProto, layer_type: type, consts: dict[str, np.ndarray] | None = None
) -> list:
    """The Gather-table and recurrent layers of the main graph, in graph order, as `layer_type`
    (`analysis.LayerInfo`, passed in so that this module does not import analysis, which calls it)."""
    consts = constant_values(model) if consts is None else consts
    out = []
    for node, name in zip(model.graph.node, node_names(model.graph)):
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_ONLY_OPS:
            continue
        if all(o in consts for o in node.output if o):
            continue  # folded away: not run
        make = _gather if node.op_type == "Gather" else _recurrent
        layer = make(layer_type, node, name, consts)
        if layer is not None:
            out.append(layer)
    return out


def with_weight_only_layers(model: onnx.ModelProto, layers: list, layer_type: type) -> list:
    """`layers` (of `layer_type`) with `weight_only_layers` merged in graph order (layers not in the main
    graph keep their place after the main-graph layer before them)."""
    extra = [
        x for x in weight_only_layers(model, layer_type) if x.name not in {layer.name for layer in layers}
    ]
    if not extra:
        return layers
    position = {name: i for i, name in enumerate(node_names(model.graph))}
    keyed, last = [], -1
    for layer in layers:
        last = position.get(layer.name, last)
        keyed.append((last, 0, layer))
    keyed += [(position[x.name], 1, x) for x in extra]
    return [layer for *_, layer in sorted(keyed, key=lambda k: (k[0], k[1]))]


def _float_const(consts: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    v = consts.get(name) if name else None
    return v if v is not None and v.dtype.kind == "f" else None


def _gather(layer_type: type, node: onnx.NodeProto, name: str, consts: dict[str, np.ndarray]):
    if len(node.input) < 2 or node.input[1] in consts:
        return None
    table = _float_const(consts, node.input[0])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if table is None or table.ndim < 2 or axis % table.ndim != 0:
        return None
    shape = list(table.shape)
    return layer_type(
        name, "Gather", node.input[0], shape, math.prod(shape), node.input[1], node.output[0], 0,
        channel_axis=0, weight_input=0,
    )  # fmt: skip


def _recurrent(layer_type: type, node: onnx.NodeProto, name: str, consts: dict[str, np.ndarray]):
    if len(node.input) < 3:
        return None
    w, r = _float_const(consts, node.input[1]), _float_const(consts, node.input[2])
    if w is None or r is None or w.ndim != 3 or r.ndim != 3 or node.input[0] in consts:
        return None
    bias = node.input[3] if len(node.input) > 3 and node.input[3] in consts else None
    return layer_type(
        name, node.op_type, node.input[1], list(w.shape), int(w.size + r.size), node.input[0],
        node.output[0] if node.output and node.output[0] else next(o for o in node.output if o), 0,
        bias=bias, bias_params=int(consts[bias].size) if bias else 0, channel_axis=1, weight_input=1,
    )  # fmt: skip


def recurrence_weight(node: onnx.NodeProto) -> str:
    """The R (recurrence) input a recurrent layer quantizes along with its W."""
    return node.input[2]
