"""Reading the project's import graph with ``ast`` (every ``import``/``from`` statement, function-local ones too,
relative imports resolved) and checking it: floors, cycles, ``sys.path`` edits.  Used by ``test_layering.py``."""

from __future__ import annotations

import ast
import functools
import itertools
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_PATH = "tests"
"""pytest puts ``tests/`` first on ``sys.path``: a module there imports its helpers as top-level modules
(``from trainer_helpers import ...`` is ``tests.trainer_helpers``)."""


@dataclass(frozen=True, slots=True)
class Import:
    importer: str
    imported: str
    where: str
    """``path:line`` of the statement."""


# ---- reading the graph -----------------------------------------------------------------------------------------
def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(root: Path, tops: Iterable[str]) -> dict[str, Path]:
    """Module name → file, for every ``.py`` under the top-level folders ``tops``."""
    files = {}
    for top in sorted(set(tops)):
        for path in sorted((root / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[module_name(path, root)] = path
    return files


def _known(name: str, modules: Mapping[str, object]) -> str | None:
    """The longest prefix of ``name`` that is a project module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _resolve(importer: str, name: str, modules: Mapping[str, object]) -> str | None:
    if importer == TEST_PATH or importer.startswith(TEST_PATH + "."):
        helper = _known(f"{TEST_PATH}.{name}", modules)
        if helper is not None and helper != TEST_PATH:
            return helper
    return _known(name, modules)


def imports_of(importer: str, path: Path, tree: ast.AST, modules: Mapping[str, object], root: Path) -> list[Import]:
    """Every import of a project module in ``tree`` (function-local ones too, relative ones resolved): ``import
    a.b.c`` and ``from a.b import c`` are imports of the longest of ``a.b.c``, ``a.b``, ``a`` that is a module."""
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    where = path.relative_to(root).as_posix()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        for name in names:
            imported = _resolve(importer, name, modules)
            if imported is not None and imported != importer:
                found.append(Import(importer, imported, f"{where}:{node.lineno}"))
    return found


SYS_PATH_MUTATORS = {"append", "clear", "extend", "insert", "pop", "remove", "reverse", "sort"}
SYS_PATH_MUTATORS |= {"__setitem__", "__delitem__", "__iadd__"}


def sys_path_edits(tree: ast.AST) -> list[int]:
    """Lines that assign, augment, delete from or call a mutating method of ``sys.path`` (also as ``import sys as
    s``, ``from sys import path``)."""
    sys_names, path_names = {"sys"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            sys_names |= {a.asname for a in node.names if a.name == "sys" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and not node.level:
            path_names |= {a.asname or a.name for a in node.names if a.name == "path"}

    def is_sys_path(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id in sys_names
        return isinstance(node, ast.Name) and node.id in path_names

    def edits(target: ast.AST) -> bool:
        if isinstance(target, ast.Tuple | ast.List):
            return any(edits(t) for t in target.elts)
        if isinstance(target, ast.Starred | ast.Subscript):
            return is_sys_path(target.value) or edits(target.value)
        return is_sys_path(target)

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            targets = []
            if node.func.attr in SYS_PATH_MUTATORS and is_sys_path(node.func.value):
                lines.append(node.lineno)
        else:
            continue
        if any(edits(t) for t in targets):
            lines.append(node.lineno)
    return sorted(lines)


# ---- the checks ------------------------------------------------------------------------------------------------
def floor_of(module: str, floors: Mapping[str, float]) -> tuple[str, float] | None:
    """(the longest prefix of ``module`` in ``floors``, its floor)."""
    matches = [p for p in floors if module == p or module.startswith(p + ".")]
    if not matches:
        return None
    prefix = max(matches, key=len)
    return prefix, floors[prefix]


def layer_violations(
    imports: Iterable[Import], floors: Mapping[str, float], peers: set[tuple[str, str]] = frozenset()
) -> list[str]:
    """One line per import that goes up a floor, sideways to another prefix that ``peers`` does not allow, or
    from or to a module without a floor."""
    problems = []
    for imp in imports:
        source, target = floor_of(imp.importer, floors), floor_of(imp.imported, floors)
        if source is None or target is None:
            missing = imp.importer if source is None else imp.imported
            problems.append(f"no floor: {missing} ({imp.importer} imports {imp.imported} at {imp.where})")
            continue
        (source_prefix, source_floor), (target_prefix, target_floor) = source, target
        what = f"{imp.importer} (floor {source_floor:g}) imports {imp.imported} (floor {target_floor:g}) at {imp.where}"
        if target_floor > source_floor:
            problems.append(f"upward import: {what}")
        elif target_floor == source_floor and (source_prefix, target_prefix) not in peers | {(source_prefix,) * 2}:
            problems.append(f"peer import: {what}; PEERS has no ({source_prefix!r}, {target_prefix!r})")
    return problems


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module, each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def shortest_cycle(graph: Mapping[str, Iterable[str]], members: list[str]) -> list[str]:
    """A shortest cycle through ``members[0]`` inside ``members``, its first module repeated at the end."""
    start, inside = members[0], set(members)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph.get(node, ())):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if successor in inside and successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def import_cycles(imports: Iterable[Import]) -> list[str]:
    """One line per import cycle: a shortest cycle with the statements that make it, and every module that is
    on a cycle with it."""
    imports = list(imports)
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.imported)
        where.setdefault((imp.importer, imp.imported), imp.where)
    lines = []
    for members in strongly_connected(graph):
        cycle = shortest_cycle(graph, members)
        steps = ", ".join(where[edge] for edge in itertools.pairwise(cycle))
        lines.append(f"import cycle: {' -> '.join(cycle)} ({steps}); modules on cycles with it: {', '.join(members)}")
    return lines


def extension_modules(root: Path) -> set[str]:
    """The C extensions ``pyproject.toml`` builds (modules that import nothing of the project)."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {extension["name"] for extension in setuptools.get("ext-modules", [])}


@functools.cache
def project(tops: tuple[str, ...]) -> tuple[list[Import], dict[str, list[int]], list[str]]:
    """(every import between the modules of the top-level folders ``tops``, the ``sys.path`` edits per file, the
    top-level folders of Python files not in ``tops``)."""
    files = project_files(ROOT, tops)
    modules = {**dict.fromkeys(extension_modules(ROOT)), **files}
    imports, edits = [], {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imports += imports_of(module, path, tree, modules, ROOT)
        lines = sys_path_edits(tree)
        if lines:
            edits[path.relative_to(ROOT).as_posix()] = lines
    ignored = {".venv", "runs", "data", "build"}
    unlayered = sorted(
        folder.name
        for folder in ROOT.iterdir()
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in ignored | set(tops)
        if any(folder.rglob("*.py"))
    )
    return imports, edits, unlayered
