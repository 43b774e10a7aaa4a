"""Write `mqtool.model.scoped_graphs` names into every node (subgraphs too): the names `inspect` prints.

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

from mqtool.model import scoped_graphs
from passes.base import PassResult


def name_nodes(model: onnx.ModelProto) -> PassResult:
    """Name every node, subgraphs (If/Loop bodies) included, as `inspect` and policies do (in place)."""
    modified = False
    for scoped in scoped_graphs(model.graph):
        for node, name in zip(scoped.graph.node, scoped.names):
            if node.name != name:
                node.name = name
                modified = True
    return PassResult(model, modified)
