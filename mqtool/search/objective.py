"""The objective: one loss for training and finetuning, one fitness for scoring, both pure functions of the
model's outputs, the fp32 teacher's outputs and (optionally) labels.

MetaQuantNet's training, the GA's fitness and finetuning all use the same `Objective`, so the three can
never disagree about what "good" means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mqtool.errors import InputError


@dataclass(frozen=True)
class Objective:
    """`metric`: "ce" (cross-entropy with labels), "kl" (distillation to the fp32 outputs), "cosine" or
    "sqnr" (embedding/regression outputs). Lower fitness is better."""

    metric: str
    temperature: float = 2.0

    @classmethod
    def choose(cls, metric: str | None, temperature: float, has_labels: bool) -> Objective:
        metric = metric or ("ce" if has_labels else "kl")
        if metric == "ce" and not has_labels:
            raise InputError(
                "objective.metric: ce needs labels, but the data has no 'y' array", field="objective.metric"
            )
        return cls(metric, temperature)

    def distill(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        if student.dim() < 2:
            return F.mse_loss(student, teacher)
        s = F.log_softmax(student.flatten(1) / t, dim=-1)
        q = F.log_softmax(teacher.flatten(1) / t, dim=-1)
        return F.kl_div(s, q, log_target=True, reduction="batchmean") * t * t

    def train_loss(self, out: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The training loss of a mini-batch (MetaQuantNet and finetuning)."""
        if self.metric in ("cosine", "sqnr"):
            return F.mse_loss(out, teacher) / teacher.pow(2).mean().clamp_min(1e-12)
        loss = self.distill(out, teacher)
        if y is not None:
            loss = loss + F.cross_entropy(out.flatten(1), y)
        return loss

    def terms(self, out: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None) -> np.ndarray:
        """Per-sample terms (float64) whose sum the fitness is a monotone increasing function of."""
        if self.metric == "ce":
            v = F.cross_entropy(out.flatten(1), y, reduction="none")
        elif self.metric == "kl":
            if out.dim() < 2:
                v = (out - teacher).pow(2)
            else:
                tau = self.temperature
                s = F.log_softmax(out.flatten(1) / tau, dim=-1)
                q = F.log_softmax(teacher.flatten(1) / tau, dim=-1)
                v = F.kl_div(s, q, log_target=True, reduction="none").sum(1)
        elif self.metric == "cosine":
            v = 1 - F.cosine_similarity(out.flatten(1), teacher.flatten(1), dim=1)
        else:  # sqnr: the noise energy per sample
            v = (out - teacher).pow(2).flatten(1).sum(1) if out.dim() > 1 else (out - teacher).pow(2)
        return v.detach().cpu().double().numpy()

    def aggregate(self, total: float, n: int, teacher: torch.Tensor) -> float:
        """The fitness from the sum of the terms of the first `n` samples (`teacher`: their fp32 outputs)."""
        if self.metric == "sqnr":
            signal = float(teacher[:n].double().pow(2).sum())
            return -10 * math.log10(signal / max(total, 1e-20))
        return total / n
