"""The search's former entry point, kept for existing command lines: use ``python search/run.py``."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

from search.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
