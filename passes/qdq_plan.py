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

A k < 8-bit activation lives in uint8 with `numerics.activation_qparams(lo, hi, k)`; emission puts a Clip to
the k-bit range before its QuantizeLinear so values saturate at 2^k - 1 exactly as `numerics.quantize` does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import onnx

from mqtool.analysis import LayerInfo, ModelInfo
from mqtool.errors import InputError
from mqtool.model import infer_shapes
from mqtool.numerics import MIN_SCALE, quantize
from mqtool.policy import FLOAT, Policy
from passes.graph import attr, consumers, initializers
from passes.upgrade_opset import INT2_OPSET, QDQ_OPSET

OUTPUT_BITS = 8
# Bias integers stay within +-2^30: exactly representable in float32, far from int32 overflow.
BIAS_LIMIT = 2**30
_ACTIVATIONS = ("Relu", "Clip")


class Storage(StrEnum):
    """How quantized weights are stored (see `plan_storage`)."""

    AUTO = "auto"
    INT8 = "int8"
    PACKED = "packed"


class Container(StrEnum):
    """The ONNX integer type a quantized weight is stored in.

    UINT8 holds 8-bit weights as q + 128 with zero point 128 (the same dequantized values): ORT's u8s8
    integer kernels saturate int16 pair sums on x86 CPUs without VNNI when int8 weights use the full
    [-128, 127] range (measured: -1.7 pt on mnist_cnn), while its u8u8 kernels do not. Weights of at most
    7 bits (|q| <= 64) cannot saturate (2 * 255 * 64 < 2^15) and stay INT8, ORT's and TensorRT's default.
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
    """A quantized weight's container, and whether its Gemm is emitted as MatMul + Add (for MatMulNBits)."""

    container: Container
    as_matmul: bool = False


@dataclass(frozen=True)
class ActQuant:
    """A planned activation quantizer: k bits, uint8 storage, per-tensor scale and zero point."""

    bits: int
    scale: float
    zero_point: int


def layer_act_request(policy: Policy, layer: LayerInfo) -> int:
    """The input width `layer` asks for: its act_bits, or 32 when it is float or weight-only."""
    b = policy.get(layer.name)
    return FLOAT if b.weight_bits == FLOAT else b.act_bits


def plan_activations(model: onnx.ModelProto, info: ModelInfo, policy: Policy) -> dict[str, int]:
    """Tensor name -> activation bits, for every tensor that gets a Q/DQ pair (rules in the module doc).

    Deterministic: tensors appear in layer order (inputs first, then fusion outputs).
    """
    votes: dict[str, list[int]] = defaultdict(list)
    for layer in info.layers:
        votes[layer.input].append(layer_act_request(policy, layer))
    plan = {t: max(v) for t, v in votes.items() if FLOAT not in v}
    g = model.graph
    cons, consts = consumers(g), _constant_names(model)
    shapes: dict[str, list[int | None]] | None = None
    for layer in info.layers:
        if policy.get(layer.name).weight_bits == FLOAT or layer.input not in plan:
            continue  # a layer with a float input runs unfused anyway: no output Q/DQ for it
        if layer.op_type == "MatMul" and shapes is None and _bias_add(layer.output, cons, consts):
            shapes = infer_shapes(model)
        t = fusion_output(model, layer, cons, consts, shapes or {})
        if t is None or t in plan or FLOAT in votes.get(t, []):
            continue
        plan[t] = OUTPUT_BITS
    return plan


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
    activations: dict[str, int],
    storage: Storage | str = Storage.AUTO,
) -> dict[str, WeightStorage]:
    """Layer name -> weight storage, for every quantized layer (float layers are absent).

    int8: every weight in a byte (k-bit values; UINT8 for 8-bit integer-kernel weights, see `Container`),
    the integer-kernel form. packed: the smallest container:
    INT2 for 2-bit weight-only layers (INT2 next to activation Q/DQ fails ORT session creation), INT4 up to
    4 bits, INT8 above. auto: what ORT 1.32 runs fastest, per layer (measurements in docs/passes.md):
    INT8 when the input is quantized (integer kernels; sub-byte weights disable them); for a weight-only
    MatMul (and a weight-only Gemm rewritten as MatMul + Add) the MatMulNBits form, INT4 up to 4 bits
    (faster than INT8 and INT2 there), INT8 above; other weight-only layers INT8.
    """
    storage = Storage(storage)
    g = model.graph
    nodes = {n.name: n for n in g.node}
    out: dict[str, WeightStorage] = {}
    for layer in info.layers:
        bits = policy.get(layer.name).weight_bits
        if bits == FLOAT:
            continue
        act_quantized = layer.input in activations
        # The integer-kernel container: 8-bit weights as UINT8 (no u8s8 saturation), narrower ones INT8.
        byte = Container.UINT8 if bits == 8 and act_quantized else Container.INT8
        if storage is Storage.INT8:
            out[layer.name] = WeightStorage(byte)
        elif storage is Storage.PACKED:
            # ORT 1.32 fuses DQ(INT2) + MatMul into MatMulNBits and computes garbage (nondeterministically)
            # unless N % 4 == 0: the rows of such a weight do not start on a byte (tests/test_bad_models.py).
            odd_matmul = (
                layer.op_type == "MatMul" and len(layer.weight_shape) == 2 and layer.weight_shape[1] % 4
            )
            if bits == 2 and not act_quantized and not odd_matmul:
                out[layer.name] = WeightStorage(Container.INT2)
            else:
                out[layer.name] = WeightStorage(Container.INT4 if bits <= 4 else byte)
        elif act_quantized:
            out[layer.name] = WeightStorage(byte)
        elif layer.op_type == "MatMul" and layer.weight_input == 1 and len(layer.weight_shape) == 2:
            out[layer.name] = WeightStorage(Container.INT4 if bits <= 4 else Container.INT8)
        elif layer.op_type == "Gemm" and gemm_as_matmul_ok(nodes[layer.name], g):
            out[layer.name] = WeightStorage(Container.INT4 if bits <= 4 else Container.INT8, as_matmul=True)
        else:
            out[layer.name] = WeightStorage(Container.INT8)
    return out


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
