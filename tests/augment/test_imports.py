"""The shape of the ``augment`` package: its import graph (module-level and function-level
imports alike) has no cycle, no two of its files share a name, nobody imports its private
names, and ``import augment`` pulls in neither torch nor the other packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "augment"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``path`` imports anywhere in its body (functions too)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from a import b``: the submodule a.b when there is one, else a itself
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for t in targets:
            # ``import a.b.c`` runs a.b.c; count the deepest module of the package it names
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(root: Path, package: str = "augment") -> dict[str, set[str]]:
    """Module -> the package's modules it imports, for every module of ``root/package``."""
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    known = set(paths)
    return {name: imports_of(path, root, known) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph(ROOT)
    # the graph is real: the dispatchers reach the backends, the backends the kernels
    assert "augment.backends.numpy" in graph["augment.compose"]
    assert "augment.backends.torch" in graph["augment.compose"]  # a function-level import
    assert "augment.kernels.torch_fallback" in graph["augment.backends.torch"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_sees_function_level_imports(tmp_path):
    # negative control: a cycle closed by an import inside a function is found
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    pkg = tmp_path / "augment"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from augment.sub import two\n")
    (pkg / "sub" / "two.py").write_text("def f():\n    from ..one import g\n")
    graph = import_graph(tmp_path)
    assert graph["augment.sub.two"] == {"augment.one"}
    assert find_cycle(graph) == ["augment.one", "augment.sub.two", "augment.one"]


def test_no_two_files_share_a_name():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    assert [n for n, k in names.items() if k > 1] == []


@pytest.mark.parametrize("package", ["augment", "loaders", "training", "benchmarks", "tests"])
def test_nobody_imports_a_private_name_of_augment(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("augment"):
                for a in node.names:
                    if a.name.startswith("_"):
                        bad.append(f"{path.relative_to(ROOT)}: {node.module}.{a.name}")
    assert bad == []


def test_import_augment_alone():
    code = (
        "import sys, augment, augment.backends, augment.backends.numpy, augment.plan, "
        "augment.kernels.program; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'triton', 'loaders', 'training')]; print(bad); assert not bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
