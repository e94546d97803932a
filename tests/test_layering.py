"""The project's layering, read from its import statements: no import cycle between project modules, no import
from a lower floor to a higher one, and no module but the entry points editing ``sys.path``."""

from __future__ import annotations

import ast
import functools
import itertools
import textwrap
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# ---- the floors: the one table to edit -------------------------------------------------------------------------
FLOORS: dict[str, float] = {
    # Module prefix → floor; a module is on the floor of its longest matching prefix.  A module may import modules
    # of lower floors and modules of its own prefix; a module of another prefix on its own floor only where PEERS
    # says so.  Sub-floors are fractions of their package's floor (trainer/ below); a module of a package that no
    # sub-prefix matches is on the package's own floor, below its sub-floors.
    "fileops": 0,
    "typedconfig": 0,
    "data_pipeline": 1,
    "losses": 1,
    "models": 1,
    "trainer": 2,
    # trainer/, bottom to top: the key table; the trainer section; runtime (ranks, engine, data, logs); state
    # (checkpoints); consolidation; the pieces (samplers, teachers, sharing) and the tasks that compose them; the
    # root config that names them; the run folder's guards; the loop; the entry point.
    "trainer.config_keys": 2.0,
    "trainer.trainer_config": 2.05,
    "trainer.state.safe_checkpoint": 2.08,  # safe loads and atomic writes, which the engine installs
    "trainer.runtime": 2.1,
    "trainer.state": 2.2,
    "trainer.consolidate": 2.25,
    "trainer.samplers": 2.3,
    "trainer.teachers": 2.3,
    "trainer.sharing": 2.35,
    "trainer.tasks": 2.4,
    "trainer.config": 2.5,
    "trainer.run_folder": 2.6,
    "trainer.loop": 2.7,
    "trainer.run": 2.8,
    "search": 3,
    "bench": 4,
    "scripts": 4,
    "tests": 4,
}
PEERS: set[tuple[str, str]] = {
    # (importer's prefix, imported prefix) on one floor: the first's modules may import the second's.
    ("tests", "bench"),  # tests run the benches and test their helpers
}
SYS_PATH_EDITORS = {"trainer/run.py", "search/run.py"}
"""Entry points run as scripts, which put the repository root first on ``sys.path``."""

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
def project() -> tuple[list[Import], dict[str, list[int]], list[str]]:
    """(every import between project modules, the ``sys.path`` edits per file, top-level folders of Python files
    that FLOORS does not name)."""
    tops = {prefix.split(".")[0] for prefix in FLOORS}
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
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in ignored | tops
        if any(folder.rglob("*.py"))
    )
    return imports, edits, unlayered


# ---- the project -----------------------------------------------------------------------------------------------
def test_every_package_is_on_a_floor():
    assert project()[2] == []


def test_no_import_cycle_between_project_modules():
    cycles = import_cycles(project()[0])
    assert not cycles, "\n" + "\n".join(cycles)


def test_imports_go_down_the_floors():
    violations = layer_violations(project()[0], FLOORS, PEERS)
    assert not violations, "\n" + "\n".join(violations)


def test_only_the_entry_points_edit_sys_path():
    edits = {path: lines for path, lines in project()[1].items() if path not in SYS_PATH_EDITORS}
    assert not edits, "\n" + "\n".join(f"sys.path edited: {path}:{lines}" for path, lines in sorted(edits.items()))


