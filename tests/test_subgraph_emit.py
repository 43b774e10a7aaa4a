"""Layers inside If branches and Loop bodies are quantized like main-graph layers (`passes.subgraph_qdq`):
weights in the body (from body initializers, `Constant` nodes, folded constants or outer initializers),
activations calibrated through the PyTorch backend, names unique across graphs. Every emitted model passes
the full checker, and its ONNX Runtime outputs (graph optimisations off: the QDQ arithmetic as written)
match the backend's fake-quantized simulation of the same plan, and onnx.reference."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from calibration.calibrate import CalibrationOptions, calibrate
from mqtool.analysis import analyze
from mqtool.backend import ActFakeQuant, WeightFakeQuant, to_torch
from mqtool.emit import quantize_model
from mqtool.errors import InputError
from mqtool.model import all_graphs, find_scope
from mqtool.policy import Policy
from passes.pipeline import prepare
from passes.subgraph_qdq import plan_model, plan_model_storage

from .test_control_flow import if_model, loop_model

R = np.random.default_rng(3)
FLOAT = TensorProto.FLOAT


def simulation(m: onnx.ModelProto, policy: Policy, data: dict) -> torch.nn.Module:
    """The backend twin of `m` quantized as emission plans it: the model-wide activation plan with min-max
    ranges (body tensors read through the backend), each weight per channel at its stored bits with the
    MSE scale."""
    p = prepare(m)
    info = analyze(p)
    plan = plan_model(p, info, policy)
    bits = plan.merged().bits
    net = to_torch(p, info)
    ranges = calibrate(p, bits, data, CalibrationOptions(method="minmax"), subgraph_reader=net.read_tensors)
    layout = plan_model_storage(p, info, policy, plan.without(set(bits) - set(ranges)).merged().all_bits())
    for layer in info.layers:
        q = net.layers[layer.name]
        q.weight_quant = WeightFakeQuant.from_weight(
            q.weight.detach(), layout[layer.name].bits, layer.channel_axis, learnable=False
        )
    for t, b in bits.items():
        if t in ranges:
            net.set_act_quant(t, ActFakeQuant.from_range(*ranges[t], bits=b))
    return net


def plain_ort(m: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def body_ops(m: onnx.ModelProto, scope) -> Counter:
    return Counter(n.op_type for n in find_scope(m.graph, scope).node)


def assert_unique_names(m: onnx.ModelProto) -> None:
    outputs = [o for g in all_graphs(m.graph) for n in g.node for o in n.output if o]
    outputs += [i.name for g in all_graphs(m.graph) for i in g.initializer]
    nodes = [n.name for g in all_graphs(m.graph) for n in g.node]
    assert len(outputs) == len(set(outputs)), [k for k, c in Counter(outputs).items() if c > 1]
    assert len(nodes) == len(set(nodes)), [k for k, c in Counter(nodes).items() if c > 1]


@pytest.mark.parametrize("wbits,abits", [(4, 8), (8, 8), (3, 4), (4, 32)])
def test_if_branches_are_quantized_and_match_the_simulation(wbits, abits, caplog):
    m = if_model()
    data = {"x": R.normal(size=(32, 2, 6)).astype(np.float32), "sr": np.array(16000)}
    policy = Policy.uniform(analyze(prepare(m)).names, wbits, abits)
    with caplog.at_level(logging.WARNING):
        q = quantize_model(m, policy, data=data, calibration="minmax")
    onnx.checker.check_model(q, full_check=True)
    assert_unique_names(q)
    # Every layer's weight is stored as integers inside its own body; the float weights are gone.
    then, other = [["route", "then_branch"]], [["route", "else_branch"]]
    inner_then, inner_else = then + [["inner", "then_branch"]], then + [["inner", "else_branch"]]
    for scope, layers in ((then, 1), (other, 2), (inner_then, 1), (inner_else, 1)):
        body = find_scope(q.graph, scope)
        weights = [
            n
            for n in body.node
            if n.op_type == "DequantizeLinear"
            and n.input[0] not in {o for x in body.node if x.op_type == "QuantizeLinear" for o in x.output}
        ]
        assert len(weights) == layers, (scope, body_ops(q, scope))
        assert all(not i.name.startswith("W") for i in body.initializer)
    assert not any(i.name == "Wfc" for i in q.graph.initializer)  # the outer weight moved into the body
    if abits < 32:
        # x is read by both branch convs: its one Q/DQ pair lives where x is defined (the main graph), and
        # the branches read the DequantizeLinear output; f2 (the taken nested branch) is quantized inside.
        main_q = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
        clip = {n.output[0]: n.input[0] for n in q.graph.node if n.op_type == "Clip"}  # below 8 bits
        assert [clip.get(n.input[0], n.input[0]) for n in main_q] == ["x"]
        dq_x = next(n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear")
        assert all(dq_x in n.input for n in find_scope(q.graph, then).node if n.op_type == "Conv")
        assert body_ops(q, inner_else)["QuantizeLinear"] == 1
        # The branches no calibration sample takes (sr 8000, batch 1) keep float activations, and say so.
        assert (
            "'f8'" in caplog.text
            and "'f1'" in caplog.text
            and "keeps no activation quantization" in caplog.text
        )
        assert body_ops(q, other)["QuantizeLinear"] == 0 and body_ops(q, inner_then)["QuantizeLinear"] == 0
    net = simulation(m, policy, data)
    sess, ref = plain_ort(q), ReferenceEvaluator(q)
    for sr in (16000, 8000):
        for n in (1, 5):
            feed = {"x": R.normal(size=(n, 2, 6)).astype(np.float32), "sr": np.array(sr)}
            got = sess.run(None, feed)[0]
            with torch.no_grad():
                want = net(torch.from_numpy(feed["x"]), torch.tensor(sr)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"sr {sr}, batch {n}")
            np.testing.assert_allclose(ref.run(None, feed)[0], got, rtol=1e-5, atol=1e-6)
            fp = plain_ort(m).run(None, feed)[0]
            assert not np.allclose(got, fp, atol=1e-6)  # quantization happened in the branch that ran


@pytest.mark.parametrize("wbits", [4, 8])
def test_loop_body_layer_and_its_carried_input_match_the_simulation(wbits):
    m = loop_model()
    data = {
        "x": R.normal(size=(8, 1, 4)).astype(np.float32),
        "h0": R.normal(size=(8, 4)).astype(np.float32),
        "go": np.array(True),
    }
    policy = Policy.uniform(["cell"], wbits, 8)
    q = quantize_model(m, policy, data=data, calibration="minmax")
    onnx.checker.check_model(q, full_check=True)
    body = body_ops(q, [["loop", "body"]])
    assert body["QuantizeLinear"] == 1 and body["DequantizeLinear"] == 2  # h_in, and the weight
    net = simulation(m, policy, data)
    sess = plain_ort(q)
    for steps in (1, 6):
        feed = {
            "x": R.normal(size=(steps, 1, 4)).astype(np.float32),
            "h0": R.normal(size=(1, 4)).astype(np.float32),
            "go": np.array(True),
        }
        got = sess.run(None, feed)
        with torch.no_grad():
            want = net(*[torch.from_numpy(np.asarray(feed[k])) for k in ("x", "h0", "go")])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6)


def test_calibration_reads_every_loop_iteration_through_the_backend():
    m = loop_model()
    net = to_torch(m)
    feed = {
        "x": R.normal(size=(5, 1, 4)).astype(np.float32),
        "h0": np.zeros((1, 4), np.float32),
        "go": np.array(True),
    }
    got = net.read_tensors(feed, ["h_in", "pre"])
    hs = plain_ort(m).run(None, feed)[1]  # h after each step: the next step's h_in
    h_in = np.concatenate([feed["h0"], hs[:-1, 0]])
    np.testing.assert_allclose(np.sort(got["h_in"]), np.sort(h_in.reshape(-1)), rtol=1e-5, atol=1e-6)
    assert got["pre"].size == 5 * 4
    # Calibration: h0 [1, 4] fixes a batch of 1, so 5 samples are 5 runs of one step each.
    data = {"x": R.normal(size=(5, 1, 4)).astype(np.float32), "h0": R.normal(size=(5, 4)).astype(np.float32)}
    data["go"] = np.array(True)
    with pytest.raises(InputError, match=r"tensor 'pre' lives inside the subgraph loop.body"):
        calibrate(m, ["pre"], data)
    ranges = calibrate(m, ["pre"], data, "minmax", subgraph_reader=net.read_tensors)
    runs = [
        net.read_tensors({"x": data["x"][i : i + 1], "h0": data["h0"][i : i + 1], "go": data["go"]}, ["pre"])[
            "pre"
        ]
        for i in range(5)
    ]
    assert ranges["pre"] == pytest.approx(
        (min(float(r.min()) for r in runs), max(float(r.max()) for r in runs))
    )


def constant_weight_model() -> onnx.ModelProto:
    """An If whose then-branch Conv reads a `Constant` node weight and whose MatMul weight is folded from
    a constant (Transpose of a Constant) inside the branch; the else-branch returns x's mean."""
    w = R.normal(0, 0.5, (4, 2, 3)).astype(np.float32)
    wt = R.normal(0, 0.5, (3, 4 * 6)).astype(np.float32)
    then = helper.make_graph(
        [
            helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "Wc")),
            helper.make_node("Conv", ["x", "Wc"], ["c"], kernel_shape=[3], pads=[1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Constant", [], ["Wt"], value=numpy_helper.from_array(wt, "Wt")),
            helper.make_node("Transpose", ["Wt"], ["Wm"]),
            helper.make_node("MatMul", ["f", "Wm"], ["yt"], name="fc"),
        ],
        "then",
        [],
        [helper.make_empty_tensor_value_info("yt")],
    )
    other = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, axes=[2]),
            helper.make_node("Slice", ["m", "s0", "s1", "s2"], ["ye"]),
        ],
        "else",
        [],
        [helper.make_empty_tensor_value_info("ye")],
        [numpy_helper.from_array(np.array([0], np.int64), n) for n in ("s0",)]
        + [
            numpy_helper.from_array(np.array([3], np.int64), "s1"),
            numpy_helper.from_array(np.array([1], np.int64), "s2"),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other, name="route")],
        "g",
        [
            helper.make_tensor_value_info("x", FLOAT, ["N", 2, 6]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 3])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(m, full_check=True)
    return m


