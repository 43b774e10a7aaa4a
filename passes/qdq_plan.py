"""Decisions, made before any rewriting: which tensors get Q/DQ with how many bits, how each weight is
stored, and how biases are quantized. Pure functions of (model, analysis, policy); the PyTorch simulation
calls the same functions, so emission and simulation quantize exactly the same tensors.

Activation rules (`plan_activations`), every one measured on ONNX Runtime 1.32 (docs/passes.md):

1. Inputs. A quantizable layer with weight_bits < 32 asks for its input tensor at its act_bits; a float
   layer (weight_bits 32) or a weight-only one (act_bits 32) asks for float. A tensor gets one Q/DQ pair at
   the *widest* width its layer readers ask for, and none when any of them asks for float: no layer ever
   reads a coarser input than its policy says. Non-layer readers (Add, Shape, graph outputs) do not vote.
2. Outputs. ORT fuses a Conv into QLinearConv only when its output is quantized too, so a Conv whose input
   is quantized also gets Q/DQ (8 bits, unless a layer reading it asks otherwise) on its output - after a
   following Relu/Clip when that is the output's only reader, because ORT removes a Relu/Clip in front of a
   QuantizeLinear whose range already clips. Gemm (int32 bias) fuses into QGemm with a float output and
   MatMul into MatMulIntegerToFloat, so they get no output Q/DQ, except a 2-D MatMul whose only reader is
   a bias Add: ORT first merges MatMul + Add into a float-bias Gemm that it then cannot fuse, so the Q/DQ
   goes after the Add (and a following Relu/Clip), which makes it a QGemm. ConvTranspose has no integer
   kernel on the CPU provider: no output Q/DQ. An output is not quantized when a float layer reads it.
3. Every reader of a quantized tensor reads the DequantizeLinear output, including graph outputs and float
   ops: one Q/DQ pair per tensor, and the simulation rule is simply "replace tensor t by fake_quant(t)".

4. Integer regions (what ORT's own quantizer gets, measured on the zoo: bench/bench_int_path.py). Between
   layers, ORT runs on uint8 the ops of `QLINEAR_OPS` whose float inputs all come from a DequantizeLinear
   and whose output goes to a QuantizeLinear, and drops DQ -> op -> Q around the value-selecting ops of
   `CARRY_OPS` when both sides share scale and zero point. So, walking the graph in order: (a) the output
   of a QLinear op whose inputs are quantized is quantized too (8 bits, after a Relu/Clip that is its only
   reader); a single-valued constant input (the 3 of a hard-swish) is stored as uint8 at exactly one level,
   and a Div by one runs as a Mul by its inverse; (b) the output of a value-selecting op whose input is
   quantized repeats that input's quantizer (`ActivationPlan.carried`: no value changes, so the simulation
   needs nothing); (c) a float input of a QLinear op read next to a quantized one is quantized too, so the
   op can run on integers (one QuantizeLinear instead of a DequantizeLinear). Graph outputs and tensors a
   float layer reads stay float. Softmax is left out (8 uniform bits of probabilities).

A k < 8-bit activation lives in uint8 with `numerics.activation_qparams(lo, hi, k)`; emission puts a Clip to
the k-bit range before its QuantizeLinear so values saturate at 2^k - 1 exactly as `numerics.quantize` does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import onnx
from onnx import numpy_helper

from mqtool.analysis import LayerInfo, ModelInfo
from mqtool.errors import InputError
from mqtool.model import infer_shapes
from mqtool.numerics import MIN_SCALE, quantize
from mqtool.policy import FLOAT, Format, Policy
from mqtool.weight_layers import RECURRENT_OPS, WEIGHT_ONLY_OPS
from mqtool.weight_layout import gather_block  # noqa: F401  (re-exported: the passes' name for it)
from passes.graph import attr, consumers, initializers
from passes.upgrade_opset import INT2_OPSET, QDQ_OPSET

OUTPUT_BITS = 8
# Ops the CPU provider runs on uint8 when every float input comes from a DequantizeLinear and the output
# goes to a QuantizeLinear (onnxruntime's qdq_selector_action_transformer.cc): QLinearSigmoid, ... .
# Softmax is left out: 8 uniform bits of probabilities lose the small ones.
QLINEAR_UNARY = frozenset({"Sigmoid", "GlobalAveragePool", "AveragePool", "LeakyRelu"})
QLINEAR_BINARY = frozenset({"Add", "Mul"})
QLINEAR_OPS = QLINEAR_UNARY | QLINEAR_BINARY | {"Concat", "Div"}
# Ops that only move or select values of their first input; ORT drops DQ -> op -> Q around them when both
# sides share scale and zero point. Resize only in nearest mode (otherwise it interpolates).
CARRY_OPS = frozenset(
    {
        "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Expand", "Tile", "Gather",
        "GatherElements", "MaxPool", "Resize", "Split", "Identity", "ReduceMax", "ReduceMin",
    }
)  # fmt: skip
_MAX_CONSTANT_ELEMENTS = 4096
MS_DOMAIN = "com.microsoft"
# Bias integers stay within +-2^30: exactly representable in float32, far from int32 overflow.
BIAS_LIMIT = 2**30
_ACTIVATIONS = ("Relu", "Clip")


class Storage(StrEnum):
    """How the layers the policy gives no format are stored (see `plan_storage`)."""

    AUTO = "auto"
    INT8 = "int8"
    PACKED = "packed"


class Container(StrEnum):
    """The ONNX integer type a quantized weight is stored in.

    UINT8 (8-bit weights as q + 128, zero point 128) is no longer emitted - ORT's u8u8 kernels ran 1.6-11x
    slower than u8s8 (bench/bench_int_path.py) - but `pack_weights` and `report` still handle it.
    """

    INT8 = "int8"
    UINT8 = "uint8"
    INT4 = "int4"
    INT2 = "int2"

    @property
    def bits(self) -> int:
        return {"int8": 8, "uint8": 8, "int4": 4, "int2": 2}[self.value]


@dataclass(frozen=True)
class WeightStorage:
    """How one layer's weight is emitted: its format, container, the bits of the stored integers (7 for an
    8-bit layer on integer kernels, `stored_weight_bits`), block size (0: per output channel) and whether
    its Gemm is emitted as MatMul + Add (for MatMulNBits)."""

    container: Container
    as_matmul: bool = False
    format: Format = Format.INT8
    bits: int = 8
    block_size: int = 0


@dataclass(frozen=True)
class ActQuant:
    """A planned activation quantizer: k bits, uint8 storage, per-tensor scale and zero point."""

    bits: int
    scale: float
    zero_point: int


def layer_act_request(policy: Policy, layer: LayerInfo) -> int:
    """The input width `layer` asks for: its act_bits, or 32 when it is float or weight-only (an
    embedding's input is its indices; LSTM/GRU/RNN have no integer kernel)."""
    b = policy.get(layer.name)
    return FLOAT if b.weight_bits == FLOAT or layer.op_type in WEIGHT_ONLY_OPS else b.act_bits


def plan_activations(model: onnx.ModelProto, info: ModelInfo, policy: Policy) -> dict[str, int]:
    """Tensor name -> activation bits, for every tensor that gets its own Q/DQ pair (rules in the module doc).

    This is what the simulation fake-quantizes. Emission also repeats a planned quantizer on the outputs of
    value-selecting ops (`ActivationPlan.carried`), which changes no value. Deterministic: layer inputs in
    layer order first, then the other tensors in graph order.
    """
    return plan_quantizers(model, info, policy).bits


@dataclass
class ActivationPlan:
    """Every activation Q/DQ emission inserts.

    bits: tensors with their own quantizer (calibrated, simulated). carried: tensor -> the planned tensor
    whose quantizer it repeats, on the output of a value-selecting op (Reshape, MaxPool, ...) whose input is
    quantized: max/reshape/slice of values on a grid are on that grid, so the extra pair changes nothing,
    and ORT drops DQ -> op -> Q with equal parameters (the op runs on uint8). constants: (node name, input
    index) of single-valued float constants that a binary op (Add/Mul) reads next to a quantized tensor,
    stored as uint8 at the one level that represents them (q = 0 or 255) so ORT can run QLinearAdd/Mul; a
    Div by such a constant c is emitted as a Mul by 1 / c (within a float rounding of x / c).
    """

    bits: dict[str, int]
    carried: dict[str, str] = field(default_factory=dict)
    constants: list[tuple[str, int]] = field(default_factory=list)

    def source(self, tensor: str) -> str:
        """The planned tensor whose quantizer `tensor` uses (itself when planned)."""
        return self.carried.get(tensor, tensor)

    def all_bits(self) -> dict[str, int]:
        """Every tensor that carries a Q/DQ pair, carried ones included, with its bits."""
        return {**self.bits, **{t: self.bits[s] for t, s in self.carried.items()}}


def plan_quantizers(model: onnx.ModelProto, info: ModelInfo, policy: Policy) -> ActivationPlan:
    """The activation plan: layer inputs and fusion outputs (rules 1-2), then the integer regions ORT can
    run between layers (rule 4 of the module doc), to a fixed point."""
    votes: dict[str, list[int]] = defaultdict(list)
    main = main_graph_layers(info)
    for layer in main:
        votes[layer.input].append(layer_act_request(policy, layer))
    plan = {t: max(v) for t, v in votes.items() if FLOAT not in v}
    g = model.graph
    cons, consts = consumers(g), _constant_names(model)
    values = _constant_arrays(model)
    blocked = {t for t, v in votes.items() if FLOAT in v} | {o.name for o in g.output}
    layers = {layer.name: layer for layer in main}
    carried: dict[str, str] = {}
    constants: dict[tuple[str, int], None] = {}
    shapes: dict[str, list[int | None]] | None = None
    for _ in range(8):  # a completed input (rule 4c) can open a region upstream: iterate to a fixed point
        changed = False

        def quantized(t: str) -> bool:
            return t in plan or t in carried

        def bits_of(t: str) -> int:
            return plan[_root(t, carried)]

        for node in g.node:
            layer = layers.get(node.name)
            if layer is not None:
                if policy.get(layer.name).weight_bits == FLOAT or not quantized(layer.input):
                    continue  # a layer with a float input runs unfused anyway: no output Q/DQ for it
                if layer.op_type == "MatMul" and shapes is None and _bias_add(layer.output, cons, consts):
                    shapes = infer_shapes(model)
                t = fusion_output(model, layer, cons, consts, shapes or {})
                if t is None or quantized(t) or FLOAT in votes.get(t, []):
                    continue
                plan[t] = OUTPUT_BITS
                changed = True
                continue
            if node.domain not in ("", "ai.onnx"):
                continue
            op = node.op_type
            if op in CARRY_OPS and _carries(node, values) and quantized(node.input[0]):
                src = _root(node.input[0], carried)
                for t in node.output:
                    if not t or t in carried or t in blocked:
                        continue
                    if t in plan and plan[t] != bits_of(src):
                        continue  # a reader asks for other bits: its own quantizer
                    plan.pop(t, None)
                    carried[t] = src
                    changed = True
            elif op in QLINEAR_OPS:
                changed |= _integer_op(node, plan, quantized, blocked, values, cons, consts, constants)
        if not changed:
            break
    return ActivationPlan(plan, {t: _root(t, carried) for t in carried}, list(constants))


def _root(t: str, carried: dict[str, str]) -> str:
    seen = set()
    while t in carried and t not in seen:
        seen.add(t)
        t = carried[t]
    return t


def main_graph_layers(info: ModelInfo) -> list[LayerInfo]:
    """The layers of the main graph. Layers inside If/Loop/Scan bodies (`LayerInfo.subgraph`) are not
    emitted yet: planning them would put Q/DQ on tensors the main graph does not have."""
    return [layer for layer in info.layers if not getattr(layer, "subgraph", None)]


def _integer_op(node, plan, quantized, blocked, values, cons, consts, constants) -> bool:
    """Plan the output (and, rule 4c, the float inputs) of an op ORT has an integer kernel for; whether
    the plan changed."""
    data = [(k, t) for k, t in enumerate(node.input) if t]
    if node.op_type in QLINEAR_UNARY:
        data = data[:1]
    if node.op_type == "Div":
        # x / c with a single-valued constant c is emitted as x * (1 / c): QLinearMul (ORT has no
        # integer Div; hard-swish often ends with one).
        c = values.get(data[1][1]) if len(data) == 2 else None
        if not _single_valued(c) or c.reshape(-1)[0] == 0:
            return False
    if not data or not any(quantized(t) for _, t in data):
        return False
    out = _through_activation(node.output[0], cons, consts)
    const_inputs = [(k, t) for k, t in data if not quantized(t) and _single_valued(values.get(t))]
    if node.op_type not in QLINEAR_BINARY | {"Div"}:
        const_inputs = []
    floats = [t for k, t in data if not quantized(t) and (k, t) not in const_inputs]
    if out in blocked or any(t in blocked or t in consts for t in floats):
        return False  # the output must stay float (or a non-uniform constant): ORT cannot fuse the op
    changed = False
    for t in floats:
        # Rule 4c: a float tensor read next to a quantized one is quantized too (one QuantizeLinear instead
        # of a DequantizeLinear), so that ORT runs the op on integers, as its own quantizer does.
        plan[t] = OUTPUT_BITS
        changed = True
    for k, _ in const_inputs:
        if (node.name, k) not in constants:
            constants[(node.name, k)] = None
            changed = True
    if out not in plan and out not in blocked and not quantized(out):
        plan[out] = OUTPUT_BITS
        changed = True
    return changed


def _carries(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> bool:
    """Whether the op only moves or selects values of its first input (so they stay on its grid)."""
    if node.op_type == "MaxPool":
        return len([o for o in node.output if o]) == 1  # no Indices output
    if node.op_type == "Resize":
        return attr(node, "mode", b"nearest") in (b"nearest", "nearest")
    return True


def _single_valued(v: np.ndarray | None) -> bool:
    """A float constant whose elements are all one finite value: exactly one uint8 level."""
    if v is None or v.dtype.kind != "f" or v.size == 0 or v.size > _MAX_CONSTANT_ELEMENTS:
        return False
    flat = v.reshape(-1)
    return bool(np.isfinite(flat[0]) and np.all(flat == flat[0]))


def _constant_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    g = model.graph
    out = {
        i.name: numpy_helper.to_array(i) for i in g.initializer if math.prod(i.dims) <= _MAX_CONSTANT_ELEMENTS
    }
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def fusion_output(
    model: onnx.ModelProto,
    layer: LayerInfo,
    cons: dict[str, list[onnx.NodeProto]] | None = None,
    consts: set[str] | None = None,
    shapes: dict[str, list[int | None]] | None = None,
) -> str | None:
    """The tensor after `layer` that needs Q/DQ for ORT to fuse it into an integer kernel, or None."""
    cons = consumers(model.graph) if cons is None else cons
    consts = _constant_names(model) if consts is None else consts
    if layer.op_type == "Conv":
        return _through_activation(layer.output, cons, consts)
    if layer.op_type == "MatMul" and layer.weight_input == 1:
        add = _bias_add(layer.output, cons, consts)
        if add is None:
            return None
        rank = len((shapes or {}).get(layer.input) or [])
        if rank not in (0, 2):  # 3-D and up: MatMulIntegerToFloat + Add, no fusion into a Gemm to prevent
            return None
        return _through_activation(add.output[0], cons, consts)
    return None


def _through_activation(t: str, cons, consts: set[str]) -> str:
    readers = cons.get(t, [])
    if len(readers) == 1 and readers[0].op_type in _ACTIVATIONS and readers[0].domain in ("", "ai.onnx"):
        node = readers[0]
        if node.input[0] == t and all(i in consts for i in node.input[1:] if i):
            return node.output[0]
    return t


def _bias_add(t: str, cons, consts: set[str]) -> onnx.NodeProto | None:
    readers = cons.get(t, [])
    if len(readers) == 1 and readers[0].op_type == "Add" and readers[0].domain in ("", "ai.onnx"):
        a, b = readers[0].input[:2]
        if (a == t and b in consts) or (b == t and a in consts):
            return readers[0]
    return None


def _constant_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {i.name for i in g.initializer}
    names.update(n.output[0] for n in g.node if n.op_type == "Constant")
    return names


def plan_storage(
    model: onnx.ModelProto,
    info: ModelInfo,
    policy: Policy,
    activations: Mapping[str, int] | Iterable[str],
    storage: Storage | str = Storage.AUTO,
) -> dict[str, WeightStorage]:
    """Layer name -> weight storage, for every quantized layer (float layers are absent).

    A layer's format is the policy's; a layer without one gets it from `storage`: int8 -> `int8`, packed ->
    `packed`, auto -> what ORT 1.32 runs fastest (docs/passes.md): `int8` when its input is quantized
    (integer kernels), `nbits` for a weight-only MatMul (and a Gemm rewritten as MatMul + Add) with INT4
    containers up to 4 bits (faster than INT2 at the examples' sizes), `int8` otherwise. Containers: int8
    INT8; packed the smallest (INT2 only for weight-only 2-bit layers: INT2 next to activation Q/DQ fails
    ORT session creation); nbits INT2 / INT4 / INT8 by bits. `activations` holds every quantized tensor
    (`ActivationPlan.all_bits()`). Raises `InputError` for a format the layer cannot take
    (`allowed_formats`).
    """
    storage = Storage(storage)
    quantized = set(activations)
    g = model.graph
    nodes = {n.name: n for n in g.node}
    out: dict[str, WeightStorage] = {}
    for layer in main_graph_layers(info):
        b = policy.get(layer.name)
        if b.weight_bits == FLOAT:
            continue
        node = nodes.get(layer.name)
        act_quantized = layer.input in quantized and layer.op_type not in WEIGHT_ONLY_OPS
        fmt = b.format
        container = None
        allowed = allowed_formats(layer, node, g)
        if fmt is None:
            if storage is Storage.INT8:
                fmt = Format.INT8
            elif storage is Storage.PACKED:
                fmt = Format.PACKED
            elif act_quantized or Format.NBITS not in allowed:
                fmt = Format.INT8
            else:
                fmt = Format.NBITS
                if layer.op_type != "Gather":
                    container = Container.INT4 if b.weight_bits <= 4 else Container.INT8
        if fmt not in allowed:
            raise InputError(
                f"layer '{layer.name}' ({layer.op_type}): format '{fmt.value}' is not available "
                f"(allowed: {', '.join(f.value for f in allowed)})"
            )
        if fmt is Format.DYNAMIC:
            act_quantized = True  # the kernel quantizes its input: u8 x s8 products, as an int8 layer's
        if container is None:
            container = format_container(layer, b.weight_bits, fmt, act_quantized)
        block = b.block_size
        if fmt is Format.NBITS and layer.op_type == "Gather" and not block:
            block = gather_block(layer)
        out[layer.name] = WeightStorage(
            container,
            as_matmul=fmt is Format.NBITS and layer.op_type == "Gemm",
            format=fmt,
            bits=stored_weight_bits(b.weight_bits, container, act_quantized),
            block_size=block,
        )
    return out


def stored_weight_bits(bits: int, container: Container, act_quantized: bool) -> int:
    """The bits of the integers emission stores for a `bits`-bit weight: 7 for an 8-bit weight in an INT8
    container next to a quantized input (ORT's integer kernels; "reduce range"), `bits` otherwise.

    x86 CPUs without VNNI compute u8 x s8 products in int16 pairs with saturation (vpmaddubsw):
    2 * 255 * 128 > 2^15, so full-range INT8 weights can saturate, while |q| <= 64 cannot. UINT8 weights
    (q + 128) avoid that on ORT's u8u8 kernels, which ran 1.6-11x slower than u8s8 on an AVX512-VNNI CPU,
    and INT8 full range is exact only on VNNI CPUs; 7 bits is safe and fast on both and lost no accuracy on
    the examples (bench/bench_int_path.py, docs/passes.md). The simulation must quantize such a layer at
    these bits too.
    """
    return 7 if bits == 8 and container is Container.INT8 and act_quantized else bits


def format_container(layer: LayerInfo, bits: int, fmt: Format, act_quantized: bool) -> Container:
    """The container of a `bits`-bit weight in format `fmt` (see `plan_storage`)."""
    if fmt in (Format.INT8, Format.DYNAMIC):
        return Container.INT8
    if fmt is Format.NBITS and layer.op_type == "Gather":
        return Container.INT4 if bits <= 4 else Container.UINT8  # GatherBlockQuantized: int4 or uint8
    if layer.op_type in RECURRENT_OPS or layer.op_type == "Gather":
        return Container.INT4 if bits <= 4 else Container.INT8  # ORT cannot run INT2 there
    # ORT 1.32 fuses DQ(INT2) + MatMul into MatMulNBits and computes garbage (nondeterministically) unless
    # N % 4 == 0: the rows of such a weight do not start on a byte (tests/test_bad_models.py).
    odd_matmul = (
        layer.op_type in ("MatMul", "Gemm")
        and len(layer.weight_shape) == 2
        and layer.weight_shape[layer.channel_axis] % 4 != 0
    )
    if bits == 2 and not act_quantized and not odd_matmul:
        return Container.INT2
    return Container.INT4 if bits <= 4 else Container.INT8


def allowed_formats(
    layer: LayerInfo, node: onnx.NodeProto | None = None, graph: onnx.GraphProto | None = None
) -> tuple[Format, ...]:
    """The formats layer `layer` can be emitted in, from its op and weight shape and what ORT 1.32 runs
    (pure; `node`/`graph` only refine the Gemm check). Every layer can stay `float` or be `packed`;
    `int8` is offered where ORT has an integer kernel (Conv, Gemm, MatMul; LSTM as
    com.microsoft.DynamicQuantizeLSTM, which quantizes its input and state itself) and for the weight-only
    embedding tables and GRU/RNN weights (INT8 containers: their DequantizeLinear is the fastest);
    `nbits` for `x @ W` with a 2-D W, a Gemm that is exactly MatMul + bias (`gemm_as_matmul_ok`, assumed
    when `node` is None), and an embedding table whose last axis is a multiple of 16
    (com.microsoft.GatherBlockQuantized); `dynamic` for the same MatMuls and Gemms
    (com.microsoft.DynamicQuantizeMatMul)."""
    out = [Format.FLOAT]
    if layer.op_type in ("Conv", "Gemm", "MatMul", "Gather", *RECURRENT_OPS):
        out.append(Format.INT8)
    out.append(Format.PACKED)
    if layer.op_type == "Gather" and gather_block(layer):
        out.append(Format.NBITS)
    matmul = layer.op_type == "MatMul" and layer.weight_input == 1 and len(layer.weight_shape) == 2
    gemm = layer.op_type == "Gemm" and (node is None or graph is None or gemm_as_matmul_ok(node, graph))
    if matmul or gemm:
        out += [Format.NBITS, Format.DYNAMIC]
    return tuple(out)


# Protobuf framing of one initializer (name, dims, type) and of a weight DequantizeLinear node (short names,
# axis attribute), measured on emitted models; the size estimate adds them per tensor / node.
_TENSOR_OVERHEAD = 16
_NODE_OVERHEAD = 64
# One activation Q/DQ pair (two nodes, scale and zero point), shared by every reader of the tensor: not part
# of `format_bytes`; what an `int8` layer's input (and fusion output) adds to the file.
ACT_QDQ_BYTES = 150


def format_bytes(layer: LayerInfo, bits: int, fmt: Format | str, block_size: int = 0) -> int:
    """Bytes layer `layer`'s weight takes in the emitted file at `bits` in format `fmt`: the integers in
    their container (sub-byte ones packed), the float32 scales (one per output channel, or per block of
    `block_size` along K) and zero points, the DequantizeLinear node, and the bias (float32); `float` is
    the float32 weight and bias. What a size budget sums; compare with `report`'s per-layer bytes.
    Identical zero points of layers with the same channel count are merged in the file
    (`dedupe_initializers`), so a model's total can be a little smaller; activation Q/DQ pairs are not
    included (`ACT_QDQ_BYTES` each)."""
    fmt = Format(fmt)
    bias = 4 * layer.bias_params + (_TENSOR_OVERHEAD if layer.bias_params else 0)
    if fmt is Format.FLOAT or bits == FLOAT:
        return 4 * layer.params + _TENSOR_OVERHEAD + bias
    container = format_container(layer, bits, fmt, act_quantized=fmt is Format.INT8)
    cbits = container.bits
    if layer.op_type == "Gather" and fmt is Format.NBITS:
        block_size = block_size or gather_block(layer)
        blocks = layer.params // max(1, block_size)
        zeros = blocks if container is Container.UINT8 else 0
        values = (layer.params * cbits + 7) // 8
        # The com.microsoft node carries a domain and four attributes: about two DequantizeLinears' worth.
        return values + 4 * blocks + zeros + (4 if zeros else 3) * _TENSOR_OVERHEAD + 2 * _NODE_OVERHEAD
    if layer.op_type == "LSTM" and fmt is Format.INT8:  # DynamicQuantizeLSTM: [directions, 4H] scales
        scales = 2 * layer.weight_shape[0] * layer.channels
        values = layer.params
        return values + 5 * scales + 6 * _TENSOR_OVERHEAD + 3 * _NODE_OVERHEAD + bias
    if layer.op_type in RECURRENT_OPS:  # W and R, one DequantizeLinear each, per-row scales
        values = (layer.params * cbits + 7) // 8
        zeros = 2 * ((layer.channels * cbits + 7) // 8)
        return values + 8 * layer.channels + zeros + 6 * _TENSOR_OVERHEAD + 2 * _NODE_OVERHEAD + bias
    if block_size and layer.weight_shape:
        k_axis = _k_axis(layer)
        shape = list(layer.weight_shape)
        shape[k_axis] = -(-shape[k_axis] // block_size)
        scales = math.prod(shape)
    else:
        scales = layer.channels
    values = (layer.params * cbits + 7) // 8
    zeros = (scales * cbits + 7) // 8
    return values + 4 * scales + zeros + 3 * _TENSOR_OVERHEAD + _NODE_OVERHEAD + bias


def _k_axis(layer: LayerInfo) -> int:
    """The reduction axis of a layer's weight (where blocks run): the other axis of a 2-D MatMul/Gemm."""
    if len(layer.weight_shape) == 2:
        return 1 - layer.channel_axis
    return 1 if layer.channel_axis == 0 else 0


def gemm_as_matmul_ok(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    """A Gemm that is exactly MatMul(A, B') + C: no transA, alpha 1, beta 1 (or no C), 1-D or no C."""
    if attr(node, "transA", 0) or float(attr(node, "alpha", 1.0)) != 1.0:
        return False
    if len(node.input) > 2 and node.input[2]:
        if float(attr(node, "beta", 1.0)) != 1.0:
            return False
        c = initializers(graph).get(node.input[2])
        if c is None or len(c.dims) != 1:
            return False
    return True


def required_opset(layout: dict[str, WeightStorage], current: int) -> int:
    """The default-domain opset the emitted model gets: 21 (INT4, and what onnx's reference evaluator can
    run), 25 when a weight is INT2; never lower than `current`."""
    need = QDQ_OPSET
    if any(w.container is Container.INT2 for w in layout.values()):
        need = INT2_OPSET
    return max(need, current)


def int32_bias(layer: LayerInfo, activations: dict) -> bool:
    """Whether emission stores `layer`'s bias as int32 (scale s_x * s_w) rather than float.

    Only a Gemm whose input is quantized: ORT fuses it into QGemm without an output Q/DQ only with an int32
    bias. A Conv fuses with a float bias too (ORT quantizes it itself), and the float bias is smaller (no
    per-channel bias scale) and exact in the unfused path; the accuracy is the same (mnist_cnn w8a8 SQNR
    34.515 dB int32 vs 34.516 dB float). The simulation mirrors an int32 bias with `quantize_bias`.
    """
    return layer.op_type == "Gemm" and layer.input in activations


def bias_scale(act_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """Per-channel scale of an int32 bias: s_x * s_w in float32 (ORT's convention)."""
    return (np.float32(act_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)


def quantize_bias(
    bias: np.ndarray, act_scale: float, weight_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(int32 bias, its per-channel scale) with `numerics.quantize`, or None when a channel would need more
    than +-2^30 steps (the bias then stays float: a tiny weight scale next to a large bias)."""
    scale = np.maximum(bias_scale(act_scale, weight_scale), MIN_SCALE)
    bias = np.asarray(bias, dtype=np.float32)
    if np.any(np.abs(bias / scale) > BIAS_LIMIT):
        return None
    return quantize(bias, scale, 0, -BIAS_LIMIT, BIAS_LIMIT, axis=0), scale


def check_policy_names(info: ModelInfo, policy: Policy) -> None:
    known = set(info.names)
    for name in policy.layers:
        if name not in known:
            raise InputError(f"policy names layer '{name}', which the model does not have")


__all__ = [
    "ActQuant",
    "ActivationPlan",
    "Format",
    "allowed_formats",
    "format_bytes",
    "format_container",
    "plan_quantizers",
    "stored_weight_bits",
    "Container",
    "Storage",
    "WeightStorage",
    "bias_scale",
    "fusion_output",
    "int32_bias",
    "plan_activations",
    "plan_storage",
    "quantize_bias",
    "required_opset",
]
