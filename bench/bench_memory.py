"""Benchmark: peak memory and time plan of `mqtool convert --target-bits 4` on the largest models we have.

    python bench/bench_memory.py [--quick] [--time-budget 5] [--models resnet50 minilm ddddocr_ocr]

- resnet50: the ResNet-50 topology the onnx package ships (`onnx/backend/test/data/light/light_resnet50.onnx`,
  whose weights are ConstantOfShape placeholders) with random He-initialised weights written in their place
  (25.6M parameters, input [1, 3, 224, 224]), 128 synthetic images (normal noise): timing and memory only,
  its "accuracy" means nothing.
- minilm, ddddocr_ocr: the zoo's largest transformer and CNN+LSTM (bench/zoo_transformer.py and
  bench/zoo/run.py build them into bench/zoo/.cache; skipped with a note when they are not there).

Each convert runs in its own process; its peak RSS comes from `os.wait4` (the kernel's ru_maxrss). Reported
next to the fp32 weight bytes, so "peak / weights" says how many model-sized buffers the run held at its
peak (the Python + torch + ONNX Runtime runtime itself is ~0.4-0.5 GiB). The run's first printed ETA is
compared with its wall time. --quick: resnet50 only, 16 images, --time-budget 1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

GIB = 1024**3
ZOO_CACHE = common.ZOO_CACHE


def resnet50(path: str, images: int, seed: int = 0) -> tuple[str, str, int]:
    """Write the random-weight ResNet-50 and its synthetic data; returns (model, data, weight bytes)."""
    import onnx
    from onnx import numpy_helper

    light = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_resnet50.onnx")
    m = onnx.load(light)
    rng = np.random.default_rng(seed)
    shapes = {i.name: tuple(numpy_helper.to_array(i)) for i in m.graph.initializer}
    keep, inits = [], []
    for node in m.graph.node:
        if node.op_type != "ConstantOfShape":
            keep.append(node)
            continue
        name, shape = node.output[0], shapes[node.input[0]]
        if len(shape) == 4:  # conv weight: He initialisation keeps the activations' scale through 50 layers
            fan_in = shape[1] * shape[2] * shape[3]
            w = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
        elif len(shape) == 2:  # the classifier
            w = rng.normal(0, np.sqrt(1.0 / shape[1]), shape)
        elif name.endswith(("_s_0", "_scale_0")) or "bn_s" in name:
            w = rng.uniform(0.5, 1.0, shape)
        elif "riv" in name or name.endswith("_var_0"):
            w = np.ones(shape)
        else:
            w = rng.normal(0, 0.01, shape)
        inits.append(numpy_helper.from_array(w.astype(np.float32), name))
    used = {i for n in keep for i in n.input}
    del m.graph.node[:]
    m.graph.node.extend(keep)
    old = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(old + inits)
    # the image is the only real input (the file lists every weight and shape as an input too, IR 3 style)
    image = next(i for i in m.graph.input if i.name.endswith("data_0"))
    del m.graph.input[:]
    m.graph.input.extend([image])
    m.ir_version = max(m.ir_version, 4)  # IR 3 wants every initializer listed as a graph input
    onnx.checker.check_model(m)
    model_path = os.path.join(path, "resnet50.onnx")
    onnx.save(m, model_path)
    x = rng.normal(0, 1, (images, 3, 224, 224)).astype(np.float32)
    data_path = os.path.join(path, "resnet50.npz")
    np.savez(data_path, **{image.name: x})
    return model_path, data_path, sum(i.ByteSize() for i in inits)


def zoo_model(name: str) -> tuple[str, str, int] | None:
    d = os.path.join(ZOO_CACHE, name)
    model, data = os.path.join(d, "model.onnx"), os.path.join(d, "data.npz")
    if not (os.path.exists(model) and os.path.exists(data)):
        return None
    import onnx

    m = onnx.load(model)
    return model, data, sum(i.ByteSize() for i in m.graph.initializer)


def run_convert(model: str, data: str, out: str, budget: float, work: str) -> dict:
    """`mqtool convert --target-bits 4` in its own process: exit code, wall time, peak RSS, ETA check."""
    cmd = [sys.executable, "-m", "mqtool.cli", "convert", model, "--data", data, "-o", out]
    cmd += ["--target-bits", "4", "--time-budget", f"{budget:g}", "--workdir", work]
    t0 = time.perf_counter()
    with open(os.path.join(work + ".log"), "w", encoding="utf-8") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    text = open(work + ".log", encoding="utf-8").read()
    row = {
        "exit_code": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),  # ru_maxrss is in KiB on Linux
        "last_line": text.strip().splitlines()[-1] if text.strip() else "",
    }
    plan = next((ln for ln in text.splitlines() if ln.startswith("plan (time budget")), None)
    m = re.search(r"ETA (\d+(?::\d+)+)", plan or "")
    if m:
        parts = [int(p) for p in m.group(1).split(":")]
        row["planned_s"] = float(sum(p * 60**i for i, p in enumerate(reversed(parts))))
        row["plan_error"] = round(wall / row["planned_s"] - 1, 3)
    return row


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--models", nargs="+", default=["resnet50", "minilm", "ddddocr_ocr"])
    ap.add_argument("--time-budget", type=float, default=5.0, help="minutes per convert")
    args = ap.parse_args()
    models, images, budget = args.models, 128, args.time_budget
    if args.quick:
        models, images, budget = ["resnet50"], 16, 1.0
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            got = resnet50(tmp, images) if name == "resnet50" else zoo_model(name)
            if got is None:
                rows[name] = {"skipped": "not built (bench/zoo/run.py, bench/zoo_transformer.py)"}
                continue
            model, data, wbytes = got
            row = run_convert(
                model, data, os.path.join(tmp, f"{name}-q.onnx"), budget, os.path.join(tmp, name)
            )
            row["weights_mib"] = round(wbytes / 2**20, 1)
            row["peak_over_weights"] = round(row["peak_rss_gib"] * GIB / max(wbytes, 1), 1)
            rows[name] = row
            print(name, json.dumps(row), flush=True)
    table_rows = [
        [
            n,
            r.get("weights_mib", "-"),
            r.get("peak_rss_gib", "-"),
            r.get("peak_over_weights", "-"),
            r.get("wall_s", "-"),
            r.get("planned_s", "-"),
            f"{r['plan_error']:+.0%}" if "plan_error" in r else "-",
            r.get("exit_code", r.get("skipped", "-")),
        ]
        for n, r in rows.items()
    ]
    body = (
        f"`mqtool convert --target-bits 4 --time-budget {budget:g}` per model in its own process; peak RSS from "
        "`os.wait4`; planned = the total the plan line printed before MetaQuantNet started; error = wall / "
        "planned - 1.\n\n"
        + common.table(
            [
                "model",
                "fp32 weights MiB",
                "peak RSS GiB",
                "peak / weights",
                "wall s",
                "planned s",
                "error",
                "exit",
            ],
            table_rows,
        )
    )
    common.finish(
        "memory",
        "bench_memory.py",
        args,
        {"time_budget_min": budget, "images": images, "models": rows},
        body,
        "" if args.quick else f" --time-budget {budget:g} --models {' '.join(models)}",
    )


if __name__ == "__main__":
    main()
