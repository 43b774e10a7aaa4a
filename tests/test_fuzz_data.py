"""Property-based bad data files: every generated .npz (or .npy folder) is accepted exactly when it is valid,
and otherwise gives one `InputError` line naming the file and the array; at the CLI, exit 2 and that line.

Valid means (docs of `mqtool.data`): one array per model input named after it (or `x` for a one-input
model) plus an optional `y`; each input array [N, ...] with the model's trailing dims, N > 0, the same N for
all, a compatible dtype (any float for a float input, a same-kind integer whose values all fit the input's
type for an integer one), C order, no objects (pickle is refused), finite after the cast to the input's
dtype; `y` integer class indices >= 0 of shape [N] or [N, 1], and below the model's class count when the
loader is given the model (the one-input model here has 4). The oracle below states these rules
independently of the loader.

Generated cases per run (the `max_examples` below): 150 + 100 mutated files against one- and three-input
models, 100 byte-level corruptions of valid files, 30 random files, 30 .npy folders (loader calls); 25
`mqtool convert` and 15 `mqtool validate` runs in-process: 450 in all, plus 4 real subprocess runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqtool.cli import cli
from mqtool.data import InputSpec, model_inputs, open_data
from mqtool.errors import InputError

from .test_passes_qdq import cnn


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


ONE = model_inputs(cnn())  # x: float32 [N, 3, 8, 8]; the model's output y is [N, 4]
CLASSES = 4
THREE = [
    InputSpec("img", np.dtype(np.float32), (None, 2, None)),  # a dynamic non-batch dim
    InputSpec("ids", np.dtype(np.int64), (None, 5)),
    InputSpec("mask", np.dtype(np.bool_), (None, 5)),
    InputSpec("seg", np.dtype(np.int32), (None, 5)),  # int64 data must fit it
]
NAMES = st.sampled_from(["x", "y", "img", "ids", "mask", "seg", "X", "x_", ""]) | st.text(
    "xyimgdsak_.", max_size=4
)
DTYPES = [
    "float16", "float32", "float64", "int8", "int32", "int64", "uint8", "uint64", "bool", "complex64",
    "<U3", "S2", "M8[s]", "object", "struct",
]  # fmt: skip
# Repeats are drawn more often.
MUTATIONS = [
    "rename", "drop", "extra", "dtype", "dtype", "dtype", "pickle", "shape", "shape", "count", "nonfinite",
    "nonfinite", "overflow", "negative", "negative", "fortran", "wide", "wide", "class", "class",
]  # fmt: skip
I64_MAX = np.iinfo(np.int64).max


def valid_array(spec: InputSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    shape = (n,) + tuple(d if d else int(rng.integers(1, 4)) for d in spec.shape[1:])
    if spec.dtype.kind == "f":
        return rng.normal(size=shape).astype(spec.dtype)
    if spec.dtype.kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, 10, shape).astype(spec.dtype)


def retype(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "object":
        return np.array(a.tolist() if a.ndim else [a.item()], dtype=object)  # saved with pickle
    if dtype == "struct":
        return np.zeros(a.shape, dtype=[("v", "f4"), ("w", "i2")])
    if dtype == "M8[s]":
        return np.zeros(a.shape, dtype)
    try:
        with np.errstate(all="ignore"):
            return a.astype(dtype)
    except (TypeError, ValueError, RuntimeError):  # e.g. strings that are not numbers or dates
        return np.zeros(a.shape, dtype)


@st.composite
def data_files(draw, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """A valid file's arrays with 0-3 mutations applied."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 9))
    arrays = {s.name: valid_array(s, n, rng) for s in specs}
    if len(specs) == 1 and draw(st.booleans()):
        arrays["x"] = arrays.pop(specs[0].name)
    if draw(st.booleans()):
        arrays["y"] = rng.integers(0, 4, (n, 1) if draw(st.booleans()) else n)
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if not arrays:
            break
        key = draw(st.sampled_from(sorted(arrays)))
        a = arrays[key]
        if mutation == "rename":
            arrays[draw(NAMES)] = arrays.pop(key)
        elif mutation == "drop":
            del arrays[key]
        elif mutation == "extra":
            arrays[draw(NAMES)] = a.copy()
        elif mutation == "dtype":
            arrays[key] = retype(a, draw(st.sampled_from(DTYPES)))
        elif mutation == "pickle":
            arrays[key] = retype(a, "object")
        elif mutation == "shape":
            kind = draw(st.sampled_from(["empty", "scalar", "add", "remove", "grow"]))
            if kind == "empty" and a.ndim:
                arrays[key] = a[:0]
            elif kind == "scalar":
                arrays[key] = np.asarray(a.flat[0] if a.size else 0, a.dtype)
            elif kind == "add":
                arrays[key] = a[..., None]
            elif kind == "remove" and a.ndim:
                arrays[key] = a[..., 0]
            elif kind == "grow" and a.ndim > 1:
                arrays[key] = np.concatenate([a, a[..., :1]], axis=-1)
        elif mutation == "count" and a.ndim:
            arrays[key] = a[: max(1, len(a) - 1)] if len(a) > 1 else np.concatenate([a, a])
        elif mutation == "nonfinite" and a.dtype.kind in "fc" and a.size:
            a = a.copy()
            a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            arrays[key] = a
        elif mutation == "overflow" and a.dtype.kind == "f" and a.size:
            a = a.astype(np.float64)
            a.flat[draw(st.integers(0, a.size - 1))] = 1e300  # finite in float64, Inf in float32
            arrays[key] = a
        elif mutation == "negative" and a.dtype.kind in "iu" and a.size:
            a = a.astype(np.int64) if a.dtype.kind == "u" else a.copy()
            a.flat[draw(st.integers(0, a.size - 1))] = -draw(st.integers(1, 100))
            arrays[key] = a
        elif mutation == "fortran" and a.ndim >= 2:
            arrays[key] = np.asfortranarray(a)
        elif mutation == "wide" and a.dtype.kind in "iu" and a.size:  # beyond int32, or beyond int64
            big = draw(st.sampled_from([2**31, 2**31 + 7, -(2**31) - 1, 2**63 + 5]))
            big = 2**31 if big >= 2**63 and a.min() < 0 else big  # uint64 only holds it without negatives
            a = a.astype(np.uint64 if big >= 2**63 else np.int64)
            a.flat[draw(st.integers(0, a.size - 1))] = big
            arrays[key] = a
        elif mutation == "class" and key == "y" and a.dtype.kind in "iu" and a.size:
            a = a.copy()
            a.flat[draw(st.integers(0, a.size - 1))] = draw(st.integers(CLASSES, CLASSES + 100))
            arrays[key] = a
    return arrays


