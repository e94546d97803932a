"""Worker for test_reshard_runs: build the Trainer on a run folder (which resumes its newest checkpoint), then rank 0
saves what every rank holds after the resume, gathered whole: the module's state, the momentum of every optimizer
parameter group as one flat tensor in parameter order and, under ZeRO-1/2, the fp32 master weights the same way;
plus each rank's loader position and first torch draw.

``python tests/workers/resharded_state.py OUT --set key=value ...`` (one rank) or the same under
``torch.distributed.run`` (several ranks).  It trains nothing: the Trainer is closed right after it was built.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


def flat_groups(engine) -> tuple[list, list[torch.Tensor] | None]:
    """(momentum of each parameter group, fp32 master weights of each group or None), whole on every rank."""
    optimizer = engine.optimizer
    if not engine.zero_optimization():  # ZeRO-0: the client optimizer holds whole tensors (None: no state yet)
        return [[optimizer.state[p].get("momentum_buffer") for p in g["params"]] for g in optimizer.param_groups], None
    momentum, master = [], []
    world = dist.get_world_size()
    for group, partition in enumerate(optimizer.single_partition_of_fp32_groups):
        total = sum(p.numel() for p in optimizer.bit16_groups[group])
        state = optimizer.optimizer.state[partition]
        for tensor, out in ((state.get("momentum_buffer", torch.zeros_like(partition)), momentum), (partition, master)):
            parts = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(parts, tensor.detach().contiguous())
            out.append(torch.cat(parts)[:total])
    for group, whole in enumerate(master):  # the master weights are the module's, exactly
        assert torch.equal(whole, torch.cat([p.detach().reshape(-1) for p in optimizer.bit16_groups[group]]))
    return momentum, master


def main() -> None:
    out = Path(sys.argv[1])
    args = sys.argv[sys.argv.index("--set") + 1 :]
    from trainer.config import load_config
    from trainer.loop import Trainer

    trainer = Trainer(load_config(REPO / "configs/tiny_cpu.yaml", args), allow_config_change=True)
    try:
        momentum, master = flat_groups(trainer.engine)
        position = torch.tensor([trainer.train_loader.epoch, trainer.train_loader.position])
        draw = torch.rand(1)
        positions = [torch.empty_like(position) for _ in range(trainer.world)]
        draws = [torch.empty_like(draw) for _ in range(trainer.world)]
        dist.all_gather(positions, position)
        dist.all_gather(draws, draw)
        if trainer.rank == 0:
            module = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
            state = {"module": module, "momentum": momentum, "master": master, "positions": positions, "draws": draws}
            torch.save(state, out)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
