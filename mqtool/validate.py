"""Validating a quantized model against its float reference on ONNX Runtime (CPU).

- Outputs: for every model output, SQNR (dB) = 10 log10(sum ref^2 / sum (ref - q)^2) and cosine similarity
  over all samples; top-1 agreement and (with labels `y`) top-1 accuracy of both, from the first output
  when it is [N, classes].
- Kernels: which ORT kernel each quantized layer became at ORT_ENABLE_ALL, read from the optimized graph
  ORT writes to `optimized_model_filepath`: an integer kernel (QLinearConv, QGemm, QLinearMatMul,
  MatMulIntegerToFloat, ...), MatMulNBits (weight-only), or a float op.
- Per layer (optional): the SQNR of each quantized layer's output against the float model's. The observed
  tensor is the layer's output DequantizeLinear when it has one (exposing it keeps ORT's fusion, measured),
  else its float output; in the reference, the same point found by structure (see `_observation_pairs`).
- Latency: median wall time of both models at batch 1 and 32 with 2 intra-op threads, runs interleaved so
  machine load affects both alike.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from mqtool.data import open_data
from mqtool.errors import InputError
from mqtool.model import load_model, node_names
from mqtool.runtime import feed_samples, fixed_batch, ort_session, resize_feed, split_feed

log = logging.getLogger(__name__)

INTEGER_KERNELS = frozenset(
    {
        "QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
        "DynamicQuantizeMatMul", "QLinearConvTranspose",
    }
)  # fmt: skip
NBITS_KERNELS = frozenset({"MatMulNBits"})
THREADS = 2


@dataclass
class OutputCheck:
    name: str
    sqnr_db: float
    cosine: float


@dataclass
class LayerCheck:
    """A quantized layer: the kernel ORT runs it with ("integer", "nbits" or "float") and, with
    --per-layer, the SQNR of its output against the float model."""

    name: str
    kernel: str
    path: str
    sqnr_db: float | None = None


@dataclass
class LatencyCheck:
    batch: int
    reference_ms: float
    quantized_ms: float

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.quantized_ms if self.quantized_ms else 0.0


@dataclass
class ValidationReport:
    samples: int
    reference_top1: float | None
    quantized_top1: float | None
    top1_agreement: float | None
    outputs: list[OutputCheck]
    layers: list[LayerCheck]
    latency: list[LatencyCheck] = field(default_factory=list)

    def to_json(self) -> dict:
        doc = asdict(self)
        for lat, d in zip(self.latency, doc["latency"]):
            d["speedup"] = lat.speedup
        doc["integer_layers"] = sum(1 for layer in self.layers if layer.path == "integer")
        doc["float_layers"] = [layer.name for layer in self.layers if layer.path == "float"]
        return doc

    def text(self) -> str:
        lines = [f"{self.samples} samples"]
        if self.top1_agreement is not None:
            acc = ""
            if self.reference_top1 is not None:
                acc = f"top-1 {self.quantized_top1:.4f} (fp32 {self.reference_top1:.4f}, "
                acc += f"{100 * (self.quantized_top1 - self.reference_top1):+.2f} pt), "
            lines.append(f"{acc}top-1 agreement {self.top1_agreement:.4f}")
        for o in self.outputs:
            lines.append(f"output {o.name}: SQNR {o.sqnr_db:.2f} dB, cosine {o.cosine:.6f}")
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.path] = counts.get(layer.path, 0) + 1
        lines.append("kernels: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for layer in self.layers:
            if layer.path == "float" or layer.sqnr_db is not None:
                sq = f", SQNR {layer.sqnr_db:.2f} dB" if layer.sqnr_db is not None else ""
                lines.append(f"  {layer.name}: {layer.kernel} ({layer.path}){sq}")
        for lat in self.latency:
            lines.append(
                f"latency batch {lat.batch}: fp32 {lat.reference_ms:.3f} ms, quantized {lat.quantized_ms:.3f} ms "
                f"({lat.speedup:.2f}x)"
            )
        return "\n".join(lines)


def validate(
    quantized: str | os.PathLike,
    reference: str | os.PathLike,
    data: str | os.PathLike,
    *,
    per_layer: bool = False,
    latency: bool = True,
    batch_size: int = 250,
    limit: int | None = None,
) -> ValidationReport:
    """Compare the quantized model file with its float reference on the data file (see module doc)."""
    from mqtool.report import report

    qpath, rpath = os.fspath(quantized), os.fspath(reference)
    qmodel, rmodel = load_model(qpath, allow_quantized=True), load_model(rpath)
    q_inputs = [
        i.name for i in qmodel.graph.input if i.name not in {t.name for t in qmodel.graph.initializer}
    ]
    r_inputs = [
        i.name for i in rmodel.graph.input if i.name not in {t.name for t in rmodel.graph.initializer}
    ]
    if q_inputs != r_inputs:
        raise InputError(f"{qpath}: inputs {q_inputs} differ from the reference's {r_inputs}")
    outputs = [o.name for o in rmodel.graph.output]
    if [o.name for o in qmodel.graph.output] != outputs:
        raise InputError(f"{qpath}: outputs differ from the reference's {outputs}")
    ds = open_data(data, rmodel)
    rep = report(qmodel)
    quantized_layers = [r.name for r in rep.layers if r.weight_bits < 32]
    kernels = _kernels(qmodel, quantized_layers)
    pairs = _observation_pairs(qmodel, rmodel, quantized_layers) if per_layer else []

    qsess = _session(qmodel, [q for _, q, _ in pairs])
    rsess = _session(rmodel, [r for _, _, r in pairs])
    q_names = outputs + [q for _, q, _ in pairs]
    r_names = outputs + [r for _, _, r in pairs]
    acc = [_Accumulator() for _ in q_names]
    agree = correct_q = correct_r = n = 0
    labels = ds.labels
    classify = True
    specs = ds.specs
    for feed in ds.batches(batch_size, limit):
        # A model exported with a fixed batch (often 1) runs the batch in slices of that size.
        runs = split_feed(feed, specs)
        rq = _concat([_run(qsess, q_names, run, qpath) for run in runs])
        rr = _concat([_run(rsess, r_names, run, rpath) for run in runs])
        for a, x, y in zip(acc, rr, rq):
            a.update(x, y)
        b = sum(feed_samples(run, specs) for run in runs)
        if classify and rr[0].ndim == 2 and rr[0].shape[0] == b:
            pr, pq = rr[0].argmax(-1), rq[0].argmax(-1)
            agree += int((pr == pq).sum())
            if labels is not None:
                y = labels[n : n + b]
                correct_r += int((pr == y).sum())
                correct_q += int((pq == y).sum())
        else:
            classify = False
        n += b
    if n == 0:
        raise InputError(f"{data}: no samples to validate on")
    outs = [OutputCheck(name, a.sqnr(), a.cosine()) for name, a in zip(outputs, acc)]
    layer_sqnr = {layer: a.sqnr() for (layer, _, _), a in zip(pairs, acc[len(outputs) :])}
    layers = [
        LayerCheck(name, kernels[name], _path(kernels[name]), layer_sqnr.get(name))
        for name in quantized_layers
    ]
    result = ValidationReport(
        samples=n,
        reference_top1=correct_r / n if classify and labels is not None else None,
        quantized_top1=correct_q / n if classify and labels is not None else None,
        top1_agreement=agree / n if classify else None,
        outputs=outs,
        layers=layers,
    )
    if latency:
        result.latency = _latency(qmodel, rmodel, ds)
    return result


class _Accumulator:
    """Streaming sums for SQNR and cosine (float64)."""

    def __init__(self):
        self.ref2 = self.err2 = self.dot = self.q2 = 0.0

    def update(self, ref: np.ndarray, q: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64).ravel()
        x = np.asarray(q, dtype=np.float64).ravel()
        self.ref2 += float(r @ r)
        self.q2 += float(x @ x)
        self.dot += float(r @ x)
        d = r - x
        self.err2 += float(d @ d)

    def sqnr(self) -> float:
        if self.err2 == 0:
            return math.inf
        if self.ref2 == 0:
            return -math.inf
        return 10 * math.log10(self.ref2 / self.err2)

    def cosine(self) -> float:
        den = math.sqrt(self.ref2 * self.q2)
        return self.dot / den if den else (1.0 if self.ref2 == self.q2 else 0.0)


def _session(model: onnx.ModelProto, extra_outputs: list[str]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    return ort_session(model, so, outputs=extra_outputs)


def _concat(per_run: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each output's values over the runs of one batch, joined on axis 0 (scalars stacked)."""
    if len(per_run) == 1:
        return per_run[0]
    return [np.concatenate([np.atleast_1d(r[k]) for r in per_run]) for k in range(len(per_run[0]))]


