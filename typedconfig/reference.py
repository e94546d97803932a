"""A Markdown reference of a config dataclass: every key with its type, default, allowed values and docstring.

The docstring of a field is the string literal written under it (the attribute-docstring convention this project
uses), read from the class's source with :mod:`ast`.  Nested dataclasses become sections; a tagged section (a field
typed with a base config that names a :class:`~typedconfig.registry.Registry`) lists every registered piece with
its own keys.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from typedconfig.checks import Range


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of ``cls`` and its bases (the nearest class's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _range(tp: Any) -> str:
    if get_origin(tp) is not Annotated:
        return ""
    parts = []
    for meta in get_args(tp)[1:]:
        if isinstance(meta, Range):
            for name, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
                value = getattr(meta, name, None)
                if value is not None:
                    parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, str | int | float | bool):
        return f"`{str(value).lower() if isinstance(value, bool) else value}`"
    if isinstance(value, list | tuple):
        return f"`{list(value)}`"
    return f"`{value}`"


def _dataclass_type(tp: Any) -> type | None:
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _markdown(text: str) -> str:
    """One line of Markdown from a docstring (reStructuredText's double backquotes become single ones)."""
    return " ".join(text.split()).replace("``", "`")


def _cell(text: str) -> str:
    return _markdown(text).replace("|", "\\|")


def reference(cls: type, prefix: str = "", level: int = 2) -> list[str]:
    """Markdown lines for the fields of ``cls`` (keys under ``prefix``), nested sections after the table."""
    hints = get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    rows, sections = [], []
    for field in dataclasses.fields(cls):
        if field.name.startswith("_") or typing.get_origin(hints[field.name]) is typing.ClassVar:
            continue
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        nested = _dataclass_type(tp)
        if nested is not None:
            sections.append((key, nested, docs.get(field.name, "")))
            continue
        allowed = _range(tp)
        rows.append(
            f"| `{key}` | {_cell(_type_name(tp))}{f' ({allowed})' if allowed else ''} | "
            f"{_cell(_show(_default(field)))} | {_cell(docs.get(field.name, ''))} |"
        )
    lines = []
    if rows:
        lines += ["| key | type | default | what it does |", "| --- | --- | --- | --- |", *rows, ""]
    for key, nested, doc in sections:
        registry = getattr(nested, "registry", None)
        heading = "#" * min(level + 1, 6)
        lines += [f"{heading} `{key}`", ""]
        if doc:
            lines += [_markdown(doc), ""]
        if registry is None:
            lines += reference(nested, f"{key}.", level + 1)
            continue
        default = _default(next(f for f in dataclasses.fields(nested) if f.name == "name"))
        lines += [
            f"A tagged section: `{key}: {{name: NAME, ...}}` picks a {registry.kind}; registered: "
            + ", ".join(f"`{n}`" for n in registry.names())
            + f" (default `{default}`).",
            "",
        ]
        for name in registry.names():
            piece = registry.config_class(name)
            lines += [f"{'#' * min(level + 2, 6)} `{key}: {{name: {name}}}`", ""]
            if piece.__doc__ and not piece.__doc__.startswith(f"{piece.__name__}("):
                lines += [_markdown(piece.__doc__), ""]
            lines += reference(piece, f"{key}.", level + 2)
    return lines