def test_constant_node_and_folded_weights_inside_a_branch():
    m = constant_weight_model()
    info = analyze(prepare(m))
    assert [x.name for x in info.layers] == ["conv", "fc"]
    data = {"x": R.normal(size=(16, 2, 6)).astype(np.float32), "flag": np.array(True)}
    policy = Policy.uniform(info.names, 4, 8)
    q = quantize_model(m, policy, data=data, calibration="minmax")
    onnx.checker.check_model(q, full_check=True)
    then = find_scope(q.graph, [["route", "then_branch"]])
    assert "Constant" not in body_ops(q, [["route", "then_branch"]])  # both weights replaced by integers
    assert {i.data_type for i in then.initializer if i.name.endswith(".q")} == {TensorProto.INT8}
    net = simulation(m, policy, data)
    feed = {"x": R.normal(size=(3, 2, 6)).astype(np.float32), "flag": np.array(True)}
    with torch.no_grad():
        want = net(torch.from_numpy(feed["x"]), torch.tensor(True)).numpy()
    np.testing.assert_allclose(plain_ort(q).run(None, feed)[0], want, rtol=1e-5, atol=1e-5)
    # The packed storage (INT4 containers) is applied inside the body too.
    packed = quantize_model(m, policy, data=data, calibration="minmax", storage="packed")
    onnx.checker.check_model(packed, full_check=True)
    (route,) = [n for n in packed.graph.node if n.op_type == "If"]  # packed storage drops its name
    then = next(a.g for a in route.attribute if a.name == "then_branch")
    assert TensorProto.INT4 in {i.data_type for i in then.initializer}
    np.testing.assert_allclose(plain_ort(packed).run(None, feed)[0], want, rtol=1e-5, atol=1e-5)


