"""The prepare passes (name_nodes, fold_constants, fold_batchnorm, cleanup), upgrade_opset and the pass
runner: structure after each pass, and outputs before == after (onnx.reference)."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, parser
from onnx.reference import ReferenceEvaluator

from mqtool.analysis import analyze
from mqtool.errors import InputError
from mqtool.model import node_names
from passes.base import PassError, run_passes
from passes.cleanup import cleanup
from passes.fold_batchnorm import fold_batchnorm
from passes.fold_constants import fold_constants
from passes.name_nodes import name_nodes
from passes.pipeline import prepare
from passes.upgrade_opset import upgrade_opset

RNG = np.random.default_rng(0)


def build(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    m = parser.parse_model(text)
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(m)
    return m


def run(m: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    return ReferenceEvaluator(m).run(None, feeds)


def run_ort(m: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    # onnx 1.23's reference ConvTranspose ignores `group`; ORT implements it.
    import onnxruntime as ort

    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def w(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def bn_params(c):
    return {
        "g": (1 + RNG.uniform(-0.5, 0.5, c)).astype(np.float32),
        "be": w(c),
        "mu": w(c),
        "var": RNG.uniform(0.5, 2, c).astype(np.float32),
    }


def test_run_passes_copies_once_and_names_the_failing_pass():
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 3] y) { y = Gemm <transB = 1> (x, W) }""",
        {"W": w(3, 4)},
    )
    before = m.SerializeToString()

    def boom(model):
        raise ValueError("bad")

    with pytest.raises(PassError, match=r"pass 'boom' failed .*before it: name_nodes"):
        run_passes(m, [name_nodes, boom])
    result = run_passes(m, [name_nodes, cleanup])
    assert result.modified and result.model is not m
    assert m.SerializeToString() == before  # the caller's model is untouched

    def user_fault(model):
        raise InputError("weights are NaN")

    with pytest.raises(InputError, match="in pass 'user_fault'"):
        run_passes(m, [user_fault])
    assert "opset=21" in str(
        PassError(_name(functools.partial(upgrade_opset, opset=21)), [], ValueError("x"))
    )


def _name(p):
    from passes.base import pass_name

    return pass_name(p)


def test_name_nodes_matches_inspect_names():
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { a = Relu(x) b = Relu(a) y = Identity(b) }""",
        {},
    )
    m.graph.node[1].name = "named"
    want = node_names(m.graph)
    res = name_nodes(m)
    assert res.modified and [n.name for n in m.graph.node] == want == ["Relu_0", "named", "Identity_2"]
    assert not name_nodes(m).modified


def test_fold_constants_turns_constant_subgraphs_into_initializers():
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 6, 6] x) => (float[N, 8, 6, 6] y) {
          shape = Constant <value = int64[4] {8, 4, 3, 3}> ()
          W = ConstantOfShape <value = float[1] {0.02}> (shape)
          two = Constant <value = float {2.0}> ()
          W2 = Mul(W, two)
          y = Conv <pads = [1, 1, 1, 1]> (x, W2)
        }""",
        {},
    )
    x = w(2, 4, 6, 6)
    before = run(m, x=x)[0]
    res = fold_constants(m)
    assert res.modified
    assert [n.op_type for n in m.graph.node] == ["Conv"]
    (init,) = m.graph.initializer
    assert init.name == "W2" and np.allclose(numpy_helper.to_array(init), 0.04)
    np.testing.assert_allclose(run(m, x=x)[0], before, rtol=1e-6)
    assert analyze(m).layers[0].weight == "W2"
    assert not fold_constants(m).modified


