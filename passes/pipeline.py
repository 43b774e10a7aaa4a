"""The public `prepare` pipeline: the canonical float model that both the simulation and emission use.

    name_nodes -> fold_constants -> fold_batchnorm -> decompose_hardswish -> cleanup

The search runs its PyTorch simulation on `prepare(model)` and emission starts from that same prepared
model, so layer names (those `inspect` prints) and float weights agree between the two. `prepare` is
idempotent: preparing a prepared model changes nothing.
"""

from __future__ import annotations

import onnx

from passes.base import run_passes
from passes.cleanup import cleanup
from passes.decompose_hardswish import decompose_hardswish
from passes.fold_batchnorm import fold_batchnorm
from passes.fold_constants import fold_constants
from passes.name_nodes import name_nodes

PREPARE = [name_nodes, fold_constants, fold_batchnorm, decompose_hardswish, cleanup]


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A canonical copy of `model` (which is not modified): every node named as `inspect` names it,
    constants folded into initializers, BatchNormalization folded into its layer, HardSwish written as
    x * HardSigmoid(x), dead parts removed."""
    return run_passes(model, PREPARE).model