def _run(sess, names, feed, path):
    try:
        return sess.run(names, feed)
    except Exception as e:
        raise InputError(
            f"{path}: fails in ONNX Runtime on the data: {' '.join(str(e).split())[:300]}"
        ) from e


def _path(kernel: str) -> str:
    if kernel in INTEGER_KERNELS:
        return "integer"
    if kernel in NBITS_KERNELS:
        return "nbits"
    return "float"


def _kernels(model: onnx.ModelProto, layers: list[str]) -> dict[str, str]:
    """Layer name -> the op ORT runs it as at ORT_ENABLE_ALL (read from its optimized graph)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = out
        # Weights go to a side file: a > 2 GiB optimized model cannot be one protobuf, and only ops are read.
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
        so.log_severity_level = 3
        ort_session(model, so)
        opt = onnx.load(out, load_external_data=False)
    by_name = {n.name: n for n in opt.graph.node}
    weights = _layer_weights(model)
    result = {}
    for layer in layers:
        node = by_name.get(layer)
        if node is None:
            token = re.compile(re.escape(layer) + r"_token_\d+$")
            node = next((n for n in opt.graph.node if token.match(n.name)), None)
        if node is None and layer in weights:
            node = next((n for n in opt.graph.node if weights[layer] in n.input), None)
        result[layer] = node.op_type if node is not None else "?"
    return result


def _layer_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name -> its quantized weight initializer (a fallback to find the layer in ORT's graph)."""
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        for i in n.input:
            p = prod.get(i)
            if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits and n.name:
                out.setdefault(n.name, p.input[0])
    return out


