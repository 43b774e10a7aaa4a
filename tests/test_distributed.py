"""`mqtool search` under torchrun with 2 CPU processes (gloo) on a tiny setting: it trains, writes one set of
outputs, and finds the single-process policy (or, where float summation order flips a close GA decision, a
policy whose fitness is within the tolerance documented in docs/distributed.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .conftest import example_path

TINY = [
    "--target-bits", "3", "--epochs", "1", "--population", "8", "--generations", "2",
    "--fitness-samples", "64", "--seed", "3", "--device", "cpu",
]  # fmt: skip

# |fitness(2 ranks) - fitness(1 rank)| <= REL_TOL * |fitness(1 rank)| when the policies differ (see docs).
REL_TOL = 0.05


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = np.load(example_path("mnist_cnn", "train.npz"))
    path = tmp_path_factory.mktemp("data") / "train.npz"
    # 601 samples: 120 in the search split, 481 to train, so the last batch (97) splits unevenly.
    np.savez(path, **{k: d[k][:601] for k in d.files})
    return str(path)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return env


def _search(args: list[str], cwd: str, nproc: int) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [*launcher, "-m", "mqtool", "search", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def test_two_gloo_processes_find_the_single_process_policy(small_data, tmp_path):
    model = example_path("mnist_cnn")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    r1 = _search([model, "--data", small_data, "-o", "p.json", "--workdir", "wd", *TINY], str(one), 1)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _search([model, "--data", small_data, "-o", "p.json", "--workdir", "wd", *TINY], str(two), 2)
    assert r2.returncode == 0, r2.stderr[-2000:]

    # one set of outputs: rank 0 printed and wrote, rank 1 stayed silent
    assert r2.stdout.count("wrote ") == 1 and r2.stdout.count("average weight bits <= 3") == 1
    assert r2.stderr.count("workdir: ") == 1 and r2.stderr.count("MetaQuantNet: ") == 1
    assert sorted(os.listdir(two)) == ["p.json", "wd"]
    assert sorted(os.listdir(two / "wd")) == sorted(os.listdir(one / "wd"))
    assert not [f for f in os.listdir(two / "wd") if f.endswith(".tmp")]

    p1 = json.loads((one / "p.json").read_text())
    p2 = json.loads((two / "p.json").read_text())
    f1, f2 = p1["meta"]["fitness"]["value"], p2["meta"]["fitness"]["value"]
    if p1["layers"] != p2["layers"]:
        assert abs(f2 - f1) <= REL_TOL * abs(f1), (f1, f2)
    else:
        assert abs(f2 - f1) <= 1e-3 * abs(f1), (f1, f2)


def test_resume_under_torchrun_reuses_the_checkpoint(small_data, tmp_path):
    model = example_path("mnist_cnn")
    args = [model, "--data", small_data, "-o", "p.json", "--workdir", "wd", *TINY]
    first = _search(args, str(tmp_path), 2)
    assert first.returncode == 0, first.stderr[-2000:]
    again = _search(args[: -len(TINY)] + [*TINY[:1], "2.5", *TINY[2:]], str(tmp_path), 2)
    assert again.returncode == 0, again.stderr[-2000:]
    # the second budget reuses the MetaQuantNet rank 0 read from the workdir and sent to rank 1
    assert "resuming after epoch 1" in again.stderr and "epoch 1/1" not in again.stderr
    assert json.loads((tmp_path / "p.json").read_text())["meta"]["budget"]["value"] == 2.5


def test_convert_under_torchrun_finetunes_and_emits_once(small_data, tmp_path):
    model = example_path("mnist_cnn")
    args = [model, "--data", small_data, "-o", "q.onnx", "--workdir", "wd", "--finetune-epochs", "1", *TINY]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run(
        [*launcher, "-m", "mqtool", "convert", *args],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("searched bits-3") == 1 and r.stderr.count("finetune epoch 1/1") == 1
    assert sorted(os.listdir(tmp_path)) == ["q.onnx", "wd"]
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    x = np.load(example_path("mnist_cnn", "test.npz"))["x"][:200]
    y = np.load(example_path("mnist_cnn", "test.npz"))["y"][:200]
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    acc = float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y).mean())
    assert acc > 0.8  # 1 epoch of MetaQuantNet on 481 samples, 3 bits: far above chance (0.1)
