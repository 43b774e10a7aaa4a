"""Loading ONNX models safely, naming their nodes stably, and reading their constant tensors.

Loading never trusts the file: external-data locations that are absolute or escape the model's folder
(`..`, symlinks) are refused before any byte is read (the ONNX external-data path-traversal CVEs), and
every failure becomes an `InputError` that names the file.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import TensorProto, numpy_helper

from mqtool.errors import InputError

log = logging.getLogger(__name__)

# Protobuf cannot serialise a ModelProto of 2 GiB or more; onnx checks such models by path instead.
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(
    path: str | os.PathLike, *, check: bool = True, allow_quantized: bool = False
) -> onnx.ModelProto:
    """Read the model at `path` (with its external data, if any), run the ONNX checker, return it.

    Raises `InputError` naming `path` for a missing/empty/corrupt file, unsafe or missing external data,
    a graph that fails the checker, or, unless `allow_quantized`, a model that is already quantized
    (`quantized_nodes`): quantizing it again would stack a second rounding on the first. Readers of
    quantized models (report, validate, inspect) pass `allow_quantized=True`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file, expected an ONNX model")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-ish errors, ValueError...
        raise InputError(
            f"{path}: not a valid ONNX model (truncated or corrupt protobuf: {_short(e)})"
        ) from e
    if not model.HasField("graph") or model.ir_version == 0:
        raise InputError(f"{path}: not an ONNX model (no graph or IR version in the protobuf)")
    base = os.path.dirname(os.path.abspath(path))
    external = list(_external_tensors(model))
    for tensor in external:
        _check_external_location(path, base, tensor)
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, base)
        except Exception as e:
            raise InputError(f"{path}: cannot read external data ({_short(e)})") from e
    if check:
        try:
            check_model(model, path)
        except InputError:
            _check_ops(model, path)  # the checker names the first unknown op only: list them all
            raise
        for tensor in _all_tensors(model):  # decode each once: the checker does not look at the bytes
            tensor_value(tensor, path)
    if not allow_quantized:
        refuse_quantized(model, path)
    return model


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Whether `model` is too large to be one protobuf (2 GiB): it must be checked, run and saved through a
    file with external data. Above the limit upb's `ByteSize` raises instead of answering."""
    try:
        return model.ByteSize() >= _PROTOBUF_LIMIT
    except EncodeError:
        return True


def check_model(model: onnx.ModelProto, source: str = "model") -> None:
    """Run `onnx.checker.check_model`; raise `InputError` naming `source` when it fails."""
    try:
        if not over_protobuf_limit(model):
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(source)
    except Exception as e:
        raise InputError(f"{source}: fails the ONNX checker: {_short(e)}") from e


def _check_ops(model: onnx.ModelProto, path: str) -> None:
    """Every op of an ONNX domain that its opset does not define, in one `InputError` (the checker stops at
    the first one). Ops of other domains are left to ONNX Runtime."""
    opsets = {i.domain or "ai.onnx": i.version for i in model.opset_import}
    functions = {(f.domain, f.name) for f in model.functions}
    unknown: dict[str, list[str]] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for i, node in enumerate(graph.node):
            if not all(isinstance(v, str) for v in (node.op_type, node.domain, node.name)):
                continue  # invalid UTF-8 in a corrupt file: the checker's message stands
            name, domain = node.name or f"{node.op_type}_{i}", node.domain or "ai.onnx"
            if domain in ("ai.onnx", "ai.onnx.ml") and (node.domain, node.op_type) not in functions:
                try:
                    schema_domain = "" if domain == "ai.onnx" else domain
                    onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), schema_domain)
                except onnx.defs.SchemaError:
                    op = node.op_type if domain == "ai.onnx" else f"{domain}.{node.op_type}"
                    unknown.setdefault(op, []).append(name)
            for _, g in subgraphs(node):
                walk(g)

    try:
        walk(model.graph)
    except (
        Exception
    ):  # e.g. an opset version out of int range in a corrupt file: the checker's message stands
        return
    if unknown:
        ops = ", ".join(
            f"{op} ({'node' if len(n) == 1 else f'{len(n)} nodes'}: {', '.join(n[:3])})"
            for op, n in sorted(unknown.items())
        )
        raise InputError(f"{path}: unsupported ops (not in ONNX opset {opsets.get('ai.onnx')}): {ops}")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _external_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for tensor in _all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            yield tensor


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for graph in all_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _check_external_location(path: str, base: str, tensor: TensorProto) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"{path}: tensor '{tensor.name}' external data location '{location}'"
    if not location:
        raise InputError(f"{where}: missing")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise InputError(f"{where}: absolute paths are refused")
    target = os.path.normpath(os.path.join(base, location))
    real_base = os.path.realpath(base)
    real_target = os.path.realpath(target)
    if os.path.commonpath([real_base, real_target]) != real_base or real_target == real_base:
        raise InputError(f"{where}: escapes the model's folder (refused)")
    if not os.path.isfile(real_target):
        raise InputError(f"{where}: no such file next to the model")
    size = os.path.getsize(real_target)
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") else size - offset
    except ValueError as e:
        raise InputError(f"{where}: offset/length are not integers") from e
    if offset < 0 or length < 0 or offset + length > size:
        raise InputError(f"{where}: offset {offset} + length {length} exceeds the file size {size}")


