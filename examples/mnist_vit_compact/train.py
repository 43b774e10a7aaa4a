"""Train the compact ViT of examples/mnist_vit_compact (embedding width 24) and export ONNX.

    python examples/mnist_vit_compact/train.py

The mnist_vit recipe and code (`examples/mnist_vit/train.py`) at width 24 instead of 48: 3 heads of 8
dimensions, MLP 24 -> 48 -> 24, ~21k parameters. At this width 2-bit weights do cost accuracy (the
"compact ViT probe" of docs/benchmarks.md), so it is the harder case for mixed precision. Writes
``model.onnx`` next to this file; ``train.npz`` / ``test.npz`` here are links to mnist_vit's data.
"""

from __future__ import annotations

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DIM = 24


def _mnist_vit():
    # Loaded by path: `import train` would find this file, which has the same name.
    path = os.path.join(os.path.dirname(HERE), "mnist_vit", "train.py")
    spec = importlib.util.spec_from_file_location("mnist_vit_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    _mnist_vit().main(folder=HERE, name="mnist_vit_compact", dim=DIM)
