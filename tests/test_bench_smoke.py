"""Smoke tests of the benchmarks: each script runs with --quick into a temporary directory (--no-docs), so
docs/ and bench/results are never touched, and writes its JSON there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    assert result["quick"] is True
    assert result["machine"]["cores"] >= 1
    assert _outputs(name) == before, "a --no-docs run touched its docs/ section or bench/results files"


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
