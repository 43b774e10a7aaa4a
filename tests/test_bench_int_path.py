"""bench_int_path.py and bench_emit_tables.py in quick mode (temporary output, docs untouched): their JSON
holds what they claim to measure - every layer fused in ours and ORT's models, ratios from the same run,
accuracies of the 8-bit containers, bytes ordered by container - never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, tmp) -> dict:
    name = {"bench_int_path.py": "int_path", "bench_emit_tables.py": "emit_tables"}[script]
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), "--quick", "--no-docs", "--out-dir", str(tmp)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    with open(os.path.join(tmp, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def test_int_path_quick(tmp_path):
    r = _run("bench_int_path.py", tmp_path)
    assert set(r["models"]) == {"mnist_cnn", "mnist_vit"} and r["cpu_flags"]
    for key, m in r["models"].items():
        for variant in ("ours-w8", "ours-w4"):
            assert m["graph"][variant]["integer_layers"] == m["layers"], (key, variant)
        # ORT also runs activation x activation MatMuls (attention) on integers: at least every layer
        assert m["graph"]["ort-int8"]["integer_layers"] >= m["layers"], key
        assert set(m["ratio_to_ort"]["cpu"]) == {"fp32", "ours-w8", "ours-w4"}
        assert m["accuracy"]["ours-w8"] >= m["accuracy"]["fp32"] - 0.01
        assert m["bytes"]["ours-w8"] < m["bytes"]["fp32"] / 2
    for s in r["eight_bit"].values():
        assert len(s["accuracy"]) == 4 and all(
            a >= s["accuracy"]["fp32"] - 0.01 for a in s["accuracy"].values()
        )


def test_emit_tables_quick(tmp_path):
    r = _run("bench_emit_tables.py", tmp_path)
    emb = {row[0]: row for row in r["embedding"]}
    lstm = {row[0]: row for row in r["lstm"]}
    # bytes: INT4 < INT8 < float; errors: 8-bit small, exact float
    assert (
        emb["GatherBlockQuantized INT4 block 32"][2]
        < emb["GatherBlockQuantized uint8 block 32"][2]
        < emb["float"][2]
    )
    assert emb["float"][3] == 0 and emb["GatherBlockQuantized uint8 block 32"][3] < 0.01
    assert lstm["DQ INT4 per row + LSTM"][2] < lstm["DQ INT8 per row + LSTM"][2] < lstm["float"][2] / 3
