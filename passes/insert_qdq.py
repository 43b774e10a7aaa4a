"""Insert QuantizeLinear/DequantizeLinear pairs and integer weights, following ONNX Runtime's QDQ format.

Before (a layer with weight_bits 4, act_bits 8; `x` and `y` planned by `qdq_plan.plan_activations`)::

    Conv "conv1"(x, W, B) -> c
    Relu(c) -> y

After (layer index 0; x and y are the plan's activations 0 and 1)::

    QuantizeLinear "a0.Q"(x, a0.s, a0.z) -> a0.q                       (uint8, per tensor)
    DequantizeLinear "a0.DQ"(a0.q, a0.s, a0.z) -> a0.dq
    DequantizeLinear "w0.DQ" <axis=0>(w0.q, w0.s) -> w0.dq              (int8 values, per channel, zp 0)
    DequantizeLinear "b0.DQ" <axis=0>(b0.q, b0.s) -> b0.dq              (int32, scale s_x * s_w)
    Conv "conv1"(a0.dq, w0.dq, b0.dq) -> c
    Relu(c) -> y
    QuantizeLinear "a1.Q"(y, a1.s, a1.z) -> a1.q;  DequantizeLinear "a1.DQ"(...) -> a1.dq

Generated names are short on purpose: in a small model, ORT-style names (`<tensor>_QuantizeLinear_Output`)
take more bytes than the packed weights. The layer nodes and every original tensor keep their names.

Weights: `numerics.quantize_weight` (per output channel, symmetric, zero point 0, full signed k-bit range,
MSE scale) at the layer's stored bits (`qdq_plan.plan_storage`: 7 for an 8-bit layer on integer kernels)
or, with `QuantParams`, `numerics.quantize` of the given weight with the given scale; block-wise scales
(`numerics.quantize_weight_blockwise`, DequantizeLinear `block_size`) for an `nbits` layer with a block
size. Stored in INT8 here with an explicit zero point 0 (`pack_weights` moves them to INT4/INT2). LSTM/GRU/
RNN: W and R, each through its own DequantizeLinear. A MatMul in format `dynamic` becomes
com.microsoft.DynamicQuantizeMatMul (int8 weight, input quantized by the kernel). An embedding table in format `nbits` becomes
com.microsoft.GatherBlockQuantized (int4 or uint8 q + 128, block-wise along the last axis). Bias: see
`qdq_plan.int32_bias` - int32 with scale s_x * s_w only for a Gemm with a quantized input, float
otherwise. Activations below 8 bits get a Clip to their k-bit range in front of the QuantizeLinear. Carried
tensors (`ActivationPlan.carried`) get a Q/DQ pair with their source's parameters; single-valued constants
of integer Add/Mul a uint8 DequantizeLinear (a Div by one becomes a Mul by its inverse).
Every reader of a quantized tensor reads the DequantizeLinear output; a quantized graph output keeps its
name (the DequantizeLinear writes it and the producer's tensor becomes `<name>_float`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from mqtool.analysis import ModelInfo, analyze
from mqtool.errors import InputError
from mqtool.model import nested_graphs
from mqtool.numerics import (
    activation_qparams,
    int_range,
    quantize,
    quantize_weight,
    quantize_weight_blockwise,
    weight_scale,
)
from mqtool.policy import FLOAT, Policy
from mqtool.weight_layers import RECURRENT_OPS
from mqtool.weight_layout import (
    emitted_scales,
    emitted_weights,
    is_simulated_layout,
    simulated_channels,
    simulated_weight,
    table_block,
)
from passes.base import PassResult
from passes.graph import Namer, initializers, producers, toposort
from passes.qdq_plan import MS_DOMAIN, ActQuant, Format, WeightStorage, int32_bias, quantize_bias
from passes.qparams import QuantParams

log = logging.getLogger(__name__)


def insert_qdq(
    model: onnx.ModelProto,
    policy: Policy,
    activations: Mapping[str, ActQuant],
    qparams: QuantParams | None = None,
    info: ModelInfo | None = None,
    carried: Mapping[str, str] | None = None,
    constants: Sequence[tuple[str, int]] = (),
    layout: Mapping[str, WeightStorage] | None = None,
    taken: Iterable[str] = (),
) -> PassResult:
    """Quantize the weights of the policy's layers and insert the planned activation Q/DQ (in place).

    `activations` is the plan with its parameters (tensor -> ActQuant); `carried` maps a tensor to the
    planned tensor whose quantizer it repeats and `constants` lists the (node, input) constants stored as
    uint8 (`qdq_plan.ActivationPlan`); `layout` (`qdq_plan.plan_storage`) gives each layer's stored bits
    and block size (default: the policy's bits, per-channel scales); `info` is `analyze(model)` when the
    caller already has it (tensor and node names must be those of `model`); `taken` lists names used
    elsewhere (other graphs of the model, when `model` holds one If/Loop body: `passes.subgraph_qdq`) that
    new tensors and nodes must not take. Readers inside subgraphs (If/Loop bodies at any depth) of a
    quantized tensor read its DequantizeLinear output too.
    """
    info = analyze(model) if info is None else info
    qparams = qparams or QuantParams()
    all_acts = dict(activations)
    for tensor, source in (carried or {}).items():
        if source not in activations:
            raise ValueError(
                f"insert_qdq: carried tensor '{tensor}' repeats '{source}', which is not planned"
            )
        all_acts[tensor] = activations[source]
    g = model.graph
    namer = Namer(g)
    namer.taken.update(taken)
    nodes = {n.name: n for n in g.node}
    inits = initializers(g)
    modified = False
    for j, layer in enumerate(info.layers):
        bits = policy.get(layer.name).weight_bits
        if bits == FLOAT:
            continue
        if getattr(layer, "subgraph", None):
            # Layers inside If/Loop/Scan bodies are emitted by passes.subgraph_qdq (this pass on each body).
            log.warning(
                "layer '%s' lives in a subgraph: left float by insert_qdq (see subgraph_qdq)", layer.name
            )
            continue
        node = nodes.get(layer.name)
        if node is None:
            raise InputError(f"layer '{layer.name}' is not in the model (run the prepare passes first)")
        ws = (layout or {}).get(layer.name)
        _quantize_layer(g, namer, inits, node, layer, f"w{j}", f"b{j}", bits, ws, qparams, all_acts)
        modified = True
    # The readers of all quantized tensors are rewired in one scan of the nodes that were there before the
    # Q/DQ pairs (a scan per tensor was quadratic: 0.7 s on DenseNet-121); the new Q nodes keep reading the
    # float tensors.
    existing = len(g.node)
    rewire: dict[str, str] = {}
    for i, (tensor, act) in enumerate(all_acts.items()):
        rewire.update(_add_activation_qdq(g, namer, tensor, f"a{i}", act))
        modified = True
    for j, (name, k) in enumerate(constants):
        _constant_qdq(g, namer, nodes, inits, name, k, f"k{j}")
        modified = True
    if rewire:
        for n in g.node[:existing]:
            for k, name in enumerate(n.input):
                if name in rewire:
                    n.input[k] = rewire[name]
            for sub in nested_graphs(n):
                _rewire_outer_reads(sub, rewire)
    if any(n.domain == MS_DOMAIN for n in g.node) and not any(
        o.domain == MS_DOMAIN for o in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if modified:
        toposort(g)
    return PassResult(model, modified)


def _rewire_outer_reads(sub: onnx.GraphProto, rewire: dict[str, str]) -> None:
    """Make `sub` (a body nested in the graph being rewritten) read the dequantized tensors: its node
    inputs and outputs that name an outer quantized tensor, unless `sub` defines that name itself."""
    own = {i.name for i in sub.input} | {i.name for i in sub.initializer}
    own |= {o for n in sub.node for o in n.output}
    mapping = {k: v for k, v in rewire.items() if k not in own}
    for n in sub.node:
        for k, name in enumerate(n.input):
            if name in mapping:
                n.input[k] = mapping[name]
    for o in sub.output:
        if o.name in mapping:  # a branch that returns the outer tensor as it is
            o.name = mapping[o.name]


def _constant_qdq(g, namer: Namer, nodes, inits, name: str, k: int, tag: str) -> None:
    """Feed input `k` of node `name` (a single-valued float constant) through a uint8 DequantizeLinear: the
    value is one level of its own quantizer (q = 255 or 0, `numerics.activation_qparams`)."""
    node = nodes.get(name)
    if node is None or k >= len(node.input):
        raise ValueError(f"insert_qdq: no input {k} on node '{name}'")
    value = _constant_value(g, inits, node.input[k])
    if node.op_type == "Div":  # ORT has no integer Div: x / c runs as QLinearMul by 1 / c
        value = (np.float32(1.0) / value).astype(np.float32)
        node.op_type = "Mul"
    c = float(value.reshape(-1)[0])
    scale, zp = activation_qparams(c, c, 8)
    q = quantize(value, scale, zp, 0, 255).astype(np.uint8)
    q_name, s_name, z_name = namer(f"{tag}.q"), namer(f"{tag}.s"), namer(f"{tag}.z")
    g.initializer.append(numpy_helper.from_array(q, q_name))
    g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), s_name))
    g.initializer.append(numpy_helper.from_array(np.array(zp, np.uint8), z_name))
    out = namer(f"{tag}.dq")
    g.node.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out], namer(f"{tag}.DQ")))
    node.input[k] = out


def _constant_value(g, inits, name: str) -> np.ndarray:
    if name in inits:
        return numpy_helper.to_array(inits[name]).astype(np.float32)
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(next(a.t for a in n.attribute if a.name == "value")).astype(
                np.float32
            )
    raise ValueError(f"insert_qdq: '{name}' is not a constant")


def _quantize_layer(g, namer, inits, node, layer, tag, btag, bits, ws, qparams, acts) -> None:
    """Replace the layer's float weight (and, for LSTM/GRU/RNN, its recurrence R) by quantized storage."""
    over = qparams.layer(layer.name)
    w = _weight(inits, layer, over.weight)
    stored = ws.bits if ws is not None else bits
    block = ws.block_size if ws is not None else 0
    if layer.op_type in RECURRENT_OPS:
        _quantize_recurrent(g, namer, inits, node, layer, tag, bits, stored, ws, over, w)
        return
    block_scale = None
    if layer.op_type == "Gather" and is_simulated_layout(layer, w.shape):
        # A finetuned table laid out in the blocks the simulation quantizes (mqtool.weight_layout): its
        # block scales hold for GatherBlockQuantized with those blocks; per-row formats take MSE scales.
        w = emitted_weights(layer, w)[0]
        nbits = ws is not None and ws.format is Format.NBITS and (block or GATHER_BLOCK) == table_block(layer)
        if over.scale is not None and np.size(over.scale) == simulated_channels(layer):
            if nbits:
                block_scale = emitted_scales(layer, _rescaled(over, bits, stored).reshape(-1))[0]
            over = replace(over, scale=None)
    if layer.op_type == "Gather" and ws is not None and ws.format is Format.NBITS:
        block = block or GATHER_BLOCK
        _gather_block_quantized(g, namer, node, w, stored, block, ws.container, tag, block_scale)
        return
    if block:
        if over.scale is not None:
            log.warning("layer '%s': per-channel scale override ignored (block-wise scales)", layer.name)
        k_axis = _k_axis(layer)
        q, scale = quantize_weight_blockwise(w, stored, k_axis, block)
        zero = np.zeros(scale.shape, np.int8)
        node.input[layer.weight_input] = _add_dq(g, namer, tag, q.astype(np.int8), scale, k_axis, zero, block)
        _bias(g, namer, inits, node, btag, layer.bias, over.bias, None, scale)
        return
    axis = layer.channel_axis
    if over.scale is not None:
        scale = _rescaled(over, bits, stored)
    else:
        scale = weight_scale(w, stored, axis, method="mse")
    q, scale = quantize_weight(w, stored, axis, scale=np.asarray(scale, dtype=np.float32))
    if ws is not None and ws.format is Format.DYNAMIC:
        _dynamic_quantize_matmul(g, namer, node, layer, tag, btag, q.astype(np.int8), scale, over.bias)
        return
    # An explicit zero point 0 (ORT's convention): ORT fuses a Gemm - also one it makes from a 2-D
    # MatMul + bias Add - into QGemm only when the weight DQ has one. Identical all-zero zero points
    # of layers with the same channel count are merged by dedupe_initializers.
    zero = np.zeros(len(scale), np.int8)
    node.input[layer.weight_input] = _add_dq(g, namer, tag, q.astype(np.int8), scale, axis, zero)
    act = acts.get(layer.input) if int32_bias(layer, acts) else None
    _bias(g, namer, inits, node, btag, layer.bias, over.bias, act, scale)


def _rescaled(over, bits: int, stored: int) -> np.ndarray:
    """The override scale for the stored bits: a scale made for other bits (an 8-bit one for a layer stored
    at 7) keeps its clipping range."""
    made_for = over.scale_bits or bits
    return np.asarray(over.scale, np.float32) * np.float32(2.0 ** (made_for - stored))


def _quantize_recurrent(g, namer, inits, node, layer, tag, bits, stored, ws, over, w) -> None:
    """W and R of an LSTM/GRU/RNN at the same bits, every row its own scale, computed on their joint layout
    (`mqtool.weight_layout`: what the simulation quantizes); a finetuned weight and scale come in that
    layout (a per-channel scale of W alone is still taken, R's rows then get their MSE scales)."""
    axis = layer.channel_axis
    if is_simulated_layout(layer, w.shape):
        v = w
    else:
        v = simulated_weight(layer, w, _weight(inits, layer, None, name=node.input[2]))
    scale = weight_scale(v, stored, axis, method="mse")
    if over.scale is not None:
        given = _rescaled(over, bits, stored).reshape(-1)
        if given.size == scale.size:
            scale = given
        elif given.size == layer.channels:
            scale[: given.size] = given
        else:
            log.warning("layer '%s': scale override of %d values ignored", layer.name, given.size)
    q, scale = quantize_weight(v, stored, axis, scale=np.asarray(scale, dtype=np.float32))
    (qw, qr), (sw, sr) = emitted_weights(layer, q), emitted_scales(layer, scale)
    qw, qr = (np.ascontiguousarray(x).astype(np.int8) for x in (qw, qr))
    if over.bias is not None:
        log.warning(
            "layer '%s': bias override ignored (recurrent layer: B stays as in the model)", layer.name
        )
    if layer.op_type == "LSTM" and ws is not None and ws.format is Format.INT8 and dynamic_lstm_ok(node):
        _dynamic_quantize_lstm(g, namer, node, qw, sw, qr, sr, tag)
        return
    # R [directions, gates * hidden, hidden]: its own DequantizeLinear, per-row scales on axis 1 as W's.
    node.input[1] = _add_dq(g, namer, tag, qw, sw, axis, np.zeros(len(sw), np.int8))
    node.input[2] = _add_dq(g, namer, f"{tag}r", qr, sr, axis, np.zeros(len(sr), np.int8))


def _dynamic_quantize_matmul(g, namer, node, layer, tag, btag, q, scale, bias_override) -> None:
    """The MatMul or Gemm `node` becomes com.microsoft.DynamicQuantizeMatMul under the same name: its float
    input quantized by the kernel at run time (uint8, one scale and zero point over the whole tensor, as
    ONNX DynamicQuantizeLinear), the weight `q` as int8 [K, N] (a transB Gemm's transposed) with per-column
    `scale` and zero point 0, a Gemm's bias C as the op's bias. Emitting the fused op itself, rather than
    DynamicQuantizeLinear + MatMulInteger + Cast + Mul that ORT would fuse, keeps the layer's name on the
    node ORT runs (the latency profiler attributes by name) and does not depend on the fusion's
    conditions (one DynamicQuantizeLinear per MatMul, constant scales)."""
    gemm = node.op_type == "Gemm"
    if (node.op_type not in ("MatMul", "Gemm")) or layer.weight_input != 1 or q.ndim != 2:
        raise InputError(
            f"layer '{layer.name}' ({node.op_type}): format 'dynamic' needs x @ W with a 2-D constant W"
        )
    if gemm and any(a.name == "transB" and a.i for a in node.attribute):
        q = q.T
    bias = node.input[2] if gemm and len(node.input) > 2 else ""
    if bias_override is not None:
        if not gemm:
            log.warning("layer '%s': bias override ignored (a MatMul keeps its bias Add)", layer.name)
        else:
            bias = namer(f"{btag}.f")
            g.initializer.append(numpy_helper.from_array(np.asarray(bias_override, np.float32), bias))
    q_name, s_name, z_name = namer(f"{tag}.q"), namer(f"{tag}.s"), namer(f"{tag}.z")
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q), q_name))
    g.initializer.append(numpy_helper.from_array(np.asarray(scale, dtype=np.float32), s_name))
    g.initializer.append(numpy_helper.from_array(np.zeros(len(scale), np.int8), z_name))
    x = node.input[0]
    del node.input[:]
    node.input.extend([x, q_name, s_name, z_name, *([bias] if bias else [])])
    del node.attribute[:]
    node.op_type, node.domain = "DynamicQuantizeMatMul", MS_DOMAIN


