"""The project's layering, read from its import statements: no import cycle between project modules, no import
from a lower floor to a higher one, and no module but the entry points editing ``sys.path``."""

from __future__ import annotations

import ast
import textwrap

from import_graph import (
    Import,
    import_cycles,
    imports_of,
    layer_violations,
    project,
    project_files,
    sys_path_edits,
)

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
    # trainer/, bottom to top: the key table; the sections by concern; runtime (ranks, engine, data, logs); state
    # (checkpoints); consolidation; the pieces (samplers, teachers, sharing) and the tasks that compose them; the
    # root config that names them; the run folder's guards; the loop; the entry point.
    "trainer.config_keys": 2.0,
    "trainer.sections": 2.05,
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

TOPS = tuple(sorted({prefix.split(".")[0] for prefix in FLOORS}))
"""The project's top-level folders of Python files."""


# ---- the project -----------------------------------------------------------------------------------------------
def test_every_package_is_on_a_floor():
    assert project(TOPS)[2] == []


def test_no_import_cycle_between_project_modules():
    cycles = import_cycles(project(TOPS)[0])
    assert not cycles, "\n" + "\n".join(cycles)


def test_imports_go_down_the_floors():
    violations = layer_violations(project(TOPS)[0], FLOORS, PEERS)
    assert not violations, "\n" + "\n".join(violations)


def test_only_the_entry_points_edit_sys_path():
    edits = {path: lines for path, lines in project(TOPS)[1].items() if path not in SYS_PATH_EDITORS}
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
