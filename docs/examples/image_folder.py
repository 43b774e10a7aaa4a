"""Samples for an image classifier from a folder of images: `mqtool ... --data image_folder.py:samples`.

Layout: IMAGE_DIR/<class>/<image> (class folders sorted by name give the label indices, as torchvision's
ImageFolder does), or the images directly in IMAGE_DIR for unlabelled data. Edit the constants for your model.
"""

import random
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_DIR = Path("images")  # relative to the folder you run mqtool in
INPUT = "input"  # the model's input name (`mqtool inspect MODEL --json` lists it)
SIZE = 224  # the model's input height and width
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # the normalisation the model was trained with
STD = np.array([0.229, 0.224, 0.225], np.float32)
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def preprocess(path: Path) -> np.ndarray:
    """Resize the short side to SIZE * 256 / 224, centre-crop SIZE x SIZE, scale to [0, 1], normalise:
    one sample [3, SIZE, SIZE] (no batch axis: mqtool adds it)."""
    img = Image.open(path).convert("RGB")
    scale = SIZE * 256 / 224 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
    left, top = (img.width - SIZE) // 2, (img.height - SIZE) // 2
    img = img.crop((left, top, left + SIZE, top + SIZE))
    x = (np.asarray(img, np.float32) / 255.0 - MEAN) / STD
    return x.transpose(2, 0, 1)  # HWC -> CHW


def samples():
    """Yield ({INPUT: image}, label) pairs, or {INPUT: image} feeds without class folders."""
    classes = sorted(p.name for p in IMAGE_DIR.iterdir() if p.is_dir())
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((IMAGE_DIR / c).iterdir())]
    else:
        files = [(f, None) for f in sorted(IMAGE_DIR.iterdir())]
    files = [(f, label) for f, label in files if f.suffix.lower() in EXTENSIONS]
    # mqtool calibrates on the first samples: shuffle (with a fixed seed) so that they cover every class.
    random.Random(0).shuffle(files)
    for f, label in files:
        feed = {INPUT: preprocess(f)}
        yield feed if label is None else (feed, label)
