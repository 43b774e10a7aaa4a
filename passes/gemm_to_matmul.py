"""Rewrite a weight-only quantized Gemm as MatMul + Add, so ONNX Runtime fuses it into MatMulNBits.

ORT fuses DequantizeLinear + MatMul (weight-only) into `com.microsoft.MatMulNBits` but never a Gemm.

Before::

    DequantizeLinear <axis=0>(Wq [N, K], s, z) -> Wd
    Gemm "fc" <transB=1>(x, Wd, C) -> y

After::

    DequantizeLinear <axis=1>(Wq^T [K, N], s, z) -> Wd
    MatMul "fc"(x, Wd) -> fc_MatMul_Output
    Add "fc_bias_Add"(fc_MatMul_Output, C) -> y

The integer weight is transposed exactly (per-channel scales follow the N axis; block-wise scales and zero
points, which have the weight's rank, are transposed with it and stay on the K axis), the MatMul keeps the
layer's name and the Add writes the Gemm's output tensor. Only Gemms that are exactly MatMul + C
(`qdq_plan.gemm_as_matmul_ok`) with a DequantizeLinear weight are rewritten.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import helper, numpy_helper

from passes.base import PassResult
from passes.graph import Namer, attr, consumers, initializers, producers, set_attr, toposort
from passes.qdq_plan import gemm_as_matmul_ok


def gemm_to_matmul(model: onnx.ModelProto, layers: Iterable[str] = ()) -> PassResult:
    """Rewrite the Gemm nodes named in `layers` (in place); others are left alone."""
    wanted = set(layers)
    if not wanted:
        return PassResult(model, False)
    g = model.graph
    namer = Namer(g)
    prod, cons, inits = producers(g), consumers(g), initializers(g)
    modified = False
    for node in list(g.node):
        if node.op_type != "Gemm" or node.name not in wanted or not gemm_as_matmul_ok(node, g):
            continue
        dq = prod.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(cons[node.input[1]]) != 1:
            continue
        if attr(node, "transB", 0):
            q = inits[dq.input[0]]
            blocked = bool(attr(dq, "block_size", 0))
            # Block-wise scales and zero points have the weight's rank: they are transposed with it.
            moved = [q] + [inits[i] for i in dq.input[1:3] if i and blocked]
            if any(len(cons[t.name]) != 1 for t in moved):
                continue
            for t in moved:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).T.copy(), t.name))
            set_attr(dq, "axis", 0 if blocked else 1)
        out = node.output[0]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        mm_out = namer(f"{node.name}_MatMul_Output") if bias else out
        new = [helper.make_node("MatMul", [node.input[0], node.input[1]], [mm_out], node.name)]
        if bias:
            new.append(helper.make_node("Add", [mm_out, bias], [out], namer(f"{node.name}_bias_Add")))
        g.node.remove(node)
        g.node.extend(new)
        modified = True
    if modified:
        toposort(g)
    return PassResult(model, modified)
