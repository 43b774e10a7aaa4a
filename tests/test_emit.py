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
from mqtool.policy import LayerBits, Policy
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
    assert Policy.from_json(json.loads(meta["mqtool.policy"])).layers == pol.layers


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


@pytest.mark.skipif(not ZOO, reason="onnx zoo test models not installed")
def test_zoo_model_weight_only():
    path = next(p for p in ZOO if "squeezenet" in p)
    from mqtool.model import load_model

    m = load_model(path)
    info = analyze(m)
    q = quantize_model(m, Policy.uniform(info.names, 4, 32), storage="packed")
    onnx.checker.check_model(q)
    assert q.opset_import[0].version == 21 and not {i.name for i in q.graph.input} & {
        i.name for i in q.graph.initializer
    }
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    assert session(q).run(None, {q.graph.input[0].name: x})[0].shape == (1, 1000, 1, 1)


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
    if not os.path.exists(path):
        pytest.skip(f"{example} not built")
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


# sha256 of each example's model.onnx when the digests below were recorded, and of the emitted models (with
# the mqtool.version entry removed) per (activation bits, storage). Recorded before the emit speed-ups: a
# faster pipeline must emit the same bytes. If an example is retrained the digests no longer apply (skip);
# print new ones with `python -c "from tests.test_emit import _example_digests as d; print(d('mnist_cnn'))"`.
_EXAMPLE_DIGESTS = {
    "mnist_cnn": (
        "5387736f5c77ffc95cee954660f511817eed236c4528c001b0818334e01de1dd",
        {
            (8, "int8"): "891f390ddf4df7e37e315ca4eef76205f35179da4649a136b04ad5cf61961805",
            (8, "packed"): "f3f11a809d21e33cdb83a740c4579bbc57d8c298fcb0b74beb241d1cf7ce798c",
            (8, "auto"): "e937ef620d18b0d4cbc4a0b57ef382d53c7f1f1f329f8c25a0f6f8e69e294a61",
            (4, "int8"): "cbd0ef992ea7b3d97a1c871127b65ab56a67bc63f5300346b24d2c42ea1895e2",
            (4, "packed"): "543f46f20e07045cad58293eb1889deae031d72bd660902ea6885a5f2584617d",
            (4, "auto"): "b55bc8872af446a35a04bcddb879ffe1bcee7718fecf5fcc63641d404974ed5a",
            (32, "int8"): "ae7dc8fc4ed1ae297016d8b4839da7d1386421e4de1416622bd68aa159aa8863",
            (32, "packed"): "76d3f9f7de785c4d6187ada69c61b8d8d55f8d1ef2d20ddff4f81a8db33777e9",
            (32, "auto"): "53290f5d109e19a9a192de32788f774a936daf0a35dbffaff1197b778de93b10",
        },
    ),
    "mnist_vit": (
        "bf59aef08799c3f67d41993dada94c088f6251035d21b92ef548c66af94b8c6b",
        {
            (8, "int8"): "f3e5d8586fdcea7b3836260c15cf939ddc41b43a47d779ef3a55ccb2ade50570",
            (8, "packed"): "f122cbbe8a8d4ba4e256b41f517236965ab2d2d87127c1de06b7a785ed9c5d0c",
            (8, "auto"): "d45d07a6e4fe8c19c4258527d96d3fff652f0d24669ca6535cade6ea66cbaee8",
            (4, "int8"): "648347298f9561de7a4443d43074647ac07a041e619aa649236fb6cb8b7f58b7",
            (4, "packed"): "feae09dace6a8a5cc7ea647f12968135c42df5393c7d852fd517ceb308587e87",
            (4, "auto"): "948b7ffe92f01ef8ec2a5aeb8e9f2f9475c04552dd5363dc628cf4565f5f5569",
            (32, "int8"): "7d06d7e144dd4a6f16f5de19b6e671aba31ce2eff8b7c8be93adbdb0fc1c0a5b",
            (32, "packed"): "31017f287d310c81508748c65a84f945b51a6adc28ec58f4ab2e0472c5e8e8ae",
            (32, "auto"): "eb26e0b039e3aa2e4c2e9f4475af908fdd88d86871c4ec72766b03bc1a7c681a",
        },
    ),
}


def _emit_cases(path: str):
    """(act bits, storage) -> emitted model, with a mixed 2..8-bit policy and given activation ranges (no
    calibration: the bytes depend on the emit passes alone)."""
    from passes.pipeline import prepare
    from passes.qdq_plan import plan_activations

    m = onnx.load(path)
    prepared = prepare(m)
    info = analyze(prepared)
    for acts in (8, 4, 32):
        pol = mixed(info.names, acts)
        plan = plan_activations(prepared, info, pol)
        ranges = {t: ActParams(range=(-1.0 - 0.25 * k, 2.0 + 0.5 * k)) for k, t in enumerate(plan)}
        for storage in ("int8", "packed", "auto"):
            yield (
                (acts, storage),
                quantize_model(m, pol, qparams=QuantParams(activations=ranges), storage=storage),
            )


def _digest(model: onnx.ModelProto) -> str:
    import hashlib

    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [(p.key, p.value) for p in m.metadata_props if p.key != "mqtool.version"]
    del m.metadata_props[:]
    for k, v in keep:
        m.metadata_props.add(key=k, value=v)
    return hashlib.sha256(m.SerializeToString()).hexdigest()


def _example_digests(example: str) -> dict:
    return {key: _digest(q) for key, q in _emit_cases(example_path(example))}


@pytest.mark.parametrize("example", list(_EXAMPLE_DIGESTS))
def test_emitted_bytes_of_the_examples_are_unchanged(example):
    import hashlib

    path = example_path(example)
    source, expected = _EXAMPLE_DIGESTS[example]
    if not os.path.exists(path) or hashlib.sha256(open(path, "rb").read()).hexdigest() != source:
        pytest.skip(f"{example}/model.onnx differs from the one the digests were recorded with")
    assert _example_digests(example) == expected


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
