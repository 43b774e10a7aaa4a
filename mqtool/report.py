"""Reading a QDQ model back: the bits, storage and bytes of every layer, recovered from the graph itself.

Weight bits: the layer's weight is DequantizeLinear(integer initializer, scale, zero point). The container
type bounds the bits from above (INT2 2, INT4 4, INT8/UINT8 8) and the integers' range (after the zero
point) from below: k_min, the fewest signed bits that hold them. The policy mqtool recorded in
`metadata_props` (`mqtool.policy`) picks the value in [k_min, container] - a 3-bit layer whose integers
happen to span only [-3, 3] reports 3, not 2. When the metadata is missing or contradicts the graph (an
edited file), the graph wins: k_min, with a warning. Activation bits: the layer's input is the output of a
DequantizeLinear whose QuantizeLinear has a uint8 zero point (8 bits) and, below 8 bits, a Clip to exactly
2^k levels in front (k); no DequantizeLinear means a float input (32).

Layer names, params and MACs come from `mqtool.analysis.analyze` on a dequantized view of the model (the
weight DequantizeLinear nodes evaluated with `mqtool.numerics`), so they match `inspect` on the original.

Why each layer got its width: when the recorded policy carries the search's per-layer sensitivity
(`meta["sensitivity"]`, `mqtool.sensitivity`), each row shows how much the search's fitness rises when that
layer alone is quantized to its width and to the next lower candidate width.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx.version_converter
from onnx import TensorProto, numpy_helper

from mqtool.analysis import analyze
from mqtool.errors import InputError
from mqtool.model import load_model
from mqtool.numerics import dequantize, dequantize_blockwise, expand_blocks
from mqtool.policy import FLOAT, LayerBits, Policy, average_weight_bits, bitops_ratio
from mqtool.weight_layers import RECURRENT_OPS

log = logging.getLogger(__name__)

META_POLICY = "mqtool.policy"  # the key mqtool.emit writes the policy JSON under
SENSITIVITY_VERSION = 1  # of a policy's meta["sensitivity"] (mqtool.sensitivity.SensitivityReport.to_meta)

_CONTAINERS = {
    TensorProto.INT8: ("int8", 8),
    TensorProto.UINT8: ("uint8", 8),
    TensorProto.INT4: ("int4", 4),
    TensorProto.UINT4: ("uint4", 4),
    TensorProto.INT2: ("int2", 2),
    TensorProto.UINT2: ("uint2", 2),
    TensorProto.INT16: ("int16", 16),
    TensorProto.UINT16: ("uint16", 16),
}
_ELEMENT_BITS = {
    TensorProto.FLOAT: 32, TensorProto.DOUBLE: 64, TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16,
    TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.UINT32: 32, TensorProto.UINT64: 64,
    TensorProto.BOOL: 8,
}  # fmt: skip


@dataclass
class LayerReport:
    """One quantizable layer of a (QDQ) model. `weight_bytes` are the stored weight values; `scale_bytes`
    their scales and zero points. `bits_source` says what decided `weight_bits`: "graph" or
    "graph+metadata" (the metadata's value, consistent with the graph)."""

    name: str
    op_type: str
    params: int
    macs: int | None
    weight_bits: int
    act_bits: int
    storage: str
    weight_bytes: int
    scale_bytes: int
    bits_source: str
    format: str = "float"
    # the recorded sensitivity (fitness increase, this layer alone quantized) at its width and at the next
    # lower candidate width; None without a record (a float layer: at its width, None; lower: the widest)
    sensitivity: float | None = None
    sensitivity_lower: float | None = None
    # measured ms of this layer as ONNX Runtime runs the model (`measure_layer_ms`), None when not measured
    ms: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class QuantReport:
    """Per-layer rows and totals; `to_json()` is the document `mqtool report --json` prints."""

    model: str | None
    layers: list[LayerReport]
    totals: dict
    sensitivity: dict | None = None  # what the recorded sensitivity measured: metric, activations, widths

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "layers": [layer.to_json() for layer in self.layers],
            "totals": self.totals,
            "sensitivity": self.sensitivity,
        }

    def table(self) -> str:
        from mqtool.tables import format_table

        rows = [
            [
                r.name,
                r.op_type,
                r.params,
                r.macs,
                r.weight_bits,
                r.act_bits,
                r.format,
                r.storage,
                r.weight_bytes,
            ]
            for r in self.layers
        ]
        t = self.totals
        head = ["layer", "op", "params", "MACs", "w bits", "a bits", "format", "storage", "bytes"]
        if any(r.ms is not None for r in self.layers):
            head.append("ms")
            for row, r in zip(rows, self.layers):
                row.append("-" if r.ms is None else round(r.ms, 4))
        why = ""
        if self.sensitivity is not None:
            head += ["sens@w", "sens@lower"]
            for row, r in zip(rows, self.layers):
                row += [_sens_cell(r.sensitivity), _sens_cell(r.sensitivity_lower)]
            sens = self.sensitivity
            why = (
                f"\nsens@w / sens@lower: how much the search's fitness ({sens['metric']}, activations "
                f"{sens['activations']}) rises when this layer alone is quantized to its width / to the next "
                f"lower of the widths {sens['widths']} (the others float; see mqtool sensitivity)"
            )
        return (
            format_table(head, rows)
            + f"\n\n{len(self.layers)} layers ({t['float_layers']} float), {t['params']:,} weight params, "
            f"avg {t['avg_weight_bits']:.3f} weight bits; weights {t['weight_bytes']:,} B + scales "
            f"{t['scale_bytes']:,} B vs fp32 {t['fp32_weight_bytes']:,} B; BitOPs {t['bitops_ratio']:.3f} x w8a8"
            f"\nfile {t['file_bytes']:,} B = {t['file_vs_container_ideal']:.3f} x the ideal in these containers, "
            f"{t['file_vs_true_bits']:.3f} x the true sum of bits*params/8 (+ the float parts)" + why
        )


