"""The package layout: everything installs under `pelab`, and the import graph of pelab has no cycles."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

FOLDERS = {"pelab.models": "models", "pelab.data": "data", "pelab.train": "train", "pelab.conf": "conf"}


def pelab_modules() -> dict[str, object]:
    """pelab module name -> source file, for every .py file of the package folders."""
    out = {}
    for package, folder in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            out[".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))] = path
    return out


def optional_imports(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside `try: ... except ImportError`: optional plugins (a kernel that
    registers itself when its package is installed), loaded if present, not dependencies."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            lines |= {
                n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Import | ast.ImportFrom)
            }
    return lines


def import_graph() -> dict[str, set[str]]:
    """module -> the pelab modules it imports anywhere in its file (module level or inside functions)."""
    modules = pelab_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = optional_imports(tree)
        edges = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or node.lineno in skip:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif node.module and node.level == 0:  # `from pkg import submodule` imports the submodule
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "pelab.train.config" in graph["pelab.train.run"]
    assert cycles(graph) == []


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_everything_installs_under_pelab():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    tools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tools["package-dir"] == FOLDERS
    # Every folder with Python modules is listed as a package, all of them under pelab.
    folders = {p.parent for folder in FOLDERS.values() for p in (REPO / folder).rglob("*.py")}
    expected = {
        f"{package}{'.' + '.'.join(d.relative_to(REPO / folder).parts) if d != REPO / folder else ''}"
        for package, folder in FOLDERS.items()
        for d in folders
        if d.is_relative_to(REPO / folder)
    }
    assert expected <= set(tools["packages"]) and all(p.startswith("pelab.") for p in tools["packages"])


def test_the_environment_has_no_top_level_models_data_or_train(tmp_path):
    """In the installed environment (outside a checkout), only `pelab` is importable, not the folders."""
    code = (
        "import importlib.util, pelab.train.config, pelab.data.shards, pelab.models.gpt; "
        "print([n for n in ('models', 'data', 'train', 'conf') if importlib.util.find_spec(n)])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
