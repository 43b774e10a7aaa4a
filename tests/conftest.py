"""Shared fixtures: paths of the bundled examples and the zoo models that the onnx package ships."""

from __future__ import annotations

import glob
import os

import onnx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/*.onnx")))
EXAMPLES = ("mnist_cnn", "mnist_vit")


def example_path(name: str, file: str = "model.onnx") -> str:
    return os.path.join(ROOT, "examples", name, file)


@pytest.fixture(scope="session")
def root() -> str:
    return ROOT


@pytest.fixture(autouse=True)
def _subnormals_back_on():
    """Tests that build a search context directly (not through `mqtool.search.api`, which restores it) leave
    the process-wide flush-denormal flag on; later tests (hypothesis among them) expect torch's default."""
    yield
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_flush_denormal(False)
