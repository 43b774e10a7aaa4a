"""The QDQ plan (which tensors, how many bits) and the passes that apply it: insert_qdq, gemm_to_matmul,
pack_weights, dedupe_initializers, compact_names. Structure, and numbers against mqtool.numerics."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper, parser
from onnx.reference import ReferenceEvaluator

from mqtool.analysis import analyze
from mqtool.numerics import activation_qparams, fake_quantize, int_range, quantize, quantize_weight
from mqtool.policy import Format, LayerBits, Policy
from passes.base import run_passes
from passes.compact_names import compact_names
from passes.dedupe_initializers import dedupe_initializers
from passes.gemm_to_matmul import gemm_to_matmul
from passes.insert_qdq import insert_qdq
from passes.pack_weights import pack_weights
from passes.pipeline import prepare
from passes.qdq_plan import (
    ActQuant,
    Container,
    Storage,
    plan_activations,
    plan_quantizers,
    plan_storage,
    quantize_bias,
)
from passes.qparams import LayerParams, QuantParams
from passes.upgrade_opset import upgrade_opset

RNG = np.random.default_rng(1)


def w(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def build(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    m = parser.parse_model(text)
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(m)
    return prepare(m)


def cnn() -> onnx.ModelProto:
    """Conv+Relu, depthwise Conv+Clip, 1x1 Conv with a residual Add, pool, Gemm (names: Conv_0, Conv_2,
    Conv_4, Gemm_9)."""
    return build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 4] y) {
          a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
          r = Relu(a)
          d = Conv <group = 8, pads = [1, 1, 1, 1]> (r, Wd, Bd)
          c = Clip(d, lo, hi)
          p = Conv(c, Wp, Bp)
          s = Add(p, r)
          s2 = Relu(s)
          gp = GlobalAveragePool(s2)
          f = Flatten(gp)
          y = Gemm <transB = 1> (f, Wf, Bf)
        }""",
        {
            "W1": w(8, 3, 3, 3), "B1": w(8), "Wd": w(8, 1, 3, 3), "Bd": w(8), "Wp": w(8, 8, 1, 1), "Bp": w(8),
            "Wf": w(4, 8), "Bf": w(4), "lo": np.float32(0), "hi": np.float32(6),
        },
    )  # fmt: skip


def mlp3d() -> onnx.ModelProto:
    """A transformer MLP block on [N, T, 16]: LayerNorm, MatMul + bias, Relu, MatMul + bias, residual."""
    return build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 5, 16] x) => (float[N, 5, 16] y) {
          n = LayerNormalization <axis = -1> (x, lg, lb)
          m1 = MatMul(n, W1)
          a1 = Add(m1, b1)
          h = Relu(a1)
          m2 = MatMul(h, W2)
          a2 = Add(m2, b2)
          y = Add(a2, x)
        }""",
        {
            "lg": 1 + w(16, scale=0.1),
            "lb": w(16, scale=0.1),
            "W1": w(16, 32),
            "b1": w(32),
            "W2": w(32, 16),
            "b2": w(16),
        },
    )


def mlp2d() -> onnx.ModelProto:
    return build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 8] y) {
          m1 = MatMul(x, W1)
          a1 = Add(m1, b1)
          h = Relu(a1)
          m2 = MatMul(h, W2)
          y = Add(m2, b2)
        }""",
        {"W1": w(16, 32), "b1": w(32), "W2": w(32, 8), "b2": w(8)},
    )


