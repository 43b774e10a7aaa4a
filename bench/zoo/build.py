"""Build (once) the `data.npz` / `heldout.npz` pair of each zoo model in its cache folder.

`data.npz` is what a user passes as `mqtool convert --data` (and ONNX Runtime's calibration reader reads);
`heldout.npz` is for scoring only. A `meta.json` next to them records the builder, sizes and seed, so a
change of any of them rebuilds the pair.
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import datasets
from .models import ZOO, model_dir, model_path

SEED = 20260
# (data samples, held-out samples): sized for a search on 2 CPU cores; the 800 x 608 pages are 5.8 MB each.
SIZES = {
    "textlines": (320, 160),
    "charboxes": (240, 120),
    "faces": (240, 120),
    "pages_layout": (160, 80),
    "pages_rotated": (320, 160),
    "speech": (384, 16),  # held out: 16 clips of 6 s = 2,992 frames of 32 ms
}
QUICK_SIZES = {"speech": (64, 2), "pages_layout": (8, 4)}


def sizes(data: str, quick: bool) -> tuple[int, int]:
    return QUICK_SIZES.get(data, (32, 16)) if quick else SIZES[data]


def _save(path: str, arrays: dict[str, np.ndarray]) -> None:
    tmp = path + ".tmp.npz"  # np.savez appends .npz to names without it
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def build(name: str, quick: bool = False, log=print) -> tuple[str, str]:
    """Paths of (data.npz, heldout.npz) of model `name`, built when missing or stale."""
    z = ZOO[name]
    n_data, n_held = sizes(z.data, quick)
    folder = model_dir(name, quick)
    os.makedirs(folder, exist_ok=True)
    meta = {"data": z.data, "n_data": n_data, "n_held": n_held, "seed": SEED, "version": 1}
    paths = os.path.join(folder, "data.npz"), os.path.join(folder, "heldout.npz")
    meta_path = os.path.join(folder, "meta.json")
    if all(os.path.exists(p) for p in paths) and os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            if json.load(f) == meta:
                return paths
    if z.data == "speech":
        data, held = datasets.build_speech(n_data, n_held, SEED, model_path(name), z.task)
    else:
        data, held = getattr(datasets, f"build_{z.data}")(n_data, n_held, SEED)
    _save(paths[0], data)
    _save(paths[1], held)
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    log(f"{name}: built {z.data} data ({n_data} samples) and held-out set ({n_held})")
    return paths
