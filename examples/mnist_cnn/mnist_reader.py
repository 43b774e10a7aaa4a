"""The bundled MNIST training data as a Python data function:
`mqtool convert examples/mnist_cnn/model.onnx -o q.onnx --bits 4 --data examples/mnist_cnn/mnist_reader.py:reader`
gives the same model, byte for byte, as `--data examples/mnist_cnn/train.npz` (see docs/data.md)."""

import os

import numpy as np

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.npz")


def reader():
    """One (feeds, label) pair per digit: a [1, 28, 28] image in [0, 1] (no batch axis) and its class."""
    d = np.load(TRAIN)
    for x, y in zip(d["x"], d["y"]):
        yield {"input": x}, int(y)