def ort_ops(m: onnx.ModelProto) -> list[str]:
    """Op types ORT runs at ORT_ENABLE_ALL (from its optimized graph)."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(tmp, "o.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def acts(plan: dict[str, int], lo: float = -4.0, hi: float = 4.0) -> dict[str, ActQuant]:
    out = {}
    for t, bits in plan.items():
        s, z = activation_qparams(lo, hi, bits)
        out[t] = ActQuant(bits, float(s), int(z))
    return out


def emit(model, policy, activations, qparams=None, storage="int8"):
    """The emission passes without calibration (fixed ranges), as mqtool.emit runs them."""
    from functools import partial

    from mqtool.emit import _emit  # noqa: F401  (the real pipeline is exercised in test_emit.py)

    info = analyze(model)
    full = plan_quantizers(model, info, policy)
    carried = {t: src for t, src in full.carried.items() if src in activations}
    layout = plan_storage(model, info, policy, {**activations, **carried}, storage)
    return run_passes(
        model,
        [
            partial(
                upgrade_opset, opset=25 if any(v.container is Container.INT2 for v in layout.values()) else 21
            ),
            partial(
                insert_qdq,
                policy=policy,
                activations=activations,
                qparams=qparams,
                info=info,
                carried=carried,
                constants=full.constants,
                layout=layout,
            ),
            partial(gemm_to_matmul, layers=[k for k, v in layout.items() if v.as_matmul]),
            partial(pack_weights, containers={k: v.container for k, v in layout.items()}),
        ],
    ).model


# ---- the plan -------------------------------------------------------------------------------------------


def test_plan_cnn_inputs_outputs_after_activations():
    m = cnn()
    info = analyze(m)
    assert info.names == ["Conv_0", "Conv_2", "Conv_4", "Gemm_9"]
    full = plan_quantizers(m, info, Policy.uniform(info.names, 4, 8))
    # Inputs of the four layers; Conv_0's and Conv_2's outputs are planned after their Relu / Clip (tensors
    # r and c, already inputs); Conv_4's output p feeds an Add: Q/DQ on p itself; Gemm needs none. Then the
    # integer region: Add(p, r) has both inputs quantized -> its output after the Relu (s2) -> the pool's
    # output (gp); Flatten only reshapes gp, so the Gemm input f repeats gp's quantizer.
    assert full.bits == {"x": 8, "r": 8, "c": 8, "p": 8, "s2": 8, "gp": 8}
    assert full.carried == {"f": "gp"} and full.constants == []
    assert plan_activations(m, info, Policy.uniform(info.names, 4, 8)) == full.bits


def test_plan_shared_tensor_widest_reader_and_float_veto():
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 6, 6] x) => (float[N, 4, 6, 6] y, float[N, 4, 6, 6] z, float[N, 4, 6, 6] v) {
          y = Conv(x, A)
          z = Conv(x, B)
          r = Relu(x)
          v = Conv(r, C)
        }""",
        {"A": w(4, 4, 1, 1), "B": w(4, 4, 1, 1), "C": w(4, 4, 1, 1)},
    )
    info = analyze(m)
    a, b, c = info.names
    mixed = Policy({a: LayerBits(4, 4), b: LayerBits(3, 6), c: LayerBits(4, 8)})
    plan = plan_activations(m, info, mixed)
    assert plan["x"] == 6 and plan["r"] == 8  # x: the widest of 4 and 6
    assert plan["y"] == plan["z"] == plan["v"] == 8  # Conv outputs (graph outputs) for fusion
    weight_only = Policy({a: LayerBits(4, 4), b: LayerBits(4, 32)})
    plan = plan_activations(m, info, weight_only)
    assert "x" not in plan and "y" not in plan  # b reads x in float: no layer gets a coarser input
    float_layer = Policy({a: LayerBits(4, 8)})  # b, c missing: float
    assert plan_activations(m, info, float_layer) == {}


def test_plan_matmul_bias_add_depends_on_rank():
    m2 = mlp2d()
    info = analyze(m2)
    assert plan_activations(m2, info, Policy.uniform(info.names, 8)) == {"x": 8, "h": 8, "y": 8}
    m3 = mlp3d()
    info = analyze(m3)
    assert plan_activations(m3, info, Policy.uniform(info.names, 8)) == {"n": 8, "h": 8}


