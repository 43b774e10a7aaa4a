"""Format `dynamic` (com.microsoft.DynamicQuantizeMatMul): emission, what ORT computes (against NumPy),
the simulation's `DynamicActFakeQuant` against ORT, report, latency keys and the policy's rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from mqtool.analysis import analyze
from mqtool.backend import to_torch
from mqtool.backend.fake_quant import DynamicActFakeQuant
from mqtool.emit import quantize_model
from mqtool.errors import InputError
from mqtool.latency import choice_key
from mqtool.policy import FLOAT, Format, LayerBits, Policy
from mqtool.report import report
from passes.qdq_plan import allowed_formats, format_bytes

from .test_passes_qdq import build, cnn, ort_ops, w


def mlp() -> onnx.ModelProto:
    """MatMul + bias -> Relu -> Gemm (transB) on [N, T, K] and [N, K] inputs: a transformer's two kinds."""
    return build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 8] y) {
          m1 = MatMul(x, W1)
          a1 = Add(m1, b1)
          h = Relu(a1)
          y = Gemm <transB = 1> (h, W2, b2)
        }""",
        {"W1": w(16, 32), "b1": w(32), "W2": w(8, 32), "b2": w(8)},
    )


def dynamic_quantize(x: np.ndarray) -> np.ndarray:
    """ONNX DynamicQuantizeLinear then dequantization, in NumPy: uint8, range over the whole tensor and 0."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = np.float32((hi - lo) / 255.0)
    z = np.clip(np.rint(-lo / s), 0, 255)
    return ((np.clip(np.rint(x / s) + z, 0, 255) - z) * s).astype(np.float32)


