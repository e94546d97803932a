"""Mapping ↔ dataclass conversion with strict checks, YAML loading and ``key=value`` overrides."""

from __future__ import annotations

import argparse
import dataclasses
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key and the source file."""

    def __init__(self, message: str, *, key: str | None = None, source: str | Path | None = None):
        where = []
        if key:
            where.append(f"key '{key}'")
        if source:
            where.append(f"in {source}")
        prefix = f"{' '.join(where)}: " if where else ""
        super().__init__(prefix + message)
        self.key = key
        self.source = str(source) if source is not None else None


MAX_YAML_BYTES = 1 << 20
"""Largest config file read (1 MiB): configs are a few KB; a huge file is a mistake or an attack."""
MAX_YAML_NODES = 100_000
"""Most values a config may expand to once ``*alias`` references are followed: a "billion laughs" file
of 1 KB expands to 10⁹ values and would exhaust memory when converted or printed."""


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values under ``node`` with every alias expanded (aliased nodes are one object: memoised)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a recursive alias counts once instead of looping
        if isinstance(node, yaml.SequenceNode):
            memo[id(node)] = 1 + sum(_expanded_size(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[id(node)] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    return memo[id(node)]


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a scalar", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def parse_yaml(text: str, *, source: str | Path | None = None) -> Any:
    """``text`` parsed with the strict safe loader (no duplicate keys, at most ``MAX_YAML_NODES`` values
    after alias expansion); any YAML problem is a ConfigError naming ``source``."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise ConfigError(f"expands to more than {MAX_YAML_NODES} values (aliases nested too deep)", source=source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {_short(exc, 500)}", source=source) from exc
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (safe types only; see :func:`parse_yaml` for the limits)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("file not found", source=path)
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"file is {size} bytes; configs are limited to {MAX_YAML_BYTES} bytes", source=path)
    data = parse_yaml(path.read_text(), source=path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping, got {type(data).__name__}", source=path)
    return data


def _short(value: Any, limit: int = 120) -> str:
    """``repr``/``str`` of a value cut to ``limit`` characters: error messages must stay small even for
    hostile input."""
    if isinstance(value, BaseException):
        text = str(value)
    else:
        short_repr = reprlib.Repr()
        short_repr.maxstring = short_repr.maxother = limit
        text = short_repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _convert(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [arg for arg in args if arg is not type(None)]
        if len(arms) == 1:  # X | None: X's own error names the inner key
            return _convert(value, arms[0], key, source)
        for arg in arms:
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"value {_short(value)} matches none of {tp}", key=key, source=source)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"must be one of {list(args)}, got {_short(value)}", key=key, source=source)
        return value
    if dataclasses.is_dataclass(tp) and getattr(tp, "registry", None) is not None:
        return _convert_tagged(value, tp, key, source)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {type(value).__name__}", key=key, source=source)
        return from_mapping(tp, value, prefix=key, source=source)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {type(value).__name__} {_short(value)}", key=key, source=source)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"expected {len(args)} items, got {len(value)}", key=key, source=source)
            items = [_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_type = args[0] if args else Any
            items = [_convert(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {type(value).__name__}", key=key, source=source)
        ktype, vtype = args if args else (Any, Any)
        return {
            _convert(k, ktype, key, source): _convert(v, vtype, _join(key, str(k)), source) for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {_short(value)}", key=key, source=source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {_short(value)}", key=key, source=source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {_short(value)}", key=key, source=source)
        if not math.isfinite(value):
            raise ConfigError(f"expected a finite number, got {_short(value)}", key=key, source=source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_short(value)}", key=key, source=source)
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"expected a path, got {_short(value)}", key=key, source=source)
        return Path(value)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _convert_tagged(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """A tagged section: ``{name: NAME, ...}`` (or ``NAME`` alone) → the config class of the piece that
    ``tp.registry`` (a :class:`typedconfig.registry.Registry`) holds under NAME; without ``name``, the name
    ``tp`` defaults to."""
    if isinstance(value, tp):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"expected a name or a mapping with 'name', got {_short(value)}", key=key, source=source)
    name = value.get("name", _default_name(tp))
    if not isinstance(name, str):
        raise ConfigError(f"expected a name, got {_short(name)}", key=_join(key, "name"), source=source)
    cls = tp.registry.config_class(name, key=_join(key, "name"), source=source)
    if not (isinstance(cls, type) and issubclass(cls, tp)):
        raise TypeError(f"{tp.registry.kind} {name!r}: its Config {cls!r} does not derive from {tp!r}")
    return from_mapping(cls, {**value, "name": name}, prefix=key, source=source)


def from_mapping(cls: type[T], data: dict[str, Any], *, prefix: str = "", source: str | Path | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and failed checks are ConfigErrors.

    Validation inside ``__post_init__`` may raise ``ValueError``; it is re-raised as a ConfigError
    naming the section, so every message points at the file.
    """
    source = str(source) if source is not None else None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {_short(unknown)}; allowed: {sorted(fields)}",
            key=_join(prefix, str(unknown[0])),
            source=source,
        )
    kwargs = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key, source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError("required key is missing", key=key, source=source)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.source is None and source is not None:
            raise ConfigError(str(exc), source=source) from exc
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc), key=prefix or None, source=source) from exc


def to_mapping(obj: Any) -> Any:
    """Dataclass (or nested containers) → plain YAML-safe Python values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.lr=0.4"`` → (["trainer", "lr"], 0.4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value", source="--set")
    dotted, raw = text.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key", source="--set")
    try:
        value = parse_yaml(raw, source="--set") if raw.strip() else ""
    except ConfigError as exc:
        raise ConfigError(f"cannot parse value {raw!r}: {exc}", key=dotted, source="--set") from exc
    return parts, value


def add_set_argument(parser: argparse.ArgumentParser, *, example: str) -> None:
    """``--set KEY=VALUE ...``, repeatable: every flag's pairs apply in the order given, so a key given twice
    takes its last value (``action="extend"``; a plain ``nargs="+"`` would keep only the last flag's pairs)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"override any key after the file; repeatable, applied in order (a key given twice: the last value "
        f"wins), e.g. {example}",
    )


def _tagged_section(cls: type | None, data: dict[str, Any], path: list[str]) -> tuple[type, dict] | None:
    """(base config class, mapping) of the tagged section at ``path`` of ``data`` read as ``cls``, or None."""
    node: Any = data
    for part in path:
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        if getattr(cls, "registry", None) is not None and isinstance(node, dict):
            cls = cls.registry.config_class(node.get("name", _default_name(cls)))
        tp = typing.get_type_hints(cls).get(part)
        arms = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) else [tp]
        cls = arms[0] if len(arms) == 1 else None
        node = node.get(part) if isinstance(node, dict) else None
    if cls is not None and dataclasses.is_dataclass(cls) and getattr(cls, "registry", None) is not None:
        return cls, node if isinstance(node, dict) else {}
    return None


def _default_name(cls: type) -> Any:
    return next((f.default for f in dataclasses.fields(cls) if f.name == "name"), None)


def apply_overrides(data: dict[str, Any], overrides: list[str], *, cls: type | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` override applied in order (creating sections); a key
    given twice takes its last value.  With ``cls`` (what ``data`` will be read as), an override that names
    another piece for a tagged section (``task.sampler.name=flops_uniform``) drops the keys the file gave the
    piece it replaces: they are that piece's."""
    import copy

    result = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        if cls is not None and isinstance(value, str) and _tagged_section(cls, result, parts) is not None:
            parts = [*parts, "name"]  # a tagged section given its name alone: ``model.sharing=local``
        if cls is not None and parts[-1] == "name":
            tagged = _tagged_section(cls, result, parts[:-1])
            if tagged is not None and tagged[1].get("name", _default_name(tagged[0])) != value:
                tagged[1].clear()
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    "cannot set a sub-key of a non-mapping value", key=".".join(parts[: i + 1]), source="--set"
                )
            node = child
        node[parts[-1]] = value
    return result


def dotted_items(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping flattened to ``{"section.key": value}`` (the form ``--set`` names keys in)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(dotted_items(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
