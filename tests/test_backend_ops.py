"""Op semantics of the PyTorch backend, one tiny in-memory model per case, against ONNX Runtime.

Each case is a single node. Inputs listed in `const` become initializers (the converter reads them at
build time); every case with constant parameters also runs with all inputs fed at run time, which takes
the other code path of ops such as Reshape, Slice, Pad or Resize. Where ONNX Runtime cannot run a case,
`onnx.reference.ReferenceEvaluator` is the reference. A coverage test checks that every registered op has
a case here, and that docs/backend.md lists every registered op.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from mqtool.backend import ActFakeQuant, supported_ops, to_torch
from mqtool.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = np.random.default_rng(0)
I64_MAX = np.iinfo(np.int64).max
I64_MIN = np.iinfo(np.int64).min


def f32(*shape: int, lo: float = -2.0, hi: float = 2.0) -> np.ndarray:
    return R.uniform(lo, hi, shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class Case:
    id: str
    op: str
    inputs: list
    attrs: dict = field(default_factory=dict)
    opset: int = 17
    outputs: int = 1
    const: tuple = ()
    # "ort", "onnx" (ReferenceEvaluator) where ORT lacks the op, or a NumPy function of the inputs
    ref: str | Callable = "ort"

    def model(self, const: tuple) -> onnx.ModelProto:
        names, graph_inputs, inits = [], [], []
        for i, v in enumerate(self.inputs):
            if v is None:
                names.append("")
                continue
            name = f"in{i}"
            names.append(name)
            if i in const:
                inits.append(numpy_helper.from_array(np.asarray(v), name))
            else:
                dtype = helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype)
                graph_inputs.append(helper.make_tensor_value_info(name, dtype, np.asarray(v).shape))
        outs = [f"out{i}" for i in range(self.outputs)]
        node = helper.make_node(self.op, names, outs, name="n0", **self.attrs)
        graph = helper.make_graph(
            [node], self.id, graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outs], inits
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10
        return model

    def feeds(self, const: tuple) -> dict:
        return {
            f"in{i}": np.asarray(v) for i, v in enumerate(self.inputs) if v is not None and i not in const
        }


def _lrn_spec(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """LRN as the ONNX spec writes it. (onnx 1.23's ReferenceEvaluator loops over the batch axis instead
    of the channels, and ORT rejects even sizes, so neither can check an even size.)"""
    x64 = x.astype(np.float64)
    out = np.empty_like(x64)
    channels = x.shape[1]
    for c in range(channels):
        lo, hi = max(0, c - (size - 1) // 2), min(channels - 1, c + size // 2)
        square_sum = (x64[:, lo : hi + 1] ** 2).sum(axis=1)
        out[:, c] = x64[:, c] / (bias + alpha / size * square_sum) ** beta
    return out.astype(np.float32)


X4 = f32(2, 3, 7, 6)
X3 = f32(2, 3, 9)
X5 = f32(1, 2, 5, 6, 4)
IMG = f32(1, 2, 4, 5)

CASES = [
    # ------------------------------------------------------------------ unary / activations
    *[
        Case(op.lower(), op, [f32(2, 3, 4)])
        for op in [
            "Relu",
            "Sigmoid",
            "Tanh",
            "Exp",
            "Neg",
            "Abs",
            "Erf",
            "Floor",
            "Ceil",
            "Sin",
            "Cos",
            "Sign",
            "Softplus",
            "Softsign",
            "HardSwish",
            "Identity",
        ]
    ],
    Case("log", "Log", [f32(3, 4, lo=0.1)]),
    Case("sqrt", "Sqrt", [f32(3, 4, lo=0.0)]),
    Case("reciprocal", "Reciprocal", [f32(3, 4, lo=0.5)]),
    Case("round_ties_even", "Round", [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 3.7], np.float32)]),
    Case("not", "Not", [np.array([True, False, True])]),
    Case("isnan", "IsNaN", [np.array([1.0, np.nan, -np.inf], np.float32)]),
    Case("mish", "Mish", [f32(2, 5)], opset=18),
    Case("leaky_relu", "LeakyRelu", [f32(2, 5)], {"alpha": 0.3}),
    Case("elu", "Elu", [f32(2, 5)], {"alpha": 0.7}),
    Case("selu", "Selu", [f32(2, 5)]),
    Case("celu", "Celu", [f32(2, 5)], {"alpha": 1.5}),
    Case("thresholded_relu", "ThresholdedRelu", [f32(2, 5)], {"alpha": 0.5}),
    Case("hard_sigmoid", "HardSigmoid", [f32(2, 5, lo=-6, hi=6)], {"alpha": 0.3, "beta": 0.4}),
    Case("prelu", "PRelu", [IMG, f32(2, 1, 1)], const=(1,)),
    Case("gelu", "Gelu", [f32(3, 4, lo=-4, hi=4)], opset=20),
    Case("gelu_tanh", "Gelu", [f32(3, 4, lo=-4, hi=4)], {"approximate": "tanh"}, opset=20),
    Case("dropout", "Dropout", [f32(3, 4)], {"ratio": 0.5}, opset=9),
    Case("dropout_mask", "Dropout", [f32(3, 4)], outputs=2, opset=13),
    # ------------------------------------------------------------------ binary / variadic
    Case("add_bcast", "Add", [f32(2, 3, 4), f32(3, 1)]),
    Case("sub_bcast", "Sub", [f32(4), f32(2, 3, 4)]),
    Case("mul_bcast", "Mul", [f32(2, 1, 4), f32(3, 1)]),
    Case("div", "Div", [f32(2, 3), f32(2, 3, lo=0.5)]),
    Case("div_int_trunc", "Div", [i64(7, -7, 9, -9, 0), i64(2, 2, -4, -4, 3)]),
    Case("pow", "Pow", [f32(2, 3, lo=0.1), f32(2, 3)]),
    Case("pow_int_exponent", "Pow", [f32(2, 3), i64(2)], const=(1,)),
    Case("mod_int", "Mod", [i64(7, -7, 9, -9), i64(3, 3, -4, -4)]),
    Case("mod_fmod", "Mod", [f32(5), f32(5, lo=0.5)], {"fmod": 1}),
    *[
        Case(
            op.lower(),
            op,
            [np.array([1.0, 2.0, 3.0, 2.0], np.float32), np.array([2.0, 2.0, 1.0, 5.0], np.float32)],
        )
        for op in ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"]
    ],
    *[
        Case(op.lower(), op, [np.array([True, False, True, False]), np.array([True, True, False, False])])
        for op in ["And", "Or", "Xor"]
    ],
    Case("sum3", "Sum", [f32(2, 3), f32(3), f32(2, 1)]),
    Case("mean3", "Mean", [f32(2, 3), f32(3), f32(2, 1)]),
    Case("max3", "Max", [f32(2, 3), f32(3), f32(2, 1)]),
    Case("min2", "Min", [f32(2, 3), f32(3)]),
    Case("where", "Where", [R.random((2, 3)) > 0.5, f32(2, 3), f32(3)]),
    # ------------------------------------------------------------------ Clip and Cast
    Case("clip_attrs_opset6", "Clip", [f32(3, 4)], {"min": -0.5, "max": 0.7}, opset=6),
    Case("clip_inputs", "Clip", [f32(3, 4), np.float32(-0.5), np.float32(0.7)], const=(1, 2)),
    Case("clip_min_only", "Clip", [f32(3, 4), np.float32(0.2)], const=(1,)),
    Case("clip_max_only", "Clip", [f32(3, 4), None, np.float32(0.2)], const=(2,)),
    Case("clip_none", "Clip", [f32(3, 4)]),
    Case(
        "cast_trunc_int",
        "Cast",
        [np.array([-2.7, -0.5, 0.5, 2.7], np.float32)],
        {"to": onnx.TensorProto.INT32},
    ),
    Case("cast_bool", "Cast", [np.array([0.0, 0.1, -3.0], np.float32)], {"to": onnx.TensorProto.BOOL}),
    Case("cast_to_float", "Cast", [i64(1, -2, 3)], {"to": onnx.TensorProto.FLOAT}),
    Case("cast_like", "CastLike", [i64(1, 2), np.zeros(1, np.float32)]),
    # ------------------------------------------------------------------ linear algebra
    Case("matmul_batched_bcast", "MatMul", [f32(2, 1, 3, 4), f32(5, 4, 6)]),
    Case("matmul_vec_mat", "MatMul", [f32(4), f32(2, 4, 3)]),
    Case("matmul_mat_vec", "MatMul", [f32(2, 3, 4), f32(4)]),
    # A constant operand makes the node a QuantLayer (weight on the left: W @ x).
    Case("matmul_weight_left", "MatMul", [f32(5, 4), f32(2, 4, 3)], const=(0,)),
    Case("matmul_weight_right_batched", "MatMul", [f32(2, 3, 4), f32(2, 4, 6)], const=(1,)),
    Case("gemm_linear_2d_bias", "Gemm", [f32(3, 5), f32(4, 5), f32(1, 4)], {"transB": 1}, const=(1, 2)),
    Case("gemm_linear", "Gemm", [f32(3, 5), f32(4, 5), f32(4)], {"transB": 1}, const=(1, 2)),
    Case(
        "gemm_transA_alpha_beta",
        "Gemm",
        [f32(5, 3), f32(5, 4), f32(1, 4)],
        {"transA": 1, "alpha": 0.5, "beta": 2.0},
        const=(1, 2),
    ),
    Case(
        "gemm_both_trans_full_c",
        "Gemm",
        [f32(5, 3), f32(4, 5), f32(3, 4)],
        {"transA": 1, "transB": 1, "beta": -1.0},
        const=(1,),
    ),
    Case("gemm_no_c", "Gemm", [f32(3, 5), f32(5, 4)], {"alpha": 3.0}, const=(1,)),
    Case("gemm_scalar_c", "Gemm", [f32(3, 5), f32(5, 4), np.array(0.25, np.float32)], {"beta": 0.5}),
    Case("einsum", "Einsum", [f32(2, 3, 4), f32(2, 4, 5)], {"equation": "bij,bjk->bik"}, opset=12),
    # ------------------------------------------------------------------ normalization
    Case(
        "batchnorm_3d_input",
        "BatchNormalization",
        [X3, f32(3), f32(3), f32(3), f32(3, lo=0.5, hi=1.5)],
        {"epsilon": 1e-3},
        opset=15,
        const=(1, 2, 3, 4),
    ),
    Case(
        "batchnorm_opset9",
        "BatchNormalization",
        [X4, f32(3), f32(3), f32(3), f32(3, lo=0.5, hi=1.5)],
        opset=9,
        const=(1, 2, 3, 4),
    ),
    Case("instancenorm", "InstanceNormalization", [X4, f32(3), f32(3)], {"epsilon": 1e-4}, const=(1, 2)),
    Case(
        "layernorm_last",
        "LayerNormalization",
        [f32(2, 5, 8), f32(8), f32(8)],
        {"epsilon": 1e-5},
        const=(1, 2),
    ),
    Case("layernorm_axis1_no_bias", "LayerNormalization", [f32(2, 5, 8), f32(5, 8)], {"axis": 1}, const=(1,)),
    Case("layernorm_bcast_scale", "LayerNormalization", [f32(2, 5, 8), f32(1, 8)], {"axis": 1}, const=(1,)),
    Case("lrn_odd", "LRN", [f32(2, 7, 3, 3)], {"size": 5, "alpha": 0.01, "beta": 0.75, "bias": 1.5}),
    Case(
        "lrn_even",
        "LRN",
        [f32(2, 7, 3, 3)],
        {"size": 4, "alpha": 0.02, "beta": 0.5, "bias": 2.0},
        ref=lambda x: _lrn_spec(x, 4, 0.02, 0.5, 2.0),
    ),
    Case(
        "lrn_odd_spec",
        "LRN",
        [f32(2, 7, 3, 3)],
        {"size": 3, "alpha": 0.05, "beta": 0.75, "bias": 1.0},
        ref=lambda x: _lrn_spec(x, 3, 0.05, 0.75, 1.0),
    ),
    Case("softmax_opset11_flattens", "Softmax", [f32(2, 3, 4)], {"axis": 1}, opset=11),
    Case("softmax_opset11_default", "Softmax", [f32(2, 3, 4)], opset=11),
    Case("softmax_opset13_axis1", "Softmax", [f32(2, 3, 4)], {"axis": 1}, opset=13),
    Case("logsoftmax_opset11", "LogSoftmax", [f32(2, 3, 2, 2)], {"axis": 2}, opset=11),
    Case("logsoftmax_opset13", "LogSoftmax", [f32(2, 3, 4)]),
    # ------------------------------------------------------------------ convolution
    Case(
        "conv1d",
        "Conv",
        [X3, f32(4, 3, 3), f32(4)],
        {"pads": [2, 1], "strides": [2], "dilations": [2]},
        const=(1, 2),
    ),
    Case(
        "conv2d_grouped_asym_pads",
        "Conv",
        [f32(1, 4, 7, 6), f32(6, 2, 3, 2)],
        {"group": 2, "pads": [1, 0, 2, 1], "strides": [2, 1]},
        const=(1,),
    ),
    Case("conv2d_runtime_bias", "Conv", [X4, f32(4, 3, 1, 1), f32(4)], const=(1,)),
    Case(
        "conv2d_depthwise",
        "Conv",
        [X4, f32(3, 1, 3, 3), f32(3)],
        {"group": 3, "pads": [1, 1, 1, 1]},
        const=(1, 2),
    ),
    Case(
        "conv3d",
        "Conv",
        [X5, f32(3, 2, 2, 3, 1), f32(3)],
        {"pads": [1, 0, 0, 0, 1, 0], "strides": [1, 2, 1], "dilations": [2, 1, 1]},
        const=(1, 2),
    ),
    Case(
        "conv_same_upper",
        "Conv",
        [X4, f32(4, 3, 3, 2)],
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        const=(1,),
    ),
    Case("conv_same_lower", "Conv", [X4, f32(4, 3, 4, 4)], {"auto_pad": "SAME_LOWER"}, const=(1,)),
    Case("conv_valid", "Conv", [X4, f32(4, 3, 3, 3)], {"auto_pad": "VALID", "strides": [2, 2]}, const=(1,)),
    Case(
        "convT_stride_pads_outpad",
        "ConvTranspose",
        [IMG, f32(2, 3, 3, 3), f32(3)],
        {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
        const=(1, 2),
    ),
    Case(
        "convT_1d_grouped",
        "ConvTranspose",
        [f32(1, 4, 5), f32(4, 2, 3)],
        {"group": 2, "strides": [3]},
        const=(1,),
    ),
    Case(
        "convT_asym_pads_dilated",
        "ConvTranspose",
        [IMG, f32(2, 3, 3, 2), f32(3)],
        {"strides": [2, 1], "pads": [0, 1, 2, 0], "dilations": [1, 2]},
        const=(1, 2),
    ),
    Case(
        "convT_output_shape",
        "ConvTranspose",
        [IMG, f32(2, 1, 3, 3)],
        {"strides": [2, 2], "output_shape": [8, 10]},
        const=(1,),
    ),
    Case(
        "convT_same_upper",
        "ConvTranspose",
        [IMG, f32(2, 1, 3, 3)],
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        const=(1,),
    ),
    Case(
        "convT_same_lower",
        "ConvTranspose",
        [IMG, f32(2, 1, 3, 2)],
        {"strides": [2, 3], "auto_pad": "SAME_LOWER"},
        const=(1,),
    ),
    Case(
        "convT_output_shape_odd",
        "ConvTranspose",
        [IMG, f32(2, 1, 3, 3)],
        {"strides": [2, 2], "output_shape": [6, 9]},
        const=(1,),
    ),
    Case(
        "convT_big_output_padding",
        "ConvTranspose",
        [IMG, f32(2, 1, 2, 2)],
        {"strides": [3, 3], "output_padding": [2, 1]},
        const=(1,),
    ),
    Case(
        "convT_3d",
        "ConvTranspose",
        [f32(1, 2, 3, 3, 2), f32(2, 2, 2, 2, 2)],
        {"strides": [2, 1, 2]},
        const=(1,),
    ),
    # ------------------------------------------------------------------ pooling
    Case(
        "maxpool_ceil",
        "MaxPool",
        [f32(1, 2, 8, 7)],
        {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    ),
    Case(
        "maxpool_ceil_pads",
        "MaxPool",
        [f32(1, 2, 8, 7)],
        {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    ),
    Case(
        "maxpool_asym_pads",
        "MaxPool",
        [f32(1, 2, 8, 7)],
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1]},
    ),
    Case(
        "maxpool_same_upper",
        "MaxPool",
        [f32(1, 2, 8, 7)],
        {"kernel_shape": [3, 2], "strides": [2, 3], "auto_pad": "SAME_UPPER"},
    ),
    Case(
        "maxpool_same_lower", "MaxPool", [f32(1, 2, 8, 7)], {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"}
    ),
    Case("maxpool_dilated", "MaxPool", [f32(1, 2, 9, 9)], {"kernel_shape": [2, 2], "dilations": [2, 3]}),
    Case("maxpool_1d", "MaxPool", [X3], {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    Case("maxpool_3d", "MaxPool", [X5], {"kernel_shape": [2, 2, 2], "strides": [1, 2, 2]}),
    Case(
        "avgpool_sym_pads_exclude",
        "AveragePool",
        [f32(1, 2, 7, 7)],
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    ),
    Case(
        "avgpool_sym_pads_include",
        "AveragePool",
        [f32(1, 2, 7, 7)],
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    ),
    Case(
        "avgpool_asym_pads", "AveragePool", [f32(1, 2, 7, 7)], {"kernel_shape": [3, 3], "pads": [0, 0, 1, 1]}
    ),
    Case(
        "avgpool_asym_pads_include",
        "AveragePool",
        [f32(1, 2, 7, 7)],
        {"kernel_shape": [3, 3], "pads": [0, 1, 2, 1], "count_include_pad": 1},
    ),
    Case(
        "avgpool_ceil",
        "AveragePool",
        [f32(1, 2, 8, 7)],
        {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    ),
    Case(
        "avgpool_ceil_pads_include",
        "AveragePool",
        [f32(1, 2, 8, 7)],
        {
            "kernel_shape": [3, 3],
            "strides": [2, 2],
            "pads": [1, 1, 1, 1],
            "ceil_mode": 1,
            "count_include_pad": 1,
        },
    ),
    Case(
        "avgpool_ceil_asym_pads",
        "AveragePool",
        [f32(1, 2, 8, 7)],
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1},
    ),
    Case(
        "avgpool_same_upper",
        "AveragePool",
        [f32(1, 2, 8, 7)],
        {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    ),
    Case("avgpool_1d", "AveragePool", [X3], {"kernel_shape": [4], "strides": [3]}),
    Case("avgpool_3d", "AveragePool", [X5], {"kernel_shape": [2, 3, 2], "pads": [1, 1, 0, 1, 1, 0]}),
    Case("global_avgpool", "GlobalAveragePool", [X5]),
    Case("global_maxpool", "GlobalMaxPool", [X3]),
    # ------------------------------------------------------------------ shapes
    Case("reshape_zero_minus1", "Reshape", [X4, i64(0, -1, 6)], const=(1,)),
    Case(
        "reshape_allowzero",
        "Reshape",
        [np.zeros((0, 6), np.float32), i64(0, 2, 3)],
        {"allowzero": 1},
        opset=14,
        const=(1,),
    ),
    Case("flatten_axis0", "Flatten", [X4], {"axis": 0}),
    Case("flatten_axis2", "Flatten", [X4], {"axis": 2}),
    Case("flatten_axis_neg", "Flatten", [X4], {"axis": -1}),
    Case("transpose_perm", "Transpose", [X4], {"perm": [2, 0, 3, 1]}),
    Case("transpose_default", "Transpose", [X3]),
    Case("squeeze_attr", "Squeeze", [f32(1, 3, 1, 2)], {"axes": [0, -2]}, opset=11),
    Case("squeeze_input", "Squeeze", [f32(1, 3, 1, 2), i64(2)], const=(1,)),
    Case("squeeze_all", "Squeeze", [f32(1, 3, 1, 2)]),
    Case("unsqueeze_attr", "Unsqueeze", [f32(3, 2)], {"axes": [0, -1]}, opset=11),
    Case("unsqueeze_input", "Unsqueeze", [f32(3, 2), i64(3, 1)], const=(1,)),
    Case("concat", "Concat", [f32(2, 3), f32(2, 1), f32(2, 0)], {"axis": -1}),
    Case("split_attr", "Split", [f32(2, 7)], {"axis": 1, "split": [3, 4]}, opset=11, outputs=2),
    Case("split_input", "Split", [f32(6, 2), i64(1, 2, 3)], const=(1,), outputs=3),
    Case("split_equal", "Split", [f32(6, 2)], outputs=3),
    Case("split_num_outputs", "Split", [f32(2, 7)], {"axis": 1, "num_outputs": 3}, opset=18, outputs=3),
    Case("slice_opset9", "Slice", [X4], {"starts": [1, -3], "ends": [3, 100], "axes": [1, 3]}, opset=9),
    Case(
        "slice_neg_steps",
        "Slice",
        [X4, i64(-1, 5), i64(I64_MIN, 0), i64(1, 3), i64(-1, -2)],
        const=(1, 2, 3, 4),
    ),
    Case("slice_big_ends_no_axes", "Slice", [X3, i64(0, 1, -100), i64(I64_MAX, 3, 100)], const=(1, 2)),
    Case(
        "slice_neg_step_clamped", "Slice", [f32(6), i64(100), i64(-100), i64(0), i64(-3)], const=(1, 2, 3, 4)
    ),
    Case("shape", "Shape", [X4]),
    Case("shape_start_end", "Shape", [X4], {"start": 1, "end": -1}, opset=15),
    Case("size", "Size", [X4]),
    Case("gather_axis1_2d", "Gather", [X3, np.array([[0, -1], [2, 1]], np.int64)], {"axis": 1}, const=(1,)),
    Case("gather_scalar", "Gather", [X3, np.array(-2, np.int64)], {"axis": 2}, const=(1,)),
    Case("gather_int32", "Gather", [f32(5, 2), np.array([4, 0], np.int32)], const=(1,)),
    Case(
        "gather_elements",
        "GatherElements",
        [f32(3, 4), np.array([[0, -1, 2, 1], [3, 0, 0, 1]], np.int64)],
        {"axis": 1},
        const=(1,),
    ),
    Case("expand_bidirectional", "Expand", [f32(3, 1), i64(2, 1, 4)], const=(1,)),
    Case("trilu_upper_k", "Trilu", [f32(2, 4, 5), i64(1)], const=(1,), opset=14),
    Case("trilu_lower", "Trilu", [f32(4, 3)], {"upper": 0}, opset=14),
    Case("trilu_lower_neg_k", "Trilu", [f32(4, 3), i64(-1)], {"upper": 0}, opset=14, const=(1,)),
    Case("cumsum", "CumSum", [f32(3, 4), i64(1)], const=(1,)),
    Case(
        "cumsum_exclusive_reverse", "CumSum", [f32(3, 4), i64(-2)], {"exclusive": 1, "reverse": 1}, const=(1,)
    ),
    Case("tile", "Tile", [f32(2, 3), i64(2, 1)], const=(1,)),
    Case(
        "constant_of_shape",
        "ConstantOfShape",
        [i64(2, 3)],
        {"value": numpy_helper.from_array(np.array([7], np.int64))},
    ),
    Case("constant_of_shape_default", "ConstantOfShape", [i64(4)]),
    Case("constant", "Constant", [], {"value": numpy_helper.from_array(f32(2, 2))}),
    Case(
        "range_float",
        "Range",
        [np.array(1.0, np.float32), np.array(4.0, np.float32), np.array(0.75, np.float32)],
    ),
    Case("range_int_neg", "Range", [np.array(10, np.int64), np.array(1, np.int64), np.array(-3, np.int64)]),
    # ------------------------------------------------------------------ reductions
    Case("reducemean_attr", "ReduceMean", [X4], {"axes": [1, -1], "keepdims": 0}, opset=13),
    Case("reducemean_input", "ReduceMean", [X4, i64(-1)], opset=18, const=(1,)),
    Case("reducemean_all", "ReduceMean", [X4], opset=18),
    Case("reducesum_input", "ReduceSum", [X4, i64(0, 2)], {"keepdims": 0}, const=(1,)),
    Case("reducesum_noop", "ReduceSum", [X4], {"noop_with_empty_axes": 1}, const=()),
    Case("reducemax", "ReduceMax", [X4], {"axes": [2]}, opset=13),
    Case("reducemin", "ReduceMin", [X4, i64(1, 3)], opset=18, const=(1,)),
    Case("reduceprod", "ReduceProd", [f32(2, 3, 4, lo=0.5, hi=1.5), i64(1, 2)], opset=18, const=(1,)),
    Case("reducesumsquare", "ReduceSumSquare", [X4], {"axes": [1]}, opset=13),
    Case("reducel1", "ReduceL1", [X4], {"axes": [1]}, opset=13),
    Case("reducel2", "ReduceL2", [X4], {"axes": [3], "keepdims": 0}, opset=13),
    Case("reducelogsumexp", "ReduceLogSumExp", [X4], {"axes": [1]}, opset=13),
    Case("argmax", "ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], {"axis": 1}),
    Case(
        "argmax_last",
        "ArgMax",
        [np.array([[1, 3, 3], [2, 2, 0]], np.float32)],
        {"axis": 1, "select_last_index": 1, "keepdims": 0},
    ),
    Case("argmin", "ArgMin", [np.array([[1, 3, 1], [2, 2, 0]], np.float32)], {"axis": -1}),
    # ------------------------------------------------------------------ Pad
    Case("pad_constant", "Pad", [IMG, i64(0, 1, 2, -1, 0, 0, 1, 3), np.float32(1.5)], const=(1, 2)),
    Case("pad_reflect", "Pad", [IMG, i64(0, 0, 2, 3, 0, 0, 1, 4)], {"mode": "reflect"}, const=(1,)),
    Case("pad_edge", "Pad", [IMG, i64(0, 1, 2, 3, 0, 0, 3, 1)], {"mode": "edge"}, const=(1,)),
    Case("pad_wrap", "Pad", [IMG, i64(0, 0, 2, 3, 0, 0, 1, 2)], {"mode": "wrap"}, opset=19, const=(1,)),
    Case("pad_axes", "Pad", [IMG, i64(1, -1, 2, 1), None, i64(-1, 1)], opset=18, const=(1, 3)),
    Case("pad_opset2", "Pad", [IMG], {"pads": [0, 0, 1, 1, 0, 0, 2, 0], "value": -1.0}, opset=2),
    # ------------------------------------------------------------------ Resize / Upsample
    Case(
        "resize_nearest_default",
        "Resize",
        [IMG, None, np.array([1, 1, 2, 1.5], np.float32)],
        opset=13,
        const=(2,),
    ),
    Case(
        "resize_nearest_asym_floor",
        "Resize",
        [IMG, None, np.array([1, 1, 2.5, 0.6], np.float32)],
        {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
        opset=13,
        const=(2,),
    ),
    Case(
        "resize_nearest_ceil_tf",
        "Resize",
        [IMG, None, np.array([1, 1, 1.7, 2], np.float32)],
        {"coordinate_transformation_mode": "tf_half_pixel_for_nn", "nearest_mode": "ceil"},
        opset=13,
        const=(2,),
    ),
    Case(
        "resize_nearest_prefer_ceil_sizes",
        "Resize",
        [IMG, None, None, i64(1, 2, 9, 3)],
        {"nearest_mode": "round_prefer_ceil"},
        opset=13,
        const=(3,),
    ),
    Case(
        "resize_linear_half_pixel_up",
        "Resize",
        [IMG, None, np.array([1, 1, 2, 3], np.float32)],
        {"mode": "linear"},
        opset=13,
        const=(2,),
    ),
    Case(
        "resize_linear_half_pixel_down",
        "Resize",
        [f32(1, 2, 9, 8), None, np.array([1, 1, 0.5, 0.7], np.float32)],
        {"mode": "linear"},
        opset=13,
        const=(2,),
    ),
    Case(
        "resize_linear_align_corners_sizes",
        "Resize",
        [IMG, None, None, i64(1, 2, 7, 3)],
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        opset=13,
        const=(3,),
    ),
    Case(
        "resize_linear_pytorch_half_pixel",
        "Resize",
        [IMG, None, None, i64(1, 2, 1, 8)],
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
        opset=13,
        const=(3,),
    ),
    Case(
        "resize_linear_asymmetric_3d",
        "Resize",
        [f32(1, 2, 3, 4), None, np.array([1, 1, 2, 1.5], np.float32)],
        {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
        opset=13,
        const=(2,),
    ),
    Case(
        "resize_linear_half_pixel_symmetric",
        "Resize",
        [IMG, None, np.array([1, 1, 2.5, 1.5], np.float32)],
        {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
        opset=19,
        const=(2,),
    ),
    Case(
        "resize_cubic",
        "Resize",
        [IMG, None, np.array([1, 1, 2, 1.5], np.float32)],
        {"mode": "cubic"},
        opset=13,
        const=(2,),
    ),
    Case(
        "resize_cubic_exclude_outside",
        "Resize",
        [IMG, None, np.array([1, 1, 2, 0.8], np.float32)],
        {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5},
        opset=13,
        const=(2,),
    ),
    Case(
        "resize_axes",
        "Resize",
        [IMG, None, np.array([3, 2], np.float32)],
        {"axes": [2, 3], "mode": "linear"},
        opset=18,
        const=(2,),
    ),
    Case(
        "resize_opset10_nearest", "Resize", [IMG, np.array([1, 1, 2, 0.5], np.float32)], opset=10, const=(1,)
    ),
    Case(
        "resize_opset10_linear",
        "Resize",
        [IMG, np.array([1, 1, 2, 1.5], np.float32)],
        {"mode": "linear"},
        opset=10,
        const=(1,),
    ),
    Case(
        "resize_opset11_roi_scales",
        "Resize",
        [IMG, np.zeros(0, np.float32), np.array([1, 1, 2, 2], np.float32)],
        {"mode": "linear"},
        opset=11,
        const=(1, 2),
    ),
    Case("upsample_opset9", "Upsample", [IMG, np.array([1, 1, 2, 3], np.float32)], opset=9, const=(1,)),
    # ------------------------------------------------------------------ (de)quantization
    Case(
        "quantize_linear_uint8",
        "QuantizeLinear",
        [f32(2, 3, lo=-3, hi=3), np.float32(0.02), np.uint8(128)],
        opset=13,
        const=(1, 2),
    ),
    Case(
        "quantize_linear_int8_axis",
        "QuantizeLinear",
        [f32(2, 3, lo=-3, hi=3), np.array([0.01, 0.02, 0.05], np.float32), np.zeros(3, np.int8)],
        {"axis": 1},
        opset=13,
        const=(1, 2),
    ),
    Case(
        "dequantize_linear",
        "DequantizeLinear",
        [np.array([[0, 3, 255]], np.uint8), np.float32(0.1), np.uint8(3)],
        opset=13,
        const=(1, 2),
    ),
    Case(
        "dequantize_linear_axis0",
        "DequantizeLinear",
        [np.array([[-128, 3], [7, 127]], np.int8), np.array([0.5, 0.25], np.float32)],
        {"axis": 0},
        opset=13,
        const=(1,),
    ),
    # ------------------------------------------------------------------ recurrent (the full grid is in
    # test_recurrent.py: directions, layouts, sequence_lens, activations, gradients)
    Case(
        "lstm_bidirectional",
        "LSTM",
        [
            f32(4, 2, 3),
            f32(2, 8, 3, lo=-0.5, hi=0.5),
            f32(2, 8, 2, lo=-0.5, hi=0.5),
            f32(2, 16),
            None,
            f32(2, 2, 2),
        ],
        {"hidden_size": 2, "direction": "bidirectional"},
        outputs=3,
        const=(1, 2, 3),
    ),
    Case(
        "gru",
        "GRU",
        [f32(4, 2, 3), f32(1, 6, 3, lo=-0.5, hi=0.5), f32(1, 6, 2, lo=-0.5, hi=0.5), f32(1, 12)],
        {"hidden_size": 2, "linear_before_reset": 1},
        outputs=2,
        const=(1, 2, 3),
    ),
    # ------------------------------------------------------------------ control flow (more in test_control_flow.py)
    *[
        Case(
            f"if_{cond}",
            "If",
            [np.array(cond)],
            {
                # The branches read the outer-scope condition: 1.5 + cond or 1.5 * cond as floats.
                "then_branch": helper.make_graph(
                    [
                        helper.make_node("Cast", ["in0"], ["c"], to=onnx.TensorProto.FLOAT),
                        helper.make_node("Add", ["c", "k"], ["t"]),
                    ],
                    "then",
                    [],
                    [helper.make_empty_tensor_value_info("t")],
                    [numpy_helper.from_array(np.float32([1.5, 2.5]), "k")],
                ),
                "else_branch": helper.make_graph(
                    [
                        helper.make_node("Cast", ["in0"], ["c2"], to=onnx.TensorProto.FLOAT),
                        helper.make_node("Mul", ["c2", "k2"], ["e"]),
                    ],
                    "else",
                    [],
                    [helper.make_empty_tensor_value_info("e")],
                    [numpy_helper.from_array(np.float32([1.5, 2.5]), "k2")],
                ),
            },
        )
        for cond in (True, False)
    ],
    Case(
        "loop_carried_and_scan",
        "Loop",
        [np.int64(4), np.array(True), f32(2, 3)],
        {
            "body": helper.make_graph(
                [
                    helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                    helper.make_node("Cast", ["i"], ["i_f"], to=onnx.TensorProto.FLOAT),
                    helper.make_node("Mul", ["v_in", "i_f"], ["scaled"]),
                    helper.make_node("Add", ["v_in", "scaled"], ["v_out"]),
                    helper.make_node("ReduceSum", ["v_out"], ["scan_out"], keepdims=0),
                ],
                "body",
                [
                    helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                    helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
                    helper.make_tensor_value_info("v_in", onnx.TensorProto.FLOAT, [2, 3]),
                ],
                [
                    helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
                    helper.make_tensor_value_info("v_out", onnx.TensorProto.FLOAT, [2, 3]),
                    helper.make_tensor_value_info("scan_out", onnx.TensorProto.FLOAT, []),
                ],
            )
        },
        outputs=2,
    ),
    Case(
        "rnn_reverse",
        "RNN",
        [f32(4, 2, 3), f32(1, 2, 3), f32(1, 2, 2)],
        {"hidden_size": 2, "direction": "reverse"},
        outputs=2,
        const=(1, 2),
    ),
]


def _reference(case: Case, model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    if callable(case.ref):
        return [case.ref(*[np.asarray(v) for v in case.inputs])]
    if case.ref == "ort":
        try:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return sess.run(None, feeds)
        except (
            ort.capi.onnxruntime_pybind11_state.NotImplemented,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph,
        ):
            pass  # ORT lacks this op/opset: fall back to the ONNX reference implementation
    return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]


def _compare(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs {ref.shape}"
    if ref.dtype.kind in "biu":
        assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} vs {ref.dtype}"
        np.testing.assert_array_equal(got, ref, err_msg=what)
    else:
        scale = max(1.0, float(np.nanmax(np.abs(ref))) if ref.size else 1.0)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * scale, equal_nan=True, err_msg=what)


def _variants(case: Case) -> list[tuple]:
    return [case.const, ()] if case.const else [()]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op(case: Case) -> None:
    for const in _variants(case):
        model = case.model(const)
        feeds = case.feeds(const)
        ref = _reference(case, model, feeds)
        module = to_torch(model)
        with torch.no_grad():
            got = module.run({k: torch.from_numpy(np.array(v)) for k, v in feeds.items()})
        for i, r in enumerate(ref):
            _compare(got[f"out{i}"].numpy(), np.asarray(r), f"{case.id} (constants: {const}) output {i}")


def test_every_registered_op_has_a_case() -> None:
    covered = {c.op for c in CASES}
    missing = sorted(set(supported_ops()) - covered)
    assert not missing, f"registered ops without a test case: {missing}"


def test_docs_list_every_registered_op() -> None:
    with open(os.path.join(ROOT, "docs", "backend.md"), encoding="utf-8") as f:
        doc = f.read()
    section = doc.split("## Supported ops", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(\w+)`", section))
    assert listed == set(supported_ops()), (
        f"docs/backend.md out of date: missing {sorted(set(supported_ops()) - listed)}, "
        f"extra {sorted(listed - set(supported_ops()))} (regenerate with python -m mqtool.backend.ops)"
    )


# ------------------------------------------------------------------------------------------ errors


def test_unsupported_ops_listed_at_once() -> None:
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "custom.domain" : 1]>
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Relu(x)
            b = Foo(a)
            c = Bar(b)
            d = Foo(c)
            e = custom.domain.Baz(d)
            y = Relu(e)
        }
    """)
    with pytest.raises(InputError) as err:
        to_torch(model)
    message = str(err.value)
    assert message.startswith("model: unsupported ops for the PyTorch backend: Bar, Foo, custom.domain.Baz")
    for name in ("Foo_1", "Bar_2", "Foo_3", "Baz_4"):
        assert name in message