def _weight(inits, layer, override, name: str | None = None) -> np.ndarray:
    name = layer.weight if name is None else name
    if override is not None:
        w = np.asarray(override, dtype=np.float32)
    elif name in inits:
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
    else:
        raise InputError(f"layer '{layer.name}': weight '{name}' is not an initializer (run fold_constants)")
    if not np.all(np.isfinite(w)):
        raise InputError(f"layer '{layer.name}': weight '{name}' contains NaN or Inf")
    return w


def dynamic_lstm_ok(node: onnx.NodeProto) -> bool:
    """Whether an LSTM can run as com.microsoft.DynamicQuantizeLSTM (no batch-first layout, no peepholes,
    the attributes that op knows)."""
    known = {
        "activation_alpha",
        "activation_beta",
        "activations",
        "clip",
        "direction",
        "hidden_size",
        "input_forget",
    }
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    peephole = len(node.input) > 7 and bool(node.input[7])
    return not layout and not peephole and all(a.name in known | {"layout"} for a in node.attribute)


def _dynamic_quantize_lstm(g, namer, node, qw, sw, qr, sr, tag: str) -> None:
    """LSTM(X, W, R, B, ...) -> com.microsoft.DynamicQuantizeLSTM: int8 W and R transposed to
    [directions, K, 4 * hidden] with one scale per (direction, gate row) - the per-row scale, shared by the
    directions as numerics computes it - and X and H quantized to uint8 by the kernel at run time (ORT's
    integer LSTM: 2.6x faster than the float one at hidden 512, bench/bench_emit_tables.py)."""
    dirs = qw.shape[0]
    names = []
    for part, q, s in (("w", qw, sw), ("r", qr, sr)):
        q_name, s_name, z_name = namer(f"{tag}{part}.q"), namer(f"{tag}{part}.s"), namer(f"{tag}{part}.z")
        g.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(np.transpose(q, (0, 2, 1))).astype(np.int8), q_name)
        )
        scales = np.tile(np.asarray(s, np.float32)[None, :], (dirs, 1))
        g.initializer.append(numpy_helper.from_array(scales, s_name))
        g.initializer.append(numpy_helper.from_array(np.zeros(scales.shape, np.int8), z_name))
        names.append((q_name, s_name, z_name))
    (wq, ws, wz), (rq, rs, rz) = names
    rest = list(node.input[3:8]) + [""] * (5 - len(node.input[3:8]))
    inputs = [node.input[0], wq, rq, *rest, ws, wz, rs, rz]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
    new = helper.make_node(
        "DynamicQuantizeLSTM", inputs, list(node.output), node.name, domain=MS_DOMAIN, **attrs
    )
    node.CopyFrom(new)