def node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique, stable name for every node of `graph`, in node order.

    Named nodes keep their name; unnamed ones get `<OpType>_<index>`; a repeated name gets `__<k>`
    appended. The same file always yields the same names, so a policy written against `inspect`'s
    names applies to the emitted model.
    """
    taken = {n.name for n in graph.node if n.name}
    seen: set[str] = set()
    names = []
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if not node.name:
            while name in taken:
                name += "_"
        base, k = name, 1
        while name in seen:
            name = f"{base}__{k}"
            k += 1
        seen.add(name)
        names.append(name)
    return names


def assign_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Write the names of `scoped_graphs` into every node of `model`, subgraphs included (in place), and
    return it."""
    for scoped in scoped_graphs(model.graph):
        for node, name in zip(scoped.graph.node, scoped.names):
            node.name = name
    return model


# ------------------------------------------------------------------------------------------- subgraphs
# The one place that reads graph-valued attributes (If branches, Loop and Scan bodies): everything else
# walks subgraphs through these helpers.

Scope = tuple[tuple[str, str], ...]


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """(key, graph) of each graph held by `node`'s attributes: If's `then_branch`/`else_branch`, Loop's
    and Scan's `body`. The key is the attribute name (`name[k]` for the k-th graph of a list attribute)."""
    out = []
    for attr in node.attribute:
        if attr.HasField("g"):
            out.append((attr.name, attr.g))
        out.extend((f"{attr.name}[{k}]", g) for k, g in enumerate(attr.graphs))
    return out


