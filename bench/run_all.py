"""Run every benchmark in turn (one at a time: the machine is shared) and regenerate docs/benchmarks.md.

    python bench/run_all.py [--quick] [--out-dir DIR] [--no-docs] [--only NAME ...]

Order: backend, ptq, latency, emit_speed, peers (NNCF: set NNCF_PATH, see bench_peers.py), proxy, methods (mnist_cnn, then mnist_vit),
fitness_samples, ga_time, distributed (bench_large_model.py, ~15 min and 9 GiB, runs only on its own). Each script writes its
own JSON and its own section of the doc; a failing script is reported and the others still run.
`bench/bench_backend.py` writes only its JSON; its section is written here from that JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
JOBS: list[tuple[str, list[str]]] = [
    ("backend", ["bench_backend.py"]),
    ("ptq", ["bench_ptq.py"]),
    ("latency", ["bench_latency.py"]),
    ("emit_speed", ["bench_emit_speed.py"]),
    ("peers", ["bench_peers.py"]),
    ("proxy", ["bench_proxy.py"]),
    ("methods", ["bench_methods.py"]),
    ("methods_vit", ["bench_methods.py", "--example", "mnist_vit"]),
    ("fitness_samples", ["bench_fitness_samples.py"]),
    ("ga_time", ["bench_ga_time.py"]),
    ("distributed", ["bench_distributed.py"]),
]


def backend_section(path: str, quick: bool) -> str:
    with open(path, encoding="utf-8") as f:
        r = json.load(f)
    return (
        "## PyTorch backend: forward+backward vs a hand-written module (mnist_cnn)\n\n"
        + common.table(
            ["variant", "ms", "ratio to hand-written (goal <= 1.5)"],
            [
                ["hand-written nn.Module", r["hand_ms"], 1.0],
                ["to_torch(model.onnx)", r["converter_ms"], r["ratio"]],
                ["to_torch + fake quant (w4, a8)", r["converter_fake_quant_ms"], r["ratio_fake_quant"]],
            ],
        )
        + f"\n\nBatch {r['batch']}, median of {r['runs']} interleaved runs, {r['threads']} threads.\n\n"
        f"Command: `python bench/bench_backend.py{' --quick' if quick else ''}`\n\n"
        + common.machine_line(common.machine())
    )


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--only", nargs="*", help="names of the benchmarks to run")
    args = ap.parse_args()
    status = {}
    for name, cmd in JOBS:
        if args.only and name not in args.only:
            continue
        argv = [sys.executable, os.path.join(BENCH, cmd[0]), *cmd[1:]]
        if args.quick:
            argv.append("--quick")
        if name == "backend":
            argv += ["--out", os.path.join(args.out_dir, "backend.json")]
        else:
            argv += ["--out-dir", args.out_dir] + (["--no-docs"] if args.no_docs else [])
        t0 = time.time()
        print(f"== {name}: {' '.join(argv[1:])}", flush=True)
        rc = subprocess.call(argv)
        status[name] = {"rc": rc, "seconds": round(time.time() - t0, 1)}
        if name == "backend" and rc == 0 and not args.no_docs:
            common.write_doc_section(
                "backend", backend_section(os.path.join(args.out_dir, "backend.json"), args.quick)
            )
    print(json.dumps(status, indent=1))
    if any(s["rc"] for s in status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
