"""`mqtool inspect` through click's CliRunner: table, JSON contract, and every bad-input case."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mqtool.cli import cli

from .conftest import ZOO


def _tiny(tmp_path) -> str:
    w = np.ones((4, 4), np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W")],
    )
    p = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    return str(p)


def test_inspect_table_and_json(tmp_path):
    path = _tiny(tmp_path)
    r = CliRunner().invoke(cli, ["inspect", path])
    assert r.exit_code == 0 and "fc" in r.output and "1 quantizable layers" in r.output
    r = CliRunner().invoke(cli, ["inspect", path, "--json"])
    doc = json.loads(r.output)
    layer = doc["layers"][0]
    assert (layer["name"], layer["op_type"], layer["weight_shape"], layer["params"], layer["macs"]) == (
        "fc",
        "MatMul",
        [4, 4],
        16,
        16,
    )
    assert doc["totals"]["params"] == 16 and doc["totals"]["fp32_weight_bytes"] == 64


def test_inspect_zoo_json_matches_graph():
    path = next(p for p in ZOO if p.endswith("squeezenet.onnx"))
    r = CliRunner().invoke(cli, ["inspect", path, "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.output)
    n_conv = sum(n.op_type == "Conv" for n in onnx.load(path).graph.node)
    assert len(doc["layers"]) == n_conv == doc["totals"]["layers"]


def _bad_files(tmp_path, good: str):
    data = open(good, "rb").read()
    cases = {
        "missing": str(tmp_path / "missing.onnx"),
    }
    for name, content in {
        "empty": b"",
        "text": b"this is not a model\n",
        "truncated": data[: len(data) // 3],
    }.items():
        p = tmp_path / f"{name}.onnx"
        p.write_bytes(content)
        cases[name] = str(p)
    m = onnx.load(good)
    m.graph.node[0].input[1] = "nowhere"
    p = tmp_path / "checker.onnx"
    onnx.save(m, p)
    cases["checker"] = str(p)
    return cases


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "checker"])
def test_bad_input_one_line_exit_2(tmp_path, case):
    path = _bad_files(tmp_path, _tiny(tmp_path))[case]
    r = CliRunner().invoke(cli, ["inspect", path])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert err.count("\n") == 0 and path in err and "Traceback" not in r.output


def test_debug_shows_traceback(tmp_path):
    p = tmp_path / "e.onnx"
    p.write_bytes(b"")
    r = CliRunner().invoke(cli, ["--debug", "inspect", str(p)])
    assert r.exit_code == 2 and "Traceback" in r.stderr
