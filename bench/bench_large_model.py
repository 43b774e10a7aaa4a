"""Benchmark: `mqtool convert` on a float model over 2 GiB (protobuf's limit), stored with external data.

    python bench/bench_large_model.py [--quick] [--hidden 8192] [--layers 10] [--opset 17] [--keep DIR]

Builds, in a temporary folder, a chain of `--layers` fp32 layers MatMul [H, H] + bias + Relu (He-initialised,
so the activations keep their scale; 10 x 8192^2 x 4 bytes = 2.5 GiB) at opset 17 (as large exports
usually are, so the upgrade to the QDQ opset runs on it too), written tensor by tensor into
`model.onnx.data` so the builder holds one layer at a time, and 64 calibration samples. Then two CLI runs,
each in its own process, whose peak RSS `os.wait4` reports:

- `convert --bits 4 --data`: every layer at 4 bits; the output (~1/8 of the input) is one file.
- `convert --policy` with only the first layer quantized (8 bits): the output stays over 2 GiB and is
  written with external data (`<output>.data`), the path tests/test_external_data.py takes on a tiny model.

Each output is checked in a third process: `onnx.checker.check_model(path, full_check=True)`, loaded in ONNX
Runtime, and its outputs on 16 samples compared with the float model's (relative L2 error); the 4-bit one
also goes through `mqtool validate`. --quick: H 256,
3 layers (seconds; under the limit, so the > 2 GiB paths are not taken). Writes
bench/results/large_model.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

GIB = 2**30
PROTOBUF_LIMIT = 2**31 - 1

CHECK = r"""
import json, sys, time
import numpy as np, onnx, onnxruntime as ort
ref_path, q_path, data = sys.argv[1:4]
out = {}
t = time.perf_counter()
onnx.checker.check_model(q_path, full_check=True)
out["checker_s"] = time.perf_counter() - t
x = np.load(data)["x"][:16]
so = ort.SessionOptions()
so.intra_op_num_threads = 2
so.log_severity_level = 3
ref = ort.InferenceSession(ref_path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
t = time.perf_counter()
sess = ort.InferenceSession(q_path, so, providers=["CPUExecutionProvider"])
out["ort_load_s"] = time.perf_counter() - t
got = sess.run(None, {"x": x})[0]
out["finite"] = bool(np.isfinite(got).all())
out["rel_error"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
print(json.dumps(out))
"""


def build(folder: str, hidden: int, layers: int, opset: int, seed: int = 0) -> int:
    """Write model.onnx (+ model.onnx.data) and d.npz to `folder`; return the model's bytes on disk."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    location = "model.onnx.data"
    inits, nodes = [], []

    def external(name: str, arr: np.ndarray, f) -> TensorProto:
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", f.tell()), ("length", arr.nbytes)):
            t.external_data.add(key=key, value=str(value))
        f.write(arr.tobytes())
        return t

    with open(os.path.join(folder, location), "wb") as f:
        h = "x"
        for i in range(layers):
            w = rng.standard_normal((hidden, hidden), dtype=np.float32) * np.float32(np.sqrt(2.0 / hidden))
            inits.append(external(f"W{i}", w, f))
            del w
            inits.append(external(f"B{i}", (rng.standard_normal(hidden) * 0.01).astype(np.float32), f))
            out = "y" if i == layers - 1 else f"h{i}"
            nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"], name=f"mm{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}" if out != "y" else "y"]))
            if out != "y":
                nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
            h = out
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # The tensors carry no bytes (they are external already): only the graph is serialised here.
    with open(os.path.join(folder, "model.onnx"), "wb") as f:
        f.write(model.SerializeToString())
    np.savez(os.path.join(folder, "d.npz"), x=rng.standard_normal((64, hidden)).astype(np.float32))
    policy = {"format": "mqtool.policy", "version": 1, "layers": {"mm0": {"weight_bits": 8, "act_bits": 8}}}
    with open(os.path.join(folder, "policy.json"), "w", encoding="utf-8") as f:
        json.dump(policy, f)
    return _bytes(folder, "model.onnx")


def _bytes(folder: str, name: str) -> int:
    """A model file plus its `.data` file, if any."""
    paths = [os.path.join(folder, name), os.path.join(folder, name + ".data")]
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


def measured(cmd: list[str], log: str) -> dict:
    """Run `cmd` (stdout/stderr to `log`); its wall time, exit code and peak RSS (os.wait4 of that child)."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    with open(log, encoding="utf-8") as f:
        lines = [line.rstrip() for line in f if line.strip()]
    return {
        "exit_code": p.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),  # ru_maxrss is in KiB on Linux
        "last_line": lines[-1][:300] if lines else "",
    }


def convert_run(folder: str, name: str, policy_args: list[str]) -> dict:
    out = os.path.join(folder, f"{name}.onnx")
    cmd = [sys.executable, "-m", "mqtool.cli", "convert", os.path.join(folder, "model.onnx"), "-o", out]
    cmd += [*policy_args, "--data", os.path.join(folder, "d.npz")]
    run = measured(cmd, os.path.join(folder, f"{name}.log"))
    print(name, "convert:", run, flush=True)
    if run["exit_code"] != 0:
        return {"convert": run}
    files = sorted(f for f in os.listdir(folder) if f.startswith(name + ".onnx"))
    result = {"convert": run, "output_bytes": _bytes(folder, f"{name}.onnx"), "output_files": files}
    check = measured(
        [sys.executable, "-c", CHECK, os.path.join(folder, "model.onnx"), out, os.path.join(folder, "d.npz")],
        os.path.join(folder, f"{name}.check.log"),
    )
    if check["exit_code"] == 0:
        check.update(json.loads(check.pop("last_line")))
    print(name, "check:", check, flush=True)
    result["check"] = check
    if name == "q_bits4":  # `mqtool validate` on the pair (it holds each model as one protobuf)
        cmd = [
            sys.executable,
            "-m",
            "mqtool.cli",
            "validate",
            out,
            "--reference",
            os.path.join(folder, "model.onnx"),
        ]
        cmd += ["--data", os.path.join(folder, "d.npz"), "--json"]
        result["validate"] = measured(cmd, os.path.join(folder, f"{name}.validate.log"))
        print(name, "validate:", result["validate"], flush=True)
    return result


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--keep", default=None, help="build in this folder and keep it (default: a temp folder)")
    args = ap.parse_args()
    hidden, layers = (256, 3) if args.quick else (args.hidden, args.layers)
    folder = args.keep or tempfile.mkdtemp(prefix="mqtool_large_")
    os.makedirs(folder, exist_ok=True)
    try:
        t0 = time.perf_counter()
        input_bytes = build(folder, hidden, layers, args.opset)
        build_s = round(time.perf_counter() - t0, 1)
        print(f"built {input_bytes / GIB:.2f} GiB in {build_s} s in {folder}", flush=True)
        runs = {
            "bits4": convert_run(folder, "q_bits4", ["--bits", "4"]),
            "policy_first_layer": convert_run(
                folder, "q_policy", ["--policy", os.path.join(folder, "policy.json")]
            ),
        }
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    result = {
        "hidden": hidden,
        "layers": layers,
        "opset": args.opset,
        "input_bytes": input_bytes,
        "over_protobuf_limit": input_bytes > PROTOBUF_LIMIT,
        "build_s": build_s,
        "runs": runs,
    }
    common.finish("large_model", "bench_large_model.py", args, result, _section(result), _extra(args))


def _extra(args) -> str:
    parts = [(" --hidden", args.hidden, 8192), (" --layers", args.layers, 10), (" --opset", args.opset, 17)]
    return "".join(f"{flag} {value}" for flag, value, default in parts if value != default)


def _section(r: dict) -> str:
    rows = []
    for name, run in r["runs"].items():
        c, chk = run["convert"], run.get("check", {})
        ok = c["exit_code"] == 0 and chk.get("exit_code") == 0 and chk.get("finite")
        rows.append(
            [
                name,
                f"{r['input_bytes'] / GIB:.2f}",
                f"{run['output_bytes'] / GIB:.3f}" if "output_bytes" in run else "-",
                ", ".join(run.get("output_files", [])) or "-",
                c["wall_s"],
                c["peak_rss_gib"],
                "yes" if ok else f"no (exit {c['exit_code']}: {c['last_line']})",
                f"{chk['rel_error']:.3f}" if "rel_error" in chk else "-",
                chk.get("peak_rss_gib", "-"),
            ]
        )
    size = "over" if r["over_protobuf_limit"] else "under (quick mode)"
    v = r["runs"]["bits4"].get("validate")
    validate = ""
    if v is not None:
        outcome = "succeeds" if v["exit_code"] == 0 else f"fails (exit {v['exit_code']}: `{v['last_line']}`)"
        validate = f" `mqtool validate` on the bits4 pair {outcome} ({v['wall_s']} s, "
        validate += f"peak RSS {v['peak_rss_gib']} GiB)."
    return (
        f"## Converting a model {size} 2 GiB ({r['layers']} MatMul layers of {r['hidden']}x{r['hidden']}, "
        f"fp32, opset {r['opset']}, external data)\n\n"
        + common.table(
            [
                "run", "input GiB", "output GiB", "output files", "convert s", "convert peak RSS GiB",
                "checker + ORT ok", "rel. error vs fp32", "check peak RSS GiB",
            ],
            rows,
        )
        + "\n\nbits4: `convert --bits 4 --data` (every layer 4-bit, 8-bit activations); policy_first_layer: "
        "only the first layer quantized (8 bits), so the output stays over 2 GiB and is saved with external "
        "data. Peak RSS of the convert process (`os.wait4`); the check process runs the full ONNX checker "
        "and both models in ONNX Runtime on 16 samples." + validate
    )  # fmt: skip


if __name__ == "__main__":
    main()
