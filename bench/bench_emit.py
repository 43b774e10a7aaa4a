#!/usr/bin/env python3
"""Emission benchmarks: post-training accuracy, size and latency of uniform 2/3/4/8-bit models on the
bundled examples (ORT CPU, 2 threads), ONNX Runtime's own `quantize_static` for comparison, every storage
mode, and the weight-only MatMul containers behind `--storage auto`.

    python bench/bench_emit.py [--quick]        # writes bench/results/emit.json

--quick: the CNN only, fewer timing runs (about a minute). Latencies are medians of interleaved runs
(reference and quantized alternate, so machine load hits both alike); they vary from run to run on a shared
machine, accuracies and sizes do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from mqtool.analysis import analyze  # noqa: E402
from mqtool.emit import convert, uniform_policy  # noqa: E402
from mqtool.fileio import atomic_write_text  # noqa: E402
from mqtool.validate import validate  # noqa: E402

THREADS = 2


def session(path_or_bytes, threads=THREADS):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def accuracy(path: str, test: dict) -> float:
    s = session(path)
    name = s.get_inputs()[0].name
    preds = np.concatenate(
        [s.run(None, {name: test["x"][i : i + 250]})[0].argmax(-1) for i in range(0, len(test["x"]), 250)]
    )
    return float((preds == test["y"]).mean())


def latency(paths: dict[str, str], x: np.ndarray, batches=(1, 32), runs: int = 30) -> dict:
    """Median ms per model and batch size, runs interleaved across the models."""
    sessions = {k: session(p) for k, p in paths.items()}
    name = next(iter(sessions.values())).get_inputs()[0].name
    out = {k: {} for k in paths}
    for b in batches:
        feed = {name: np.ascontiguousarray(np.resize(x, (b,) + x.shape[1:]))}
        times = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, feed)
        for _ in range(runs if b == 1 else max(5, runs // 3)):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t0)
        for k in sessions:
            out[k][f"batch{b}_ms"] = round(1e3 * float(np.median(times[k])), 3)
    return out


def example(name: str, tmp: str, quick: bool) -> dict:
    folder = os.path.join(ROOT, "examples", name)
    model, train_path, test_path = (os.path.join(folder, f) for f in ("model.onnx", "train.npz", "test.npz"))
    test, train = dict(np.load(test_path)), dict(np.load(train_path))
    res = {"fp32": {"accuracy": accuracy(model, test), "bytes": os.path.getsize(model)}}
    paths = {"fp32": model}
    for bits in (8, 4, 3, 2):
        for storage in ("int8",) if quick and bits != 4 else ("int8", "auto", "packed"):
            key = f"w{bits}a8-{storage}"
            out = os.path.join(tmp, f"{name}-{key}.onnx")
            t0 = time.perf_counter()
            convert(model, out, uniform_policy(bits), data=train_path, storage=storage)
            v = validate(out, model, test_path, latency=False)
            res[key] = {
                "accuracy": v.quantized_top1,
                "sqnr_db": round(v.outputs[0].sqnr_db, 2),
                "bytes": os.path.getsize(out),
                "integer_layers": sum(1 for layer in v.layers if layer.path == "integer"),
                "layers": len(v.layers),
                "convert_s": round(time.perf_counter() - t0, 2),
            }
            paths[key] = out
    for reduce_range in (False, True):
        key = "ort-quantize_static-w8a8" + ("-reduce_range" if reduce_range else "")
        out = os.path.join(tmp, f"{name}-{key}.onnx")
        t0 = time.perf_counter()
        common.ort_peer(model, train["x"][:2048], out, batch=64, reduce_range=reduce_range)
        res[key] = {
            "accuracy": accuracy(out, test),
            "bytes": os.path.getsize(out),
            "convert_s": round(time.perf_counter() - t0, 2),
        }
        paths[key] = out
    timed = {k: p for k, p in paths.items() if k == "fp32" or "int8" in k or "ort" in k or "w4a8" in k}
    for k, lat in latency(timed, test["x"][:32], runs=10 if quick else 40).items():
        res[k].update(lat)
    return res


def weight_only_matmul(quick: bool) -> dict:
    """fp32 MatMul vs DequantizeLinear(INT8/INT4/INT2, per column) + MatMul (ORT: MatMulNBits), 2 threads."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = {}
    for k, n, t in ((48, 96, 17), (96, 48, 17), (768, 3072, 1)):
        models = {}
        w = rng.normal(size=(k, n)).astype(np.float32) * 0.05
        for kind in ("fp32", "int8", "int4", "int2"):
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", t, k])
            y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", t, n])
            if kind == "fp32":
                nodes, inits = (
                    [helper.make_node("MatMul", ["x", "W"], ["y"])],
                    [numpy_helper.from_array(w, "W")],
                )
            else:
                import ml_dtypes

                bits = int(kind[3:])
                lim = 2 ** (bits - 1)
                q = np.clip(np.rint(w / 0.01), -lim, lim - 1).astype(np.int8)
                dt = {"int8": np.int8, "int4": ml_dtypes.int4, "int2": ml_dtypes.int2}[kind]
                inits = [
                    numpy_helper.from_array(q.astype(dt), "Wq"),
                    numpy_helper.from_array(np.full(n, 0.01, np.float32), "s"),
                    numpy_helper.from_array(np.zeros(n, np.int8).astype(dt), "z"),
                ]
                nodes = [
                    helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], axis=1),
                    helper.make_node("MatMul", ["x", "W"], ["y"]),
                ]
            g = helper.make_graph(nodes, "g", [x], [y], inits)
            models[kind] = helper.make_model(g, opset_imports=[helper.make_opsetid("", 25)], ir_version=11)
        with tempfile.TemporaryDirectory() as d:
            paths = {}
            for kind, m in models.items():
                paths[kind] = os.path.join(d, kind + ".onnx")
                onnx.save(m, paths[kind])
            xs = rng.normal(size=(1, t, k)).astype(np.float32)
            out[f"{k}x{n}"] = latency(paths, xs, runs=30 if quick else 200)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-o", "--output", default=os.path.join(ROOT, "bench", "results", "emit.json"))
    args = ap.parse_args()
    res = {
        "command": "python bench/bench_emit.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": THREADS,
            "onnxruntime": ort.__version__,
        },
        "examples": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("mnist_cnn",) if args.quick else ("mnist_cnn", "mnist_vit"):
            if os.path.exists(os.path.join(ROOT, "examples", name, "model.onnx")):
                res["examples"][name] = example(name, tmp, args.quick)
                res["examples"][name]["layers"] = len(
                    analyze(onnx.load(os.path.join(ROOT, "examples", name, "model.onnx"))).layers
                )
    res["weight_only_matmul"] = weight_only_matmul(args.quick)
    atomic_write_text(args.output, json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
