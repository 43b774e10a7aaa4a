"""Move quantized weights from INT8 containers into INT4 / INT2 / UINT8 where the storage plan says so
(every weight DequantizeLinear the layer reads: W and R of an LSTM/GRU/RNN).

Before::    DequantizeLinear <axis=0>(w0.q: int8 [64, 32], w0.s, w0.z: int8 [64] = 0)
After::     DequantizeLinear <axis=0>(w0.q: int4 [64, 32], w0.s, w0.z: int4 [64] = 0)
or, UINT8:  DequantizeLinear <axis=0>(w0.q + 128: uint8 [64, 32], w0.s, w0.z: uint8 [64] = 128)

The dequantized values are unchanged (the integers already lie in the k-bit range; one that does not fit
is an error, never a silent clip). Sub-byte tensors are written with `onnx.numpy_helper` and ml_dtypes (packed raw data, two
INT4 or four INT2 values per byte); onnx-graphsurgeon 0.6.1 corrupts them. INT4 needs opset 21, INT2 opset 25
(run `upgrade_opset` first).
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from mqtool.numerics import int_range
from passes.base import PassResult
from passes.graph import Namer, attr, initializers, producers
from passes.qdq_plan import Container

_DTYPES = {Container.INT4: ml_dtypes.int4, Container.INT2: ml_dtypes.int2}
_UINT8_ZERO = 128


def pack_weights(model: onnx.ModelProto, containers: Mapping[str, Container | str]) -> PassResult:
    """Store the weight of each named layer in its container (in place); INT8 entries are left alone."""
    g = model.graph
    nodes = {n.name: n for n in g.node}
    prod, inits = producers(g), initializers(g)
    namer = Namer(g)
    modified = False
    for layer, container in containers.items():
        container = Container(container)
        if container is Container.INT8:
            continue
        node = nodes.get(layer)
        if node is None:
            raise ValueError(f"pack_weights: no node named '{layer}'")
        # Every weight DequantizeLinear the node reads: one, or W and R of an LSTM/GRU/RNN.
        dqs = [
            prod[i]
            for i in node.input
            if i in prod
            and prod[i].op_type == "DequantizeLinear"
            and prod[i].input[0] in inits
            and _is_weight(inits[prod[i].input[0]])
        ]
        if not dqs:
            raise ValueError(f"pack_weights: layer '{layer}' has no DequantizeLinear weight")
        for dq in dqs:
            _pack(g, namer, inits, layer, dq, container)
        modified = True
    return PassResult(model, modified)


def _pack(g, namer: Namer, inits, layer: str, dq: onnx.NodeProto, container: Container) -> None:
    qmin, qmax = int_range(container.bits, signed=True)
    name = dq.input[0]
    zname = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
    values = numpy_helper.to_array(inits[name]).astype(np.int32)
    zero = numpy_helper.to_array(inits[zname]).astype(np.int32) if zname else None
    if inits[name].data_type != onnx.TensorProto.INT8 or (zero is not None and np.any(zero != 0)):
        raise ValueError(
            f"pack_weights: layer '{layer}' is not an INT8 weight with zero point 0 (packed twice?)"
        )
    if values.size and (values.min() < qmin or values.max() > qmax):
        raise ValueError(f"pack_weights: layer '{layer}' has values outside the {container.value} range")
    if container is Container.UINT8:
        # Same dequantized values: (q + 128) - 128. The zero point is required here: 0 is not the default.
        if zname is None:
            zname = namer(name[:-2] + ".z" if name.endswith(".q") else name + ".z")
            g.initializer.append(onnx.TensorProto())
            inits[zname] = g.initializer[-1]
            while len(dq.input) < 3:
                dq.input.append("")
            dq.input[2] = zname
        channels = values.shape[int(attr(dq, "axis", 1)) % values.ndim] if values.ndim else 1
        values, zero = (values + _UINT8_ZERO).astype(np.uint8), np.full(channels, _UINT8_ZERO, np.uint8)
    else:
        values = values.astype(np.int8).astype(_DTYPES[container])
        zero = zero.astype(np.int8).astype(_DTYPES[container]) if zero is not None else None
    inits[name].CopyFrom(numpy_helper.from_array(values, name))
    if zero is not None:
        inits[zname].CopyFrom(numpy_helper.from_array(zero, zname))


def _is_weight(t: onnx.TensorProto) -> bool:
    return t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.INT2)
