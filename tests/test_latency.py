"""`mqtool.latency`: choice keys, the measured table (cache key and reuse, predict = rest + entries, the plan's
interactions), tracing ORT's profile back to layers, and `report --compare-int8` / `--latency`.

Timings here only check orderings with a wide margin (MatMulNBits at 4 bits against a float 1024 x 4096
MatMul at batch 1, about 3x apart); the accuracy of the predictions is measured in
bench/bench_latency_table.py."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mqtool import latency
from mqtool.analysis import analyze
from mqtool.cli import cli
from mqtool.data import model_inputs
from mqtool.emit import quantize_model, save_model_atomic
from mqtool.errors import InputError
from mqtool.latency import (
    FLOAT_KEY,
    INT8_KEY,
    LatencyTable,
    attribute,
    cache_path,
    choice_key,
    event_node,
    layer_claims,
    measure_latency_table,
    measure_models_latency,
    synthesize_feed,
)
from mqtool.policy import FLOAT, Format, LayerBits, Policy

RNG = np.random.default_rng(0)


def mlp(k: int = 64, hidden: int = 128, out: int = 32, batch: int | None = None, shared: bool = False):
    """x [N, k] -> fc1 (MatMul + bias Add) -> Relu -> fc2 (MatMul); `shared`: a third MatMul reads x too."""
    n = batch if batch else "N"
    w1 = numpy_helper.from_array(RNG.normal(size=(k, hidden)).astype(np.float32) * 0.1, "w1")
    b1 = numpy_helper.from_array(np.zeros(hidden, np.float32), "b1")
    w2 = numpy_helper.from_array(RNG.normal(size=(hidden, out)).astype(np.float32) * 0.1, "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], "fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], "fc1_add"),
        helper.make_node("Relu", ["h1"], ["h2"], "relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["y"], "fc2"),
    ]
    inits = [w1, b1, w2]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, out])]
    if shared:
        w3 = numpy_helper.from_array(RNG.normal(size=(k, out)).astype(np.float32) * 0.1, "w3")
        inits.append(w3)
        nodes.append(helper.make_node("MatMul", ["x", "w3"], ["z"], "side"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [n, out]))
    g = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, k])], outputs, inits
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def big_matmul(k: int = 1024, n: int = 4096):
    """x [1, 1, k] @ W [k, n]: at batch 1 memory-bound, where 4-bit weights pay off."""
    w = numpy_helper.from_array(RNG.normal(size=(k, n)).astype(np.float32) * 0.02, "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "fc")],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, n])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def data_for(model, n: int = 16) -> dict[str, np.ndarray]:
    spec = model_inputs(model)[0]
    shape = [n if d is None else d for d in spec.shape]
    return {spec.name: RNG.normal(size=shape).astype(np.float32)}


def test_choice_key_groups_by_kernel():
    info = analyze(mlp())
    fc1, fc2 = info.layers
    # Integer kernels run at one speed whatever the bits in the INT8 container.
    assert {choice_key(fc1, b, Format.INT8) for b in range(2, 9)} == {INT8_KEY}
    assert choice_key(fc1, FLOAT, Format.FLOAT) == FLOAT_KEY
    # Weight-only containers depend on the bits: INT2 / INT4 / INT8.
    assert [choice_key(fc1, b, Format.NBITS) for b in (2, 3, 4, 5, 8)] == [
        "nbits/int2", "nbits/int4", "nbits/int4", "nbits/int8", "nbits/int8",
    ]  # fmt: skip
    assert choice_key(fc2, 2, Format.PACKED, act_bits=FLOAT) == "packed/int2"
    assert choice_key(fc2, 2, Format.PACKED, act_bits=8) == "packed/int4"  # INT2 only weight-only
    # No format: storage auto's choice (int8 with a quantized input, nbits weight-only).
    assert choice_key(fc1, 4, None, act_bits=8) == INT8_KEY
    assert choice_key(fc1, 4, None, act_bits=FLOAT) == "nbits/int4"


def _table(**kw) -> LatencyTable:
    layers = {"a": {"float": 1.0, "int8": 0.5, "packed/int8": 0.9}, "b": {"float": 2.0, "nbits/int4": 0.7}}
    facts = {
        "a": {"op_type": "MatMul", "weight_shape": [8, 8], "channel_axis": 1, "weight_input": 1,
              "input_peers": [], "output_peers": []},
        "b": {"op_type": "MatMul", "weight_shape": [8, 8], "channel_axis": 1, "weight_input": 1,
              "input_peers": [], "output_peers": []},
    }  # fmt: skip
    facts["a"].update(kw)
    return LatencyTable({"batch": 1, "act_bits": 8}, 0.25, layers, facts)


def test_predict_is_rest_plus_the_chosen_entries():
    t = _table()
    pol = Policy({"a": LayerBits(4, 8, Format.INT8), "b": LayerBits(4, FLOAT, Format.NBITS)})
    assert t.predict(pol) == pytest.approx(0.25 + 0.5 + 0.7)
    assert t.predict(Policy({})) == pytest.approx(0.25 + 1.0 + 2.0)  # unnamed layers are float
    assert t.entry("b", 3, Format.NBITS) == 0.7
    with pytest.raises(InputError, match="'b' was not measured as 'packed/int2'"):
        t.predict(Policy({"b": LayerBits(2, FLOAT, Format.PACKED)}))
    with pytest.raises(InputError, match="no layer 'c'"):
        t.entry("c", 8, Format.INT8)
    again = LatencyTable.from_json(json.loads(json.dumps(t.to_json())))
    assert again.predict(pol) == t.predict(pol) and again.layers == t.layers


def test_predict_follows_the_plan_an_int8_layer_next_to_a_float_reader_runs_unfused():
    """Rule 1 of the plan: a tensor read by a float layer gets no Q/DQ, so an int8 layer reading it runs as
    DequantizeLinear + float op: the table prices it as 'packed/int8'; rule 2 likewise for a Conv's output."""
    t = _table(input_peers=["b"])
    int8_a = LayerBits(4, 8, Format.INT8)
    assert t.realised_key("a", Policy({"a": int8_a, "b": LayerBits(4, 8, Format.INT8)})) == INT8_KEY
    blocked = Policy({"a": int8_a, "b": LayerBits(4, FLOAT, Format.NBITS)})
    assert t.realised_key("a", blocked) == "packed/int8"
    assert t.predict(blocked) == pytest.approx(0.25 + 0.9 + 0.7)
    t = _table(output_peers=["b"])
    assert t.realised_key("a", Policy({"a": int8_a})) == "packed/int8"  # b float reads a's output


