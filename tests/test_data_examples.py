"""The two data functions that docs/data.md shows (docs/examples/image_folder.py, text_list.py): the page
holds them verbatim, and on small inputs they give the numbers their docstrings promise. `data_scratch`
builds the folder that the page's console commands run in (tests/test_docs.py)."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from mqtool.data import open_data

from .conftest import ROOT
from .test_passes_qdq import build, w

DOC = os.path.join(ROOT, "docs", "data.md")
EXAMPLES = os.path.join(ROOT, "docs", "examples")
CLASSES = ["cat", "dog", "fox"]
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "the",
    "movie",
    "was",
    "great",
    "bad",
    ",",
    "!",
    "hello",
    "world",
]
TEXTS = [
    (1, "The movie was great!"),
    (0, "the movie was bad"),
    (1, "Hello, world!"),
    (0, "bad bad bad, unknownword"),
    (1, " ".join(["great"] * 50)),  # longer than MAX_LEN: truncated
] * 3


def image_classifier() -> onnx.ModelProto:
    """[N, 3, 224, 224] -> 3 classes: a strided Conv, pooling and a Gemm."""
    return build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 224, 224] input) => (float[N, 3] logits) {
          a = Conv <strides = [8, 8], kernel_shape = [8, 8]> (input, W1, B1)
          r = Relu(a)
          p = GlobalAveragePool(r)
          f = Flatten(p)
          logits = Gemm <transB = 1> (f, Wf, Bf)
        }""",
        {"W1": w(4, 3, 8, 8), "B1": w(4), "Wf": w(3, 4), "Bf": w(3)},
    )


