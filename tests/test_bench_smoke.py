"""The benchmarks in quick mode: each script runs with --quick into a temporary directory (--no-docs), so
docs/ and bench/results are never touched, and its JSON must hold what the benchmark claims to measure:
invariants that a broken measurement breaks (budgets met, sizes ordered, fused kernels chosen, a ranking
compared with itself is perfect), never timings."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
SCRIPTS = [
    ("bench_ptq.py", "ptq"),
    ("bench_latency.py", "latency"),
    ("bench_emit_speed.py", "emit_speed"),
    ("bench_proxy.py", "proxy"),
    ("bench_methods.py", "methods"),
    ("bench_peers.py", "peers"),
    ("bench_large_model.py", "large_model"),
    ("bench_distributed.py", "distributed"),
    ("bench_fitness_samples.py", "fitness_samples"),
    ("bench_ga_time.py", "ga_time"),
]


def _ptq(r: dict) -> None:
    for rows in r["examples"].values():
        fp32 = rows["fp32"]
        ours = {k: v for k, v in rows.items() if k.startswith("ours-")}
        assert ours and any(k.startswith("ort-") for k in rows)
        for key, v in ours.items():
            assert v["true_bits_bytes"] <= v["bytes"] < fp32["bytes"], key  # the ideal is a lower bound
            assert v["bits"] == int(re.match(r"ours-w(\d+)a", key).group(1))
            if key.endswith("-packed"):  # packing never grows a file
                assert v["bytes"] <= ours[key.replace("-packed", "-int8")]["bytes"], key
        assert rows["ours-w8a8-int8"]["accuracy"] >= fp32["accuracy"] - 0.02


def _latency(r: dict) -> None:
    def ops(key: str) -> dict[str, int]:
        return {
            op: int(n) for n, op in (item.split(" ", 1) for item in r["ort_optimized_ops"][key].split(", "))
        }

    convs = ops("fp32")["Conv"]
    for key in r["latency_ms"]:
        if key.startswith("ours-") and "w8a8" in key:  # every Conv became an integer kernel
            assert ops(key).get("QLinearConv") == convs and "Conv" not in ops(key), key
            assert r["bytes"][key] < r["bytes"]["fp32"] / 3, key
    assert all(0 <= d < 0.1 for d in r["fused_vs_unfused"].values())


def _emit_speed(r: dict) -> None:
    (m,) = r["models"].values()  # quick: SqueezeNet only, one run
    assert m["layers"] == 26 and m["nodes_prepared"] < m["nodes_in"] < m["nodes_out"]
    assert len(m["emit_s_all"]) == 1


def _proxy(r: dict) -> None:
    lo, hi = r["avg_bits_range"]
    assert len(r["rows"]) == r["policies"] >= 2
    assert len({tuple(row["wbits"]) for row in r["rows"]}) == len(r["rows"])  # distinct policies
    for row in r["rows"]:
        assert lo - 1e-9 <= row["avg_bits"] <= hi + 1e-9 and set(row["wbits"]) <= {2, 3, 4, 5, 6, 8}
        assert len(row["test_acc"]) == r["finetune_seeds"] and all(0 <= a <= 1 for a in row["test_acc"])
        assert row["test_acc_mean"] == sum(row["test_acc"]) / len(row["test_acc"])
    assert all(-1 <= k["tau"] <= 1 for k in r["kendall_tau"].values())


def _within_budget(row: dict) -> bool:
    if row["method"] in ("ours", "hawq", "random"):
        return row["avg_bits"] <= row["target"] + 1e-9
    return set(row["wbits"]) == {int(row["target"])}  # uniform k bits


def _methods(r: dict) -> None:
    (run,) = r["runs"]
    rows = run["rows"]
    assert {row["method"] for row in rows} == {
        "ours",
        "ours_pure",
        "uniform_ptq",
        "uniform_qat",
        "hawq",
        "random",
    }
    assert all(_within_budget(row) for row in rows), [row for row in rows if not _within_budget(row)]
    assert len({len(row["wbits"]) for row in rows}) == 1 and all(0 <= row["accuracy"] <= 1 for row in rows)


def _peers(r: dict) -> None:
    (rows,) = r["examples"].values()
    assert rows["ours-w8a8"]["accuracy"] >= rows["fp32"]["accuracy"] - 0.02
    assert rows["ours-w8a8"]["bytes"] < rows["fp32"]["bytes"] / 2
    assert ("nncf-int8" in rows) == (r["nncf"] is not None) != bool(r["nncf_error"])


def _large_model(r: dict) -> None:
    runs = r["runs"]
    for name, run in runs.items():
        assert run["convert"]["exit_code"] == 0 == run["check"]["exit_code"], name
        assert run["check"]["finite"] and run["check"]["rel_error"] < 0.5 and run["output_bytes"] > 0, name
        assert run.get("validate", {"exit_code": 0})["exit_code"] == 0, name
    # A policy naming only the first layer leaves the others float: less error than every layer at 4 bits.
    assert runs["policy_first_layer"]["check"]["rel_error"] < runs["bits4"]["check"]["rel_error"]


def _distributed(r: dict) -> None:
    runs = r["runs"]
    assert [(x["processes"], x["threads_per_process"]) for x in runs] == [(1, 2), (1, 1), (2, 1)]
    assert len({x["mqn_params"] for x in runs}) == 1 and all(x["ga_candidates"] > 0 for x in runs)
    assert r["allreduce_bytes_per_step"] == 4 * runs[0]["mqn_params"]


def _fitness_samples(r: dict) -> None:
    for example in {row["example"] for row in r["rows"]}:
        rows = [row for row in r["rows"] if row["example"] == example]
        full = max(row["samples"] for row in rows)
        (ref,) = [row for row in rows if row["samples"] == full and row["activations"] == "quantized"]
        # the reference ranking compared with itself: perfect, and no ranking shares more of its top 10
        assert ref["kendall_tau"] == 1.0
        for row in rows:
            assert -1 <= row["kendall_tau"] <= 1 and 0 <= row["top10_overlap"] <= ref["top10_overlap"] <= 10
            if row["activations"] == "quantized":
                assert row["tau_vs_quantized_same_samples"] == 1.0
        assert {row["activations"] for row in rows} == {"quantized", "float"}


def _ga_time(r: dict) -> None:
    assert len(r["rows"]) == 2 * len(r["metaquantnet_s"])  # two budgets per example
    for row in r["rows"]:
        assert row["avg_bits"] <= row["budget"] + 1e-9 and math.isfinite(row["fitness"])
        assert row["evaluated"] >= row["scored"] >= row["stopped_early"] >= 0


CHECKS: dict[str, Callable[[dict], None]] = {
    "ptq": _ptq,
    "latency": _latency,
    "emit_speed": _emit_speed,
    "proxy": _proxy,
    "methods": _methods,
    "peers": _peers,
    "large_model": _large_model,
    "distributed": _distributed,
    "fitness_samples": _fitness_samples,
    "ga_time": _ga_time,
}


def _outputs(name: str) -> dict[str, object]:
    """What a run of benchmark `name` would write: its files in bench/results and docs/img (named after it)
    and its section of docs/benchmarks.md. Only these: other benchmarks and commits running at the same
    time on the shared machine change the rest."""
    out: dict[str, object] = {}
    for d in (os.path.join(ROOT, "docs", "img"), os.path.join(BENCH, "results")):
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.startswith(name):
                    out[f] = os.path.getmtime(os.path.join(d, f))
    doc = os.path.join(ROOT, "docs", "benchmarks.md")
    if os.path.exists(doc):
        text = open(doc, encoding="utf-8").read()
        start = text.find(f"<!-- bench:{name} -->")
        out["section"] = text[start : text.find(f"<!-- /bench:{name} -->", start)] if start >= 0 else None
    return out


@pytest.mark.parametrize("script,name", SCRIPTS)
def test_quick(script: str, name: str, tmp_path) -> None:
    before = _outputs(name)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    subprocess.run(
        [sys.executable, os.path.join(BENCH, script), "--quick", "--no-docs", "--out-dir", str(tmp_path)],
        check=True,
        cwd=str(tmp_path),
        env=env,
        timeout=300,  # a hang, not slowness: the quick modes take 2x longer on the loaded shared machine
    )
    with open(tmp_path / f"{name}.json", encoding="utf-8") as f:
        result = json.load(f)
    assert result["benchmark"] == name and result["quick"] is True
    assert result["machine"]["cores"] >= 1
    CHECKS[name](result)
    assert _outputs(name) == before, "a --no-docs run touched its docs/ section or bench/results files"


def test_every_benchmark_is_checked():
    assert set(CHECKS) == {name for _, name in SCRIPTS}


def test_doc_section_replaced_independently(tmp_path) -> None:
    sys.path.insert(0, BENCH)
    import common

    doc = str(tmp_path / "b.md")
    common.write_doc_section("a", "one", doc)
    common.write_doc_section("b", "two", doc)
    common.write_doc_section("a", "three", doc)
    text = open(doc, encoding="utf-8").read()
    assert "three" in text and "two" in text and "one" not in text
    assert text.index("<!-- bench:a -->") < text.index("<!-- bench:b -->")


def test_memory_bench_builds_a_runnable_resnet50(tmp_path) -> None:
    """bench_memory.py's ResNet-50 (the onnx package's topology, random weights): ~25.6M parameters, the
    image its only input, ONNX Runtime runs it. The convert itself is the benchmark (minutes)."""
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, BENCH)
    import bench_memory

    model, data, wbytes = bench_memory.resnet50(str(tmp_path), images=2)
    m = onnx.load(model)
    params = sum(int(np.prod(i.dims)) for i in m.graph.initializer if len(i.dims) >= 1)
    assert 25_000_000 < params < 26_000_000 and wbytes > 4 * 25_000_000
    assert [i.name for i in m.graph.input] == list(np.load(data).keys())
    onnx.checker.check_model(m, full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    x = np.load(data)[m.graph.input[0].name][:1]
    (y,) = sess.run(None, {m.graph.input[0].name: x})
    assert y.shape == (1, 1000) and np.isfinite(y).all()