def test_cache_key_names_the_machine_runtime_threads_batch_and_model(tmp_path):
    import onnxruntime as ort

    m = mlp()
    key = latency.table_key(m, batch=1, threads=2, act_bits=8)
    assert key["onnxruntime"] == ort.__version__ and key["cpu"] == latency.cpu_model()
    assert key["model_sha256"] == latency.model_digest(m) and len(key["model_sha256"]) == 64
    paths = {
        cache_path(tmp_path, latency.table_key(mm, batch=b, threads=t, act_bits=8))
        for mm, b, t in ((m, 1, 2), (m, 32, 2), (m, 1, 1), (mlp(hidden=64), 1, 2))
    }
    assert len(paths) == 4


def test_table_is_measured_cached_and_reused(tmp_path, monkeypatch):
    m = mlp()
    info = analyze(m)
    choices = {"fc1": [(8, Format.INT8), (4, Format.NBITS)], "fc2": [(4, Format.PACKED), (6, Format.INT8)]}
    data = data_for(m)
    t = measure_latency_table(m, info, choices, data=data, cache_dir=tmp_path, budget_s=0.5)
    assert set(t.layers["fc1"]) == {"float", "int8", "packed/int8", "nbits/int4"}
    assert set(t.layers["fc2"]) == {"float", "int8", "packed/int4", "packed/int8"}
    assert t.rest_ms >= 0 and t.layers["fc1"]["float"] > 0 and t.layers["fc2"]["float"] > 0
    # Each key's uniform model predicts its own measured median (the rest's change is shared out).
    uniform = Policy({"fc1": LayerBits(8, 8, Format.INT8), "fc2": LayerBits(6, 8, Format.INT8)})
    assert t.predict(uniform) == pytest.approx(t.measured["int8"]["ms"])
    assert t.predict(Policy({})) == pytest.approx(t.measured["float"]["ms"])
    assert t.facts["fc1"]["output_peers"] == ["fc2"]  # 2-D MatMul + bias: fused only with its output Q/DQ
    files = os.listdir(tmp_path)
    assert files == [os.path.basename(cache_path(tmp_path, t.key))]
    # The same request again: read from the cache, nothing is timed.
    monkeypatch.setattr(latency, "measure_models_latency", lambda *a, **k: pytest.fail("re-measured"))
    again = measure_latency_table(m, info, {"fc1": [(2, Format.INT8)]}, data=data, cache_dir=tmp_path)
    assert again.layers == t.layers and again.rest_ms == t.rest_ms
    # A key the cached table lacks is measured afresh.
    with pytest.raises(pytest.fail.Exception, match="re-measured"):
        measure_latency_table(m, info, {"fc2": [(2, Format.PACKED)]}, data=data, cache_dir=tmp_path)


