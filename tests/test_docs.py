"""The shell examples of docs/cli.md (```console blocks) run and exit 0, so the docs cannot rot."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from .conftest import ROOT

DOC = os.path.join(ROOT, "docs", "cli.md")


def _commands() -> list[str]:
    text = open(DOC, encoding="utf-8").read()
    cmds = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        cmds += [line[2:].strip() for line in block.splitlines() if line.startswith("$ ")]
    return cmds


def test_doc_has_examples_for_every_command():
    from mqtool.cli import cli

    documented = {shlex.split(c)[1] for c in _commands()}
    text = open(DOC, encoding="utf-8").read()
    for name in cli.commands:
        assert f"## {name}" in text, f"docs/cli.md has no section for `mqtool {name}`"
    assert "inspect" in documented


@pytest.mark.parametrize("cmd", _commands())
def test_console_example_runs(cmd, tmp_path):
    os.symlink(os.path.join(ROOT, "examples"), tmp_path / "examples")
    exe = os.path.join(os.path.dirname(sys.executable), "mqtool")
    args = shlex.split(cmd)
    assert args[0] == "mqtool"
    r = subprocess.run([exe, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
