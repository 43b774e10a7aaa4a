"""Small helpers over `onnx.GraphProto` shared by the passes: who produces/consumes a tensor, fresh names,
initializer lookup and replacement, attributes. No rewriting policy lives here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

# Quantizable layer ops and the channel axis of their weight live in mqtool.analysis; the passes reuse them.
from mqtool.analysis import QUANTIZABLE_OPS  # noqa: F401  (re-exported for the passes)
from mqtool.model import nested_graphs


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of the main graph that read it (a node reading it twice appears once)."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in dict.fromkeys(x for x in n.input if x):
            out[i].append(n)
    return out


def subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names read inside the subgraphs (If/Loop bodies) of `graph`'s nodes, at any depth.

    A tensor read there is in use even when no main-graph node lists it as an input.
    """
    names: set[str] = set()
    for n in graph.node:
        names |= subgraph_reads(n)
    return names


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names read inside `node`'s subgraphs at any depth: node inputs and subgraph outputs (a branch may
    output an outer tensor as it is)."""
    names: set[str] = set()
    for g in nested_graphs(node):
        for n in g.node:
            names.update(i for i in n.input if i)
        names.update(o.name for o in g.output)
    return names


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name of the main graph (used to make fresh names)."""
    names = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    names |= {o.name for o in graph.output} | {v.name for v in graph.value_info}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
        names.add(n.name)
    names.discard("")
    return names


class Namer:
    """Fresh, deterministic names: `base`, then `base_1`, `base_2`... skipping any name already taken."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = all_names(graph)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in graph.initializer}


def get_array(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def set_initializer(graph: onnx.GraphProto, tensor: onnx.TensorProto) -> None:
    """Add `tensor`, replacing an initializer of the same name if there is one."""
    for i, init in enumerate(graph.initializer):
        if init.name == tensor.name:
            graph.initializer[i].CopyFrom(tensor)
            return
    graph.initializer.append(tensor)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def remove_nodes(graph: onnx.GraphProto, indices) -> None:
    """Delete the nodes at `indices` in place (highest first). Index-based on purpose: protobuf wrapper
    objects are recreated on access, so `id(node)` is not a stable identity."""
    for k in sorted(set(indices), reverse=True):
        del graph.node[k]


def replace_input(graph: onnx.GraphProto, old: str, new: str) -> int:
    """Make every main-graph node read `new` instead of `old`; returns how many inputs changed."""
    count = 0
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new
                count += 1
    return count


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def iter_float_inputs(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    inits = {i.name for i in graph.initializer}
    for vi in graph.input:
        if vi.name not in inits:
            yield vi


def toposort(graph: onnx.GraphProto) -> bool:
    """Reorder `graph.node` topologically, keeping the existing order wherever it is already valid.

    Passes append new nodes at the end; ONNX requires producers before readers. Returns whether the order
    changed. Raises ValueError on a cycle.
    """
    import heapq

    nodes = list(graph.node)
    writer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    deps: list[set[int]] = []
    for k, n in enumerate(nodes):
        reads = {i for i in n.input if i} | subgraph_reads(n)
        deps.append({writer[i] for i in reads if i in writer and writer[i] != k})
    readers: dict[int, list[int]] = defaultdict(list)
    for k, d in enumerate(deps):
        for j in d:
            readers[j].append(k)
    missing = [len(d) for d in deps]
    ready = [k for k, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers[k]:
            missing[r] -= 1
            if missing[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle")
    if order == list(range(len(nodes))):
        return False
    reordered = [onnx.NodeProto() for _ in nodes]
    for dst, k in zip(reordered, order):
        dst.CopyFrom(nodes[k])
    del graph.node[:]
    graph.node.extend(reordered)
    return True
