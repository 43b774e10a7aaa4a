"""Benchmark: MetaQuantNet training epoch and GA time with 1 process vs 2 torchrun processes (gloo, CPU), and
the communication per step.

    python bench/bench_distributed.py [--example mnist_cnn] [--epochs 3] [--quick]

Runs `mqtool search` on the example's train.npz three ways: 1 process x 2 threads (the default on this
machine), 1 process x 1 thread, and `torchrun --standalone --nproc-per-node 2` (1 thread each, gloo). The
epoch times are the ones the CLI reports (rank 0), the median over the epochs after the first; the GA time is
the search line's. Communication is counted, not sampled: DistributedDataParallel all-reduces one fp32
gradient per MetaQuantNet parameter per step (ring all-reduce: each rank sends and receives
2(N-1)/N of that), and each GA generation all-gathers one float per candidate plus a population hash.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

EPOCH = re.compile(r"epoch (\d+)/(\d+)\s+loss \S+\s+([\d.]+)s")
GA = re.compile(r"(\d+) candidates in ([\d.]+)s")
MQN = re.compile(r"MetaQuantNet: ([\d,]+) parameters")


def run(example: str, data: str, workdir: str, nproc: int, threads: int, args) -> dict:
    model = os.path.join(common.EXAMPLES[example], "model.onnx")
    cli = ["-m", "mqtool", "search", model, "--data", data, "-o", os.path.join(workdir, "p.json")]
    cli += ["--workdir", os.path.join(workdir, "wd"), "--target-bits", "3", "--device", "cpu"]
    cli += ["--epochs", str(args.epochs), "--population", str(args.population)]
    cli += ["--generations", str(args.generations)]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            *cli,
        ]
    else:
        cmd = [sys.executable, *cli]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    epochs = [float(m.group(3)) for m in EPOCH.finditer(r.stderr)]
    ga = GA.search(r.stdout)
    return {
        "processes": nproc,
        "threads_per_process": threads,
        "epoch_s": epochs,
        "epoch_median_s": statistics.median(epochs[1:] or epochs),
        "ga_candidates": int(ga.group(1)),
        "ga_s": float(ga.group(2)),
        "mqn_params": int(MQN.search(r.stderr).group(1).replace(",", "")),
    }


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--example", default="mnist_cnn", choices=sorted(common.EXAMPLES))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--population", type=int, default=50)
    ap.add_argument("--generations", type=int, default=3)
    args = ap.parse_args()
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(common.EXAMPLES[args.example], "train.npz")
        if args.quick:
            args.epochs, args.population, args.generations = 2, 8, 1
            d = np.load(data)
            data = os.path.join(tmp, "train.npz")
            np.savez(data, **{k: d[k][:400] for k in d.files})
        runs = []
        for nproc, threads in ((1, 2), (1, 1), (2, 1)):
            wd = os.path.join(tmp, f"{nproc}x{threads}")
            os.makedirs(wd)
            runs.append(run(args.example, data, wd, nproc, threads, args))
            print(runs[-1], flush=True)
    base = runs[0]
    params = base["mqn_params"]
    world = 2
    step_bytes = 4 * params
    ring = 2 * (world - 1) / world * step_bytes
    result = {
        "example": args.example,
        "epochs": args.epochs,
        "runs": runs,
        "allreduce_bytes_per_step": step_bytes,
        "ring_bytes_sent_per_rank_per_step": ring,
        "ga_gather_bytes_per_candidate": 8,
    }
    rows = [
        [
            f"{r['processes']} x {r['threads_per_process']} thread(s)",
            round(r["epoch_median_s"], 2),
            round(base["epoch_median_s"] / r["epoch_median_s"], 2),
            round(r["ga_s"], 1),
            r["ga_candidates"],
            round(base["ga_s"] / r["ga_s"] * r["ga_candidates"] / base["ga_candidates"], 2),
        ]
        for r in runs
    ]
    body = (
        f"## Distributed search: 1 vs 2 processes on this 2-core machine ({args.example})\n\n"
        + common.table(
            [
                "processes x threads",
                "MetaQuantNet epoch s (median)",
                "speed-up vs 1x2",
                "GA s",
                "candidates",
                "GA throughput vs 1x2",
            ],
            rows,
        )
        + f"\n\nCommunication per training step: one all-reduce of {params:,} fp32 gradients = "
        f"{step_bytes / 1024:.1f} KiB (ring: {ring / 1024:.1f} KiB sent per rank); per GA generation an "
        "all-gather of one float per candidate and a 16-character population hash. The two processes share "
        "the same two cores as the 1 x 2 run, so little gain is expected here: the point of torchrun is more "
        "machines or GPUs, not this box.\n"
    )
    extra = "" if args.example == "mnist_cnn" else f" --example {args.example}"
    common.finish("distributed", "bench_distributed.py", args, result, body, extra)


if __name__ == "__main__":
    main()
