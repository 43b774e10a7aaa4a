"""Loading: bad files give one-line InputErrors naming the file; external data cannot escape the folder."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mqtool.errors import InputError
from mqtool.model import (
    assign_node_names,
    constant_values,
    find_scope,
    load_model,
    node_names,
    quantized_nodes,
    scoped_graphs,
)


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "content, needle",
    [(b"", "empty"), (b"\xff\xfe garbage \x00\x01", "not"), (b"\x08\x07", "not an ONNX model")],
)
def test_bad_files_raise_input_error_naming_the_file(tmp_path, content, needle):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InputError) as e:
        load_model(p)
    assert str(p) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(InputError, match="directory"):
        load_model(tmp_path)


def test_checker_failure_is_input_error(tmp_path):
    m = _matmul_model(np.ones((4, 4), np.float32))
    m.graph.node[0].input[1] = "undefined_tensor"
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    with pytest.raises(InputError, match="checker"):
        load_model(p)


def test_external_data_round_trip_and_escape_refused(tmp_path):
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    m = _matmul_model(w)
    d = tmp_path / "model"
    d.mkdir()
    onnx.save(m, d / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=16)
    loaded = load_model(d / "m.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), w)

    # Rewrite the location to escape the folder: relative "..", absolute, and through a symlink.
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64 * 64 * 4)
    os.symlink(secret, d / "link.data")
    for loc in ("../secret.bin", str(secret), "link.data"):
        m2 = onnx.load(d / "m.onnx", load_external_data=False)
        for e in m2.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = loc
        onnx.save(m2, d / "evil.onnx")
        with pytest.raises(InputError, match="refused"):
            load_model(d / "evil.onnx")


def test_external_data_out_of_bounds(tmp_path):
    m = _matmul_model(np.ones((32, 32), np.float32))
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=16)
    (tmp_path / "m.data").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="exceeds"):
        load_model(tmp_path / "m.onnx")


def test_node_names_are_unique_and_stable():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="Relu_0"),  # collides with a synthesised name
        helper.make_node("Relu", ["b"], ["c"], name="dup"),
        helper.make_node("Relu", ["c"], ["d"], name="dup"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1])],
    )
    names = node_names(g)
    assert len(set(names)) == 4 and names[1] == "Relu_0" and names[0] != "Relu_0"
    assert names == node_names(g)
    m = helper.make_model(g)
    assign_node_names(m)
    assert [n.name for n in m.graph.node] == names


def test_constant_values_fold_constant_of_shape_and_constant_nodes():
    nodes = [
        helper.make_node(
            "Constant", [], ["shape"], value=numpy_helper.from_array(np.array([3, 2], np.int64))
        ),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["W"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])
        ),
        helper.make_node("MatMul", ["x", "W"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    vals = constant_values(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    np.testing.assert_array_equal(vals["W"], np.full((3, 2), 0.5, np.float32))
    assert "y" not in vals


def _quantized_in_branch() -> onnx.ModelProto:
    """y = If(c): x @ DequantizeLinear(Wq) in the then-branch, x @ W in the else-branch."""
    then = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["Wq", "s"], ["Wd"], name="dq"),
            helper.make_node("MatMul", ["x", "Wd"], ["yt"], name="mm"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [1, 2])],
        [
            numpy_helper.from_array(np.ones((3, 2), np.int8), "Wq"),
            numpy_helper.from_array(np.array(0.5, np.float32), "s"),
        ],
    )
    other = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["ye"], name="mm")],
        "else",
        [],
        [helper.make_tensor_value_info("ye", TensorProto.FLOAT, [1, 2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [
            numpy_helper.from_array(np.array(True), "c"),
            numpy_helper.from_array(np.ones((3, 2), np.float32), "W"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_already_quantized_models_are_refused_unless_allowed(tmp_path):
    m = _quantized_in_branch()
    onnx.save(m, tmp_path / "q.onnx")
    with pytest.raises(InputError) as e:
        load_model(tmp_path / "q.onnx")
    msg = str(e.value)
    assert (
        str(tmp_path / "q.onnx") in msg and "already quantized" in msg and "'dq' is DequantizeLinear" in msg
    )
    assert quantized_nodes(load_model(tmp_path / "q.onnx", allow_quantized=True)) == [
        ("dq", "DequantizeLinear")
    ]
    # ONNX Runtime's contrib ops count too (the checker does not look into that domain).
    nbits = _matmul_model(np.ones((4, 2), np.float32))
    nbits.graph.node[0].op_type, nbits.graph.node[0].domain = "MatMulNBits", "com.microsoft"
    nbits.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(nbits, tmp_path / "n.onnx")
    with pytest.raises(InputError, match=r"already quantized \(node 'mm' is MatMulNBits\)"):
        load_model(tmp_path / "n.onnx")
    onnx.save(_matmul_model(np.ones((4, 2), np.float32)), tmp_path / "f.onnx")
    assert quantized_nodes(load_model(tmp_path / "f.onnx")) == []


def test_scoped_names_are_unique_across_subgraphs_and_stable():
    m = _quantized_in_branch()
    scoped = scoped_graphs(m.graph)
    # Attribute order (onnx.helper sorts by name): the else-branch comes first.
    assert [s.scope for s in scoped] == [(), (("If_0", "else_branch"),), (("If_0", "then_branch"),)]
    # Both branches call their MatMul "mm": the first keeps it, the second takes its scope as a prefix.
    assert [s.names for s in scoped] == [["If_0"], ["mm"], ["dq", "If_0/then_branch/mm"]]
    assert [s.names for s in scoped_graphs(m.graph)] == [s.names for s in scoped]
    assert find_scope(m.graph, [["If_0", "then_branch"]]).name == "then"
    with pytest.raises(KeyError):
        find_scope(m.graph, [["If_0", "body"]])
    assign_node_names(m)
    branch = m.graph.node[0].attribute
    named = {a.name: [n.name for n in a.g.node] for a in branch}
    assert named == {"then_branch": ["dq", "If_0/then_branch/mm"], "else_branch": ["mm"]}