def test_unsupported_attributes_listed_at_once() -> None:
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 1, 4, 4] x) => (float[1, 1, 8, 8] y) {
            r = Resize <mode = "bogus"> (x, , , sz)
            y = MaxPool <kernel_shape = [2, 2]> (r)
            sz = Constant <value = int64[4] {1, 1, 8, 8}> ()
        }
    """)
    bad = onnx.helper.make_node("BatchNormalization", ["x", "s", "s", "s", "s"], ["z"], training_mode=1)
    model.graph.node.append(bad)
    with pytest.raises(InputError, match=r"mode 'bogus'.*training_mode=1"):
        to_torch(model)


# ------------------------------------------------------------------------------- module behaviour


def test_run_returns_intermediates_and_forward_tuple() -> None:
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y, float[N, 3] z) {
            h = Relu(x)
            y = Neg(h)
            z = Add(h, x)
        }
    """)
    module = to_torch(model)
    x = torch.randn(5, 3)
    y, z = module(x)
    assert torch.equal(y, -torch.relu(x)) and torch.equal(z, torch.relu(x) + x)
    got = module.run({"x": x.numpy()}, ["h", "x"])
    assert torch.equal(got["h"], torch.relu(x)) and torch.equal(got["x"], x)
    with pytest.raises(KeyError, match="nope"):
        module.run({"x": x}, ["nope"])


