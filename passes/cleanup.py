"""Remove what no graph output depends on, and graph inputs that merely shadow initializers.

Before::

    inputs: x, W (W is also an initializer: old IR, lets a caller override the weight)
    Conv(x, W) -> y     Shape(x) -> unused     initializer Z (read by nobody)

After::

    inputs: x
    Conv(x, W) -> y

Shadowing inputs go because ONNX Runtime treats them as overridable: it then neither constant-folds nor
fuses the QDQ weights behind them. IR >= 4 allows initializers that are not inputs, so the IR is raised to
4 when needed. Real (non-initializer) graph inputs stay even when unused: they are the model's interface.
`value_info` entries of tensors that no longer exist are dropped.
"""

from __future__ import annotations

import onnx

from passes.base import PassResult
from passes.graph import remove_nodes, subgraph_inputs

# First IR version that lets an initializer exist without a graph input of the same name.
_IR_INITIALIZERS_NOT_INPUTS = 4


def cleanup(model: onnx.ModelProto, keep_value_info: bool = True) -> PassResult:
    """Drop dead nodes, unused initializers, shadowing inputs and stale value_info (in place).

    With `keep_value_info=False` all value_info goes (ORT re-infers shapes; emission saves the bytes)."""
    g = model.graph
    modified = False
    inits = {i.name for i in g.initializer}
    shadow = [vi for vi in g.input if vi.name in inits]
    if shadow:
        keep_inputs = [vi for vi in g.input if vi.name not in inits]
        del g.input[:]
        g.input.extend(keep_inputs)
        if model.ir_version < _IR_INITIALIZERS_NOT_INPUTS:
            model.ir_version = _IR_INITIALIZERS_NOT_INPUTS
        modified = True

    # Backward liveness from the graph outputs (and anything a subgraph reads from the outer scope).
    live = {o.name for o in g.output} | subgraph_inputs(g)
    dead_nodes = []
    for k in range(len(g.node) - 1, -1, -1):
        n = g.node[k]
        if any(o in live for o in n.output if o):
            live.update(i for i in n.input if i)
        else:
            dead_nodes.append(k)
    remove_nodes(g, dead_nodes)
    modified |= bool(dead_nodes)

    # Delete in place (reverse index order) rather than rebuilding the list: no copy of large weights.
    dead = [k for k, i in enumerate(g.initializer) if i.name not in live]
    for k in reversed(dead):
        del g.initializer[k]
    modified |= bool(dead)

    existing = live | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    stale = [k for k, vi in enumerate(g.value_info) if vi.name not in existing or not keep_value_info]
    for k in reversed(stale):
        del g.value_info[k]
    modified |= bool(stale)
    return PassResult(model, modified)