def test_choices_are_checked():
    m = mlp()
    info = analyze(m)
    with pytest.raises(InputError, match="unknown layer 'nope'"):
        measure_latency_table(m, info, {"nope": [(4, Format.INT8)]})
    conv = analyze(_conv())
    with pytest.raises(InputError, match="cannot take format 'nbits'"):
        measure_latency_table(_conv(), conv, {conv.names[0]: [(4, Format.NBITS)]})
    with pytest.raises(InputError, match="bits must be 2..8"):
        measure_latency_table(m, info, {"fc1": [(9, Format.INT8)]})


def _conv():
    w = numpy_helper.from_array(RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], "conv")],
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_nbits_4bit_is_predicted_and_measured_faster_than_float_for_a_large_matrix():
    m = big_matmul()
    info = analyze(m)
    t = measure_latency_table(m, info, {"fc": [(4, Format.NBITS)]}, budget_s=1.0)
    assert t.layers["fc"]["nbits/int4"] < t.layers["fc"]["float"]
    q = quantize_model(m, Policy({"fc": LayerBits(4, FLOAT, Format.NBITS)}))
    assert "MatMulNBits" in _optimized_ops(q)
    timed = measure_models_latency({"float": m, "nbits": q}, batch=1, budget_s=1.0)
    assert timed["nbits"][0] < timed["float"][0]
    assert t.predict(Policy({"fc": LayerBits(4, FLOAT, Format.NBITS)})) < t.predict(Policy({}))


