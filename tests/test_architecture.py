"""The package boundary of docs/architecture.md ("Dependency rule"), checked on the source with `ast`.

Every module of mqtool/, passes/ and calibration/ is parsed (nothing is imported). An import anywhere in a
module, lazy ones inside functions included, is an edge: a lazy import hides a dependency from the import
system, not from the design. `from pkg import sub` where `pkg.sub` is a module is an edge to `pkg.sub`
only, not to `pkg/__init__.py` (the usual reading, as in import-linter and the contract check).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mqtool", "passes", "calibration")

# The shared core: plain data and NumPy, importable by every other layer, importing only itself. Any other
# module of mqtool/ is a stage; a new module that the core or an engine must import belongs in this list.
CORE = frozenset(
    {
        "mqtool",
        "mqtool.errors",
        "mqtool.fileio",
        "mqtool.numerics",
        "mqtool.model",
        "mqtool.analysis",
        "mqtool.policy",
        "mqtool.data",
        "mqtool.dataspec",
        "mqtool.runtime",
        "mqtool.tables",
        "mqtool.weight_layout",
        "mqtool.weight_layers",
    }
)
# Engines: each may import the core and its own package, nothing else of ours.
ENGINES = ("passes", "calibration", "mqtool.backend")
# Entry points: only they may print.
ENTRY_POINTS = ("mqtool.cli", "mqtool.console", "mqtool.__main__", "mqtool.backend.__main__")
NO_TORCH = ("passes", "calibration")  # and the core


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer(module: str) -> str:
    """'core', the engine's package ('passes', 'calibration', 'mqtool.backend'), 'stage' or 'entry' (in
    that order: each may import the ones before it)."""
    if module in CORE:
        return "core"
    if any(_in(module, p) for p in ENGINES):
        return next(p for p in ENGINES if _in(module, p))
    if module in ENTRY_POINTS:
        return "entry"
    return "stage"


def modules(root: str, packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under the packages."""
    found = {}
    for pkg in packages:
        for dirpath, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    name = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, ".")
                    found[name.removesuffix(".__init__")] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: str, packages: Iterable[str] = PACKAGES) -> dict[str, dict[str, int]]:
    """module -> {imported module of ours or an outside top-level name: first line importing it}."""
    mods = modules(root, packages)
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.endswith("__init__.py"), node)
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if subs and len(subs) == len(node.names) else [base, *subs]
            for t in targets:
                # `import a.b.c` binds the deepest of our modules it names; outside names keep their root.
                while t and t not in mods and "." in t and t.split(".")[0] in packages:
                    t = t.rsplit(".", 1)[0]
                t = t if t in mods else t.split(".")[0]
                if t and t != name:
                    edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle among the graph's own modules (a list a -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if v not in graph:
                continue
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def rule_violations(root: str, graph: dict[str, dict[str, int]]) -> list[str]:
    """`file:line: a imports b` for every import that breaks the dependency rule."""
    mods = modules(root)
    bad = []
    for m, edges in sorted(graph.items()):
        lm = layer(m)
        for t, line in sorted(edges.items()):
            where = f"{os.path.relpath(mods[m], root)}:{line}: {m} imports {t}"
            if t == "torch" and (lm == "core" or any(_in(m, p) for p in NO_TORCH)):
                bad.append(where + " (the core, passes and calibration are NumPy only)")
            if t not in graph:
                continue
            lt = layer(t)
            if lm == "core" and lt != "core":
                bad.append(where + " (the core imports only the core)")
            elif lm in ENGINES and lt not in ("core", lm):
                bad.append(where + f" ({lm} imports only the core and itself)")
            elif lm == "stage" and lt == "entry":
                bad.append(where + " (nothing imports the CLI)")
    return bad


def prints(root: str) -> list[str]:
    """`file:line` of every print() call outside the entry points."""
    found = []
    for name, path in sorted(modules(root).items()):
        if name in ENTRY_POINTS:
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{os.path.relpath(path, root)}:{node.lineno}")
    return found


def test_import_graph_is_acyclic():
    graph = imports(ROOT)
    assert {"mqtool.cli", "passes.insert_qdq", "calibration.calibrate", "mqtool.numerics"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_dependency_rule():
    assert rule_violations(ROOT, imports(ROOT)) == []


def test_no_print_outside_the_entry_points():
    assert prints(ROOT) == []


def _tree(tmp_path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return str(tmp_path)


@pytest.mark.parametrize(
    "files,expected",
    [
        # the core reaching up into the passes
        ({"mqtool/model.py": "from passes.graph import toposort\n", "passes/graph.py": ""}, "mqtool.model"),
        # a pass using the search (a lazy import counts)
        (
            {"passes/p.py": "def f():\n    import mqtool.search.engine\n", "mqtool/search/engine.py": ""},
            "passes.p",
        ),
        # calibration importing a pass
        ({"calibration/c.py": "from passes import graph\n", "passes/graph.py": ""}, "calibration.c"),
        # torch in a pass
        ({"passes/p.py": "import torch.nn\n"}, "torch"),
        # a stage importing the CLI
        ({"mqtool/emit.py": "from mqtool.cli import main\n", "mqtool/cli.py": ""}, "mqtool.cli"),
    ],
)
def test_rule_checker_reports_violations(tmp_path, files, expected):
    root = _tree(tmp_path, files)
    (bad,) = rule_violations(root, imports(root))
    assert expected in bad and ":" in bad.split(" ")[0]


def test_cycle_and_print_checkers_report(tmp_path):
    root = _tree(
        tmp_path,
        {
            "mqtool/emit.py": "from passes.pipeline import prepare\n",
            "passes/pipeline.py": "from . import graph\n",
            "passes/graph.py": "def f():\n    from mqtool import emit\n    print('x')\n",
            "mqtool/cli.py": "print('fine here')\n",
        },
    )
    graph = imports(root)
    assert graph["passes.pipeline"] == {"passes.graph": 1}  # the relative import resolved to the module
    assert find_cycle(graph) == ["mqtool.emit", "passes.pipeline", "passes.graph", "mqtool.emit"]
    assert prints(root) == [os.path.join("passes", "graph.py") + ":3"]
