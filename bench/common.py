"""What the bench scripts share: the repository's paths, their command lines, the Python processes they start,
the bundled data and their figures."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
"""The repository root (the working folder of the commands in the README)."""


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """The running script's parser, described by the first paragraph of its docstring (``__doc__``); its usage
    line names the command (``python -m bench.NAME``)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None else None
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])


def python_env(**variables: str) -> dict[str, str]:
    """The environment of a Python process a bench starts: this process's, with the repository first on
    ``PYTHONPATH`` (the child imports this checkout's packages and ``bench``, whatever its working folder), and
    ``variables`` set."""
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **variables}


def module_command(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def torchrun_command(module: str, ranks: int, *args: str) -> list[str]:
    """``module`` run as ``ranks`` processes on this host by ``torch.distributed.run`` (each as ``python -m``)."""
    return module_command("torch.distributed.run", "--nproc_per_node", str(ranks), "-m", module, *args)


def prepared_data(root: Path | None) -> Path:
    """``root`` (a prepared dataset), or without one the bundled digits, prepared into ``data/digits`` once."""
    if root is not None:
        return root
    from data_pipeline import prepare

    digits = REPO / "data/digits"
    prepare.prepare("digits", digits, ["webdataset", "ffcv"], quiet=True)
    return digits


@contextlib.contextmanager
def saved_figure(path: Path, figsize: tuple[float, float]) -> Iterator[tuple[Any, Any]]:
    """``(figure, axes)`` of one plot, laid out and written to ``path`` (atomically) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fileops import atomic_output

    fig, ax = plt.subplots(figsize=figsize, dpi=120)
    try:
        yield fig, ax
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
