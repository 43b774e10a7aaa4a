"""Models with external data, in and out.

A model over 2 GiB cannot be one protobuf: it arrives with its tensors in side files and must leave the same
way. The > 2 GiB code paths (checking by path, calibrating through a file, saving `<output>.data`) are taken
here on a tiny model by lowering the limit `mqtool.model.over_protobuf_limit` compares against; the real
> 2 GiB run is `bench/bench_large_model.py`.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf.message import EncodeError
from onnx import TensorProto, helper, numpy_helper

import mqtool.emit
import mqtool.model
from mqtool.cli import cli
from mqtool.emit import save_model_atomic


def mlp() -> onnx.ModelProto:
    """Gemm 32 -> 64 -> Relu -> MatMul 64 -> 10 (+ bias): weights of 8 KiB and 2.5 KiB."""
    rng = np.random.default_rng(0)
    inits = {
        "W1": rng.normal(0, 0.2, (64, 32)), "B1": rng.normal(0, 0.1, 64),
        "W2": rng.normal(0, 0.2, (64, 10)), "B2": rng.normal(0, 0.1, 10),
    }  # fmt: skip
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "B2"], ["y"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def digest(folder) -> dict[str, str]:
    """sha256 of every file in `folder` (the input model and its data files)."""
    return {
        f: "<dir>" if (folder / f).is_dir() else hashlib.sha256((folder / f).read_bytes()).hexdigest()
        for f in sorted(os.listdir(folder))
    }


def run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def convert(src, out, data, *extra) -> str:
    r = CliRunner().invoke(
        cli, ["convert", str(src), "-o", str(out), "--bits", "4", "--data", str(data), *extra]
    )
    assert r.exit_code == 0, r.stderr
    return r.stdout


@pytest.fixture()
def setup(tmp_path):
    """An input folder with the model saved with external data, calibration data, and the model saved
    normally elsewhere with its normal conversion (the reference every external-data variant must match)."""
    inp, ref = tmp_path / "in", tmp_path / "ref"
    inp.mkdir()
    ref.mkdir()
    x = np.random.default_rng(1).normal(size=(40, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    onnx.save(mlp(), ref / "m.onnx")
    convert(ref / "m.onnx", ref / "q.onnx", tmp_path / "d.npz")
    return tmp_path, inp, ref, x


@pytest.mark.parametrize("one_file", [True, False])
def test_input_with_external_data_converts(setup, one_file):
    tmp_path, inp, ref, x = setup
    onnx.save(
        mlp(), inp / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=one_file, size_threshold=0
    )
    stored = onnx.load(inp / "m.onnx", load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    before = digest(inp)
    assert len(before) == (2 if one_file else 5)
    convert(inp / "m.onnx", tmp_path / "q.onnx", tmp_path / "d.npz")
    assert digest(inp) == before  # neither the model nor its data files were touched
    # Same bytes as the conversion of the same model stored in one file; a small output stays one file.
    assert (tmp_path / "q.onnx").read_bytes() == (ref / "q.onnx").read_bytes()
    assert not (tmp_path / "q.onnx.data").exists()


@pytest.fixture()
def big(monkeypatch):
    """Every module treats any model as over the protobuf limit."""
    monkeypatch.setattr(mqtool.model, "_PROTOBUF_LIMIT", 0)


def test_output_over_the_limit_is_saved_with_external_data(setup, big):
    tmp_path, inp, ref, x = setup
    onnx.save(mlp(), inp / "m.onnx", save_as_external_data=True, size_threshold=0)
    before = digest(inp)
    out_dir = tmp_path / "out" / "sub"
    out_dir.mkdir(parents=True)
    summary = convert(inp / "m.onnx", out_dir / "q.onnx", tmp_path / "d.npz")
    assert digest(inp) == before
    assert sorted(os.listdir(out_dir)) == ["q.onnx", "q.onnx.data"]  # no temporary file or folder left
    umask = os.umask(0)
    os.umask(umask)
    for f in ("q.onnx", "q.onnx.data"):  # like any output: 0666 less the umask (onnx writes its data 0600)
        assert os.stat(out_dir / f).st_mode & 0o777 == 0o666 & ~umask
    size = sum(os.path.getsize(out_dir / f) for f in os.listdir(out_dir))
    assert f"{size / 2**10:.1f} KiB" in summary  # the reported size counts the data file

    stored = onnx.load(out_dir / "q.onnx", load_external_data=False)
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"q.onnx.data"}  # relative: the pair can be moved together
    onnx.checker.check_model(str(out_dir / "q.onnx"), full_check=True)
    # The same model as the one-file conversion: same graph, same tensors, same outputs.
    loaded, normal = onnx.load(out_dir / "q.onnx"), onnx.load(ref / "q.onnx")
    assert [n.SerializeToString() for n in loaded.graph.node] == [
        n.SerializeToString() for n in normal.graph.node
    ]
    for a, b in zip(loaded.graph.initializer, normal.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    np.testing.assert_array_equal(run(out_dir / "q.onnx", x), run(ref / "q.onnx", x))
    # The pair moved elsewhere still loads (no absolute path inside).
    moved = tmp_path / "moved"
    os.rename(out_dir, moved)
    np.testing.assert_array_equal(run(moved / "q.onnx", x), run(ref / "q.onnx", x))
    r = CliRunner().invoke(cli, ["report", str(moved / "q.onnx"), "--json"])
    assert r.exit_code == 0 and '"weight_bits": 4' in r.stdout, r.stderr


def test_validate_over_the_limit_runs_through_external_data(setup, monkeypatch):
    tmp_path, inp, ref, x = setup
    q, m, d = str(ref / "q.onnx"), str(ref / "m.onnx"), str(tmp_path / "d.npz")

    def validate() -> dict:
        r = CliRunner().invoke(cli, ["validate", q, "--reference", m, "--data", d, "--json", "--per-layer"])
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)
        doc.pop("latency", None)  # timings differ between runs
        return doc

    normal = validate()
    monkeypatch.setattr(mqtool.model, "_PROTOBUF_LIMIT", 0)  # both models now take the > 2 GiB route
    assert validate() == normal
    assert normal["layers"] and all(la["kernel"] != "?" for la in normal["layers"])


def test_refuses_to_overwrite_the_input_with_external_data(setup, big):
    tmp_path, inp, _, _ = setup
    onnx.save(mlp(), inp / "m.onnx", save_as_external_data=True, size_threshold=0)
    before = digest(inp)
    r = CliRunner().invoke(cli, ["convert", str(inp / "m.onnx"), "-o", str(inp / "m.onnx"), "--bits", "4"])
    assert r.exit_code == 2 and "refusing to overwrite" in r.stderr
    assert digest(inp) == before


class Boom(OSError):
    pass


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("stage", ["save", "data", "model"])
def test_failed_external_save_leaves_no_partial_output(tmp_path, monkeypatch, stage, existing):
    """A failure while writing the data file, moving it, or moving the model leaves the folder as it was:
    empty, or with the previous output (model and data) intact."""
    monkeypatch.setattr(mqtool.model, "_PROTOBUF_LIMIT", 0)
    if existing:
        previous = mlp()
        w = previous.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(np.ones((64, 32), np.float32), w.name))
        save_model_atomic(previous, str(tmp_path / "q.onnx"))
    before = digest(tmp_path)
    real_replace, real_save = os.replace, onnx.save_model

    def replace(src, dst):
        if str(dst).endswith(".data" if stage == "data" else ".onnx"):
            raise Boom(f"cannot move {src}")
        return real_replace(src, dst)

    def save(model, path, **kw):
        real_save(model, path, **kw)
        with open(os.path.join(os.path.dirname(path), kw["location"]), "r+b") as f:
            f.truncate(100)  # a partial write, then the disk is full
        raise Boom("no space left on device")

    if stage == "save":
        monkeypatch.setattr(mqtool.emit.onnx, "save_model", save)
    else:
        monkeypatch.setattr(mqtool.emit.os, "replace", replace)
    with pytest.raises(Boom):
        save_model_atomic(mlp(), str(tmp_path / "q.onnx"))
    monkeypatch.undo()
    assert digest(tmp_path) == before  # same files, same bytes: nothing partial, nothing lost
    if existing:
        w = numpy_helper.to_array(onnx.load(tmp_path / "q.onnx").graph.initializer[0])
        assert np.all(w == 1)  # the previous model still reads its own data


def test_too_large_to_measure_counts_as_over_the_limit():
    """Above 2 GiB upb's ByteSize raises EncodeError instead of returning the size (found by
    bench/bench_large_model.py): that must select the external-data paths, not fail them."""

    class Huge:
        def ByteSize(self) -> int:
            raise EncodeError("Failed to serialize proto")

    assert mqtool.model.over_protobuf_limit(Huge())
    assert not mqtool.model.over_protobuf_limit(mlp())
