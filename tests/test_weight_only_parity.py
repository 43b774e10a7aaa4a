"""Simulation = emission for the weight-only layers: the backend lays an LSTM's W and R out as one weight
(one scale per row of each) and an embedding table in the blocks of its GatherBlockQuantized
(`mqtool.weight_layout`), so per-channel fake quantization of a `QuantLayer` weight - what MetaQuantNet,
finetuning and the PTQ anchors do - is exactly what emission stores. Checked against ONNX Runtime on the
emitted model, with PTQ scales and with finetuned weights and scales handed over as `QuantParams`."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mqtool.analysis import analyze
from mqtool.backend import WeightFakeQuant, to_torch
from mqtool.emit import quantize_model
from mqtool.numerics import weight_scale
from mqtool.policy import Format, LayerBits, Policy
from mqtool.weight_layout import emitted_weights, simulated_shape
from passes.pipeline import prepare
from passes.qparams import LayerParams, QuantParams

R = np.random.default_rng(8)
T, N, C, H = 5, 3, 6, 8
V, E = 40, 64


def lstm_model(direction: str = "forward") -> onnx.ModelProto:
    dirs = 2 if direction == "bidirectional" else 1
    inits = [
        numpy_helper.from_array((R.standard_normal((dirs, 4 * H, C)) * 0.4).astype(np.float32), "W"),
        numpy_helper.from_array((R.standard_normal((dirs, 4 * H, H)) * 0.3).astype(np.float32), "Rw"),
        numpy_helper.from_array((R.standard_normal((dirs, 8 * H)) * 0.1).astype(np.float32), "B"),
    ]
    node = helper.make_node("LSTM", ["x", "W", "Rw", "B"], ["y"], "lstm", hidden_size=H, direction=direction)
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, "n", C])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, dirs, "n", H])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def embedding_model() -> onnx.ModelProto:
    table = numpy_helper.from_array(R.standard_normal((V, E)).astype(np.float32), "table")
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], "embed")],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 7, E])],
        [table],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def simulate(m: onnx.ModelProto, bits: int, weights: dict | None = None, scales: dict | None = None):
    """The backend twin with every layer's (laid-out) weight fake-quantized per channel at `bits`: MSE
    scales, or the given weights and scales."""
    p = prepare(m)
    info = analyze(p)
    net = to_torch(p, info)
    for layer in info.layers:
        q = net.layers[layer.name]
        if weights and layer.name in weights:
            with torch.no_grad():
                q.weight.copy_(torch.from_numpy(weights[layer.name]))
        s = (scales or {}).get(layer.name)
        if s is None:
            s = weight_scale(q.weight.detach().numpy(), bits, layer.channel_axis)
        q.weight_quant = WeightFakeQuant(bits, layer.channel_axis, s, learnable=False)
    return net, info


def ort_run(m: onnx.ModelProto, feed: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_layout_keeps_the_float_function(direction):
    m = lstm_model(direction)
    net = to_torch(m)
    layer = net.layers["lstm"]
    dirs = 2 if direction == "bidirectional" else 1
    assert tuple(layer.weight.shape) == (dirs, 8 * H, max(C, H)) and layer.bias is None
    w, r = emitted_weights(analyze(m).layer("lstm"), layer.weight.detach().numpy())
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    np.testing.assert_array_equal(w, inits["W"])
    np.testing.assert_array_equal(r, inits["Rw"])
    x = R.standard_normal((T, N, C)).astype(np.float32)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ort_run(m, {"x": x}), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("storage", ["packed", "int8"])
def test_lstm_at_4_bits_runs_on_ort_as_simulated(storage):
    """W and R at 4 bits, each row its own scale: `packed` is DequantizeLinear + LSTM (exact);
    `int8` is com.microsoft.DynamicQuantizeLSTM, which also quantizes x and h to uint8 while it runs."""
    m = lstm_model("bidirectional")
    q = quantize_model(m, Policy.uniform(["lstm"], 4, 32), storage=storage)
    onnx.checker.check_model(q, full_check=True)
    net, _ = simulate(m, 4)
    x = R.standard_normal((T, N, C)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = ort_run(q, {"x": x})
    fp = ort_run(m, {"x": x})
    if storage == "packed":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert q.graph.node[-1].op_type == "DynamicQuantizeLSTM" or any(
            n.op_type == "DynamicQuantizeLSTM" for n in q.graph.node
        )
        # the dynamic uint8 input/state quantization adds a little on top of the simulated weights
        assert np.abs(got - want).max() < 0.1 * np.abs(want - fp).max() + 0.02
    assert np.abs(want - fp).max() > 1e-3  # 4-bit weights do change the output


def test_lstm_finetuned_weights_and_scales_in_the_layout_are_emitted_exactly():
    m = lstm_model()
    info = analyze(prepare(m))
    layer = info.layer("lstm")
    net = to_torch(prepare(m))
    v = net.layers["lstm"].weight.detach().numpy() * np.float32(1.03)  # a "finetuned" laid-out weight
    s = weight_scale(v, 4, layer.channel_axis) * np.float32(0.9)
    assert v.shape == tuple(simulated_shape(layer)) and s.shape == (8 * H,)
    qp = QuantParams({"lstm": LayerParams(weight=v, scale=s)})
    q = quantize_model(m, Policy({"lstm": LayerBits(4, 32, Format.PACKED)}), qparams=qp)
    sim, _ = simulate(m, 4, {"lstm": v}, {"lstm": s})
    x = R.standard_normal((T, N, C)).astype(np.float32)
    with torch.no_grad():
        want = sim(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_run(q, {"x": x}), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_table_in_blocks_runs_on_ort_as_simulated(bits):
    m = embedding_model()
    net, info = simulate(m, bits)
    assert tuple(net.layers["embed"].weight.shape) == (V * E // 32, 32)  # one channel per block of 32
    q = quantize_model(m, Policy.uniform(["embed"], bits, 32))  # storage auto: GatherBlockQuantized
    onnx.checker.check_model(q, full_check=True)
    assert [n.op_type for n in q.graph.node] == ["GatherBlockQuantized"]
    ids = R.integers(0, V, size=(4, 7)).astype(np.int64)
    with torch.no_grad():
        want = net(torch.from_numpy(ids)).numpy()
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids}
    )
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6)
    # Finetuned table and block scales (the simulation's layout) are stored as given.
    v = net.layers["embed"].weight.detach().numpy() * np.float32(0.97)
    s = weight_scale(v, bits, 0) * np.float32(1.1)
    qp = QuantParams({"embed": LayerParams(weight=v, scale=s)})
    q2 = quantize_model(m, Policy.uniform(["embed"], bits, 32), qparams=qp)
    sim, _ = simulate(m, bits, {"embed": v}, {"embed": s})
    with torch.no_grad():
        want2 = sim(torch.from_numpy(ids)).numpy()
    got2 = ort.InferenceSession(q2.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids}
    )
    np.testing.assert_allclose(got2[0], want2, rtol=1e-6, atol=1e-6)
    assert not np.allclose(want2, want)


def test_a_per_row_table_format_takes_the_laid_out_weight_back():
    """`int8`/`packed` tables keep one scale per row: a finetuned table in block layout is emitted with
    its values (MSE row scales), not refused."""
    m = embedding_model()
    net = to_torch(prepare(m))
    v = net.layers["embed"].weight.detach().numpy() * np.float32(0.5)
    qp = QuantParams({"embed": LayerParams(weight=v, scale=weight_scale(v, 8, 0))})
    q = quantize_model(m, Policy({"embed": LayerBits(8, 32, Format.INT8)}), qparams=qp)
    onnx.checker.check_model(q, full_check=True)
    ids = R.integers(0, V, size=(2, 7)).astype(np.int64)
    got = ort_run(q, {"ids": ids})
    table = v.reshape(V, E)
    np.testing.assert_allclose(got, table[ids], rtol=0.02, atol=0.02)
