"""Per-layer formats (policy version 2): emission follows each layer's format exactly, ORT runs it the
intended way, `report` reads the format back, `format_bytes` matches the file, and the 8-bit reduce-range
rule and block-wise scales are exact against numerics."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from mqtool.analysis import analyze
from mqtool.emit import quantize_model
from mqtool.errors import InputError
from mqtool.numerics import dequantize_blockwise, quantize_weight_blockwise
from mqtool.policy import Format, LayerBits, Policy
from mqtool.report import report
from passes.qdq_plan import allowed_formats, format_bytes

from .test_passes_qdq import build, cnn, mlp2d, ort_ops, w

DATA_CNN = {"x": np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype(np.float32)}


def net():
    """Conv -> Conv -> Gemm(transB) -> MatMul: every format has a layer to land on."""
    return build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 12] y) {
          a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
          r = Relu(a)
          b = Conv <pads = [1, 1, 1, 1]> (r, W2, B2)
          p = GlobalAveragePool(b)
          f = Flatten(p)
          h = Gemm <transB = 1> (f, W3, B3)
          y = MatMul(h, W4)
        }""",
        {"W1": w(8, 3, 3, 3), "B1": w(8), "W2": w(16, 8, 3, 3), "B2": w(16), "W3": w(64, 16), "B3": w(64),
         "W4": w(64, 12)},
    )  # fmt: skip


def weight_dq(m: onnx.ModelProto, layer: str) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    nodes = {n.name: n for n in m.graph.node}
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    node = nodes[layer]
    dq = next(prod[i] for i in node.input if i in prod and prod[i].op_type == "DequantizeLinear"
              and prod[i].input[0] in inits and len(inits[prod[i].input[0]].dims) >= 2)  # fmt: skip
    return dq, inits[dq.input[0]]


def test_allowed_formats_by_op():
    info = analyze(net())
    conv, _, gemm, matmul = info.layers
    assert allowed_formats(conv) == (Format.FLOAT, Format.INT8, Format.PACKED)
    both = (Format.FLOAT, Format.INT8, Format.PACKED, Format.NBITS, Format.DYNAMIC)
    assert allowed_formats(gemm) == both and allowed_formats(matmul) == both


def test_emission_follows_each_layers_format_and_report_reads_it_back(tmp_path):
    m = net()
    info = analyze(m)
    c1, c2, gemm, mm = info.names
    pol = Policy(
        {
            c1: LayerBits(8, 8, Format.INT8),  # integer kernels; 8 bits stored as 7 (reduce range)
            c2: LayerBits(4, 8, Format.PACKED),  # INT4 (with a quantized input, so that c1's output is)
            gemm: LayerBits(4, 32, Format.NBITS, 16),  # MatMul + Add, block-wise INT4 -> MatMulNBits
            mm: LayerBits(2, 32, Format.NBITS),  # INT2, per column -> MatMulNBits
        }
    )
    q = quantize_model(m, pol, data=DATA_CNN)
    onnx.checker.check_model(q, full_check=True)
    T = onnx.TensorProto
    dq, q1 = weight_dq(q, c1)
    v = numpy_helper.to_array(q1)
    assert q1.data_type == T.INT8 and v.min() >= -64 and v.max() <= 63 and v.min() == -64
    dq, q2 = weight_dq(q, c2)
    assert q2.data_type == T.INT4
    dq, q3 = weight_dq(q, gemm)
    assert (
        q3.data_type == T.INT4
        and dq.attribute
        and {a.name: a.i for a in dq.attribute}
        == {
            "axis": 0,
            "block_size": 16,
        }
    )
    assert [n.op_type for n in q.graph.node if n.name == gemm] == ["MatMul"]
    assert weight_dq(q, mm)[1].data_type == T.INT2
    ops = ort_ops(q)
    assert ops.count("QLinearConv") == 1 and ops.count("MatMulNBits") == 2
    # The reference run equals ORT without fusion (same float math).
    x = DATA_CNN["x"][:4]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        ReferenceEvaluator(q).run(None, {"x": x})[0], unfused.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4
    )
    rep = report(q)
    assert {r.name: r.format for r in rep.layers} == {c1: "int8", c2: "packed", gemm: "nbits", mm: "nbits"}
    assert {r.name: r.weight_bits for r in rep.layers} == {c1: 8, c2: 4, gemm: 4, mm: 2}
    assert "format" in rep.table()
    recorded = json.loads(next(p.value for p in q.metadata_props if p.key == "mqtool.policy"))
    assert recorded["version"] == 3 and recorded["layers"][gemm]["block_size"] == 16


