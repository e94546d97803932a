"""Write docs/config.md, the reference of every config key, from the config dataclasses (``--check``: exit 1 when
the file is not current; the tests run it).

    .venv/bin/python scripts/config_reference.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the project's packages import from its (editable) install

OUT = REPO / "docs/config.md"
HEADER = """# Config reference

Generated from the config dataclasses by `python scripts/config_reference.py`; do not edit (a test checks that it
is current).  Every key can be set in the YAML file or with `--set KEY=VALUE` (repeatable, applied in order).
`python -m trainer.config --config FILE [--set ...]` prints a run config as it resolves.

**Relative paths** in a config file never depend on the folder you run from.  A path the run reads (`data.root`,
a teacher's `run`, a model table `FILE:NAME`, a search-space file, `search.mark_models`) is looked up beside the
config file first, then in the repository.  The run folder (`run_dir`) lies in the repository when the config
file is inside it (the recipes write `run_dir: runs/NAME`), else beside the config file.  A value given on the
command line (`--set`, `--run-dir`) is relative to your shell's folder, like any argument.  The run's
`config.yaml` records every path absolute.

- [Run config](#run-config): `trainer/run.py --config FILE` (the recipes in `configs/`)
- [Search config](#search-config): `search/run.py --config FILE`
"""


def render() -> str:
    from search.config import SearchFile
    from trainer.config import RunConfig
    from typedconfig.reference import reference

    lines = [HEADER, "## Run config", "", *reference(RunConfig, level=2)]
    lines += ["## Search config", "", *reference(SearchFile, level=2)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/config_reference.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is not current: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    from fileops import atomic_write_text

    atomic_write_text(OUT, text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
