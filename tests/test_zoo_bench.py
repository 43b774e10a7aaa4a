"""Smoke tests of the zoo benchmark's scorers (bench/zoo) on tiny hand-made arrays with known answers.

No network and no zoo download: the decoders, NMS, matching and agreement scores are checked on outputs
built by hand, and the runner's failure recording on a model file that does not exist.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import onnx
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

from zoo import datasets, prepost, score  # noqa: E402


def onehot_logits(indices: list[int], classes: int) -> np.ndarray:
    """Time-major CTC logits [T, 1, C] whose argmax per step is `indices`."""
    x = np.zeros((len(indices), 1, classes), dtype=np.float32)
    x[np.arange(len(indices)), 0, indices] = 5.0
    return x


def test_ctc_greedy_collapses_repeats_then_drops_blanks():
    # blank between the two 3s keeps both; adjacent 5s collapse; leading/trailing blanks vanish
    assert prepost.ctc_greedy(np.array([0, 3, 3, 0, 3, 5, 5, 0, 0, 2])) == [3, 3, 5, 2]
    assert prepost.ctc_greedy(np.array([0, 0, 0])) == []
    charset = ["", "a", "b", "c", "d", "e"]
    assert prepost.ocr_text(onehot_logits([0, 3, 3, 0, 3, 5, 5, 0, 0, 2], 6), charset) == "cceb"


def test_ocr_agreement_and_truth_scores():
    charset = ["", "a", "b", "c"]
    ref = score.decode("ocr_x", [[onehot_logits([1, 0, 2], 4)], [onehot_logits([3, 3], 4)]], charset=charset)
    cand = score.decode(
        "ocr_x", [[onehot_logits([1, 1, 2], 4)], [onehot_logits([3, 0, 3], 4)]], charset=charset
    )
    assert ref == ["ab", "c"] and cand == ["ab", "cc"]
    assert score.agreement("ocr_x", ref, cand) == {"string_agreement": 0.5}
    truth = score.truth_scores("ocr_x", ["Ab", "c"], {"text": np.array(["ab", "c"])})
    assert truth == {"exact": 0.5, "exact_nocase": 1.0}


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7])
    # IoU(box0, box1) = 81 / 119 = 0.68
    assert prepost.nms(boxes, scores, 0.45) == [0, 2]
    assert prepost.nms(boxes, scores, 0.7) == [0, 1, 2]
    assert prepost.nms(boxes, scores, 0.7, top_k=2) == [0, 1]
    assert prepost.iou(boxes[:1], boxes[1:2])[0, 0] == pytest.approx(81 / 119)


def test_match_counts_and_f1():
    ref = np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 1]], dtype=np.float32)
    cand = np.array(
        [
            [0, 0, 10, 11, 0.9, 0],  # IoU 100/110 with ref 0, same class: a match
            [20, 20, 30, 30, 0.7, 0],  # right place, wrong class: a false positive (and ref 1 is missed)
            [50, 50, 60, 60, 0.6, 0],  # nothing there: a false positive
        ],
        dtype=np.float32,
    )
    assert prepost.match_counts(ref, cand) == (1, 2, 1)
    assert prepost.f1(1, 2, 1) == pytest.approx(2 / 5)
    assert prepost.f1(0, 0, 0) == 1.0  # nothing to find, nothing found
    assert prepost.match_counts(ref, np.zeros((0, 6))) == (0, 0, 2)
    # one candidate may match one reference box only
    twin = np.array([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0]], dtype=np.float32)
    assert prepost.match_counts(ref[:1], twin) == (1, 1, 0)
    assert score.agreement("yolox", [ref, ref], [cand, ref])["det_f1"] == pytest.approx(
        2 * 3 / (2 * 3 + 2 + 1)
    )


def test_yolox_grid_decode():
    out = np.zeros((1, 3549, 6), dtype=np.float32)
    out[0, 0] = [0.5, 0.5, math.log(2), math.log(4), 0.9, 0.9]  # stride 8, cell (0, 0)
    out[0, 52 * 52 + 1] = [0.0, 0.0, 0.0, 0.0, 0.3, 0.3]  # stride 16, cell (1, 0): score 0.09 < 0.1
    d = prepost.yolox_detections(out)
    assert d.shape == (1, 6)
    np.testing.assert_allclose(d[0], [4 - 8, 4 - 16, 4 + 8, 4 + 16, 0.81, 0], rtol=1e-6)


def test_yolov8_decode_thresholds_and_nms():
    out = np.zeros((22, 100), dtype=np.float32)
    out[:4, 0], out[4 + 12, 0] = [100, 100, 40, 20], 0.9  # class 12
    out[:4, 1], out[4 + 12, 1] = [102, 100, 40, 20], 0.5  # overlaps anchor 0: suppressed
    out[:4, 2], out[4 + 3, 2] = [200, 200, 10, 10], 0.22  # >= 0.2 but not > 0.25: dropped by NMSBoxes
    out[:4, 3], out[4 + 5, 3] = [20, 30, 10, 10], 0.4  # kept
    d = prepost.yolov8_detections(out)
    np.testing.assert_allclose(d[:, :4], [[80, 90, 120, 110], [15, 25, 25, 35]])
    np.testing.assert_allclose(d[:, 4:], [[0.9, 12], [0.4, 5]], rtol=1e-6)


def test_picodet_distribution_decode():
    hw, strides = (800, 608), (8, 16, 32, 64)
    cells = [math.ceil(hw[0] / s) * math.ceil(hw[1] / s) for s in strides]
    scores = [np.zeros((1, n, 10), dtype=np.float32) for n in cells]
    dists = [np.zeros((1, n, 32), dtype=np.float32) for n in cells]
    j = 2 * 76 + 3  # stride 8, row 2, column 3: centre (28, 20)
    scores[0][0, j, 2] = 0.9
    for side, k in enumerate([2, 1, 3, 4]):  # left, top, right, bottom: k bins of 8 px
        dists[0][0, j, side * 8 + k] = 50.0
    d = prepost.picodet_detections(scores + dists, hw)
    assert d.shape == (1, 6)
    np.testing.assert_allclose(d[0], [28 - 16, 20 - 8, 28 + 24, 20 + 32, 0.9, 2], atol=1e-4)


def test_vad_frames_and_agreement():
    audio = np.arange(1100, dtype=np.float32)
    f = prepost.vad_frames(audio)
    assert f.shape == (3, 576)
    np.testing.assert_array_equal(f[0, :64], 0)  # no context before the first frame
    np.testing.assert_array_equal(f[1, :64], audio[448:512])
    np.testing.assert_array_equal(f[2, 64 : 64 + 76], audio[1024:])
    np.testing.assert_array_equal(f[2, 64 + 76 :], 0)
    ref = score.decode("vad_stream", [[np.array([0.9, 0.8, 0.1, 0.2])], [np.array([0.6, 0.7])]])
    cand = score.decode("vad_stream", [[np.array([0.9, 0.4, 0.1, 0.6])], [np.array([0.6, 0.7])]])
    # frames pooled over clips (4 of 6 agree), not a mean of per-clip means (0.75)
    assert score.agreement("vad_stream", ref, cand) == {"frame_agreement": pytest.approx(4 / 6)}
    truth = {"truth": [np.array([1, 1, 0, 0], bool), np.array([0, 1], bool)]}
    assert score.truth_scores("vad_stream", ref, truth) == {"frame_accuracy": pytest.approx(5 / 6)}


def test_orientation_scores():
    assert score.agreement("orientation", [0, 1, 2, 3], [0, 1, 3, 3]) == {"top1_agreement": 0.75}
    assert score.truth_scores("orientation", [0, 1, 3, 3], {"y": np.array([0, 1, 2, 3])}) == {"top1": 0.75}


def test_fidelity_cosine_and_sqnr():
    ref = [[np.array([1.0, 2.0, 3.0], np.float32), np.array([1.0], np.float32)]]
    cand = [[np.array([1.0, 2.0, 4.0], np.float32), np.array([1.0], np.float32)]]
    fid = score.fidelity(ref, cand, ["a", "b"])
    assert fid["outputs"]["a"]["sqnr_db"] == pytest.approx(10 * math.log10(14), abs=0.01)
    assert fid["outputs"]["a"]["cosine"] == pytest.approx(17 / math.sqrt(14 * 21), abs=1e-6)
    assert fid["outputs"]["b"] == {"cosine": 1.0, "sqnr_db": None}  # identical
    assert fid["min_sqnr_db"] == fid["outputs"]["a"]["sqnr_db"]


def test_resample_keeps_a_tone_at_its_frequency():
    t = np.arange(22050) / 22050
    y = datasets.resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 22050, 16000)
    assert len(y) == 16000
    assert np.abs(np.fft.rfft(y)).argmax() == 1000  # 1 s at 16 kHz: bin k is k Hz
    assert np.abs(y).max() == pytest.approx(1.0, abs=0.02)


def test_runner_counts_quant_nodes_inside_subgraphs(tmp_path):
    from zoo import run

    then = onnx.helper.make_graph(
        [onnx.helper.make_node("DequantizeLinear", ["q", "s"], ["y"])],
        "then",
        [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [
            onnx.helper.make_tensor("q", onnx.TensorProto.INT8, [1], [3]),
            onnx.helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.5]),
        ],
    )
    other = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["y"], value_floats=[0.0])],
        "else",
        [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(tmp_path / "m.onnx"))
    assert run.quant_nodes(str(tmp_path / "m.onnx")) == 1


def test_runner_records_a_failing_mqtool_run(tmp_path):
    from zoo import run

    res = run.mqtool_convert(
        str(tmp_path / "missing.onnx"),
        str(tmp_path / "d.npz"),
        str(tmp_path / "q.onnx"),
        ["--bits", "8"],
        120,
        "",
    )
    assert res["exit_code"] == 2
    assert res["error"].startswith("mqtool: error:") and "missing.onnx" in res["error"]
    assert not (tmp_path / "q.onnx").exists()


def test_runner_explains_a_run_killed_by_a_signal():
    from zoo import run

    row = run.explain_signal({"exit_code": -9, "error": "GA generation 2/4"})
    assert row["error"].startswith("killed by SIGKILL: out of memory") and "GA generation 2/4" in row["error"]
    assert run.explain_signal(dict(row)) == row  # idempotent: --docs-only may apply it again
    assert run.explain_signal({"exit_code": 2, "error": "mqtool: error: x"})["error"] == "mqtool: error: x"
    assert run._cell(row, "det_f1") == "killed (out of memory)"


def test_runner_records_the_self_check_verdict_and_judges_it(tmp_path):
    """A converted model's verdict is read from stderr; "ok" on a file the zoo scores far below the 8-bit
    one, or a warning on one it scores close to it, is a disagreement."""
    from zoo import run

    d = tmp_path
    w = onnx.numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32), "w"
    )
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
        [w],
    )
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), d / "m.onnx")
    np.savez(d / "d.npz", x=np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32))
    res = run.mqtool_convert(str(d / "m.onnx"), str(d / "d.npz"), str(d / "q.onnx"), ["--bits", "8"], 120, "")
    assert res["exit_code"] == 0 and res["self_check"] == "ok"

    bits8 = {"f1": 0.9}
    assert run.verdict_agrees({"f1": 0.85, "self_check": "ok"}, bits8, "f1") is True
    assert run.verdict_agrees({"f1": 0.50, "self_check": "ok"}, bits8, "f1") is False
    assert run.verdict_agrees({"f1": 0.50, "self_check": "poor"}, bits8, "f1") is True
    assert run.verdict_agrees({"f1": 0.89, "self_check": "poor"}, bits8, "f1") is False
    assert run.verdict_agrees({"self_check": "ok"}, bits8, "f1") is None
