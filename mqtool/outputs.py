"""What each graph output of a model *is*, so that objectives and fidelity checks treat it for what it is.

A pretrained model's outputs come in kinds that need different measures: logits (compare the softmax),
probabilities (the graph ends in Softmax: compare them as they are, never re-softmax), log-probabilities,
independent probabilities (Sigmoid: per element), distributions per position (`[N, T, C]`, or time-major
`[T, N, C]`: one distribution per position, never one flattened distribution), embeddings and regression
outputs (cosine, normalised error), integer outputs (ArgMax/TopK at the end: the float tensor that feeds
them is what is compared), and outputs that hold no samples (a recurrent state: not scored).

`plan_outputs` decides from the graph alone which tensor stands for each output and what its structure
says; `classify` refines that with the fp32 values (per sample, sample axis first) and gives each output a
`OutputSpec` with the reason for its kind. No torch here: the search's objective and the ONNX Runtime
self-check both build on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
import onnx

from mqtool.errors import InputError


class OutputKind(StrEnum):
    LOGITS = "logits"
    PROBS = "probabilities"
    LOG_PROBS = "log-probabilities"
    SIGMOID = "independent probabilities"
    REGRESSION = "regression"
    EMBEDDING = "embedding"
    NONE = "not scored"


DISTRIBUTIONS = (OutputKind.LOGITS, OutputKind.PROBS, OutputKind.LOG_PROBS)

# Ops that move, reshape or copy values without computing new ones: an output behind them is what the op
# before them made (a Softmax followed by a Reshape is still probabilities).
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast", "Dropout"}
_INTEGER_HEADS = {"ArgMax", "ArgMin", "TopK"}
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@dataclass(frozen=True)
class OutputPlan:
    """What the graph says about one output: the float tensor that stands for it (`source`; the output itself
    unless it is an integer head), the op that made the values, and a structural kind when the op decides it."""

    name: str
    source: str
    producer: str  # op type that computed the values (after pass-through ops); "" for a graph input
    kind: OutputKind | None  # decided by the structure alone (Softmax, LogSoftmax, Sigmoid), else None
    reason: str
    softmax_last_axis: bool = True  # a Softmax/LogSoftmax over the last axis (else over another one)


@dataclass(frozen=True)
class OutputSpec:
    """An output's kind and how it is scored. `source` is the tensor compared (see `OutputPlan`); per sample,
    the distribution axis of a distribution kind is the last one and the other axes are positions."""

    name: str
    source: str
    kind: OutputKind
    reason: str
    weight: float = 1.0

    def describe(self) -> str:
        via = f" (scored on '{self.source}')" if self.source != self.name else ""
        return f"{self.name}: {self.kind.value}{via}: {self.reason}"


def plan_outputs(model: onnx.ModelProto) -> list[OutputPlan]:
    """One `OutputPlan` per graph output, in graph order, from the graph structure alone."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.value_info, *g.output, *g.input)}
    plans = []
    for out in g.output:
        source, note = out.name, ""
        node = prod.get(source)
        # an integer head: the float tensor it reads
        steps = 0
        while node is not None and steps < 16 and node.op_type in _PASS_THROUGH | _INTEGER_HEADS:
            if node.op_type in _INTEGER_HEADS:
                source = node.input[0]
                note = f"ends in {node.op_type}: its float input '{source}' is compared"
                node = prod.get(source)
                break
            node = prod.get(node.input[0]) if node.input else None
            steps += 1
        if source == out.name and types.get(out.name, onnx.TensorProto.FLOAT) not in _FLOAT_TYPES:
            plans.append(
                OutputPlan(out.name, out.name, "", OutputKind.NONE, "integer output with no float source")
            )
            continue
        node = prod.get(source)
        produced = source  # the tensor `node` writes (an Identity after an If reads one of its outputs)
        steps = 0
        while node is not None and steps < 16 and node.op_type in _PASS_THROUGH:
            produced = node.input[0] if node.input else ""
            node = prod.get(produced)
            steps += 1
        op = node.op_type if node is not None else ""
        if op == "If":  # what the branches compute (the then-branch stands for both)
            node, op = _branch_producer(node, produced)
        kind, reason, last = None, note, True
        if op in ("Softmax", "LogSoftmax"):
            axis = _axis(node, -1)
            last = axis == -1 or _is_last_axis(g, node.input[0], axis)
            kind = OutputKind.PROBS if op == "Softmax" else OutputKind.LOG_PROBS
            reason = _join(note, f"the graph ends in {op}")
        elif op == "Sigmoid":
            kind, reason = OutputKind.SIGMOID, _join(note, "the graph ends in Sigmoid")
        plans.append(OutputPlan(out.name, source, op, kind, reason, last))
    return plans


