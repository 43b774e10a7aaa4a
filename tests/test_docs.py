"""The console examples of docs/*.md run, in order, and print what the pages show, so the docs cannot rot.

Each page's ```console blocks run from one scratch folder per page that holds `examples/` (and, for data.md,
the tiny models and inputs of `tests.test_data_examples.data_scratch`). `$ mqtool ...` runs the installed
entry point; `$ cmp A B` compares two files. The lines after a command are output it must print: each one
must match a line of its stdout or stderr, where a number matches any number and `...` anything (a line of
just `...` stands for omitted lines). Files named by `-o`/`--output`/`--plot` must exist afterwards.
Commands that search get the tiny settings of `TINY` for the options the page does not set.

Also: every option that docs/cli.md mentions in a command's section is an option of that command, and the
keys that `inspect --json` and `report --json` print are all documented.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from click.testing import CliRunner

from .conftest import ROOT, example_path
from .test_data_examples import data_scratch

DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
CLI_DOC = os.path.join(ROOT, "docs", "cli.md")
TINY = {
    "--epochs": "1",
    "--population": "4",
    "--generations": "1",
    "--fitness-samples": "32",
    "--rerank": "2",
    "--max-samples": "400",
}
TINY_CONVERT = {"--finetune-epochs": "1"}
OUTPUT_FLAGS = ("-o", "--output", "--plot")
NOT_MQTOOL_OPTIONS = {"--nproc-per-node"}  # torchrun's, in the search section


@dataclass
class Example:
    doc: str
    index: int
    cmd: str
    expected: list[str] = field(default_factory=list)

    @property
    def args(self) -> list[str]:
        return shlex.split(self.cmd)


def examples(doc: str) -> list[Example]:
    out: list[Example] = []
    for block in re.findall(r"```console\n(.*?)```", open(doc, encoding="utf-8").read(), flags=re.S):
        lines = [line for line in block.splitlines() if line.strip()]
        assert lines and lines[0].startswith("$ "), f"{doc}: a console block starts with output: {lines[:1]}"
        for line in lines:
            if line.startswith("$ "):
                out.append(Example(os.path.basename(doc), len(out), line[2:].strip()))
            else:
                out[-1].expected.append(line.strip())
    return out


ALL = [e for doc in DOCS for e in examples(doc)]
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*")
_ANY_NUMBER = r"[-+]?\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?"


def line_pattern(line: str) -> re.Pattern:
    """A shown output line as a regex: numbers match any number, `...` anything, spaces any spacing."""

    def literal(text: str) -> str:
        return re.sub(r"(?:\\ )+", r"\\s+", re.escape(text))

    parts = []
    for chunk in re.split(r"(\.\.\.)", line.strip()):
        if chunk == "...":
            parts.append(".*")
            continue
        pos = 0
        for m in _NUMBER.finditer(chunk):
            parts += [literal(chunk[pos : m.start()]), _ANY_NUMBER]
            pos = m.end()
        parts.append(literal(chunk[pos:]))
    return re.compile("".join(parts))


def with_tiny_settings(args: list[str]) -> list[str]:
    if not any(a in ("--target-bits", "--target-bitops") for a in args):
        return args
    extra = dict(TINY, **(TINY_CONVERT if args[1] == "convert" else {}))
    for flag, value in extra.items():
        if flag not in args:
            args = [*args, flag, value]
    return args


def outputs_named(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in OUTPUT_FLAGS]


class Page:
    """One page's scratch folder and the results of its commands, run in order on demand."""

    def __init__(self, doc: str, folder):
        self.folder = folder
        self.examples = [e for e in ALL if e.doc == doc]
        self.results: list[subprocess.CompletedProcess] = []
        os.symlink(os.path.join(ROOT, "examples"), folder / "examples")
        if doc == "data.md":
            data_scratch(folder)
        # The default workdir goes under the cache: keep it in the scratch folder.
        self.env = dict(os.environ, XDG_CACHE_HOME=str(folder / "cache"), MPLBACKEND="Agg")

    def result(self, index: int) -> subprocess.CompletedProcess:
        while len(self.results) <= index:
            self.results.append(self._run(self.examples[len(self.results)]))
        return self.results[index]

    def _run(self, example: Example) -> subprocess.CompletedProcess:
        args = example.args
        if args[0] == "cmp":
            same = (
                all(os.path.exists(self.folder / a) for a in args[1:])
                and len({(self.folder / a).read_bytes() for a in args[1:]}) == 1
            )
            return subprocess.CompletedProcess(args, 0 if same else 1, "", "" if same else "files differ\n")
        assert args[0] == "mqtool", (
            f"{example.doc}: console commands are `mqtool ...` or `cmp`: {example.cmd}"
        )
        exe = os.path.join(os.path.dirname(sys.executable), "mqtool")
        return subprocess.run(
            [exe, *with_tiny_settings(args)[1:]],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    made: dict[str, Page] = {}

    def page(doc: str) -> Page:
        if doc not in made:
            made[doc] = Page(doc, tmp_path_factory.mktemp(doc.replace(".", "_")))
        return made[doc]

    return page


@pytest.mark.parametrize("example", ALL, ids=[f"{e.doc}-{e.index}" for e in ALL])
def test_console_example_runs(pages, example):
    page = pages(example.doc)
    r = page.result(example.index)
    printed = (r.stdout or "") + "\n" + (r.stderr or "")
    context = f"{example.doc}: {example.cmd}\n{printed[-3000:]}"
    assert r.returncode == 0, context
    lines = [line.strip() for line in printed.splitlines()]
    for want in example.expected:
        if want != "...":
            assert any(line_pattern(want).fullmatch(line) for line in lines), f"missing {want!r}\n{context}"
    for path in outputs_named(example.args):
        assert (page.folder / path).exists(), f"{path} was not written\n{context}"


def test_every_example_shows_what_it_does():
    """A command shows at least one output line, names a file it writes, or is a `cmp` of two files."""
    for e in ALL:
        shown = [line for line in e.expected if line != "..."]
        assert shown or outputs_named(e.args) or e.args[0] == "cmp", f"{e.doc}: `{e.cmd}` shows no output"


def test_output_patterns():
    p = line_pattern("searched bits-2.5: avg 2.477 weight bits; top-1 0.9810 (fp32 0.9820, +0.00 pt), w8a8")
    assert p.fullmatch("searched bits-2.5: avg 3.000 weight bits; top-1 0.5 (fp32 0.9820, -0.10 pt), w8a8")
    assert not p.fullmatch("searched bits-2.5: avg 2.477 weight bits; top-1 0.9810 (fp32 0.9820, +0.00 pt)")
    assert line_pattern("workdir: .../mqtool/model-...").fullmatch("workdir: /tmp/c/mqtool/model-3f0c12")
    assert not line_pattern("16 quantizable layers").fullmatch("16 quantized layers")


def test_doc_has_examples_for_every_command():
    from mqtool.cli import cli

    text = open(CLI_DOC, encoding="utf-8").read()
    documented = {e.args[1] for e in ALL if e.doc == "cli.md" and e.args[0] == "mqtool"}
    for name in cli.commands:
        assert f"## {name}" in text, f"docs/cli.md has no section for `mqtool {name}`"
        assert name in documented, f"docs/cli.md has no console example of `mqtool {name}`"


def sections(text: str) -> dict[str, str]:
    """`## command` heading -> its text, up to the next `## `."""
    parts = re.split(r"^## (\S+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_documented_options_exist():
    from mqtool.cli import cli

    for name, body in sections(open(CLI_DOC, encoding="utf-8").read()).items():
        params = cli.commands[name].params
        options = {o for p in params for o in (*p.opts, *p.secondary_opts)}
        mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w*-])", body))
        unknown = sorted(mentioned - options - NOT_MQTOOL_OPTIONS)
        assert not unknown, f"docs/cli.md `## {name}` mentions {unknown}, not options of `mqtool {name}`"


def _keys(doc: dict) -> set[str]:
    keys = set(doc)
    for k in ("layers", "totals"):
        if isinstance(doc.get(k), list) and doc[k]:
            keys |= set(doc[k][0])
        elif isinstance(doc.get(k), dict):
            keys |= set(doc[k])
    return keys


def test_json_keys_are_documented(tmp_path):
    from mqtool.cli import cli

    model = example_path("mnist_cnn")
    r = CliRunner().invoke(
        cli, ["convert", model, "-o", str(tmp_path / "q.onnx"), "--bits", "4", "--act-bits", "32"]
    )
    assert r.exit_code == 0, r.stderr
    text = sections(open(CLI_DOC, encoding="utf-8").read())
    for command in (["inspect", model], ["report", str(tmp_path / "q.onnx")]):
        r = CliRunner().invoke(cli, [*command, "--json"])
        assert r.exit_code == 0, r.stderr
        undocumented = sorted(k for k in _keys(json.loads(r.stdout)) if f'"{k}"' not in text[command[0]])
        assert not undocumented, f"`mqtool {command[0]} --json` keys missing from docs/cli.md: {undocumented}"
