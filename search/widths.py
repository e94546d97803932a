"""The width table of a slimmable supernet (AlphaNet Table 1's shape): top-1 of every width on the grid.

Each width is scored like a search candidate (BN recalibrated, cached in ``candidates.jsonl``) and named
``0.35x`` … ``1x``, so ``--export 0.5x`` exports it.  Written as ``widths.json`` and ``widths.png``
(top-1 against MFLOPs, each point labelled with its width).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from fileops import atomic_output, atomic_write_text
from models.families import Arch, Space, family_of
from search.evolution import Candidate


def width_archs(space: Space) -> dict[str, Arch]:
    """``{"0.35x": arch, ...}`` at the largest resolution for a slimmable space; {} for a family without such a
    table (:meth:`models.families.Family.table_archs`)."""
    return family_of(space).table_archs(space)


def width_table(widths: dict[str, Candidate]) -> Table:
    """One column per width, rows MFLOPs / top-1 / top-5, as the paper prints Table 1."""
    table = Table(title=f"top-1 per width ({len(widths)} widths)")
    table.add_column("")
    for name in widths:
        table.add_column(name.replace("x", "×"), justify="right")
    table.add_row("MFLOPs", *(f"{c.mflops:.1f}" for c in widths.values()))
    table.add_row("top-1", *(f"{c.top1:.1f}" for c in widths.values()))
    table.add_row("top-5", *(f"{c.top5:.1f}" for c in widths.values()))
    return table


def write_widths(widths: dict[str, Candidate], out_dir: Path) -> tuple[Path, Path]:
    """``widths.json`` (name → record) and ``widths.png``."""
    data = {name: c.to_record() for name, c in widths.items()}
    json_path = atomic_write_text(Path(out_dir) / "widths.json", json.dumps(data, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs, ys = [c.mflops for c in widths.values()], [c.top1 for c in widths.values()]
    ax.plot(xs, ys, "o-", color="tab:blue", ms=4)
    for name, c in widths.items():
        ax.annotate(name.replace("x", "×"), (c.mflops, c.top1), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.margins(x=0.08, y=0.1)
    ax.set_xlabel("MFLOPs (multiply-adds)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("slimmable supernet: top-1 per width")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(out_dir) / "widths.png"
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return json_path, png_path
