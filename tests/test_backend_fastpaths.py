"""The backend's inference shortcuts compute what the plain path computes: NHWC convolutions, a Relu folded
into the activation quantizer that follows it, and MetaQuantNet's batched heads."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mqtool.analysis import analyze
from mqtool.backend import ActFakeQuant, to_torch
from mqtool.search.metaquantnet import MetaQuantNet


def _cnn(cin: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, cin, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dw"),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w1, w2],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_channels_last_convolutions_match_and_stay_nhwc() -> None:
    for cin in (1, 3):
        m = _cnn(cin)
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((4, cin, 10, 10)).astype(np.float32))
        plain, nhwc = to_torch(m), to_torch(m, channels_last=True)
        with torch.no_grad():
            ref = plain(x)
            got = nhwc.run({"x": x}, ["c1", "y"])
        torch.testing.assert_close(got["y"], ref, rtol=1e-5, atol=1e-5)
        # the one-channel input too: NHWC from the first convolution on
        assert got["c1"].is_contiguous(memory_format=torch.channels_last)
        assert ref.is_contiguous()


def test_relu_folded_into_a_zero_point_0_quantizer_gives_the_same_values() -> None:
    m = _cnn()
    net = to_torch(m, analyze(m))
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((4, 1, 10, 10)).astype(np.float32))
    net.set_act_quant("r1", ActFakeQuant(8, 0.05, 0))  # zero point 0: the Relu is skipped at inference
    assert net.act_quantizers["r1"].clamps_at_zero()
    with torch.no_grad():
        fast = net(x)
    ref = net(x).detach()  # with autograd on, the Relu runs
    assert torch.equal(fast, ref)
    # a quantizer that reaches below 0 keeps the Relu: no negative value gets through
    net.set_act_quant("r1", ActFakeQuant(8, 0.05, 100))
    assert not net.act_quantizers["r1"].clamps_at_zero()
    with torch.no_grad():
        r1 = net.run({"x": x}, ["r1"])["r1"]
    assert float(r1.min()) >= 0.0


def test_batched_heads_equal_the_per_block_heads() -> None:
    torch.manual_seed(0)
    layers = {
        "a": (torch.randn(16, 1, 3, 3), 0),
        "b": (torch.randn(32, 16, 1, 1), 0),
        "c": (torch.randn(80, 10), 1),
    }
    mqn = MetaQuantNet(layers, [2, 3, 4, 8], hidden=8)
    for p in mqn.parameters():
        p.data.normal_(0, 0.1)
    for bits in ([2, 3, 8], [4, 4, 4], [8, 2, 32]):
        ref = mqn.generate(bits)  # autograd on: per-block path
        with torch.no_grad():
            got = mqn.generate(bits)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k].detach(), rtol=1e-5, atol=1e-6)
    # training changes the parameters: the stacked copy follows
    with torch.no_grad():
        mqn.generate([3, 3, 3])
        for p in mqn.parameters():
            p.add_(0.05)
        got = mqn.generate([3, 3, 3])
    ref = mqn.generate([3, 3, 3])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k].detach(), rtol=1e-5, atol=1e-6)
