"""Shared helpers of the benchmarks: machine description, timing, ORT accuracy, result/doc writers.

Each benchmark writes `<out-dir>/<name>.json` (default bench/results) and, unless `--no-docs`, replaces
its own section `<!-- bench:name -->...<!-- /bench:name -->` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMG = os.path.join(ROOT, "docs", "img")
# BENCH_EXAMPLES_DIR: another folder with <name>/model.onnx, train.npz, test.npz (e.g. the committed examples
# extracted with `git show` while examples/ is being retrained).
EXAMPLES_DIR = os.environ.get("BENCH_EXAMPLES_DIR") or os.path.join(ROOT, "examples")
# mnist_vit_compact: the width-24 ViT (2 bits do hurt it; examples/README.md), for the benchmarks that take
# --example; its npz are links to mnist_vit's. The benchmarks that measure "every example" loop over
# LOOPED_EXAMPLES, the two their documented figures were measured on.
LOOPED_EXAMPLES = ("mnist_cnn", "mnist_vit")
EXAMPLES = {name: os.path.join(EXAMPLES_DIR, name) for name in (*LOOPED_EXAMPLES, "mnist_vit_compact")}
# the real-model zoo built by bench/zoo/run.py (git-ignored)
ZOO_CACHE = os.path.join(ROOT, "bench", "zoo", ".cache")
THREADS = 2


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --out-dir, --no-docs."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke mode (seconds)")
    ap.add_argument("--out-dir", default=RESULTS, help="where the JSON (and plots with --no-docs) go")
    ap.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md or docs/img")
    return ap


def setup_torch(threads: int = THREADS) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def machine() -> dict[str, Any]:
    """CPU model, core count and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "onnx", "onnxruntime", "scipy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    load = [round(x, 2) for x in os.getloadavg()]
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": THREADS, "load_avg": load, "versions": versions}


def machine_line(m: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    load = f", load average {m['load_avg'][0]} when written" if "load_avg" in m else ""
    return f"Machine: {m['cpu']}, {m['cores']} cores (shared{load}), {m['threads']} threads; {v}."


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def interleaved_ms(
    fns: dict[str, Callable[[], Any]],
    runs: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ms of each function, run interleaved in a rotating order (load hits all alike); `clock` is
    wall time by default, `time.process_time` for the CPU time the process spent."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for i in range(runs):
        for name, fn in order[i % len(order) :] + order[: i % len(order)]:
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def session(model: Any, threads: int = THREADS):
    """An ORT CPU session (all optimisations) for a ModelProto, bytes or a path."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def load_npz(path: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(path)
    x, y = d["x"].astype(np.float32), d["y"].astype(np.int64)
    return (x[:limit], y[:limit]) if limit else (x, y)


def ort_eval(model: Any, x: np.ndarray, y: np.ndarray, batch: int = 250) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the first output on (x, y) with ONNX Runtime."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    logits = logits.reshape(len(x), -1).astype(np.float64)
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return {
        "accuracy": float((logits.argmax(1) == y).mean()),
        "loss": float(-logp[np.arange(len(y)), y].mean()),
    }


def ort_peer(
    model_path: str,
    x: np.ndarray,
    out: str,
    *,
    batch: int = 1,
    reduce_range: bool = False,
    int4: bool = False,
) -> dict:
    """ONNX Runtime's `quantize_static` of a one-input model (`mqtool.report.ort_quantize_static`: the peer
    every comparison uses), calibrated on `x` in runs of `batch` samples; written to `out`."""
    import onnx

    from mqtool.report import ort_quantize_static

    m = onnx.load(model_path)
    inits = {t.name for t in m.graph.initializer}
    name = next(i.name for i in m.graph.input if i.name not in inits)
    runs = [{name: x[i : i + batch]} for i in range(0, len(x), batch)]
    q, info = ort_quantize_static(m, runs, reduce_range=reduce_range, int4_weights=int4)
    onnx.save(q, out)
    return info


def write_json(out_dir: str, name: str, result: dict[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


_HEADER = """# Benchmarks

Every section below is regenerated by its own script (`python bench/<script>.py`, or all of them with
`python bench/run_all.py`); the JSON behind each table is in `bench/results/`. Timings are medians over
repeated runs on a shared 2-core machine; comparisons are ratios measured in the same run.
"""


def write_doc_section(name: str, body: str, doc: str = DOC) -> None:
    """Replace (or append) the `<!-- bench:name -->` section of docs/benchmarks.md."""
    text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else _HEADER
    block = f"<!-- bench:{name} -->\n{body.strip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    tmp = doc + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, doc)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def command(script: str, args: argparse.Namespace, extra: str = "") -> str:
    return f"python bench/{script}{' --quick' if args.quick else ''}{extra}"


def git_commit() -> str:
    """The short commit of the checkout (what a merged benchmark cell was measured with)."""
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def finish(
    name: str, script: str, args: argparse.Namespace, result: dict[str, Any], body: str, extra: str = ""
) -> None:
    """Write the JSON and (unless --no-docs) the doc section with the command and the machine."""
    result = {"benchmark": name, "quick": args.quick, "machine": machine(), **result}
    path = write_json(args.out_dir, name, result)
    print(f"wrote {path}")
    if args.no_docs:
        return
    cmd = command(script, args, extra)
    section = f"{body.strip()}\n\nCommand: `{cmd}`\n\n{machine_line(result['machine'])}\n"
    write_doc_section(name, section)
    print(f"updated section '{name}' of {os.path.relpath(DOC, ROOT)}")


def img_path(args: argparse.Namespace, name: str) -> str:
    d = args.out_dir if args.no_docs else IMG
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, name)
