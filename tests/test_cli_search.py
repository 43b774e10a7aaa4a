"""The search's command-line options: library errors come back as the flag the user typed, a bad --widths
names the value, --act-bits is honoured by a searched conversion, and a time-budgeted run prints its plan
with an ETA and ends with a summary table (run in-process with click's CliRunner)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mqtool.cli import _in_cli_terms, cli
from mqtool.errors import InputError

from .conftest import example_path

TINY = [
    "--epochs",
    "1",
    "--population",
    "4",
    "--generations",
    "1",
    "--fitness-samples",
    "32",
    "--rerank",
    "2",
]


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = np.load(example_path("mnist_cnn", "train.npz"))
    np.savez(d / "train.npz", x=src["x"][:300], y=src["y"][:300])
    return d / "train.npz"


def test_library_fields_are_shown_as_flags() -> None:
    assert _in_cli_terms(InputError("space.widths: bad", field="space.widths")).startswith("--widths: bad")
    assert _in_cli_terms(InputError("training.epochs: bad", field="training.epochs")).startswith("--epochs:")
    assert _in_cli_terms(InputError("finetune.epochs: x", field="finetune.epochs")).startswith(
        "--finetune-epochs:"
    )
    assert _in_cli_terms(InputError("budget.bits: 9 is infeasible", field="budget.bits")).startswith(
        "--target-bits:"
    )
    # a message about something else is left alone
    assert _in_cli_terms(InputError("model.onnx: truncated", field=None)) == "model.onnx: truncated"


@pytest.mark.parametrize(
    ("widths", "expect"),
    [
        ("2,x", "--widths: expected comma-separated integers such as 2,4,8, got '2,x'"),
        ("1,4", "--widths: candidate widths must be integers in 2..8, got [1, 4]"),
    ],
)
def test_bad_widths_name_the_value(tmp_path, small, widths, expect) -> None:
    code, _, err = run(
        "convert", example_path("mnist_cnn"), "-o", tmp_path / "q.onnx", "--target-bits", "3",
        "--widths", widths, "--data", small, "--workdir", tmp_path / "wd",
    )  # fmt: skip
    assert code == 2 and expect in err and "None" not in err
    assert len(err.strip().splitlines()) <= 2  # the workdir line at most, then the error
    assert not (tmp_path / "q.onnx").exists()


def test_unknown_pin_names_the_flag(tmp_path, small) -> None:
    code, _, err = run(
        "search", example_path("mnist_cnn"), "-o", tmp_path / "p.json", "--target-bits", "3",
        "--pin", "nope=4", "--data", small, "--workdir", tmp_path / "wd", *TINY,
    )  # fmt: skip
    assert code == 2 and "--pin: no quantizable layer named 'nope'" in err


def test_act_bits_are_honoured_by_a_searched_conversion(tmp_path, small) -> None:
    out = tmp_path / "q.onnx"
    code, _, err = run(
        "convert", example_path("mnist_cnn"), "-o", out, "--target-bits", "4", "--act-bits", "6",
        "--data", small, "--workdir", tmp_path / "wd", "--finetune-epochs", "0", "--time-budget", "0", *TINY,
    )  # fmt: skip
    assert code in (0, 3), err
    code, rep, _ = run("report", out, "--json")
    acts = {layer["act_bits"] for layer in json.loads(rep)["layers"]}
    assert 6 in acts and acts <= {6, 32}


def test_a_time_budgeted_run_prints_its_plan_and_a_summary(tmp_path, small) -> None:
    out = tmp_path / "q.onnx"
    code, stdout, err = run(
        "convert", example_path("mnist_cnn"), "-o", out, "--target-bits", "3", "--data", small,
        "--workdir", tmp_path / "wd", "--time-budget", "3", "--finetune-epochs", "1", *TINY,
    )  # fmt: skip
    assert code in (0, 3), err
    lines = err.splitlines()
    plan = next(x for x in lines if x.startswith("plan (time budget 3 min)"))
    # every option was given explicitly, so nothing was reduced to fit, and no ceiling was promised
    assert "ETA" in plan and "reduced to fit" not in plan
    assert not any(x.startswith("time budget 3 min: ETA") for x in lines)
    assert any(x.startswith("objective: ce (+ cross-entropy on labels)") for x in lines)
    assert any("output logits: logits" in x for x in lines)
    assert any(x.startswith("fitness scale (bits-3): 0 = uniform 8-bit PTQ") for x in lines)
    assert any("elapsed" in x and "ETA" in x for x in lines if "GA bits-3 generation" in x)
    table = err[err.index("summary") :]
    for row in (
        "budget",
        "average weight bits",
        "agreement checked (ONNX Runtime)",
        "time: metaquantnet",
        "time: ga",
    ):
        assert row in table
    assert "fitness predicted" in stdout and "(0 = uniform 8-bit PTQ" in stdout
    # then against uniform 3-bit PTQ on the same held-out samples, in task terms (labels: top-1 accuracy)
    against = next(x for x in lines if "against uniform 3-bit PTQ on the same held-out samples" in x)
    assert "top-1 accuracy" in against and ("searched" in against) and ("uniform" in against)


def test_a_run_the_plan_may_size_promises_its_ceiling_before_the_setup(tmp_path, small) -> None:
    code, _, err = run(
        "convert", example_path("mnist_cnn"), "-o", tmp_path / "q.onnx", "--target-bits", "4", "--data", small,
        "--workdir", tmp_path / "wd", "--time-budget", "0.5",
    )  # fmt: skip
    assert code in (0, 3), err
    lines = err.splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("time budget 0.5 min: ETA 0:"))
    assert "at most" in lines[first]
    assert first < next(i for i, x in enumerate(lines) if x.startswith("objective:"))
    assert first < next(i for i, x in enumerate(lines) if x.startswith("plan (time budget 0.5 min)"))
