"""Converting an ONNX graph into an `nn.Module` that executes it node by node.

`to_torch(model)` folds every constant (initializers, `Constant` nodes, constant subgraphs via
`mqtool.model.constant_values`) into buffers, turns each quantizable layer found by `mqtool.analysis`
into a `QuantLayer` submodule, and builds every other live node from the op registry (`ops.py`) once.
A forward pass then is a flat loop over precomputed steps `(function, input slots, output slots)` over a
list of tensors: no dict copies, no attribute parsing, and each intermediate tensor is dropped after its
last use. Shapes are never taken from the ONNX file: the graph runs with the shapes of the real inputs,
so any batch size works.
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
from mqtool.backend.ops import REGISTRY, Node
from mqtool.errors import InputError
from mqtool.model import constant_values, node_names

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
        self._slot: dict[str, int] = {}
        self._n_slots = 1
        self._const_slots: list[tuple[int, str]] = []
        self._input_slots: list[int] = []
        self._output_slots: list[int] = []
        # (callable, input slots, output slots, single output?, slots to free afterwards)
        self._steps: list[tuple[Any, tuple[int, ...], tuple[int, ...], bool, tuple[int, ...]]] = []
        self._producer: dict[int, int] = {}
        self._qkeys: dict[str, str] = {}
        self._plan: list = []
        self._plan_stale = True
        self._post: dict[int, nn.Module] = {}
        self._relu_steps: set[int] = set()

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
        intermediate activations this way.
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
        return {n: got[n] for n in names}

    def _execute(self, inputs: Sequence[Tensor], capture: dict[int, str] | None) -> Any:
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
        for fn, ins, outs, single, free, quant in self._plan:
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
            for slot in free:
                env[slot] = None
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
        self._plan = [
            (
                _relu_into(self._post[outs[0]]) if i in self._relu_steps and outs[0] in self._post else fn,
                ins,
                outs,
                single,
                free,
                tuple(s for s in outs if s in self._post),
            )
            for i, (fn, ins, outs, single, free) in enumerate(self._steps)
        ]
        self._plan_stale = False


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

    `info` (default `analyze(model)`) selects the quantizable layers. Raises one `InputError` (naming
    `source`) listing every op type the backend cannot run, and one listing every node whose attributes
    it does not support. `channels_last` feeds every 2-D convolution NHWC input: oneDNN's CPU convolutions
    (depthwise and pointwise above all) run several times faster on it, and the output stays NHWC, so
    only the first convolution after a layout change pays for a copy.
    """
    graph = model.graph
    opset = _opset(model)
    names = node_names(graph)
    consts = constant_values(model)
    if info is None:
        info = analyze(model, allow_quantized=True)  # the backend runs QDQ graphs too
    layer_by_name = {layer.name: layer for layer in info.layers}
    unknown = sorted(set(layer_by_name) - set(names))
    if unknown:
        raise InputError(f"{source}: layers not in the model: {', '.join(unknown[:5])}")

    live = [
        (node, name)
        for node, name in zip(graph.node, names)
        if not all(o in consts for o in node.output if o)
    ]
    unsupported: dict[str, list[str]] = {}
    for node, name in live:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in REGISTRY:
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
    init_names = {i.name for i in graph.initializer}
    m.input_names = [i.name for i in graph.input if i.name not in init_names and i.name not in consts]
    m.output_names = [o.name for o in graph.output]

    def slot(name: str) -> int:
        if not name:
            return _NONE
        if name not in m._slot:
            m._slot[name] = m._n_slots
            m._n_slots += 1
        return m._slot[name]

    def scratch() -> int:
        # An omitted output ("", e.g. an LSTM's Y) gets a slot of its own: slot 0 must stay None.
        m._n_slots += 1
        return m._n_slots - 1

    for name in m.input_names:
        m._input_slots.append(slot(name))

    # Constants read at run time: by live nodes (except the weight/bias a QuantLayer owns) or as outputs.
    needed: set[str] = {o for o in m.output_names if o in consts}
    errors: list[str] = []
    steps = []
    for node, name in live:
        ctx = Node(node, name, opset, consts)
        try:
            fn = REGISTRY[node.op_type](ctx)
        except InputError as e:
            errors.append(str(e))
            continue
        if channels_last and node.op_type == "Conv":
            fn = _channels_last_input(fn)
        inputs = list(node.input)
        layer = layer_by_name.get(name)
        if (
            layer is not None
            and consts.get(layer.weight) is not None
            and consts[layer.weight].dtype.kind == "f"
        ):
            wpos = layer.weight_input
            bpos = 2 if node.op_type != "MatMul" and len(inputs) > 2 and inputs[2] in consts else None
            module = QuantLayer(
                layer, fn, consts[inputs[wpos]], consts[inputs[bpos]] if bpos else None, wpos, bpos
            )
            m.qlayers[_safe_key(name, m.qlayers)] = module
            m.layers[name] = module
            runtime = [t for i, t in enumerate(inputs) if i not in (wpos, bpos)]
            fn = module
        else:
            runtime = inputs
        needed.update(t for t in runtime if t in consts)
        ins = tuple(slot(t) for t in runtime)
        outs = tuple(slot(t) if t else scratch() for t in node.output)
        steps.append((fn, ins, outs, len(outs) == 1))
        if node.op_type == "Relu":
            m._relu_steps.add(len(steps) - 1)
    if errors:
        raise InputError(f"{source}: unsupported attributes for the PyTorch backend: {'; '.join(errors)}")

    for name in sorted(needed, key=lambda n: slot(n)):
        value = consts[name]
        if value.dtype.kind not in "fiub":
            raise InputError(f"{source}: constant '{name}' of type {value.dtype} is not supported")
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        key = _safe_key(name, m.constants)
        m.constants.register_buffer(key, torch.from_numpy(np.array(value)))
        m._const_slots.append((slot(name), key))

    m._output_slots = [slot(o) for o in m.output_names]
    m._producer = {s: i for i, (_, _, outs, _) in enumerate(steps) for s in outs}
    # Drop each intermediate after its last reader, so inference memory stays at the live set.
    keep = set(m._output_slots) | {s for s, _ in m._const_slots} | {_NONE}
    last: dict[int, int] = {}
    for i, (_, ins, _, _) in enumerate(steps):
        for s in ins:
            last[s] = i
    for i, (_, _, outs, _) in enumerate(steps):
        for s in outs:
            last.setdefault(s, i)  # outputs nobody reads (a Dropout mask) go right away
    free_at: dict[int, list[int]] = {}
    for s, i in last.items():
        if s not in keep:
            free_at.setdefault(i, []).append(s)
    m._steps = [
        (fn, ins, outs, single, tuple(free_at.get(i, ()))) for i, (fn, ins, outs, single) in enumerate(steps)
    ]
    m._rebuild_plan()
    return m
