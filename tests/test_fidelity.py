"""Task-term fidelity measures (mqtool.fidelity) against hand-made arrays whose answers are worked out by
hand: CTC decoding, per-position agreement, KL per output kind, sigmoid decisions, SQNR and cosine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mqtool.errors import InputError
from mqtool.fidelity import (
    ABS_DIFF,
    ACCURACY,
    COSINE,
    CTC,
    DECISION,
    KL,
    POSITIVES,
    SEQUENCE,
    SQNR,
    TOP1,
    ctc_agreement,
    ctc_greedy_decode,
    decision_agreement,
    kl_per_sample,
    log_probs,
    model_fidelity,
    output_fidelity,
    paired_gap,
    positive_overlap,
    sequence_agreement,
    sqnr_db,
    top1_agreement,
)
from mqtool.outputs import OutputKind, OutputSpec


def spec(kind: OutputKind, name: str = "y", weight: float = 1.0) -> OutputSpec:
    return OutputSpec(name, name, kind, "hand-made", weight)


def one_hot(indices, classes: int = 4, high: float = 5.0) -> np.ndarray:
    """Logits whose argmax per position is `indices` ([N, T] -> [N, T, classes])."""
    idx = np.asarray(indices)
    out = np.zeros((*idx.shape, classes), np.float32)
    np.put_along_axis(out, idx[..., None], high, axis=-1)
    return out


def test_ctc_greedy_decode_collapses_repeats_then_drops_the_blank():
    assert ctc_greedy_decode(np.array([[0, 1, 1, 0, 1, 2, 2, 0]])) == [(1, 1, 2)]
    # The blank is a parameter: with blank 2, index 0 is a character.
    assert ctc_greedy_decode(np.array([[2, 1, 1, 2, 0, 0]]), blank=2) == [(1, 0)]
    assert ctc_greedy_decode(np.array([[0, 0, 0]])) == [()]
    assert ctc_greedy_decode(np.array([3, 3, 0, 3])) == [(3, 3)]  # one sample without its axis


def test_ctc_agreement_compares_decoded_strings_not_positions():
    ref = one_hot([[1, 1, 0, 2, 0], [1, 0, 2, 2, 0]])
    # Sample 0: repeats and blanks moved, the same string "1 2"; sample 1: "1 2" became "1 3".
    cand = one_hot([[1, 0, 0, 2, 2], [1, 0, 3, 3, 0]])
    np.testing.assert_array_equal(ctc_agreement(ref, cand), [1.0, 0.0])
    np.testing.assert_allclose(top1_agreement(ref, cand), [3 / 5, 3 / 5])
    np.testing.assert_array_equal(sequence_agreement(ref, cand), [0.0, 0.0])
    # blank=3 reads the same arrays differently: sample 1 now decodes "1 0 2 0" against "1 0 0".
    np.testing.assert_array_equal(ctc_agreement(ref, cand, blank=3), [0.0, 0.0])


def test_positions_count_every_axis_between_samples_and_classes():
    ref = one_hot(
        [[[1], [2], [3]], [[0], [0], [1]]]
    )  # [N=2, T=3, 1, C=4]: time-major output put sample-major
    cand = one_hot([[[1], [2], [0]], [[0], [0], [1]]])
    np.testing.assert_allclose(top1_agreement(ref, cand), [2 / 3, 1.0])
    np.testing.assert_array_equal(sequence_agreement(ref, cand), [0.0, 1.0])
    fid = output_fidelity(spec(OutputKind.LOGITS), ref, cand)
    assert fid.agreement == pytest.approx(5 / 6) and fid.agreement_measure == TOP1
    assert fid.measures[SEQUENCE] == 0.5 and fid.measures[CTC] == 0.5
    assert list(fid.measures)[:3] == [TOP1, SEQUENCE, CTC]


def test_kl_reads_each_distribution_kind_for_what_it_is():
    p = np.array([[0.5, 0.5]])
    q = np.array([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_per_sample(p, q, OutputKind.PROBS)[0] == pytest.approx(expected)
    # The same distributions as log-probabilities, and as logits (any shift of a logit vector is the same).
    assert kl_per_sample(np.log(p), np.log(q), OutputKind.LOG_PROBS)[0] == pytest.approx(expected)
    assert kl_per_sample(np.log(p) + 3, np.log(q) - 1, OutputKind.LOGITS)[0] == pytest.approx(expected)
    # Reading probabilities as logits (softmax again) would give another, smaller number.
    assert kl_per_sample(p, q, OutputKind.LOGITS)[0] < expected / 4
    np.testing.assert_allclose(np.exp(log_probs(np.array([[1.0, 2.0, 3.0]]), OutputKind.LOGITS)).sum(), 1.0)


def test_kl_of_a_zero_probability_is_large_but_finite_and_per_position_mean():
    ref = np.array([[[0.5, 0.5], [1.0, 0.0]]])  # one sample, two positions
    cand = np.array([[[1.0, 0.0], [1.0, 0.0]]])
    kl = kl_per_sample(ref, cand, OutputKind.PROBS)
    # Position 0: 0.5 log(0.5/1) + 0.5 log(0.5/1e-8) (the floor), position 1: 0 (0 log 0 = 0); mean of both.
    want = (0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-8)) / 2
    assert np.isfinite(kl[0]) and kl[0] == pytest.approx(want, rel=1e-6)


def test_top1_accuracy_with_labels_only_for_one_distribution_per_sample():
    ref = one_hot([[1], [2], [3], [0]])[:, 0]  # [4, C]
    cand = one_hot([[1], [2], [0], [0]])[:, 0]
    labels = np.array([1, 2, 3, 3])
    fid = output_fidelity(spec(OutputKind.LOGITS), ref, cand, labels)
    assert fid.reference[ACCURACY] == 0.75 and fid.measures[ACCURACY] == 0.5
    assert fid.agreement == 0.75 and SEQUENCE not in fid.measures and CTC not in fid.measures
    seq = output_fidelity(spec(OutputKind.LOGITS), one_hot([[1, 2]] * 4), one_hot([[1, 2]] * 4), labels)
    assert ACCURACY not in seq.measures and seq.reference == {}


def test_sigmoid_outputs_are_judged_by_their_decisions():
    ref = np.array([[0.2, 0.7, 0.6], [0.9, 0.1, 0.4]])
    cand = np.array([[0.4, 0.4, 0.9], [0.8, 0.2, 0.3]])
    np.testing.assert_allclose(decision_agreement(ref, cand), [2 / 3, 1.0])
    np.testing.assert_allclose(positive_overlap(ref, cand), [1 / 2, 1.0])  # {1, 2} vs {2}; {0} vs {0}
    fid = output_fidelity(spec(OutputKind.SIGMOID), ref, cand)
    assert fid.agreement_measure == POSITIVES and fid.agreement == pytest.approx(3 / 4)
    assert fid.measures[DECISION] == pytest.approx(5 / 6)
    assert fid.measures[ABS_DIFF] == pytest.approx(np.abs(ref - cand).mean())
    assert KL not in fid.measures
    # one value per sample (a VAD's speech probability): the overlap is the decision agreement
    one = output_fidelity(spec(OutputKind.SIGMOID), ref[:, :1], cand[:, :1])
    assert one.agreement_measure == DECISION and one.agreement == pytest.approx(1.0)


def test_sparse_score_maps_are_judged_by_the_overlap_of_their_positives():
    # a detector's score map: 2,000 scores per image, a handful above 0.5; the candidate keeps one of
    # fp32's four detections per image and adds one of its own
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.0, 0.3, size=(3, 2000))
    ref[:, :4] = 0.9
    cand = ref.copy()
    cand[:, 1:4] = 0.2
    cand[:, 10] = 0.8
    fid = output_fidelity(spec(OutputKind.SIGMOID), ref, cand)
    np.testing.assert_allclose(fid.per_sample[POSITIVES], [1 / 5] * 3)
    assert fid.measures[DECISION] == pytest.approx(1 - 4 / 2000)
    assert fid.agreement == pytest.approx(0.2)
    # no positives on either side agrees fully; a NaN candidate calls nothing
    assert positive_overlap(ref[:1] * 0, ref[:1] * 0)[0] == 1.0
    assert positive_overlap(ref[:1], np.full_like(ref[:1], np.nan))[0] == 0.0


def test_sqnr_and_cosine_known_values():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    noise = np.array([[0.1, -0.1], [0.1, -0.1]])
    assert sqnr_db(ref, ref + noise) == pytest.approx(10 * math.log10(30 / 0.04))
    assert sqnr_db(ref, ref) == math.inf and sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    # Per sample: scaled (1), opposite (-1, clipped to 0 in the agreement), orthogonal (0), both zero (1).
    r = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    c = np.array([[2.0, 4.0], [-1.0, -2.0], [0.0, 3.0], [0.0, 0.0]])
    fid = output_fidelity(spec(OutputKind.REGRESSION), r, c)
    assert fid.measures[COSINE] == pytest.approx((1 - 1 + 0 + 1) / 4)
    assert fid.agreement == pytest.approx((1 + 0 + 0 + 1) / 4) and fid.agreement_measure == COSINE
    assert fid.measures[SQNR] == pytest.approx(sqnr_db(r, c))
    emb = output_fidelity(spec(OutputKind.EMBEDDING), r, c)
    assert list(emb.measures) == [COSINE] and emb.agreement == fid.agreement


def test_non_finite_candidate_samples_agree_on_nothing():
    ref = one_hot([[1], [2], [3]])[:, 0]
    cand = ref.copy()
    cand[1, 0] = np.nan
    fid = output_fidelity(spec(OutputKind.LOGITS), ref, cand)
    assert fid.nonfinite == 1 and fid.agreement == pytest.approx(2 / 3) and fid.measures[KL] == math.inf
    reg = output_fidelity(spec(OutputKind.REGRESSION), ref, cand)
    assert reg.agreement == pytest.approx(2 / 3) and reg.measures[SQNR] == -math.inf
    assert reg.to_json()["measures"][SQNR] is None  # JSON has no infinities


def test_model_agreement_is_the_weighted_mean_over_scored_outputs():
    ref = {"a": one_hot([[1], [2], [3], [0]])[:, 0], "b": np.array([[0.9], [0.9], [0.1], [0.1]]), "s": None}
    cand = {"a": one_hot([[1], [2], [0], [1]])[:, 0], "b": np.array([[0.9], [0.1], [0.1], [0.1]]), "s": None}
    specs = [
        spec(OutputKind.LOGITS, "a", 3.0),
        spec(OutputKind.SIGMOID, "b", 1.0),
        OutputSpec("s", "s", OutputKind.NONE, "state", 0.0),
    ]
    fid = model_fidelity(specs, ref, cand)
    assert [o.name for o in fid.outputs] == ["a", "b"]
    assert fid.output("a").agreement == 0.5 and fid.output("b").agreement == 0.75
    assert fid.agreement == pytest.approx((3 * 0.5 + 0.75) / 4)
    np.testing.assert_allclose(fid.per_sample, [1.0, 0.75, 0.25, 0.25])  # (3 a + b) / 4 per sample
    assert fid.stderr == pytest.approx(np.std(fid.per_sample, ddof=1) / 2)
    assert fid.to_json()["outputs"][1]["kind"] == "independent probabilities"


def test_mismatched_or_missing_values_are_input_errors():
    with pytest.raises(
        InputError, match=r"output 'y': the candidate's values have shape \[2, 3\], fp32's \[2, 4\]"
    ):
        output_fidelity(spec(OutputKind.LOGITS), np.zeros((2, 4)), np.zeros((2, 3)))
    with pytest.raises(InputError, match="output 'y': no values to compare"):
        model_fidelity([spec(OutputKind.LOGITS)], {"y": np.zeros((2, 4))}, {"y": None})


def test_paired_gap_uses_the_per_sample_differences():
    a = np.array([1.0, 1.0, 0.0, 1.0])
    b = np.array([1.0, 0.0, 0.0, 0.0])
    gap, se = paired_gap(a, b)
    assert gap == 0.5 and se == pytest.approx(np.std([0, 1, 0, 1], ddof=1) / 2)
    gap, se = paired_gap(a, b[:3])  # not the same samples: the two errors combined
    assert gap == pytest.approx(0.75 - 1 / 3)
    assert se == pytest.approx(math.hypot(np.std(a, ddof=1) / 2, np.std(b[:3], ddof=1) / math.sqrt(3)))


def test_a_detectors_score_rows_are_judged_by_the_detections_they_make():
    """YOLO-style [N, 4 + 2, anchors]: boxes in pixels, two score rows in [0, 1]. Jittered boxes keep every
    detection (agreement 1) while cosine notices nothing either way; scores pushed under the threshold lose
    them, which the whole-output cosine hides (it is carried by the boxes) and the score agreement shows."""
    from mqtool.fidelity import SCORES, score_agreement

    rng = np.random.default_rng(0)
    n, anchors = 4, 50
    boxes = rng.uniform(0, 320, (n, 4, anchors))
    scores = np.zeros((n, 2, anchors))
    scores[:, 0, :5] = 0.8  # five detections of class 0 per sample
    scores[0, 1, 10] = 0.6  # and one of class 1 in sample 0
    ref = np.concatenate([boxes, scores], axis=1)
    jitter = ref + np.concatenate([rng.normal(0, 2, boxes.shape), np.zeros_like(scores)], axis=1)
    assert score_agreement(ref, jitter) == pytest.approx(np.ones(n))
    lost = ref.copy()
    lost[:, 4, :3] = 0.1  # three of the five class-0 detections fall under 0.25
    expected = np.array([3 / 6, 2 / 5, 2 / 5, 2 / 5])  # sample 0 also keeps its class-1 detection
    assert score_agreement(ref, lost) == pytest.approx(expected)
    spurious = ref.copy()
    spurious[:, 5, 40:45] = 0.9  # five false detections per sample: 5 / 10 kept
    assert score_agreement(ref, spurious)[1:] == pytest.approx(np.full(n - 1, 0.5))
    fid = output_fidelity(spec(OutputKind.REGRESSION), ref, lost)
    assert fid.measures[COSINE] > 0.999 and fid.measures[SCORES] == pytest.approx(expected.mean())
    # no score rows (all channels unbounded), or no fp32 detection: no such measure
    assert score_agreement(ref * 1000 - 1, lost) is None
    assert score_agreement(np.concatenate([boxes, scores * 0.1], axis=1), lost) is None
