"""`mqtool.validate`: accuracy/agreement, SQNR and cosine per output, kernels ORT chose, per-layer SQNR
(structural pairing, also on packed models with compacted names), latency."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, parser
from onnx.reference import ReferenceEvaluator

from mqtool.analysis import analyze
from mqtool.emit import quantize_model
from mqtool.errors import InputError
from mqtool.policy import Policy
from mqtool.validate import validate

from .test_passes_qdq import cnn

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    m = cnn()
    onnx.save(m, d / "fp.onnx")
    x = RNG.normal(size=(40, 3, 8, 8)).astype(np.float32)
    np.savez(d / "data.npz", x=x, y=RNG.integers(0, 4, 40))
    info = analyze(m)
    for storage in ("int8", "packed"):
        q = quantize_model(m, Policy.uniform(info.names, 8), data={"x": x}, storage=storage)
        onnx.save(q, d / f"{storage}.onnx")
    return d, info


def test_validate_classifier_int8(files):
    d, info = files
    r = validate(d / "int8.onnx", d / "fp.onnx", d / "data.npz", per_layer=True, batch_size=16)
    assert r.samples == 40 and 0 <= r.reference_top1 <= 1 and r.top1_agreement >= 0.9
    (out,) = r.outputs
    assert out.name == "y" and out.sqnr_db > 25 and out.cosine > 0.99
    assert [layer.name for layer in r.layers] == info.names
    assert {layer.path for layer in r.layers} == {"integer"}
    assert all(layer.sqnr_db > 25 for layer in r.layers)
    assert [lat.batch for lat in r.latency] == [1, 32] and all(lat.quantized_ms > 0 for lat in r.latency)
    doc = r.to_json()
    assert doc["integer_layers"] == len(info.names) and doc["float_layers"] == []
    assert "top-1 agreement" in r.text()


def test_validate_packed_compacted_names_per_layer(files):
    d, info = files
    r = validate(d / "packed.onnx", d / "fp.onnx", d / "data.npz", per_layer=True, latency=False)
    # 8-bit weights with quantized inputs stay UINT8 in packed storage: still integer kernels.
    assert {layer.path for layer in r.layers} == {"integer"}
    assert all(layer.sqnr_db is not None and layer.sqnr_db > 25 for layer in r.layers)
    assert r.latency == []


def test_multi_output_regression_model(tmp_path):
    m = parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 6] x) => (float[N, 3, 2] y, float[N] z) {
          h = MatMul(x, W)
          y = Reshape(h, shape)
          z = ReduceSum <keepdims = 0> (h, axes)
        }"""
    )
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(RNG.normal(size=(6, 6)).astype(np.float32), "W"),
            numpy_helper.from_array(np.array([-1, 3, 2]), "shape"),
            numpy_helper.from_array(np.array([1]), "axes"),
        ]
    )
    onnx.save(m, tmp_path / "fp.onnx")
    x = RNG.normal(size=(20, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    q = quantize_model(m, Policy.uniform(analyze(m).names, 6), data={"x": x})
    onnx.save(q, tmp_path / "q.onnx")
    r = validate(tmp_path / "q.onnx", tmp_path / "fp.onnx", tmp_path / "d.npz", latency=False, per_layer=True)
    assert r.top1_agreement is None and r.reference_top1 is None
    assert [o.name for o in r.outputs] == ["y", "z"]
    # Each output's SQNR and cosine are those of the two models run by onnx.reference, over all samples.
    ref, got = ReferenceEvaluator(m).run(None, {"x": x}), ReferenceEvaluator(q).run(None, {"x": x})
    for o, a, b in zip(r.outputs, ref, got):
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        assert o.sqnr_db == pytest.approx(10 * math.log10(a @ a / ((a - b) @ (a - b))), abs=0.01)
        assert o.cosine == pytest.approx(a @ b / math.sqrt((a @ a) * (b @ b)), abs=1e-6)
        # 6-bit weights and activations on a 6x6 MatMul: ~6 dB per bit, minus the sum in z (35 / 33 dB).
        assert 28 < o.sqnr_db < 45
    # y is the layer's output reshaped: the layer's SQNR is y's.
    (layer,) = r.layers
    assert layer.sqnr_db == pytest.approx(r.outputs[0].sqnr_db, rel=1e-9)


def test_mismatched_models_are_input_errors(files, tmp_path):
    d, _ = files
    other = parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]> g (float[N, 3, 8, 8] z) => (float[N, 3, 8, 8] y) { y = Relu(z) }"""
    )
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.raises(InputError, match="inputs"):
        validate(tmp_path / "other.onnx", d / "fp.onnx", d / "data.npz")
