"""Data from a user's Python function (`--data loader.py:make` / `package.module:make`): every form of
item gives the samples and labels of the equivalent `.npz`, byte-identical models, and every failure of the
user's code is one `InputError` line naming the file, the function and the message."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import mqtool.data
from mqtool.cli import cli
from mqtool.data import load_labelled, open_data
from mqtool.dataspec import DataSpec
from mqtool.errors import InputError

from .test_passes_qdq import cnn

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 3, 8, 8)).astype(np.float32)
Y = RNG.integers(0, 4, 40)


def script(tmp_path, body: str, name: str = "loader.py") -> str:
    """A loader file holding `body`; X and Y are in `data.npz` next to it."""
    np.savez(tmp_path / "data.npz", x=X, y=Y)
    path = tmp_path / name
    head = "import numpy as np\nimport os\nD = np.load(os.path.join(os.path.dirname(__file__), 'data.npz'))\n"
    path.write_text(head + textwrap.dedent(body))
    return str(path)


FORMS = {
    # ORT's documented pattern: one sample per feed with a leading batch axis, label beside it.
    "pairs_batch_of_one": """
        def make():
            for i in range(40):
                yield {"x": D["x"][i : i + 1]}, int(D["y"][i])
    """,
    "samples_without_batch_axis": """
        def make():
            return [({"x": D["x"][i]}, D["y"][i]) for i in range(40)]
    """,
    "batches_with_y_key": """
        def make():
            for i in range(0, 40, 7):
                yield {"x": D["x"][i : i + 7], "y": D["y"][i : i + 7]}
    """,
    "torch_style_array_label_pairs": """
        def make():
            return ((D["x"][i], np.int64(D["y"][i])) for i in range(40))
    """,
    "calibration_data_reader": """
        class Reader:
            def __init__(self):
                self.i = 0

            def get_next(self):
                if self.i >= 40:
                    return None
                self.i += 5
                return {"x": D["x"][self.i - 5 : self.i], "y": D["y"][self.i - 5 : self.i]}

        def make():
            return Reader()
    """,
    "one_dict_of_arrays": """
        def make():
            return {"x": D["x"], "y": D["y"]}
    """,
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_reads_as_the_npz(tmp_path, form):
    path = script(tmp_path, FORMS[form])
    npz = open_data(tmp_path / "data.npz", cnn())
    got = open_data(f"{path}:make", cnn())
    np.testing.assert_array_equal(got.load()["x"], npz.load()["x"])
    np.testing.assert_array_equal(got.labels, Y)
    assert got.labels.dtype == np.int64 and got.num_samples == 40
    assert [len(b["x"]) for b in got.batches(16)] == [16, 16, 8]


def test_unlabelled_function_and_model_input_name(tmp_path):
    path = script(tmp_path, "def make():\n    return ({'x': D['x'][i]} for i in range(40))\n")
    model = cnn()
    model.graph.input[0].name = "image"  # the name, not only `x`, is accepted as the key
    model.graph.node[0].input[0] = "image"
    inputs, labels = load_labelled(f"{path}:make", model)
    assert labels is None and list(inputs) == ["image"]
    np.testing.assert_array_equal(inputs["image"], X)
    path = script(tmp_path, "def make():\n    return ({'image': D['x'][i]} for i in range(40))\n", "named.py")
    np.testing.assert_array_equal(load_labelled(f"{path}:make", model)[0]["image"], X)


def test_convert_gives_the_bytes_of_the_npz_route(tmp_path):
    onnx.save(cnn(), tmp_path / "m.onnx")
    path = script(tmp_path, FORMS["batches_with_y_key"])
    digests = []
    for data in (str(tmp_path / "data.npz"), f"{path}:make"):
        out = tmp_path / f"q{len(digests)}.onnx"
        r = CliRunner().invoke(
            cli, ["convert", str(tmp_path / "m.onnx"), "-o", str(out), "--bits", "4"] + ["--data", data]
        )
        assert r.exit_code == 0, r.stderr
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_module_spec_is_imported_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "__init__.py").write_text("")
    np.savez(tmp_path / "data.npz", x=X, y=Y)
    (tmp_path / "mydata" / "feeds.py").write_text(
        "import numpy as np\n\ndef make():\n    d = np.load('data.npz')\n    return {'x': d['x'], 'y': d['y']}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    ds = open_data("mydata.feeds:make", cnn())
    np.testing.assert_array_equal(ds.labels, Y)
    assert os.fspath(DataSpec("mydata.feeds:make")) == str(tmp_path / "mydata" / "feeds.py")
    with pytest.raises(InputError, match=r"^nodata\.feeds:make: no module named 'nodata'"):
        open_data("nodata.feeds:make", cnn())
    assert "" not in sys.path[:1] and str(tmp_path) not in sys.path  # sys.path is restored


def test_a_script_imports_its_neighbours(tmp_path):
    (tmp_path / "helper_for_loader.py").write_text("SCALE = 2.0\n")
    path = script(
        tmp_path,
        """
        def make():
            from helper_for_loader import SCALE  # imported when the function runs
            return {"x": D["x"] * SCALE}
    """,
    )
    np.testing.assert_array_equal(open_data(f"{path}:make", cnn()).load()["x"], X * 2)


def test_an_existing_path_is_data_never_code(tmp_path):
    """`trap.py:run` names a file that exists: it is read as data, and trap.py (which would raise) never runs."""
    (tmp_path / "trap.py").write_text("raise SystemExit('imported!')\ndef run():\n    pass\n")
    np.savez(tmp_path / "d.npz", x=X)
    os.rename(tmp_path / "d.npz", tmp_path / "trap.py:run")
    spec = DataSpec(str(tmp_path / "trap.py:run"))
    assert spec.kind == "file"
    np.testing.assert_array_equal(open_data(spec, cnn()).load()["x"], X)
    np.savez(tmp_path / "train.npz", x=X)
    with pytest.raises(InputError, match=r"train\.npz:x: .*train\.npz is not a \.py file"):
        open_data(str(tmp_path / "train.npz:x"), cnn())


FAILURES = [
    (
        "def make():\n    raise RuntimeError('camera\\n offline')\n",
        r"the function raised RuntimeError: camera offline",
    ),
    (
        "def make():\n    yield {'x': D['x'][:3]}\n    raise OSError('disk gone')\n",
        r"the function raised OSError after 1 item: disk gone",
    ),
    ("import sys\ndef make():\n    sys.exit(3)\n", r"the function raised SystemExit: 3"),
    ("def make(:\n", r"importing .*loader\.py raised SyntaxError"),
    ("import no_such_module_xyz\n", r"importing .*loader\.py raised ModuleNotFoundError"),
    ("def other():\n    pass\n", r"loader\.py has no function 'make'"),
    ("make = 3\n", r"'make' is a int, not a function"),
    ("def make():\n    return 3\n", r"the function returned int; expected an iterable"),
    ("def make():\n    return iter([])\n", r"the function yielded no samples"),
    (
        "def make():\n    return [{'x': D['x'][0]}, ({'x': D['x'][1]}, 2)]\n",
        r"item 1 has a label and earlier",
    ),
    (
        "def make():\n    return [{'x': D['x'][:2]}, {'x': D['x'][:2, :, :4]}]\n",
        r"item 1: 'x' has sample shape",
    ),
    (
        "def make():\n    return [{'x': D['x'][:2], 'y': [1, 2, 3]}]\n",
        r"item 0: label 'y' has shape \[3\] for 2",
    ),
    (
        "def make():\n    return [{'x': D['x'][0, 0]}]\n",
        r"item 0: 'x' has shape \[8, 8\]; model input 'x' takes a batch of rank 4 or one sample of rank 3",
    ),
    (
        "def make():\n    return [{'img': D['x'][0]}]\n",
        r"no array for model input 'x' \(the function yields \['img'\]",
    ),
    (
        "def make():\n    return [{'x': D['x'][:2], 'y': [0, 4]}]\n",
        r"array 'y' has label 4 at sample 1, .* 4 classes",
    ),
    ("def make():\n    return [{'x': D['x'][:2].astype(np.int64)}]\n", r"array 'x' has dtype int64"),
]


@pytest.mark.parametrize("body, message", FAILURES)
def test_failures_are_one_line_naming_file_and_function(tmp_path, body, message):
    path = script(tmp_path, body)
    with pytest.raises(InputError, match=message) as e:
        open_data(f"{path}:make", cnn())
    assert str(e.value).startswith(f"{path}:make: ") and "\n" not in str(e.value)


def test_raising_function_exits_2_with_one_line_in_a_real_process(tmp_path):
    onnx.save(cnn(), tmp_path / "m.onnx")
    path = script(tmp_path, "def make():\n    raise RuntimeError('camera offline')\n")
    cmd = [
        sys.executable,
        "-m",
        "mqtool",
        "convert",
        str(tmp_path / "m.onnx"),
        "-o",
        str(tmp_path / "q.onnx"),
    ]
    r = subprocess.run(
        [*cmd, "--bits", "8", "--data", f"{path}:make"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert r.stderr == f"mqtool: error: {path}:make: the function raised RuntimeError: camera offline\n"
    assert not (tmp_path / "q.onnx").exists()


def test_max_samples_bounds_what_is_materialised(tmp_path, monkeypatch, caplog):
    path = script(
        tmp_path,
        """
        CALLS = []

        def forever():
            i = 0
            while True:
                CALLS.append(i)
                yield {"x": D["x"][i % 40 : i % 40 + 3]}
                i += 3
    """,
    )
    monkeypatch.setattr(mqtool.data, "DEFAULT_MAX_SAMPLES", 10)
    with caplog.at_level(logging.WARNING, "mqtool.data"):
        ds = open_data(f"{path}:forever", cnn())
    assert ds.num_samples == 10 and "using the first 10 samples (max_samples)" in caplog.text
    np.testing.assert_array_equal(ds.load()["x"], X[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert len(sys.modules["_mqtool_data_loader"].CALLS) == 4  # 3 + 3 + 3 + 1 of the fourth item
    caplog.clear()
    with caplog.at_level(logging.WARNING, "mqtool.data"):
        ds = open_data(DataSpec(f"{path}:forever", max_samples=5), cnn())
    assert ds.num_samples == 5 and caplog.text == ""  # asked for: no warning
    # A caller that needs fewer (calibration's first N) does not make the function yield more.
    assert open_data(f"{path}:forever", cnn(), limit=4).num_samples == 4
    # A file honours an explicit cap too, labels included.
    np.savez(tmp_path / "d.npz", x=X, y=Y)
    ds = open_data(DataSpec(tmp_path / "d.npz", max_samples=7), cnn())
    assert ds.num_samples == 7 and len(ds.load()["x"]) == 7
    np.testing.assert_array_equal(ds.labels, Y[:7])


def test_data_that_would_not_fit_in_memory_is_refused(tmp_path, monkeypatch):
    path = script(tmp_path, FORMS["pairs_batch_of_one"])
    sample = X[0].nbytes
    monkeypatch.setattr(mqtool.data, "_available_memory", lambda: int(40 * sample))  # a quarter: 10 samples
    with pytest.raises(
        InputError, match=r"the first 11 samples already take 0\.00 GiB, more than 25% .* max_samples"
    ):
        open_data(f"{path}:make", cnn())
    monkeypatch.setattr(mqtool.data, "_available_memory", lambda: int(200 * sample))
    assert open_data(f"{path}:make", cnn()).num_samples == 40


def test_the_cli_takes_a_function_and_max_samples_on_validate(tmp_path):
    onnx.save(cnn(), tmp_path / "m.onnx")
    path = script(tmp_path, FORMS["pairs_batch_of_one"])
    r = CliRunner().invoke(
        cli,
        [
            "convert",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "q.onnx"),
            "--bits",
            "8",
            "--data",
            f"{path}:make",
        ],
    )
    assert r.exit_code == 0, r.stderr
    args = ["validate", str(tmp_path / "q.onnx"), "--reference", str(tmp_path / "m.onnx"), "--json"]
    for extra, n in (([], 40), (["--max-samples", "12"], 12)):
        for data_first in (True, False):  # the cap reaches --data whichever click reads first
            opts = ["--data", f"{path}:make"] + extra if data_first else extra + ["--data", f"{path}:make"]
            r = CliRunner().invoke(cli, [*args, *opts])
            assert r.exit_code == 0, r.stderr
            doc = json.loads(r.stdout)
            assert doc["samples"] == n
            assert doc["reference_top1"] is not None  # the function's labels reached validate


def test_search_trains_on_a_function_with_labels(tmp_path):
    """The labels from the function reach the search (its default metric is cross-entropy only with labels)."""
    onnx.save(cnn(), tmp_path / "m.onnx")
    path = script(tmp_path, FORMS["torch_style_array_label_pairs"])
    args = ["search", str(tmp_path / "m.onnx"), "--data", f"{path}:make", "--target-bits", "5"]
    args += ["-o", str(tmp_path / "p.json"), "--epochs", "1"]
    args += ["--population", "4", "--generations", "1", "--rerank", "0", "--device", "cpu"]
    # No --workdir: the default one is named after the model and the file behind the data (the script).
    r = CliRunner().invoke(cli, args, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.exit_code == 0, r.stderr
    assert f"workdir: {tmp_path / 'cache' / 'mqtool' / 'm-'}" in r.stderr
    policy = json.loads((tmp_path / "p.json").read_text())
    assert policy["meta"]["fitness"]["metric"] == "ce" and len(policy["layers"]) == 4
