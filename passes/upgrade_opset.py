"""Raise the default-domain opset to what the emitted QDQ needs, and the IR version with it.

Per-axis DequantizeLinear needs opset 13, INT4/UINT4 and `block_size` need 21, INT2/UINT2 need 25 (onnx 1.23
and ONNX Runtime 1.32 accept all three). `onnx.version_converter` rewrites the ops whose semantics changed
(keeping every node's name and every tensor name) but leaves `ir_version` alone, so an opset-9 model would
keep IR 3, which cannot hold opset 21; the IR is raised to the minimum the new opset requires.

Before::   opset_import [""=9], ir_version 3, BatchNormalization(x, s, b, m, v) <spatial=1>
After::    opset_import [""=21], ir_version 10, BatchNormalization(x, s, b, m, v)
"""

from __future__ import annotations

import logging
import math

import onnx
from onnx import helper, version_converter

from mqtool.errors import InputError
from mqtool.model import FLOAT_TYPES, copy_fields_except
from passes.base import PassResult
from passes.graph import default_opset

log = logging.getLogger(__name__)

# The opset each kind of emitted tensor first appears in.
PER_AXIS_OPSET = 13
INT4_OPSET = 21
INT2_OPSET = 25
# What emission targets at least: INT4-capable, and an opset for which onnx 1.23's ReferenceEvaluator
# implements DequantizeLinear (it has 19, 21, 23 and 25 only, so an opset-13..18 QDQ model cannot be checked
# against the reference at all). ORT 1.32 fuses the same patterns at 17, 21 and 25 (measured).
QDQ_OPSET = 21
# Float initializers above this many elements go through the version converter as data-less stubs.
_STRIP_ELEMENTS = 1024


def upgrade_opset(model: onnx.ModelProto, opset: int = PER_AXIS_OPSET) -> PassResult:
    """Convert `model` to at least `opset` (never downgrades); returns the converted model."""
    current = default_opset(model)
    if current >= opset:
        return PassResult(model, _raise_ir(model, current))
    try:
        converted = _convert_without_weights(model, opset)
        if converted is None:
            converted = version_converter.convert_version(model, opset)
    except Exception as e:  # the converter refuses ops it has no adapter for
        raise InputError(f"cannot convert the model from opset {current} to {opset}: {e}") from e
    _raise_ir(converted, opset)
    log.debug("opset %d -> %d (IR %d)", current, opset, converted.ir_version)
    return PassResult(converted, True)


def _convert_without_weights(model: onnx.ModelProto, opset: int) -> onnx.ModelProto | None:
    """`convert_version` on a copy whose large float initializers carry no data, the data put back after.

    The converter serialises and parses the whole model twice (0.9 s of ResNet-50's emit); its adapters
    rewrite nodes and attributes, not float weights. None (convert the full model instead) when a stub
    does not come back exactly as it went in, or the conversion fails."""
    g = model.graph
    stubs = {
        i.name: onnx.TensorProto(name=i.name, dims=i.dims, data_type=i.data_type)
        for i in g.initializer
        if i.data_type in FLOAT_TYPES and math.prod(i.dims) > _STRIP_ELEMENTS
    }
    if not stubs:
        return None
    light = onnx.ModelProto()
    copy_fields_except(model, light, skip="graph")
    copy_fields_except(g, light.graph, skip="initializer")
    light.graph.initializer.extend(stubs.get(i.name, i) for i in g.initializer)
    try:
        converted = version_converter.convert_version(light, opset)
    except Exception:
        return None  # the full model's conversion reports the error
    back = [i for i in converted.graph.initializer if i.name in stubs]
    if len(back) != len(stubs) or any(i != stubs[i.name] for i in back):
        log.debug("the version converter changed a weight stub: converting the full model")
        return None
    weights = {i.name: i for i in g.initializer if i.name in stubs}
    for i in back:
        i.CopyFrom(weights[i.name])
    return converted


def _raise_ir(model: onnx.ModelProto, opset: int) -> bool:
    imports = [helper.make_opsetid(i.domain, i.version) for i in model.opset_import]
    try:
        need = helper.find_min_ir_version_for(imports, ignore_unknown=True)
    except Exception:  # an opset newer than this onnx knows: leave the IR as it is
        return False
    if model.ir_version < need:
        model.ir_version = need
        return True
    return False
