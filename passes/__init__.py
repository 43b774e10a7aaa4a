"""ONNX graph passes: each takes a model and returns it plus whether it changed (see passes/base.py).

The public entry points are `prepare` (the canonical float model shared by simulation and emission),
`plan_activations` (which tensors get Q/DQ, with how many bits) and the passes themselves. Nothing here
imports torch or the search.
"""

from passes.base import PassError, PassResult, run_passes
from passes.cleanup import cleanup
from passes.fold_batchnorm import fold_batchnorm
from passes.fold_constants import fold_constants
from passes.gemm_to_matmul import gemm_to_matmul
from passes.insert_qdq import insert_qdq
from passes.name_nodes import name_nodes
from passes.pack_weights import pack_weights
from passes.pipeline import PREPARE, prepare
from passes.qdq_plan import (
    ActQuant,
    Container,
    Storage,
    WeightStorage,
    bias_scale,
    plan_activations,
    plan_storage,
    quantize_bias,
)
from passes.qparams import ActParams, LayerParams, QuantParams
from passes.set_metadata import set_metadata
from passes.upgrade_opset import upgrade_opset

__all__ = [
    "PREPARE",
    "ActParams",
    "ActQuant",
    "Container",
    "LayerParams",
    "PassError",
    "PassResult",
    "QuantParams",
    "Storage",
    "WeightStorage",
    "bias_scale",
    "cleanup",
    "fold_batchnorm",
    "fold_constants",
    "gemm_to_matmul",
    "insert_qdq",
    "name_nodes",
    "pack_weights",
    "plan_activations",
    "plan_storage",
    "prepare",
    "quantize_bias",
    "run_passes",
    "set_metadata",
    "upgrade_opset",
]
