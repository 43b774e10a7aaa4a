"""The searched file against uniform PTQ at its budget, on ONNX Runtime, before `convert` says "done".

A search can lose to the trivial answer: on a real OCR recogniser (ddddocr, CTC over 8,210 characters) a
policy searched for 4 average bits decoded 58% of the held-out lines like fp32, and plain uniform 4-bit
PTQ 63%. A user who asked for the best 4-bit model should get the better of the two. So, for an
average-bits budget, the uniform policy at the widest whole width within it is emitted too, self-checked on
the same held-out samples, and written instead when it is better in task terms by more than one standard
error of the paired difference (`headline`). What was compared is printed either way.

Only average-bits budgets: a uniform policy has no natural size, latency or BitOPs counterpart that is
sure to fit, and `--max-drop` already verifies its pick on ONNX Runtime.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mqtool.fidelity import ACCURACY, CTC, SCORES, ModelFidelity, paired_gap
from mqtool.selfcheck import CheckResult, check_conversion


@dataclass
class Fallback:
    """The comparison: the uniform width, the measure compared and both values, and whether the uniform
    file replaced the searched one (`check` is then the uniform file's self-check)."""

    width: int
    measure: str
    searched: float
    uniform: float
    stderr: float
    replaced: bool
    check: CheckResult
    result: object = None  # the uniform file's `emit.ConvertResult` when it was written

    def line(self) -> str:
        head = (
            f"against uniform {self.width}-bit PTQ on the same held-out samples: {self.measure} "
            f"{self.searched:.4f} searched, {self.uniform:.4f} uniform (standard error {self.stderr:.4f})"
        )
        if self.replaced:
            return (
                f"WARNING: {head}: the uniform policy is better, so it was written instead of the searched "
                f"one (`--bits {self.width}` gives it directly)"
            )
        return head


def headline(fid: ModelFidelity) -> tuple[str, np.ndarray]:
    """The per-sample task measure two files are compared on: a single output's CTC string agreement,
    top-1 accuracy with labels, or a detector's score agreement, in that order; else the model agreement."""
    if len(fid.outputs) == 1:
        o = fid.outputs[0]
        for m in (CTC, ACCURACY, SCORES):
            if m in o.per_sample:
                return m, o.per_sample[m]
    return "model agreement", fid.per_sample


def uniform_width(budget: Mapping | None, widths: list[int]) -> int | None:
    """The widest candidate width within an average-bits `budget` (the policy's `meta["budget"]`), or None
    for other budget kinds and budgets under the narrowest width."""
    if not budget or budget.get("kind") != "bits":
        return None
    fits = [w for w in widths if w <= float(budget["value"]) + 1e-9]
    return max(fits) if fits else None


def against_uniform(
    model: str,
    output: str,
    searched: CheckResult,
    width: int,
    data,
    *,
    summary: Mapping,
    calibration: str,
    storage: str,
    act_bits: int = 8,
) -> Fallback:
    """Emit uniform `width`-bit PTQ of `model` (calibrated on `data`, stored like the searched file), check it
    on the samples `searched` was checked on, and replace `output` with it when it is better
    (`headline`, by more than one standard error)."""
    from mqtool import emit

    folder = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(prefix=".mqtool-uniform-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        result = emit.convert(
            model,
            tmp,
            emit.uniform_policy(width, act_bits),
            data=data,
            calibration=calibration,
            storage=storage,
        )
        alone = {k: v for k, v in summary.items() if k != "predicted_fidelity"}
        check = check_conversion(model, tmp, data, summary=alone, calibration=calibration, bits=width)
        measure, s = headline(searched.quantized)
        _, u = headline(check.quantized)
        gap, se = paired_gap(u, s)
        replaced = gap > max(se, 0.0) and math.isfinite(gap)
        if replaced:
            os.replace(tmp, output)
            result.output = output
        return Fallback(
            width,
            measure,
            float(np.mean(s)),
            float(np.mean(u)),
            se,
            replaced,
            check if replaced else searched,
            result if replaced else None,
        )
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
