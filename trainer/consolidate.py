"""Consolidated fp32 weights from a sharded DeepSpeed checkpoint, written as safetensors.

    python -m trainer.consolidate RUN_DIR [--tag stepNNNNNNNNN] [--out RUN_DIR/supernet.safetensors]

Works for every ZeRO stage (stage 0 keeps whole tensors in the model-states file; stages 1–3 are
merged by DeepSpeed's ``zero_to_fp32``).  The file's metadata records the tag, step, search space
and model-config hash, so search and export can check what they load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fileops import atomic_output
from models.config import ModelConfig
from trainer.state.checkpoint import latest_tag
from trainer.state.safe_checkpoint import CheckpointFileError, safe_load

WEIGHTS_NAME = "supernet.safetensors"


def _model_states_file(tag_dir: Path) -> Path:
    files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no DeepSpeed model-states file in {tag_dir}")
    return files[0]


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state dict with buffers, client state) of one checkpoint."""
    tag_dir = Path(checkpoint_dir) / tag
    states = safe_load(_model_states_file(tag_dir))
    zero_stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    client = {
        k: v
        for k, v in states.items()
        if k in ("global_step", "model_hash", "search_space", "world_size", "local_sharing")
    }
    if zero_stage == 0:
        state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's merger unpickles without restriction: every file it reads is first read with ours.
        for path in sorted(tag_dir.glob("*.pt")):
            safe_load(path)
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    return {k: v.contiguous() for k, v in state.items()}, client


def write_safetensors(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    with atomic_output(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return out


def consolidate(run_dir: Path, tag: str | None = None, out: Path | None = None) -> Path:
    checkpoint_dir = Path(run_dir) / "checkpoints"
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"no committed checkpoint under {checkpoint_dir}")
    state, client = consolidated_state_dict(checkpoint_dir, tag)
    metadata = {"tag": tag, **{k: json.dumps(v) for k, v in client.items()}}
    return write_safetensors(state, Path(out) if out else Path(run_dir) / WEIGHTS_NAME, metadata)


def weights_tag(weights: Path) -> str | None:
    """The checkpoint tag a consolidated weights file was made from (its metadata), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return (f.metadata() or {}).get("tag")
    except (OSError, ValueError, RuntimeError):  # missing, or not a safetensors file
        return None


def ensure_weights(run_dir: Path, rank: int) -> Path:
    """RUN/supernet.safetensors, consolidated by rank 0 when missing or made from another checkpoint than the
    newest (the other ranks wait at a barrier).  The file records its checkpoint tag: one consolidated from an
    older checkpoint by hand is replaced, whatever its file time."""
    weights = Path(run_dir) / WEIGHTS_NAME
    tag = latest_tag(Path(run_dir) / "checkpoints")
    stale = tag is not None and weights_tag(weights) != tag
    if rank == 0 and (stale or not weights.exists()):
        if tag is None:
            raise FileNotFoundError(f"{run_dir} has neither {WEIGHTS_NAME} nor a committed checkpoint")
        consolidate(run_dir)
    if dist.is_initialized():
        dist.barrier()
    return weights


def load_supernet(run_dir: Path, model: ModelConfig, rank: int, device):
    """The supernet of a training run (built from its model section) with its consolidated fp32 weights, in
    eval mode on ``device``."""
    from safetensors.torch import load_file

    from models import build_supernet

    weights = ensure_weights(run_dir, rank)
    supernet = build_supernet(model)
    supernet.load_state_dict(load_file(str(weights)))
    attach_assignment(supernet, weights)
    return supernet.to(device).eval()


def attach_assignment(supernet, weights: Path) -> None:
    """Local weight sharing: give ``supernet`` the assignment stored in its consolidated file, so that every
    architecture (searched, evaluated, exported) runs the candidates it was trained with."""
    from safetensors import safe_open

    from models.mbconv.local_sharing import LocalAssignment

    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
    if "local_sharing" in metadata and getattr(supernet, "num_candidates", 1) > 1:
        supernet.assignment = LocalAssignment.from_dict(supernet.space, json.loads(metadata["local_sharing"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.consolidate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", help="checkpoint tag (default: the one named by 'latest')")
    parser.add_argument("--out", type=Path, help=f"output file (default: RUN_DIR/{WEIGHTS_NAME})")
    args = parser.parse_args(argv)
    try:
        path = consolidate(args.run_dir, args.tag, args.out)
    except (FileNotFoundError, CheckpointFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
