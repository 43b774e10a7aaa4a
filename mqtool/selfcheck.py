"""The self-check before "done": does the emitted file, run on ONNX Runtime, do the fp32 model's task?

`self_check` runs the fp32 reference, the quantized model and optionally a baseline (the same tool's
uniform w8a8 PTQ, `uniform8_baseline`) on held-out samples, classifies the outputs (`mqtool.outputs`) on
the fp32 values and measures each candidate in task terms (`mqtool.fidelity`). Its `CheckResult` holds a
table (measure, quantized, 8-bit PTQ, predicted) and a verdict:

- "poor" when the model's agreement is under `FLOOR`, or (budget below 8 bits) one of the compared
  measures (an output's agreement, its CTC string agreement, its top-1 accuracy, or the model's
  agreement) is below `HALF` of the baseline's and the gap is beyond noise (3 standard errors);
- "warning" when, below 8 bits, a compared measure is more than `LARGE_GAP` (and 3 standard errors) under
  8-bit PTQ's, or a regression output's SQNR (its worst channel's, where it has a channel axis) is
  more than `SQNR_GAP_DB` under 8-bit PTQ's and under `SQNR_LOW_DB` (a detector's
  class-score channels can lose every detection while the cosine, dominated by box coordinates, stays
  0.995); or when a compared measure is lower than the search predicted on the same samples by more than
  max(`PREDICTED_SLACK`, 3 standard errors): the emitted file does not behave like the simulation; or,
  for a budget at or above 8 bits, lower than the baseline's by more than max(`W8_SLACK`, 3 standard
  errors): at 8 bits nothing explains a loss that 8-bit PTQ does not have;
- "ok" otherwise.

Whole-sequence agreement is shown but not judged: one flipped position among hundreds of blanks changes it
while the decoded string stays the same. Standard errors are paired (the same samples for every model).

Models are run sample-major: a model with a fixed batch is fed in runs of its batch (`split_feed`) and,
for a batch of 1, each run's output is stacked on a new axis 0; otherwise each output's sample axis is
found once from a 1-sample and a 2-sample run (`output_sample_axes`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from mqtool.data import InputSpec, model_inputs, open_data
from mqtool.dataspec import DataSpec
from mqtool.errors import InputError
from mqtool.fidelity import (
    ABS_DIFF,
    ACCURACY,
    COSINE,
    CTC,
    KL,
    SCORES,
    SQNR,
    WORST_CHANNEL_SQNR,
    ModelFidelity,
    model_fidelity,
    paired_gap,
)
from mqtool.model import load_model
from mqtool.outputs import OutputKind, OutputSpec, classify, output_sample_axes, plan_outputs
from mqtool.runtime import (
    concat_feeds,
    feed_samples,
    fixed_batch,
    ort_session,
    resize_feed,
    sample_axis,
    slice_feed,
    split_feed,
)

log = logging.getLogger(__name__)

FLOOR = 0.5  # a model agreeing with fp32 on fewer than half of the samples does not do its task
HALF = 0.5  # below 8 bits, losing more than half of what 8-bit PTQ keeps is not explained by the budget
PREDICTED_SLACK = 0.05
W8_SLACK = 0.01
# Below 8 bits: a compared measure this far under 8-bit PTQ's is said, not judged poor (the budget may buy
# it); a regression output's SQNR this many dB under 8-bit PTQ's is said too: cosine hides what a
# threshold on a few small channels (a detector's class scores next to its box coordinates) does not.
LARGE_GAP = 0.15
SQNR_GAP_DB, SQNR_LOW_DB = 10.0, 25.0  # said when both: 10 dB under 8-bit PTQ's and under 25 dB itself
HOLDOUT_FRACTION = 0.2
HOLDOUT_MAX = 256
BATCH = 64  # samples per ORT run of a model with a free batch

OK, WARNING, POOR = "ok", "warning", "poor"

ModelArg = onnx.ModelProto | str | os.PathLike


# ------------------------------------------------------------------------------------------ result


@dataclass
class CheckResult:
    """What `self_check` measured. `quantized`, `baseline` and `predicted` are `ModelFidelity`s on the
    same samples (the last two optional); `verdict` is "ok", "warning" or "poor" with its `reasons`."""

    samples: int
    specs: list[OutputSpec]
    quantized: ModelFidelity
    baseline: ModelFidelity | None
    predicted: ModelFidelity | None
    verdict: str
    reasons: list[str]
    bits: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict == OK

    @property
    def agreement(self) -> float:
        """The quantized model's agreement with fp32, in [0, 1] (the number `passes` gates)."""
        return self.quantized.agreement

    def passes(self, min_fidelity: float) -> bool:
        """True when the quantized model's agreement is at least `min_fidelity`."""
        return self.quantized.agreement >= min_fidelity

    def to_json(self) -> dict:
        return {
            "samples": self.samples,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "note": self.note,
            "bits": self.bits,
            "outputs": [
                {
                    "name": s.name,
                    "source": s.source,
                    "kind": s.kind.value,
                    "reason": s.reason,
                    "weight": s.weight,
                }
                for s in self.specs
            ],
            "quantized": self.quantized.to_json(),
            "baseline": None if self.baseline is None else self.baseline.to_json(),
            "predicted": None if self.predicted is None else self.predicted.to_json(),
        }

    def text(self) -> str:
        """A short table (measure, quantized, 8-bit PTQ, predicted) and the verdict line, which starts with
        "WARNING:" when the verdict is not ok."""
        scored = [s for s in self.specs if s.kind is not OutputKind.NONE]
        head = f"self-check on ONNX Runtime: {self.samples} samples"
        lines = [head + (f" ({self.note})" if self.note else "")]
        for s in scored:
            lines.append(f"  {s.describe()}")
        columns = [("quantized", self.quantized)]
        if self.baseline is not None:
            columns.append(("8-bit PTQ", self.baseline))
        if self.predicted is not None:
            columns.append(("predicted", self.predicted))
        rows: list[list[str]] = []
        prefix = len(scored) > 1
        for o in self.quantized.outputs:
            for name, value in o.measures.items():
                label = f"{o.name}: {name}" if prefix else name
                if name in o.reference:
                    label += f" (fp32 {o.reference[name]:.4f})"
                row = [label, _cell(name, value)]
                for _, fid in columns[1:]:
                    other = fid.output(o.name)
                    row.append(_cell(name, None if other is None else other.measures.get(name)))
                rows.append(row)
        rows.append(["model agreement", *(_cell("", fid.agreement) for _, fid in columns)])
        lines.append(_table(["measure", *(c for c, _ in columns)], rows))
        lines.append(self.verdict_line())
        return "\n".join(lines)

    def verdict_line(self) -> str:
        if self.verdict == OK:
            return f"self-check ok: model agreement {self.agreement:.4f}"
        what = "POOR" if self.verdict == POOR else "worse than expected"
        return f"WARNING: the quantized model is {what}: " + "; ".join(self.reasons)


