"""Embedding tables (Gather on a constant) and LSTM/GRU weights as weight-only layers: listed by analysis
and `inspect --json`, emitted in every format they allow, numbers equal to numerics on ORT, read back by
`report`, sized by `format_bytes`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mqtool.analysis import analyze
from mqtool.emit import quantize_model
from mqtool.numerics import dequantize_blockwise, quantize_weight, quantize_weight_blockwise
from mqtool.policy import Format, LayerBits, Policy
from mqtool.report import report
from passes.qdq_plan import allowed_formats, format_bytes

RNG = np.random.default_rng(5)
V, D, H = 300, 64, 16


def model(rnn: str = "LSTM") -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul -> [T, N, C] -> LSTM/GRU -> y."""
    gates = {"LSTM": 4, "GRU": 3}[rnn]
    inits = [
        numpy_helper.from_array(RNG.standard_normal((V, D)).astype(np.float32), "emb"),
        numpy_helper.from_array((RNG.standard_normal((D, 24)) * 0.2).astype(np.float32), "w"),
        numpy_helper.from_array((RNG.standard_normal((2, gates * H, 24)) * 0.3).astype(np.float32), "W"),
        numpy_helper.from_array((RNG.standard_normal((2, gates * H, H)) * 0.3).astype(np.float32), "R"),
        numpy_helper.from_array((RNG.standard_normal((2, 2 * gates * H)) * 0.1).astype(np.float32), "B"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h"], "embed"),
        helper.make_node("MatMul", ["h", "w"], ["m"], "proj"),
        helper.make_node("Transpose", ["m"], ["t"], "tr", perm=[1, 0, 2]),
        helper.make_node(rnn, ["t", "W", "R", "B"], ["y"], "rnn", hidden_size=H, direction="bidirectional"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 2, "n", H])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


IDS = RNG.integers(0, V, size=(3, 7)).astype(np.int64)


def run(m: onnx.ModelProto) -> np.ndarray:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": IDS}
    )[0]


def with_weights(m: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for i in out.graph.initializer:
        if i.name in values:
            i.CopyFrom(numpy_helper.from_array(values[i.name].astype(np.float32), i.name))
    return out


def test_analysis_and_inspect_list_the_table_and_the_recurrent_layer(tmp_path):
    m = model()
    info = analyze(m)
    layers = {layer.name: layer for layer in info.layers}
    assert list(layers) == ["embed", "proj", "rnn"]  # graph order
    emb, rnn = layers["embed"], layers["rnn"]
    assert (emb.op_type, emb.weight, emb.weight_shape, emb.params, emb.input) == (
        "Gather",
        "emb",
        [V, D],
        V * D,
        "ids",
    )
    assert rnn.params == 2 * 64 * 24 + 2 * 64 * 16 and rnn.channel_axis == 1 and rnn.bias == "B"
    assert info.totals.params == V * D + D * 24 + rnn.params
    assert allowed_formats(emb) == (Format.FLOAT, Format.INT8, Format.PACKED, Format.NBITS)
    assert allowed_formats(rnn) == (Format.FLOAT, Format.INT8, Format.PACKED)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    out = subprocess.run(
        [sys.executable, "-m", "mqtool", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert [(x["name"], x["op_type"]) for x in doc["layers"]] == [
        ("embed", "Gather"),
        ("proj", "MatMul"),
        ("rnn", "LSTM"),
    ]


@pytest.mark.parametrize("bits", [4, 8])
def test_gather_nbits_is_gather_block_quantized_and_exact(bits):
    m = model()
    pol = Policy({"embed": LayerBits(bits, 32, Format.NBITS, 32)})
    q = quantize_model(m, pol)
    onnx.checker.check_model(q, full_check=True)
    (node,) = [n for n in q.graph.node if n.name == "embed"]
    assert (node.domain, node.op_type) == ("com.microsoft", "GatherBlockQuantized")
    table = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "emb"))
    qv, s = quantize_weight_blockwise(table, bits, 1, 32)
    want = run(with_weights(m, {"emb": dequantize_blockwise(qv, s, 0, 1, 32)}))
    np.testing.assert_allclose(run(q), want, rtol=1e-5, atol=1e-5)
    rep = {r.name: r for r in report(q).layers}["embed"]
    assert (rep.weight_bits, rep.format, rep.storage) == (bits, "nbits", "int4" if bits == 4 else "uint8")
    assert abs(format_bytes(analyze(m).layer("embed"), bits, "nbits", 32) - _init_bytes(q, node)) <= 64


@pytest.mark.parametrize(
    "rnn, fmt, bits, container",
    [
        ("GRU", "int8", 8, TensorProto.INT8),
        ("GRU", "packed", 4, TensorProto.INT4),
        ("LSTM", "packed", 4, TensorProto.INT4),
        ("LSTM", "packed", 8, TensorProto.INT8),
    ],
)
def test_recurrent_w_and_r_are_quantized_weight_only(rnn, fmt, bits, container):
    m = model(rnn)
    info = analyze(m)
    pol = Policy({"rnn": LayerBits(bits, 32, Format(fmt)), "embed": LayerBits(8, 32, Format.PACKED)})
    q = quantize_model(m, pol)
    onnx.checker.check_model(q, full_check=True)
    prod = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name: i for i in q.graph.initializer}
    (node,) = [n for n in q.graph.node if n.name == "rnn"]
    for k in (1, 2):  # W and R through a DequantizeLinear, per row (axis 1), in the format's container
        dq = prod[node.input[k]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == container
    w = {
        k: numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == k))
        for k in ("emb", "W", "R")
    }
    deq = {}
    for k, b in (("W", bits), ("R", bits), ("emb", 8)):
        axis = 0 if k == "emb" else 1
        qv, s = quantize_weight(w[k], b, axis)
        shape = [-1 if i == axis else 1 for i in range(w[k].ndim)]
        deq[k] = qv * s.reshape(shape)
    np.testing.assert_allclose(run(q), run(with_weights(m, deq)), rtol=1e-5, atol=1e-5)
    rows = {r.name: r for r in report(q).layers}
    assert (rows["rnn"].weight_bits, rows["rnn"].format) == (bits, fmt)
    assert rows["rnn"].weight_bytes == (info.layer("rnn").params * (8 if bits > 4 else 4)) // 8
    est = format_bytes(info.layer("rnn"), bits, fmt)
    got = sum(inits[i].ByteSize() for n in (prod[node.input[1]], prod[node.input[2]]) for i in n.input)
    got += inits["B"].ByteSize() + prod[node.input[1]].ByteSize() + prod[node.input[2]].ByteSize()
    assert abs(est - got) <= 0.02 * est + 64


