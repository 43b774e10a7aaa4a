"""ONNX Runtime CPU latency of emitted models: a measured per-layer x per-format table, and model timing.

`measure_latency_table` measures, once per model and machine, what each quantizable layer costs in each
realisation it can take, so a search can price a policy without emitting it:

1. One model is emitted per *choice key* the layers can take (`choice_key`: `float`; `int8`, whose integer
   kernels run at the same speed whatever the bits inside the INT8 container; `dynamic`, likewise
   (DynamicQuantizeMatMul, its input quantized by the kernel); `packed/int2|int4|int8`,
   DequantizeLinear of that container + the float op; `nbits/int2|int4|int8|uint8`, MatMulNBits /
   GatherBlockQuantized, whose speed depends on the container), every layer that can take the key taking
   it, the others float.
2. These models are timed interleaved (`measure_models_latency`: warm-up, then round by round, one run of
   each in turn; one inter-op thread, `threads` intra-op threads that do not spin, so an idle session
   never competes with the one being timed), the median per model.
3. Each is also run with ORT's profiler (`SessionOptions.enable_profiling`). Every node ORT ran (fused or
   not: `QLinearConv` "<layer>_token_7", an NCHWc Conv named after its output tensor, `MatMulNBits`
   "<layer>/MatMulAddFusion", ...) is traced back to the emitted node it came from, and each emitted node
   to the layer(s) it belongs to: the layer's node, its weight (and bias) DequantizeLinear, the activation
   Q/DQ (and k-bit Clip) in front of it (shared equally by the layers that read the tensor), and its bias
   Add / Relu / Clip / output Q/DQ. The per-node profile times are scaled so that they add up to the
   model's measured median (the profiler's own overhead and ORT's per-run cost spread in proportion).
4. `rest_ms` is the scaled time of every node no layer claims in the float model (LayerNormalization,
   Softmax, attention MatMuls, reshapes, ...), less its layout borders (step 6). In a quantized model the
   unclaimed nodes cost a little more or less (integer Adds between quantized layers, other borders): what
   the borders do not explain is shared equally by the layers realised in that key, so a uniform policy
   predicts its own model's measured median, and `predict(policy)` = `rest_ms` + the sum of each layer's
   chosen entry (+ `extras_ms`, steps 5-6, zero for a model without these interactions). An entry can be
   negative when quantizing the layer saves more around it than the layer costs.
5. `predict` follows the plan's rules where they make a layer run differently from its own choice: an
   `int8` layer whose input (or, for a Conv, output) tensor is also read by a float or weight-only layer
   gets no activation Q/DQ there and runs as DequantizeLinear + the float op (`realised_key`), which the
   table measures as 'packed/int8' for every layer that can take `int8` (+ `qdq_ms`, its input Q/DQ pair
   left unfused, when only its output is to blame).
6. Convolutions change layout: ORT runs integer convs in NHWC and float ones in blocked NCHWc, with a
   Transpose / Reorder wherever such a region meets another layout. A mixed policy has more such borders
   than the uniform ones the entries were measured in, so `predict` adds, per border side
   (`LatencyTable.border_sides`, from each conv's nearest layers up- and downstream through
   layout-agnostic ops), a + b * the elements of the tensor at that side, with [a, b] = `border_ms[kind]`
   a line through those nodes' (time, elements) in the profiles (`qdq_ms` likewise). For a model with
   three or more Conv layers that can take `int8`, one more model is profiled for these lines (two int8
   convs, one float, repeated: borders and unfused Q/DQ at many tensor sizes).

The table is cached as JSON in `cache_dir`, keyed by the CPU model (/proc/cpuinfo), the ONNX Runtime
version, the thread count, the batch, the activation bits of `int8` layers and the model's digest; a cached
table is reused when it holds every key asked for. How well this predicts mixed policies is measured by
`bench/bench_latency_table.py` (docs/benchmarks.md).

Feeds come from `data` (any `calibration.readers.DataSource`; repeated cyclically up to the batch) or are
synthesised from the input specs (`mqtool.data.model_inputs`): uniform [0, 1) floats, ones for integer
inputs (a valid index into any table, "attend" in a mask), free non-batch dimensions `FREE_DIM` long. A
model whose inputs fix the batch (`mqtool.runtime.fixed_batch`) is run batch / fixed times per timed call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from mqtool.analysis import LayerInfo, ModelInfo
from mqtool.data import InputSpec, model_inputs
from mqtool.errors import InputError
from mqtool.fileio import atomic_write_text
from mqtool.policy import FLOAT, Format, LayerBits, Policy
from mqtool.runtime import THREADS, fixed_batch, resize_feed, sample_axis, split_feed

log = logging.getLogger(__name__)

TABLE_VERSION = 1
FLOAT_KEY = "float"
INT8_KEY = "int8"
DYNAMIC_KEY = "dynamic"  # DynamicQuantizeMatMul: int8 kernels whatever the bits in the container
FREE_DIM = 32  # length of a free non-batch dimension of a synthesised input (a sequence, an image side)
CALIBRATION_SAMPLES = 8  # activation ranges only decide scales, never which kernels run
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FOLLOWERS = frozenset({"Relu", "Clip", "QuantizeLinear", "DequantizeLinear"})
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")

Progress = Callable[[str, dict], None]


# ----------------------------------------------------------------------------------------------- keys


def choice_key(layer: LayerInfo, bits: int, fmt: Format | str | None = None, act_bits: int = 8) -> str:
    """The table column a layer at `bits` in format `fmt` runs as: 'float', 'int8' (integer kernels run
    at the same speed whatever the bits in the INT8 container), 'dynamic' (likewise), 'packed/<container>'
    or 'nbits/<container>' (`passes.qdq_plan.format_container`). `fmt` None is what storage `auto` picks:
    int8 with a quantized input (`act_bits` < 32), nbits for a weight-only layer that allows it, else
    int8."""
    from passes.qdq_plan import allowed_formats, format_container

    if bits == FLOAT or fmt in (Format.FLOAT, "float"):
        return FLOAT_KEY
    if fmt is None:
        allowed = allowed_formats(layer)
        fmt = Format.NBITS if act_bits == FLOAT and Format.NBITS in allowed else Format.INT8
    fmt = Format(fmt)
    if fmt is Format.INT8:
        return INT8_KEY
    if fmt is Format.DYNAMIC:
        return DYNAMIC_KEY
    container = format_container(layer, bits, fmt, act_quantized=fmt is Format.PACKED and act_bits != FLOAT)
    return f"{fmt.value}/{container.value}"


_PACKED_INT8 = "packed/int8"


# Ops ORT's layout transformation carries an NHWC / NCHWc region through (elementwise, pooling, concat,
# resize, Q/DQ); any other op, a graph input or output ends the region: a border.
_LAYOUT_AGNOSTIC = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "HardSigmoid", "LeakyRelu", "Tanh", "Identity",
        "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Resize", "Pad", "Split", "Slice",
        "QuantizeLinear", "DequantizeLinear", "HardSwish", "Softplus", "Neg", "Abs", "Exp", "Max", "Min",
    }
)  # fmt: skip


def _region_kind(op_type: str | None, key: str) -> str:
    """The layout ORT runs a layer in: 'nhwc' (an integer Conv), 'nchwc' (a float Conv with a constant
    weight) or 'nchw' (anything else: MatMul, Gemm, a Conv with a DequantizeLinear weight)."""
    if op_type != "Conv":
        return "nchw"
    return {INT8_KEY: "nhwc", FLOAT_KEY: "nchwc"}.get(key, "nchw")


def _neighbours(model: onnx.ModelProto, layer_nodes: Mapping[str, str]) -> dict[str, dict[str, list[str]]]:
    """Per layer node, the nearest layers upstream ('up') and downstream ('down') through layout-agnostic
    ops; '' stands for a border (a graph input or output, or another op)."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output if o}
    cons: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)
    consts = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    graph_outputs = {o.name for o in g.output}
    by_node = {v: k for k, v in layer_nodes.items()}
    out = {}
    for name, node_name in layer_nodes.items():
        node = next((n for n in g.node if n.name == node_name), None)
        if node is None:
            continue
        ends: dict[str, set[str]] = {"up": set(), "down": set()}
        seen: set[str] = set()
        stack = [("up", t) for t in node.input[:1]] + [("down", t) for t in node.output[:1]]
        while stack:
            side, t = stack.pop()
            if (side, t) in seen or t in consts:
                continue
            seen.add((side, t))
            nexts = [prod[t]] if side == "up" and t in prod else [] if side == "up" else cons.get(t, [])
            if not nexts or (side == "down" and t in graph_outputs):
                ends[side].add("")
            for n in nexts:
                if n.name in by_node:
                    ends[side].add(by_node[n.name])
                elif n.op_type in _LAYOUT_AGNOSTIC and n.domain in ("", "ai.onnx"):
                    stack += [(side, i) for i in (n.input if side == "up" else n.output) if i]
                else:
                    ends[side].add("")
        out[name] = {k: sorted(v) for k, v in ends.items()}
    return out