def run_ort(q: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


def emitted_weight(q: onnx.ModelProto, layer: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(int8 weight [K, N], per-column scale, distinct values) of a DynamicQuantizeMatMul layer."""
    node = next(n for n in q.graph.node if n.name == layer)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    assert node.op_type == "DynamicQuantizeMatMul" and node.domain == "com.microsoft"
    assert not inits[node.input[3]].any()  # zero points 0: symmetric weights
    return inits[node.input[1]], inits[node.input[2]], len(np.unique(inits[node.input[1]]))


def test_dynamic_layers_compute_what_numpy_says_and_report_reads_them_back():
    m = mlp()
    a, b = analyze(m).names
    pol = Policy({a: LayerBits(4, FLOAT, Format.DYNAMIC), b: LayerBits(8, FLOAT, Format.DYNAMIC)})
    x = np.random.default_rng(1).normal(size=(12, 16)).astype(np.float32)
    q = quantize_model(m, pol, data={"x": x})
    onnx.checker.check_model(q, full_check=True)
    assert ort_ops(q).count("DynamicQuantizeMatMul") == 2
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in q.graph.node)
    qa, sa, _ = emitted_weight(q, a)
    qb, sb, _ = emitted_weight(q, b)
    assert qa.dtype == np.int8 and qa.min() >= -8 and qa.max() <= 7  # 4 bits in an INT8 container
    assert qb.min() >= -64 and qb.max() <= 63  # 8 bits stored at 7 (u8 x s8 products, reduce range)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    b1 = next(v for k, v in inits.items() if v.shape == (32,))
    b2 = next(v for k, v in inits.items() if v.shape == (8,))
    h = np.maximum(dynamic_quantize(x) @ (qa * sa) + b1, 0)
    want = dynamic_quantize(h) @ (qb * sb) + b2
    got = run_ort(q, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    rep = {r.name: r for r in report(q).layers}
    assert {n: (r.format, r.weight_bits, r.act_bits) for n, r in rep.items()} == {
        a: ("dynamic", 4, FLOAT),
        b: ("dynamic", 8, FLOAT),
    }


def test_the_simulation_quantizes_a_dynamic_layers_input_as_ort_does():
    m = mlp()
    a, b = analyze(m).names
    pol = Policy({a: LayerBits(6, FLOAT, Format.DYNAMIC), b: LayerBits(5, FLOAT, Format.DYNAMIC)})
    x = np.random.default_rng(2).normal(size=(20, 16)).astype(np.float32)
    q = quantize_model(m, pol, data={"x": x})
    ort_y = run_ort(q, x)
    net = to_torch(m, analyze(m))
    qa, sa, _ = emitted_weight(q, a)
    qb, sb, _ = emitted_weight(q, b)
    weights = {a: torch.from_numpy(qa * sa), b: torch.from_numpy(np.ascontiguousarray((qb * sb).T))}
    with torch.no_grad(), net.override_weights(weights):
        plain = net(torch.from_numpy(x)).numpy()
        net.set_dynamic_inputs([a, b])
        assert all(isinstance(net.layers[n].input_quant, DynamicActFakeQuant) for n in (a, b))
        simulated = net(torch.from_numpy(x)).numpy()
        net.set_dynamic_inputs([])
        assert net(torch.from_numpy(x)).numpy() == pytest.approx(plain)
    np.testing.assert_allclose(simulated, ort_y, rtol=1e-4, atol=1e-4)
    # the run-time input quantization is visible: without it the simulation is further from ORT
    assert np.abs(plain - ort_y).max() > 10 * np.abs(simulated - ort_y).max()


def test_dynamic_act_fake_quant_passes_gradients_straight_through():
    x = torch.linspace(-2.0, 3.0, 50, requires_grad=True)
    y = DynamicActFakeQuant()(x)
    np.testing.assert_allclose(y.detach().numpy(), dynamic_quantize(x.detach().numpy()), atol=1e-6)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # the range is the tensor's own: nothing is clipped


def test_where_dynamic_is_offered_and_what_it_costs():
    m = mlp()
    mm, gemm = analyze(m).layers
    assert Format.DYNAMIC in allowed_formats(mm) and Format.DYNAMIC in allowed_formats(gemm)
    conv = analyze(cnn()).layers[0]
    assert Format.DYNAMIC not in allowed_formats(conv)
    with pytest.raises(InputError, match="format 'dynamic' is not available"):
        quantize_model(cnn(), Policy({conv.name: LayerBits(8, FLOAT, Format.DYNAMIC)}))
    # speed does not depend on the bits inside the INT8 container: one latency column
    assert choice_key(mm, 4, Format.DYNAMIC) == choice_key(mm, 8, Format.DYNAMIC) == "dynamic"
    # bytes: the int8 container at any width
    assert format_bytes(mm, 4, Format.DYNAMIC) == format_bytes(mm, 8, Format.DYNAMIC)
    with pytest.raises(ValueError, match="act_bits must be 32"):
        LayerBits(4, 8, Format.DYNAMIC)


def test_a_transformer_shaped_input_of_three_axes():
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 5, 16] x) => (float[N, 5, 24] y) { y = MatMul(x, W) }""",
        {"W": w(16, 24)},
    )
    (name,) = analyze(m).names
    x = np.random.default_rng(3).normal(size=(3, 5, 16)).astype(np.float32)
    q = quantize_model(m, Policy({name: LayerBits(3, FLOAT, Format.DYNAMIC)}), data={"x": x})
    onnx.checker.check_model(q, full_check=True)
    qw, s, distinct = emitted_weight(q, name)
    assert distinct <= 8
    got = run_ort(q, x)
    np.testing.assert_allclose(got, dynamic_quantize(x) @ (qw * s), rtol=1e-4, atol=1e-4)


def test_the_search_offers_dynamic_under_latency_budgets_only():
    # under a size budget `packed` takes no more bytes and keeps the input float: dynamic only widens the GA
    from types import SimpleNamespace

    from mqtool.search import SearchConfig
    from mqtool.search.costs import FORMAT_CODES, BudgetCosts

    m = mlp()
    costs = BudgetCosts(SimpleNamespace(model=m, info=analyze(m), cfg=SearchConfig()))
    code = FORMAT_CODES[Format.DYNAMIC]
    for layer_opts in costs.format_options("latency"):
        assert (code, FLOAT) in layer_opts
    for layer_opts in costs.format_options("size"):
        assert code not in [c for c, _ in layer_opts]
        assert (FORMAT_CODES[Format.PACKED], FLOAT) in layer_opts
