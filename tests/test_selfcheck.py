"""The self-check (mqtool.selfcheck): tiny models run on ONNX Runtime, their outputs put sample-major,
a faithful QDQ model judged "ok" and a deliberately broken one (weights sign-flipped in the QDQ file)
flagged; the verdict rules on hand-made fidelities; held-out samples; `convert --min-fidelity` exits 3."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper, parser

from mqtool import emit
from mqtool.analysis import analyze
from mqtool.cli import cli
from mqtool.dataspec import DataSpec
from mqtool.emit import quantize_model
from mqtool.fidelity import CTC, SEQUENCE, TOP1, model_fidelity
from mqtool.outputs import OutputKind, OutputSpec, classify, plan_outputs
from mqtool.policy import Policy
from mqtool.selfcheck import OK, POOR, WARNING, check_conversion, hold_out, judge, self_check
from passes.pipeline import prepare

RNG = np.random.default_rng(7)


def model(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    m = parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + text)
    m.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    onnx.checker.check_model(m, full_check=True)
    return m


def w(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def w8a8(m: onnx.ModelProto, feed: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Uniform w8a8 with every weight in an INT8 tensor (so `broken` can flip it)."""
    names = analyze(prepare(m)).names
    q = quantize_model(m, Policy.uniform(names, 8, 8), data=feed, storage="int8")
    onnx.checker.check_model(q, full_check=True)
    return q


def broken(q: onnx.ModelProto, only: str | None = None) -> onnx.ModelProto:
    """`q` with the INT8 weights that DequantizeLinear reads sign-flipped (those of layer `only` if given):
    a file that no longer does what the simulation did."""
    out = onnx.ModelProto()
    out.CopyFrom(q)
    weights = {n.input[0] for n in out.graph.node if n.op_type == "DequantizeLinear"}
    flipped = 0
    for i, t in enumerate(out.graph.initializer):
        if t.name in weights and t.data_type == onnx.TensorProto.INT8 and (only is None or only in t.name):
            v = numpy_helper.to_array(t).astype(np.int16)
            out.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(np.clip(-v, -127, 127).astype(np.int8), t.name)
            )
            flipped += 1
    assert flipped, "no INT8 weight to flip"
    return out