def _sens_cell(v: float | None) -> float | str:
    return "-" if v is None else v


def report(model: onnx.ModelProto | str | os.PathLike) -> QuantReport:
    """Recover the bits, storage and sizes of every quantizable layer of the model (or model file)."""
    path = None
    if isinstance(model, str | os.PathLike):
        path = os.fspath(model)
        model = load_model(path, allow_quantized=True)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output if o}
    recorded = _recorded_policy(model)
    meta = _policy_layers(recorded)
    sens = recorded_sensitivity(recorded.get("meta"))
    info = analyze(_dequantized_view(model), allow_quantized=True)
    weight_tensors: set[str] = set()
    rows = []
    nodes = {n.name: n for n in g.node}
    for layer in info.layers:
        m = meta.get(layer.name, {})
        dq = prod.get(layer.weight)
        own = nodes.get(layer.name)
        if own is not None and own.op_type == "GatherBlockQuantized" and own.input[0] in inits:
            dq = own  # its data, scales and zero points are read like a DequantizeLinear's
        if own is not None and own.op_type in _OWN_WEIGHT_OPS and own.input[1] in inits:
            dq = own
        if (
            dq is not None
            and dq.op_type in ("DequantizeLinear", "GatherBlockQuantized", *_OWN_WEIGHT_OPS)
            and _values_input(dq) in inits
        ):
            q_init = inits[_values_input(dq)]
            storage, cap = _CONTAINERS.get(q_init.data_type, (f"type{q_init.data_type}", 32))
            k_min = _bits_needed(dq, inits)
            bits, source = k_min, "graph"
            want = m.get("weight_bits")
            if isinstance(want, int) and k_min <= want <= cap:
                bits, source = want, "graph+metadata"
            elif want is not None:
                log.warning(
                    "layer '%s': metadata says %s weight bits, the graph %d; using the graph",
                    layer.name,
                    want,
                    k_min,
                )
            extras = [i for i in _scale_inputs(dq) if i in inits]
            weight_tensors.update([_values_input(dq), *extras])
            weight_bytes = tensor_bytes(q_init)
            if dq.op_type == "DynamicQuantizeLSTM":  # R is stored in the same node
                weight_tensors.add(dq.input[2])
                weight_bytes += tensor_bytes(inits[dq.input[2]])
            scale_bytes = sum(tensor_bytes(inits[i]) for i in extras)
            r = _recurrence_dq(nodes.get(layer.name), prod, inits)
            if r is not None:  # an LSTM/GRU/RNN: R is stored with W
                r_extras = [i for i in r.input[1:] if i in inits]
                weight_tensors.update([r.input[0], *r_extras])
                weight_bytes += tensor_bytes(inits[r.input[0]])
                scale_bytes += sum(tensor_bytes(inits[i]) for i in r_extras)
        else:
            bits, source, storage, weight_bytes, scale_bytes = FLOAT, "graph", "float", 4 * layer.params, 0
            if layer.weight in inits:
                weight_tensors.add(layer.weight)
        # Activation bits come from the graph alone: the policy's act_bits may legitimately differ (a tensor
        # shared by layers asking for different widths gets the widest, see passes/qdq_plan.py).
        act = _act_bits(layer.input, prod, inits)
        fmt = _format(layer, bits, storage, act, dq, m.get("format"))
        at, lower = _sensitivity_at(sens, layer.name, bits)
        rows.append(
            LayerReport(
                layer.name,
                layer.op_type,
                layer.params,
                layer.macs,
                bits,
                act,
                storage,
                weight_bytes,
                scale_bytes,
                source,
                fmt,
                at,
                lower,
            )
        )
    summary = None if sens is None else {k: sens[k] for k in ("metric", "activations", "widths")}
    return QuantReport(path, rows, _totals(model, path, info.layers, rows, inits, weight_tensors), summary)


