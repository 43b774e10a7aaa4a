"""Shorten internal names: the `packed` storage mode's last step, for the smallest file.

In a small model the names cost more than the weights: mnist_vit's float graph holds ~25 KB of names like
`/blocks.0/attn/Reshape_output_0` next to 60 KB of packed weights. Every tensor that is not a graph input or
output is renamed `t<base-36 index>` (in order of first appearance: deterministic), and nodes lose their
names, except the nodes in `keep` (the quantizable layers: policies, `report` and `validate` find layers
by node name). Graph inputs and outputs keep their names, so the model's interface does not change.

Before::    Reshape "/blocks.0/attn/Reshape"(/blocks.0/attn/q/MatMul_output_0, /blocks.0/attn/Concat_output_0)
                -> /blocks.0/attn/Reshape_output_0
After::     Reshape(t1k, t1j) -> t1l

Names read inside subgraphs (If/Loop bodies) are renamed there too.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from mqtool.model import nested_graphs
from passes.base import PassResult

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def compact_names(model: onnx.ModelProto, keep: Iterable[str] = ()) -> PassResult:
    """Rename internal tensors to short names and drop node names outside `keep` (in place)."""
    g = model.graph
    keep = set(keep)
    fixed = {v.name for v in g.input} | {v.name for v in g.output}
    taken = set(fixed) | _subgraph_names(g)
    mapping: dict[str, str] = {}
    counter = 0

    def short(name: str) -> str:
        nonlocal counter
        if not name or name in fixed:
            return name
        if name not in mapping:
            while True:
                new = "t" + np.base_repr(counter, 36).lower()
                counter += 1
                if new not in taken:
                    break
            taken.add(new)
            mapping[name] = new
        return mapping[name]

    for init in g.initializer:
        init.name = short(init.name)
    for node in g.node:
        for k, i in enumerate(node.input):
            node.input[k] = short(i)
        for k, o in enumerate(node.output):
            node.output[k] = short(o)
        if node.name not in keep:
            node.name = ""
        for sub in nested_graphs(node):
            _rename_in_subgraph(sub, mapping)
    for vi in g.value_info:
        vi.name = short(vi.name)
    modified = bool(mapping) or any(not n.name for n in g.node)
    return PassResult(model, modified)


def _subgraph_names(g: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for n in g.node:
        for sub in nested_graphs(n):
            for m in sub.node:
                names.update(m.input)
                names.update(m.output)
            names.update(i.name for i in sub.initializer)
            names.update(v.name for v in sub.input)
            names.update(v.name for v in sub.output)
    return names


def _rename_in_subgraph(sub: onnx.GraphProto, mapping: dict[str, str]) -> None:
    # Only outer-scope names are in `mapping`; a subgraph's own names are left alone. Nested bodies are
    # visited by the caller (`nested_graphs` reaches every depth).
    for n in sub.node:
        for k, i in enumerate(n.input):
            if i in mapping:
                n.input[k] = mapping[i]
    for o in sub.output:
        if o.name in mapping:
            o.name = mapping[o.name]
