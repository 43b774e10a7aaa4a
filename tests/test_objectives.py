"""Objectives that understand what a model outputs (issue: a CTC recogniser ending in Softmax scored every
policy KL ~ 0 because its probabilities were flattened and re-softmaxed).

For each kind of output, a tiny in-memory model: the search must choose the right kind, and a deliberately
broken policy (every layer at 2 bits) must score clearly worse than a good one (every layer at 8 bits),
with the weights MetaQuantNet generates before any training (the post-training-quantized weights).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mqtool.errors import InputError
from mqtool.outputs import OutputKind
from mqtool.search import SearchConfig
from mqtool.search.context import Samples
from mqtool.search.driver import SearchEngine
from mqtool.search.ga import Genome

D, H = 16, 32


def _w(name: str, shape, scale: float = 1.0, seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(abs(hash(name)) % 2**31 + seed)
    return numpy_helper.from_array(
        (rng.standard_normal(shape) * scale / np.sqrt(shape[0])).astype(np.float32), name
    )


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _trunk(x: str, out: str, classes: int, scale: float = 4.0) -> tuple[list, list]:
    """x -> MatMul -> Relu -> MatMul (two quantizable layers); large output weights make peaked outputs."""
    nodes = [
        helper.make_node("MatMul", [x, "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], [out], name="fc2"),
    ]
    return nodes, [_w("w1", [D, H]), _w("w2", [H, classes], scale)]


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _engine(model, x: np.ndarray, tmp_path, **cfg) -> SearchEngine:
    config = SearchConfig.flat(epochs=0, population=4, generations=1, fitness_samples=64, **cfg)
    eng = SearchEngine(model, Samples({"x": x}), config, str(tmp_path))
    eng.train_metaquantnet()
    return eng


def _good_vs_broken(eng: SearchEngine) -> tuple[float, float]:
    n, a = eng.ctx.n, eng.cfg.space.act_bits
    good = Genome(tuple([8] * n), tuple([a] * n))
    broken = Genome(tuple([2] * n), tuple([a] * n))
    return tuple(eng.scorer.evaluate([good, broken]))


def _kinds(eng: SearchEngine) -> dict[str, OutputKind]:
    return {s.name: s.kind for s in eng.ctx.outputs}


def _assert_broken_is_clearly_worse(eng: SearchEngine) -> None:
    good, broken = _good_vs_broken(eng)
    assert broken > 5 * good and broken - good > 1e-3, (good, broken)
    # and on the readable scale the anchors give: 8-bit PTQ reads 0, the lowest width 1
    anchors = eng.scorer.anchors()
    assert anchors.informative
    assert abs(anchors.relative(good)) < 0.05 and anchors.relative(broken) > 0.5


def _x(*shape) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def test_softmax_classifier_is_scored_as_probabilities(tmp_path):
    nodes, inits = _trunk("x", "logits", 10)
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    m = _model(nodes, [_vi("x", ["n", D])], [_vi("probs", ["n", 10])], inits)
    eng = _engine(m, _x(200, D), tmp_path)
    assert _kinds(eng) == {"probs": OutputKind.PROBS}
    assert "ends in Softmax" in eng.ctx.outputs[0].reason
    _assert_broken_is_clearly_worse(eng)


def test_ctc_softmax_over_thousands_of_classes_is_a_distribution_per_position(tmp_path):
    """[N, T, C] probabilities over 1,500 classes: the shape of the recogniser that scored KL ~ 0."""
    nodes, inits = _trunk("x", "logits", 1500, scale=6.0)
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    m = _model(nodes, [_vi("x", ["n", 12, D])], [_vi("probs", ["n", 12, 1500])], inits)
    eng = _engine(m, _x(200, 12, D), tmp_path)
    assert _kinds(eng) == {"probs": OutputKind.PROBS}
    # wide distributions keep the teacher's top classes and the rest of the mass
    assert isinstance(eng.ctx.teacher_search.parts[0], tuple)
    _assert_broken_is_clearly_worse(eng)


def test_time_major_logits_find_their_sample_axis(tmp_path):
    nodes, inits = _trunk("x", "logits", 40)
    nodes.append(helper.make_node("Transpose", ["logits"], ["tm"], perm=[1, 0, 2]))
    m = _model(nodes, [_vi("x", ["n", 9, D])], [_vi("tm", [9, "n", 40])], inits)
    eng = _engine(m, _x(200, 9, D), tmp_path)
    assert eng.ctx.batched and eng.ctx._out_axes == [1]
    assert _kinds(eng) == {"tm": OutputKind.LOGITS}
    assert "9 positions" in eng.ctx.outputs[0].reason
    _assert_broken_is_clearly_worse(eng)


def test_unit_norm_embedding_is_compared_by_cosine(tmp_path):
    nodes, inits = _trunk("x", "e", 24)
    nodes += [
        helper.make_node("ReduceL2", ["e"], ["norm"], axes=[-1], keepdims=1),
        helper.make_node("Div", ["e", "norm"], ["emb"]),
    ]
    m = _model(nodes, [_vi("x", ["n", D])], [_vi("emb", ["n", 24])], inits)
    eng = _engine(m, _x(200, D), tmp_path)
    assert _kinds(eng) == {"emb": OutputKind.EMBEDDING}
    _assert_broken_is_clearly_worse(eng)


def test_argmax_ended_model_distils_the_float_tensor_that_feeds_it(tmp_path):
    nodes, inits = _trunk("x", "logits", 10)
    nodes.append(helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0))
    m = _model(nodes, [_vi("x", ["n", D])], [_vi("label", ["n"], TensorProto.INT64)], inits)
    eng = _engine(m, _x(200, D), tmp_path)
    (spec,) = eng.ctx.outputs
    assert spec.kind is OutputKind.LOGITS and spec.source == "logits" and "ArgMax" in spec.reason
    _assert_broken_is_clearly_worse(eng)


def test_every_output_of_a_multi_output_model_counts(tmp_path):
    nodes, inits = _trunk("x", "logits", 10)
    nodes += [
        helper.make_node("MatMul", ["r", "w3"], ["s"], name="fc3"),
        helper.make_node("Sigmoid", ["s"], ["scores"]),
    ]
    inits.append(_w("w3", [H, 5], 4.0))
    m = _model(nodes, [_vi("x", ["n", D])], [_vi("logits", ["n", 10]), _vi("scores", ["n", 5])], inits)
    eng = _engine(m, _x(200, D), tmp_path)
    assert _kinds(eng) == {"logits": OutputKind.LOGITS, "scores": OutputKind.SIGMOID}
    _assert_broken_is_clearly_worse(eng)
    # a weight of 0 leaves an output out; an unknown output name is refused
    only = _engine(m, _x(200, D), tmp_path / "w", output_weights={"scores": 0.0})
    assert _kinds(only) == {"logits": OutputKind.LOGITS, "scores": OutputKind.NONE}
    with pytest.raises(InputError, match="objective.output_weights: no graph output named 'nope'"):
        _engine(m, _x(200, D), tmp_path / "x", output_weights={"nope": 1.0})


def test_layers_inside_an_if_are_searched(tmp_path):
    def branch(name: str, w: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["r", w], [f"{name}_out"], name=f"{name}_fc")],
            name,
            [],
            [_vi(f"{name}_out", ["n", 10])],
        )

    nodes, inits = _trunk("x", "h2", H)
    nodes[2].output[0] = "h2"
    nodes = nodes[:2]  # fc1 + Relu: r
    nodes += [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "floor"], ["cond"]),
        helper.make_node(
            "If", ["cond"], ["logits"], then_branch=branch("then", "wa"), else_branch=branch("else", "wb")
        ),
    ]
    inits = [inits[0], _w("wa", [H, 10], 4.0), _w("wb", [H, 10], 4.0)]
    inits.append(numpy_helper.from_array(np.array(-1e9, np.float32), "floor"))
    m = _model(nodes, [_vi("x", ["n", D])], [_vi("logits", ["n", 10])], inits)
    eng = _engine(m, _x(200, D), tmp_path)
    assert len(eng.ctx.names) == 3 and any("then" in n for n in eng.ctx.names)
    # the else branch never runs on this data: pinned at the highest width, not left to the GA's whim
    (dead,) = eng.ctx.unreached
    assert "else" in dead and eng.ctx.pins[eng.ctx.names.index(dead)] == 8
    # ... and it does not spend an average-bits budget: 2 bits everywhere the data runs is feasible
    from mqtool.search.budgets import Budget

    lo, _ = eng.costs.check(Budget("bits", 2.0))
    assert lo == pytest.approx(2.0)
    wbits = np.array([8 if n == dead else 2 for n in eng.ctx.names])
    assert eng.costs.cost(Budget("bits", 2.0))(wbits, wbits) == pytest.approx(2.0)
    size = eng.costs.cost(Budget("size", 1e9))  # bytes still count every layer
    assert min(size.table[eng.ctx.names.index(dead)].values()) > 4 * 10  # 10 float biases at least
    assert _kinds(eng) == {"logits": OutputKind.LOGITS}
    _assert_broken_is_clearly_worse(eng)


def test_an_already_quantized_model_is_refused(tmp_path):
    q = numpy_helper.from_array(np.ones((D, 10), np.int8), "wq")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "ws")
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    m = _model(nodes, [_vi("x", ["n", D])], [_vi("y", ["n", 10])], [q, s])
    with pytest.raises(InputError, match="already quantized"):
        _engine(m, _x(64, D), tmp_path)


def test_a_detectors_class_scores_weigh_next_to_its_box_coordinates():
    """YOLO-style [N, 4 + classes, anchors]: boxes in pixels (variance ~8000), sparse class scores in [0, 1]
    (variance ~1e-3). Lowering every class score by 0.3 loses every detection; jittering boxes by 2 px
    loses none. The objective must rank them that way (a floor relative to the whole output's energy once
    made the class rows ~1e-4 of the loss)."""
    import torch

    from mqtool.outputs import OutputKind, OutputSpec
    from mqtool.search.objective import Objective

    rng = np.random.default_rng(0)
    n, anchors = 16, 300
    boxes = rng.uniform(0, 320, (n, 4, anchors))
    scores = np.where(rng.uniform(size=(n, 18, anchors)) < 0.02, rng.uniform(0.3, 0.9, (n, 18, anchors)), 0.0)
    t = torch.tensor(np.concatenate([boxes, scores], axis=1), dtype=torch.float32)
    spec = OutputSpec("output0", "output0", OutputKind.REGRESSION, "hand-made")
    obj = Objective.choose([spec], None, 2.0, False, tuple(t.shape[1:]))
    teacher = obj.teacher([t])
    lost = t.clone()
    lost[:, 4:] = (lost[:, 4:] - 0.3).clamp_min(0.0)
    jitter = t.clone()
    jitter[:, :4] += torch.randn_like(jitter[:, :4]) * 2.0
    bad = obj.sample_terms([lost], teacher.parts, teacher.energy).mean()
    fine = obj.sample_terms([jitter], teacher.parts, teacher.energy).mean()
    assert bad > 10 * fine, (float(bad), float(fine))


def test_one_value_in_0_1_from_control_flow_is_a_probability():
    """silero-vad's speech probability is a ReduceMean of a nested If's output: one value in [0, 1] per
    sample. It is read as a probability (decisions at 0.5), not as regression; the same shape with other
    values, or from another op, stays regression."""
    from mqtool.outputs import OutputPlan, classify

    probs = np.random.default_rng(0).uniform(0, 1, (32, 1)).astype(np.float32)
    for producer, values, kind in (
        ("ReduceMean", probs, OutputKind.SIGMOID),
        ("If", probs, OutputKind.SIGMOID),
        ("ReduceMean", probs * 3, OutputKind.REGRESSION),
        ("Gemm", probs, OutputKind.REGRESSION),
    ):
        (spec,) = classify([OutputPlan("p", "p", producer, None, "")], {"p": values})
        assert spec.kind is kind, (producer, spec.reason)


def test_logits_are_softened_only_where_there_is_one_distribution_per_sample():
    """Hinton's T = 2 suits a classifier; a recogniser is decoded from each position's argmax, and at T = 2
    finetuning traded those decisions for the softened tail (CTC lines decoded like fp32: 0.53 -> 0.16 on
    ddddocr). Per-position and wide logits are compared at T = 1. Checked against NumPy."""
    import torch

    from mqtool.outputs import OutputSpec
    from mqtool.search.objective import Objective

    def kl(t: np.ndarray, s: np.ndarray, temp: float) -> np.ndarray:
        def logp(v):
            v = v / temp
            v = v - v.max(-1, keepdims=True)
            return v - np.log(np.exp(v).sum(-1, keepdims=True))

        lt, ls = logp(t.astype(np.float64)), logp(s.astype(np.float64))
        return (np.exp(lt) * (lt - ls)).sum(-1).reshape(len(t), -1).mean(1)

    rng = np.random.default_rng(0)
    spec = OutputSpec("y", "y", OutputKind.LOGITS, "hand-made")
    for shape, temp in (((8, 10), 2.0), ((8, 6, 10), 1.0), ((8, 1, 10), 2.0), ((8, 2000), 1.0)):
        t = rng.standard_normal(shape).astype(np.float32) * 3
        s = t + rng.standard_normal(shape).astype(np.float32)
        obj = Objective.choose([spec], "kl", 2.0, False, shape[1:])
        assert obj.softened(OutputKind.LOGITS, shape) == temp
        teacher = obj.teacher([torch.from_numpy(t)])
        got = obj.sample_terms([torch.from_numpy(s)], teacher.parts, teacher.energy).numpy()
        if shape[-1] <= 1024:  # wide ones keep the teacher's top classes (tested above)
            np.testing.assert_allclose(got, kl(t, s, temp), rtol=1e-4, atol=1e-6)
        loss = obj.train_loss([torch.from_numpy(s)], teacher.parts, teacher.energy, None)
        assert float(loss) == pytest.approx(float(got.mean()) * temp**2, rel=1e-5)