@pytest.mark.parametrize("bits", [8, 5])
def test_lstm_int8_runs_as_dynamic_quantize_lstm(bits):
    """An LSTM in format int8 is ORT's integer LSTM: int8 W and R (the per-row scales numerics gives),
    input and state quantized by the kernel at run time - within a small error of the float LSTM with the
    same dequantized weights."""
    m = model("LSTM")
    info = analyze(m)
    q = quantize_model(m, Policy({"rnn": LayerBits(bits, 32, Format.INT8)}))
    onnx.checker.check_model(q, full_check=True)
    (node,) = [n for n in q.graph.node if n.name == "rnn"]
    assert (node.domain, node.op_type) == ("com.microsoft", "DynamicQuantizeLSTM")
    inits = {i.name: i for i in q.graph.initializer}
    w = {k: numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == k)) for k in ("W", "R")}
    deq = {}
    for k, idx in (("W", 1), ("R", 2)):
        qv, s = quantize_weight(w[k], bits, 1)
        np.testing.assert_array_equal(
            numpy_helper.to_array(inits[node.input[idx]]), np.transpose(qv, (0, 2, 1))
        )
        deq[k] = qv * s[None, :, None]
    want = run(with_weights(m, deq))
    got = run(q)
    # uint8 input and state quantization only (measured: 3% of the range at worst, 0.1% on average)
    err = np.abs(got - want)
    assert err.max() <= 0.05 * np.abs(want).max() and err.mean() <= 0.005 * np.abs(want).max()
    row = {r.name: r for r in report(q).layers}["rnn"]
    assert (row.weight_bits, row.format, row.storage, row.weight_bytes) == (
        bits,
        "int8",
        "int8",
        info.layer("rnn").params,
    )
    est = format_bytes(info.layer("rnn"), bits, "int8")
    got_bytes = (
        sum(inits[i].ByteSize() for i in node.input if i in inits and i != "B") + inits["B"].ByteSize()
    )
    assert abs(est - got_bytes - node.ByteSize()) <= 0.02 * est + 96


def test_storage_modes_pick_formats_for_tables_and_recurrent_layers():
    m = model()
    info = analyze(m)
    want = {
        "auto": {"embed": "nbits", "rnn": "int8"},  # GatherBlockQuantized; DynamicQuantizeLSTM
        "int8": {"embed": "int8", "rnn": "int8"},
        "packed": {"embed": "packed", "rnn": "packed"},
    }
    for storage, formats in want.items():
        q = quantize_model(m, Policy.uniform(info.names, 4, 32), storage=storage)
        got = {r.name: r.format for r in report(q).layers if r.name != "proj"}
        assert got == formats, storage
        assert run(q).shape == run(m).shape


def _init_bytes(q: onnx.ModelProto, node: onnx.NodeProto) -> int:
    inits = {i.name: i for i in q.graph.initializer}
    return sum(inits[i].ByteSize() for i in node.input if i in inits) + node.ByteSize()