# GatherBlockQuantized's default block: 32 values of the last axis per scale (ORT needs a power of two >= 16).
GATHER_BLOCK = 32


def _gather_block_quantized(
    g, namer, node, table, bits: int, block: int, container, tag: str, scale: np.ndarray | None = None
) -> None:
    """Gather(table, ids) -> com.microsoft.GatherBlockQuantized(q, ids, scales[, zero points]): ORT
    gathers the quantized rows and dequantizes only those (a DequantizeLinear in front of a Gather would
    dequantize the whole table every run: 87-160 ms for a 30000 x 256 table, docs/passes.md). Block-wise
    scales along the last axis; INT4 values (zero point 0) up to 4 bits, uint8 q + 128 (zero point 128)
    above."""
    axis = table.ndim - 1
    q, scale = quantize_weight_blockwise(table, bits, axis, block, scale=scale)
    q_name, s_name = namer(f"{tag}.q"), namer(f"{tag}.s")
    inputs = [q_name, node.input[1], s_name]
    if container.bits == 4:
        g.initializer.append(numpy_helper.from_array(q.astype(np.int8).astype(ml_dtypes.int4), q_name))
    else:
        g.initializer.append(numpy_helper.from_array((q + 128).astype(np.uint8), q_name))
        inputs.append(namer(f"{tag}.z"))
        g.initializer.append(numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), inputs[-1]))
    g.initializer.append(numpy_helper.from_array(scale, s_name))
    new = helper.make_node(
        "GatherBlockQuantized",
        inputs,
        list(node.output),
        node.name,
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=axis,
        block_size=block,
        bits=container.bits,
    )
    node.CopyFrom(new)