def test_infer_shapes_without_the_weights_equals_inference_on_the_full_model():
    """infer_shapes hands large float weights to onnx as typed inputs; every shape must be what inference on
    the whole model gives: weight dims feeding MatMul/Conv shapes, a Reshape target read by data
    propagation, and a weight that is also a graph input (kept as an initializer)."""
    from mqtool.model import infer_shapes

    m = parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 16, 16] x, float[40, 3, 3, 3] Wc) => (float[N, 2, 20, 256] y, float[N, 40, 14, 14] z) {
          h = Conv(x, Wc)
          a = Reshape(h, shp)
          b = MatMul(a, Wm)
          y = Add(b, Bm)
          z = Relu(h)
        }"""
    )
    weights = {"Wc": w(40, 3, 3, 3), "shp": np.array([0, 2, 20, 196], np.int64), "Wm": w(196, 256)}
    weights["Bm"] = w(256)
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    full = onnx.shape_inference.infer_shapes(m, data_prop=True).graph
    want = {}
    for vi in list(full.input) + list(full.value_info) + list(full.output):
        want[vi.name] = [
            d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim
        ]
    want.update({i.name: list(i.dims) for i in m.graph.initializer})
    before = m.SerializeToString()
    got = infer_shapes(m)
    assert m.SerializeToString() == before
    assert got == want
    assert got["b"] == [None, 2, 20, 256] and got["h"] == [None, 40, 14, 14] and got["Wm"] == [196, 256]


def test_plan_storage_modes():
    m = mlp3d()
    info = analyze(m)
    a, b = info.names
    pol = Policy({a: LayerBits(2, 32), b: LayerBits(8, 8)})
    plan = plan_activations(m, info, pol)
    lay = {s: plan_storage(m, info, pol, plan, s) for s in Storage}
    cont = {s: {k: v.container for k, v in lay[s].items()} for s in Storage}
    assert cont[Storage.INT8] == {a: Container.INT8, b: Container.INT8}
    assert cont[Storage.PACKED] == {a: Container.INT2, b: Container.INT8}
    assert cont[Storage.AUTO] == {a: Container.INT4, b: Container.INT8}  # MatMulNBits: INT4 beats INT2/INT8
    # b runs on integer kernels (quantized input): its 8-bit weight is stored at 7 bits (reduce range)
    assert {s: lay[s][b].bits for s in Storage} == dict.fromkeys(Storage, 7)
    assert lay[Storage.AUTO][a].format is Format.NBITS and lay[Storage.AUTO][b].format is Format.INT8
    assert lay[Storage.PACKED][a].format is Format.PACKED and lay[Storage.AUTO][a].bits == 2


def yolo_block() -> onnx.ModelProto:
    """SiLU (Sigmoid + Mul), MaxPool, hard-swish as Add(+3) / Clip(0, 6) / Mul / Div, hard-sigmoid gate,
    nearest Resize and Concat: the zoo's detectors and PP-LCNet between their convs."""
    return build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 8, 8, 8] y) {
          a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
          s = Sigmoid(a)
          m = Mul(a, s)
          p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (m)
          b = Conv <pads = [1, 1, 1, 1]> (p, W2, B2)
          t = Add(b, three)
          c = Clip(t, lo, hi)
          h = Mul(b, c)
          d = Div(h, six)
          e = Conv(d, W3, B3)
          g1 = HardSigmoid(e)
          f = Mul(e, g1)
          u = Resize(f, , up)
          k = Concat <axis = 1> (u, m)
          y = Conv(k, W4, B4)
        }""",
        {
            "W1": w(4, 3, 3, 3), "B1": w(4), "W2": w(4, 4, 3, 3), "B2": w(4), "W3": w(4, 4, 1, 1), "B3": w(4),
            "W4": w(8, 8, 1, 1), "B4": w(8), "three": np.float32(3.0), "six": np.float32(6.0),
            "lo": np.float32(0), "hi": np.float32(6), "up": np.array([1, 1, 2, 2], np.float32),
        },
    )  # fmt: skip


def test_integer_regions_between_layers_fuse_in_ort_and_match_the_reference():
    m = yolo_block()
    info = analyze(m)
    pol = Policy.uniform(info.names, 4, 8)
    full = plan_quantizers(m, info, pol)
    # Layer inputs x, d, k and Conv outputs a, b, e, y; then the regions: s = Sigmoid(a), m = Mul(a, s),
    # c = Clip(Add(b, 3)) (the Add's output after its Clip), h = Mul(b, c), the hard-sigmoid g1 quantized
    # so that f = Mul(e, g1) runs on integers (rule 4c), k = Concat(u, m).
    assert set(full.bits) == {"x", "d", "k", "a", "b", "e", "y", "s", "m", "c", "h", "g1", "f"}
    # MaxPool and nearest Resize only select values: p and u repeat the quantizers of m and f.
    assert full.carried == {"p": "m", "u": "f"}
    # A reader asking for other bits keeps its own quantizer: p at 6 bits is planned, not carried.
    mixed = Policy({**pol.layers, info.names[1]: LayerBits(4, 6)})
    assert (
        plan_quantizers(m, info, mixed).bits["p"] == 6 and "p" not in plan_quantizers(m, info, mixed).carried
    )
    node_names = {n.name: n for n in m.graph.node}
    # The 3 and the 6 of the hard-swish: uint8 constants; the Div by 6 is emitted as a Mul by 1/6.
    assert [(node_names[n].op_type, k) for n, k in full.constants] == [("Add", 1), ("Div", 1)]
    x = w(2, 3, 8, 8, scale=1.0)
    ranges = calibrate_ranges(m, full.bits, x)
    a = {}
    for t, b in full.bits.items():
        scale, zp = activation_qparams(*ranges[t], b)
        a[t] = ActQuant(b, float(scale), int(zp))
    q = emit(m, pol, a)
    onnx.checker.check_model(q, full_check=True)
    ops = ort_ops(q)
    assert ops.count("QLinearConv") == 4
    for op in ("QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearConcat"):
        assert op in ops, op
    assert ops.count("QLinearMul") == 4 and "Div" not in ops
    # The repeated quantizer and the uint8 constant change no value: the reference run of the emitted
    # model equals the simulation (every planned tensor fake-quantized, nothing else).
    want = simulate(m, full.bits, a, pol, x)
    got = ReferenceEvaluator(q).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def calibrate_ranges(m, plan, x):
    from calibration.calibrate import calibrate

    return calibrate(m, plan, {"x": x})


def simulate(m, plan, a, pol, x):
    """The float model with every planned tensor fake-quantized and the weights quantized as emitted."""
    from onnx import helper

    sim = onnx.ModelProto()
    sim.CopyFrom(m)
    g = sim.graph
    inits = {i.name: i for i in g.initializer}
    info = analyze(m)
    for layer in info.layers:
        wt = numpy_helper.to_array(inits[layer.weight])
        qv, sc = quantize_weight(wt, pol.get(layer.name).weight_bits, layer.channel_axis)
        shape = [-1 if i == layer.channel_axis else 1 for i in range(wt.ndim)]
        inits[layer.weight].CopyFrom(
            numpy_helper.from_array((qv * sc.reshape(shape)).astype(np.float32), layer.weight)
        )
    # Evaluate node by node, replacing each planned tensor by its fake-quantized value.
    values = {"x": x}
    values.update({k: numpy_helper.to_array(v) for k, v in inits.items()})
    if "x" in plan:
        values["x"] = fake_quantize(x, a["x"].scale, a["x"].zero_point, *int_range(a["x"].bits, signed=False))
    for node in g.node:
        one = helper.make_model(
            helper.make_graph(
                [node],
                "n",
                [helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in node.input if i],
                [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output],
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        )
        res = ReferenceEvaluator(one).run(None, {i: values[i] for i in node.input if i})
        for o, v in zip(node.output, res):
            if o in plan:
                v = fake_quantize(v, a[o].scale, a[o].zero_point, *int_range(a[o].bits, signed=False))
            values[o] = v
    return values["y"]


# ---- insert_qdq ------------------------------------------------------------------------------------------


def test_insert_qdq_gemm_matches_numpy_exactly():
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 5] y) { y = Gemm <transB = 1> (x, W, B) }""",
        {"W": w(5, 8), "B": w(5)},
    )
    info = analyze(m)
    (layer,) = info.names
    pol = Policy({layer: LayerBits(3, 4)})
    plan = plan_activations(m, info, pol)
    a = acts(plan, -1.0, 2.0)
    q = emit(m, pol, a)
    onnx.checker.check_model(q, full_check=True)
    x = w(6, 8, scale=1.5)  # some values beyond the calibrated range: k-bit saturation matters
    s, z = a["x"].scale, a["x"].zero_point
    xq = fake_quantize(x, s, z, *int_range(4, signed=False))
    wq, ws = quantize_weight(numpy_helper.to_array(m.graph.initializer[0]), 3, axis=0)
    bq, bs = quantize_bias(numpy_helper.to_array(m.graph.initializer[1]), s, ws)
    want = xq @ (wq * ws[:, None]).T + bq * bs
    got = ReferenceEvaluator(q).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # int32 bias for a Gemm with a quantized input; 4-bit activations saturate at 15 through a Clip.
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("DequantizeLinear") == 3 and "Clip" in ops
    assert "QGemm" in ort_ops(q)


