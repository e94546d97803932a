"""The import graph of ``models``: no circle (function-local imports counted), and of the project only the
packages it stands on (``typedconfig``, ``fileops``).

``python tests/test_import_graph.py [package]`` prints the package's circles (strongly connected components)
and the project packages it imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT = {"data_pipeline", "fileops", "losses", "models", "search", "trainer", "typedconfig"}


def module_files(package: str) -> dict[str, Path]:
    """Dotted name → file of every module of ``package`` (subpackages included; ``__init__`` is the package)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``module`` imports anywhere in its file (inside functions too): ``from a.b import c`` is
    ``a.b.c`` when that is a module, else ``a.b``."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def graph(package: str) -> tuple[dict[str, set[str]], set[str]]:
    """(module → modules of ``package`` it imports, other project packages it imports)."""
    files = module_files(package)
    edges, outside = {}, set()
    for module, path in files.items():
        targets = imports(module, path, set(files))
        edges[module] = {t for t in targets if t in files and t != module}
        outside |= {t.split(".")[0] for t in targets} & (PROJECT - {package})
    return edges, outside


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def test_models_has_no_import_circle():
    edges, _ = graph("models")
    assert circles(edges) == []


def test_models_stands_only_on_typedconfig_and_fileops():
    _, outside = graph("models")
    assert outside <= {"typedconfig", "fileops"}


if __name__ == "__main__":
    package = sys.argv[1] if len(sys.argv) > 1 else "models"
    edges, outside = graph(package)
    found = circles(edges)
    print(f"{package}: {len(edges)} modules, {sum(map(len, edges.values()))} imports within the package")
    for component in found:
        inner = {m: sorted(edges[m] & set(component)) for m in component}
        print(f"circle of {len(component)}: " + "; ".join(f"{m} -> {', '.join(t)}" for m, t in inner.items()))
    print(f"circles: {len(found)}")
    print(f"project packages imported: {', '.join(sorted(outside)) or 'none'}")
