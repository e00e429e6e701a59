"""The layout rules later work must keep: small files, imports that run one way.

Checked over `minivlm/` and the top-level scripts by reading their source (nothing is imported):
no .py file over MAX_LINES lines; no import of a minivlm module inside a function or class (a lazy
import is how a cycle hides); no re-exports in a package `__init__.py`; no import cycle between
minivlm modules; imports between the packages only in the allowed direction. Each check is also run
on small inputs that break it, so it can fail.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "minivlm"
MAX_LINES = 300
# Imports between the packages run one way (STYLE.md rule 15): the model knows nothing of data,
# training or evaluation; the weight formats know nothing of the model; data knows no model.
FORBIDDEN_IMPORTS = {
    "minivlm.models": ("minivlm.data", "minivlm.train", "minivlm.eval", "minivlm.load"),
    "minivlm.weights": ("minivlm.models", "minivlm.train", "minivlm.eval", "minivlm.load"),
    "minivlm.data": ("minivlm.models", "minivlm.weights", "minivlm.train", "minivlm.eval",
                     "minivlm.load"),
    "minivlm.eval": ("minivlm.train",),
}


def python_files(repo: Path) -> list[Path]:
    return sorted((repo / PACKAGE).rglob("*.py")) + sorted(repo.glob("*.py"))


def module_name(repo: Path, path: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(node: ast.AST, current: str, is_package: bool, known: set[str]) -> list[str]:
    """The minivlm modules an import statement names (`from a.b import c` names a.b.c when that
    is a module, else a.b)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = current.split(".") if is_package else current.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    if base.split(".")[0] != PACKAGE:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph(repo: Path) -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(module -> minivlm modules it imports at the top level, lazy imports, __init__ imports)."""
    files = {module_name(repo, p): p for p in python_files(repo)}
    known = set(files)
    graph: dict[str, set[str]] = {}
    lazy, reexports = [], []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set()
        for node in tree.body:  # module level
            graph[name].update(m for m in imported_modules(node, name, is_package, known)
                               if m in known)
            if is_package and isinstance(node, (ast.Import, ast.ImportFrom)):
                reexports.append(f"{path.relative_to(repo)}:{node.lineno}")
        for outer in tree.body:
            if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for node in ast.walk(outer):
                    if imported_modules(node, name, is_package, known):
                        lazy.append(f"{path.relative_to(repo)}:{node.lineno}")
    return graph, lazy, reexports


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go against FORBIDDEN_IMPORTS, as 'importer -> imported'."""
    def within(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  for package, banned in FORBIDDEN_IMPORTS.items()
                  if within(a, package) and any(within(b, x) for x in banned))


def long_files(repo: Path) -> list[str]:
    return [f"{p.relative_to(repo)}: {n} lines" for p in python_files(repo)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]


def test_no_python_file_over_the_line_limit():
    assert long_files(REPO) == []


def test_no_import_cycle_and_no_lazy_or_reexported_imports():
    graph, lazy, reexports = import_graph(REPO)
    assert find_cycle(graph) is None
    assert lazy == []
    assert reexports == []
    assert wrong_way_imports(graph) == []


@pytest.fixture
def broken_repo(tmp_path: Path) -> Path:
    """A package that breaks every rule once."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from minivlm.a import f\n")
    (package / "sub" / "__init__.py").write_text('"""Only a docstring."""\n')
    (package / "a.py").write_text("from minivlm.sub import b\n\ndef f():\n    return b\n")
    (package / "sub" / "b.py").write_text("from .. import a\n")  # a -> sub.b -> a
    (package / "c.py").write_text("def g():\n    from minivlm.a import f\n    return f\n"
                                  + "x = 1\n" * MAX_LINES)
    return tmp_path


def test_checks_catch_a_broken_package(broken_repo: Path):
    graph, lazy, reexports = import_graph(broken_repo)
    assert find_cycle(graph) == ["minivlm.a", "minivlm.sub.b", "minivlm.a"]
    assert lazy == ["minivlm/c.py:2"]
    assert reexports == ["minivlm/__init__.py:1"]
    assert long_files(broken_repo) == [f"minivlm/c.py: {MAX_LINES + 3} lines"]
    assert wrong_way_imports({"minivlm.models.vlm": {"minivlm.data.batch", "minivlm.constants"},
                              "minivlm.train.trainer": {"minivlm.models.vlm"}}) == [
        "minivlm.models.vlm -> minivlm.data.batch"]