def ort_run(m: onnx.ModelProto, feed: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    extra = [
        helper.make_empty_tensor_value_info(o) for o in outputs if o not in {x.name for x in m.graph.output}
    ]
    c = onnx.ModelProto()
    c.CopyFrom(m)
    c.graph.output.extend(extra)
    sess = ort.InferenceSession(c.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


SOFTMAX = """g (float[N, 16] x) => (float[N, 6] p) {
  z = Gemm <transB = 1> (x, W, b)
  p = Softmax <axis = -1> (z)
}"""


@pytest.fixture(scope="module")
def classifier():
    m = model(SOFTMAX, W=w(6, 16), b=w(6) * 0.1)
    x = w(96, 16)
    return m, x, w8a8(m, {"x": x[:64]})


def test_softmax_classifier_faithful_is_ok_and_sign_flipped_is_poor(classifier):
    m, x, q = classifier
    held = {"x": x[64:]}
    y = ort_run(m, held, ["p"])[0].argmax(-1)
    y[:4] = (y[:4] + 1) % 6  # four wrong labels: fp32 scores 28/32
    good = self_check(m, q, held, y, baseline=q, bits=8.0)
    assert good.verdict == OK and good.reasons == [] and good.samples == 32
    assert good.specs[0].kind is OutputKind.PROBS
    out = good.quantized.outputs[0]
    assert (
        out.reference["top-1 accuracy"] == 28 / 32
        and out.agreement >= 0.9
        and out.measures["KL to fp32"] < 0.01
    )
    assert good.text().splitlines()[-1].startswith("self-check ok")

    bad = self_check(m, broken(q), held, y, baseline=q, bits=4.0)
    assert bad.verdict == POOR and bad.agreement < 0.3
    assert any("is under 0.5" in r for r in bad.reasons)
    assert any("less than half of 8-bit PTQ's" in r for r in bad.reasons)
    text = bad.text()
    assert text.splitlines()[-1].startswith("WARNING: the quantized model is POOR")
    assert "quantized  8-bit PTQ" in text and "predicted" not in text.splitlines()[3]
    assert not bad.passes(0.9) and good.passes(0.9)
    doc = json.loads(json.dumps(bad.to_json(), allow_nan=False))
    assert doc["verdict"] == "poor" and doc["outputs"][0]["kind"] == "probabilities"
    assert doc["quantized"]["samples"] == 32 and doc["baseline"]["agreement"] == good.agreement


def test_predicted_fidelity_flags_a_file_that_does_not_behave_like_the_simulation(classifier):
    m, x, q = classifier
    held = {"x": x[64:]}
    simulated = {"p": ort_run(q, held, ["p"])[0]}  # a simulation that predicted the faithful file exactly
    good = self_check(m, q, held, predicted=simulated, bits=3.0)
    assert good.verdict == OK and good.predicted.agreement == good.agreement
    bad = self_check(m, broken(q), held, predicted=good.quantized, bits=3.0)  # a ModelFidelity also works
    assert bad.verdict == POOR
    assert any("does not behave like the simulation" in r for r in bad.reasons)
    assert "predicted" in bad.text()


def test_argmax_ended_model_is_scored_on_the_float_input_of_its_argmax():
    m = model(
        """g (float[N, 16] x) => (int64[N] k) {
          h = MatMul(x, W)
          z = Add(h, b)
          k = ArgMax <axis = -1, keepdims = 0> (z)
        }""",
        W=w(16, 10),
        b=w(10) * 0.1,
    )
    x = w(80, 16)
    q = w8a8(m, {"x": x[:48]})
    good = self_check(m, q, {"x": x[48:]})
    assert good.specs[0].source == "z" and good.specs[0].kind is OutputKind.LOGITS
    assert good.verdict == OK and good.quantized.outputs[0].agreement >= 0.9
    bad = self_check(m, broken(q), {"x": x[48:]}, baseline=q)
    assert bad.verdict == POOR and bad.quantized.outputs[0].agreement < 0.3


def test_time_major_logits_are_put_sample_major_with_positions_and_ctc():
    # [T=5, N, 16] -> [5, N, 12]: samples on axis 1 of the input and of the output.
    m = model(
        """g (float[5, N, 16] x) => (float[5, N, 12] z) {
          h = MatMul(x, W)
          z = Add(h, b)
        }""",
        W=w(16, 12),
        b=w(12) * 0.1,
    )
    x = w(5, 40, 16)
    q = w8a8(m, {"x": x[:, :24]})
    held = {"x": x[:, 24:]}
    res = self_check(m, broken(q), held, baseline=q)
    assert res.samples == 16 and res.quantized.samples == 16
    fid = res.quantized.outputs[0]
    assert {TOP1, SEQUENCE, CTC} <= set(fid.measures)
    # The same numbers as the measures on outputs moved sample-major by hand.
    ref, cand = (np.moveaxis(ort_run(a, held, ["z"])[0], 1, 0) for a in (m, broken(q)))
    want = model_fidelity(res.specs, {"z": ref}, {"z": cand})
    assert fid.measures == pytest.approx(want.outputs[0].measures)
    assert res.verdict == POOR and fid.measures[CTC] == 0.0
    assert self_check(m, q, held, baseline=q).verdict == OK


def test_fixed_batch_model_is_fed_sample_by_sample():
    m = model(
        """g (float[1, 16] x) => (float[1, 6] p) {
          z = Gemm <transB = 1> (x, W, b)
          p = Softmax <axis = -1> (z)
        }""",
        W=w(6, 16),
        b=w(6) * 0.1,
    )
    x = w(40, 16)
    q = w8a8(m, {"x": x[:28]})
    held = {"x": x[28:]}
    good = self_check(m, q, held)
    assert good.samples == 12 and good.verdict == OK
    bad = self_check(m, broken(q), held, baseline=q)
    cand = np.stack([ort_run(broken(q), {"x": x[i : i + 1]}, ["p"])[0] for i in range(28, 40)])
    ref = np.stack([ort_run(m, {"x": x[i : i + 1]}, ["p"])[0] for i in range(28, 40)])
    want = model_fidelity(bad.specs, {"p": ref}, {"p": cand})
    assert bad.agreement == pytest.approx(want.agreement) and bad.verdict == POOR


def test_two_outputs_a_broken_head_is_caught_even_when_the_average_hides_it():
    m = model(
        """g (float[N, 16] x) => (float[N, 6] p, float[N, 4] s) {
          z = Gemm <transB = 1> (x, W, b)
          p = Softmax <axis = -1> (z)
          t = Gemm <transB = 1> (x, V, c)
          s = Sigmoid(t)
        }""",
        W=w(6, 16),
        b=w(6) * 0.1,
        V=w(4, 16),
        c=np.zeros(4, np.float32),
    )
    x = w(90, 16)
    q = w8a8(m, {"x": x[:60]})
    held = {"x": x[60:]}
    good = self_check(m, q, held, baseline=q)
    assert [s.kind for s in good.specs] == [OutputKind.PROBS, OutputKind.SIGMOID] and good.verdict == OK
    flipped_layer = next(
        t.name
        for t in q.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and list(t.dims) == [4, 16]
    )
    bad = self_check(m, broken(q, only=flipped_layer), held, baseline=q)
    assert bad.quantized.output("p").agreement == good.quantized.output("p").agreement
    assert bad.quantized.output("s").agreement < 0.2
    assert bad.verdict == POOR and any("'s' positive overlap" in r for r in bad.reasons)
    assert "p: top-1 agreement" in bad.text() and "s: positive overlap" in bad.text()


def fidelity(agree: np.ndarray, ctc: np.ndarray | None = None):
    """A ModelFidelity of one sequence output whose per-position agreement per sample is `agree` (and CTC
    string agreement `ctc`), built through the measures from hand-made one-hot logits."""
    n, t = len(agree), 10
    ref = np.zeros((n, t, 3))
    ref[..., 1] = 1.0
    cand = ref.copy()
    for i, a in enumerate(agree):
        flips = int(round((1 - a) * t))
        cand[i, :flips] = [0, 0, 1]  # class 2 instead of 1: a different string
    if ctc is not None:
        for i, ok in enumerate(ctc):
            if ok and agree[i] < 1:  # same string "1": put blanks (0) in place of the flipped positions
                cand[i, : int(round((1 - agree[i]) * t))] = [1, 0, 0]
    spec = OutputSpec("y", "y", OutputKind.LOGITS, "hand-made")
    return model_fidelity([spec], {"y": ref}, {"y": cand})


def test_judge_rules():
    n = 200
    perfect = fidelity(np.ones(n))
    # Below 8 bits, losing some agreement is what the budget buys; at 8 bits it must match 8-bit PTQ.
    lower = fidelity(np.where(np.arange(n) < 40, 0.5, 1.0))  # 0.9 per position
    assert judge(fidelity(np.where(np.arange(n) < 10, 0.5, 1.0)), perfect, bits=3.0) == (OK, [])
    # ... but 20 points of CTC strings lost is said (a warning, the budget may be worth it)
    assert judge(lower, perfect, bits=3.0)[0] == WARNING
    verdict, reasons = judge(lower, perfect, bits=8.0)
    assert verdict == WARNING and reasons[0].startswith("at 8 bits, model agreement 0.9000 is 0.1000 below")
    one_flip = fidelity(np.where(np.arange(n) < 1, 0.9, 1.0))
    assert judge(one_flip, perfect, bits=8.0) == (OK, [])  # within noise
    # Positions mostly agree but the decoded strings do not: the CTC string agreement decides.
    strings_lost = fidelity(np.full(n, 0.9))
    verdict, reasons = judge(strings_lost, perfect, bits=3.0)
    assert verdict == POOR and reasons == [
        "CTC string agreement 0.0000 is less than half of 8-bit PTQ's 1.0000"
    ]
    same_strings = fidelity(np.full(n, 0.9), ctc=np.ones(n))
    assert same_strings.outputs[0].measures[CTC] == 1.0 and judge(same_strings, perfect, bits=3.0) == (OK, [])
    # Against the prediction: a gap beyond max(0.05, 3 standard errors) is a warning.
    verdict, reasons = judge(lower, predicted=perfect, bits=3.0)
    assert verdict == WARNING and "below what the search predicted (1.0000" in reasons[0]
    assert judge(fidelity(np.full(n, 0.97)), predicted=perfect)[0] == OK
    # Under the floor whatever the budget, and said when 8-bit PTQ is as bad.
    low = fidelity(np.full(n, 0.4))
    verdict, reasons = judge(low, low, bits=2.0)
    assert verdict == POOR and "8-bit PTQ scores 0.4000 too" in reasons[0]
    # Below 8 bits, a large loss against 8-bit PTQ (more than 0.15, not yet half) is said, not judged poor.
    much_lower = fidelity(np.where(np.arange(n) < 60, 0.5, 1.0))  # 30 % of the strings differ
    verdict, reasons = judge(much_lower, perfect, bits=4.0)
    assert verdict == WARNING
    assert (
        "CTC string agreement 0.7000 is 0.3000 below 8-bit PTQ's 1.0000: this budget costs much of the quality "
        "(a larger budget, or --max-drop, keeps more)"
    ) in reasons


def test_a_regression_output_far_below_8_bit_sqnr_is_said_even_when_its_cosine_looks_fine():
    """A detector's [N, 4 + classes, anchors] output: a shift of the small class-score channels leaves the
    cosine (dominated by box coordinates in pixels) near 1, but not the SQNR."""
    rng = np.random.default_rng(0)
    n = 64
    ref = np.concatenate([rng.uniform(0, 640, (n, 4, 100)), rng.uniform(0, 1, (n, 6, 100))], axis=1)
    close = ref + rng.normal(0, 0.01, ref.shape)  # 8-bit-like
    shifted = ref.copy()
    shifted[:, 4:] -= 0.3  # every class score lowered: no detection passes a 0.25 threshold
    shifted[:, :4] += rng.normal(0, 3.0, (n, 4, 100))
    spec = OutputSpec("boxes", "boxes", OutputKind.REGRESSION, "hand-made")
    q = model_fidelity([spec], {"boxes": ref}, {"boxes": shifted})
    b = model_fidelity([spec], {"boxes": ref}, {"boxes": close})
    assert q.agreement > 0.99  # cosine alone would pass it
    verdict, reasons = judge(q, b, bits=4.0)
    assert verdict == WARNING and any(
        "'boxes' worst-channel SQNR dB" in r and "below 8-bit PTQ's" in r for r in reasons
    )
    assert judge(b, b, bits=4.0) == (OK, [])
    assert all("SQNR" not in r for r in judge(q, b, bits=8.0)[1])  # at 8 bits the 8-bit rule speaks


def test_hold_out_keeps_the_last_samples_and_caps_calibration(tmp_path):
    m = model(SOFTMAX, W=w(6, 16), b=w(6))
    x, y = w(30, 16), RNG.integers(0, 6, 30)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    h = hold_out(str(tmp_path / "d.npz"), m)
    assert (h.samples, h.total, h.in_sample) == (6, 30, False)
    np.testing.assert_array_equal(h.feed["x"], x[24:])
    np.testing.assert_array_equal(h.labels, y[24:])
    assert h.calibration == DataSpec(str(tmp_path / "d.npz"), max_samples=24)
    h = hold_out(DataSpec(str(tmp_path / "d.npz"), max_samples=4), m)  # too few to hold any out
    assert (h.samples, h.in_sample) == (4, True) and h.calibration.max_samples == 4
    np.testing.assert_array_equal(h.feed["x"], x[:4])


def test_check_conversion_uses_the_search_split_and_prediction_from_the_summary(tmp_path, classifier):
    m, x, q = classifier
    onnx.save(m, tmp_path / "m.onnx")
    onnx.save(broken(q), tmp_path / "q.onnx")
    np.savez(tmp_path / "d.npz", x=x)
    feeds = {"x": x[:10]}
    specs = classify(plan_outputs(m), {"p": ort_run(m, feeds, ["p"])[0]})
    predicted = model_fidelity(specs, {"p": ort_run(m, feeds, ["p"])[0]}, {"p": ort_run(q, feeds, ["p"])[0]})
    summary = {"check_feeds": feeds, "check_labels": None, "predicted_fidelity": predicted}
    res = check_conversion(tmp_path / "m.onnx", tmp_path / "q.onnx", str(tmp_path / "d.npz"), summary=summary)
    assert res.samples == 10 and res.note == "the search's held-out samples" and res.predicted is predicted
    assert res.baseline is not None and res.verdict == POOR
    assert any("does not behave like the simulation" in r for r in res.reasons)


def outlier_model(d) -> None:
    """One MatMul + Softmax whose every weight column has one large weight on an input that the data keeps
    at zero: 2-bit per-channel scales follow that weight and round every useful one to 0."""
    wm = w(32, 8) * 0.5
    wm[0, :] = 20.0
    onnx.save(
        model(
            """g (float[N, 32] x) => (float[N, 8] p) {
              h = MatMul(x, W)
              z = Add(h, b)
              p = Softmax <axis = -1> (z)
            }""",
            W=wm,
            b=w(8) * 0.1,
        ),
        d / "m.onnx",
    )
    x = w(80, 32)
    x[:, 0] = 0.0
    np.savez(d / "d.npz", x=x)


def convert(d, *args):
    r = CliRunner().invoke(cli, ["convert", str(d / "m.onnx"), "--data", str(d / "d.npz"), *map(str, args)])
    return r.exit_code, r.stdout, r.stderr


def test_convert_self_check_warns_and_min_fidelity_exits_3_with_the_file_written(tmp_path):
    outlier_model(tmp_path)
    code, out, err = convert(tmp_path, "-o", tmp_path / "q2.onnx", "--bits", "2", "--min-fidelity", "0.9")
    assert code == 3, err
    assert (tmp_path / "q2.onnx").exists()
    onnx.checker.check_model(onnx.load(tmp_path / "q2.onnx"), full_check=True)
    assert out.count("\n") == 1 and "1/1 layers quantized, avg 2.00 weight bits" in out  # stdout: the summary
    assert "self-check on ONNX Runtime: 16 samples (the last 16 of 80 samples of the data" in err
    assert "\nWARNING: the quantized model is POOR" in err
    assert err.strip().endswith(f"< --min-fidelity 0.9 ({tmp_path / 'q2.onnx'} was written)")
    # Without the gate the warning is printed and the exit code stays 0.
    code, _, err = convert(tmp_path, "-o", tmp_path / "q2b.onnx", "--bits", "2")
    assert code == 0 and "WARNING: the quantized model is POOR" in err
    # 8 bits passes the same gate; --no-self-check prints no table.
    code, _, err = convert(tmp_path, "-o", tmp_path / "q8.onnx", "--bits", "8", "--min-fidelity", "0.5")
    assert code == 0 and "self-check ok: model agreement" in err, err
    code, _, err = convert(tmp_path, "-o", tmp_path / "qn.onnx", "--bits", "2", "--no-self-check")
    assert code == 0 and "self-check" not in err
    code, _, err = convert(
        tmp_path, "-o", tmp_path / "qx.onnx", "--bits", "2", "--no-self-check", "--min-fidelity", "0.5"
    )
    assert code == 2 and "--min-fidelity needs --data and the self-check" in err


def test_convert_calibrates_on_the_samples_before_the_held_out_ones(tmp_path):
    outlier_model(tmp_path)
    x = np.load(tmp_path / "d.npz")["x"]
    x[64:] *= 10  # held-out samples that would widen every activation range if they calibrated
    np.savez(tmp_path / "d.npz", x=x)
    code, _, err = convert(tmp_path, "-o", tmp_path / "q.onnx", "--bits", "4")
    assert code == 0, err
    data = str(tmp_path / "d.npz")
    for name, source in (("first", DataSpec(data, max_samples=64)), ("all", data)):
        emit.convert(
            str(tmp_path / "m.onnx"), str(tmp_path / f"{name}.onnx"), emit.uniform_policy(4), data=source
        )
    got = (tmp_path / "q.onnx").read_bytes()
    assert got == (tmp_path / "first.onnx").read_bytes() != (tmp_path / "all.onnx").read_bytes()
    # Checked or not, the same file: the held-out samples never calibrate.
    code, _, err = convert(tmp_path, "-o", tmp_path / "n.onnx", "--bits", "4", "--no-self-check")
    assert code == 0 and "self-check" not in err and (tmp_path / "n.onnx").read_bytes() == got


def test_a_detector_that_loses_its_detections_is_judged_poor():
    """Sparse class scores (a few detections per image) pushed under the threshold: cosine and SQNR are
    carried by the boxes; the score agreement against 8-bit PTQ's makes the verdict (nudenet at 4 bits:
    46 of 357 detections left, "self-check ok" before this measure)."""
    rng = np.random.default_rng(1)
    n, anchors = 64, 200
    boxes = rng.uniform(0, 640, (n, 4, anchors))
    scores = np.where(rng.uniform(size=(n, 6, anchors)) < 0.01, 0.7, 0.001)
    ref = np.concatenate([boxes, scores], axis=1)
    close = ref + np.concatenate([rng.normal(0, 0.5, boxes.shape), np.zeros(scores.shape)], axis=1)
    faded = close.copy()
    faded[:, 4:] *= 0.3  # 0.7 -> 0.21: under the threshold
    spec = OutputSpec("out", "out", OutputKind.REGRESSION, "hand-made")
    q = model_fidelity([spec], {"out": ref}, {"out": faded})
    b = model_fidelity([spec], {"out": ref}, {"out": close})
    assert q.agreement > 0.99 and b.outputs[0].measures["score agreement"] == 1.0
    verdict, reasons = judge(q, b, bits=4.0)
    assert verdict == POOR and reasons[0].startswith("score agreement 0.0")
