"""The objective: one loss for training and finetuning, one fitness for scoring, both pure functions of the
model's outputs, the fp32 teacher's outputs and (optionally) labels.

MetaQuantNet's training, the GA's fitness and finetuning all use the same `Objective`, so the three can
never disagree about what "good" means. Each scored output is compared for what it is
(`mqtool.outputs`): distributions per position with a KL divergence on their log-probabilities (logits
softened by the temperature where they are one class distribution per sample; probabilities and
log-probabilities taken as they are, never re-softmaxed),
independent probabilities per element, regression outputs by their error normalised per channel by the
fp32 variance, embeddings by cosine. Outputs are sample-major (`[N, ...]`); per sample, a distribution's
classes are on the last axis and every other axis is a position, so `[N, T, C]` and time-major models
(whose sample axis was moved first) are both a mean over positions, never one flattened distribution.

The teacher's outputs are stored once per split (`Objective.teacher`); distributions over many classes
keep only their top classes and the rest of their mass (a few KB per sample instead of megabytes for a
CTC recogniser over 8,000 characters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mqtool.errors import InputError
from mqtool.outputs import DISTRIBUTIONS, OutputKind, OutputSpec, channel_axis

# Distributions wider than this keep the teacher's top `_TOP_K` classes per position plus one bucket for
# the rest: KL on that coarsened distribution misses only how the tail mass is spread.
_FULL_CLASSES = 1024
_TOP_K = 32
_EPS = 1e-12


@dataclass
class Teacher:
    """The fp32 outputs of one split in the form the objective compares against (one entry per scored
    output: a tensor, or (top log-probs, their classes, log tail mass) for wide distributions)."""

    parts: list
    n: int
    energy: list = field(default_factory=list)  # per output: what normalises a regression error

    def rows(self, idx) -> list:
        out = []
        for p in self.parts:
            out.append(tuple(x[idx] for x in p) if isinstance(p, tuple) else p[idx])
        return out


@dataclass(frozen=True)
class Objective:
    """Scores sample-major outputs (`specs`: the scored outputs, in the order the outputs are given).

    `metric` "ce": cross-entropy on labels is the fitness (labels must exist, the first output must be one
    distribution per sample); anything else: the weighted sum over outputs of the distillation terms above.
    Training always distils, plus the cross-entropy when labels apply."""

    specs: tuple[OutputSpec, ...]
    metric: str = "kl"
    temperature: float = 2.0
    labels: bool = False  # labels exist and apply to the first output

    @classmethod
    def choose(
        cls,
        specs: Sequence[OutputSpec],
        metric: str | None,
        temperature: float,
        has_labels: bool,
        first_shape,
    ) -> Objective:
        """The objective for these outputs. Labels apply when the first scored output is a distribution with
        one position per sample (`first_shape`: its per-sample shape)."""
        scored = tuple(s for s in specs if s.kind is not OutputKind.NONE)
        first = scored[0]
        classifier = first.kind in DISTRIBUTIONS and len(first_shape) == 1
        if metric == "ce" and not has_labels:
            raise InputError(
                "objective.metric: ce needs labels, but the data has no 'y' array", field="objective.metric"
            )
        if metric == "ce" and not classifier:
            raise InputError(
                f"objective.metric: ce needs the first output to be one class distribution per sample; "
                f"'{first.name}' is {first.kind.value} of per-sample shape {list(first_shape)}",
                field="objective.metric",
            )
        if metric is None:
            metric = "ce" if has_labels and classifier else "kl"
        elif metric in ("cosine", "sqnr"):
            pass  # the specs were classified for it
        return cls(scored, metric, temperature, has_labels and classifier)

    # ---- teacher -------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher(self, outputs: list[torch.Tensor]) -> Teacher:
        """Store fp32 outputs (sample-major, one per scored output) for later comparison."""
        parts, energy = [], []
        for spec, t in zip(self.specs, outputs):
            t = t.float()
            k = spec.kind
            if k in DISTRIBUTIONS:
                logp = self._teacher_log_probs(k, t)
                if logp.shape[-1] > _FULL_CLASSES:
                    top, idx = logp.topk(_TOP_K, dim=-1)
                    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
                    parts.append((top, idx.to(torch.int32), rest))
                else:
                    parts.append(logp)
                energy.append(None)
            elif k is OutputKind.SIGMOID:
                parts.append(t.clamp(1e-7, 1 - 1e-7))
                energy.append(None)
            else:
                parts.append(t)
                energy.append(_channel_energy(t) if k is OutputKind.REGRESSION else None)
        return Teacher(parts, len(outputs[0]), energy)

    def softened(self, kind: OutputKind, shape) -> float:
        """The temperature for logits of per-sample `shape` ([N, ...]): the configured one (Hinton's
        distillation, T = 2) for one distribution per sample over at most `_FULL_CLASSES` classes, else 1.
        Per-position outputs are decoded position by position (greedy CTC reads each position's argmax):
        on a CTC recogniser over 8,210 characters, finetuning at T = 2 lowered its softened KL by a third
        while the lines decoded like fp32 fell from 0.53 to 0.16; at T = 1 they stayed at 0.53 and the
        per-position argmax agreement rose (docs/search.md)."""
        if kind is not OutputKind.LOGITS:
            return 1.0
        per_sample = math.prod(shape[1:-1]) if len(shape) > 2 else 1
        return self.temperature if per_sample == 1 and shape[-1] <= _FULL_CLASSES else 1.0

    def _teacher_log_probs(self, kind: OutputKind, t: torch.Tensor) -> torch.Tensor:
        if kind is OutputKind.LOGITS:
            return F.log_softmax(t / self.softened(kind, t.shape), dim=-1)
        if kind is OutputKind.PROBS:
            return t.clamp_min(_EPS).log()
        return t

    # ---- per-sample terms ------------------------------------------------------------------------------
    def _student_log_probs(self, kind: OutputKind, s: torch.Tensor) -> torch.Tensor:
        if kind is OutputKind.LOGITS:
            return F.log_softmax(s / self.softened(kind, s.shape), dim=-1)
        if kind is OutputKind.PROBS:
            return s.clamp_min(_EPS).log()
        return s

    def _output_terms(self, i: int, s: torch.Tensor, t, energy) -> torch.Tensor:
        """Per-sample divergence of output `i` (differentiable; [N])."""
        kind = self.specs[i].kind
        n = s.shape[0]
        if kind in DISTRIBUTIONS:
            logp = self._student_log_probs(kind, s.float())
            if isinstance(t, tuple):
                top, idx, rest = t
                ps = logp.gather(-1, idx.long())
                ps_rest = torch.log1p(-ps.exp().sum(-1).clamp(max=1 - 1e-7))
                kl = (top.exp() * (top - ps)).sum(-1) + rest.exp() * (rest - ps_rest)
            else:
                kl = (t.exp() * (t - logp)).sum(-1)
            return kl.reshape(n, -1).mean(1)
        if kind is OutputKind.SIGMOID:
            p = s.float().clamp(1e-7, 1 - 1e-7)
            kl = t * (t.log() - p.log()) + (1 - t) * ((1 - t).log() - (1 - p).log())
            return kl.reshape(n, -1).mean(1)
        if kind is OutputKind.EMBEDDING:
            return 1 - F.cosine_similarity(s.float().reshape(n, -1), t.reshape(n, -1), dim=1)
        err = (s.float() - t).pow(2)
        if energy is not None:
            err = err / energy
        return err.reshape(n, -1).mean(1)

    def sample_terms(self, outputs: list[torch.Tensor], teacher: list, energy: list) -> torch.Tensor:
        """Weighted sum over outputs of the per-sample terms ([N], differentiable)."""
        total = None
        for i, (s, t) in enumerate(zip(outputs, teacher)):
            v = self._output_terms(i, s, t, energy[i]) * self.specs[i].weight
            total = v if total is None else total + v
        return total

    def train_loss(self, outputs: list[torch.Tensor], teacher: list, energy: list, y: torch.Tensor | None):
        """The training loss of a mini-batch (MetaQuantNet and finetuning): distillation (x T^2 for the
        softened logits, so its gradients keep their scale) + cross-entropy when labels apply."""
        scale = self.softened(self.specs[0].kind, outputs[0].shape) ** 2
        loss = self.sample_terms(outputs, teacher, energy).mean() * scale
        if self.labels and y is not None:
            loss = loss + self._ce(outputs[0], y).mean()
        return loss

    def _ce(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kind = self.specs[0].kind
        out = out.reshape(out.shape[0], -1).float()
        if kind is OutputKind.LOGITS:
            return F.cross_entropy(out, y, reduction="none")
        logp = out.clamp_min(_EPS).log() if kind is OutputKind.PROBS else out
        return F.nll_loss(logp, y, reduction="none")

    def terms(
        self, outputs: list[torch.Tensor], teacher: list, energy: list, y: torch.Tensor | None
    ) -> np.ndarray:
        """Per-sample fitness terms (float64) whose sum the fitness is a monotone increasing function of."""
        if self.metric == "ce":
            v = self._ce(outputs[0], y)
        else:
            v = self.sample_terms(outputs, teacher, energy)
        return v.detach().cpu().double().numpy()

    def aggregate(self, total: float, n: int) -> float:
        """The fitness from the sum of the terms of `n` samples. "sqnr": -SQNR in dB of the normalised
        error (lower is better, like every fitness)."""
        if self.metric == "sqnr":
            return 10 * math.log10(max(total / n, 1e-20))
        return total / n


def _channel_energy(t: torch.Tensor) -> torch.Tensor:
    """What a regression output's squared error is divided by: per channel (the smallest per-sample axis
    when there are several and it is at most 64 wide, e.g. a detector's box and class rows), the fp32
    variance over samples and positions. The floor is per channel too: 1e-3 of the channel's own mean
    square (a constant channel cannot blow up) but at least 1e-6 of the whole output's, so that a detector's
    class scores (values in [0, 1], variance ~1e-3) are weighed as what decides its detections and not
    drowned by box coordinates in pixels (a floor relative to the whole output, ~4 there, made them
    ~1e-4 of the loss and a searched detector lost every detection at cosine 0.995). Broadcastable against
    the output."""
    whole = float(t.pow(2).mean().clamp_min(_EPS))
    axis = channel_axis(tuple(t.shape))
    if axis is not None:
        dims = [d for d in range(t.dim()) if d != axis]
        var = t.var(dim=dims, keepdim=True, unbiased=False)
        floor = (t.pow(2).mean(dim=dims, keepdim=True) * 1e-3).clamp_min(whole * 1e-6)
        return torch.maximum(var, floor).expand_as(t[:1])
    return (t.var(unbiased=False).clamp_min(whole * 1e-3)).reshape([1] * t.dim())
