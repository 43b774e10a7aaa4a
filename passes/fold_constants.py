"""Turn `Constant` nodes and constant subgraphs into initializers.

Uses `mqtool.model.constant_values`, the same folding `analyze` relies on, so a weight computed by
`ConstantOfShape` (the zoo models) becomes an initializer under the tensor name `inspect` reports.

Before::

    Constant <value=[64]> -> shape
    ConstantOfShape <value=0.02>(shape) -> W
    Conv(x, W) -> y

After::

    initializer W = full([64], 0.02)
    Conv(x, W) -> y

Nodes that write a graph output are kept (an output must be produced by a node to stay an output).
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from mqtool.model import constant_values
from passes.base import PassResult
from passes.graph import remove_nodes, subgraph_inputs


def fold_constants(model: onnx.ModelProto) -> PassResult:
    """Replace every node whose outputs are all known constants by initializers (in place)."""
    g = model.graph
    values = constant_values(model)
    outputs = {o.name for o in g.output}
    folded = [
        k
        for k, n in enumerate(g.node)
        if n.output and all(o in values for o in n.output if o) and not any(o in outputs for o in n.output)
    ]
    if not folded:
        return PassResult(model, False)
    gone = set(folded)
    needed = {i for k, n in enumerate(g.node) if k not in gone for i in n.input} | subgraph_inputs(g)
    existing = {i.name for i in g.initializer}
    g.initializer.extend(
        numpy_helper.from_array(values[o], o)
        for k in folded
        for o in g.node[k].output
        if o and o in needed and o not in existing
    )
    remove_nodes(g, folded)
    return PassResult(model, True)