def is_valid(arrays: dict[str, np.ndarray], specs: list[InputSpec], classes: int | None = None) -> bool:
    """The rules of the module docstring (the oracle); `classes` when the loader is given the model."""
    keys = set(arrays) - {"y"}
    names = {s.name for s in specs}
    if len(specs) == 1 and keys == {"x"}:
        keys = names
        arrays = {specs[0].name if k == "x" else k: v for k, v in arrays.items()}
    if keys != names:
        return False
    counts = set()
    for s in specs:
        a = arrays[s.name]
        if a.dtype.hasobject or a.ndim != len(s.shape) or a.ndim == 0 or len(a) == 0:
            return False
        if any(want and got != want for got, want in zip(a.shape[1:], s.shape[1:])):
            return False
        if not a.flags.c_contiguous:  # saved Fortran-ordered
            return False
        if s.dtype.kind == "f":
            if a.dtype.kind != "f":
                return False
            with np.errstate(over="ignore"):
                if not np.isfinite(a.astype(s.dtype)).all():
                    return False
        elif s.dtype.kind in "iu":
            if a.dtype.kind not in "iu" or not np.can_cast(a.dtype, s.dtype, "same_kind"):
                return False
            info = np.iinfo(s.dtype)
            if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
                return False
        elif a.dtype != s.dtype:
            return False
        counts.add(len(a))
    if len(counts) != 1:
        return False
    if "y" in arrays:
        y = arrays["y"]
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dtype.hasobject or y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != counts.pop():
            return False
        if np.any(y < 0) or np.any(y > I64_MAX):
            return False
        if classes is not None and np.any(y >= classes):
            return False
    return True


def save(path, arrays: dict[str, np.ndarray], compressed: bool = False) -> None:
    # np.savez's own parameters would clash with array names: write the members directly.
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as zf:
        for k, v in arrays.items():
            with zf.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, v, allow_pickle=True)


def check_error(message: str, path, fields: set[str] | None) -> None:
    """One line, starting with the file; naming an array of the file or an input when `fields` is given."""
    assert "\n" not in message and message.startswith(f"{path}:"), message
    if fields is not None:
        named = set(re.findall(r"'([^']*)'", message))
        assert named & fields, message


