"""Layer discovery and MAC counting on tiny in-memory models, an opset-11 model and the onnx zoo."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, parser

from mqtool.analysis import analyze
from mqtool.errors import InputError
from mqtool.model import load_model

from .conftest import ZOO


def _model(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    m = parser.parse_model(text)
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(m)
    return m


def test_conv_kinds_and_macs():
    rng = np.random.default_rng(0)
    m = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8, 16, 16] x) => (float[N, 4, 8, 8] y) {
          a = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W1, B1)
          b = Conv <group = 8, kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (a, Wdw)
          y = Conv <group = 2, kernel_shape = [1, 1]> (b, Wg)
        }""",
        {
            "W1": rng.normal(size=(8, 8, 3, 3)).astype(np.float32),
            "B1": np.zeros(8, np.float32),
            "Wdw": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
            "Wg": rng.normal(size=(4, 4, 1, 1)).astype(np.float32),
        },
    )
    info = analyze(m)
    assert [layer.op_type for layer in info.layers] == ["Conv"] * 3
    full, dw, grouped = info.layers
    assert (
        full.params == 576
        and full.macs == 8 * 16 * 16 * 8 * 9
        and full.bias == "B1"
        and full.bias_params == 8
    )
    assert dw.groups == 8 and dw.params == 72 and dw.macs == 8 * 8 * 8 * 9
    assert grouped.groups == 2 and grouped.macs == 4 * 8 * 8 * 4
    assert info.totals.macs == full.macs + dw.macs + grouped.macs
    assert info.totals.params == 576 + 72 + 16 and info.totals.fp32_weight_bytes == 4 * 664
    json.dumps(info.to_json())  # plain data


def test_conv1d_conv3d_convtranspose():
    rng = np.random.default_rng(1)
    m = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 10] x, float[1, 2, 4, 4, 4] v, float[1, 3, 5, 5] t) => (float[1, 4, 8] a, float[1, 5, 2, 2, 2] b, float[1, 6, 11, 11] c) {
          a = Conv <kernel_shape = [3]> (x, W1)
          b = Conv <kernel_shape = [3, 3, 3]> (v, W3)
          c = ConvTranspose <strides = [2, 2], kernel_shape = [3, 3]> (t, WT)
        }""",
        {
            "W1": rng.normal(size=(4, 2, 3)).astype(np.float32),
            "W3": rng.normal(size=(5, 2, 3, 3, 3)).astype(np.float32),
            "WT": rng.normal(size=(3, 6, 3, 3)).astype(np.float32),
        },
    )
    c1, c3, ct = analyze(m).layers
    assert c1.macs == 4 * 8 * 2 * 3
    assert c3.macs == 5 * 8 * 2 * 27
    # ConvTranspose: every input pixel is multiplied by Cout * k * k weights per input channel.
    assert ct.macs == 3 * 25 * 6 * 9 and ct.channel_axis == 1 and ct.channels == 6


def test_gemm_matmul_unnamed_constant_node_and_two_activation_matmul():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "Wg", "Bg"], ["h"], transB=1),
        helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["h", "Wc"], ["m"]),
        helper.make_node("MatMul", ["m", "mt"], ["att"]),  # two activations: not quantizable
        helper.make_node("Transpose", ["m"], ["mt"], perm=[1, 0]),
        helper.make_node("MatMul", ["Wl", "att"], ["y"]),  # constant on the left
    ]
    nodes = [nodes[0], nodes[1], nodes[2], nodes[4], nodes[3], nodes[5]]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [
            numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "Wg"),
            numpy_helper.from_array(np.zeros(16, np.float32), "Bg"),
            numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "Wl"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    info = analyze(m)
    assert [(layer.name, layer.op_type) for layer in info.layers] == [
        ("Gemm_0", "Gemm"),
        ("MatMul_2", "MatMul"),
        ("MatMul_5", "MatMul"),
    ]
    gemm, mm, left = info.layers
    assert gemm.channel_axis == 0 and gemm.channels == 16 and gemm.macs == 16 * 32
    assert mm.weight == "Wc" and mm.channel_axis == 1 and mm.macs == 8 * 16 and mm.input == "h"
    assert left.weight_input == 0 and left.channel_axis == 0 and left.input == "att"
    assert m.graph.node[0].name == ""  # analysis did not write names into the model


def test_opset11_model():
    rng = np.random.default_rng(3)
    m = _model(
        """<ir_version: 6, opset_import: ["" : 11]>
        g (float[1, 3, 8, 8] x) => (float[1, 10] y) {
          a = Conv <kernel_shape = [3, 3]> (x, W)
          f = Flatten (a)
          y = Gemm (f, Wf)
        }""",
        {
            "W": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "Wf": rng.normal(size=(144, 10)).astype(np.float32),
        },
    )
    info = analyze(m)
    assert info.opset == 11 and [layer.macs for layer in info.layers] == [4 * 36 * 27, 1440]
    assert info.layers[1].channel_axis == 1


def test_dynamic_batch_macs_are_per_sample():
    m = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
          y = Conv <kernel_shape = [1, 1]> (x, W)
        }""",
        {"W": np.ones((4, 3, 1, 1), np.float32)},
    )
    assert analyze(m).layers[0].macs == 4 * 64 * 3


def test_unknown_spatial_dims_give_unknown_macs():
    m = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, H, W] x) => (float[N, 4, H, W] y) {
          y = Conv <kernel_shape = [1, 1]> (x, Wt)
        }""",
        {"Wt": np.ones((4, 3, 1, 1), np.float32)},
    )
    info = analyze(m)
    assert info.layers[0].macs is None and info.totals.macs is None


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.rsplit("/", 1)[-1])
def test_zoo_models_every_conv_and_gemm_found(path):
    model = load_model(path)
    info = analyze(model)
    expected = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(info.layers) == len(expected)
    assert all(layer.macs and layer.macs > 0 for layer in info.layers)
    assert len({layer.name for layer in info.layers}) == len(info.layers)


def test_resnet50_macs_by_hand():
    path = next(p for p in ZOO if p.endswith("light_resnet50.onnx"))
    info = analyze(load_model(path))
    first = info.layers[0]
    # conv1: 64 filters 7x7x3, stride 2 on 224x224 -> 112x112 outputs.
    assert first.weight_shape == [64, 3, 7, 7] and first.macs == 112 * 112 * 64 * 7 * 7 * 3
    fc = info.layers[-1]
    assert fc.op_type == "Gemm" and fc.params == 2048 * 1000 and fc.macs == 2048 * 1000
    # The published figure for ResNet-50 is ~4.1 GMACs and 25.5M parameters (conv+fc weights).
    assert math.isclose(info.totals.macs, 4.09e9, rel_tol=0.01)
    assert math.isclose(info.totals.params, 25.5e6, rel_tol=0.01)


def test_already_quantized_model_is_refused_unless_allowed():
    m = _model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 3] y) {
          w = DequantizeLinear (Wq, s)
          y = MatMul (x, w)
        }""",
        {"Wq": np.ones((4, 3), np.int8), "s": np.array(0.1, np.float32)},
    )
    with pytest.raises(
        InputError, match=r"already quantized \(node 'DequantizeLinear_0' is DequantizeLinear\)"
    ):
        analyze(m)
    info = analyze(m, allow_quantized=True)
    assert info.quantized_nodes == [("DequantizeLinear_0", "DequantizeLinear")]
    assert json.loads(json.dumps(info.to_json()))["already_quantized"] == [
        ["DequantizeLinear_0", "DequantizeLinear"]
    ]