def test_storage_fills_formats_the_policy_lacks():
    m = net()
    info = analyze(m)
    c1, c2, gemm, mm = info.names
    pol = Policy(
        {
            c1: LayerBits(4, 8),
            c2: LayerBits(4, 8, Format.PACKED),
            gemm: LayerBits(4, 32),
            mm: LayerBits(8, 32),
        }
    )
    rep = {r.name: r.format for r in report(quantize_model(m, pol, data=DATA_CNN, storage="auto")).layers}
    assert rep == {c1: "int8", c2: "packed", gemm: "nbits", mm: "nbits"}
    rep = {r.name: r.format for r in report(quantize_model(m, pol, data=DATA_CNN, storage="int8")).layers}
    assert rep == {c1: "int8", c2: "packed", gemm: "int8", mm: "int8"}


def test_a_format_the_layer_cannot_take_is_an_input_error():
    m = cnn()
    info = analyze(m)
    pol = Policy({info.names[0]: LayerBits(4, 32, Format.NBITS)})  # a Conv has no MatMulNBits form
    with pytest.raises(InputError, match="format 'nbits' is not available"):
        quantize_model(m, pol)


@pytest.mark.parametrize("fmt", ["int8", "packed", "nbits", "dynamic"])
def test_format_bytes_matches_the_file(fmt):
    """The difference in file size between two emissions that differ in one layer's (bits, format) is the
    difference of `format_bytes` (what a size budget sums), within the protobuf framing of a few tensors."""
    m = mlp2d()
    info = analyze(m)
    a, b = info.layers
    act = 32  # activation Q/DQ pairs are not the layer's weight bytes (qdq_plan.ACT_QDQ_BYTES each)
    fixed = {a.name: LayerBits(8, 32, Format.INT8)}
    data = {"x": np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)}
    sizes, estimates = [], []
    for bits, f in ((2, fmt), (6, fmt), (32, "float")):
        pol = Policy({**fixed, b.name: LayerBits(bits, act if f != "float" else 32, Format(f))})
        if f == "float":
            pol = Policy({**fixed, b.name: LayerBits(32, 32, Format.FLOAT)})
        sizes.append(quantize_model(m, pol, data=data).ByteSize())
        estimates.append(format_bytes(b, bits, f))
    for i in (0, 1):
        got, want = sizes[2] - sizes[i], estimates[2] - estimates[i]
        assert abs(got - want) <= 48, (fmt, i, got, want)


