"""Pareto front files: JSON and a PNG plot of top-1 against MFLOPs."""

from __future__ import annotations

import json
from pathlib import Path

from fileops import atomic_output, atomic_write_text
from search.evolution import Candidate, best_per_bucket, pareto_front


def write_front(
    candidates: list[Candidate], out_dir: Path, bucket_mflops: float, marked: dict[str, Candidate]
) -> tuple[Path, Path]:
    front = pareto_front(candidates)
    data = {
        "candidates": len(candidates),
        "pareto": [c.to_record() for c in front],
        "best_per_bucket": [c.to_record() for c in best_per_bucket(candidates, bucket_mflops)],
        "marked": {name: c.to_record() for name, c in marked.items()},
    }
    json_path = atomic_write_text(Path(out_dir) / "front.json", json.dumps(data, indent=2))
    return json_path, plot_front(candidates, front, marked, Path(out_dir) / "front.png")


def plot_front(candidates: list[Candidate], front: list[Candidate], marked: dict[str, Candidate], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([c.mflops for c in candidates], [c.top1 for c in candidates], s=10, color="0.7", label="candidates")
    ax.plot([c.mflops for c in front], [c.top1 for c in front], "o-", color="tab:red", ms=4, label="Pareto front")
    for name, c in marked.items():
        ax.scatter([c.mflops], [c.top1], marker="*", s=120, color="tab:blue", zorder=3)
        ax.annotate(name, (c.mflops, c.top1), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.margins(x=0.08, y=0.08)  # room for the labels of marked models at the edges
    ax.set_xlabel("MFLOPs (multiply-adds)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