def _optimized_ops(model) -> set[str]:
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(tmp, "o.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


def test_profile_events_are_traced_back_to_layers():
    m = mlp(shared=True)
    q = quantize_model(m, Policy.uniform(["fc1", "fc2", "side"], 8, 8), data=data_for(m))
    latency._name_all_nodes(q)
    claims = layer_claims(q, ["fc1", "fc2", "side"])
    assert claims["fc1"] == ["fc1"] and claims["fc1_add"] == ["fc1"] and claims["relu"] == ["fc1"]
    nodes = {n.name: n for n in q.graph.node}
    # x's one Q/DQ pair is shared by the two layers reading it.
    producers = {o: n.name for n in q.graph.node for o in n.output}
    x_dq = producers[nodes["fc1"].input[0]]
    assert nodes[x_dq].op_type == "DequantizeLinear" and producers[nodes["side"].input[0]] == x_dq
    assert sorted(claims[x_dq]) == ["fc1", "side"]
    assert event_node("fc1_token_3", nodes, producers) == "fc1"
    assert event_node("fc2/MatMulAddFusion", nodes, producers) == "fc2"
    assert event_node("fused fc1/MatMulAddFusion", nodes, producers) == "fc1"
    assert event_node("h2_nchwc", nodes, producers) == "relu"
    assert event_node("Transpose_token_9", nodes, producers) is None
    node_ms = {"fc1_token_3": 1.0, x_dq: 0.5, "Transpose_token_9": 0.25, "fc2": 2.0}
    per, other = attribute(q, ["fc1", "fc2", "side"], node_ms)
    assert per == {"fc1": 1.25, "fc2": 2.0, "side": 0.25} and other == 0.25


def test_synthesized_and_data_feeds_have_the_batch_on_each_sample_axis():
    m = mlp(batch=1)  # fixed batch 1: a call of 4 samples is 4 runs
    specs = model_inputs(m)
    feed = synthesize_feed(specs, 4)
    assert feed["x"].shape == (1, 64) and 0 <= feed["x"].min() and feed["x"].max() < 1
    f4 = latency.latency_feed(m, data_for(m, 3), 4)
    assert f4["x"].shape == (4, 64)
    assert len(latency._runs(specs, f4)) == 4
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", None])
    spec = model_inputs(helper.make_model(helper.make_graph([], "g", [ids], [ids])))
    f = synthesize_feed(spec, 2)["ids"]
    assert f.shape == (2, latency.FREE_DIM) and f.dtype == np.int64 and np.all(f == 1)


def _tiny_pair(tmp_path):
    m = mlp()
    ref = str(tmp_path / "f.onnx")
    onnx.save(m, ref)
    q = str(tmp_path / "q.onnx")
    save_model_atomic(quantize_model(m, Policy.uniform(["fc1", "fc2"], 4, 8), data=data_for(m)), q)
    npz = str(tmp_path / "d.npz")
    np.savez(npz, x=data_for(m, 8)["x"])
    return ref, q, npz


def test_report_compare_int8_prints_three_rows(tmp_path):
    ref, q, npz = _tiny_pair(tmp_path)
    r = CliRunner().invoke(
        cli, ["report", q, "--compare-int8", "--reference", ref, "--data", npz, "--latency"]
    )
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    rows = {name: next(line for line in lines if line.startswith(name)) for name in
            ("fp32 (reference)", "ORT quantize_static int8", "this model")}  # fmt: skip
    assert rows["fp32 (reference)"].split()[2] == f"{os.path.getsize(ref):,}"
    assert rows["this model"].split()[2] == f"{os.path.getsize(q):,}"
    assert "latency (ONNX Runtime CPU, batch 1" in r.output
    layer_rows = [line for line in lines if line.startswith(("fc1 ", "fc2 "))]
    assert len(layer_rows) == 2 and all(float(line.split()[-1]) > 0 for line in layer_rows)  # the ms column
    doc = json.loads(
        CliRunner().invoke(cli, ["report", q, "--compare-int8", "--reference", ref, "--json"]).output
    )
    cmp = doc["compare_int8"]["rows"]
    assert [c["model"] for c in cmp] == ["fp32 (reference)", "ORT quantize_static int8", "this model"]
    assert cmp[1]["bytes"] < cmp[0]["bytes"] and "ms" not in cmp[0]


def test_report_compare_int8_needs_the_reference(tmp_path):
    _, q, _ = _tiny_pair(tmp_path)
    r = CliRunner().invoke(cli, ["report", q, "--compare-int8"])
    assert r.exit_code == 2 and "--compare-int8 needs --reference" in r.output
    other = str(tmp_path / "other.onnx")
    onnx.save(_conv(), other)
    r = CliRunner().invoke(cli, ["report", q, "--compare-int8", "--reference", other])
    assert r.exit_code == 2 and "not its float model" in r.output


def test_predict_adds_the_layout_borders_of_convolutions():
    """Integer convs run in NHWC and float ones in NCHWc: each side of a conv whose neighbour runs in another
    layout pays a Transpose / Reorder (`border_ms`); a conv kept off its integer kernel by a float reader of
    its output keeps its input Q/DQ unfused (`qdq_ms`)."""

    def conv(up, down, output_peers=()):
        return {"op_type": "Conv", "weight_shape": [4, 4, 3, 3], "channel_axis": 0, "weight_input": 1,
                "input_peers": [], "output_peers": list(output_peers), "up": up, "down": down,
                "elements": [100, 100]}  # fmt: skip

    row = {"float": 1.0, "int8": 0.5, "packed/int8": 2.0}
    facts = {"a": conv([""], ["b"]), "b": conv(["a"], ["c"]), "c": conv(["b"], [""])}
    border = {"nhwc": [0.01, 0.001], "nchwc": [0.02, 0.0]}  # a border side: a + b * elements
    t = LatencyTable({"act_bits": 8}, 0.1, {n: dict(row) for n in facts}, facts, border_ms=border,
                     qdq_ms=[0.005, 0.0001])  # fmt: skip
    int8 = LayerBits(8, 8, Format.INT8)
    assert t.border_sides(Policy({n: int8 for n in facts})) == {"nhwc": 2}
    assert t.border_sides(Policy({})) == {"nchwc": 2}
    mixed = Policy({"a": int8, "c": int8})
    assert t.border_sides(mixed) == {"nhwc": 4, "nchwc": 2}
    assert t.predict(mixed) == pytest.approx(0.1 + 0.5 + 1.0 + 0.5 + 4 * (0.01 + 0.1) + 2 * 0.02)
    # b float reads a's output: a cannot fuse (runs as DQ + float Conv, its input Q/DQ left unfused)
    facts["a"]["output_peers"] = ["b"]
    assert t.realised_key("a", mixed) == "packed/int8"
    assert t.border_sides(mixed) == {"nchwc": 2, "nhwc": 2}
    assert t.predict(mixed) == pytest.approx(0.1 + 2.0 + 1.0 + 0.5 + 2 * 0.11 + 2 * 0.02 + 0.005 + 0.01)


def test_a_dynamic_layer_has_its_own_column_and_its_kernel_time_is_its_own():
    # DynamicQuantizeMatMul carries the layer's name, so the profiler's event is the layer's, not the rest's
    m = big_matmul(256, 512)
    info = analyze(m)
    t = measure_latency_table(m, info, {"fc": [(4, Format.DYNAMIC), (8, Format.DYNAMIC)]}, budget_s=0.5)
    assert set(t.layers["fc"]) == {"float", "dynamic"}
    dynamic = Policy({"fc": LayerBits(4, FLOAT, Format.DYNAMIC)})
    assert t.measured["dynamic"]["layers"] == 1 and t.rest_ms == pytest.approx(0.0, abs=1e-6)
    assert t.predict(dynamic) == pytest.approx(t.measured["dynamic"]["ms"], rel=1e-6)
    assert t.layers["fc"]["dynamic"] == pytest.approx(t.measured["dynamic"]["ms"], rel=1e-6)
    assert "DynamicQuantizeMatMul" in _optimized_ops(quantize_model(m, dynamic))