def test_format_bytes_of_a_large_layer_within_one_percent():
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 256] x) => (float[N, 300] y) { y = MatMul(x, W) }""",
        {"W": w(256, 300)},
    )
    (layer,) = analyze(m).layers
    data = {"x": np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)}
    empty = onnx.ModelProto()
    empty.CopyFrom(m)
    del empty.graph.initializer[:]
    base = empty.ByteSize()
    for bits, fmt, block in ((4, "nbits", 32), (3, "packed", 0), (5, "int8", 0), (6, "dynamic", 0)):
        act = 8 if fmt == "int8" else 32
        pol = Policy({layer.name: LayerBits(bits, act, Format(fmt), block)})
        q = quantize_model(m, pol, data=data)
        inits = sum(i.ByteSize() for i in q.graph.initializer)
        est = format_bytes(layer, bits, fmt, block)
        assert abs(inits - est) <= 0.01 * est + 64, (fmt, inits, est, base)


def test_blockwise_numerics_round_trip():
    rng = np.random.default_rng(3)
    wt = rng.normal(size=(70, 6)).astype(np.float32)
    q, s = quantize_weight_blockwise(wt, 4, 0, 32)
    assert s.shape == (3, 6) and q.min() >= -8 and q.max() <= 7
    back = dequantize_blockwise(q, s, 0, 0, 32)
    # Each block's error is at most half a step of its own scale (no clipping beyond the MSE choice).
    steps = np.repeat(s, 32, axis=0)[:70]
    assert np.all(np.abs(back - wt) <= 0.5 * steps * 2 + 1e-6)
    # The blocked DequantizeLinear of onnx's reference gives the same values.
    from onnx import helper

    node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0, block_size=32)
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("q", onnx.TensorProto.INT8, [70, 6]),
         helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [3, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [70, 6])],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    ref = ReferenceEvaluator(model).run(None, {"q": q.astype(np.int8), "s": s})[0]
    np.testing.assert_array_equal(ref, back)


def test_an_8_bit_scale_override_keeps_its_range_at_7_stored_bits():
    """QuantParams scales are for the policy's bits unless `scale_bits` says otherwise; an 8-bit layer on
    integer kernels is stored at 7 bits with that scale doubled (same clipping range)."""
    from mqtool.numerics import quantize
    from passes.qparams import LayerParams, QuantParams

    m = net()
    info = analyze(m)
    c1 = info.layers[0]
    wt = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == c1.weight))
    s8 = (np.abs(wt).reshape(c1.channels, -1).max(1) / 128).astype(np.float32)
    pol = Policy({c1.name: LayerBits(8, 8, Format.INT8), info.names[1]: LayerBits(8, 8, Format.INT8)})
    for made_for, factor in ((None, 2), (7, 1)):
        qp = QuantParams(layers={c1.name: LayerParams(scale=s8, scale_bits=made_for)})
        q = quantize_model(m, pol, data=DATA_CNN, qparams=qp)
        dq, q1 = weight_dq(q, c1.name)
        inits = {i.name: i for i in q.graph.initializer}
        np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[1]]), s8 * factor)
        np.testing.assert_array_equal(
            numpy_helper.to_array(q1), quantize(wt, s8 * factor, 0, -64, 63, axis=0)
        )


def test_layers_inside_a_subgraph_are_quantized_and_recorded():
    from onnx import TensorProto, helper

    def branch(name: str, scale: float) -> onnx.GraphProto:
        wt = numpy_helper.from_array((w(6, 4) * scale).astype(np.float32), f"{name}_W")
        node = helper.make_node("MatMul", ["h", f"{name}_W"], [f"{name}_y"], f"{name}_mm")
        return helper.make_graph(
            [node], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [wt]
        )

    top_w = numpy_helper.from_array(w(3, 6), "W0")
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h"], "top"),
        helper.make_node(
            "If", ["c"], ["y"], "cond", then_branch=branch("a", 1.0), else_branch=branch("b", 2.0)
        ),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [top_w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    info = analyze(m)
    inner = [layer.name for layer in info.layers if layer.subgraph]
    assert len(inner) == 2
    q = quantize_model(m, Policy.uniform(info.names, 4, 32))
    onnx.checker.check_model(q, full_check=True)
    recorded = json.loads(next(p.value for p in q.metadata_props if p.key == "mqtool.policy"))["layers"]
    # passes.subgraph_qdq quantizes the branch layers too (weight-only here: nbits MatMuls like the top one)
    assert recorded["top"]["weight_bits"] == 4 and all(recorded[n]["weight_bits"] == 4 for n in inner)
    assert {recorded[n]["format"] for n in inner} == {recorded["top"]["format"]} != {"float"}
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    out = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "c": np.array(True)}
    )
    assert out[0].shape == (2, 4)
