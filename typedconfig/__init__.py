"""Strict, typed configuration: YAML mappings → frozen-shape dataclasses.

Every component of alphanet-train owns a ``@dataclass(kw_only=True, slots=True)`` config.  This
package turns plain mappings (from YAML) into those dataclasses and rejects anything suspicious
before heavy work starts: an unknown key, a value of the wrong type, a missing required field.
Errors name the dotted key and the file so a user can fix the right line.
"""

from typedconfig.checks import Range, check_ranges
from typedconfig.core import (
    ConfigError,
    add_set_argument,
    apply_overrides,
    dotted_items,
    from_mapping,
    load_yaml,
    parse_override,
    to_mapping,
)
from typedconfig.registry import Registry

__all__ = [
    "ConfigError",
    "Range",
    "Registry",
    "add_set_argument",
    "apply_overrides",
    "check_ranges",
    "dotted_items",
    "from_mapping",
    "load_yaml",
    "parse_override",
    "to_mapping",
]
