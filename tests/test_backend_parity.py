"""Parity of the PyTorch backend with ONNX Runtime on real models.

The 9 zoo models onnx ships (opset 9) have every weight equal to 0.02, so each one outputs a uniform
softmax that would hide any bug. Every float constant read by the graph (weights, biases, BatchNorm
parameters, the `ConstantOfShape` fills) is therefore replaced by seeded random values of the same shape,
scaled like He initialisation, and both the final output and the tensor feeding the final Softmax are
compared. The bundled examples run on real MNIST digits, at several batch sizes.

Tolerance: max |torch - ORT| <= 1e-4 * max(1, max |ORT|), in float32.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from mqtool.backend import to_torch
from mqtool.model import constant_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/*.onnx")))
EXAMPLES = ["mnist_cnn", "mnist_vit"]
RTOL = 1e-4


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _random_value(rng: np.random.Generator, shape: tuple[int, ...], op: str, index: int, node) -> np.ndarray:
    """He-uniform weights; BatchNorm/Mul scales and variances in [0.5, 1.5]; small shifts elsewhere."""
    if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(shape) >= 2 and index <= 1:
        if op == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            fan_in = shape[1] if trans_b else shape[0]
        elif op == "MatMul":
            fan_in = shape[-2]
        else:
            fan_in = int(np.prod(shape[1:]))
        # Uniform, not normal: VGG-19 has 143M weights and uniform draws are 2x faster.
        high = np.sqrt(6.0 / fan_in)
        v = rng.random(shape, dtype=np.float32)
        v -= np.float32(0.5)
        v *= np.float32(2 * high)
        return v
    if (op == "BatchNormalization" and index in (1, 4)) or op == "Mul":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)


def randomized(model: onnx.ModelProto, seed: int = 0) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """(model, ort_model, weights): `model` with random initializers (see module doc) for the backend;
    the same graph with those weights as graph inputs (fed as `weights`) for ONNX Runtime, which saves
    serialising half a gigabyte for VGG-19. Folded nodes are dropped: their outputs are initializers."""
    rng = np.random.default_rng(seed)
    consts = constant_values(model)
    live = [n for n in model.graph.node if not all(o in consts for o in n.output if o)]
    role: dict[str, tuple[str, int, onnx.NodeProto]] = {}
    for node in live:
        for i, name in enumerate(node.input):
            if name in consts:
                role.setdefault(name, (node.op_type, i, node))
    values = {}
    for name, (op, index, node) in role.items():
        value = consts[name]
        values[name] = _random_value(rng, value.shape, op, index, node) if value.dtype.kind == "f" else value
    inputs = [i for i in model.graph.input if i.name not in consts]
    weight_inputs = [
        onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in values.items()
    ]
    made = []
    for graph_inputs, inits in (
        (inputs, [numpy_helper.from_array(v, n) for n, v in values.items()]),
        (inputs + weight_inputs, []),
    ):
        graph = onnx.helper.make_graph(live, model.graph.name, graph_inputs, list(model.graph.output))
        graph.initializer.extend(inits)
        m = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        m.ir_version = max(model.ir_version, 7)
        made.append(m)
    return made[0], made[1], values


def _pre_softmax(model: onnx.ModelProto) -> str | None:
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    return softmax[-1].input[0] if softmax else None


def _check(got: np.ndarray, ref: np.ndarray, what: str) -> float:
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max()) / scale
    assert err <= RTOL, f"{what}: max abs diff / scale = {err:.3g}"
    return err


@pytest.mark.parametrize("path", ZOO, ids=[os.path.basename(p)[6:-5] for p in ZOO])
def test_zoo_parity(path: str) -> None:
    model, ort_model, weights = randomized(onnx.load(path))
    out_name = model.graph.output[0].name
    # DenseNet-121 ends without a Softmax: its output is the logits.
    pre = _pre_softmax(model) or out_name
    names = [out_name] if pre == out_name else [out_name, pre]
    (inp,) = [i for i in model.graph.input]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    if pre != out_name:
        ort_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(pre))
    ref = dict(zip(names, _session(ort_model).run(names, {inp.name: x, **weights})))
    del ort_model, weights
    module = to_torch(model)
    # Every Conv/Gemm runs as a QuantLayer with its (random) weight as a parameter.
    assert len(module.layers) == sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    del model
    with torch.no_grad():
        got = module.run({inp.name: x}, names)
    # The random weights must make the logits informative (not a near-uniform softmax), or the comparison
    # proves little.
    logits = ref[pre].reshape(-1)
    assert np.std(logits) > 0.1 * max(1.0, float(np.abs(logits).max())), np.std(logits)
    for n in names:
        _check(got[n].numpy(), ref[n], f"{os.path.basename(path)} '{n}'")


def _example(name: str) -> tuple[onnx.ModelProto, np.ndarray]:
    path = os.path.join(ROOT, "examples", name, "model.onnx")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing (run examples/{name}/train.py)")
    return onnx.load(path), np.load(os.path.join(ROOT, "examples", name, "test.npz"))["x"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_parity_and_dynamic_batch(name: str) -> None:
    model, x = _example(name)
    sess = _session(model)
    module = to_torch(model)
    (inp,) = module.input_names
    for batch in (64, 1, 7):
        xb = x[:batch]
        (ref,) = sess.run(None, {inp: xb})
        with torch.no_grad():
            got = module(torch.from_numpy(xb)).numpy()
        _check(got, ref, f"{name} batch {batch}")


def test_bench_quick_smoke(tmp_path) -> None:
    # The benchmark's hand-written CNN must compute what model.onnx computes (the script checks it).
    _example("mnist_cnn")
    out = tmp_path / "backend.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "bench_backend.py"),
            "--quick",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["quick"] and result["ratio"] > 0 and result["max_logit_diff"] < 1e-3
