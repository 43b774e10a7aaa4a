"""Interruption: `mqtool search` killed with SIGKILL mid-run resumes from its checkpoints (it does not start
from zero) and ends with the same policy as an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from .conftest import example_path

EXE = os.path.join(os.path.dirname(sys.executable), "mqtool")
# --time-budget 0: the reference and the killed run are two runs, and a time budget plans each from what it
# measures (a loaded machine skips the sensitivity pass in one and not the other)
ARGS = ["--target-bits", "3", "--seed", "3", "--epochs", "6", "--population", "6", "--generations", "2",
        "--time-budget", "0"]  # fmt: skip


def _small_data(tmp_path) -> str:
    d = np.load(example_path("mnist_cnn", "train.npz"))
    p = tmp_path / "small.npz"
    np.savez_compressed(p, x=d["x"][:300], y=d["y"][:300])
    return str(p)


def _search(data: str, out: str, workdir: str) -> list[str]:
    return [EXE, "search", example_path("mnist_cnn"), "--data", data, "-o", out, "--workdir", workdir, *ARGS]


def test_sigkill_then_resume_gives_the_same_policy(tmp_path):
    data = _small_data(tmp_path)
    ref = subprocess.run(
        _search(data, str(tmp_path / "ref.json"), str(tmp_path / "wd_ref")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr

    wd = tmp_path / "wd"
    out = tmp_path / "out.json"
    proc = subprocess.Popen(_search(data, str(out), str(wd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = wd / "metaquantnet.pt"
    deadline = time.time() + 300
    epoch = 0
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                epoch = int(torch.load(ckpt, weights_only=True)["epoch"])
            except Exception:  # being replaced right now: atomic rename, so retry
                epoch = 0
            if 1 <= epoch < 5:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= epoch < 5, "the run was not caught mid-training"
    assert not out.exists()

    again = subprocess.run(_search(data, str(out), str(wd)), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch" in again.stderr
    assert "epoch 1/6" not in again.stderr  # did not restart from zero
    assert out.read_text() == (tmp_path / "ref.json").read_text()
    assert not [
        p for p in os.listdir(wd) if p.endswith(".tmp")
    ]  # stale temp files of the killed run are swept


def test_corrupt_checkpoint_is_a_clear_error_or_restart(tmp_path):
    data = _small_data(tmp_path)
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "metaquantnet.pt").write_bytes(b"not a checkpoint")
    args = [
        EXE,
        "search",
        example_path("mnist_cnn"),
        "--data",
        data,
        "-o",
        str(tmp_path / "p.json"),
        "--workdir",
        str(wd),
        "--target-bits",
        "3",
        "--epochs",
        "1",
        "--population",
        "4",
        "--generations",
        "1",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "corrupt or foreign checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*args, "--restart"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
