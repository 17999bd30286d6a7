"""The layers have no import circles: samplers depend on torch alone, methods on samplers and nets, and no two
project modules import each other, directly or around a loop (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("samplers", "lightning_modules", "datamodules", "callbacks", "evaluation", "envs", "difflab")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name` the package's own code
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        found |= {n for n in names if n in known}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    return {name: imports(path, known) - {name} for name, path in files.items()}


def test_samplers_import_nothing_of_the_project():
    g = graph()
    outside = {m: sorted(d for d in deps if not d.startswith("samplers")) for m, deps in g.items() if m.startswith("samplers")}
    assert not any(outside.values()), outside


def test_methods_import_no_data_callbacks_or_envs():
    g = graph()
    bad = {m: sorted(d for d in deps if d.split(".")[0] in ("datamodules", "callbacks", "envs", "evaluation"))
           for m, deps in g.items() if m.startswith("lightning_modules")}
    assert not any(bad.values()), bad


def test_no_import_circle_anywhere():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
