"""Models of every ONNX opset generation from 7 to 25 go through `mqtool convert` end to end.

Each model is built in memory with the ops as that opset spells them (IR 3 initializers listed as graph
inputs, Clip/Pad attributes before 11 and inputs after, Squeeze axes as an attribute before 13, Gemm's C
required before 11, Reshape or Flatten), converted at 4 and 8 bits with calibration data, and the output must
pass the full ONNX checker, run in ONNX Runtime and stay close to the float model. The weights are the same
at every opset, so the quantized outputs must also be identical across opsets: the opset upgrade may not
change the numbers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mqtool.cli import cli
from passes.upgrade_opset import QDQ_OPSET

OPSETS = [7, 9, 10, 11, 13, 17, 19, 21, 23, 25]
# Relative L2 error of the logits against the float model. Expected from quantization noise: an 8-bit
# quantizer adds ~1% noise, six of them in a row (3 weights, 3 activations) ~2% (measured 1.5% for both
# models); 4-bit weights add ~10% each, three layers ~17% (measured 12% dense, 10% legacy). The bounds are
# about twice the estimate; a layer whose scale is off by 2x exceeds them (test_bound_catches_a_wrong_scale).
BOUND = {8: 0.05, 4: 0.3}
LAYERS = {"dense": 3, "legacy": 4}
SAMPLES = 64


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)  # the same weights at every opset
    shapes = {
        "W1": (8, 3, 3, 3), "B1": (8,), "Wg": (16, 128), "Bg": (16,), "Wm": (16, 10), "Bm": (10,),
        "Wd": (8, 1, 3, 3), "Wl": (16, 8),
    }  # fmt: skip
    w = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}
    w.update(
        gamma=(1 + rng.normal(0, 0.1, 8)).astype(np.float32),
        beta=rng.normal(0, 0.1, 8).astype(np.float32),
        mean=rng.normal(0, 0.1, 8).astype(np.float32),
        var=(1 + rng.uniform(0, 0.5, 8)).astype(np.float32),
    )
    return w


def _dense(opset: int, w: dict[str, np.ndarray], consts: list) -> list[onnx.NodeProto]:
    """Conv -> Relu -> Flatten (Reshape at even opsets) -> Gemm -> Relu -> MatMul + Add."""
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "W1", "B1"],
            ["c"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[2, 2],
            name="conv",
        ),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
    ]
    if opset % 2:
        nodes.append(helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"))
    else:
        consts.append(numpy_helper.from_array(np.array([-1, 128], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["r", "shape"], ["f"], name="reshape"))
    return nodes + [
        helper.make_node("Gemm", ["f", "Wg", "Bg"], ["g"], transB=1, name="fc"),
        helper.make_node("Relu", ["g"], ["h"], name="relu2"),
        helper.make_node("MatMul", ["h", "Wm"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "Bm"], ["y"], name="bias"),
    ]


def _legacy(opset: int, w: dict[str, np.ndarray], consts: list) -> list[onnx.NodeProto]:
    """Conv -> BatchNormalization -> Clip(0, 6) -> Pad -> MaxPool -> depthwise Conv -> Relu -> Dropout ->
    GlobalAveragePool -> Squeeze -> Gemm -> MatMul, and a Softmax output: the ops whose signature changed."""

    def const(name: str, value: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(value, name))
        return name

    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
    ]
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    if opset < 11:
        nodes.append(helper.make_node("Clip", ["bn"], ["cl"], min=0.0, max=6.0, name="relu6"))
        nodes.append(helper.make_node("Pad", ["cl"], ["pd"], pads=pads.tolist(), name="pad"))
    else:
        lo, hi = const("lo", np.array(0, np.float32)), const("hi", np.array(6, np.float32))
        nodes.append(helper.make_node("Clip", ["bn", lo, hi], ["cl"], name="relu6"))
        nodes.append(helper.make_node("Pad", ["cl", const("pads", pads)], ["pd"], name="pad"))
    nodes += [
        helper.make_node("MaxPool", ["pd"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node(
            "Conv", ["mp", "Wd"], ["dw"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8, name="dw"
        ),
        helper.make_node("Relu", ["dw"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["dr"], name="dropout"),
        helper.make_node("GlobalAveragePool", ["dr"], ["gp"], name="gap"),
    ]
    if opset < 13:
        nodes.append(helper.make_node("Squeeze", ["gp"], ["sq"], axes=[2, 3], name="squeeze"))
    else:
        axes = const("axes", np.array([2, 3], np.int64))
        nodes.append(helper.make_node("Squeeze", ["gp", axes], ["sq"], name="squeeze"))
    gemm_inputs = ["sq", "Wl"] + ([const("Bl", np.zeros(16, np.float32))] if opset < 11 else [])
    return nodes + [
        helper.make_node("Gemm", gemm_inputs, ["fc"], transB=1, name="fc"),
        helper.make_node("MatMul", ["fc", "Wm"], ["y"], name="mm"),
        helper.make_node("Softmax", ["y"], ["p"], axis=1, name="softmax"),
    ]


def build(opset: int, kind: str) -> onnx.ModelProto:
    """The `kind` model ("dense" or "legacy") written for `opset`, at the lowest IR version that allows it."""
    w = _weights()
    consts: list[TensorProto] = []
    nodes = (_dense if kind == "dense" else _legacy)(opset, w, consts)
    used = {i for n in nodes for i in n.input}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items() if k in used] + consts
    ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    if ir < 4:  # IR 3: every initializer is also a graph input
        inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])]
    if kind == "legacy":
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 10]))
    graph = helper.make_graph(nodes, f"{kind}_opset{opset}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: str | bytes, x: np.ndarray) -> np.ndarray:
    """The logits `y` from ONNX Runtime."""
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("opsets")
    x = np.random.default_rng(1).normal(size=(SAMPLES, 3, 8, 8)).astype(np.float32)
    np.savez(d / "d.npz", x=x)
    return d


@pytest.fixture(scope="module")
def converted(workdir):
    """(opset, kind, bits) -> path of the converted model; converts on first use."""
    cache: dict[tuple[int, str, int], str] = {}

    def get(opset: int, kind: str, bits: int) -> str:
        key = (opset, kind, bits)
        if key not in cache:
            src = workdir / f"{kind}{opset}.onnx"
            if not src.exists():
                onnx.save(build(opset, kind), src)
            before = hashlib.sha256(src.read_bytes()).hexdigest()
            out = workdir / f"{kind}{opset}_w{bits}.onnx"
            args = [
                "convert",
                str(src),
                "-o",
                str(out),
                "--bits",
                str(bits),
                "--data",
                str(workdir / "d.npz"),
            ]
            r = CliRunner().invoke(cli, args)
            assert r.exit_code == 0, r.stderr
            n = LAYERS[kind]
            assert f"{n}/{n} layers quantized, avg {bits}.00 weight bits" in r.stdout
            assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # the input is never modified
            cache[key] = str(out)
        return cache[key]

    return get


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["dense", "legacy"])
@pytest.mark.parametrize("opset", OPSETS)
def test_convert_every_opset(workdir, converted, opset: int, kind: str, bits: int) -> None:
    out = converted(opset, kind, bits)
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    version = {i.domain: i.version for i in q.opset_import}[""]
    assert version == max(opset, QDQ_OPSET)  # raised to what the QDQ needs, never lowered
    assert q.ir_version >= helper.find_min_ir_version_for([helper.make_opsetid("", version)])
    weights = {i.name for i in q.graph.initializer if len(i.dims) >= 2}  # biases (int32) are rank 1
    dq_of_weights = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert len(dq_of_weights) == LAYERS[kind]

    x = np.load(workdir / "d.npz")["x"]
    ref = run(str(workdir / f"{kind}{opset}.onnx"), x)
    got = run(out, x)
    assert rel_error(got, ref) < BOUND[bits]
    if bits == 8:
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    # The same weights at opset 21 (no upgrade needed) give exactly the same numbers.
    np.testing.assert_array_equal(got, run(converted(QDQ_OPSET, kind, bits), x))


def test_bound_catches_a_wrong_scale(workdir, converted) -> None:
    """The accuracy bound is tight enough to fail: doubling one weight scale of a good model breaks it."""
    q = onnx.load(converted(QDQ_OPSET, "dense", 8))
    x = np.load(workdir / "d.npz")["x"]
    ref = run(str(workdir / f"dense{QDQ_OPSET}.onnx"), x)
    assert rel_error(run(q.SerializeToString(), x), ref) < BOUND[8]
    inits = {i.name: i for i in q.graph.initializer}
    dq = next(
        n
        for n in q.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) > 1
    )
    scale = inits[dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name))
    assert rel_error(run(q.SerializeToString(), x), ref) > BOUND[4]
