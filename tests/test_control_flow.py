"""Layers inside control flow (If branches, Loop bodies): found by `analyze` with unique names and their
subgraph, shown by `inspect`, and run by the PyTorch backend like ONNX Runtime runs them, as trainable
`QuantLayer`s."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mqtool.analysis import analyze
from mqtool.backend import ActFakeQuant, WeightFakeQuant, to_torch
from mqtool.cli import cli
from mqtool.errors import InputError
from mqtool.model import find_scope

R = np.random.default_rng(0)
FLOAT = TensorProto.FLOAT


def _w(*shape: int) -> np.ndarray:
    return R.normal(0, 0.5, shape).astype(np.float32)


def _branch(name: str, nodes, out: str, inits: dict) -> onnx.GraphProto:
    return helper.make_graph(
        nodes,
        name,
        [],
        [helper.make_empty_tensor_value_info(out)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )


def if_model() -> onnx.ModelProto:
    """y = If(sr == 16000): conv16 -> relu -> (nested If on the batch size: fc or fc2)  else: conv8 -> relu.

    The condition comes from an int64 scalar input as in silero_vad; the branches read the outer `x`; both
    top-level branches call their conv "conv" (one must be renamed); one weight is an outer initializer.
    """
    inner_then = _branch(
        "inner_then",
        [
            helper.make_node("Flatten", ["r16"], ["f1"]),
            helper.make_node("Gemm", ["f1", "Wfc"], ["it"], transB=1, name="fc"),
        ],
        "it",
        {},
    )
    inner_else = _branch(
        "inner_else",
        [
            helper.make_node("Flatten", ["r16"], ["f2"]),
            helper.make_node("MatMul", ["f2", "Wfc2"], ["ie"], name="fc2"),
        ],
        "ie",
        {"Wfc2": _w(4 * 6, 3)},
    )
    then = _branch(
        "then",
        [
            helper.make_node(
                "Conv", ["x", "W16", "B16"], ["c16"], kernel_shape=[3], pads=[1, 1], name="conv"
            ),
            helper.make_node("Relu", ["c16"], ["r16"]),
            helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Gather", ["xs", "zero"], ["n"], axis=0),
            helper.make_node("Equal", ["n", "one"], ["single"]),
            helper.make_node(
                "If", ["single"], ["yt"], then_branch=inner_then, else_branch=inner_else, name="inner"
            ),
        ],
        "yt",
        {"W16": _w(4, 2, 3), "B16": _w(4), "zero": np.int64(0), "one": np.int64(1)},
    )
    other = _branch(
        "else",
        [
            helper.make_node("Conv", ["x", "W8"], ["c8"], kernel_shape=[1], name="conv"),
            helper.make_node("Relu", ["c8"], ["r8"]),
            helper.make_node("Flatten", ["r8"], ["f8"]),
            helper.make_node("Gemm", ["f8", "Wfc8"], ["ye"], transB=1),
        ],
        "ye",
        {"W8": _w(4, 2, 1), "Wfc8": _w(3, 4 * 6)},
    )
    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["sr", "k16"], ["is16"], name="eq"),
            helper.make_node("If", ["is16"], ["y"], then_branch=then, else_branch=other, name="route"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", FLOAT, ["N", 2, 6]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.int64(16000), "k16"), numpy_helper.from_array(_w(3, 4 * 6), "Wfc")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _ort(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_analyze_finds_layers_in_branches_with_unique_names_and_scopes():
    m = if_model()
    info = analyze(m)
    got = {layer.name: (layer.op_type, layer.subgraph) for layer in info.layers}
    route_then, route_else = ["route", "then_branch"], ["route", "else_branch"]
    assert got == {
        "conv": ("Conv", [route_else]),
        "Gemm_3": ("Gemm", [route_else]),
        "route/then_branch/conv": ("Conv", [route_then]),
        "fc2": ("MatMul", [route_then, ["inner", "else_branch"]]),
        "fc": ("Gemm", [route_then, ["inner", "then_branch"]]),
    }
    # The scope leads to the node: what the emitter needs to put Q/DQ inside the body.
    for layer in info.layers:
        body = find_scope(m.graph, layer.subgraph)
        assert layer.weight in {i.name for i in body.initializer} | {i.name for i in m.graph.initializer}
    assert info.layer("fc").weight == "Wfc" and info.layer("fc").macs == 3 * 24  # an outer-scope weight
    assert info.totals.layers == 5 and info.totals.params == sum(layer.params for layer in info.layers)
    assert [layer.name for layer in analyze(m).layers] == list(got)  # stable


def test_inspect_lists_subgraph_layers():
    m = if_model()
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        onnx.save(m, path)
        r = CliRunner().invoke(cli, ["inspect", path, "--json"])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.output)
        assert {(x["name"], tuple(map(tuple, x["subgraph"]))) for x in doc["layers"]} >= {
            ("fc", (("route", "then_branch"), ("inner", "then_branch")))
        }
        r = CliRunner().invoke(cli, ["inspect", path])
        assert (
            r.exit_code == 0 and "route/then_branch/conv" in r.output and "5 quantizable layers" in r.output
        )


@pytest.mark.parametrize("sr, batch", [(16000, 1), (16000, 3), (8000, 2)])
def test_if_runs_the_taken_branch_like_onnx_runtime(sr, batch):
    m = if_model()
    net = to_torch(m)
    assert set(net.layers) == {layer.name for layer in analyze(m).layers}
    x = R.normal(size=(batch, 2, 6)).astype(np.float32)
    feeds = {"x": x, "sr": np.array(sr, np.int64)}
    ref = _ort(m, feeds)[0]
    with torch.no_grad():
        got = net(torch.from_numpy(x), torch.tensor(sr))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
    # Intermediates inside the taken branch can be read; those of the other branch are None.
    with torch.no_grad():
        out = net.run(feeds, ["r16", "r8", "y"])
    assert (out["r16"] is not None) == (sr == 16000) and (out["r8"] is None) == (sr == 16000)


def test_branch_layers_train_and_fake_quantize():
    m = if_model()
    net = to_torch(m)
    x = torch.from_numpy(R.normal(size=(2, 2, 6)).astype(np.float32))
    sr = torch.tensor(16000)
    base = net(x, sr).detach()
    loss = net(x, sr).square().sum()
    loss.backward()
    # Gradients reach the taken branches' layers (the nested else-branch at batch 2), not the others.
    assert net.layers["route/then_branch/conv"].weight.grad.abs().sum() > 0
    assert net.layers["fc2"].weight.grad.abs().sum() > 0
    assert net.layers["fc"].weight.grad is None and net.layers["conv"].weight.grad is None
    # Weight and activation quantizers on tensors inside a branch act as in the main graph.
    layer = net.layers["fc2"]
    layer.weight_quant = WeightFakeQuant.from_weight(layer.weight, bits=2, channel_axis=layer.channel_axis)
    with torch.no_grad():
        w2 = net(x, sr)
    assert not torch.allclose(w2, base)
    layer.weight_quant = None
    net.set_act_quant("r16", ActFakeQuant.from_range(0.0, 0.5, bits=2))
    with torch.no_grad():
        a2 = net(x, sr)
        r16 = net.run({"x": x, "sr": sr}, ["r16"])["r16"]
    assert not torch.allclose(a2, base) and len(torch.unique(r16)) <= 4
    net.clear_act_quant()
    with torch.no_grad():
        torch.testing.assert_close(net(x, sr), base)


def loop_model() -> onnx.ModelProto:
    """A Loop (trip count from the input) whose body holds a MatMul layer: h = tanh(h @ W + x_i) over the
    rows of x, scanning h out; the loop stops early when cond (the input) is false."""
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["x", "i"], ["xi"], axis=0),
            helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="cell"),
            helper.make_node("Add", ["hw", "xi"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", FLOAT, [1, 4]),
            helper.make_tensor_value_info("h_out", FLOAT, [1, 4]),
        ],
        [numpy_helper.from_array(_w(4, 4), "W")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Gather", ["xs", "zero"], ["steps"], axis=0),
            helper.make_node("Loop", ["steps", "go", "h0"], ["h", "hs"], body=body, name="loop"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", FLOAT, ["T", 1, 4]),
            helper.make_tensor_value_info("h0", FLOAT, [1, 4]),
            helper.make_tensor_value_info("go", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("h", FLOAT, [1, 4]),
            helper.make_tensor_value_info("hs", FLOAT, ["T", 1, 4]),
        ],
        [numpy_helper.from_array(np.int64(0), "zero")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def test_loop_body_layers_run_like_onnx_runtime():
    m = loop_model()
    info = analyze(m)
    assert [(layer.name, layer.subgraph) for layer in info.layers] == [("cell", [["loop", "body"]])]
    net = to_torch(m)
    for steps in (1, 5):
        feeds = {"x": R.normal(size=(steps, 1, 4)).astype(np.float32), "h0": _w(1, 4), "go": np.array(True)}
        ref = _ort(m, feeds)
        got = net(*[torch.from_numpy(feeds[k]) for k in ("x", "h0", "go")])
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g.detach().numpy(), r, rtol=1e-5, atol=1e-6)
    got[0].sum().backward()  # through every iteration to the shared weight
    assert net.layers["cell"].weight.grad.abs().sum() > 0


def test_scan_is_named_as_unsupported():
    body = helper.make_graph(
        [
            helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
            helper.make_node("Identity", ["s_out"], ["y_t"]),
        ],
        "body",
        [helper.make_tensor_value_info("s_in", FLOAT, [2]), helper.make_tensor_value_info("x_t", FLOAT, [2])],
        [
            helper.make_tensor_value_info("s_out", FLOAT, [2]),
            helper.make_tensor_value_info("y_t", FLOAT, [2]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "x"], ["s", "ys"], body=body, num_scan_inputs=1, name="scan")],
        "g",
        [helper.make_tensor_value_info("s0", FLOAT, [2]), helper.make_tensor_value_info("x", FLOAT, [3, 2])],
        [helper.make_tensor_value_info("s", FLOAT, [2]), helper.make_tensor_value_info("ys", FLOAT, [3, 2])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError, match=r"unsupported ops for the PyTorch backend: Scan \(nodes: scan\)"):
        to_torch(m)
