"""Worker for test_trainer_equivalence: a few sandwich steps through a DeepSpeed engine, weights saved by rank 0.

Launched as ``python -m torch.distributed.run --nproc_per_node 2 tests/workers/sandwich_equivalence.py STAGE OUT
[bf16] [ckpt] [block]`` (``ckpt``: activation checkpointing; ``block``: ``engine.zero3_gather: block``).  Under
ZeRO-3 it also checks which modules were made ZeRO-3 leaf modules (the supernet, or each of its blocks).
"""

from __future__ import annotations

import sys

import torch


def batches_for(rank: int, step: int, n: int = 6):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    bf16, checkpointing = "bf16" in sys.argv[3:], "ckpt" in sys.argv[3:]
    gather = "block" if "block" in sys.argv[3:] else "network"
    from losses import LossConfig, build_kd_loss, build_label_loss
    from models import ArchSampler, ModelConfig, build_supernet
    from trainer.runtime.distributed import init_distributed, resolve
    from trainer.runtime.engine import build_engine, one_reduction
    from trainer.runtime.evaluate import gathered
    from trainer.samplers import sample_sandwich
    from trainer.sections import EngineConfig, OptimizerConfig
    from trainer.tasks.sandwich import SandwichStep

    env = resolve()
    init_distributed(env, EngineConfig().dist_timeout_s)
    torch.manual_seed(0)
    net = build_supernet(
        ModelConfig(search_space="tiny", num_classes=10, dropout=0.0, drop_connect=0.0, zero_init_residual_bn=False)
    )
    net.activation_checkpointing = checkpointing
    tc = EngineConfig(zero_stage=stage, precision="bf16" if bf16 else "fp32", zero3_gather=gather)
    oc = OptimizerConfig(weight_decay=1e-3, grad_clip_value=0.05)
    engine = build_engine(net, tc, oc, micro_batch=6, world_size=env.world_size, lr=0.1).engine
    from deepspeed.utils import z3_leaf_module

    leaves = [type(m).__name__ for m in engine.module.modules() if z3_leaf_module(m)]
    marked = {"network": ["AlphaNetSupernet"], "block": ["DynamicMBConvBlock"] * len(engine.module.blocks)}[gather]
    assert leaves == (marked if stage == 3 else []), leaves
    sampler = ArchSampler(engine.module.space, seed=0)
    step_fn = SandwichStep(build_label_loss(LossConfig()), build_kd_loss(LossConfig()))
    for step in range(3):
        images, labels = batches_for(env.rank, step)
        subnets = sample_sandwich(engine.module.space, sampler, 4)
        engine.train()
        with one_reduction(engine, tc):  # as the trainer steps (ZeRO-2/3: one reduction per step)
            step_fn(engine, engine.module, subnets, images, labels)
        engine.step()
    with gathered(engine.module, stage):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if bf16:  # the fp32 master weights the optimizer updates (the module holds their bf16 copies)
        from deepspeed.utils import safe_get_full_fp32_param

        state.update({k: safe_get_full_fp32_param(p).clone() for k, p in engine.module.named_parameters()})
    if env.rank == 0:
        torch.save(state, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # as the trainer does (an open gloo group can abort the exit)


if __name__ == "__main__":
    main()
