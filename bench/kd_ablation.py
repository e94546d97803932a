"""Does KD help, and does adaptive KD help more?  The same recipe trained with each KD loss over several seeds.

    .venv/bin/python -m bench.kd_ablation [--data ROOT] [--seeds 3] [--epochs 12] [--out runs/kd_ablation]

For every (loss, seed) it trains ``configs/tiny_cpu.yaml`` (or ``--config``) in its own process with
``loss.kd_loss`` in {none, kl, adaptive_alpha (reference choice), adaptive_alpha (exact choice)}, then
evaluates, after BatchNorm recalibration, the smallest, the fixed mid-size models of ``--models`` and
the largest sub-network.  It prints a table of mean ± std top-1 per sub-network and loss (and the mean step
time), and writes ``kd_ablation.json`` (every run) and ``kd_ablation.png`` (top-1 against MFLOPs per loss,
error bars) into ``--out``.  Finished runs are reused when the command is run again.
"""

from __future__ import annotations

from pathlib import Path

from bench.ablation import add_arguments, run_ablation
from bench.common import REPO, argument_parser

LOSSES = {
    "none": ["loss.kd_loss=none"],
    "kl": ["loss.kd_loss=kl"],
    "adaptive (reference choice)": ["loss.kd_loss=adaptive_alpha", "loss.adaptive_choice=reference"],
    "adaptive (exact choice)": ["loss.kd_loss=adaptive_alpha", "loss.adaptive_choice=exact"],
}


def run_name(loss: str) -> str:
    """The run folders of earlier versions of this bench, so that their finished runs are reused."""
    return f"{loss.split()[0]}{'_exact' if 'exact' in loss else ''}"


def main() -> None:
    parser = argument_parser(__doc__)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, default=REPO / "runs/kd_ablation")
    run_ablation(parser.parse_args(), LOSSES, title="loss", name="kd_ablation", run_name=run_name)


if __name__ == "__main__":
    main()
