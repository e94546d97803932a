"""typedconfig.registry: pieces registered by name, tagged config sections, discovery of a package's pieces."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import pytest

from typedconfig import ConfigError, Range, Registry, check_ranges, from_mapping, to_mapping

SHAPES = Registry("shape")


@dataclass(kw_only=True, slots=True)
class ShapeConfig:
    registry: ClassVar[Registry] = SHAPES
    name: str = "square"


@SHAPES.register("square")
class Square:
    @dataclass(kw_only=True, slots=True)
    class Config(ShapeConfig):
        name: str = "square"
        side: Annotated[float, Range(gt=0)] = 1.0

        def __post_init__(self) -> None:
            check_ranges(self, "shape")


@SHAPES.register("circle")
class Circle:
    @dataclass(kw_only=True, slots=True)
    class Config(ShapeConfig):
        name: str = "circle"
        radius: float = 2.0


@dataclass(kw_only=True, slots=True)
class Drawing:
    shape: ShapeConfig = field(default_factory=Square.Config)
    extra: ShapeConfig | None = None


def test_tagged_section_picks_the_registered_config():
    drawing = from_mapping(Drawing, {"shape": {"name": "circle", "radius": 3}, "extra": "square"})
    assert isinstance(drawing.shape, Circle.Config) and drawing.shape.radius == 3.0
    assert isinstance(drawing.extra, Square.Config) and drawing.extra.side == 1.0
    # without a name the base class's default name is taken; the mapping round-trips with its name first
    default = from_mapping(Drawing, {"shape": {"side": 2}})
    assert isinstance(default.shape, Square.Config) and default.shape.side == 2.0
    assert list(to_mapping(default)["shape"]) == ["name", "side"]
    assert from_mapping(Drawing, to_mapping(drawing)) == drawing


def test_unknown_name_and_foreign_keys_are_one_line_errors():
    with pytest.raises(ConfigError) as err:
        from_mapping(Drawing, {"shape": {"name": "hexagon"}}, source="x.yaml")
    assert str(err.value) == "key 'shape.name' in x.yaml: unknown shape 'hexagon'; registered: circle, square"
    with pytest.raises(ConfigError, match=r"shape\.radius"):  # a circle's key in a square
        from_mapping(Drawing, {"shape": {"name": "square", "radius": 1}})
    with pytest.raises(ConfigError, match=r"shape\.side"):  # the piece's own checks still run
        from_mapping(Drawing, {"shape": {"side": -1}})
    with pytest.raises(ConfigError, match="expected a name"):
        from_mapping(Drawing, {"shape": 3})


def test_a_name_registers_once():
    registry = Registry("thing")
    registry.register("a")(Square)
    registry.register("a")(Square)  # the same piece again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(Circle)


def test_a_package_registry_discovers_every_module(tmp_path, monkeypatch):
    """A new piece is one new file in the package: nothing imports it by name."""
    package = tmp_path / "toy_pieces"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from typedconfig import Registry\nTOYS = Registry('toy', package='toy_pieces')\n"
    )
    for name in ("ball", "kite"):
        (package / f"{name}.py").write_text(
            textwrap.dedent(
                f"""
                from toy_pieces import TOYS

                @TOYS.register("{name}")
                class Piece:
                    Config = None
                """
            )
        )
    (package / "_private.py").write_text("raise RuntimeError('not a piece module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from toy_pieces import TOYS

        assert TOYS.names() == ["ball", "kite"]
        assert "kite" in TOYS and TOYS.get("ball").__module__ == "toy_pieces.ball"
    finally:
        for module in [m for m in sys.modules if m.startswith("toy_pieces")]:
            del sys.modules[module]