def _k_axis(layer) -> int:
    """The reduction axis of the weight, along which block-wise scales run."""
    if len(layer.weight_shape) == 2:
        return 1 - layer.channel_axis
    return 1 if layer.channel_axis == 0 else 0


def _add_dq(
    g: onnx.GraphProto,
    namer: Namer,
    tag: str,
    values: np.ndarray,
    scale: np.ndarray,
    axis: int,
    zero=None,
    block: int = 0,
) -> str:
    q_name, s_name = namer(f"{tag}.q"), namer(f"{tag}.s")
    g.initializer.append(numpy_helper.from_array(values, q_name))
    g.initializer.append(numpy_helper.from_array(np.asarray(scale, dtype=np.float32), s_name))
    inputs = [q_name, s_name]
    if zero is not None:
        inputs.append(namer(f"{tag}.z"))
        g.initializer.append(numpy_helper.from_array(zero, inputs[-1]))
    out = namer(f"{tag}.dq")
    extra = {"block_size": block} if block else {}
    g.node.append(helper.make_node("DequantizeLinear", inputs, [out], namer(f"{tag}.DQ"), axis=axis, **extra))
    return out


def _bias(g, namer, inits, node, tag, bias_name, override, act: ActQuant | None, w_scale) -> None:
    if bias_name is None and override is None:
        return
    if bias_name is not None and bias_name not in inits:
        return  # a computed bias stays as it is
    b = np.asarray(
        override if override is not None else numpy_helper.to_array(inits[bias_name]), dtype=np.float32
    )
    quantized = quantize_bias(b, act.scale, w_scale) if act is not None and b.shape == w_scale.shape else None
    if quantized is None:
        if act is not None:
            log.warning(
                "layer '%s': bias kept float (int32 would overflow, or shape %s)", node.name, list(b.shape)
            )
        if override is not None:
            name = namer(f"{tag}.f")
            g.initializer.append(numpy_helper.from_array(b, name))
            _set_input(node, 2, name)
        return
    qb, scale = quantized
    _set_input(node, 2, _add_dq(g, namer, tag, qb.astype(np.int32), scale, 0))


