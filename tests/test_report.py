"""`mqtool.report`: bits recovered from the QDQ graph (checked against the recorded policy), storage,
bytes and totals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mqtool.analysis import analyze
from mqtool.emit import quantize_model
from mqtool.policy import LayerBits, Policy, average_weight_bits, bitops_ratio
from mqtool.report import plot_report, report
from passes.qparams import LayerParams, QuantParams

from .test_passes_qdq import cnn, mlp3d

DATA = {"x": np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype(np.float32)}
KEYS_LAYER = {"name", "op_type", "params", "macs", "weight_bits", "act_bits", "storage", "weight_bytes"}
KEYS_TOTAL = {"params", "avg_weight_bits", "weight_bytes", "fp32_weight_bytes", "bitops_ratio"}


@pytest.mark.parametrize("storage", ["int8", "packed", "auto"])
def test_report_reads_back_every_width(storage):
    m = cnn()
    info = analyze(m)
    # Every width 2..8 over the two runs (2, 3, 4 + a float layer; then 5, 6, 7, 8).
    for shift in (0, 3):
        bits = {n: [2, 3, 4, 5, 6, 7, 8][(i + shift) % 7] for i, n in enumerate(info.names)}
        pol = Policy({n: LayerBits(b, 8) for n, b in bits.items() if n != info.names[-1] or shift})
        rep = report(quantize_model(m, pol, data=DATA, storage=storage))
        got = {r.name: r.weight_bits for r in rep.layers}
        want = {n: pol.get(n).weight_bits for n in info.names}
        assert got == want
        assert [r.name for r in rep.layers] == info.names
        assert rep.totals["avg_weight_bits"] == pytest.approx(average_weight_bits(pol, info.layers))
        doc = json.loads(json.dumps(rep.to_json()))
        assert all(KEYS_LAYER <= set(r) for r in doc["layers"]) and KEYS_TOTAL <= set(doc["totals"])


def test_narrow_integer_range_still_reports_the_policy_width():
    """A 3-bit layer whose integers only span [-2, 1] (2-bit range) reports 3, from the recorded policy;
    without the metadata the graph alone gives the lower bound 2; contradicting metadata loses."""
    m = cnn()
    info = analyze(m)
    layer = info.layers[1]
    tiny = np.full(layer.weight_shape, 0.01, np.float32)
    tiny.flat[::2] = -0.02
    qp = QuantParams(
        layers={layer.name: LayerParams(weight=tiny, scale=np.full(layer.channels, 0.01, np.float32))}
    )
    pol = Policy.uniform(info.names, 3)
    q = quantize_model(m, pol, data=DATA, qparams=qp, storage="int8")
    assert {r.name: r.weight_bits for r in report(q).layers}[layer.name] == 3
    stripped = onnx.ModelProto()
    stripped.CopyFrom(q)
    del stripped.metadata_props[:]
    assert {r.name: r.weight_bits for r in report(stripped).layers}[layer.name] == 2
    for p in q.metadata_props:
        if p.key == "mqtool.policy":
            doc = json.loads(p.value)
            doc["layers"][info.names[0]]["weight_bits"] = 2  # a lie: the integers need 3 bits
            p.value = json.dumps(doc)
    assert {r.name: r.weight_bits for r in report(q).layers}[info.names[0]] == 3


def test_act_bits_storage_and_bytes():
    m = mlp3d()
    info = analyze(m)
    a, b = info.names
    pol = Policy({a: LayerBits(4, 5), b: LayerBits(2, 32)})
    data = {"x": np.random.default_rng(0).normal(size=(32, 5, 16)).astype(np.float32)}
    rep = report(quantize_model(m, pol, data=data, storage="packed"))
    ra, rb = rep.layers
    assert (ra.weight_bits, ra.act_bits, ra.storage) == (4, 5, "int4")
    assert (rb.weight_bits, rb.act_bits, rb.storage) == (2, 32, "int2")
    assert ra.weight_bytes == 16 * 32 // 2 and rb.weight_bytes == 32 * 16 // 4
    t = rep.totals
    assert t["fp32_weight_bytes"] == 4 * (512 + 512) and t["weight_bytes"] == 256 + 128
    assert t["bitops_ratio"] == pytest.approx(bitops_ratio(pol, info.layers))
    assert t["true_bits_bytes"] <= t["ideal_container_bytes"] <= t["file_bytes"]
    float_model = report(m)
    assert {r.storage for r in float_model.layers} == {"float"} and float_model.totals[
        "avg_weight_bits"
    ] == 32


def test_plot_writes_a_png(tmp_path):
    import matplotlib  # noqa: F401  (a test extra; the plot must work)

    m = cnn()
    info = analyze(m)
    rep = report(quantize_model(m, Policy.uniform(info.names, 4, 32), storage="int8"))
    plot_report(rep, str(tmp_path / "bits.png"))
    assert (tmp_path / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "avg 4.000 weight bits" in rep.table()


def test_report_on_a_file_counts_file_bytes(tmp_path):
    m = cnn()
    info = analyze(m)
    q = quantize_model(m, Policy.uniform(info.names, 4, 32), storage="packed")
    onnx.save(q, tmp_path / "q.onnx")
    rep = report(tmp_path / "q.onnx")
    assert rep.totals["file_bytes"] == (tmp_path / "q.onnx").stat().st_size
    assert rep.model == str(tmp_path / "q.onnx")
    assert all(numpy_helper.to_array(i).size for i in q.graph.initializer)