def _cell(measure: str, v: float | None) -> str:
    if v is None:
        return "-"
    if measure == SQNR:
        return f"{v:.2f}"
    if measure in (KL, ABS_DIFF):
        return f"{v:.4g}"
    return f"{v:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """The first column left-aligned, the numbers right-aligned."""
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------ check


def self_check(
    reference: ModelArg,
    quantized: ModelArg,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    labels: np.ndarray | None = None,
    *,
    baseline: ModelArg | None = None,
    specs: Sequence[OutputSpec] | None = None,
    predicted: ModelFidelity | Mapping[str, np.ndarray] | None = None,
    bits: float | None = None,
    blank: int = 0,
    note: str = "",
) -> CheckResult:
    """Run `reference` (fp32), `quantized` and `baseline` on ONNX Runtime over `feeds` and judge the
    quantized model (see the module docstring).

    `feeds` is one feed (every input's samples on its sample axis, `mqtool.runtime.sample_axis`) or a list
    of them; `labels` one per sample. `specs` defaults to `classify(plan_outputs(reference), fp32 values)`.
    `predicted` is the search's own prediction on the same samples: a `ModelFidelity`, or the simulation's
    outputs (output name -> the source tensor's values, sample-major), measured here. `bits` is the budget
    in average bits (decides the rule against the baseline; None: below 8). `blank` is the CTC blank index.
    """
    ref = _load(reference, "reference", allow_quantized=False)
    qm = _load(quantized, "quantized")
    bm = None if baseline is None else _load(baseline, "baseline")
    in_specs = model_inputs(ref)
    feed = _join(feeds, in_specs)
    names = [o.name for o in ref.graph.output]
    for m, what in ((qm, "quantized"), (bm, "baseline")):
        if m is not None and [o.name for o in m.graph.output] != names:
            got = [o.name for o in m.graph.output]
            raise InputError(
                f"{what} model: outputs {got} differ from the reference's {names}", field="model"
            )
    runner = _Runner(ref, in_specs, feed)
    ref_values = runner.values(ref, "reference")
    if specs is None:
        specs = classify(plan_outputs(ref), ref_values)
    specs = list(specs)
    n = runner.samples
    y = None if labels is None else np.asarray(labels)[:n]
    q_fid = model_fidelity(specs, ref_values, runner.values(qm, "quantized"), y, blank=blank)
    b_fid = (
        None
        if bm is None
        else model_fidelity(specs, ref_values, runner.values(bm, "baseline"), y, blank=blank)
    )
    p_fid = predicted
    if predicted is not None and not isinstance(predicted, ModelFidelity):
        p_fid = model_fidelity(specs, ref_values, predicted, y, blank=blank)
    verdict, reasons = judge(q_fid, b_fid, p_fid, bits)
    log.info("self-check: %s %s", verdict, "; ".join(reasons))
    return CheckResult(
        samples=n,
        specs=specs,
        quantized=q_fid,
        baseline=b_fid,
        predicted=p_fid,
        verdict=verdict,
        reasons=reasons,
        bits=bits,
        note=note,
    )


def judge(
    quantized: ModelFidelity,
    baseline: ModelFidelity | None = None,
    predicted: ModelFidelity | None = None,
    bits: float | None = None,
) -> tuple[str, list[str]]:
    """(verdict, reasons) by the rules of the module docstring."""
    poor: list[str] = []
    warn: list[str] = []
    if quantized.agreement < FLOOR:
        also = ""
        if baseline is not None and baseline.agreement < FLOOR:
            also = (
                f" (8-bit PTQ scores {baseline.agreement:.4f} too: the model or these samples may not suit "
                "quantization)"
            )
        poor.append(f"model agreement {quantized.agreement:.4f} is under {FLOOR}{also}")
    at_8 = bits is not None and bits >= 8
    if baseline is not None:
        for label, q, b in _compared(quantized, baseline):
            gap, se = paired_gap(b, q)
            qv, bv = float(np.mean(q)), float(np.mean(b))
            if at_8:
                allowed = max(W8_SLACK, 3 * se)
                if gap > allowed:
                    warn.append(
                        f"at {bits:g} bits, {label} {qv:.4f} is {gap:.4f} below 8-bit PTQ's {bv:.4f} "
                        f"(noise allows {allowed:.4f})"
                    )
            elif qv < HALF * bv and gap > 3 * se:
                poor.append(f"{label} {qv:.4f} is less than half of 8-bit PTQ's {bv:.4f}")
            elif gap > max(LARGE_GAP, 3 * se):
                warn.append(
                    f"{label} {qv:.4f} is {gap:.4f} below 8-bit PTQ's {bv:.4f}: this budget costs much of the "
                    "quality (a larger budget, or --max-drop, keeps more)"
                )
        if not at_8:
            warn += _sqnr_gaps(quantized, baseline)
    if predicted is not None:
        for label, q, p in _compared(quantized, predicted):
            gap, se = paired_gap(p, q)
            allowed = max(PREDICTED_SLACK, 3 * se)
            if gap > allowed:
                warn.append(
                    f"{label} {float(np.mean(q)):.4f} is {gap:.4f} below what the search predicted "
                    f"({float(np.mean(p)):.4f}; noise allows {allowed:.4f}): the emitted file does not "
                    "behave like the simulation"
                )
    if poor:
        return POOR, poor + warn
    if warn:
        return WARNING, warn
    return OK, []


def _sqnr_gaps(quantized: ModelFidelity, baseline: ModelFidelity) -> list[str]:
    """Regression outputs whose SQNR (the worst channel's where the output has channels) is under
    `SQNR_LOW_DB` and more than `SQNR_GAP_DB` under 8-bit PTQ's."""
    out = []
    for o in quantized.outputs:
        other = baseline.output(o.name)
        measure = WORST_CHANNEL_SQNR if WORST_CHANNEL_SQNR in o.measures else SQNR
        q, b = o.measures.get(measure), None if other is None else other.measures.get(measure)
        if q is None or b is None or not np.isfinite(b) or b - q <= SQNR_GAP_DB or q >= SQNR_LOW_DB:
            continue
        out.append(
            f"'{o.name}' {measure} {q:.1f} is {b - q:.1f} dB below 8-bit PTQ's {b:.1f} (its cosine "
            f"{o.measures.get(COSINE, float('nan')):.4f} may hide it): check this output with your task metric"
        )
    return out


def _compared(a: ModelFidelity, b: ModelFidelity) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, a's per-sample values, b's) of the measures a verdict compares, where both have them: the
    model's agreement, and per output its agreement (when it is not the model's own), CTC string agreement,
    top-1 accuracy and a detector's score agreement."""
    pairs = [("model agreement", a.per_sample, b.per_sample)]
    single = len(a.outputs) == 1
    for o in a.outputs:
        other = b.output(o.name)
        if other is None:
            continue
        for m in ([] if single else [o.agreement_measure]) + [CTC, ACCURACY, SCORES]:
            if m in o.per_sample and m in other.per_sample:
                pairs.append((m if single else f"'{o.name}' {m}", o.per_sample[m], other.per_sample[m]))
    return pairs


# ------------------------------------------------------------------------------------------ running


class _Runner:
    """Runs models over one feed and returns each output's source values sample-major."""

    def __init__(self, ref: onnx.ModelProto, specs: list[InputSpec], feed: dict[str, np.ndarray]):
        self.specs, self.feed = specs, feed
        self.fixed = fixed_batch(specs)
        if self.fixed is not None:
            self.runs = split_feed(feed, specs)
            self.samples = len(self.runs) * self.fixed
            self.axes = None
        else:
            self.samples = feed_samples(feed, specs)
            if self.samples < 1:
                raise InputError("self-check: no samples to check on", field="data")
            self.runs = [
                _slice(feed, specs, i, min(i + BATCH, self.samples)) for i in range(0, self.samples, BATCH)
            ]
            sources = _sources(ref)
            sess = ort_session(ref, outputs=sources)
            one = [o.shape for o in _run(sess, sources, resize_feed(feed, specs, 1), "reference")]
            two = [o.shape for o in _run(sess, sources, resize_feed(feed, specs, 2), "reference")]
            self.axes = output_sample_axes(one, two)

    def values(self, model: onnx.ModelProto, what: str) -> dict[str, np.ndarray | None]:
        """Output name -> its source tensor's values over all samples, sample axis first (None for an output
        that holds no samples)."""
        sources = _sources(model)
        sess = ort_session(model, outputs=sources)
        per_run = [_run(sess, sources, run, what) for run in self.runs]
        names = [o.name for o in model.graph.output]
        out: dict[str, np.ndarray | None] = {}
        for i, name in enumerate(names):
            parts = [r[i] for r in per_run]
            if self.fixed == 1:
                out[name] = np.stack(parts)
            elif self.fixed is not None:
                axis = next((d for d, size in enumerate(parts[0].shape) if size == self.fixed), None)
                out[name] = None if axis is None else np.concatenate([np.moveaxis(p, axis, 0) for p in parts])
            elif self.axes[i] is None:
                out[name] = None
            else:
                out[name] = np.concatenate([np.moveaxis(p, self.axes[i], 0) for p in parts])
        return out


def _sources(model: onnx.ModelProto) -> list[str]:
    """The tensor compared for each graph output, in output order (an ArgMax's float input, etc.)."""
    return [p.source for p in plan_outputs(model)]


def _run(sess, names: list[str], feed: Mapping[str, np.ndarray], what: str) -> list[np.ndarray]:
    try:
        return [np.asarray(v) for v in sess.run(names, dict(feed))]
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise InputError(f"the {what} model fails in ONNX Runtime on the self-check samples: {msg}") from e


def _load(model: ModelArg, what: str, allow_quantized: bool = True) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return load_model(os.fspath(model), allow_quantized=allow_quantized)


def _slice(
    feed: Mapping[str, np.ndarray], specs: list[InputSpec], start: int, stop: int
) -> dict[str, np.ndarray]:
    out = {}
    for s in specs:
        v = feed[s.name]
        axis = sample_axis(s.shape)
        if axis is None or np.ndim(v) <= axis:
            out[s.name] = v
        else:
            index = [slice(None)] * np.ndim(v)
            index[axis] = slice(start, stop)
            out[s.name] = np.ascontiguousarray(v[tuple(index)])
    return out


def _join(
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]], specs: list[InputSpec]
) -> dict[str, np.ndarray]:
    """One feed from a feed or a list of them (joined on each input's sample axis; shared inputs from the
    first)."""
    if isinstance(feeds, Mapping):
        parts = [feeds]
    else:
        parts = list(feeds)
    if not parts:
        raise InputError("self-check: no samples to check on", field="data")
    missing = [s.name for s in specs if s.name not in parts[0]]
    if missing:
        raise InputError(f"self-check samples: no values for model input '{missing[0]}'", field="data")
    if len(parts) == 1:
        return {s.name: np.asarray(parts[0][s.name]) for s in specs}
    out = {}
    for s in specs:
        axis = sample_axis(s.shape)
        first = np.asarray(parts[0][s.name])
        if axis is None or first.ndim <= axis:
            out[s.name] = first
        else:
            out[s.name] = np.concatenate([np.asarray(p[s.name]) for p in parts], axis=axis)
    return out


