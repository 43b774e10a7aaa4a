"""The `convert`, `report` and `validate` commands: exit codes, one-line errors, atomic and deterministic
output, JSON documents (run in-process with click's CliRunner)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from mqtool.analysis import analyze
from mqtool.cli import cli

from .test_passes_qdq import cnn


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    onnx.save(cnn(), d / "m.onnx")
    rng = np.random.default_rng(4)
    np.savez(d / "d.npz", x=rng.normal(size=(48, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 4, 48))
    return d


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_convert_report_validate(workdir):
    d = workdir
    code, out, err = run("convert", d / "m.onnx", "-o", d / "q.onnx", "--bits", "4", "--data", d / "d.npz")
    assert code == 0, err
    assert out.count("\n") == 1 and "4/4 layers quantized, avg 4.00 weight bits, 0 float" in out
    code, out, _ = run("report", d / "q.onnx", "--json")
    doc = json.loads(out)
    assert [layer["weight_bits"] for layer in doc["layers"]] == [4, 4, 4, 4]
    assert doc["totals"]["avg_weight_bits"] == 4.0
    code, out, _ = run("report", d / "q.onnx")
    assert code == 0 and "w bits" in out
    code, out, err = run(
        "validate", d / "q.onnx", "--reference", d / "m.onnx", "--data", d / "d.npz", "--json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["samples"] == 48 and doc["integer_layers"] == 4 and doc["outputs"][0]["name"] == "y"


def test_policy_file_and_missing_layers_stay_float(workdir):
    d = workdir
    names = analyze(cnn()).names
    pol = {"format": "mqtool.policy", "version": 1, "layers": {names[0]: {"weight_bits": 3, "act_bits": 32}}}
    (d / "p.json").write_text(json.dumps(pol))
    code, out, err = run(
        "convert", d / "m.onnx", "-o", d / "p.onnx", "--policy", d / "p.json", "--storage", "packed"
    )
    assert code == 0, err  # weight-only: no --data needed
    assert "1/4 layers quantized" in out and "3 float (3 not in the policy)" in out
    code, out, _ = run("report", d / "p.onnx", "--json")
    assert [layer["weight_bits"] for layer in json.loads(out)["layers"]] == [3, 32, 32, 32]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "8"], "calibration data is needed"),
        (["--bits", "8", "--policy", "p.json"], "exactly one of --bits, --policy"),
        ([], "exactly one of --bits, --policy"),
        (["--bits", "9"], "9 is not in the range"),
        (["--bits", "4", "--data", "nope.npz"], "nope.npz: no such data file"),
    ],
)
def test_usage_and_input_errors_exit_2_in_one_line(workdir, args, message):
    d = workdir
    args = [str(d / a) if a.endswith((".npz", ".json")) else a for a in args]
    code, out, err = run("convert", d / "m.onnx", "-o", d / "never.onnx", *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (d / "never.onnx").exists()


def test_refuses_to_overwrite_the_input_even_through_a_symlink(workdir):
    d = workdir
    before = (d / "m.onnx").read_bytes()
    os.symlink(d / "m.onnx", d / "alias.onnx")
    for target in (d / "m.onnx", d / "alias.onnx"):
        code, _, err = run("convert", d / "m.onnx", "-o", target, "--bits", "4", "--act-bits", "32")
        assert code == 2 and "refusing to overwrite" in err
    assert (d / "m.onnx").read_bytes() == before


def test_same_inputs_same_bytes(workdir):
    d = workdir
    outs = []
    for k in range(2):
        code, _, err = run(
            "convert", d / "m.onnx", "-o", d / f"r{k}.onnx", "--bits", "5", "--data", d / "d.npz"
        )
        assert code == 0, err
        outs.append((d / f"r{k}.onnx").read_bytes())
    assert outs[0] == outs[1]
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_report_plot_and_bad_model(workdir):
    d = workdir
    import matplotlib  # noqa: F401  (a test extra; the plot must work)

    run("convert", d / "m.onnx", "-o", d / "w.onnx", "--bits", "4", "--act-bits", "32")
    code, _, err = run("report", d / "w.onnx", "--plot", d / "bits.png")
    assert code == 0, err
    assert (d / "bits.png").exists()
    (d / "junk.onnx").write_bytes(b"\x08\x07junk")
    code, _, err = run("report", d / "junk.onnx")
    assert code == 2 and "junk.onnx" in err and "Traceback" not in err