def load_or_error(path, arrays: dict[str, np.ndarray], specs: list[InputSpec], model=None) -> None:
    """Load with the model when given (labels then checked against its classes), else the bare specs."""
    valid = is_valid(arrays, specs, CLASSES if model is not None else None)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        ds = open_data(path, model if model is not None else specs)
        got = ds.load()
        labels = ds.labels
    except InputError as e:
        assert not valid, f"valid file refused: {e}"
        check_error(str(e), path, set(arrays) | {s.name for s in specs})
        return
    finally:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the data file is never modified
    assert valid, f"invalid file accepted: { {k: (v.dtype, v.shape) for k, v in arrays.items()} }"
    for s in specs:
        src = arrays[s.name] if s.name in arrays else arrays["x"]
        np.testing.assert_array_equal(got[s.name], src.astype(s.dtype))
        assert got[s.name].dtype == s.dtype
    if "y" in arrays:
        np.testing.assert_array_equal(labels, arrays["y"].reshape(-1).astype(np.int64))
    else:
        assert labels is None


@_settings(150)
@given(arrays=data_files(ONE), compressed=st.booleans())
def test_one_input_files(tmp_path_factory, arrays, compressed):
    path = tmp_path_factory.mktemp("one") / "d.npz"
    save(path, arrays, compressed)
    load_or_error(path, arrays, ONE, cnn())


@_settings(100)
@given(arrays=data_files(THREE), compressed=st.booleans())
def test_three_input_files(tmp_path_factory, arrays, compressed):
    path = tmp_path_factory.mktemp("three") / "d.npz"
    save(path, arrays, compressed)
    load_or_error(path, arrays, THREE)


def _reference_file(compressed: bool) -> tuple[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(6, 3, 8, 8)).astype(np.float32), "y": rng.integers(0, 4, 6)}
    path = f"/tmp/_mqtool_ref_{os.getpid()}_{compressed}.npz"
    save(path, arrays, compressed)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data, arrays


REFERENCE = {c: _reference_file(c) for c in (False, True)}


@_settings(100)
@given(
    compressed=st.booleans(),
    cut=st.none() | st.integers(0, 20000),
    flips=st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255)), max_size=6),
    tail=st.binary(max_size=40),
)
def test_corrupted_files(tmp_path_factory, compressed, cut, flips, tail):
    """Truncated, byte-flipped or padded copies of a valid file: refused with a one-line error, or read back
    with exactly the original numbers (the zip CRC catches changed data)."""
    data, arrays = REFERENCE[compressed]
    b = bytearray(data)
    for i, v in flips:
        b[i % len(b)] = v
    b = b[: cut % (len(b) + 1)] if cut is not None else b
    path = tmp_path_factory.mktemp("cut") / "d.npz"
    path.write_bytes(bytes(b) + tail)
    try:
        ds = open_data(path, ONE)
        got, labels = ds.load(), ds.labels
    except InputError as e:
        check_error(str(e), path, None)
        return
    np.testing.assert_array_equal(got["x"], arrays["x"])
    np.testing.assert_array_equal(labels, arrays["y"])


@_settings(30)
@given(data=st.binary(max_size=2000), zip_magic=st.booleans())
def test_random_bytes(tmp_path_factory, data, zip_magic):
    path = tmp_path_factory.mktemp("rand") / "d.npz"
    path.write_bytes((b"PK\x03\x04" if zip_magic else b"") + data)
    with pytest.raises(InputError) as e:
        open_data(path, ONE).load()
    check_error(str(e.value), path, None)