def _set_input(node: onnx.NodeProto, k: int, name: str) -> None:
    while len(node.input) <= k:
        node.input.append("")
    node.input[k] = name


def _add_activation_qdq(
    g: onnx.GraphProto, namer: Namer, tensor: str, tag: str, act: ActQuant
) -> dict[str, str]:
    """Append the Q/DQ (and Clip) nodes of `tensor`; returns {float tensor: dequantized tensor} for the
    caller to rewire the readers (empty for a graph output, whose DequantizeLinear takes over its name)."""
    qmin, qmax = int_range(act.bits, signed=False)
    scale = np.float32(act.scale)
    zp = int(act.zero_point)
    is_output = any(o.name == tensor for o in g.output)
    src = tensor
    if is_output:
        # The graph output keeps its name and carries the dequantized value, as every other reader does.
        src = namer(f"{tensor}_float")
        writer = producers(g).get(tensor)
        if writer is None:
            raise InputError(f"graph output '{tensor}' has no producer and cannot be quantized")
        writer.output[list(writer.output).index(tensor)] = src
    s_name, z_name = namer(f"{tag}.s"), namer(f"{tag}.z")
    g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), s_name))
    g.initializer.append(numpy_helper.from_array(np.array(zp, np.uint8), z_name))
    new_nodes = []
    q_in = src
    if act.bits < 8:
        # uint8 QuantizeLinear saturates at 255; numerics saturates at 2^k - 1. Clip to the k-bit range.
        lo, hi = np.float32((qmin - zp) * scale), np.float32((qmax - zp) * scale)
        lo_name, hi_name = namer(f"{tag}.lo"), namer(f"{tag}.hi")
        g.initializer.append(numpy_helper.from_array(np.array(lo, np.float32), lo_name))
        g.initializer.append(numpy_helper.from_array(np.array(hi, np.float32), hi_name))
        q_in = namer(f"{tag}.c")
        new_nodes.append(helper.make_node("Clip", [src, lo_name, hi_name], [q_in], namer(f"{tag}.Clip")))
    q_out = namer(f"{tag}.q")
    dq_out = tensor if is_output else namer(f"{tag}.dq")
    new_nodes.append(helper.make_node("QuantizeLinear", [q_in, s_name, z_name], [q_out], namer(f"{tag}.Q")))
    new_nodes.append(
        helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], namer(f"{tag}.DQ"))
    )
    g.node.extend(new_nodes)
    return {} if is_output else {src: dq_out}