def test_quant_params_override_weights_scales_and_ranges():
    m = cnn()
    info = analyze(m)
    pol = Policy.uniform(info.names, 5, 8)
    layer = info.layers[2]
    w_new = w(*layer.weight_shape)
    scale = np.full(layer.channels, 0.07, np.float32)
    qp = QuantParams(layers={layer.name: LayerParams(weight=w_new, scale=scale)})
    q = emit(m, pol, acts(plan_activations(m, info, pol)), qp)
    node = next(n for n in q.graph.node if n.name == layer.name)
    dq = next(n for n in q.graph.node if n.output[0] == node.input[1])
    inits = {i.name: i for i in q.graph.initializer}
    got = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int32)
    np.testing.assert_array_equal(got, quantize(w_new, scale, 0, -16, 15, axis=0))
    np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[1]]), scale)


def test_every_reader_reads_the_dequantized_tensor_and_outputs_keep_names():
    m = cnn()
    info = analyze(m)
    pol = Policy.uniform(info.names, 8)
    a = acts(plan_activations(m, info, pol))
    # Post-Relu/Clip ranges start at 0 (zero point 0), as calibration finds: ORT then drops the Relu/Clip
    # in front of the QuantizeLinear and fuses the Conv.
    a.update(acts({"r": 8, "c": 8}, 0.0, 6.0))
    q = emit(m, pol, a)
    readers_of_r = [n for n in q.graph.node if "r" in n.input]
    assert [n.op_type for n in readers_of_r] == ["QuantizeLinear"]  # Conv_2 and the Add read its DQ
    assert [o.name for o in q.graph.output] == ["y"] and [i.name for i in q.graph.input] == ["x"]
    ops = ort_ops(q)
    assert ops.count("QLinearConv") == 3 and "QGemm" in ops


