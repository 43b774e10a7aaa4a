"""Benchmark: uniform k-bit post-training quantization (baseline 1) and ONNX Runtime's `quantize_static`
(baseline 3) on the bundled examples: accuracy, ORT latency, file size.

    python bench/bench_ptq.py [--examples mnist_cnn mnist_vit] [--quick]

Ours: `mqtool.emit.quantize_model` with `Policy.uniform(k)` (8-bit activations), calibration data =
train.npz, accuracy and cross-entropy by ONNX Runtime on test.npz, k = 2..8 (int8 storage). Packed storage
at k = 2, 3, 4, 8 gives the sizes, with `mqtool.report` totals: file / ideal in the ONNX containers and
file / true sum of bits * params / 8. ORT: `quantize_static`, QDQ, per-channel, uint8 activations, int8
weights; and QInt4 weights for every Conv/Gemm/MatMul weight through `TensorQuantOverrides`. Latency =
median of interleaved ORT runs at batch 1 and 32, 2 threads. Writes bench/results/ptq.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402


def latency(models: dict[str, str], x: np.ndarray, runs: int) -> dict[str, dict[str, float]]:
    sessions = {k: common.session(p) for k, p in models.items()}
    name = next(iter(sessions.values())).get_inputs()[0].name
    out: dict[str, dict[str, float]] = {k: {} for k in models}
    for b in (1, 32):
        feed = {name: np.ascontiguousarray(np.resize(x, (b,) + x.shape[1:]))}
        fns = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
        for k, ms in common.interleaved_ms(fns, runs if b == 1 else max(5, runs // 3)).items():
            out[k][f"batch{b}_ms"] = round(ms, 3)
    return out


def example(name: str, tmp: str, quick: bool) -> dict:
    import onnx

    from mqtool.analysis import analyze
    from mqtool.emit import quantize_model, save_model_atomic
    from mqtool.policy import Policy
    from mqtool.report import report

    folder = common.EXAMPLES[name]
    mpath = os.path.join(folder, "model.onnx")
    model = onnx.load(mpath)
    names = analyze(model).names
    xtr, _ = common.load_npz(os.path.join(folder, "train.npz"))
    xt, yt = common.load_npz(os.path.join(folder, "test.npz"), 200 if quick else None)
    calib = {model.graph.input[0].name: xtr[:64]} if quick else os.path.join(folder, "train.npz")
    res: dict = {"fp32": {**common.ort_eval(model, xt, yt), "bytes": os.path.getsize(mpath)}}
    timed = {"fp32": mpath}
    bits_list = (2, 4, 8) if quick else (2, 3, 4, 5, 6, 7, 8)
    for k in bits_list:
        for storage in ("int8", "packed") if k in (2, 3, 4, 8) else ("int8",):
            key = f"ours-w{k}a8-{storage}"
            t0 = time.perf_counter()
            q = quantize_model(model, Policy.uniform(names, k), data=calib, storage=storage)
            path = os.path.join(tmp, f"{name}-{key}.onnx")
            save_model_atomic(q, path)
            row = {"emit_s": round(time.perf_counter() - t0, 2), "bytes": os.path.getsize(path), "bits": k}
            row.update(common.ort_eval(path, xt, yt))
            t = report(path).totals
            row.update(
                file_vs_container_ideal=round(t["file_vs_container_ideal"], 4),
                file_vs_true_bits=round(t["file_vs_true_bits"], 4),
                true_bits_bytes=t["true_bits_bytes"],
            )
            res[key] = row
            if k in (4, 8) and storage == "int8":
                timed[key] = path
            print(name, key, {k2: row[k2] for k2 in ("accuracy", "loss", "bytes")}, flush=True)
    for wb in (8, 4):
        key = f"ort-quantize_static-w{wb}a8"
        path = os.path.join(tmp, f"{name}-{key}.onnx")
        t0 = time.perf_counter()
        try:
            common.ort_peer(mpath, xtr[:64] if quick else xtr[:2048], path, batch=64, int4=wb == 4)
        except Exception as e:  # report, do not hide: the doc says why a cell is empty
            res[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        res[key] = {
            "quantize_s": round(time.perf_counter() - t0, 2),
            "bytes": os.path.getsize(path),
            "bits": wb,
            **common.ort_eval(path, xt, yt),
        }
        timed[key] = path
        print(name, key, res[key], flush=True)
    for k, lat in latency(timed, xt[:32], 5 if quick else 40).items():
        res[k].update(lat)
    return res


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--examples", nargs="+", default=["mnist_cnn", "mnist_vit"])
    args = ap.parse_args()
    examples = ["mnist_cnn"] if args.quick else args.examples
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in examples:
            res[name] = example(name, tmp, args.quick)
    parts = ["## Uniform PTQ (baseline 1) and ONNX Runtime quantize_static (baseline 3)\n"]
    for name, r in res.items():
        rows = []
        for key, v in r.items():
            if "error" in v:
                rows.append([key, "—", "—", "—", "—", "—", "—", v["error"][:80]])
                continue
            rows.append(
                [
                    key,
                    round(v["accuracy"], 4),
                    round(v["loss"], 4),
                    v["bytes"],
                    v.get("batch1_ms", ""),
                    v.get("batch32_ms", ""),
                    v.get("file_vs_container_ideal", ""),
                    v.get("file_vs_true_bits", ""),
                ]
            )
        parts.append(
            f"### {name}\n\n"
            + common.table(
                [
                    "model",
                    "test acc",
                    "test CE",
                    "bytes",
                    "ms b1",
                    "ms b32",
                    "file/ideal (containers)",
                    "file/true bits",
                ],
                rows,
            )
            + "\n"
        )
        o8, r8 = r.get("ours-w8a8-int8", {}), r.get("ort-quantize_static-w8a8", {})
        if "batch1_ms" in o8 and "batch1_ms" in r8:
            parts.append(
                f"Ours w8a8 (int8 storage) / ORT quantize_static int8 latency: batch 1 "
                f"{o8['batch1_ms'] / r8['batch1_ms']:.3f}, batch 32 {o8['batch32_ms'] / r8['batch32_ms']:.3f}.\n"
            )
    parts.append(
        "Ours = `quantize_model(model, Policy.uniform(k), data=train.npz)`, 8-bit activations; `int8` storage "
        "keeps k-bit integers in INT8 tensors (fused integer kernels), `packed` uses the smallest ONNX "
        "container (INT4/INT2 or INT8) and gives the sizes. ORT w4a8 = `quantize_static` with QInt4 weight "
        "overrides (runs as DequantizeLinear + float Conv in ORT, so it is not faster)."
    )
    extra = "" if args.examples == ["mnist_cnn", "mnist_vit"] else " --examples " + " ".join(args.examples)
    if os.environ.get("BENCH_EXAMPLES_DIR"):
        extra += f" (BENCH_EXAMPLES_DIR={os.environ['BENCH_EXAMPLES_DIR']})"
    common.finish("ptq", "bench_ptq.py", args, {"examples": res}, "\n".join(parts), extra)


if __name__ == "__main__":
    main()