# ------------------------------------------------------------------------------------------ helpers


def uniform8_baseline(
    model: ModelArg, data, *, calibration: str = "percentile", storage: str = "auto"
) -> onnx.ModelProto:
    """The same tool's uniform 8-bit PTQ of `model` (weights and activations at 8 bits), calibrated on
    `data` (any `mqtool.emit.quantize_model` data source): the baseline of `self_check`."""
    from mqtool.analysis import analyze
    from mqtool.emit import quantize_model
    from mqtool.policy import Policy
    from passes.pipeline import prepare

    m = _load(model, "reference", allow_quantized=False)
    policy = Policy.uniform(analyze(prepare(m)).names, 8, 8)
    policy.meta = {"source": "uniform w8a8 (self-check baseline)"}
    return quantize_model(m, policy, data=data, calibration=calibration, storage=storage)


@dataclass
class HeldOut:
    """The last samples of a data source, kept for the self-check. `calibration` is the same source capped
    to the samples before them (the source itself when nothing could be held out: then `in_sample`)."""

    feed: dict[str, np.ndarray]
    labels: np.ndarray | None
    samples: int
    total: int
    calibration: DataSpec
    in_sample: bool


def hold_out(
    data: str | os.PathLike | DataSpec,
    model: onnx.ModelProto,
    *,
    fraction: float = HOLDOUT_FRACTION,
    cap: int = HOLDOUT_MAX,
    read: bool = True,
) -> HeldOut:
    """The last min(`cap`, `fraction` of the samples) of `data` for the self-check (all of them when that
    is 0), read in order without holding the rest in memory; with `read` False only counted (`feed` empty:
    the caller wants `calibration` alone)."""
    spec = DataSpec(data) if not isinstance(data, DataSpec) else data
    ds = open_data(spec, model)
    total = ds.num_samples
    held = min(cap, int(total * fraction))
    in_sample = held == 0
    first = 0 if in_sample else total - held
    calibration = spec if in_sample else DataSpec(spec, max_samples=first)
    if not read:
        return HeldOut({}, None, total - first, total, calibration, in_sample)
    parts: list[dict[str, np.ndarray]] = []
    start = 0
    for feed in ds.batches(256):
        size = feed_samples(feed, ds.specs)
        lo = max(0, first - start)
        if lo < size:
            parts.append(slice_feed(feed, ds.specs, slice(lo, None)))
        start += size
    if not parts:
        raise InputError(f"{spec}: no samples left for the self-check", field="data")
    feed = concat_feeds(parts, ds.specs)
    count = feed_samples(feed, ds.specs)
    labels = None if ds.labels is None else np.asarray(ds.labels)[first : first + count]
    return HeldOut(feed, labels, count, total, calibration, in_sample)


