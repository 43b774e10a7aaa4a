"""Quantize layers that live inside If/Loop/Scan bodies: the same planning and insertion as the main graph,
applied to each body as a graph of its own.

A body is handed to `qdq_plan` and `insert_qdq` as a *view*: a model whose graph is a copy of the body, with
the constants it reads from enclosing graphs mirrored as initializers (so weights, biases and the constants of
integer regions are seen as constants) and the other outer values it reads as graph inputs. Those outer
values are also listed as view outputs, which `qdq_plan` never quantizes on its own: a tensor gets its
Q/DQ pair in the graph that defines it, where every reader (inside bodies too) reads the DequantizeLinear
output, exactly what the PyTorch backend's `set_act_quant(tensor)` simulates. So a body layer that reads an
outer tensor asks for it in the graph that defines it (its vote is counted there). After insertion the
view's nodes and its own new initializers replace the body's; mirrored constants stay where they were.

Before (a Conv inside an If branch; `x` defined in the branch, `W` a `Constant` node there)::

    If "if"(cond) then_branch:
        Constant() -> W;  Conv "conv"(x, W) -> y

After (`x` quantized at 8 bits, the weight at 4 bits in an INT8 container)::

    If "if"(cond) then_branch:
        QuantizeLinear "a0.Q"(x, a0.s, a0.z) -> a0.q;  DequantizeLinear "a0.DQ"(...) -> a0.dq
        DequantizeLinear "w0.DQ" <axis=0>(w0.q, w0.s, w0.z) -> w0.dq
        Conv "conv"(a0.dq, w0.dq) -> y

Generated names are unique across all graphs of the model. Body weights may be initializers of the body,
`Constant` nodes, values folded from constants (`mqtool.model.scoped_constants`) or initializers of an
enclosing graph; the quantized weight always lands in the body.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from mqtool.analysis import LayerInfo, ModelInfo
from mqtool.model import (
    Scope,
    all_graphs,
    constant_attr_value,
    find_scope,
    scoped_constants,
    scoped_graphs,
    tensor_value,
)
from mqtool.policy import Policy
from mqtool.weight_layers import RECURRENT_OPS
from passes.base import PassResult
from passes.cleanup import cleanup
from passes.gemm_to_matmul import gemm_to_matmul
from passes.graph import Namer, all_names, subgraph_inputs
from passes.insert_qdq import insert_qdq
from passes.pack_weights import pack_weights
from passes.qdq_plan import (
    ActivationPlan,
    ActQuant,
    Format,
    Storage,
    WeightStorage,
    plan_quantizers,
    plan_storage,
)
from passes.qparams import QuantParams

log = logging.getLogger(__name__)

MAIN: Scope = ()


@dataclass
class ModelPlan:
    """The activation plan of each graph that holds layers or is read by them, by scope (`()`: the main
    graph). Tensor names are unique across the model, so `merged()` is the plan of the whole model: what
    calibration measures and the simulation fake-quantizes."""

    scopes: dict[Scope, ActivationPlan] = field(default_factory=dict)

    def merged(self) -> ActivationPlan:
        out = ActivationPlan({})
        for plan in self.scopes.values():
            out.bits.update(plan.bits)
            out.carried.update(plan.carried)
            out.constants.extend(plan.constants)
        return out

    def scope_of(self, tensor: str) -> Scope | None:
        """The graph whose plan holds `tensor` (planned or carried), or None."""
        for scope, plan in self.scopes.items():
            if tensor in plan.bits or tensor in plan.carried:
                return scope
        return None

    def without(self, tensors: Iterable[str]) -> ModelPlan:
        """The plan with `tensors` left float (no calibration data reached them), with the tensors that
        carried their quantizers."""
        drop = set(tensors)
        out = {}
        for scope, plan in self.scopes.items():
            bits = {t: b for t, b in plan.bits.items() if t not in drop}
            carried = {t: s for t, s in plan.carried.items() if s in bits}
            out[scope] = ActivationPlan(bits, carried, list(plan.constants))
        return ModelPlan(out)


def has_subgraph_layers(info: ModelInfo) -> bool:
    return any(getattr(layer, "subgraph", None) for layer in info.layers)


def layer_scope(layer: LayerInfo) -> Scope:
    return tuple(tuple(step) for step in (getattr(layer, "subgraph", None) or []))


def plan_model(model: onnx.ModelProto, info: ModelInfo, policy: Policy) -> ModelPlan:
    """The activation plan of every graph of `model` (`qdq_plan.plan_quantizers` on the main graph and on
    each body's view), with each layer's request for its input counted in the graph that defines it."""
    if not has_subgraph_layers(info):
        return ModelPlan({MAIN: plan_quantizers(model, info, policy)})
    scoped = scoped_graphs(model.graph)
    defined = {sg.scope: _defined(sg.graph) for sg in scoped}
    voters: dict[Scope, list[LayerInfo]] = {}
    for layer in info.layers:
        home = _defining_scope(layer.input, layer_scope(layer), defined)
        voters.setdefault(home, []).append(replace(layer, subgraph=[]))
    plans = {}
    plain = _plain_constants(model)
    for sg in scoped:
        layers = voters.get(sg.scope, [])
        own = [x for x in info.layers if layer_scope(x) == sg.scope]
        if not layers and not own:
            continue
        sub = _info(info, layers)
        if sg.scope == MAIN:
            plans[MAIN] = plan_quantizers(model, sub, policy)
        else:
            view = _view(model, sg.graph, sg.scope, plain)
            plans[sg.scope] = plan_quantizers(view.model, sub, policy)
    return ModelPlan(plans)


def plan_model_storage(
    model: onnx.ModelProto,
    info: ModelInfo,
    policy: Policy,
    activations: Mapping[str, int] | Iterable[str],
    storage: Storage | str = Storage.AUTO,
) -> dict[str, WeightStorage]:
    """`qdq_plan.plan_storage` for the layers of every graph (layer name -> storage); `activations` holds
    every quantized tensor of the model (`ModelPlan.merged().all_bits()`)."""
    acts = set(activations)
    main = [x for x in info.layers if not layer_scope(x)]
    out = plan_storage(model, _info(info, main), policy, acts, storage)
    if not has_subgraph_layers(info):
        return out
    plain = _plain_constants(model)
    for scope, layers in _body_layers(info).items():
        view = _view(model, find_scope(model.graph, scope), scope, plain)
        flat = [replace(x, subgraph=[]) for x in layers]  # the view is a main graph to plan_storage
        out.update(plan_storage(view.model, _info(info, flat), policy, acts, storage))
    return out


def insert_subgraph_qdq(
    model: onnx.ModelProto,
    policy: Policy,
    plan: ModelPlan,
    activations: Mapping[str, ActQuant],
    qparams: QuantParams | None = None,
    info: ModelInfo | None = None,
    layout: Mapping[str, WeightStorage] | None = None,
) -> PassResult:
    """Quantize the layers inside If/Loop/Scan bodies and insert each body's planned activation Q/DQ (in
    place); then, per body, what the main pipeline does after `insert_qdq`: Gemm -> MatMul for `nbits`
    weights, packed containers, dead nodes and constants removed. `activations` has the parameters of every
    planned tensor of the model; `layout` is `plan_model_storage`'s. The main graph is `insert_qdq`'s."""
    if info is None or not has_subgraph_layers(info):
        return PassResult(model, False)
    layout = layout or {}
    consts = scoped_constants(model)
    modified = False
    bodies = _body_layers(info)
    planned = [s for s, p in plan.scopes.items() if s and (p.bits or p.constants)]
    for scope in sorted(set(bodies) | set(planned), key=len):
        layers = bodies.get(scope, [])
        body = find_scope(model.graph, scope)
        taken = _model_names(model)
        view = _view(model, body, scope, consts, layers=layers, taken=taken)
        sub = plan.scopes.get(scope, ActivationPlan({}))
        acts = {t: activations[t] for t in sub.bits}
        sub_layout = {x.name: layout[x.name] for x in layers if x.name in layout}
        vinfo = _info(info, [replace(x, subgraph=[], **view.renamed.get(x.name, {})) for x in layers])
        vm = view.model
        insert_qdq(vm, policy, acts, qparams, vinfo, sub.carried, sub.constants, sub_layout, taken=taken)
        gemm_to_matmul(vm, layers=[k for k, w in sub_layout.items() if w.as_matmul])
        containers = {
            k: w.container
            for k, w in sub_layout.items()
            if not (w.format is Format.NBITS and info.layer(k).op_type == "Gather")
        }
        pack_weights(vm, containers)
        view.restore_outputs()
        cleanup(vm, keep_value_info=False)
        view.write_back(body)
        for imp in vm.opset_import:
            if imp.domain not in {o.domain for o in model.opset_import}:
                model.opset_import.append(imp)
        modified = True
        log.info("quantized %d layers inside %s", len(layers), "/".join(f"{n}.{a}" for n, a in scope))
    return PassResult(model, modified)


# ------------------------------------------------------------------------------------------ views


@dataclass
class _View:
    model: onnx.ModelProto
    body_inputs: list[onnx.ValueInfoProto]
    body_outputs: list[onnx.ValueInfoProto]
    mirrors: set[str]
    # layer -> {"weight" / "bias": the fresh initializer it now reads} (weights folded from constants)
    renamed: dict[str, dict[str, str]] = field(default_factory=dict)

    def restore_outputs(self) -> None:
        g = self.model.graph
        del g.output[:]
        g.output.extend(self.body_outputs)

    def write_back(self, body: onnx.GraphProto) -> None:
        """The view's nodes and own initializers become the body's; mirrored outer constants are dropped
        (the body reads them from where they are)."""
        g = self.model.graph
        del body.node[:]
        body.node.extend(g.node)
        del body.initializer[:]
        body.initializer.extend(i for i in g.initializer if i.name not in self.mirrors)
        del body.value_info[:]
        del body.output[:]
        body.output.extend(g.output)


def _view(
    model: onnx.ModelProto,
    body: onnx.GraphProto,
    scope: Scope,
    consts: Mapping[Scope, Mapping[str, np.ndarray]],
    *,
    layers: list[LayerInfo] = (),
    taken: set[str] | None = None,
) -> _View:
    """A model holding a copy of `body` (module docstring). With `layers`, their weights (and R, and a
    constant bias) become initializers of the view: a body `Constant` node is turned into one, a folded
    value gets one of a fresh name (the layer reads it)."""
    g = onnx.GraphProto()
    g.CopyFrom(body)
    g.name = "view"
    outer = consts.get(scope[:-1], {}) if scope else {}
    own = _defined(body)
    reads = [i for n in body.node for i in n.input if i]
    reads += sorted(subgraph_inputs(body))
    reads += [o.name for o in body.output]
    mirrors, inputs = set(), []
    for name in dict.fromkeys(reads):
        if name in own:
            continue
        if name in outer:
            g.initializer.append(numpy_helper.from_array(np.asarray(outer[name]), name))
            mirrors.add(name)
        else:
            inputs.append(onnx.helper.make_empty_tensor_value_info(name))
    body_inputs = list(body.input)
    body_outputs = list(body.output)
    g.input.extend(inputs)
    # Listed as outputs, outer values are never quantized by this graph's plan (qdq_plan blocks outputs).
    g.output.extend(onnx.helper.make_empty_tensor_value_info(v.name) for v in inputs)
    renamed = {}
    if layers:
        renamed = _materialise_weights(
            g, layers, consts.get(scope, {}), mirrors, taken if taken is not None else set()
        )
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.graph.CopyFrom(g)
    return _View(m, body_inputs, body_outputs, mirrors, renamed)


def _materialise_weights(g, layers, values, mirrors: set[str], taken: set[str]) -> dict[str, dict[str, str]]:
    inits = {i.name for i in g.initializer}
    const_nodes = {n.output[0]: k for k, n in enumerate(g.node) if n.op_type == "Constant" and n.output}
    nodes = {n.name: n for n in g.node}
    namer = Namer(g)
    namer.taken.update(taken)
    drop = []
    renamed: dict[str, dict[str, str]] = {}
    for layer in layers:
        node = nodes.get(layer.name)
        if node is None:
            continue
        slots = [layer.weight_input]
        if layer.op_type in RECURRENT_OPS:
            slots.append(2)
        if layer.bias is not None and layer.op_type not in RECURRENT_OPS and len(node.input) > 2:
            slots.append(2)
        for k in slots:
            name = node.input[k] if k < len(node.input) else ""
            if not name or name in inits or name not in values:
                continue
            if name in const_nodes:
                drop.append(const_nodes.pop(name))
                g.initializer.append(numpy_helper.from_array(np.asarray(values[name]), name))
            else:  # folded from constants in this body: the layer reads its own copy
                fresh = namer(name)
                g.initializer.append(numpy_helper.from_array(np.asarray(values[name]), fresh))
                node.input[k] = fresh
                if name == layer.weight and k == layer.weight_input:
                    renamed.setdefault(layer.name, {})["weight"] = fresh
                elif name == layer.bias:
                    renamed.setdefault(layer.name, {})["bias"] = fresh
                name = fresh
            inits.add(name)
            mirrors.discard(name)
    for k in sorted(set(drop), reverse=True):
        del g.node[k]
    return renamed


def _plain_constants(model: onnx.ModelProto) -> dict[Scope, dict[str, np.ndarray]]:
    """Per scope, the initializers and `Constant` outputs it can read (its own and its enclosing graphs'),
    without folding: what planning needs (`scoped_constants` folds, which only emission pays for)."""
    out: dict[Scope, dict[str, np.ndarray]] = {}
    for sg in scoped_graphs(model.graph):
        values = dict(out[sg.scope[:-1]]) if sg.scope else {}
        for vi in sg.graph.input:
            values.pop(vi.name, None)
        for init in sg.graph.initializer:
            values[init.name] = tensor_value(init)
        for n in sg.graph.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                values[n.output[0]] = constant_attr_value(n)
        out[sg.scope] = values
    return out


# ------------------------------------------------------------------------------------------ helpers


def _defined(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines: its inputs, initializers and node outputs."""
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    names |= {o for n in graph.node for o in n.output if o}
    return names


def _defining_scope(tensor: str, scope: Scope, defined: Mapping[Scope, set[str]]) -> Scope:
    """The innermost graph, from `scope` outwards, that defines `tensor` (the main graph if none does)."""
    while scope and tensor not in defined.get(scope, set()):
        scope = scope[:-1]
    return scope


def _body_layers(info: ModelInfo) -> dict[Scope, list[LayerInfo]]:
    """Layers by the body they live in, outer bodies first (scoped_graphs order is depth first)."""
    out: dict[Scope, list[LayerInfo]] = {}
    for layer in info.layers:
        scope = layer_scope(layer)
        if scope:
            out.setdefault(scope, []).append(layer)
    return dict(sorted(out.items(), key=lambda kv: len(kv[0])))


def _info(info: ModelInfo, layers: list[LayerInfo]) -> ModelInfo:
    return replace(info, layers=list(layers))


def _model_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name in every graph of the model."""
    names: set[str] = set()
    for g in all_graphs(model.graph):
        names |= all_names(g)
    return names


__all__ = [
    "ModelPlan",
    "has_subgraph_layers",
    "insert_subgraph_qdq",
    "plan_model",
    "plan_model_storage",
]
