"""Scoring a candidate model against the float one on `heldout.npz`, on ONNX Runtime (CPU, 2 threads).

Task scores, each comparing the candidate's decoded outputs with fp32's on the same inputs:

- `ocr_*` (ddddocr recogniser): `string_agreement`, the share of text lines whose greedy-CTC string equals
  fp32's; plus `exact` and `exact_nocase` against the rendered strings.
- `yolox`, `yolov8`, `picodet` (detectors): `det_f1`, detections after the wheel's decoding + NMS matched to
  fp32's one-to-one at IoU >= 0.5 with the same class, F1 of the counts summed over all images; plus
  `truth_f1` against the rendered boxes where the data has them.
- `orientation`: `top1` against the labels and `top1_agreement` with fp32.
- `vad_*`: `frame_agreement`, the share of 32 ms frames whose decision (speech probability > 0.5) equals
  fp32's, each clip streamed from a zero state (`vad_stream`: frame by frame, the state carried from the
  model's own output, as the wheel's `OnnxWrapper` does; `vad_sequence`: one call per clip); plus
  `frame_accuracy` against where the speech was placed.

Fidelity, for every model: `cosine` and `sqnr_db` of each raw float output over all held-out samples (as
`mqtool validate` defines them), and their worst value over the outputs (`min_cosine`, `min_sqnr_db`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import prepost
from .models import charset as ddddocr_charset
from .models import session

BATCH = 16  # for models whose batch dimension is free


def run_heldout(sess, task: str, held: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    """Raw outputs of `sess` per held-out sample (clip for the VAD models): a list of output lists."""
    if task.startswith("vad"):
        return [_vad_clip(sess, task, audio) for audio in held["audio"]]
    name = sess.get_inputs()[0].name
    x = held[name]
    dim0 = sess.get_inputs()[0].shape[0]
    step = 1 if isinstance(dim0, int) else BATCH
    outs = []
    for i in range(0, len(x), step):
        res = sess.run(None, {name: x[i : i + step]})
        if step == 1:
            outs.append(res)
        else:
            outs += [[r[j : j + 1] for r in res] for j in range(len(res[0]))]
    return outs


def _vad_clip(sess, task: str, audio: np.ndarray) -> list[np.ndarray]:
    frames = prepost.vad_frames(audio)
    if task == "vad_sequence":
        z = np.zeros((1, 1, 128), dtype=np.float32)
        probs, h, c = sess.run(None, {"input": frames, "h": z, "c": z})
        return [np.asarray(probs, np.float32).reshape(-1), np.asarray(h), np.asarray(c)]
    state = np.zeros((2, 1, 128), dtype=np.float32)
    sr = np.array(16000, dtype=np.int64)
    probs, states = [], []
    for t in range(len(frames)):
        p, state = sess.run(None, {"input": frames[t : t + 1], "state": state, "sr": sr})
        probs.append(np.asarray(p).reshape(-1)[0])
        states.append(state)
    return [np.array(probs, dtype=np.float32), np.stack(states)]


def decode(task: str, outs: list[list[np.ndarray]], charset: list[str] | None = None) -> list:
    """Per sample: the string (OCR; `charset` defaults to the wheel's for the task), detections [k, 6],
    class index (orientation) or decisions (VAD)."""
    if task.startswith("ocr"):
        cs = charset if charset is not None else ddddocr_charset(task.split("_")[1])
        return [prepost.ocr_text(o[0], cs) for o in outs]
    if task == "yolox":
        return [prepost.yolox_detections(o[0]) for o in outs]
    if task == "yolov8":
        return [prepost.yolov8_detections(o[0][0]) for o in outs]
    if task == "picodet":
        return [prepost.picodet_detections(o) for o in outs]
    if task == "orientation":
        return [int(np.asarray(o[0]).reshape(-1).argmax()) for o in outs]
    if task.startswith("vad"):
        return [o[0] > 0.5 for o in outs]
    raise ValueError(f"unknown task {task!r}")


def _det_f1(ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    counts = np.sum([prepost.match_counts(r, c) for r, c in zip(ref, cand)], axis=0).reshape(3)
    return prepost.f1(*map(int, counts))


def truth_scores(task: str, decoded: list, held: dict[str, np.ndarray]) -> dict[str, float]:
    """Scores against the ground truth the data carries (rendered strings, boxes, labels, speech spans)."""
    if task.startswith("ocr"):
        text = [str(t) for t in held["text"]]
        return {
            "exact": float(np.mean([p == t for p, t in zip(decoded, text)])),
            "exact_nocase": float(np.mean([p.lower() == t.lower() for p, t in zip(decoded, text)])),
        }
    if task in ("yolox", "picodet") and "boxes" in held:
        truth = []
        for b in held["boxes"]:
            b = b[b[:, 0] >= 0]
            cls = b[:, 4] if b.shape[1] == 5 else np.zeros(len(b))
            truth.append(np.concatenate([b[:, :4], np.ones((len(b), 1)), cls[:, None]], axis=1))
        return {"truth_f1": _det_f1(truth, decoded)}
    if task == "orientation":
        return {"top1": float(np.mean(np.array(decoded) == held["y"]))}
    if task.startswith("vad"):
        return {
            "frame_accuracy": float(np.mean(np.concatenate([d == t for d, t in zip(decoded, held["truth"])])))
        }
    return {}


def agreement(task: str, ref: list, cand: list) -> dict[str, float]:
    """The task score of `cand` against fp32's decoded outputs `ref`."""
    if task.startswith("ocr"):
        return {"string_agreement": float(np.mean([r == c for r, c in zip(ref, cand)]))}
    if task in ("yolox", "yolov8", "picodet"):
        return {"det_f1": _det_f1(ref, cand), "detections": sum(len(c) for c in cand)}
    if task == "orientation":
        return {"top1_agreement": float(np.mean(np.array(ref) == np.array(cand)))}
    if task.startswith("vad"):
        return {"frame_agreement": float(np.mean(np.concatenate([r == c for r, c in zip(ref, cand)])))}
    raise ValueError(f"unknown task {task!r}")


MAIN_SCORE = {
    "ocr_beta": "string_agreement",
    "ocr_old": "string_agreement",
    "yolox": "det_f1",
    "yolov8": "det_f1",
    "picodet": "det_f1",
    "orientation": "top1_agreement",
    "vad_stream": "frame_agreement",
    "vad_sequence": "frame_agreement",
}


@dataclass
class _Acc:
    dot: float = 0.0
    ref2: float = 0.0
    q2: float = 0.0
    err2: float = 0.0

    def add(self, r: np.ndarray, q: np.ndarray) -> None:
        r, q = np.asarray(r, np.float64).ravel(), np.asarray(q, np.float64).ravel()
        self.dot += float(r @ q)
        self.ref2 += float(r @ r)
        self.q2 += float(q @ q)
        self.err2 += float((r - q) @ (r - q))


def fidelity(ref: list[list[np.ndarray]], cand: list[list[np.ndarray]], names: list[str]) -> dict:
    """Cosine and SQNR (dB) per float output over all samples, and the worst of each over the outputs.
    An SQNR of None means the outputs are identical."""
    accs = [_Acc() for _ in names]
    for r, c in zip(ref, cand):
        for k, acc in enumerate(accs):
            if np.asarray(r[k]).dtype.kind == "f":
                acc.add(r[k], c[k])
    per = {}
    for name, a in zip(names, accs):
        den = math.sqrt(a.ref2 * a.q2)
        cos = a.dot / den if den else (1.0 if a.ref2 == a.q2 else 0.0)
        sqnr = None if a.err2 == 0 else (10 * math.log10(a.ref2 / a.err2) if a.ref2 else -math.inf)
        per[name] = {"cosine": round(cos, 6), "sqnr_db": None if sqnr is None else round(sqnr, 2)}
    finite = [v["sqnr_db"] for v in per.values() if v["sqnr_db"] is not None]
    return {
        "outputs": per,
        "min_cosine": min(v["cosine"] for v in per.values()),
        "min_sqnr_db": min(finite) if finite else None,
    }


@dataclass
class Reference:
    """fp32's raw and decoded outputs on the held-out set, computed once per model."""

    task: str
    held: dict[str, np.ndarray]
    raw: list[list[np.ndarray]]
    decoded: list
    output_names: list[str]
    scores: dict = field(default_factory=dict)


def reference(model_path: str, task: str, held: dict[str, np.ndarray]) -> Reference:
    sess = session(model_path)
    t0 = time.perf_counter()
    raw = run_heldout(sess, task, held)
    seconds = time.perf_counter() - t0
    dec = decode(task, raw)
    names = [o.name for o in sess.get_outputs()]
    ref = Reference(task, held, raw, dec, names)
    ref.scores = {
        **agreement(task, dec, dec),
        **truth_scores(task, dec, held),
        "heldout_s": round(seconds, 2),
    }
    return ref


def score(candidate_path: str, ref: Reference) -> dict:
    """Task scores and fidelity of the candidate at `candidate_path` against the fp32 `ref`."""
    sess = session(candidate_path)
    t0 = time.perf_counter()
    raw = run_heldout(sess, ref.task, ref.held)
    seconds = time.perf_counter() - t0
    dec = decode(ref.task, raw)
    return {
        **agreement(ref.task, ref.decoded, dec),
        **truth_scores(ref.task, dec, ref.held),
        "fidelity": fidelity(ref.raw, raw, ref.output_names),
        "heldout_s": round(seconds, 2),
    }
