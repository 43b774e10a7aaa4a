"""Fidelity of a quantized model to its fp32 reference in the terms of the model's task.

A candidate's outputs are compared with fp32's, both sample-major (`[N, ...]`), per `OutputSpec` kind:

- distributions (logits, probabilities, log-probabilities; the distribution axis is the last one and the
  other per-sample axes are positions): "top-1 agreement" (per position, averaged), for sequences (more
  than one position) also "sequence agreement" (every position's argmax equal) and "CTC string agreement"
  (greedy CTC decoding: collapse repeats, drop the blank), "KL to fp32" (mean KL(fp32 || candidate) per
  position, in nats) and, with labels and one distribution per sample, "top-1 accuracy";
- independent probabilities (Sigmoid): "decision agreement" (share of values on fp32's side of 0.5), "mean
  abs difference" and, with more than one value per sample, "positive overlap" (Jaccard of the values above
  0.5, `positive_overlap`): a detector's score maps hold thousands of values, nearly all negative, so the
  share of equal decisions stays 0.99 while the detections are lost;
- regression: "cosine" (mean per sample) and "SQNR dB" (over all values), with channels (a detector's
  rows) also the worst channel's SQNR and, where some channels are scores in [0, 1], "score agreement"
  (the positions both call detections, `score_agreement`); embedding: "cosine".

Each output gets one number in [0, 1] for gates and tables, its *agreement*: top-1 (per-position)
agreement, positive overlap (decision agreement with one value per sample, where the two are equal), or the per-sample cosine clipped to [0, 1]; the model's agreement is the
mean of its scored outputs' agreements weighted by `OutputSpec.weight`. Agreement-type measures also keep
their per-sample values, so that two candidates measured on the same samples can be compared with a paired
standard error (`paired_gap`). Samples where the candidate is not finite agree on nothing.

Pure NumPy: the ONNX Runtime self-check (`mqtool.selfcheck`) and the search's simulation both measure with
these functions, so their numbers are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mqtool.errors import InputError
from mqtool.outputs import DISTRIBUTIONS, OutputKind, OutputSpec, channel_axis

TOP1 = "top-1 agreement"
SEQUENCE = "sequence agreement"
CTC = "CTC string agreement"
KL = "KL to fp32"
ACCURACY = "top-1 accuracy"
DECISION = "decision agreement"
POSITIVES = "positive overlap"
ABS_DIFF = "mean abs difference"
COSINE = "cosine"
SQNR = "SQNR dB"
WORST_CHANNEL_SQNR = "worst-channel SQNR dB"
SCORES = "score agreement"
# A regression output's channels whose fp32 values all lie in [0, 1] are scores (a detector's class and
# objectness rows); a position counts as a detection when one of them exceeds this, the usual confidence
# threshold of YOLO-style detectors.
SCORE_THRESHOLD = 0.25

# Probabilities are clipped here before their log: a quantized Softmax output can hold exact zeros (values
# below its quantization step), whose log would make the KL infinite for one rounding.
PROB_FLOOR = 1e-8


# ------------------------------------------------------------------------------------------ measures


def log_probs(values: np.ndarray, kind: OutputKind) -> np.ndarray:
    """Log-probabilities over the last axis (float64) of values of a distribution kind: the log-softmax of
    logits, the log of probabilities (clipped at `PROB_FLOOR` and renormalised), log-probabilities
    renormalised (a quantized LogSoftmax's exp need not sum to 1 exactly)."""
    v = np.asarray(values, dtype=np.float64)
    if kind is OutputKind.PROBS:
        v = np.log(np.clip(v, PROB_FLOOR, None))
    elif kind not in (OutputKind.LOGITS, OutputKind.LOG_PROBS):
        raise ValueError(f"log_probs: {kind.value} is not a distribution kind")
    shift = v.max(axis=-1, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    return v - (shift + np.log(np.exp(v - shift).sum(axis=-1, keepdims=True)))


def positions(values: np.ndarray) -> np.ndarray:
    """`[N, ..., C]` as `[N, P, C]`: one distribution per position, positions in order."""
    v = np.asarray(values)
    if v.ndim < 2:
        raise ValueError(f"a distribution output needs [N, ..., classes], got shape {list(v.shape)}")
    return v.reshape(v.shape[0], -1, v.shape[-1])


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per sample, the share of positions whose argmax over the last axis is the same (`[N]`)."""
    r, c = positions(reference), positions(candidate)
    return (r.argmax(-1) == c.argmax(-1)).mean(axis=1)


def sequence_agreement(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per sample, 1.0 when every position's argmax is the same, else 0.0 (`[N]`)."""
    r, c = positions(reference), positions(candidate)
    return (r.argmax(-1) == c.argmax(-1)).all(axis=1).astype(np.float64)


def ctc_greedy_decode(best: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of per-position class indices `[N, P]`: repeats collapsed, then `blank` dropped."""
    b = np.asarray(best)
    if b.ndim == 1:
        b = b[None]
    keep = b != blank
    keep[:, 1:] &= b[:, 1:] != b[:, :-1]
    return [tuple(int(t) for t in row[k]) for row, k in zip(b, keep)]


def ctc_agreement(reference: np.ndarray, candidate: np.ndarray, blank: int = 0) -> np.ndarray:
    """Per sample, 1.0 when the greedy CTC decodings of both distributions are the same string (`[N]`)."""
    r = ctc_greedy_decode(positions(reference).argmax(-1), blank)
    c = ctc_greedy_decode(positions(candidate).argmax(-1), blank)
    return np.array([float(a == b) for a, b in zip(r, c)])


def kl_per_sample(reference: np.ndarray, candidate: np.ndarray, kind: OutputKind) -> np.ndarray:
    """Per sample, the mean over positions of KL(reference || candidate) in nats (`[N]`), both read as
    `kind` (see `log_probs`)."""
    lr, lc = log_probs(positions(reference), kind), log_probs(positions(candidate), kind)
    p = np.exp(lr)
    with np.errstate(invalid="ignore"):
        kl = np.where(p > 0, p * (lr - lc), 0.0).sum(axis=-1)  # 0 log 0 = 0
    return kl.mean(axis=1)


def top1_accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose argmax over the last axis is the label (one distribution per sample)."""
    v = np.asarray(values)
    return float((v.reshape(v.shape[0], -1).argmax(-1) == np.asarray(labels)).mean())


def decision_agreement(reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per sample, the share of elements on the same side of `threshold` (`[N]`)."""
    r, c = _flat(reference), _flat(candidate)
    return ((r > threshold) == (c > threshold)).mean(axis=1)


def positive_overlap(reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per sample (`[N]`), the Jaccard overlap of the elements fp32 and the candidate put above `threshold`
    (1 where neither has one). On a real layout detector (PicoDet, 7,600 x 10 sigmoid scores per image) with
    4-bit weights, detection F1 against fp32 fell to 0.20 while 99.1-99.99% of the decisions stayed equal;
    this overlap read 0.03-0.12 (8-bit: 0.93-0.98, F1 0.98)."""
    r, c = _flat(reference) > threshold, np.nan_to_num(_flat(candidate), nan=0.0) > threshold
    union, inter = (r | c).sum(axis=1), (r & c).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mean_abs_difference(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per sample, the mean absolute difference of the elements (`[N]`)."""
    return np.abs(_flat(reference).astype(np.float64) - _flat(candidate)).mean(axis=1)


def cosine_per_sample(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per sample, the cosine similarity of the flattened values (`[N]`): 1 when both are zero, 0 when one
    is."""
    r, c = _flat(reference).astype(np.float64), _flat(candidate).astype(np.float64)
    dot = (r * c).sum(axis=1)
    den = np.sqrt((r * r).sum(axis=1) * (c * c).sum(axis=1))
    both_zero = ~r.any(axis=1) & ~c.any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, dot / np.where(den > 0, den, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def worst_channel_sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """The lowest SQNR over the channels of a regression output whose smallest per-sample axis is at most 64
    wide and not the only one (a detector's box and class rows), channels whose fp32 values are all zero
    left out; None for other shapes. A whole-output SQNR is dominated by the channels with the largest
    values (box coordinates in pixels) and cannot see the class scores a detector thresholds."""
    r, c = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    axis = channel_axis(r.shape)
    if axis is None:
        return None
    dims = tuple(d for d in range(r.ndim) if d != axis)
    signal = (r**2).sum(axis=dims)
    noise = ((r - c) ** 2).sum(axis=dims)
    live = signal > 0
    if not live.any():
        return None
    with np.errstate(divide="ignore"):
        return float(np.min(10 * np.log10(signal[live] / noise[live])))


def score_agreement(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray | None:
    """Per sample (`[N]`), the Jaccard overlap of the positions fp32 and the candidate call detections: on a
    regression output with a channel axis (`outputs.channel_axis`), the channels whose fp32 values all lie in
    [0, 1] are scores, and a position is a detection when one of them exceeds `SCORE_THRESHOLD` (1 where
    neither has one). None when the output has no such channels or fp32 detects nothing. On a real YOLOv8
    detector (nudenet) at 4 bits, cosine to fp32 was 0.991 and the worst channel's SQNR close to 8-bit's,
    while 46 of fp32's 357 detections survived; this measure read 0.13 (8-bit: 0.83)."""
    r, c = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    axis = channel_axis(r.shape)
    if axis is None:
        return None
    rr, cc = np.moveaxis(r, axis, 1), np.moveaxis(c, axis, 1)
    dims = (0, *range(2, rr.ndim))
    scores = (rr.min(axis=dims) >= 0.0) & (rr.max(axis=dims) <= 1.0)
    if not scores.any():
        return None
    hit_r = (rr[:, scores] > SCORE_THRESHOLD).any(axis=1).reshape(len(r), -1)
    if not hit_r.any():
        return None
    with np.errstate(invalid="ignore"):
        hit_c = (np.nan_to_num(cc[:, scores], nan=0.0) > SCORE_THRESHOLD).any(axis=1).reshape(len(c), -1)
    union = (hit_r | hit_c).sum(axis=1)
    inter = (hit_r & hit_c).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - candidate)^2) over all values: inf when equal, -inf when the
    reference is all zeros and the candidate is not."""
    r = np.asarray(reference, dtype=np.float64).ravel()
    d = r - np.asarray(candidate, dtype=np.float64).ravel()
    signal, noise = float(r @ r), float(d @ d)
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def _flat(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values)
    return v.reshape(v.shape[0], -1) if v.ndim else v.reshape(1, 1)


# ------------------------------------------------------------------------------------------ per output


@dataclass
class OutputFidelity:
    """One output's measures. `agreement` (in [0, 1]) is the measure named `agreement_measure` (for
    cosine: per sample clipped to [0, 1], then averaged); `per_sample` holds the agreement-type measures
    per sample, `reference` what fp32 itself scores where that means something (top-1 accuracy)."""

    name: str
    kind: OutputKind
    weight: float
    agreement: float
    agreement_measure: str
    measures: dict[str, float]
    per_sample: dict[str, np.ndarray] = field(repr=False)
    reference: dict[str, float] = field(default_factory=dict)
    nonfinite: int = 0  # samples where the candidate had NaN or Inf

    @property
    def samples(self) -> int:
        return len(self.per_sample[self.agreement_measure])

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "weight": self.weight,
            "agreement": _num(self.agreement),
            "agreement_measure": self.agreement_measure,
            "measures": {k: _num(v) for k, v in self.measures.items()},
            "reference": {k: _num(v) for k, v in self.reference.items()},
            "nonfinite_samples": self.nonfinite,
        }


def output_fidelity(
    spec: OutputSpec,
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    blank: int = 0,
) -> OutputFidelity:
    """The measures of one scored output (see the module docstring); both arrays sample-major and of the
    same shape. `blank` is the CTC blank index; `labels` (one per sample) add top-1 accuracy to an output
    with one distribution per sample."""
    if spec.kind is OutputKind.NONE:
        raise ValueError(f"output '{spec.name}' is not scored ({spec.reason})")
    r, c = np.asarray(reference), np.asarray(candidate)
    if r.shape != c.shape:
        raise InputError(
            f"output '{spec.name}': the candidate's values have shape {list(c.shape)}, fp32's "
            f"{list(r.shape)}",
            field="model",
        )
    bad = ~np.isfinite(_flat(c).astype(np.float64)).all(axis=1) if c.size else np.zeros(len(c), bool)
    measures: dict[str, float] = {}
    per_sample: dict[str, np.ndarray] = {}
    reference_scores: dict[str, float] = {}
    if spec.kind in DISTRIBUTIONS:
        main = TOP1
        per_sample[TOP1] = top1_agreement(r, c)
        if positions(r).shape[1] > 1:
            per_sample[SEQUENCE] = sequence_agreement(r, c)
            per_sample[CTC] = ctc_agreement(r, c, blank)
        kl = kl_per_sample(r, c, spec.kind)
        measures[KL] = float(np.mean(np.where(bad, np.inf, kl))) if len(kl) else math.nan
        if labels is not None and positions(r).shape[1] == 1:
            y = np.asarray(labels)[: len(r)]
            if len(y) == len(r):
                reference_scores[ACCURACY] = top1_accuracy(r, y)
                per_sample[ACCURACY] = (positions(c).argmax(-1)[:, 0] == y).astype(np.float64)
    elif spec.kind is OutputKind.SIGMOID:
        per_sample[DECISION] = decision_agreement(r, c)
        main = DECISION
        if _flat(r).shape[1] > 1:
            main = POSITIVES
            per_sample[POSITIVES] = positive_overlap(r, c)
        measures[ABS_DIFF] = float(np.mean(mean_abs_difference(r, c)))
    else:
        main = COSINE
        cos = cosine_per_sample(r, c)
        per_sample[COSINE] = np.clip(cos, 0.0, 1.0)
        measures[COSINE] = float(np.mean(np.where(bad, 0.0, cos)))
        if spec.kind is OutputKind.REGRESSION:
            measures[SQNR] = sqnr_db(r, c) if not bad.any() else -math.inf
            worst = worst_channel_sqnr_db(r, c) if not bad.any() else -math.inf
            if worst is not None:
                measures[WORST_CHANNEL_SQNR] = worst
            hits = score_agreement(r, c)
            if hits is not None:
                per_sample[SCORES] = hits
    for k in per_sample:
        per_sample[k] = np.where(bad, 0.0, per_sample[k])
    ordered = {k: float(np.mean(v)) for k, v in per_sample.items()}
    if main == COSINE:
        ordered.pop(COSINE)  # the unclipped mean is shown; the clipped one is the agreement
    ordered.update(measures)
    return OutputFidelity(
        name=spec.name,
        kind=spec.kind,
        weight=spec.weight,
        agreement=float(np.mean(per_sample[main])),
        agreement_measure=main,
        measures=ordered,
        per_sample=per_sample,
        reference=reference_scores,
        nonfinite=int(bad.sum()),
    )


# ------------------------------------------------------------------------------------------ per model


@dataclass
class ModelFidelity:
    """A candidate's fidelity over its scored outputs. `per_sample` is the weighted mean of the outputs'
    per-sample agreements; `agreement` its mean."""

    outputs: list[OutputFidelity]
    agreement: float
    per_sample: np.ndarray = field(repr=False)

    @property
    def samples(self) -> int:
        return len(self.per_sample)

    @property
    def stderr(self) -> float:
        """Standard error of `agreement` over the samples."""
        return _stderr(self.per_sample)

    def output(self, name: str) -> OutputFidelity | None:
        return next((o for o in self.outputs if o.name == name), None)

    def to_json(self) -> dict:
        return {
            "agreement": _num(self.agreement),
            "stderr": _num(self.stderr),
            "samples": self.samples,
            "outputs": [o.to_json() for o in self.outputs],
        }


def model_fidelity(
    specs: Sequence[OutputSpec],
    reference: Mapping[str, np.ndarray | None],
    candidate: Mapping[str, np.ndarray | None],
    labels: np.ndarray | None = None,
    *,
    blank: int = 0,
) -> ModelFidelity:
    """Each scored output's `OutputFidelity` and the model's agreement. `reference` and `candidate` map each
    output name to the values of its `source` tensor, sample-major (as `mqtool.outputs.classify` takes
    them)."""
    outs = []
    for s in specs:
        if s.kind is OutputKind.NONE:
            continue
        if reference.get(s.name) is None or candidate.get(s.name) is None:
            raise InputError(f"output '{s.name}': no values to compare", field="model")
        outs.append(output_fidelity(s, reference[s.name], candidate[s.name], labels, blank=blank))
    if not outs:
        raise InputError("model: no output is scored", field="model")
    if len({o.samples for o in outs}) > 1:
        each = ", ".join(f"'{o.name}' {o.samples}" for o in outs)
        raise InputError(f"model: outputs hold different numbers of samples ({each})", field="model")
    weights = np.array([o.weight for o in outs], dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    stacked = np.stack([o.per_sample[o.agreement_measure] for o in outs])
    per_sample = (weights[:, None] * stacked).sum(axis=0) / weights.sum()
    return ModelFidelity(outs, float(per_sample.mean()) if per_sample.size else math.nan, per_sample)


# ------------------------------------------------------------------------------------------ comparing


def paired_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean(a) - mean(b), its standard error): paired when both hold the same number of samples (the same
    samples, as in a self-check), else from the two standard errors."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    gap = float(a.mean() - b.mean())
    if len(a) == len(b):
        return gap, _stderr(a - b)
    return gap, math.hypot(_stderr(a), _stderr(b))


def _stderr(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def _num(v: float) -> float | None:
    """A float for JSON: None when not finite (JSON has no inf or NaN)."""
    return float(v) if v is not None and math.isfinite(v) else None