def nested_graphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Every graph inside `node` at any depth: its bodies, their nodes' bodies, and so on."""
    for _, g in subgraphs(node):
        yield g
        for n in g.node:
            yield from nested_graphs(n)


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` itself, then every graph nested in its nodes (depth first, in node order)."""
    yield graph
    for node in graph.node:
        yield from nested_graphs(node)


@dataclass(frozen=True)
class ScopedGraph:
    """A graph of the model with the unique names of its nodes.

    `scope` addresses it from the main graph: a path of (node name, attribute key) pairs, () for the main
    graph, `(("If_0", "else_branch"), ("/rnn/If", "then_branch"))` for a branch of an If inside a branch.
    """

    scope: Scope
    graph: onnx.GraphProto
    names: list[str]


def scoped_graphs(graph: onnx.GraphProto) -> list[ScopedGraph]:
    """The main graph and every subgraph (depth first, in node order), with names unique across all.

    The main graph's names are `node_names(graph)`, unchanged by what its subgraphs hold. A subgraph node
    keeps its own name (or `<OpType>_<index>`) when no node named before it has it, else takes its scope
    as a prefix (`If_0/then_branch/Conv_3`), then `__<k>` if that is taken too. Same file, same names.
    """
    main = node_names(graph)
    taken = set(main)
    out = [ScopedGraph((), graph, main)]

    def visit(g: onnx.GraphProto, names: list[str], scope: Scope) -> None:
        for node, name in zip(g.node, names):
            for key, sub in subgraphs(node):
                inner = scope + ((name, key),)
                sub_names = []
                for i, n in enumerate(sub.node):
                    local = n.name or f"{n.op_type}_{i}"
                    candidate = local if local not in taken else f"{name}/{key}/{local}"
                    unique, k = candidate, 1
                    while unique in taken:
                        unique = f"{candidate}__{k}"
                        k += 1
                    taken.add(unique)
                    sub_names.append(unique)
                out.append(ScopedGraph(inner, sub, sub_names))
                visit(sub, sub_names, inner)

    visit(graph, main, ())
    return out


def find_scope(graph: onnx.GraphProto, scope: Scope | list) -> onnx.GraphProto:
    """The subgraph at `scope` (as in `ScopedGraph.scope` or `LayerInfo.subgraph`); KeyError if absent."""
    for scoped in scoped_graphs(graph):
        if scoped.scope == tuple(tuple(step) for step in scope):
            return scoped.graph
    raise KeyError(f"no subgraph at {list(scope)}")


# ------------------------------------------------------------------------------- quantized models

# Ops that only a model that is already quantized holds (ONNX and ONNX Runtime's com.microsoft domain);
# every op whose name starts with "QLinear" counts too.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
        "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4",
        "QGemm", "QAttention", "QOrderedMatMul", "GatherBlockQuantized",
    }
)  # fmt: skip


def is_quantized_op(op_type: str) -> bool:
    return op_type in QUANTIZED_OPS or op_type.startswith("QLinear")


def quantized_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(node name, op type) of every quantization node of `model`, subgraphs included, in graph order."""
    return [
        (name, node.op_type)
        for scoped in scoped_graphs(model.graph)
        for node, name in zip(scoped.graph.node, scoped.names)
        if is_quantized_op(node.op_type)
    ]


def refuse_quantized(model: onnx.ModelProto, source: str = "model") -> None:
    """Raise `InputError` naming `source` and one quantization node when `model` is already quantized."""
    found = quantized_nodes(model)
    if found:
        name, op = found[0]
        more = f" and {len(found) - 1} more quantization nodes" if len(found) > 1 else ""
        raise InputError(
            f"{source}: already quantized (node '{name}' is {op}{more}); mqtool quantizes float models: "
            "give it the float original"
        )


# Ops that are deterministic and cheap to evaluate once at load time when all their inputs are constant.
_FOLDABLE = {
    "Constant",
    "ConstantOfShape",
    "Identity",
    "Cast",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Sqrt",
    "Pow",
    "Flatten",
    "Slice",
    "Gather",
    "Expand",
    "Tile",
    "Range",
    "Shape",
    "Size",
    "DequantizeLinear",
    "Clip",
    "Abs",
    "Exp",
    "Log",
    "Reciprocal",
}


def constant_values(model: onnx.ModelProto, *, fold: bool = True) -> dict[str, np.ndarray]:
    """Values of every tensor of the main graph known without running the model.

    Initializers, `Constant` outputs and, when `fold`, the outputs of deterministic nodes whose inputs are
    all constant (e.g. the zoo models' `ConstantOfShape` weights). Graph inputs that shadow an initializer
    (old IR) count as constants: that is how ONNX Runtime runs them by default.
    """
    return graph_constants(model.graph, {}, _default_opset(model), fold=fold)


def scoped_constants(model: onnx.ModelProto, *, fold: bool = True) -> dict[Scope, dict[str, np.ndarray]]:
    """`constant_values` of every graph of `scoped_graphs`, by scope. A subgraph's dict holds the constants
    it can read: those of its outer scopes, then its own initializers, `Constant` nodes and folded nodes."""
    opset = _default_opset(model)
    out: dict[Scope, dict[str, np.ndarray]] = {}
    for scoped in scoped_graphs(model.graph):
        outer = out[scoped.scope[:-1]] if scoped.scope else {}
        out[scoped.scope] = graph_constants(scoped.graph, outer, opset, fold=fold)
    return out


def graph_constants(
    graph: onnx.GraphProto, outer: dict[str, np.ndarray], opset: int, *, fold: bool = True
) -> dict[str, np.ndarray]:
    """The constants `graph` can read: `outer` (its enclosing scopes' constants) and its own."""
    from onnx.reference import ReferenceEvaluator

    values: dict[str, np.ndarray] = dict(outer)
    for vi in graph.input:  # a Loop body's inputs change per iteration, whatever the outer scope holds
        if vi.name in values and vi.name not in {i.name for i in graph.initializer}:
            del values[vi.name]
    for init in graph.initializer:
        values[init.name] = tensor_value(init)
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = constant_attr_value(node)
            continue
        if not fold or node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE:
            continue
        inputs = [i for i in node.input if i]
        if not inputs or not all(i in values for i in inputs):
            continue
        try:
            evaluator = ReferenceEvaluator(_single_node_model(node, opset))
            feeds = {i: values[i] for i in inputs}
            outs = evaluator.run(None, feeds)
        except Exception as e:  # an odd node stays unfolded; the backend will run it instead
            log.debug("not folding %s (%s): %s", node.name, node.op_type, e)
            continue
        for name, val in zip(node.output, outs):
            if name:
                values[name] = np.asarray(val)
    return values


def tensor_value(tensor: TensorProto, where: str = "model") -> np.ndarray:
    """The array of `tensor`; a tensor whose type or data size does not decode is an `InputError`.

    The ONNX checker does not verify that raw data matches the declared type and shape, so a corrupt file
    can pass it and fail here.
    """
    try:
        return numpy_helper.to_array(tensor)
    except Exception as e:
        raise InputError(
            f"{where}: tensor '{tensor.name}' has invalid data (type {tensor.data_type}, dims "
            f"{list(tensor.dims)}): {_short(e)}"
        ) from e


def constant_attr_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a `Constant` node (any of its value attributes)."""
    if not node.attribute:
        raise InputError(f"node '{node.name}': Constant without a value attribute")
    attr = node.attribute[0]
    if attr.name == "value":
        return tensor_value(attr.t, f"node '{node.name}'")
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    if attr.name == "value_string":
        return np.array(attr.s.decode())
    if attr.name == "value_strings":
        return np.array([s.decode() for s in attr.strings])
    raise InputError(f"node '{node.name}': Constant with unsupported attribute '{attr.name}'")


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return onnx.defs.onnx_opset_version()


def _single_node_model(node: onnx.NodeProto, opset: int) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [onnx.helper.make_empty_tensor_value_info(i) for i in node.input if i],
        [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Inferred shape of every tensor, subgraphs included (None for unknown dims); the model is not
    modified."""
    # onnx serialises the model it infers on; with the weights that was most of the time (1 s of ResNet-50's
    # 100 MB). Shape inference reads only the dims and type of a float weight (data propagation evaluates
    # small integer tensors), so large float initializers go in as typed graph inputs instead. One listed
    # as a graph input already stays (its declared type is what inference uses), and so does every one of
    # an IR < 4 model, where onnx types only the initializers that are also inputs.
    g = model.graph
    listed = {vi.name for vi in g.input}
    big = {
        i.name
        for i in g.initializer
        if i.data_type in FLOAT_TYPES and i.name not in listed and math.prod(i.dims) > _INFER_INLINE_ELEMENTS
    }
    if model.ir_version < 4:
        big = set()
    light = model
    if big:
        light = onnx.ModelProto()
        copy_fields_except(model, light, skip="graph")
        copy_fields_except(g, light.graph, skip="initializer")
        light.graph.initializer.extend(i for i in g.initializer if i.name not in big)
        light.graph.input.extend(
            onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
            for i in g.initializer
            if i.name in big
        )
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception as e:
        log.debug("shape inference failed: %s", e)
        inferred = light
    shapes: dict[str, list[int | None]] = {}
    ig = inferred.graph
    # Subgraphs (If branches, Loop bodies) first: a main-graph name, if a branch reuses it, wins.
    nested = [g for node in ig.node for g in nested_graphs(node)]
    infos = [vi for g in nested for vi in list(g.value_info) + list(g.output)]
    for vi in infos + list(ig.input) + list(ig.value_info) + list(ig.output):
        if vi.name in big:
            continue  # reported with the initializers below, in their order, as before
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
_INFER_INLINE_ELEMENTS = 1024


def copy_fields_except(src, dst, skip: str) -> None:
    """Copy every set field of the message `src` except `skip` into `dst` (same message type)."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        # protobuf 7 dropped FieldDescriptor.label for is_repeated
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def graph_ops(model: onnx.ModelProto) -> Iterable[tuple[str, str]]:
    """(domain, op_type) of every node in the main graph."""
    return [(n.domain or "", n.op_type) for n in model.graph.node]
