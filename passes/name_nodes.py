"""Write `mqtool.model.node_names` into the graph, so every node has the unique name `inspect` prints.

Before::

    Conv(x, W) -> a          (no name)
    Relu(a) -> b  "act"

After::

    Conv(x, W) -> a  "Conv_0"
    Relu(a) -> b     "act"

Run it first: the names of unnamed nodes depend on their position, which later passes change.
"""

from __future__ import annotations

import onnx

from mqtool.model import node_names
from passes.base import PassResult


def name_nodes(model: onnx.ModelProto) -> PassResult:
    """Name every node of the main graph as `inspect` and policies do (in place)."""
    modified = False
    for node, name in zip(model.graph.node, node_names(model.graph)):
        if node.name != name:
            node.name = name
            modified = True
    return PassResult(model, modified)
