"""Finding the quantizable layers of an ONNX model and measuring them (params, MACs).

A layer is quantizable when it multiplies an activation by a constant weight: Conv (any rank, grouped,
depthwise), ConvTranspose, Gemm, and MatMul with exactly one constant input. Weights computed by constant
subgraphs (`Constant`, `ConstantOfShape`, ...) count like initializers. Layers inside control flow (If
branches, Loop and Scan bodies, at any depth) count too: `LayerInfo.subgraph` says where they live, and
their names are unique across the whole model (`mqtool.model.scoped_graphs`). Analysis is pure: it reads
the model and returns plain dataclasses that serialise to JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import onnx

from mqtool.model import infer_shapes, quantized_nodes, refuse_quantized, scoped_constants, scoped_graphs

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class LayerInfo:
    """One quantizable layer. `macs` is per sample (None when the shapes are not known statically)."""

    name: str
    op_type: str
    weight: str
    weight_shape: list[int]
    params: int
    input: str
    output: str
    macs: int | None
    bias: str | None = None
    bias_params: int = 0
    # Axis of the weight that indexes output channels: the axis of per-channel scales.
    channel_axis: int = 0
    # Which input of the node is the weight (MatMul may hold it in either).
    weight_input: int = 1
    groups: int = 1
    # The graph the node lives in: [] for the main graph, else the path of [node name, attribute] pairs
    # from the main graph (`mqtool.model.find_scope` resolves it), e.g. [["If_0", "then_branch"]].
    subgraph: list[list[str]] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.weight_shape[self.channel_axis] if self.weight_shape else 1

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Totals:
    layers: int
    params: int
    bias_params: int
    macs: int | None
    fp32_weight_bytes: int
    model_params: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ModelInfo:
    """The analysis of one model: its quantizable layers in graph order, and totals."""

    layers: list[LayerInfo]
    totals: Totals
    opset: int
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    # (node, op) of each quantization node when the model is already quantized (`analyze(allow_quantized=True)`).
    quantized_nodes: list[tuple[str, str]] = field(default_factory=list)

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def to_json(self) -> dict:
        doc = {
            "opset": self.opset,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "layers": [layer.to_json() for layer in self.layers],
            "totals": self.totals.to_json(),
        }
        if self.quantized_nodes:
            doc["already_quantized"] = [list(n) for n in self.quantized_nodes]
        return doc


def analyze(model: onnx.ModelProto, *, allow_quantized: bool = False) -> ModelInfo:
    """Find and measure the quantizable layers of `model` (which is not modified).

    A model that is already quantized (QDQ, QLinear*, ConvInteger, ... anywhere) is an `InputError` naming
    one such node, unless `allow_quantized` (readers of quantized models: report, inspect); its quantization
    nodes are then listed in `quantized_nodes`.
    """
    quantized = quantized_nodes(model)
    if quantized and not allow_quantized:
        refuse_quantized(model)
    scoped_consts = scoped_constants(model)
    shapes = infer_shapes(model)
    layers = []
    model_params = 0
    counted: set[str] = set()
    for scoped in scoped_graphs(model.graph):
        consts = scoped_consts[scoped.scope]
        const_shapes = {k: list(v.shape) for k, v in consts.items()}
        for node, name in zip(scoped.graph.node, scoped.names):
            if node.domain not in ("", "ai.onnx") or node.op_type not in QUANTIZABLE_OPS:
                continue
            layer = _layer(node, name, consts, const_shapes, shapes)
            if layer is not None:
                layer.subgraph = [list(step) for step in scoped.scope]
                layers.append(layer)
        # Float constants read by the live (non-folded) graph: weights, biases, BN parameters, embeddings...
        live_inputs = {
            i for n in scoped.graph.node if not all(o in consts for o in n.output if o) for i in n.input
        }
        for k in live_inputs - counted:
            v = consts.get(k)
            if v is not None and v.dtype.kind == "f":
                model_params += int(v.size)
                counted.add(k)
    init_names = {i.name for i in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in init_names]
    # Embedding tables and recurrent weights (weight-only layers): mqtool/weight_layers.py
    from mqtool.weight_layers import with_weight_only_layers

    layers = with_weight_only_layers(model, layers, LayerInfo)
    macs = [layer.macs for layer in layers]
    totals = Totals(
        layers=len(layers),
        params=sum(layer.params for layer in layers),
        bias_params=sum(layer.bias_params for layer in layers),
        macs=None if any(m is None for m in macs) else sum(macs),
        fp32_weight_bytes=4 * sum(layer.params for layer in layers),
        model_params=model_params,
    )
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    return ModelInfo(layers, totals, opset, graph_inputs, [o.name for o in model.graph.output], quantized)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _prod(dims) -> int | None:
    if dims is None or any(d is None or d <= 0 for d in dims):
        return None
    return math.prod(dims)


def _layer(node, name, consts, const_shapes, shapes) -> LayerInfo | None:
    op = node.op_type
    ins = list(node.input)
    out = node.output[0]
    out_shape = shapes.get(out)
    if op in ("Conv", "ConvTranspose"):
        if len(ins) < 2 or ins[1] not in consts or ins[0] in consts:
            return None
        w = const_shapes[ins[1]]
        groups = int(_attr(node, "group", 1))
        bias = ins[2] if len(ins) > 2 and ins[2] else None
        params = math.prod(w)
        if op == "Conv":
            # Each output element costs Cin/groups * prod(kernel) MACs.
            per_out = math.prod(w[1:])
            spatial = _prod(out_shape[1:]) if out_shape else None
            macs = spatial * per_out if spatial is not None else None
            axis = 0
        else:
            # Each input element is scattered through Cout/groups * prod(kernel) weights.
            in_shape = shapes.get(ins[0])
            spatial_in = _prod(in_shape[2:]) if in_shape else None
            macs = params * spatial_in if spatial_in is not None else None
            axis = 1
        return LayerInfo(
            name,
            op,
            ins[1],
            w,
            params,
            ins[0],
            out,
            macs,
            bias,
            math.prod(const_shapes[bias]) if bias in const_shapes else 0,
            axis,
            1,
            groups,
        )
    if op == "Gemm":
        if len(ins) < 2 or ins[1] not in consts or ins[0] in consts:
            return None
        w = const_shapes[ins[1]]
        if len(w) != 2:
            return None
        trans_b = int(_attr(node, "transB", 0))
        bias = ins[2] if len(ins) > 2 and ins[2] else None
        # B is [K, N] (or [N, K] with transB); output channels are N.
        axis = 0 if trans_b else 1
        return LayerInfo(
            name,
            op,
            ins[1],
            w,
            math.prod(w),
            ins[0],
            out,
            math.prod(w),
            bias,
            math.prod(const_shapes[bias]) if bias in const_shapes else 0,
            axis,
            1,
        )
    if op == "MatMul":
        const_in = [i for i, t in enumerate(ins[:2]) if t in consts]
        if len(const_in) != 1:
            return None
        wi = const_in[0]
        w = const_shapes[ins[wi]]
        if len(w) < 2:
            return None
        # x @ W: W is [..., K, N], output channels N (last axis); W @ x: W is [..., M, K], channels M.
        k = w[-2] if wi == 1 else w[-1]
        axis = len(w) - 1 if wi == 1 else len(w) - 2
        per_sample = _prod(out_shape[1:]) if out_shape and len(out_shape) > 1 else None
        if out_shape and len(out_shape) == 1:
            per_sample = out_shape[0]
        macs = per_sample * k if per_sample is not None else None
        return LayerInfo(name, op, ins[wi], w, math.prod(w), ins[1 - wi], out, macs, None, 0, axis, wi)
    return None