def test_a_body_op_the_backend_cannot_run_is_named():
    """Layers in a Scan body are found; calibrating their inputs needs the backend, which names Scan."""
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "W"], ["y_t"], name="cell"),
            helper.make_node("Add", ["s_in", "y_t"], ["s_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("s_in", FLOAT, [1, 3]),
            helper.make_tensor_value_info("x_t", FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("s_out", FLOAT, [1, 3]),
            helper.make_tensor_value_info("y_t", FLOAT, [1, 3]),
        ],
        [numpy_helper.from_array(R.normal(size=(4, 3)).astype(np.float32), "W")],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "x"], ["s", "ys"], body=body, num_scan_inputs=1, name="scan")],
        "g",
        [
            helper.make_tensor_value_info("s0", FLOAT, [1, 3]),
            helper.make_tensor_value_info("x", FLOAT, [5, 1, 4]),
        ],
        [
            helper.make_tensor_value_info("s", FLOAT, [1, 3]),
            helper.make_tensor_value_info("ys", FLOAT, [5, 1, 3]),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = {"s0": np.zeros((1, 3), np.float32), "x": R.normal(size=(5, 1, 4)).astype(np.float32)}
    with pytest.raises(InputError, match=r"unsupported ops for the PyTorch backend: Scan \(nodes: scan\)"):
        quantize_model(m, Policy.uniform(["cell"], 4, 8), data=data)
    # Weight-only needs no calibration: the Scan body's weight is quantized and ORT runs it.
    q = quantize_model(m, Policy.uniform(["cell"], 4, 32))
    onnx.checker.check_model(q, full_check=True)
    assert body_ops(q, [["scan", "body"]])["DequantizeLinear"] == 1
    got = plain_ort(q).run(None, data)[1]
    assert got.shape == (5, 1, 3) and not np.allclose(got, plain_ort(m).run(None, data)[1], atol=1e-7)


def test_training_through_a_quantized_zero_before_sqrt_stays_finite():
    """silero's STFT magnitude sqrt(re^2 + im^2): an 8-bit activation rounds small sums to exactly 0, where
    torch's sqrt gradient is inf (and NaN further back); the backend's is 0 there, its values unchanged."""
    w = R.normal(size=(4, 3)).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"),
            helper.make_node("Mul", ["m", "m"], ["sq"]),
            helper.make_node("Sqrt", ["sq"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    net = to_torch(m)
    net.set_act_quant("sq", ActFakeQuant(8, 0.1, 0))  # values below 0.05 become exactly 0
    x = torch.from_numpy(np.array([[1e-3, 0, 0, 0], [1.0, -2.0, 0.5, 0.3]], np.float32))
    y = net(x)
    y.sum().backward()
    grad = net.layers["fc"].weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    np.testing.assert_allclose(
        y.detach().numpy(), np.sqrt(np.round((x.numpy() @ w) ** 2 / 0.1).clip(0, 255) * 0.1)
    )