def _observation_pairs(qmodel, rmodel, layers: list[str]) -> list[tuple[str, str, str]]:
    """(layer, tensor in the quantized model, tensor in the reference) for each quantized layer.

    Found by structure, not tensor names (packed models have compacted names): from the layer node (same
    name in both; the reference named as `inspect` names it) follow the single reader through Relu/Clip and
    a bias Add up to the layer's output QuantizeLinear (observing its DequantizeLinear), and take as many
    steps in the reference - not counting the k-bit saturation Clip emission adds, letting a rewritten
    Gemm's bias Add match the Gemm itself and walking through the reference's unfolded BatchNormalization.
    """
    q, r = _Walker(qmodel.graph), _Walker(rmodel.graph, node_names(rmodel.graph))
    pairs = []
    for layer in layers:
        qn, rn = q.nodes.get(layer), r.nodes.get(layer)
        if qn is None or rn is None:
            continue
        t, steps, qnode = q.walk(qn.output[0])
        if qnode is not None:
            dq = q.single_reader(qnode.output[0])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            t = dq.output[0]
            if steps and steps[-1].op_type == "Clip" and _is_kbit_clip(steps[-1], qnode, q.inits):
                steps = steps[:-1]
        ops = [n.op_type for n in steps]
        if qn.op_type != rn.op_type and ops[:1] == ["Add"]:
            ops = ops[1:]  # MatMul + bias Add emitted for a Gemm: the Gemm already adds its bias
        pairs.append((layer, t, r.follow(rn.output[0], ops)))
    return pairs


class _Walker:
    _PASS = ("Relu", "Clip")

    def __init__(self, g: onnx.GraphProto, names: list[str] | None = None):
        self.nodes = dict(zip(names, g.node)) if names is not None else {n.name: n for n in g.node if n.name}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in dict.fromkeys(n.input):
                self.readers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in g.initializer}
        self.consts = set(self.inits) | {n.output[0] for n in g.node if n.op_type == "Constant"}

    def single_reader(self, t: str) -> onnx.NodeProto | None:
        rs = self.readers.get(t, [])
        return rs[0] if len(rs) == 1 else None

    def _step_ok(self, n: onnx.NodeProto) -> bool:
        return n.op_type in self._PASS or (n.op_type == "Add" and any(i in self.consts for i in n.input))

    def walk(self, t: str) -> tuple[str, list[onnx.NodeProto], onnx.NodeProto | None]:
        """Follow single readers through Relu/Clip/bias Add: (last tensor, the steps, the Q reached)."""
        steps = []
        for _ in range(8):
            n = self.single_reader(t)
            if n is None:
                break
            if n.op_type == "QuantizeLinear":
                return t, steps, n
            if not self._step_ok(n):
                break
            steps.append(n)
            t = n.output[0]
        return t, steps, None

    def follow(self, t: str, ops: list[str]) -> str:
        """Take the steps `ops` from `t` (walking through BatchNormalization); stop where they differ."""
        k = 0
        for _ in range(len(ops) + 8):
            n = self.single_reader(t)
            if n is None:
                break
            if n.op_type == "BatchNormalization":
                t = n.output[0]
                continue
            if k >= len(ops) or n.op_type != ops[k]:
                break
            t, k = n.output[0], k + 1
        return t


def _is_kbit_clip(clip: onnx.NodeProto, q: onnx.NodeProto, inits) -> bool:
    """Whether `clip` spans exactly 2^k < 256 levels of the QuantizeLinear `q`: emission's k-bit saturation."""
    from onnx import numpy_helper

    if len(clip.input) < 3 or not all(i in inits for i in (clip.input[1], clip.input[2], q.input[1])):
        return False
    lo, hi = (float(numpy_helper.to_array(inits[i])) for i in clip.input[1:3])
    levels = (hi - lo) / float(numpy_helper.to_array(inits[q.input[1]])) + 1
    k = round(math.log2(levels)) if levels > 1 else 0
    return 2 <= k < 8 and abs(levels - 2**k) < 1e-3 * 2**k


def _latency(qmodel, rmodel, ds, batches=(1, 32), budget_s: float = 1.5) -> list[LatencyCheck]:
    sessions = [_session(rmodel, []), _session(qmodel, [])]
    first = next(ds.batches(max(batches), 32))
    fixed = fixed_batch(ds.specs)
    out = []
    for b in [fixed] if fixed else batches:
        feed = resize_feed(first, ds.specs, b)
        for s in sessions:
            s.run(None, feed)
        times: list[list[float]] = [[], []]
        start = time.perf_counter()
        while len(times[0]) < 5 or (time.perf_counter() - start < budget_s and len(times[0]) < 200):
            for k, s in enumerate(sessions):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t0)
        out.append(LatencyCheck(b, 1e3 * float(np.median(times[0])), 1e3 * float(np.median(times[1]))))
    return out