def recorded_sensitivity(meta: object) -> dict | None:
    """A policy meta's recorded sensitivity as {"metric", "activations", "widths", "layers": {name: {width:
    increase}}}; None when there is none, or it is malformed (with a warning)."""
    doc = meta.get("sensitivity") if isinstance(meta, dict) else None
    if doc is None:
        return None
    try:
        if doc["version"] != SENSITIVITY_VERSION:
            raise ValueError(f"version {doc['version']}")
        layers = {
            str(name): {int(b): None if v is None else float(v) for b, v in row.items()}
            for name, row in doc["layers"].items()
        }
        widths = sorted(int(b) for b in doc["widths"])
        return {
            "metric": str(doc["metric"]),
            "activations": str(doc["activations"]),
            "widths": widths,
            "layers": layers,
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("the recorded policy's sensitivity is unreadable (%s); not shown", e)
        return None


def _sensitivity_at(sens: dict | None, name: str, bits: int) -> tuple[float | None, float | None]:
    """(increase at `bits`, increase at the next lower recorded width) of layer `name`."""
    if sens is None or name not in sens["layers"]:
        return None, None
    row = sens["layers"][name]
    lower = [b for b in sens["widths"] if b < bits]
    return row.get(bits), (row.get(lower[-1]) if lower else None)


_FORMATS = ("float", "int8", "packed", "nbits", "dynamic")
# Integer-kernel nodes that hold their layer's int8 weight themselves (no DequantizeLinear in front).
_OWN_WEIGHT_OPS = ("DynamicQuantizeLSTM", "DynamicQuantizeMatMul")


def _scale_inputs(node: onnx.NodeProto) -> list[str]:
    """Scale and zero-point inputs: DequantizeLinear (q, s, z); GatherBlockQuantized (q, ids, s, z);
    DynamicQuantizeLSTM (x, W, R, B, lens, h, c, P, W scale, W zero point, R scale, R zero point);
    DynamicQuantizeMatMul (x, W, W scale, W zero point)."""
    if node.op_type in ("GatherBlockQuantized", "DynamicQuantizeMatMul"):
        return list(node.input[2:4])
    if node.op_type == "DynamicQuantizeLSTM":
        return list(node.input[8:12])
    return list(node.input[1:3])


def _values_input(node: onnx.NodeProto) -> str:
    return node.input[1] if node.op_type in _OWN_WEIGHT_OPS else node.input[0]


def _recurrence_dq(node, prod, inits) -> onnx.NodeProto | None:
    if node is None or node.op_type not in RECURRENT_OPS or len(node.input) < 3:
        return None
    r = prod.get(node.input[2])
    return r if r is not None and r.op_type == "DequantizeLinear" and r.input[0] in inits else None


def _format(layer, bits: int, storage: str, act: int, dq, recorded) -> str:
    """The layer's format (policy.Format): the one mqtool recorded when the graph agrees with it, else
    read from the graph (block-wise or weight-only 2-D MatMul: nbits; INT8/UINT8: int8; INT4/INT2: packed)."""
    if bits == FLOAT:
        return "float"
    if dq is not None and dq.op_type == "DynamicQuantizeMatMul":
        return "dynamic"
    if storage in ("int8", "uint8"):
        graph = "int8"
    elif storage in ("int4", "int2", "uint4", "uint2"):
        graph = "packed"
    else:
        graph = storage
    blocked = dq is not None and bool(_attr(dq, "block_size", 0))
    if blocked or (
        act == FLOAT and layer.op_type == "MatMul" and len(layer.weight_shape) == 2 and graph != "int8"
    ):
        graph = "nbits"
    if recorded in _FORMATS and recorded != "float":
        if recorded == "nbits" and layer.op_type != "MatMul":
            return graph  # an nbits layer is a MatMul in the emitted graph: the record is stale
        return recorded
    return graph


def _totals(model, path, layers, rows: list[LayerReport], inits, weight_tensors: set[str]) -> dict:
    policy = Policy({r.name: LayerBits(r.weight_bits, r.act_bits) for r in rows})
    params = sum(r.params for r in rows)
    quantized = [r for r in rows if r.weight_bits != FLOAT]
    other = sum(tensor_bytes(t) for name, t in inits.items() if name not in weight_tensors)
    float_weights = sum(r.weight_bytes for r in rows if r.weight_bits == FLOAT)
    scales = sum(r.scale_bytes for r in quantized)
    container_ideal = (
        sum(_CONTAINER_BITS[r.storage] * r.params / 8 for r in quantized) + scales + float_weights + other
    )
    true_ideal = sum(r.weight_bits * r.params / 8 for r in quantized) + scales + float_weights + other
    file_bytes = _file_bytes(path) if path else model.ByteSize()
    return {
        "layers": len(rows),
        "quantized_layers": len(quantized),
        "float_layers": len(rows) - len(quantized),
        "params": params,
        "avg_weight_bits": average_weight_bits(policy, layers),
        "weight_bytes": sum(r.weight_bytes for r in rows),
        "scale_bytes": scales,
        "fp32_weight_bytes": 4 * params,
        "other_bytes": other,
        "bitops_ratio": bitops_ratio(policy, layers),
        "file_bytes": file_bytes,
        "ideal_container_bytes": int(math.ceil(container_ideal)),
        "true_bits_bytes": int(math.ceil(true_ideal)),
        "file_vs_container_ideal": file_bytes / container_ideal if container_ideal else 0.0,
        "file_vs_true_bits": file_bytes / true_ideal if true_ideal else 0.0,
    }


_CONTAINER_BITS = {name: bits for name, bits in _CONTAINERS.values()}


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's values in its type (sub-byte types packed), whatever its encoding in the file."""
    n = math.prod(t.dims)
    bits = _CONTAINERS[t.data_type][1] if t.data_type in _CONTAINERS else _ELEMENT_BITS.get(t.data_type, 32)
    return (n * bits + 7) // 8


def _bits_needed(dq: onnx.NodeProto, inits) -> int:
    """The fewest signed bits (>= 2) that hold the integers of a DequantizeLinear (or GatherBlockQuantized)
    minus their zero point."""
    if dq.op_type == "DynamicQuantizeLSTM":  # int8 W and R, zero points 0 (as emitted)
        both = [numpy_helper.to_array(inits[dq.input[k]]).astype(np.int64) for k in (1, 2)]
        lo, hi = min(int(v.min()) for v in both), max(int(v.max()) for v in both)
        return next(k for k in range(2, 33) if -(2 ** (k - 1)) <= lo and hi <= 2 ** (k - 1) - 1)
    dqmm = dq.op_type == "DynamicQuantizeMatMul"
    q = numpy_helper.to_array(inits[dq.input[1 if dqmm else 0]]).astype(np.int64)
    gbq = dq.op_type == "GatherBlockQuantized"
    z_in = 3 if gbq or dqmm else 2
    zp = np.int64(0)
    if gbq and inits[dq.input[0]].data_type == TensorProto.UINT8:
        zp = np.int64(128)  # GatherBlockQuantized's default uint8 zero point
    if len(dq.input) > z_in and dq.input[z_in] in inits:
        zp = numpy_helper.to_array(inits[dq.input[z_in]]).astype(np.int64)
        block = int(_attr(dq, "block_size", 0))
        axis = int(_attr(dq, "quantize_axis" if gbq else "axis", 1)) % q.ndim  # DynamicQuantizeMatMul: 1
        if block:
            zp = expand_blocks(zp, axis, block, q.shape[axis])
        elif zp.ndim == 1 and q.ndim > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            zp = zp.reshape(shape)
    v = q - zp
    if v.size == 0:
        return 2
    lo, hi = int(v.min()), int(v.max())
    k = 2
    while not (-(2 ** (k - 1)) <= lo and hi <= 2 ** (k - 1) - 1):
        k += 1
    return k


def _act_bits(tensor: str, prod, inits) -> int:
    dq = prod.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return FLOAT
    q = prod.get(dq.input[0])
    zp_name = dq.input[2] if len(dq.input) > 2 else ""
    container = _CONTAINERS.get(inits[zp_name].data_type, ("", 8))[1] if zp_name in inits else 8
    if q is None or q.op_type != "QuantizeLinear":
        return container
    clip = prod.get(q.input[0])
    if clip is None or clip.op_type != "Clip" or len(clip.input) < 3 or q.input[1] not in inits:
        return container
    if not (clip.input[1] in inits and clip.input[2] in inits):
        return container
    lo = float(numpy_helper.to_array(inits[clip.input[1]]))
    hi = float(numpy_helper.to_array(inits[clip.input[2]]))
    scale = float(numpy_helper.to_array(inits[q.input[1]]))
    levels = (hi - lo) / scale + 1
    k = round(math.log2(levels)) if levels > 1 else container
    # Only a Clip that spans exactly 2^k levels of this quantizer is the k-bit saturation mqtool emits.
    return k if 2 <= k < container and abs(levels - 2**k) < 1e-3 * 2**k else container


def _dequantized_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose constant DequantizeLinear nodes are replaced by their float values, and whose
    GatherBlockQuantized nodes are Gathers from the dequantized table (so analysis lists them)."""
    view = onnx.ModelProto()
    view.CopyFrom(model)
    g = view.graph
    inits = {i.name: i for i in g.initializer}
    keep = []
    replaced = False
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input and all(i in inits for i in n.input if i):
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.int64)
            s = numpy_helper.to_array(inits[n.input[1]])
            z = (
                numpy_helper.to_array(inits[n.input[2]]).astype(np.int64)
                if len(n.input) > 2 and n.input[2]
                else 0
            )
            block = int(_attr(n, "block_size", 0))
            axis = _attr(n, "axis", 1) % max(q.ndim, 1)
            if block:
                value = dequantize_blockwise(q, s, z, axis, block)
            else:
                value = dequantize(q, s, z, axis if np.ndim(s) == 1 else None)
            g.initializer.append(numpy_helper.from_array(value, n.output[0]))
            inits[n.output[0]] = g.initializer[-1]
        elif n.op_type == "GatherBlockQuantized" and n.input[0] in inits and n.input[2] in inits:
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.int64)
            s = numpy_helper.to_array(inits[n.input[2]])
            if len(n.input) > 3 and n.input[3] in inits:
                z = numpy_helper.to_array(inits[n.input[3]]).astype(np.int64)
            else:
                z = 128 if inits[n.input[0]].data_type == TensorProto.UINT8 else 0
            axis, block = int(_attr(n, "quantize_axis", 1)), int(_attr(n, "block_size", 32))
            table = f"{n.name}.table"
            z = np.full(s.shape, z, np.int64) if np.ndim(z) == 0 else z
            g.initializer.append(
                numpy_helper.from_array(dequantize_blockwise(q, s, z, axis % q.ndim, block), table)
            )
            inits[table] = g.initializer[-1]
            keep.append(onnx.helper.make_node("Gather", [table, n.input[1]], list(n.output), n.name, axis=0))
            replaced = True
        elif n.op_type == "DynamicQuantizeMatMul" and all(i in inits for i in n.input[1:4] if i):
            q = numpy_helper.to_array(inits[n.input[1]]).astype(np.int64)
            s = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)
            z = (
                numpy_helper.to_array(inits[n.input[3]]).astype(np.int64)
                if len(n.input) > 3 and n.input[3]
                else 0
            )
            weight = f"{n.name}.weight"
            g.initializer.append(
                numpy_helper.from_array(dequantize(q, s, z, 1 if np.ndim(s) == 1 else None), weight)
            )
            inits[weight] = g.initializer[-1]
            ins = [n.input[0], weight]
            out = list(n.output)
            if len(n.input) > 4 and n.input[4]:  # its bias input
                product = f"{n.name}.mm"
                keep.append(onnx.helper.make_node("MatMul", ins, [product], n.name))
                keep.append(onnx.helper.make_node("Add", [product, n.input[4]], out, f"{n.name}.bias"))
            else:
                keep.append(onnx.helper.make_node("MatMul", ins, out, n.name))
            replaced = True
        elif n.op_type == "DynamicQuantizeLSTM" and all(i in inits for i in n.input[8:12]):
            floats = []
            for k, sk in ((1, 8), (2, 10)):  # [D, K, 4H] int8 and [D, 4H] scales -> float [D, 4H, K]
                q = numpy_helper.to_array(inits[n.input[k]]).astype(np.float32)
                s = numpy_helper.to_array(inits[n.input[sk]]).astype(np.float32)
                name = f"{n.name}.{'WR'[k - 1]}"
                g.initializer.append(
                    numpy_helper.from_array(np.transpose(q * s[:, None, :], (0, 2, 1)).copy(), name)
                )
                inits[name] = g.initializer[-1]
                floats.append(name)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            ins = [n.input[0], *floats, *n.input[3:8]]
            keep.append(onnx.helper.make_node("LSTM", ins, list(n.output), n.name, **attrs))
            replaced = True
        else:
            keep.append(n)
    if len(keep) != len(g.node) or replaced:
        nodes = [onnx.NodeProto() for _ in keep]
        for dst, src in zip(nodes, keep):
            dst.CopyFrom(src)
        del g.node[:]
        g.node.extend(nodes)
    return view


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _recorded_policy(model: onnx.ModelProto) -> dict:
    """The policy document mqtool recorded in the metadata ({} when there is none or it is unreadable)."""
    for p in model.metadata_props:
        if p.key == META_POLICY:
            try:
                doc = json.loads(p.value)
            except json.JSONDecodeError:
                log.warning("metadata '%s' is not valid JSON; bits come from the graph alone", META_POLICY)
                return {}
            return doc if isinstance(doc, dict) else {}
    return {}


def _policy_layers(doc: dict) -> dict:
    """The recorded policy's layers ({} when it has none)."""
    layers = doc.get("layers")
    return layers if isinstance(layers, dict) else {}


def _file_bytes(path: str) -> int:
    """The model file plus the external data files it references."""
    total = os.path.getsize(path)
    m = onnx.load(path, load_external_data=False)
    base = os.path.dirname(os.path.abspath(path))
    files = set()
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            files.update(e.value for e in t.external_data if e.key == "location")
    return total + sum(
        os.path.getsize(os.path.join(base, f)) for f in files if os.path.isfile(os.path.join(base, f))
    )


def plot_report(rep: QuantReport, path: str) -> None:
    """Bits per layer (weights as bars, activations as markers) with params on a second axis, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("plot: drawing needs matplotlib (pip install matplotlib)", field="plot") from e
    names = [r.name for r in rep.layers]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
    wb = [min(r.weight_bits, 9) for r in rep.layers]  # float (32) drawn as a short "F" bar above 8
    ax.bar(
        x,
        wb,
        color=["tab:gray" if r.weight_bits == FLOAT else "tab:blue" for r in rep.layers],
        label="weight bits",
    )
    ab = [min(r.act_bits, 9) for r in rep.layers]
    ax.plot(x, ab, "o", color="tab:orange", label="activation bits (9 = float)")
    ax.set_ylim(0, 10)
    ax.set_ylabel("bits (9 = float)")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax2 = ax.twinx()
    ax2.plot(x, [r.params for r in rep.layers], "-", color="tab:green", label="params")
    ax2.set_yscale("log")
    ax2.set_ylabel("params")
    t = rep.totals
    ax.set_title(f"avg {t['avg_weight_bits']:.2f} weight bits, BitOPs {t['bitops_ratio']:.3f} x w8a8")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------- latency, ORT int8 comparison


def measure_layer_ms(
    rep: QuantReport,
    model: onnx.ModelProto | str | os.PathLike,
    data: object = None,
    *,
    batch: int = 1,
    threads: int = 2,
) -> dict:
    """Fill each row's `ms` with the layer's time on ONNX Runtime's CPU provider (`mqtool.latency.layer_latency`:
    the profile of `model` at `batch` samples per run, scaled to its measured median) and record
    {"batch", "threads", "median_ms", "p90_ms", "rest_ms"} (rest: everything that is no layer) as
    `rep.totals["latency"]`, which is returned. Feeds come from `data` (any calibration data source) or are
    synthesised from the input specs."""
    from mqtool.latency import latency_feed, layer_latency

    if isinstance(model, str | os.PathLike):
        model = load_model(os.fspath(model), allow_quantized=True)
    feed = latency_feed(model, data, batch)
    per, rest, (median, p90) = layer_latency(model, [r.name for r in rep.layers], feed, batch, threads)
    for r in rep.layers:
        r.ms = per.get(r.name)
    record = {"batch": batch, "threads": threads, "median_ms": median, "p90_ms": p90, "rest_ms": rest}
    rep.totals["latency"] = record
    return record


def ort_int8(model: onnx.ModelProto, data: object = None, *, samples: int = 64) -> onnx.ModelProto:
    """ONNX Runtime's own int8 model of the float `model` (`ort_quantize_static`), calibrated one sample per
    run on the first `samples` samples of `data` (any calibration data source) or, without data, on 8
    synthesised inputs (`mqtool.latency.synthesize_feed`: right for sizes and timings, not for accuracy).
    `model` is not modified."""
    from mqtool.data import model_inputs
    from mqtool.latency import synthesize_feed
    from mqtool.runtime import concat_feeds, feed_samples, fixed_batch, resize_feed, slice_feed, split_feed

    specs = model_inputs(model)
    if data is None:
        feed = resize_feed(synthesize_feed(specs, 1), specs, 8)
    else:
        from calibration.readers import iter_feeds

        feed = concat_feeds(list(iter_feeds(data, model, batch_size=samples, limit=samples)), specs)
    if fixed_batch(specs):
        runs = split_feed(feed, specs)
    else:
        runs = [slice_feed(feed, specs, slice(i, i + 1)) for i in range(feed_samples(feed, specs))]
    return ort_quantize_static(model, runs)[0]


def ort_quantize_static(
    model: onnx.ModelProto,
    runs: Iterable[Mapping[str, np.ndarray]],
    *,
    reduce_range: bool = False,
    int4_weights: bool = False,
) -> tuple[onnx.ModelProto, dict]:
    """The peer every comparison uses (`report --compare-int8` and the benchmarks): ONNX Runtime's
    `quantize_static` in QDQ format, per-channel int8 weights (`int4_weights`: INT4 for Conv/Gemm/MatMul
    weights through ORT's tensor overrides), uint8 activations, MinMax over `runs` (one calibration run per
    feed dict). First, as ORT's docs advise, `quant_pre_process` (with symbolic shape inference; without it,
    or not at all, where it gives up on a real model). A model below opset 13 is converted to 13: ORT writes
    per-axis DequantizeLinear, which opset 11/12 cannot hold. Returns the model and what was done to get
    there (`opset_upgraded_from`, `pre_process`). `model` is not modified."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(runs)

        def get_next(self):
            return next(self.it, None)

    info: dict = {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        model = onnx.version_converter.convert_version(model, 13)
        info["opset_upgraded_from"] = opset
    with tempfile.TemporaryDirectory(prefix="mqtool-ort-int8-") as tmp:
        src, pre, out = (os.path.join(tmp, f) for f in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save_model(model, src)
        here = os.getcwd()
        os.chdir(tmp)  # symbolic shape inference leaves files in the working directory when it fails
        try:
            for symbolic, said in ((True, "full"), (False, "without symbolic shapes")):
                try:
                    quant_pre_process(src, pre, skip_symbolic_shape=not symbolic)
                    info["pre_process"] = said
                    break
                except Exception as e:  # it gives up on some real models: try less, then quantize without
                    log.info("quant_pre_process (%s) failed: %s", said, e)
            else:
                pre = src
                info["pre_process"] = "skipped (it failed)"
        finally:
            os.chdir(here)
        extra: dict = {}
        if int4_weights:
            m = onnx.load(pre)
            inits = {t.name for t in m.graph.initializer}
            weights = {
                n.input[1]
                for n in m.graph.node
                if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits
            }
            extra["TensorQuantOverrides"] = {w: [{"quant_type": QuantType.QInt4}] for w in sorted(weights)}
        try:
            quantize_static(
                pre,
                out,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options=extra,
            )  # no CalibMaxIntermediateOutputs: in ORT 1.32 MinMax drops (never merges) each flushed group
        except Exception as e:
            raise InputError(f"ONNX Runtime's quantize_static failed on the reference model: {e}") from e
        return onnx.load(out), info


@dataclass
class Int8Comparison:
    """Totals of the float reference, ONNX Runtime's `quantize_static` int8 of it and the reported model:
    file bytes and, when timed, median / p90 ms of a run of `batch` samples (timed interleaved)."""

    rows: list[dict]
    batch: int | None = None
    threads: int | None = None

    def to_json(self) -> dict:
        return {"batch": self.batch, "threads": self.threads, "rows": self.rows}

    def table(self) -> str:
        from mqtool.tables import format_table

        fp32 = self.rows[0]
        ort = self.rows[1]
        head = ["model", "bytes", "x fp32"]
        timed = all(r.get("ms") is not None for r in self.rows)
        if timed:
            head += [f"ms (batch {self.batch})", "p90 ms", "x fp32", "x ORT int8"]
        out = []
        for r in self.rows:
            row = [r["model"], r["bytes"], round(r["bytes"] / fp32["bytes"], 3)]
            if timed:
                row += [round(r["ms"], 3), round(r["p90_ms"], 3), round(r["ms"] / fp32["ms"], 3),
                        round(r["ms"] / ort["ms"], 3)]  # fmt: skip
            out.append(row)
        note = f"\nms: ONNX Runtime CPU, {self.threads} threads, median of interleaved runs" if timed else ""
        return format_table(head, out) + note


def compare_int8(
    rep: QuantReport,
    reference: str | os.PathLike,
    data: object = None,
    *,
    model: onnx.ModelProto | str | os.PathLike | None = None,
    latency: bool = False,
    batch: int = 1,
    threads: int = 2,
) -> Int8Comparison:
    """The reported model (`model`, default the file `rep` was read from) next to the float `reference` and
    ONNX Runtime's `quantize_static` int8 of it (`ort_int8`, calibrated on `data` or synthesised inputs):
    bytes, and with `latency` the median and p90 ms of the three timed interleaved at `batch`."""
    from mqtool.data import model_inputs
    from mqtool.latency import latency_feed, measure_models_latency

    ref_path = os.fspath(reference)
    ref = load_model(ref_path)
    model = rep.model if model is None else model
    if model is None:
        raise InputError("compare_int8: the report was built from a model in memory; pass `model`")
    if isinstance(model, str | os.PathLike):
        qmodel = load_model(os.fspath(model), allow_quantized=True)
    else:
        qmodel = model
    want, got = (
        sorted((s.name, str(s.dtype), len(s.shape or ())) for s in model_inputs(m)) for m in (ref, qmodel)
    )
    if want != got:
        raise InputError(
            f"{ref_path}: the reference's inputs (name, type, rank) {want} differ from the quantized model's "
            f"{got}: not its float model"
        )
    int8 = ort_int8(ref, data)
    q_bytes = _file_bytes(os.fspath(model)) if isinstance(model, str | os.PathLike) else qmodel.ByteSize()
    rows = [
        {"model": "fp32 (reference)", "bytes": _file_bytes(ref_path)},
        {"model": "ORT quantize_static int8", "bytes": int8.ByteSize()},
        {"model": "this model", "bytes": q_bytes},
    ]
    if not latency:
        return Int8Comparison(rows)
    feed = latency_feed(ref, data, batch)
    timed = measure_models_latency({"fp32": ref, "ort": int8, "this": qmodel}, feed, batch, threads)
    for r, k in zip(rows, ("fp32", "ort", "this")):
        r["ms"], r["p90_ms"] = timed[k]
    return Int8Comparison(rows, batch, threads)
