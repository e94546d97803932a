"""Teachers and samplers: in-place vs voted self-distillation (SD-DARTS) and uniform vs attentive sampling
(AttentiveNAS), the same recipe over several seeds.

    .venv/bin/python -m bench.strategies [--data ROOT] [--seeds 3] [--epochs 12] [--out runs/strategies]

Each variant trains ``configs/tiny_cpu.yaml`` (adaptive KD) in its own process: the default (in-place
teacher, uniform sampling); ``inplace_and_voted`` with K = 1 and K = 2 snapshots (one every
``--snapshot-steps`` steps after 2 warm-up epochs, KL, λ = 1); attentive sampling ``best_up`` and
``worst_up`` (3 candidates).  Then, after BatchNorm recalibration, top-1 of the smallest, the fixed
mid-size and the largest sub-networks (mean ± std over seeds) and the mean step time per variant,
relative to the default's, as in ``bench.kd_ablation``.
"""

from __future__ import annotations

from pathlib import Path

from bench.ablation import add_arguments, run_ablation
from bench.common import REPO, argument_parser


def variants(snapshot_steps: int) -> dict[str, list[str]]:
    voted = ["task.teacher.name=inplace_and_voted", f"task.teacher.every_steps={snapshot_steps}"]
    voted += ["task.teacher.warmup_epochs=2", "task.teacher.kd_loss=kl", "task.teacher.weight=1.0"]
    attentive = ["task.sampler.name=attentive", "task.sampler.candidates=3"]
    return {
        "inplace, uniform (default)": [],
        "inplace + voted K=1": [*voted, "task.teacher.snapshots=1"],
        "inplace + voted K=2": [*voted, "task.teacher.snapshots=2"],
        "attentive best_up": [*attentive, "task.sampler.choice=best_up"],
        "attentive worst_up": [*attentive, "task.sampler.choice=worst_up"],
    }


def main() -> None:
    parser = argument_parser(__doc__)
    add_arguments(parser)
    parser.add_argument("--snapshot-steps", type=int, default=20, help="optimizer steps between snapshots")
    parser.add_argument("--out", type=Path, default=REPO / "runs/strategies")
    args = parser.parse_args()
    run_ablation(args, variants(args.snapshot_steps), title="strategy", name="strategies")


if __name__ == "__main__":
    main()
