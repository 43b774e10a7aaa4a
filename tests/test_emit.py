"""End-to-end emission (mqtool.emit): every storage mode loads at ORT_ENABLE_ALL and agrees with
onnx.reference, fusion into integer kernels, weight-only paths, metadata, determinism, old opsets."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper, parser
from onnx.reference import ReferenceEvaluator

from mqtool.analysis import analyze
from mqtool.emit import convert, quantize_model, save_model_atomic, uniform_policy
from mqtool.errors import InputError
from mqtool.numerics import int_range
from mqtool.policy import Format, LayerBits, Policy
from passes.qparams import ActParams, QuantParams

from .conftest import ZOO, example_path
from .test_passes_qdq import cnn, mlp2d, mlp3d, ort_ops

INTEGER = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat"}
MODELS = {"cnn": (cnn, (3, 8, 8)), "mlp2d": (mlp2d, (16,)), "mlp3d": (mlp3d, (5, 16))}


def data_for(shape, n=64, seed=0):
    return {"x": np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)}


def session(m: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def mixed(names: list[str], acts: int = 8) -> Policy:
    return Policy({n: LayerBits([2, 3, 4, 5, 6, 7, 8][i % 7], acts) for i, n in enumerate(names)})


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("storage", ["int8", "packed", "auto"])
def test_every_storage_mode_loads_and_agrees_with_the_reference(name, storage):
    build, shape = MODELS[name]
    m = build()
    info = analyze(m)
    data = data_for(shape)
    for policy in (Policy.uniform(info.names, 4), mixed(info.names), mixed(info.names, acts=32)):
        q = quantize_model(m, policy, data=data, storage=storage, calibration="minmax")
        onnx.checker.check_model(q, full_check=True)
        x = data["x"][:16]
        ref = ReferenceEvaluator(q).run(None, {"x": x})[0]
        unfused = session(q, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
        fused = session(q).run(None, {"x": x})[0]
        # Same graph, same float math: equal, except where a value lands within float rounding of a
        # quantization boundary (summation order differs) and one step flips. ORT's integer kernels
        # requantize with their own rounding: measured within one step of a quantized output, <= 1% of the
        # output range otherwise.
        close = np.isclose(unfused, ref, rtol=1e-5, atol=1e-5)
        assert close.mean() >= 0.9 and np.abs(unfused - ref).max() <= 0.01 * np.abs(ref).max()
        assert np.abs(fused - ref).max() <= 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("bits", [8, 3])
def test_int8_storage_fuses_every_layer(name, bits):
    build, shape = MODELS[name]
    m = build()
    info = analyze(m)
    q = quantize_model(m, Policy.uniform(info.names, bits), data=data_for(shape), storage="int8")
    ops = ort_ops(q)
    assert sum(ops.count(k) for k in INTEGER) == len(info.layers), ops


def test_auto_never_slower_than_int8_or_packed():
    """Per layer, auto picks the int8 form where activations are quantized and MatMulNBits (INT4) for a
    weight-only MatMul / Gemm; int8 and packed give unfused or DQ + float forms there."""
    m = mlp3d()
    info = analyze(m)
    a, b = info.names
    pol = Policy({a: LayerBits(4, 8), b: LayerBits(3, 32)})
    data = data_for((5, 16))
    ops = {s: ort_ops(quantize_model(m, pol, data=data, storage=s)) for s in ("int8", "packed", "auto")}
    assert ops["auto"].count("MatMulNBits") == 1 and sum(ops["auto"].count(k) for k in INTEGER) == 1
    assert sum(ops["packed"].count(k) for k in INTEGER) == 0  # INT4 weights run as DQ + float


def test_int2_only_for_weight_only_layers_and_opset_25():
    m = mlp3d()
    info = analyze(m)
    data = data_for((5, 16))
    with_acts = quantize_model(m, Policy.uniform(info.names, 2), data=data, storage="packed")
    types = {i.data_type for i in with_acts.graph.initializer}
    assert onnx.TensorProto.INT2 not in types and onnx.TensorProto.INT4 in types
    assert with_acts.opset_import[0].version == 21
    weight_only = quantize_model(m, Policy.uniform(info.names, 2, 32), storage="packed")
    types = {i.data_type for i in weight_only.graph.initializer}
    assert onnx.TensorProto.INT2 in types and weight_only.opset_import[0].version == 25
    session(weight_only)  # INT2 next to activation Q/DQ would fail here


def test_metadata_determinism_and_the_callers_model():
    m = cnn()
    info = analyze(m)
    before = m.SerializeToString()
    pol = mixed(info.names)
    pol.meta = {"budget": 4.0}
    data = data_for((3, 8, 8))
    a = quantize_model(m, pol, data=data, storage="packed")
    b = quantize_model(m, pol, data=data, storage="packed")
    assert m.SerializeToString() == before
    assert a.SerializeToString() == b.SerializeToString()
    meta = {p.key: p.value for p in a.metadata_props}
    assert (
        meta["mqtool.version"]
        and meta["mqtool.storage"] == "packed"
        and meta["mqtool.calibration"] == "percentile"
    )
    # The recorded policy is the one emitted: the storage mode filled in every layer's format.
    recorded = Policy.from_json(json.loads(meta["mqtool.policy"])).layers
    assert {k: LayerBits(v.weight_bits, v.act_bits) for k, v in recorded.items()} == pol.layers
    assert {v.format for v in recorded.values()} == {Format.PACKED}


def test_missing_data_and_bad_storage_are_input_errors():
    m = cnn()
    info = analyze(m)
    with pytest.raises(InputError, match="calibration data is needed"):
        quantize_model(m, Policy.uniform(info.names, 8))
    with pytest.raises(InputError, match="storage 'fast'"):
        quantize_model(m, Policy.uniform(info.names, 8, 32), storage="fast")
    with pytest.raises(InputError, match="policy names layer 'nope'"):
        quantize_model(m, Policy({"nope": LayerBits(4, 8)}))
    bad = m.graph.initializer[0]
    arr = numpy_helper.to_array(bad).copy()
    arr.flat[0] = np.nan
    bad.CopyFrom(numpy_helper.from_array(arr, bad.name))
    with pytest.raises(InputError, match="NaN"):
        quantize_model(m, Policy.uniform(info.names, 8, 32))


def test_quant_params_activation_overrides_replace_calibration():
    m = mlp3d()
    info = analyze(m)
    pol = Policy.uniform(info.names, 6, 6)
    qp = QuantParams(
        activations={"n": ActParams(range=(-3.0, 3.0)), "h": ActParams(scale=0.05, zero_point=0)}
    )
    q = quantize_model(m, pol, qparams=qp)  # every planned tensor is given: no data needed
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    scales = sorted(float(v) for k, v in inits.items() if k.startswith("a") and k.endswith(".s"))
    assert scales == pytest.approx(sorted([6.0 / 63, 0.05]))
    with pytest.raises(InputError, match="zero_point"):
        quantize_model(m, pol, qparams=QuantParams(activations={"h": ActParams(scale=0.05, zero_point=99)}))


def test_opset_11_model_with_batchnorm_and_constant_weights():
    m = parser.parse_model(
        """<ir_version: 6, opset_import: ["" : 11]>
        g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {
          W = Constant <value = float[4, 3, 1, 1] {1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3}> ()
          a = Conv(x, W)
          b = BatchNormalization(a, g, be, mu, var)
          y = Relu(b)
        }"""
    )
    for k, v in {"g": [1, 2, 1, 2], "be": [0, 1, 0, 1], "mu": [0, 0, 1, 1], "var": [1, 1, 2, 2]}.items():
        m.graph.initializer.append(numpy_helper.from_array(np.array(v, np.float32), k))
    info = analyze(m)
    q = quantize_model(m, Policy.uniform(info.names, 4), data=data_for((3, 6, 6)), storage="packed")
    assert q.opset_import[0].version == 21 and q.ir_version >= 10
    onnx.checker.check_model(q, full_check=True)
    x = data_for((3, 6, 6), 4)["x"]
    ref = session(m).run(None, {"x": x})[0]  # onnx 1.23's reference BatchNormalization-9 disagrees with ORT
    got = session(q).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_zoo_model_weight_only():
    assert ZOO, "the onnx package ships its backend test models (light_*.onnx); none found"
    path = next(p for p in ZOO if "squeezenet" in p)
    from mqtool.model import load_model
    from mqtool.numerics import dequantize, quantize_weight
    from passes.pipeline import prepare

    # The light zoo's weights are all 0.02 (ConstantOfShape), which any scale quantizes exactly: give the
    # 26 layers random weights so that 4 bits lose something.
    m = prepare(load_model(path))
    info = analyze(m)
    rng = np.random.default_rng(0)
    inits = {i.name: i for i in m.graph.initializer}
    for layer in info.layers:
        fan_in = int(np.prod(layer.weight_shape[1:]))
        w = rng.normal(scale=np.sqrt(2 / fan_in), size=layer.weight_shape).astype(np.float32)
        inits[layer.weight].CopyFrom(numpy_helper.from_array(w, layer.weight))
    q = quantize_model(m, Policy.uniform(info.names, 4, 32), storage="packed")
    onnx.checker.check_model(q, full_check=True)
    assert q.opset_import[0].version == 21 and not {i.name for i in q.graph.input} & {
        i.name for i in q.graph.initializer
    }
    int4 = {i.name for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    packed = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4]
    assert len(packed) == len(info.layers)
    # Oracle: the float model with every weight replaced by numerics' own 4-bit quantization of it.
    oracle = onnx.ModelProto()
    oracle.CopyFrom(m)
    for init in oracle.graph.initializer:
        layer = next((x for x in info.layers if x.weight == init.name), None)
        if layer is not None:
            values, scale = quantize_weight(numpy_helper.to_array(init), 4, layer.channel_axis)
            fake = dequantize(values, scale, 0, layer.channel_axis)
            init.CopyFrom(numpy_helper.from_array(fake, init.name))
    x = {q.graph.input[0].name: rng.normal(size=(1, 3, 224, 224)).astype(np.float32)}
    y, expected, fp = (session(a).run(None, x)[0] for a in (q, oracle, m))
    assert y.shape == (1, 1000, 1, 1)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert np.abs(y - fp).max() > 0.05 * np.abs(fp).max()  # 4-bit weights did change the output


def test_convert_writes_atomically_and_refuses_the_input(tmp_path):
    m = cnn()
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    np.savez(tmp_path / "d.npz", **data_for((3, 8, 8)))
    out = tmp_path / "q.onnx"
    r = convert(str(src), str(out), uniform_policy(4), data=str(tmp_path / "d.npz"), storage="packed")
    assert r.quantized == 4 and r.bytes == os.path.getsize(out) and "4/4 layers" in r.summary()
    for bad in (src, tmp_path / "." / "m.onnx"):
        with pytest.raises(InputError, match="refusing to overwrite"):
            convert(str(src), str(bad), uniform_policy(4), data=str(tmp_path / "d.npz"))
    os.symlink(src, tmp_path / "link.onnx")
    with pytest.raises(InputError, match="refusing to overwrite"):
        convert(str(src), str(tmp_path / "link.onnx"), uniform_policy(4), data=str(tmp_path / "d.npz"))
    with pytest.raises(InputError):
        convert(str(src), str(tmp_path / "new.onnx"), uniform_policy(4))  # no data: nothing written
    assert sorted(os.listdir(tmp_path)) == ["d.npz", "link.onnx", "m.onnx", "q.onnx"]


def test_save_model_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    m = cnn()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        save_model_atomic(m, str(tmp_path / "x.onnx"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("example, max_drop", [("mnist_cnn", 0.003), ("mnist_vit", 0.01)])
def test_examples_w8a8_accuracy_and_fusion(tmp_path, example, max_drop):
    path = example_path(example)
    out = tmp_path / "q.onnx"
    convert(path, str(out), uniform_policy(8), data=example_path(example, "train.npz"), storage="int8")
    test = np.load(example_path(example, "test.npz"))
    acc = {}
    for p in (path, str(out)):
        s = ort.InferenceSession(p, providers=["CPUExecutionProvider"])
        logits = s.run(None, {s.get_inputs()[0].name: test["x"]})[0]
        acc[p] = float((logits.argmax(-1) == test["y"]).mean())
    assert acc[path] - acc[str(out)] <= max_drop
    q = onnx.load(out)
    ops = ort_ops(q)
    assert sum(ops.count(k) for k in INTEGER) == len(analyze(onnx.load(path)).layers)


def _weight_scale_loop(w, bits, axis):
    """The MSE scale search as first written (one fake_quantize per candidate over the whole weight): the
    reference the blocked in-place search in mqtool.numerics must reproduce bit for bit."""
    from mqtool.numerics import MIN_SCALE, fake_quantize

    qmin, qmax = int_range(bits, signed=True)
    rows = np.moveaxis(np.asarray(w, np.float32), axis, 0).reshape(w.shape[axis], -1)
    amax = np.max(np.abs(rows), axis=1) if rows.size else np.zeros(rows.shape[0], np.float32)
    base = (amax / np.float32(-qmin)).astype(np.float32)
    cs = np.unique(np.concatenate([np.linspace(0.15, 1.0, 40), [-qmin / qmax]])).astype(np.float32)
    best, best_err = base.copy(), np.full(rows.shape[0], np.inf)
    for c in cs:
        s = np.maximum(base * c, MIN_SCALE)[:, None]
        err = ((fake_quantize(rows, s, 0, qmin, qmax) - rows) ** 2).sum(axis=1, dtype=np.float64)
        better = err < best_err
        best, best_err = np.where(better, s[:, 0], best), np.where(better, err, best_err)
    return np.where(amax > 0, np.maximum(best, MIN_SCALE), np.float32(1.0)).astype(np.float32)


@pytest.mark.parametrize(
    "shape, axis",
    # Rows longer than numpy's 8192-element reduction buffer, several blocks of channels, 1-D, empty rows.
    [((64, 3, 3, 3), 0), ((16, 20000), 0), ((300, 700), 0), ((300, 700), 1), ((5,), 0), ((4, 0), 0)],
)
def test_weight_scale_equals_the_per_candidate_loop(shape, axis, monkeypatch):
    from mqtool import numerics

    monkeypatch.setattr(numerics, "_MSE_BLOCK", 1000)  # many blocks even on small weights
    rng = np.random.default_rng(7)
    for w in (
        rng.normal(size=shape) * 0.1,
        rng.laplace(size=shape) ** 3,  # heavy tails: clipping the top values wins
        np.where(rng.random(shape) < 0.5, 0.0, rng.normal(size=shape) * 1e-12),  # zero and tiny channels
        np.full(shape, 0.02),  # the zoo models' constant weights: many exact ties between candidates
    ):
        w = w.astype(np.float32)
        for bits in (2, 3, 4, 5, 8):
            got = numerics.weight_scale(w, bits, axis)
            assert got.tobytes() == _weight_scale_loop(w, bits, axis).tobytes(), (bits, shape)
