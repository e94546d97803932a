"""Where the relative paths of a config point: the config file's folder or the repository, never the shell's.

The rule (docs/config.md):

- a path the run reads (``data.root``, a teacher's ``run``, a model table, a search-space file, ...) is taken
  from the config file's folder when it exists there, else from the repository;
- the run folder (``run_dir``), which the run makes, lies under the repository when the config file is inside
  it (the recipes in ``configs/`` write ``run_dir: runs/NAME``), else beside the config file;
- a value given on the command line (``--set``, ``--run-dir``) is a path of the shell, like any other argument.

Paths are stored absolute in the resolved config (``RUN/config.yaml``), so the run means the same thing from
any folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from typedconfig.paths import Anchor, absolute

REPO = Path(__file__).resolve().parent.parent
OUTPUT_KEYS = frozenset({"run_dir"})
"""Keys naming something the run creates rather than reads."""


def config_anchor(config_file: Path | None, command_line_keys: Iterable[str] = ()) -> Anchor:
    """The rule above for a config read from ``config_file`` (None: built in code; the repository anchors it),
    with ``command_line_keys`` (dotted keys, or sections) set by ``--set``."""
    given = tuple(command_line_keys)
    folder = absolute(Path(config_file), Path.cwd()).parent if config_file is not None else None
    home = REPO if folder is None or folder.resolve().is_relative_to(REPO) else folder

    def anchor(key: str, path: Path) -> Path:
        if any(key == k or key.startswith(f"{k}.") for k in given):
            return absolute(path, Path.cwd())
        if key not in OUTPUT_KEYS:
            for base in (folder, REPO):
                if base is not None and (base / path).exists():
                    return absolute(path, base)
        return absolute(path, home)

    return anchor


def recorded_anchor(key: str, path: Path) -> Path:
    """The anchor of a run folder's recorded ``config.yaml`` on resume: relative paths there were written before
    0.2, when every path was the shell's, and mean what they meant then to the same command run from the same
    folder."""
    return absolute(path, Path.cwd())


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (how 0.1 recorded the paths of a run started
    from the repository root), else unchanged: identities hashed into checkpoints stay what they were."""
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return str(path)