def text_classifier() -> onnx.ModelProto:
    """input_ids, attention_mask [N, 32] (int64) -> 2 classes: embedding, a MatMul, masked mean, Gemm."""
    return build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, 32] input_ids, int64[N, 32] attention_mask) => (float[N, 2] logits) {
          e = Gather(E, input_ids)
          m = Cast <to = 1> (attention_mask)
          m3 = Unsqueeze(m, ax2)
          em = Mul(e, m3)
          h = MatMul(em, W1)
          r = Relu(h)
          s = ReduceSum <keepdims = 0> (r, ax1)
          n = ReduceSum <keepdims = 1> (m, ax1)
          mean = Div(s, n)
          logits = Gemm <transB = 1> (mean, Wf, Bf)
        }""",
        {
            "E": w(len(VOCAB), 8), "W1": w(8, 8), "Wf": w(2, 8), "Bf": w(2),
            "ax1": np.array([1], np.int64), "ax2": np.array([2], np.int64),
        },
    )  # fmt: skip


def solid(colour: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def data_scratch(folder) -> None:
    """What docs/data.md's console commands expect in the folder they run in: the example scripts under
    docs/examples/, classifier.onnx with images/<class>/, text_classifier.onnx with texts.tsv and vocab.txt."""
    os.makedirs(os.path.join(folder, "docs"), exist_ok=True)
    if not os.path.exists(os.path.join(folder, "docs", "examples")):
        os.symlink(EXAMPLES, os.path.join(folder, "docs", "examples"))
    onnx.save(image_classifier(), os.path.join(folder, "classifier.onnx"))
    onnx.save(text_classifier(), os.path.join(folder, "text_classifier.onnx"))
    rng = np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(os.path.join(folder, "images", c), exist_ok=True)
        for i in range(4):  # odd sizes and a grey one: resize, crop and RGB conversion all happen
            size = (int(rng.integers(40, 300)), int(rng.integers(40, 300)))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            img = Image.fromarray(pixels).convert("L" if i == 3 else "RGB")
            img.save(os.path.join(folder, "images", c, f"{c}{i}.{'png' if i % 2 else 'jpg'}"))
    with open(os.path.join(folder, "images", "notes.txt"), "w") as f:  # not a class folder: ignored
        f.write("not an image\n")
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(VOCAB) + "\n")
    with open(os.path.join(folder, "texts.tsv"), "w", encoding="utf-8") as f:
        f.write("".join(f"{label}\t{text}\n" for label, text in TEXTS))


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    data_scratch(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def test_the_page_shows_the_example_files_verbatim():
    text = open(DOC, encoding="utf-8").read()
    for name in ("image_folder.py", "text_list.py"):
        m = re.search(rf"<!-- docs/examples/{name} -->\n```python\n(.*?)```", text, flags=re.S)
        assert m, f"docs/data.md does not show docs/examples/{name}"
        assert m.group(1) == open(os.path.join(EXAMPLES, name), encoding="utf-8").read()


def test_image_folder_example(scratch):
    # Solid colours make the oracle independent of resampling: every pixel is (c / 255 - mean) / std.
    colours = {"cat": (255, 0, 128), "dog": (10, 200, 30), "fox": (0, 0, 0)}
    for c, colour in colours.items():
        for f in os.listdir(scratch / "images" / c):
            os.unlink(scratch / "images" / c / f)
        solid(colour, (300, 120)).save(scratch / "images" / c / "a.png")
        solid(colour, (50, 90)).save(scratch / "images" / c / "b.jpg", quality=100)
    ds = open_data("docs/examples/image_folder.py:samples", image_classifier())
    x = ds.load()["input"]
    assert x.shape == (6, 3, 224, 224) and x.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for sample, label in zip(x, ds.labels):
        want = (np.array(colours[CLASSES[label]]) / 255 - mean) / std
        np.testing.assert_allclose(sample.mean(axis=(1, 2)), want, atol=0.05)  # JPEG: within a few levels
        assert sample.std(axis=(1, 2)).max() < 0.05
    assert sorted(ds.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert ds.labels.tolist() != sorted(ds.labels.tolist())  # shuffled, so the first samples mix classes


def test_image_folder_keeps_orientation(scratch):
    """A horizontal ramp stays horizontal: the crop and the HWC -> CHW transpose are the right way round."""
    for c in CLASSES[1:]:
        for f in os.listdir(scratch / "images" / c):
            os.unlink(scratch / "images" / c / f)
        os.rmdir(scratch / "images" / c)
    for f in os.listdir(scratch / "images" / "cat"):
        os.unlink(scratch / "images" / "cat" / f)
    ramp = np.repeat(np.linspace(0, 255, 400).astype(np.uint8)[None, :, None], 200, axis=0).repeat(3, axis=2)
    Image.fromarray(ramp).save(scratch / "images" / "cat" / "ramp.png")
    x = open_data("docs/examples/image_folder.py:samples", image_classifier()).load()["input"][0]
    assert np.all(np.diff(x[0].mean(axis=0)) >= 0) and x[0].mean(axis=0)[-1] > x[0].mean(axis=0)[0] + 1
    assert x[0].std(axis=0).max() < 1e-5  # constant down each column
    # The centre crop of a 2:1 image resized to height 256 keeps its middle: about 28%..72% of the ramp.
    mean, std = 0.485, 0.229
    lo, hi = (x[0, 0, [0, -1]] * std + mean) * 255
    assert 255 * 0.25 < lo < 255 * 0.31 and 255 * 0.69 < hi < 255 * 0.75


def test_text_list_example(scratch):
    ds = open_data("docs/examples/text_list.py:samples", text_classifier())
    got = ds.load()
    ids, mask = got["input_ids"], got["attention_mask"]
    assert ids.shape == mask.shape == (len(TEXTS), 32) and ids.dtype == mask.dtype == np.int64
    v = {t: i for i, t in enumerate(VOCAB)}
    hello = [v["[CLS]"], v["hello"], v[","], v["world"], v["!"], v["[SEP]"]]
    assert ids[2, :6].tolist() == hello and ids[2, 6:].tolist() == [0] * 26
    assert mask[2].tolist() == [1] * 6 + [0] * 26
    assert ids[3, :8].tolist() == [
        v["[CLS]"],
        v["bad"],
        v["bad"],
        v["bad"],
        v[","],
        v["[UNK]"],
        v["[SEP]"],
        0,
    ]
    assert ids[4, 0] == v["[CLS]"] and ids[4, 31] == v["[SEP]"] and mask[4].all()  # truncated to 32
    assert ds.labels.tolist() == [label for label, _ in TEXTS]