# ---- the checker itself ----------------------------------------------------------------------------------------
def test_the_checker_reports_a_cycle_an_upward_and_a_peer_import():
    graph = [
        Import("losses.a", "losses.b", "losses/a.py:1"),
        Import("losses.b", "losses.c", "losses/b.py:2"),
        Import("losses.c", "losses.a", "losses/c.py:3"),  # a cycle of three inside one package
        Import("losses.c", "search.run", "losses/c.py:4"),  # upward
        Import("models.x", "losses.a", "models/x.py:5"),  # to a peer package
        Import("trainer.loop", "losses.a", "trainer/loop.py:6"),  # down: fine
        Import("trainer.loop", "trainer.sub.y", "trainer/loop.py:7"),  # down to a sub-floor's lower neighbour
        Import("trainer.sub.y", "trainer.loop", "trainer/sub/y.py:8"),  # up from a sub-floor
    ]
    floors = {"losses": 1, "models": 1, "trainer": 2, "trainer.loop": 2.5, "trainer.sub": 2.1, "search": 3}
    assert import_cycles(graph) == [
        "import cycle: losses.a -> losses.b -> losses.c -> losses.a (losses/a.py:1, losses/b.py:2, losses/c.py:3); "
        "modules on cycles with it: losses.a, losses.b, losses.c",
        "import cycle: trainer.loop -> trainer.sub.y -> trainer.loop (trainer/loop.py:7, trainer/sub/y.py:8); "
        "modules on cycles with it: trainer.loop, trainer.sub.y",
    ]
    assert layer_violations(graph, floors) == [
        "upward import: losses.c (floor 1) imports search.run (floor 3) at losses/c.py:4",
        "peer import: models.x (floor 1) imports losses.a (floor 1) at models/x.py:5; PEERS has no ('models', 'losses')",
        "upward import: trainer.sub.y (floor 2.1) imports trainer.loop (floor 2.5) at trainer/sub/y.py:8",
    ]
    assert layer_violations(graph[4:5], floors, {("models", "losses")}) == []
    assert layer_violations([Import("extra.z", "losses.a", "extra/z.py:1")], floors) == [
        "no floor: extra.z (extra.z imports losses.a at extra/z.py:1)"
    ]


def test_imports_are_read_from_every_statement(tmp_path):
    """Absolute, relative (from a module and from a package's ``__init__``), function-local and ``from package
    import module`` statements; imports from outside the project are left out."""
    files = {
        "pkg/__init__.py": "from .core import thing\n",
        "pkg/core.py": "import os\nthing = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/leaf.py": textwrap.dedent(
            """
            from .. import core
            from ..core import thing
            from . import other


            def late():
                import pkg.sub.other
                from other_pkg import x
            """
        ),
        "pkg/sub/other.py": "from pkg import sub\n",
        "other_pkg/__init__.py": "x = 1\n",
        "tests/helpers.py": "",
        "tests/test_x.py": "import helpers\nfrom pkg.core import thing\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = project_files(tmp_path, ["pkg", "tests"])
    found = {
        (imp.importer, imp.imported, imp.where)
        for module, path in modules.items()
        for imp in imports_of(module, path, ast.parse(path.read_text()), modules, tmp_path)
    }
    assert found == {
        ("pkg", "pkg.core", "pkg/__init__.py:1"),
        ("pkg.sub.leaf", "pkg.core", "pkg/sub/leaf.py:2"),
        ("pkg.sub.leaf", "pkg.core", "pkg/sub/leaf.py:3"),
        ("pkg.sub.leaf", "pkg.sub.other", "pkg/sub/leaf.py:4"),
        ("pkg.sub.leaf", "pkg.sub.other", "pkg/sub/leaf.py:8"),
        ("pkg.sub.other", "pkg.sub", "pkg/sub/other.py:1"),
        ("tests.test_x", "tests.helpers", "tests/test_x.py:1"),
        ("tests.test_x", "pkg.core", "tests/test_x.py:2"),
    }


def test_a_sys_path_edit_is_found_in_any_form():
    edits = """
        import sys
        import sys as system
        from sys import path as search_path

        sys.path.insert(0, "a")
        sys.path[:] = ["b"]
        sys.path += ["c"]
        sys.path = ["d"]
        system.path.append("e")
        search_path.extend(["f"])
        del sys.path[0]
        first, *sys.path = ["g", "h"]
    """
    reads = """
        import sys

        print(sys.path, list(sys.path), sys.path[0], sys.path.index("x"), "x" in sys.path)
        path = []
        path.append(1)
        other.path.insert(0, "not sys")
    """
    assert sys_path_edits(ast.parse(textwrap.dedent(edits))) == [6, 7, 8, 9, 10, 11, 12, 13]
    assert sys_path_edits(ast.parse(textwrap.dedent(reads))) == []