def test_shape_arithmetic_follows_the_batch() -> None:
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as torch's exporter writes for x.view(B, -1, 2).
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 3] x) => (float[N, 6, 2] y) {
            s = Shape(x)
            zero = Constant <value = int64 {0}> ()
            b = Gather <axis = 0> (s, zero)
            ax = Constant <value = int64[1] {0}> ()
            b1 = Unsqueeze(b, ax)
            rest = Constant <value = int64[2] {-1, 2}> ()
            shape = Concat <axis = 0> (b1, rest)
            y = Reshape(x, shape)
        }
    """)
    module = to_torch(model)
    for batch in (1, 3, 8):
        x = torch.randn(batch, 4, 3)
        assert torch.equal(module(x), x.reshape(batch, 6, 2))


def test_docs_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    with open(os.path.join(ROOT, "docs", "backend.md"), encoding="utf-8") as f:
        code = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "docs/backend.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["q"].min() >= -8 and scope["q"].max() <= 7 and scope["scale"].dtype == np.float32


def test_qdq_model_with_int4_weights_runs() -> None:
    # What the emitter writes: activation Q/DQ (uint8) and an INT4 per-channel weight behind a
    # DequantizeLinear. The weight folds to float at conversion; the Conv stays a quantizable layer.
    w = R.integers(-8, 8, (4, 3, 3, 3))
    inits = [
        helper.make_tensor("wq", onnx.TensorProto.INT4, w.shape, w.reshape(-1).tolist()),
        numpy_helper.from_array(np.array([0.1, 0.2, 0.05, 0.3], np.float32), "ws"),
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
        helper.make_node("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 5, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = f32(2, 3, 5, 5)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (ref,) = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    module = to_torch(model)
    assert list(module.layers) == ["Conv_3"]
    dequantized = w.astype(np.float32) * np.array([0.1, 0.2, 0.05, 0.3], np.float32).reshape(4, 1, 1, 1)
    assert torch.equal(module.layers["Conv_3"].weight, torch.from_numpy(dequantized))
    with torch.no_grad():
        _compare(module(torch.from_numpy(x)).numpy(), ref, "qdq int4")


POOL_SWEEP = [
    (op, k, s, pads, ceil, include)
    for op in ("MaxPool", "AveragePool")
    for k, s in ((2, 2), (3, 2), (3, 1), (4, 3))
    for pads in ((0, 0), (1, 1), (0, 1), (1, 0), (2, 1))
    for ceil in (0, 1)
    for include in ((0, 1) if op == "AveragePool" else (0,))
    if max(pads) < max(2, k - 1)  # ONNX: pads smaller than the kernel
]


@pytest.mark.parametrize("op,k,s,pads,ceil,include", POOL_SWEEP)
def test_pool_sweep(op: str, k: int, s: int, pads: tuple, ceil: int, include: int) -> None:
    # Symmetric small pads take torch's native pooling; the rest the explicit-padding path. Both must
    # agree with ORT on output size (ceil_mode) and on the divisor (count_include_pad).
    attrs = {
        "kernel_shape": [k, max(2, k - 1)],
        "strides": [s, 1],
        "ceil_mode": ceil,
        "pads": [pads[0], pads[1], pads[1], pads[0]],
    }
    if op == "AveragePool":
        attrs["count_include_pad"] = include
    case = Case("sweep", op, [f32(1, 2, 9, 8)], attrs, opset=19 if op == "MaxPool" else 17)
    model = case.model(())
    feeds = case.feeds(())
    (ref,) = _reference(case, model, feeds)
    with torch.no_grad():
        got = to_torch(model)(torch.from_numpy(feeds["in0"]))
    _compare(got.numpy(), ref, f"{op} {attrs}")


def test_constant_operands_become_quant_layers() -> None:
    cases = {c.id: c for c in CASES}
    for case_id, weight_input, has_bias in [
        ("matmul_weight_left", 0, False),
        ("matmul_weight_right_batched", 1, False),
        ("conv2d_runtime_bias", 1, False),  # the bias stays a run-time input
        ("conv1d", 1, True),
        ("gemm_both_trans_full_c", 1, False),
        ("convT_stride_pads_outpad", 1, True),
    ]:
        case = cases[case_id]
        (layer,) = to_torch(case.model(case.const)).layers.values()
        assert layer.info.weight_input == weight_input and (layer.bias is not None) == has_bias, case_id
        assert isinstance(layer.weight, torch.nn.Parameter)


def test_names_that_shadow_attributes_are_safe() -> None:
    # Tensors and nodes named like nn.Module / ModuleDict methods, with '/' and '.' in names.
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 2] y) {
            eval = Constant <value = float[3, 2] {1, 2, 3, 4, 5, 6}> ()
            training = Constant <value = float[2] {0.5, -0.5}> ()
            h = MatMul (x, eval)
            "a/b.c" = Add (h, training)
            y = Relu ("a/b.c")
        }
    """)
    for node, name in zip(model.graph.node[2:], ["keys", "/a/b.c", "forward"]):
        node.name = name
    module = to_torch(model)
    assert list(module.layers) == ["keys"]
    x = torch.randn(4, 3)
    w = torch.tensor([[1.0, 2], [3, 4], [5, 6]])
    expected = torch.relu(x @ w + torch.tensor([0.5, -0.5]))
    assert torch.allclose(module(x), expected)
    module.set_act_quant("a/b.c", ActFakeQuant(8, 0.1, 128))
    h = torch.round((x @ w + torch.tensor([0.5, -0.5])) / 0.1).clamp(-128, 127) * 0.1
    assert torch.allclose(module(x), torch.relu(h), atol=1e-6)
    assert module.training is True and callable(module.eval)