def check_conversion(
    reference: str | os.PathLike,
    quantized: str | os.PathLike,
    data,
    *,
    held: HeldOut | None = None,
    summary: Mapping | None = None,
    calibration: str = "percentile",
    bits: float | None = None,
    baseline_is_quantized: bool = False,
    trained_on_data: bool = False,
) -> CheckResult:
    """The self-check of a converted file (`mqtool convert`'s end): `quantized` against the fp32 model at
    `reference` and the uniform 8-bit PTQ calibrated like it (or `quantized` itself when it is that,
    `baseline_is_quantized`).

    The samples are the search's held-out split when `summary` (the search's summary) has `check_feeds`
    (with `check_labels` and `predicted_fidelity`), else `held` (from `hold_out` before the conversion, whose
    `calibration` the conversion calibrated on), else the last samples of `data` taken now (they also
    calibrated). `trained_on_data`: a search or finetuning trained on all of `data`, said in the note."""
    ref = load_model(os.fspath(reference))
    summary = summary or {}
    predicted = summary.get("predicted_fidelity")
    calib = data
    if summary.get("check_feeds") is not None:
        feeds, labels = summary["check_feeds"], summary.get("check_labels")
        note = "the search's held-out samples"
    else:
        held_before = held is not None
        if held is None:
            held = hold_out(data, ref)
        else:
            calib = held.calibration
        feeds, labels = held.feed, held.labels
        if held.in_sample:
            note = f"all {held.total} samples of the data, too few to hold any out: they also calibrated"
        else:
            note = f"the last {held.samples} of {held.total} samples of the data"
            note += ", held out from calibration" if held_before else ", which also calibrated"
        if trained_on_data:
            note += "; the search/finetuning trained on them"
    baseline: ModelArg | None = quantized
    if not baseline_is_quantized:
        try:
            baseline = uniform8_baseline(ref, calib, calibration=calibration)
        except InputError as e:
            log.info("self-check: no 8-bit PTQ baseline: %s", e)
            baseline, note = None, note + f"; no 8-bit PTQ baseline ({e})"
    return self_check(
        ref, quantized, feeds, labels, baseline=baseline, predicted=predicted, bits=bits, note=note
    )