@_settings(30)
@given(arrays=data_files(ONE), truncate=st.none() | st.integers(0, 400))
def test_npy_folders(tmp_path_factory, arrays, truncate):
    """The folder layout: one .npy per array, memory-mapped; truncated files are refused."""
    folder = tmp_path_factory.mktemp("dir") / "data"
    folder.mkdir()
    keys = [k for k in arrays if k and "/" not in k and not k.startswith(".")]
    arrays = {k: arrays[k] for k in keys}
    for k, v in arrays.items():
        np.save(folder / f"{k}.npy", v, allow_pickle=True)
    if truncate is not None and arrays:
        victim = folder / f"{sorted(arrays)[0]}.npy"
        size = victim.stat().st_size
        if truncate < size:
            with open(victim, "r+b") as f:
                f.truncate(truncate)
            arrays[sorted(arrays)[0]] = np.zeros((), dtype=object)  # the oracle: this array is unusable
    if not arrays:
        with pytest.raises(InputError, match="no .npy files"):
            open_data(folder, ONE)
        return
    valid = is_valid(arrays, ONE)
    try:
        got = open_data(folder, ONE).load()
    except InputError as e:
        assert not valid, f"valid folder refused: {e}"
        assert "\n" not in str(e) and str(e).startswith(str(folder))
        named = set(re.findall(r"'([^']*)'", str(e))) | set(re.findall(r"/([^/]*)\.npy:", str(e)))
        assert named & (set(arrays) | {"x"}), str(e)  # quoted, or the file of that array
        return
    assert valid
    np.testing.assert_array_equal(got["x"], arrays["x"].astype(np.float32))


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    onnx.save(cnn(), d / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(d / "good.npz", x=rng.normal(size=(16, 3, 8, 8)).astype(np.float32))
    r = CliRunner().invoke(
        cli,
        ["convert", str(d / "m.onnx"), "-o", str(d / "q.onnx"), "--bits", "8", "--data", str(d / "good.npz")],
    )
    assert r.exit_code == 0, r.stderr
    return d


def check_cli(code: int, stderr: str, path, valid: bool) -> None:
    assert "Traceback" not in stderr
    if valid:
        assert code == 0, stderr
        return
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith(f"mqtool: error: {path}:"), stderr


@_settings(25)
@given(arrays=data_files(ONE))
def test_cli_convert(models, tmp_path_factory, arrays):
    d = tmp_path_factory.mktemp("conv")
    save(d / "d.npz", arrays)
    args = [
        "convert",
        str(models / "m.onnx"),
        "-o",
        str(d / "q.onnx"),
        "--bits",
        "8",
        "--data",
        str(d / "d.npz"),
    ]
    r = CliRunner().invoke(cli, args)
    check_cli(r.exit_code, r.stderr, d / "d.npz", is_valid(arrays, ONE, CLASSES))
    assert (d / "q.onnx").exists() == (r.exit_code == 0)
    assert sorted(os.listdir(d)) == (["d.npz", "q.onnx"] if r.exit_code == 0 else ["d.npz"])


@_settings(15)
@given(arrays=data_files(ONE))
def test_cli_validate(models, tmp_path_factory, arrays):
    d = tmp_path_factory.mktemp("val")
    save(d / "d.npz", arrays)
    args = [
        "validate",
        str(models / "q.onnx"),
        "--reference",
        str(models / "m.onnx"),
        "--data",
        str(d / "d.npz"),
    ]
    r = CliRunner().invoke(cli, [*args, "--json"])
    check_cli(r.exit_code, r.stderr, d / "d.npz", is_valid(arrays, ONE, CLASSES))


def _pickled(path):
    np.savez(path, x=np.array([np.zeros((3, 8, 8), np.float32)] * 4 + [None], dtype=object))


def _nan(path):
    x = np.zeros((4, 3, 8, 8), np.float32)
    x[2, 1, 0, 0] = np.nan
    np.savez(path, x=x)


def _labels(path):
    np.savez(path, x=np.zeros((4, 3, 8, 8), np.float32), y=np.arange(5))


def _truncated(path):
    np.savez(path, x=np.zeros((4, 3, 8, 8), np.float32))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _class(path):
    np.savez(path, x=np.zeros((4, 3, 8, 8), np.float32), y=np.array([0, 3, 4, 1]))


@pytest.mark.parametrize(
    "make, message",
    [
        (_pickled, "array 'x' has dtype object (needs pickle, refused)"),
        (_nan, "array 'x' contains NaN or Inf (sample 2)"),
        (_labels, "array 'y' has 5 labels for 4 samples"),
        (_truncated, "not a readable .npz file (File is not a zip file)"),
        (_class, "array 'y' has label 4 at sample 2, but the model's output 'y' has 4 classes (labels 0..3)"),
    ],
)
def test_real_process(models, tmp_path, make, message):
    """The installed entry point in a fresh process: exit 2, one line naming the file and the problem."""
    make(tmp_path / "bad.npz")
    cmd = [sys.executable, "-c", "from mqtool.cli import main; main()", "convert", str(models / "m.onnx")]
    cmd += ["-o", str(tmp_path / "q.onnx"), "--bits", "8", "--data", str(tmp_path / "bad.npz")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    check_cli(r.returncode, r.stderr, tmp_path / "bad.npz", valid=False)
    assert r.stderr.startswith(f"mqtool: error: {tmp_path / 'bad.npz'}: {message}"), r.stderr
    assert not (tmp_path / "q.onnx").exists()