def test_fold_batchnorm_conv_convtranspose_gemm_keep_names_and_outputs():
    p1, p2, p3 = bn_params(8), bn_params(6), bn_params(5)
    weights = {"W1": w(8, 4, 3, 3), "B1": w(8), "Wt": w(8, 3, 2, 2), "Wg": w(5, 24)}
    for k, p in (("1", p1), ("2", p2), ("3", p3)):
        weights.update({f"{n}{k}": v for n, v in p.items()})
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 6, 6] x) => (float[N, 5] y) {
          a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
          b = BatchNormalization <epsilon = 0.001> (a, g1, be1, mu1, var1)
          c = Relu(b)
          d = ConvTranspose <group = 2, strides = [2, 2]> (c, Wt)
          e = BatchNormalization(d, g2, be2, mu2, var2)
          f = GlobalAveragePool(e)
          f2 = Flatten(f)
          f3 = Concat <axis = 1> (f2, f2, f2, f2)
          h = Gemm <transB = 1> (f3, Wg)
          y = BatchNormalization(h, g3, be3, mu3, var3)
        }""",
        weights,
    )
    x = w(2, 4, 6, 6)
    before = run_ort(m, x=x)[0]
    name_nodes(m)
    layer_names = [n.name for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")]
    assert fold_batchnorm(m).modified
    assert "BatchNormalization" not in [n.op_type for n in m.graph.node]
    assert [n.name for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")] == layer_names
    assert m.graph.output[0].name == "y" and m.graph.node[-1].output[0] == "y"
    np.testing.assert_allclose(run_ort(m, x=x)[0], before, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_leaves_shared_outputs_and_copies_shared_weights():
    p = bn_params(4)
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 5, 5] x) => (float[N, 4, 5, 5] y, float[N, 4, 5, 5] z) {
          a = Conv(x, W)
          b = BatchNormalization(a, g, be, mu, var)
          c = Conv(b, W)
          y = BatchNormalization(c, g, be, mu, var)
          z = Relu(a)
        }""",
        {"W": w(4, 4, 1, 1), **p},
    )
    x = w(1, 4, 5, 5)
    before = run(m, x=x)
    name_nodes(m)
    assert fold_batchnorm(m).modified
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("BatchNormalization") == 1  # `a` also feeds Relu: that BN stays
    assert m.graph.node[2].input[1] != "W"  # the second conv's weight was copied, not changed under the first
    for got, want in zip(run(m, x=x), before):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_tracks_readers_across_folds():
    """Two convs share W and both absorb a BN: the first gets a copy (W has two readers), the second then
    changes W in place (one reader left). A chained second BN is not folded (its input is written by the
    first BN, still in the graph while folding), as when the graph was rescanned per BN."""
    p1, p2, p3 = bn_params(4), bn_params(4), bn_params(4)
    weights = {"W": w(4, 4, 1, 1)}
    for k, p in (("1", p1), ("2", p2), ("3", p3)):
        weights.update({f"{n}{k}": v for n, v in p.items()})
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 5, 5] x) => (float[N, 4, 5, 5] y) {
          a = Conv(x, W)
          b = BatchNormalization(a, g1, be1, mu1, var1)
          c = Conv(b, W)
          d = BatchNormalization(c, g2, be2, mu2, var2)
          y = BatchNormalization(d, g3, be3, mu3, var3)
        }""",
        weights,
    )
    x = w(1, 4, 5, 5)
    before = run(m, x=x)[0]
    name_nodes(m)
    assert fold_batchnorm(m).modified
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != "W" and convs[1].input[1] == "W"
    assert [n.op_type for n in m.graph.node].count("BatchNormalization") == 1
    np.testing.assert_allclose(run(m, x=x)[0], before, rtol=1e-4, atol=1e-5)


def test_cleanup_drops_dead_parts_and_shadowing_inputs():
    m = build(
        """<ir_version: 3, opset_import: ["" : 9]>
        g (float[1, 4] x, float[4, 3] W, float[2] unused) => (float[1, 3] y) {
          y = MatMul(x, W)
          dead = Relu(x)
        }""",
        {"W": w(4, 3), "unused": w(2)},
    )
    res = cleanup(m)
    assert res.modified
    assert [i.name for i in m.graph.input] == ["x"] and m.ir_version >= 4
    assert [n.op_type for n in m.graph.node] == ["MatMul"]
    assert [i.name for i in m.graph.initializer] == ["W"]
    onnx.checker.check_model(m)
    assert not cleanup(m).modified


def test_upgrade_opset_11_to_21_raises_ir_and_keeps_names():
    m = build(
        """<ir_version: 6, opset_import: ["" : 11]>
        g (float[N, 4] x) => (float[N, 2] y) {
          a = MatMul(x, W)
          b = Relu(a)
          y = Softmax <axis = 1> (b)
        }""",
        {"W": w(4, 2)},
    )
    name_nodes(m)
    x = w(3, 4)
    before = run(m, x=x)[0]
    res = upgrade_opset(m, 21)
    out = res.model
    assert res.modified and out.opset_import[0].version == 21 and out.ir_version >= 10
    assert [n.name for n in out.graph.node][:2] == ["MatMul_0", "Relu_1"]
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(run(out, x=x)[0], before, rtol=1e-6)
    assert not upgrade_opset(out, 13).modified  # never downgrades


def test_upgrade_opset_with_weight_stubs_equals_the_full_conversion(monkeypatch):
    """Large float weights go through the version converter as data-less stubs: the result must be byte for
    byte the converter's on the full model, for ops whose adapters rewrite attributes into inputs."""
    import importlib

    from onnx import version_converter

    up = importlib.import_module("passes.upgrade_opset")  # the package attribute is the pass function

    m = build(
        """<ir_version: 5, opset_import: ["" : 10]>
        g (float[N, 16, 8, 8] x) => (float[N, 1, 32] y) {
          c = Conv <pads = [1, 1, 1, 1]> (x, Wc, Bc)
          r = ReduceMean <axes = [2, 3], keepdims = 0> (c)
          u = Unsqueeze <axes = [1]> (r)
          k = Clip <min = 0.0, max = 6.0> (u)
          y = MatMul(k, Wm)
        }""",
        {"Wc": w(32, 16, 3, 3), "Bc": w(32), "Wm": w(32, 32)},
    )
    full = version_converter.convert_version(m, 21)
    full.ir_version = 10
    calls = []
    real = version_converter.convert_version
    monkeypatch.setattr(version_converter, "convert_version", lambda mm, v: calls.append(mm) or real(mm, v))
    got = upgrade_opset(m, 21).model
    assert got.SerializeToString() == full.SerializeToString()
    # One conversion; the converter saw the 4608-element Wc without its data, the 1024-element Wm with.
    assert len(calls) == 1
    seen = {i.name: i for i in calls[0].graph.initializer}
    assert not seen["Wc"].raw_data and list(seen["Wc"].dims) == [32, 16, 3, 3] and seen["Wm"].raw_data
    # A stub that comes back changed means the converter touched a weight: the full model is converted.
    monkeypatch.setattr(up, "_STRIP_ELEMENTS", 0)
    monkeypatch.setattr(
        version_converter,
        "convert_version",
        lambda mm, v: calls.append(mm) or _touch_first_initializer(real(mm, v)),
    )
    calls.clear()
    got = upgrade_opset(m, 21).model
    assert len(calls) == 2 and numpy_helper.to_array(got.graph.initializer[0]).size == 32 * 16 * 9


def _touch_first_initializer(m: onnx.ModelProto) -> onnx.ModelProto:
    m.graph.initializer[0].doc_string = "changed"
    return m


def test_prepare_is_idempotent_and_keeps_inspect_names(tmp_path):
    p = bn_params(8)
    m = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 6, 6] x) => (float[N, 8, 6, 6] y) {
          k = Constant <value = float[8, 3, 1, 1] {1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}> ()
          a = Conv(x, k)
          b = BatchNormalization(a, g, be, mu, var)
          y = Relu(b)
        }""",
        p,
    )
    names = analyze(m).names
    before = m.SerializeToString()
    once = prepare(m)
    assert m.SerializeToString() == before
    assert analyze(once).names == names == ["Conv_1"]
    assert [n.op_type for n in once.graph.node] == ["Conv", "Relu"]  # Constant and BN folded
    twice = run_passes(once, [name_nodes, fold_constants, fold_batchnorm, cleanup])
    assert not twice.modified and twice.model.SerializeToString() == once.SerializeToString()
    assert prepare(once).SerializeToString() == once.SerializeToString()
    x = w(2, 3, 6, 6)
    np.testing.assert_allclose(run(once, x=x)[0], run(m, x=x)[0], rtol=1e-4, atol=1e-5)