def _act_request(b: LayerBits, facts: Mapping[str, Any]) -> int:
    """The input width a layer asks for (`passes.qdq_plan.layer_act_request`, from the table's facts)."""
    from mqtool.weight_layers import WEIGHT_ONLY_OPS

    if b.weight_bits == FLOAT or facts.get("op_type") in WEIGHT_ONLY_OPS:
        return FLOAT
    return b.act_bits


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (`platform.processor()` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set extensions that choose ORT's integer kernels (MLAS picks them from CPUID):
    VNNI / AMX / dot-product flags present in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            words = set(f.read().split())
    except OSError:
        return []
    return [flag for flag in _CPU_FLAGS if flag in words]


def model_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the serialised model (hex)."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def table_key(model: onnx.ModelProto, *, batch: int, threads: int, act_bits: int) -> dict[str, Any]:
    """What a measured table is valid for: CPU model, ORT version, threads, batch, int8 activation bits
    and the model's digest."""
    import onnxruntime as ort

    return {
        "cpu": cpu_model(),
        "onnxruntime": ort.__version__,
        "threads": int(threads),
        "batch": int(batch),
        "act_bits": int(act_bits),
        "model_sha256": model_digest(model),
    }


def cache_path(cache_dir: str | os.PathLike, key: Mapping[str, Any]) -> str:
    """The table's file in `cache_dir`: named by a digest of `key`."""
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(os.fspath(cache_dir), f"latency-{digest}.json")


# ---------------------------------------------------------------------------------------------- table


@dataclass
class LatencyTable:
    """ms per layer per choice key, plus `rest_ms` for everything that is not a quantizable layer.

    `layers[name][key]` is what layer `name` adds to a run when realised as `key` (`choice_key`);
    `facts[name]` keeps what `choice_key` needs of the layer (op, weight shape, channel axis, weight input),
    so the table alone can price a policy. `measured[key]` holds each emitted model's measured median and
    90th percentile (ms) and the layers it realised in that key. `key` says where the table is valid.
    """

    key: dict[str, Any]
    rest_ms: float
    layers: dict[str, dict[str, float]]
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu_flags: list[str] = field(default_factory=list)
    # [ms, ms per element] of one border side of a convolution layout region ("nhwc": integer convs,
    # "nchwc": float convs; `border_cost`); empty for a model without Conv layers
    border_ms: dict[str, list[float]] = field(default_factory=dict)
    # [ms, ms per element] of an activation QuantizeLinear + DequantizeLinear pair ORT leaves unfused
    qdq_ms: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def layer(self, name: str) -> LayerInfo:
        """A `LayerInfo` with the facts the table kept of layer `name` (enough for `choice_key`)."""
        f = self.facts[name]
        shape = list(f["weight_shape"])
        return LayerInfo(
            name,
            f["op_type"],
            "",
            shape,
            math.prod(shape) if shape else 0,
            "",
            "",
            None,
            channel_axis=int(f["channel_axis"]),
            weight_input=int(f["weight_input"]),
        )

    def entry(
        self, name: str, bits: int, fmt: Format | str | None = None, act_bits: int | None = None
    ) -> float:
        """ms of layer `name` at `bits` in `fmt` (None: what storage auto picks for `act_bits`).

        Raises `InputError` for a layer or a key the table was not measured for."""
        if name not in self.layers:
            raise InputError(f"latency table: no layer '{name}' (the table was measured for another model?)")
        act = self.key.get("act_bits", 8) if act_bits is None else act_bits
        key = FLOAT_KEY if bits == FLOAT else choice_key(self.layer(name), bits, fmt, act)
        row = self.layers[name]
        if key not in row:
            raise InputError(
                f"latency table: layer '{name}' was not measured as '{key}' (measured: {', '.join(sorted(row))})"
            )
        return row[key]

    def realised_key(self, name: str, policy: Policy) -> str:
        """The key layer `name` runs as under `policy`: its own (`choice_key`), except that an `int8` layer
        whose integer kernel the plan prevents runs as DequantizeLinear + the float op, measured as
        'packed/int8' (ORT fuses that into MatMulNBits for a MatMul): its input stays float when a layer
        reading the same tensor asks for a float input (float, weight-only formats), and a Conv's output
        stays float when a layer reading it does (`passes.qdq_plan`, rules 1 and 2)."""
        return self._realise(name, policy)[0]

    def _realise(self, name: str, policy: Policy) -> tuple[str, str | None]:
        """(`realised_key`, what prevents the integer kernel: 'input', 'output' or None)."""
        b = policy.get(name)
        if b.weight_bits == FLOAT:
            return FLOAT_KEY, None
        key = choice_key(self.layer(name), b.weight_bits, b.format, b.act_bits)
        if key != INT8_KEY or _PACKED_INT8 not in self.layers[name]:
            return key, None
        f = self.facts[name]

        def floats(peers) -> bool:
            return any(_act_request(policy.get(p), self.facts.get(p, {})) == FLOAT for p in peers)

        if floats([name, *f.get("input_peers", [])]):
            return _PACKED_INT8, "input"
        if floats(f.get("output_peers", [])):
            return _PACKED_INT8, "output"
        return key, None

    def _borders(self, policy: Policy) -> list[tuple[str, str, int]]:
        """(layer, kind, elements) of each border side (`border_sides`)."""
        kinds = {
            n: _region_kind(self.facts[n].get("op_type"), self.realised_key(n, policy)) for n in self.layers
        }
        out = []
        for n, kind in kinds.items():
            if kind == "nchw":
                continue
            elements = self.facts[n].get("elements", [0, 0])
            for side, count in zip(("up", "down"), elements):
                ends = self.facts[n].get(side, [])
                if any(kinds.get(e, "nchw") != kind for e in ends):
                    out.append((n, kind, count))
        return out

    def border_sides(self, policy: Policy) -> dict[str, int]:
        """How many layout borders the convolutions of `policy` make: ORT runs integer convs in NHWC and
        float ones in blocked NCHWc, and puts a Transpose / Reorder wherever such a region meets anything
        else (`_region_kind`). Per kind, the number of (conv, side) pairs whose neighbour on that side is of
        another kind."""
        out: dict[str, int] = defaultdict(int)
        for _, kind, _ in self._borders(policy):
            out[kind] += 1
        return dict(out)

    def border_cost(self, policy: Policy) -> float:
        """ms of the layout borders of `policy`: per border side, `border_ms[kind]` = [a, b] gives
        a + b * the elements of the conv's input (up) or output (down) tensor."""
        total = 0.0
        for _, kind, elements in self._borders(policy):
            a, b = self.border_ms.get(kind, (0.0, 0.0))
            total += a + b * elements
        return total

    def extras_ms(self, policy: Policy) -> float:
        """What `policy` costs beyond its layers' entries: its layout borders (`border_cost`), and the input
        Q/DQ pair a layer keeps unfused when its quantized input feeds a kernel that its float output
        reader prevents ('packed/int8' was measured with a float input): `qdq_ms` = [a, b], a + b * the
        elements of that input."""
        total = self.border_cost(policy)
        a, b = self.qdq_ms
        for n in self.layers:
            if self._realise(n, policy)[1] == "output":
                total += a + b * self.facts[n].get("elements", [0, 0])[0]
        return total

    def predict(self, policy: Policy) -> float:
        """Predicted median ms of the model emitted under `policy`: `rest_ms` + each layer's entry for the
        key it runs as (`realised_key`; layers the policy does not name are float) + `border_ms` per layout
        border of its convolutions (`border_sides`; none in a model without Conv layers) + `qdq_ms` per
        layer kept off its integer kernel by a float reader of its output."""
        total = self.rest_ms + self.extras_ms(policy)
        for name, row in self.layers.items():
            key = self.realised_key(name, policy)
            if key not in row:
                raise InputError(
                    f"latency table: layer '{name}' was not measured as '{key}' "
                    f"(measured: {', '.join(sorted(row))})"
                )
            total += row[key]
        return total

    def keys(self) -> list[str]:
        """Every choice key some layer was measured in."""
        return sorted({k for row in self.layers.values() for k in row})

    def covers(self, wanted: Mapping[str, Iterable[str]]) -> bool:
        """Whether every layer -> keys of `wanted` is in the table."""
        return all(
            name in self.layers and set(keys) <= set(self.layers[name]) for name, keys in wanted.items()
        )

    def to_json(self) -> dict:
        return {
            "format": "mqtool.latency",
            "version": TABLE_VERSION,
            "key": self.key,
            "cpu_flags": self.cpu_flags,
            "rest_ms": self.rest_ms,
            "layers": self.layers,
            "facts": self.facts,
            "measured": self.measured,
            "border_ms": self.border_ms,
            "qdq_ms": self.qdq_ms,
        }

    @classmethod
    def from_json(cls, doc: object, source: str = "latency table") -> LatencyTable:
        """Parse a table document; an `InputError` naming `source` when it is not one."""
        try:
            if doc["format"] != "mqtool.latency" or doc["version"] != TABLE_VERSION:
                raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
            layers = {str(n): {str(k): float(v) for k, v in row.items()} for n, row in doc["layers"].items()}
            return cls(
                dict(doc["key"]),
                float(doc["rest_ms"]),
                layers,
                {str(n): dict(f) for n, f in doc["facts"].items()},
                dict(doc.get("measured", {})),
                list(doc.get("cpu_flags", [])),
                {str(k): [float(x) for x in v] for k, v in doc.get("border_ms", {}).items()},
                [float(x) for x in doc.get("qdq_ms", [0.0, 0.0])],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{source}: not a latency table ({e})") from e

    @classmethod
    def load(cls, path: str) -> LatencyTable:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: unreadable latency table ({e})") from e
        return cls.from_json(doc, path)

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- timing


def synthesize_feed(specs: Sequence[InputSpec], batch: int = 1) -> dict[str, np.ndarray]:
    """A feed of `batch` samples from the input specs alone (module doc): uniform [0, 1) floats, ones for
    integers and True for booleans; free non-batch dimensions are `FREE_DIM` long."""
    rng = np.random.default_rng(0)
    feed = {}
    for s in specs:
        axis = sample_axis(s.shape)
        shape = [] if s.shape is None else [FREE_DIM if d is None else d for d in s.shape]
        if s.shape is None:
            shape = [batch]
        elif axis is not None and s.shape[axis] is None:
            shape[axis] = batch
        if s.dtype.kind == "f":
            feed[s.name] = rng.random(shape, dtype=np.float64).astype(s.dtype)
        elif s.dtype.kind == "b":
            feed[s.name] = np.ones(shape, dtype=np.bool_)
        else:
            feed[s.name] = np.ones(shape, dtype=s.dtype)
    return feed


def latency_feed(model: onnx.ModelProto, data: Any = None, batch: int = 1) -> dict[str, np.ndarray]:
    """A feed of exactly `batch` samples (on each input's sample axis) for timing `model`: from `data`
    (any `calibration.readers.DataSource`, samples repeated cyclically) or synthesised (module doc)."""
    specs = model_inputs(model)
    if data is None:
        feed = synthesize_feed(specs, 1)
    else:
        from calibration.readers import iter_feeds

        first = next(iter_feeds(data, model, batch_size=batch, limit=batch), None)
        if first is None:
            raise InputError("latency: the data holds no sample")
        feed = first
    return resize_feed(feed, specs, batch)


def session(
    model: onnx.ModelProto | str | os.PathLike, threads: int = THREADS, profile_prefix: str | None = None
):
    """A CPU session for timing: `threads` intra-op threads that sleep when idle (no spinning), one inter-op
    thread, all graph optimisations; with `profile_prefix`, ORT's profiler on."""
    import onnxruntime as ort

    from mqtool.runtime import ort_session

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if isinstance(model, str | os.PathLike):
        try:
            return ort.InferenceSession(os.fspath(model), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise InputError(f"{os.fspath(model)}: ONNX Runtime cannot load the model ({e})") from e
    return ort_session(model, so)


def _runs(model_specs: Sequence[InputSpec], feed: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The runs one timed call makes: the feed, or its slices for a model that fixes the batch."""
    return split_feed(feed, model_specs) if fixed_batch(model_specs) else [dict(feed)]


def measure_models_latency(
    models: Mapping[str, onnx.ModelProto | str | os.PathLike],
    feed: Mapping[str, np.ndarray] | None = None,
    batch: int = 1,
    threads: int = THREADS,
    repeats: int | None = None,
    *,
    budget_s: float = 10.0,
    warmup: int = 2,
) -> dict[str, tuple[float, float]]:
    """(median ms, 90th-percentile ms) of one call per model, the models timed interleaved: each warms up
    `warmup` times, then round by round each runs once (the order rotating). A call feeds `batch` samples
    (`feed`, resized; synthesised when None). `repeats` rounds, or (None) as many as fit in `budget_s`
    (5 to 200)."""
    if not models:
        return {}
    sessions, calls = {}, {}
    for name, m in models.items():
        if isinstance(m, str | os.PathLike) and not os.path.isfile(m):
            raise InputError(f"{os.fspath(m)}: no such model file")
        proto = onnx.load(os.fspath(m), load_external_data=False) if isinstance(m, str | os.PathLike) else m
        specs = model_inputs(proto)
        f = latency_feed(proto, None, batch) if feed is None else resize_feed(feed, specs, batch)
        sessions[name] = session(m, threads)
        calls[name] = _runs(specs, f)

    def call(name: str) -> float:
        s = sessions[name]
        t0 = time.perf_counter()
        for run in calls[name]:
            s.run(None, run)
        return time.perf_counter() - t0

    first = {}
    for name in sessions:
        for _ in range(max(1, warmup)):
            first[name] = call(name)
    if repeats is None:
        per_round = sum(first.values())
        repeats = int(min(200, max(5, budget_s / max(per_round, 1e-6))))
    times: dict[str, list[float]] = {n: [] for n in sessions}
    order = list(sessions)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(call(name))
    return {n: (1e3 * statistics.median(t), 1e3 * float(np.percentile(t, 90))) for n, t in times.items()}


def measure_model_latency(
    path_or_model: onnx.ModelProto | str | os.PathLike,
    feed: Mapping[str, np.ndarray] | None = None,
    batch: int = 1,
    threads: int = THREADS,
    repeats: int | None = None,
) -> tuple[float, float]:
    """(median ms, 90th-percentile ms) of running `batch` samples through the model on ORT's CPU provider
    (`measure_models_latency` with one model)."""
    return measure_models_latency({"model": path_or_model}, feed, batch, threads, repeats)["model"]


def profile_nodes(
    model: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    threads: int = THREADS,
    calls: int = 10,
    ops: dict[str, str] | None = None,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Per node ORT ran (profile event name without '_kernel_time'), its median duration in ms times the
    times it runs per call, over `calls` profiled calls after two warm-up calls (dropped). `ops`, when
    given, receives each node's op type; `sizes` the elements of its first input and first output per
    call."""
    specs = model_inputs(model)
    runs = _runs(specs, feed)
    with tempfile.TemporaryDirectory(prefix="mqtool-prof-") as tmp:
        s = session(model, threads, profile_prefix=os.path.join(tmp, "p"))
        for _ in range(2 + calls):
            for run in runs:
                s.run(None, run)
        path = s.end_profiling()
        with open(path, encoding="utf-8") as f:
            events = json.load(f)
    per: dict[str, list[float]] = defaultdict(list)
    shapes: dict[str, tuple[int, int]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            per[name[: -len("_kernel_time")]].append(float(e.get("dur", 0)) / 1e3)
            args = e.get("args", {})
            if ops is not None:
                ops[name[: -len("_kernel_time")]] = str(args.get("op_name", ""))
            if sizes is not None:
                shapes[name[: -len("_kernel_time")]] = (
                    _elements(args.get("input_type_shape")),
                    _elements(args.get("output_type_shape")),
                )
    total_calls = 2 + calls
    out = {}
    for name, d in per.items():
        per_call = len(d) / total_calls
        kept = d[int(round(2 * per_call)) :] or d
        out[name] = statistics.median(kept) * per_call
        if sizes is not None and name in shapes:
            sizes[name] = (round(shapes[name][0] * per_call), round(shapes[name][1] * per_call))
    return out


def _elements(type_shapes: object) -> int:
    """Elements of the first tensor of a profile event's `input_type_shape` / `output_type_shape`."""
    try:
        dims = next(iter(type_shapes[0].values()))
        return int(math.prod(int(d) for d in dims))
    except (TypeError, IndexError, KeyError, StopIteration, ValueError):
        return 0


# ---------------------------------------------------------------------------------------- attribution


def layer_claims(model: onnx.ModelProto, layers: Iterable[str]) -> dict[str, list[str]]:
    """Emitted node name -> the layers it belongs to (module doc, step 3): the layer's node, the Q/DQ (and
    Clip) chains feeding its inputs, and the bias Add, Relu/Clip and Q/DQ that follow its output. Nodes
    every unclaimed node is absent."""
    g = model.graph
    nodes = {n.name: n for n in g.node if n.name}
    prod = {o: n for n in g.node for o in n.output if o}
    cons: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)
    consts = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    claims: dict[str, list[str]] = defaultdict(list)

    def claim(node: onnx.NodeProto, layer: str) -> None:
        if layer not in claims[node.name]:
            claims[node.name].append(layer)

    for layer in layers:
        node = nodes.get(layer)
        if node is None:
            continue
        claim(node, layer)
        for t in node.input:
            back = prod.get(t)
            while back is not None and (back.op_type in _QDQ_OPS or back.op_type == "Clip"):
                claim(back, layer)
                back = prod.get(back.input[0]) if back.input else None
        t = node.output[0] if node.output else ""
        while True:
            readers = cons.get(t, [])
            if len(readers) != 1:
                break
            nxt = readers[0]
            bias_add = nxt.op_type == "Add" and any(i in consts for i in nxt.input if i != t)
            if not (nxt.op_type in _FOLLOWERS or bias_add):
                break
            claim(nxt, layer)
            t = nxt.output[0]
            if nxt.op_type == "DequantizeLinear":
                break
    return dict(claims)


def event_node(event: str, nodes: Mapping[str, Any], producers: Mapping[str, str]) -> str | None:
    """The emitted node an ORT profile event name comes from: itself; '<tensor>_nchwc' (an NCHWc node named
    after the output it computes); or the longest emitted node name it starts with, followed by '_' or
    '/' ('<layer>_token_7', '<layer>/MatMulAddFusion', after a 'fused ' prefix). None for nodes ORT added
    (layout Transposes)."""
    event = event.removeprefix("fused ")  # ORT's activation fusions: "fused <Gemm name>"
    if event in nodes:
        return event
    if event.endswith("_nchwc") and event[: -len("_nchwc")] in producers:
        return producers[event[: -len("_nchwc")]]
    for m in reversed(list(re.finditer(r"[_/]", event))):
        head = event[: m.start()]
        if head in nodes:
            return head
        if head in producers and event[m.start() :].startswith("_nchwc"):
            return producers[head]
    return None


def _name_all_nodes(model: onnx.ModelProto) -> None:
    """Give the unnamed nodes of an emitted model (compact storage drops non-layer names) unique names, so
    that the profiler's events can be traced back to them. Names change nothing ORT computes."""
    used = {n.name for n in model.graph.node if n.name}
    k = 0
    for n in model.graph.node:
        if not n.name:
            while f"~{k}" in used:
                k += 1
            n.name = f"~{k}"
            used.add(n.name)


def attribute(
    model: onnx.ModelProto, layers: Sequence[str], node_ms: Mapping[str, float]
) -> tuple[dict[str, float], float]:
    """(ms per layer, ms of the nodes no layer claims) from one profile of `model` (`profile_nodes`); a
    node several layers claim is shared equally."""
    claims = layer_claims(model, layers)
    nodes = {n.name: n for n in model.graph.node if n.name}
    producers = {o: n.name for n in model.graph.node for o in n.output if o and n.name}
    per = dict.fromkeys(layers, 0.0)
    other = 0.0
    for event, ms in node_ms.items():
        node = event_node(event, nodes, producers)
        owners = claims.get(node, []) if node is not None else []
        if owners:
            for layer in owners:
                per[layer] += ms / len(owners)
        else:
            other += ms
    return per, other


_COMPUTE_OPS = frozenset(
    {
        "Conv", "FusedConv", "QLinearConv", "ConvInteger", "MatMul", "FusedMatMul", "Gemm", "FusedGemm",
        "QGemm", "MatMulIntegerToFloat", "MatMulNBits", "Gather", "GatherBlockQuantized", "LSTM", "GRU", "RNN",
        "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "ConvTranspose",
    }
)  # fmt: skip


def _layer_sizes(
    model: onnx.ModelProto,
    layers: Sequence[str],
    sizes: Mapping[str, tuple[int, int]],
    ops: Mapping[str, str],
) -> dict[str, tuple[int, int]]:
    """(input, output) elements per call of each layer's compute node (the one ORT ran: an NCHWc Conv named
    after a Relu's output included), from a profile's `sizes` and `ops`."""
    claims = layer_claims(model, layers)
    nodes = {n.name: n for n in model.graph.node if n.name}
    producers = {o: n.name for n in model.graph.node for o in n.output if o and n.name}
    out: dict[str, tuple[int, int]] = {}
    for event, size in sizes.items():
        owners = claims.get(event_node(event, nodes, producers) or "", [])
        if len(owners) == 1 and ops.get(event) in _COMPUTE_OPS and owners[0] not in out:
            out[owners[0]] = size
    return out


def ort_added_ms(model: onnx.ModelProto, node_ms: Mapping[str, float]) -> float:
    """ms of the profiled nodes that ORT added (no emitted node of `model` is their origin: the layout
    Transposes and Reorders of `event_node`'s None)."""
    nodes = {n.name: n for n in model.graph.node if n.name}
    producers = {o: n.name for n in model.graph.node for o in n.output if o and n.name}
    return sum(ms for event, ms in node_ms.items() if event_node(event, nodes, producers) is None)


def _border_samples(
    model: onnx.ModelProto,
    node_ms: Mapping[str, float],
    ops: Mapping[str, str],
    sizes: Mapping[str, tuple[int, int]],
) -> dict[str, list[tuple[float, int]]]:
    """(ms, elements) of single border nodes in one profile: ORT's layout Transposes ('nhwc') and NCHWc
    Reorders ('nchwc'), and the activation QuantizeLinear / DequantizeLinear left unfused ('q', 'dq')."""
    nodes = {n.name: n for n in model.graph.node if n.name}
    producers = {o: n.name for n in model.graph.node for o in n.output if o and n.name}
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for event, ms in node_ms.items():
        op = ops.get(event, "")
        node = event_node(event, nodes, producers)
        sample = (ms, sizes.get(event, (0, 0))[1])
        if node is None:
            if op == "Transpose":
                out["nhwc"].append(sample)
            elif op.startswith("Reorder"):
                out["nchwc"].append(sample)
        elif (
            event == node
            and op in ("QuantizeLinear", "DequantizeLinear")
            and nodes[node].input[0] not in inits
        ):
            out["q" if op == "QuantizeLinear" else "dq"].append(sample)
    return out


def _cost_line(samples: Sequence[tuple[float, int]]) -> list[float]:
    """[ms per node, ms per element] through the (ms, elements) samples: least squares, not negative."""
    if not samples:
        return [0.0, 0.0]
    t = np.array([s[0] for s in samples], dtype=np.float64)
    e = np.array([s[1] for s in samples], dtype=np.float64)
    if len(samples) == 1 or np.ptp(e) == 0:
        return [0.0, float(t.mean() / e.mean())] if e.mean() > 0 else [float(t.mean()), 0.0]
    a, b = np.linalg.lstsq(np.stack([np.ones_like(e), e], 1), t, rcond=None)[0]
    if b < 0:
        return [float(t.mean()), 0.0]
    if a < 0:
        return [0.0, float(t.sum() / e.sum())]
    return [float(a), float(b)]


def layer_latency(
    model: onnx.ModelProto,
    layers: Sequence[str],
    feed: Mapping[str, np.ndarray] | None = None,
    batch: int = 1,
    threads: int = THREADS,
    budget_s: float = 5.0,
) -> tuple[dict[str, float], float, tuple[float, float]]:
    """How long each of `layers` (node names of `model`, e.g. an emitted QDQ model) takes as ORT runs it:
    (ms per layer, ms of everything else, (median, p90) ms of the whole call), the profile's per-node times
    scaled to the measured median (module doc, step 3). `model` is not modified."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    _name_all_nodes(named)
    feed = latency_feed(named, None, batch) if feed is None else resize_feed(feed, model_inputs(named), batch)
    med, p90 = measure_models_latency({"m": named}, feed, batch, threads, budget_s=budget_s)["m"]
    node_ms = profile_nodes(named, feed, threads)
    per, other = attribute(named, list(layers), node_ms)
    scale = med / max(sum(node_ms.values()), 1e-9)
    return {n: v * scale for n, v in per.items()}, other * scale, (med, p90)


# ------------------------------------------------------------------------------------------ measuring


def _check_choices(
    info: ModelInfo, choices: Mapping[str, Sequence[tuple[int, Format | str]]], act_bits: int
) -> dict[str, dict[str, tuple[int, Format]]]:
    """layer -> key -> (bits, format) realising it; float always present. `InputError` for an unknown layer,
    bits or a format the layer cannot take."""
    from passes.qdq_plan import allowed_formats, main_graph_layers

    layers = {layer.name: layer for layer in main_graph_layers(info)}
    for name in choices:
        if name not in layers:
            raise InputError(f"latency choices: unknown layer '{name}' (not a main-graph layer of the model)")
    out: dict[str, dict[str, tuple[int, Format]]] = {}
    for name, layer in layers.items():
        row = {FLOAT_KEY: (FLOAT, Format.FLOAT)}
        allowed = allowed_formats(layer)
        for bits, fmt in choices.get(name, ()):
            fmt = Format(fmt)
            if bits != FLOAT and not 2 <= bits <= 8:
                raise InputError(f"latency choices: layer '{name}': bits must be 2..8 or 32, got {bits}")
            if fmt not in allowed:
                raise InputError(
                    f"latency choices: layer '{name}' ({layer.op_type}) cannot take format '{fmt.value}' "
                    f"(allowed: {', '.join(f.value for f in allowed)})"
                )
            key = choice_key(layer, bits, fmt, act_bits if fmt is Format.INT8 else FLOAT)
            row.setdefault(key, (bits, fmt))
            if key == INT8_KEY:  # how it runs when the plan prevents its integer kernel (realised_key)
                row.setdefault(_PACKED_INT8, (8, Format.PACKED))
        out[name] = row
    return out


def _layer_facts(
    model: onnx.ModelProto, info: ModelInfo, rows: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """What `LatencyTable` keeps of each layer: what `choice_key` needs, the layers reading the same input
    tensor (`input_peers`) and, where ORT fuses only with a quantized output (`fusion_output`), the layers
    reading that output (`output_peers`)."""
    from mqtool.model import infer_shapes
    from passes.pipeline import prepare
    from passes.qdq_plan import fusion_output, main_graph_layers

    layers = [layer for layer in main_graph_layers(info) if layer.name in rows]
    readers: dict[str, list[str]] = defaultdict(list)
    for layer in layers:
        readers[layer.input].append(layer.name)
    prepared = prepare(model)
    shapes = infer_shapes(prepared) if any(layer.op_type == "MatMul" for layer in layers) else {}
    convs = {layer.name: layer.name for layer in layers if layer.op_type == "Conv"}
    near = _neighbours(prepared, {layer.name: layer.name for layer in layers}) if convs else {}
    facts = {}
    for layer in layers:
        out = fusion_output(prepared, layer, shapes=shapes)
        facts[layer.name] = {
            "op_type": layer.op_type,
            "weight_shape": list(layer.weight_shape),
            "channel_axis": layer.channel_axis,
            "weight_input": layer.weight_input,
            "input_peers": [n for n in readers[layer.input] if n != layer.name],
            "output_peers": list(readers.get(out, [])) if out else [],
        }
        if layer.name in convs:
            facts[layer.name].update(near.get(layer.name, {}))
    return facts


_BORDER_PROBE = "~borders"


def _border_probe_policy(
    info: ModelInfo, rows: Mapping[str, Mapping[str, tuple[int, Format]]], act_bits: int
) -> Policy | None:
    """For a model with Conv layers that can take `int8`: in graph order, two such convs int8 and one float,
    over and over (the others float), so that NHWC and NCHWc regions meet at many tensor sizes and some
    int8 convs have a float reader; None when there are fewer than three."""
    convs = [
        layer.name
        for layer in info.layers
        if layer.op_type == "Conv" and INT8_KEY in rows.get(layer.name, {})
    ]
    if len(convs) < 3:
        return None
    layers = {n: LayerBits(FLOAT, FLOAT, Format.FLOAT) for n in rows}
    for i, n in enumerate(convs):
        if i % 3 != 2:
            bits, fmt = rows[n][INT8_KEY]
            layers[n] = LayerBits(bits, act_bits, fmt)
    return Policy(layers, {"source": "latency table, border probe"})


def _config_policy(rows: Mapping[str, Mapping[str, tuple[int, Format]]], key: str, act_bits: int) -> Policy:
    layers = {}
    for name, row in rows.items():
        if key in row and key != FLOAT_KEY:
            bits, fmt = row[key]
            act = act_bits if fmt is Format.INT8 else FLOAT
            layers[name] = LayerBits(bits, act, fmt)
        else:
            layers[name] = LayerBits(FLOAT, FLOAT, Format.FLOAT)
    return Policy(layers, {"source": f"latency table, {key}"})


def measure_latency_table(
    model: onnx.ModelProto,
    info: ModelInfo,
    choices: Mapping[str, Sequence[tuple[int, Format | str]]],
    *,
    batch: int = 1,
    threads: int = THREADS,
    data: Any = None,
    cache_dir: str | os.PathLike | None = None,
    act_bits: int = 8,
    budget_s: float = 20.0,
    progress: Progress | None = None,
) -> LatencyTable:
    """The per-layer x per-key latency table of `model` (module doc). `info` is `analyze` of the prepared
    model; `choices[layer]` lists the (bits, format) pairs the layer may take (float is always measured;
    a layer not in `choices` is measured float only); `int8` layers are measured with `act_bits`-bit
    inputs. `data` feeds the timing and calibrates the int8 model (synthesised inputs when None).
    `budget_s`: about how long the interleaved timing may take. With `cache_dir`, a table measured before
    for the same key (`table_key`) that holds every key asked for is loaded instead, and a new one is
    written there."""
    from mqtool.emit import quantize_model

    if batch < 1 or threads < 1:
        raise InputError(f"latency: batch and threads must be >= 1, got batch {batch}, threads {threads}")
    rows = _check_choices(info, choices, act_bits)
    wanted = {name: list(row) for name, row in rows.items()}
    key = table_key(model, batch=batch, threads=threads, act_bits=act_bits)
    path = cache_path(cache_dir, key) if cache_dir is not None else None
    if path and os.path.isfile(path):
        try:
            cached = LatencyTable.load(path)
        except InputError as e:
            log.warning("%s; measuring again", e)
        else:
            if cached.key == key and cached.covers(wanted):
                log.info("latency table reused from %s", path)
                return cached
    notify = progress or (lambda event, d: None)
    keys = sorted({k for row in rows.values() for k in row}, key=lambda k: (k != FLOAT_KEY, k))
    calibration = None
    if INT8_KEY in keys:
        calibration = latency_feed(model, data, CALIBRATION_SAMPLES)
    emitted: dict[str, onnx.ModelProto] = {}
    for i, k in enumerate(keys):
        notify("latency_emit", {"key": k, "done": i, "total": len(keys)})
        policy = _config_policy(rows, k, act_bits)
        q = quantize_model(model, policy, data=calibration if k == INT8_KEY else None)
        _name_all_nodes(q)
        emitted[k] = q
    probe_policy = _border_probe_policy(info, rows, act_bits)
    if probe_policy is not None:
        # Not a key: its profile shows layout borders and unfused Q/DQ of many sizes (`border_ms`, `qdq_ms`)
        emitted[_BORDER_PROBE] = quantize_model(model, probe_policy, data=calibration)
        _name_all_nodes(emitted[_BORDER_PROBE])
    feed = latency_feed(model, data, batch)
    notify("latency_time", {"keys": keys})
    timed = measure_models_latency(emitted, feed, batch, threads, budget_s=budget_s)
    names = list(rows)
    own: dict[str, dict[str, float]] = {}
    other: dict[str, float] = {}
    samples: dict[str, list[tuple[float, int]]] = defaultdict(list)
    layer_sizes: dict[str, tuple[int, int]] = {}
    for i, k in enumerate([*keys, *([_BORDER_PROBE] if probe_policy is not None else [])]):
        notify("latency_profile", {"key": k, "done": i, "total": len(emitted)})
        ops: dict[str, str] = {}
        sizes: dict[str, tuple[int, int]] = {}
        node_ms = profile_nodes(emitted[k], feed, threads, ops=ops, sizes=sizes)
        per, rest = attribute(emitted[k], names, node_ms)
        scale = timed[k][0] / max(sum(node_ms.values()), 1e-9)
        own[k] = {n: v * scale for n, v in per.items()}
        other[k] = rest * scale
        for kind, values in _border_samples(emitted[k], node_ms, ops, sizes).items():
            samples[kind] += [(v * scale, e) for v, e in values]
        if k == FLOAT_KEY:
            layer_sizes = _layer_sizes(emitted[k], names, sizes, ops)
    facts = _layer_facts(model, info, rows)
    for n, (e_in, e_out) in layer_sizes.items():
        facts[n]["elements"] = [e_in, e_out]
    # What a layout border costs (`LatencyTable.border_cost`): a line through ORT's own Transposes /
    # Reorders in these models, ms against elements moved; likewise an unfused activation Q/DQ pair.
    border_ms = {kind: _cost_line(samples[kind]) for kind in ("nhwc", "nchwc") if samples.get(kind)}
    for a, b in (("nhwc", "nchwc"), ("nchwc", "nhwc")):
        if a not in border_ms and b in border_ms:
            border_ms[a] = border_ms[b]
    q, dq = _cost_line(samples.get("q", [])), _cost_line(samples.get("dq", []))
    qdq = [q[0] + dq[0], q[1] + dq[1]]
    zero = {n: dict.fromkeys(rows[n], 0.0) for n in names}
    probe = LatencyTable(key, 0.0, zero, facts, border_ms=border_ms, qdq_ms=qdq)

    def borders(k: str) -> float:
        return probe.extras_ms(_config_policy(rows, k, act_bits))

    rest_ms = other[FLOAT_KEY] - borders(FLOAT_KEY)
    table_rows: dict[str, dict[str, float]] = {n: {FLOAT_KEY: own[FLOAT_KEY][n]} for n in names}
    measured = {}
    for k in keys:
        realised = [n for n in names if k in rows[n] and k != FLOAT_KEY]
        measured[k] = {"ms": timed[k][0], "p90_ms": timed[k][1], "layers": len(realised)}
        # What the nodes no layer claims cost more or less than in the float model, beyond the layout
        # borders, is shared by the realised layers: a uniform policy predicts its measured median.
        share = (other[k] - borders(k) - rest_ms) / len(realised) if realised else 0.0
        for n in realised:
            table_rows[n][k] = own[k][n] + share
    table = LatencyTable(key, rest_ms, table_rows, facts, measured, cpu_flags(), border_ms, qdq)
    if path:
        os.makedirs(os.fspath(cache_dir), exist_ok=True)
        table.save(path)
    return table


__all__ = [
    "LatencyTable",
    "cache_path",
    "choice_key",
    "cpu_flags",
    "cpu_model",
    "latency_feed",
    "measure_latency_table",
    "measure_model_latency",
    "measure_models_latency",
    "model_digest",
    "profile_nodes",
    "synthesize_feed",
    "table_key",
]