# ---- gemm_to_matmul, pack_weights -------------------------------------------------------------------


def test_gemm_to_matmul_same_numbers_and_matmulnbits():
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 32] y) { y = Gemm <transB = 1> (x, W, B) }""",
        {"W": w(32, 64), "B": w(32)},
    )
    info = analyze(m)
    pol = Policy({info.names[0]: LayerBits(4, 32)})
    plain = emit(m, pol, {}, storage="int8")
    rewritten = emit(m, pol, {}, storage="auto")
    assert [n.op_type for n in rewritten.graph.node] == ["DequantizeLinear", "MatMul", "Add"]
    assert rewritten.graph.node[1].name == info.names[0]
    x = w(3, 64)
    a = ReferenceEvaluator(plain).run(None, {"x": x})[0]
    b = ReferenceEvaluator(rewritten).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "MatMulNBits" in ort_ops(rewritten)


@pytest.mark.parametrize("bits, container", [(4, Container.INT4), (2, Container.INT2), (8, Container.UINT8)])
def test_pack_weights_round_trip(bits, container):
    m = mlp2d()
    info = analyze(m)
    pol = Policy.uniform(info.names, bits, 32)
    as_int8 = emit(m, pol, {}, storage="int8")
    packed = run_passes(
        upgrade_opset(as_int8, 25).model, [lambda mm: pack_weights(mm, dict.fromkeys(info.names, container))]
    ).model
    onnx.checker.check_model(packed, full_check=True)
    before = {i.name: numpy_helper.to_array(i) for i in as_int8.graph.initializer}
    types = {TensorProto.INT4: ml_dtypes.int4, TensorProto.INT2: ml_dtypes.int2, TensorProto.UINT8: np.uint8}
    for init in packed.graph.initializer:
        if init.name.endswith(".q") and init.name.startswith("w"):
            got = numpy_helper.to_array(init)
            assert got.dtype == types[init.data_type]
            offset = 128 if container is Container.UINT8 else 0
            np.testing.assert_array_equal(got.astype(np.int32) - offset, before[init.name].astype(np.int32))
    # The same model from a file: sub-byte raw data survives serialisation.
    again = onnx.load_from_string(packed.SerializeToString())
    x = w(4, 16)
    np.testing.assert_allclose(
        ReferenceEvaluator(again).run(None, {"x": x})[0],
        ReferenceEvaluator(as_int8).run(None, {"x": x})[0],
        rtol=1e-6,
    )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ort.InferenceSession(again.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_pack_weights_refuses_values_out_of_range():
    m = mlp2d()
    info = analyze(m)
    q = upgrade_opset(emit(m, Policy.uniform(info.names, 6, 32), {}), 21).model
    with pytest.raises(ValueError, match="outside the int4 range"):
        pack_weights(q, {info.names[0]: Container.INT4})


# ---- size passes ------------------------------------------------------------------------------------------


def test_dedupe_and_compact_names_keep_outputs_interface_and_layer_names():
    m = cnn()
    info = analyze(m)
    pol = Policy.uniform(info.names, 4)
    q = emit(m, pol, acts(plan_activations(m, info, pol)))
    x = w(2, 3, 8, 8)
    want = ReferenceEvaluator(q).run(None, {"x": x})[0]
    small = run_passes(q, [dedupe_initializers, lambda mm: compact_names(mm, keep=info.names)]).model
    onnx.checker.check_model(small, full_check=True)
    assert small.ByteSize() < q.ByteSize()
    assert [i.name for i in small.graph.input] == ["x"] and [o.name for o in small.graph.output] == ["y"]
    assert {n.name for n in small.graph.node} - {""} == set(info.names)
    assert len({i.name for i in small.graph.initializer}) == len(small.graph.initializer)
    np.testing.assert_array_equal(ReferenceEvaluator(small).run(None, {"x": x})[0], want)


def test_hardswish_is_prepared_as_its_definition_and_its_gate_is_quantized():
    """prepare writes HardSwish as x * HardSigmoid(x) (ONNX's definition: same values), so the plan can
    quantize the gate and ORT runs the product as QLinearMul, as its own quantizer does."""
    raw = parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
          a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
          h = HardSwish(a)
          y = Conv(h, W2, B2)
        }"""
    )
    raw.graph.initializer.extend(
        numpy_helper.from_array(v, k)
        for k, v in {"W1": w(4, 3, 3, 3), "B1": w(4), "W2": w(4, 4, 1, 1), "B2": w(4)}.items()
    )
    m = prepare(raw)
    assert "HardSwish" not in [n.op_type for n in m.graph.node]
    x = w(2, 3, 8, 8, scale=2.0)
    np.testing.assert_allclose(
        ReferenceEvaluator(m).run(None, {"x": x})[0],
        ReferenceEvaluator(raw).run(None, {"x": x})[0],
        rtol=1e-6,
        atol=1e-6,
    )
    info = analyze(m)
    pol = Policy.uniform(info.names, 8)
    full = plan_quantizers(m, info, pol)
    gate = next(n.output[0] for n in m.graph.node if n.op_type == "HardSigmoid")
    assert gate in full.bits and "h" in full.bits
    ops = ort_ops(emit(m, pol, acts(full.bits, 0.0, 4.0)))
    assert ops.count("QLinearMul") == 1 and ops.count("QLinearConv") == 2
