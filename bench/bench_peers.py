"""Benchmark: NNCF and NVIDIA ModelOpt ONNX post-training quantization (baseline 7) beside ours at 8 bits.

    NNCF_PATH=/tmp/nncf_site python bench/bench_peers.py [--quick]

NNCF is not a dependency of mqtool: install it beside the environment without touching torch, e.g.
`pip install --no-deps --target /tmp/nncf_site nncf==3.4.0 openvino-telemetry psutil pydot rich safetensors
tabulate ninja markdown-it-py mdurl pygments pyparsing`, and point NNCF_PATH at that folder. NNCF:
`nncf.quantize(onnx_model, nncf.Dataset(train batches))` (defaults: int8, per-channel weights, 300 calibration
samples). Ours: `quantize_model(Policy.uniform(8))`. Accuracy by ONNX Runtime on test.npz, file size, and
latency (median of interleaved runs, 2 threads) at batch 1 and 32. ModelOpt is recorded as skipped with the
reason (see the doc). Writes bench/results/peers.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

MODELOPT_REASON = (
    "nvidia-modelopt 0.47.0 (`pip download --no-deps` works): its `[onnx]` extra, which the ONNX PTQ need"
    "s, pins onnx~=1.21.0 (we have 1.23.2, which mqtool needs) and requires cupy-cuda12x (a CUDA package;"
    " this machine has no GPU). Installing it would downgrade onnx in the shared environment, so it was n"
    "either installed nor run. (Whether its ONNX PTQ would run on CPU-only ORT with --no-deps was not tri"
    "ed, for lack of time.)"
)


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--examples", nargs="+", default=["mnist_cnn", "mnist_vit"])
    args = ap.parse_args()
    if os.environ.get("NNCF_PATH"):
        sys.path.insert(0, os.environ["NNCF_PATH"])
    import onnx
    from bench_ptq import latency

    from mqtool.analysis import analyze
    from mqtool.emit import quantize_model, save_model_atomic
    from mqtool.policy import Policy

    try:
        import nncf

        nncf_version, nncf_error = nncf.__version__, None
    except Exception as e:  # not installed: say so in the doc
        nncf, nncf_version, nncf_error = None, None, f"{type(e).__name__}: {e}"
    examples = ["mnist_cnn"] if args.quick else args.examples
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in examples:
            folder = common.EXAMPLES[name]
            mpath = os.path.join(folder, "model.onnx")
            model = onnx.load(mpath)
            xtr, _ = common.load_npz(os.path.join(folder, "train.npz"))
            xt, yt = common.load_npz(os.path.join(folder, "test.npz"), 200 if args.quick else None)
            inp = model.graph.input[0].name
            r: dict = {"fp32": {**common.ort_eval(mpath, xt, yt), "bytes": os.path.getsize(mpath)}}
            paths = {"fp32": mpath}
            calib = {inp: xtr[:64]} if args.quick else os.path.join(folder, "train.npz")
            t0 = time.time()
            q = quantize_model(model, Policy.uniform(analyze(model).names, 8), data=calib, storage="int8")
            paths["ours-w8a8"] = os.path.join(tmp, f"{name}-ours.onnx")
            save_model_atomic(q, paths["ours-w8a8"])
            r["ours-w8a8"] = {"seconds": time.time() - t0}
            if nncf is not None:
                try:
                    t0 = time.time()
                    n = 64 if args.quick else 300
                    ds = nncf.Dataset([{inp: xtr[i : i + 1]} for i in range(n)])
                    qn = nncf.quantize(model, ds, subset_size=n)
                    paths["nncf-int8"] = os.path.join(tmp, f"{name}-nncf.onnx")
                    onnx.save(qn, paths["nncf-int8"])
                    r["nncf-int8"] = {"seconds": time.time() - t0}
                except Exception as e:
                    r["nncf-int8"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            for k, p in paths.items():
                if k != "fp32":
                    r[k].update(common.ort_eval(p, xt, yt), bytes=os.path.getsize(p))
            for k, lat in latency(paths, xt[:32], 5 if args.quick else 40).items():
                r[k].update(lat)
            res[name] = r
            print(name, r, flush=True)
    parts = ["## NNCF and NVIDIA ModelOpt ONNX PTQ (baseline 7)\n"]
    if nncf_error:
        parts.append(f"NNCF could not be imported here: `{nncf_error}`.\n")
    else:
        parts.append(
            f"NNCF {nncf_version} (installed with `pip install --no-deps --target` beside the environment; torch "
            "untouched), `nncf.quantize` on the ONNX model with its defaults (int8, 300 calibration samples).\n"
        )
    for name, r in res.items():
        rows = [
            [
                k,
                round(v["accuracy"], 4) if "accuracy" in v else "—",
                v.get("bytes", "—"),
                v.get("batch1_ms", "—"),
                v.get("batch32_ms", "—"),
                v.get("error", ""),
            ]
            for k, v in r.items()
        ]
        parts.append(
            f"### {name}\n\n"
            + common.table(["model", "test acc", "bytes", "ms b1", "ms b32", "note"], rows)
            + "\n"
        )
    parts.append(f"ModelOpt: {MODELOPT_REASON}")
    common.finish(
        "peers",
        "bench_peers.py",
        args,
        {"nncf": nncf_version, "nncf_error": nncf_error, "modelopt": MODELOPT_REASON, "examples": res},
        "\n".join(parts),
    )


if __name__ == "__main__":
    main()