def test_torch_exported_unet_with_dynamic_spatial_shapes() -> None:
    # Shape -> Resize/Pad/ConvTranspose chains as torch's exporter writes them, run at two image sizes.
    import io
    import warnings

    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.c3 = nn.Conv2d(16, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.gn = nn.GroupNorm(2, 16)

        def forward(self, x):
            a = F.hardswish(self.bn(self.c1(x)))
            b = F.leaky_relu(self.gn(self.c2(a)), 0.1)
            u = self.up(b)
            v = F.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False)
            y = self.c3(torch.cat([u, a], 1)) + v[:, :4] + F.interpolate(b, size=u.shape[2:])[:, 4:8]
            y = F.pad(y, (1, 2, 0, 1), mode="reflect")
            return F.avg_pool2d(y, 3, 2, ceil_mode=True), torch.sigmoid(y).amax(dim=(2, 3))

    torch.manual_seed(0)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(),
            (torch.randn(1, 3, 16, 20),),
            f,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
        )
    model = onnx.load_from_string(f.getvalue())
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    module = to_torch(model)
    assert len(module.layers) == 4
    for shape in [(2, 3, 16, 20), (1, 3, 24, 12)]:
        x = f32(*shape)
        ref = sess.run(None, {"x": x})
        with torch.no_grad():
            got = module(torch.from_numpy(x))
        for g, r in zip(got, ref):
            _compare(g.numpy(), r, f"unet {shape}")