def classify(
    plans: Sequence[OutputPlan],
    teacher: Mapping[str, np.ndarray | None],
    *,
    metric: str | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[OutputSpec]:
    """Each output's `OutputSpec` from its plan and its fp32 values `teacher[name]` (sample axis first; None
    when the output holds no samples, e.g. a recurrent state). `metric` forces every scored output to
    "kl" (distributions as detected, regression otherwise), "cosine" (embeddings) or "sqnr" (regression)."""
    weights = dict(weights or {})
    unknown = set(weights) - {p.name for p in plans}
    if unknown:
        raise InputError(
            f"objective.output_weights: no graph output named '{sorted(unknown)[0]}' "
            f"(outputs: {', '.join(p.name for p in plans)})",
            field="objective.output_weights",
        )
    specs = []
    for p in plans:
        values = teacher.get(p.name)
        w = float(weights.get(p.name, 1.0))
        if p.kind is OutputKind.NONE:
            specs.append(OutputSpec(p.name, p.source, OutputKind.NONE, p.reason, 0.0))
            continue
        if values is None:
            specs.append(
                OutputSpec(p.name, p.source, OutputKind.NONE, "holds no samples (a state?): not scored", 0.0)
            )
            continue
        kind, reason = _kind_of(p, np.asarray(values))
        if p.kind is None and p.reason:  # an integer head's note, then what the values say
            reason = _join(p.reason, reason)
        if metric in ("cosine",):
            kind, reason = OutputKind.EMBEDDING, "cosine asked for (objective.metric)"
        elif metric in ("sqnr",):
            kind, reason = OutputKind.REGRESSION, "sqnr asked for (objective.metric)"
        if w == 0.0:
            kind, reason = OutputKind.NONE, "weight 0 (objective.output_weights)"
        specs.append(OutputSpec(p.name, p.source, kind, reason, w if kind is not OutputKind.NONE else 0.0))
    if not any(s.kind is not OutputKind.NONE for s in specs):
        raise InputError(
            "model: no output can be scored (every output is an integer without a float source, holds no "
            "samples, or has weight 0)",
            field="model",
        )
    return specs


def _kind_of(p: OutputPlan, v: np.ndarray) -> tuple[OutputKind, str]:
    """The kind from the structure when it decides, checked against the values; else from the values."""
    per_sample = v.shape[1:]
    finite = v[np.isfinite(v)] if v.size else v
    if p.kind is OutputKind.PROBS or p.kind is OutputKind.LOG_PROBS:
        if not p.softmax_last_axis:
            return OutputKind.REGRESSION, _join(
                p.reason, "but not over the last axis: compared as regression"
            )
        return p.kind, p.reason
    if p.kind is OutputKind.SIGMOID:
        return OutputKind.SIGMOID, p.reason
    if len(per_sample) == 0 or (per_sample and per_sample[-1] == 1 and int(np.prod(per_sample)) == 1):
        if p.producer in ("If", "ReduceMean") and finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            # silero-vad: its speech probability is a ReduceMean of a nested If's output, which the plan
            # cannot see through; read as regression, its 4-bit file was warned about (an SQNR 13 dB under
            # 8-bit's) while 98.5% of its speech decisions held
            return OutputKind.SIGMOID, f"one value in [0, 1] per sample from {p.producer}: a probability"
        return OutputKind.REGRESSION, "one value per sample"
    last = per_sample[-1]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 and last > 1:
        sums = v.sum(axis=-1)
        if np.allclose(sums, 1.0, atol=1e-3):
            return OutputKind.PROBS, "values in [0, 1] summing to 1 on the last axis"
        return OutputKind.SIGMOID, "values in [0, 1] that do not sum to 1 on the last axis"
    if finite.size and finite.max() <= 1e-6 and last > 1:
        lse = np.log(np.exp(v.astype(np.float64)).sum(axis=-1))
        if np.allclose(lse, 0.0, atol=1e-3):
            return OutputKind.LOG_PROBS, "values <= 0 whose exp sums to 1 on the last axis"
    if len(per_sample) == 1 and last >= 8 and finite.size:
        norms = np.linalg.norm(v.reshape(len(v), -1).astype(np.float64), axis=1)
        if np.allclose(norms, 1.0, atol=1e-3):
            return OutputKind.EMBEDDING, f"unit-norm vectors of {last} values: compared by cosine"
    # Logits have their classes last and few positions before them ([C], [T, C], [T, 1, C]); a Conv output
    # with many positions and few channels is a feature map or a box head, compared as regression.
    positions = int(np.prod(per_sample[:-1])) if len(per_sample) > 1 else 1
    dense = p.producer in ("Gemm", "MatMul", "Add", "Einsum") and (last >= 16 or positions <= last)
    conv_head = p.producer == "Conv" and positions <= last
    if last >= 2 and (dense or conv_head):
        where = f"per position ({positions} positions)" if positions > 1 else "per sample"
        return OutputKind.LOGITS, f"unnormalised scores from {p.producer} over {last} classes, {where}"
    return (
        OutputKind.REGRESSION,
        f"{p.producer or 'input'} output of shape {list(per_sample)}: compared as regression",
    )


def _branch_producer(node: onnx.NodeProto, tensor: str) -> tuple[onnx.NodeProto | None, str]:
    """The node of an If's then-branch that computes the branch output matching `tensor`, past pass-through
    ops; (None, "If") when the branch does not say."""
    k = list(node.output).index(tensor)
    branch = next((a.g for a in node.attribute if a.name == "then_branch"), None)
    if branch is None or k >= len(branch.output):
        return None, "If"
    prod = {o: n for n in branch.node for o in n.output}
    inner = prod.get(branch.output[k].name)
    steps = 0
    while inner is not None and steps < 16 and inner.op_type in _PASS_THROUGH:
        inner = prod.get(inner.input[0]) if inner.input else None
        steps += 1
    return (inner, inner.op_type) if inner is not None else (None, "If")


def _axis(node: onnx.NodeProto, default: int) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return default


def _is_last_axis(g: onnx.GraphProto, tensor: str, axis: int) -> bool:
    for vi in (*g.value_info, *g.output, *g.input):
        if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
            return axis == len(vi.type.tensor_type.shape.dim) - 1
    return False


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def with_weight(spec: OutputSpec, weight: float) -> OutputSpec:
    return replace(spec, weight=weight)


def output_sample_axes(
    one: Sequence[tuple[int, ...]], two: Sequence[tuple[int, ...]], k1: int = 1, k2: int = 2
) -> list[int | None]:
    """Each output's sample axis, from its shapes in a run of `k1` samples (`one`) and of `k2` (`two`): the
    one axis whose size went from k1 to k2; None when the shapes are equal (the output holds no samples, e.g.
    a recurrent state). Anything else (several axes changed, or sizes not k1 -> k2) is ambiguous: an
    InputError naming the output's position, since the sample axis is what per-sample measures need."""
    axes: list[int | None] = []
    for i, (a, b) in enumerate(zip(one, two)):
        if tuple(a) == tuple(b):
            axes.append(None)
            continue
        changed = [d for d, (x, y) in enumerate(zip(a, b)) if x != y] if len(a) == len(b) else None
        if not changed or len(changed) != 1 or (a[changed[0]], b[changed[0]]) != (k1, k2):
            raise InputError(
                f"model: output {i} has shape {list(a)} for {k1} sample(s) and {list(b)} for {k2}: cannot tell "
                "which axis counts samples",
                field="model",
            )
        axes.append(changed[0])
    return axes


def sample_major(value: np.ndarray, axis: int | None) -> np.ndarray | None:
    """`value` with its sample axis first (None: the output holds no samples)."""
    return None if axis is None else np.moveaxis(value, axis, 0)


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The channel axis of a sample-major regression output of `shape` ([N, ...]): its smallest per-sample
    axis when there are several and it is at most 64 wide (a detector's box and class rows), else None.
    The objective normalises errors per such channel and the fidelity reports its worst channel."""
    per_sample = tuple(shape[1:])
    if len(per_sample) < 2 or min(per_sample) > 64:
        return None
    return 1 + int(min(range(len(per_sample)), key=per_sample.__getitem__))
