"""One network per step instead of the sandwich: label CE and/or KD from a fixed teacher (AlphaNet §4.3).

The student trains at its own resolution (the batch is rescaled on the device, as for sub-networks); the
teacher, in eval mode and never updated, gives its logits either on the fly (each augmented batch at the
teacher's resolution) or from a cache of its logits on every un-augmented training image
(:func:`teacher_logit_cache`), looked up by sample index.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.device_transforms import normalize, rescale
from fileops import atomic_output
from losses.divergences import KDLoss
from trainer.runtime.precision import forward_logits
from trainer.tasks.one_network.networks import Network


class FixedTeacher:
    """Logits of a frozen network for a normalised batch (or, with ``cache``, for its sample indices)."""

    def __init__(self, network: Network, cache: torch.Tensor | None = None):
        self.network = network
        self.module = network.module.float().eval().requires_grad_(False)
        self.cache = cache

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[indices.cpu()].to(images.device, torch.float32)
        return self.module(rescale(images.float(), self.network.resolution)).float()


class StandaloneStep:
    """Forward + backward of the student on one mini-batch: ``label_weight``·CE + ``kd_weight``·KD."""

    def __init__(
        self,
        label_loss: nn.Module,
        kd_loss: KDLoss | None,
        *,
        kd_weight: float,
        label_weight: float,
        bf16_autocast: bool = False,
    ):
        self.label_loss = label_loss
        self.bf16_autocast = bf16_autocast
        self.kd_loss = kd_loss
        self.kd_weight = kd_weight
        # without a teacher the labels are the only signal: weight 1 when none is given (standalone.label_weight)
        self.label_weight = label_weight if kd_loss is not None else (label_weight or 1.0)

    def __call__(
        self,
        engine,
        resolution: int,
        images: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        *,
        last_micro_batch: bool = True,
    ) -> dict[str, torch.Tensor]:
        dtype = next(engine.module.parameters()).dtype
        logits = forward_logits(engine, rescale(images, resolution).to(dtype), bf16_autocast=self.bf16_autocast)
        metrics: dict[str, torch.Tensor] = {}
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.label_weight > 0:
            label = self.label_loss(logits, labels)
            metrics["loss/label"] = label.detach().float()
            loss = loss + self.label_weight * label
        if teacher_logits is not None:
            kd = self.kd_loss(logits, teacher_logits)
            metrics["loss/kd"] = kd.detach().float()
            metrics["kd_div/student"] = self.kd_loss.divergence(logits.detach(), teacher_logits).mean()
            loss = loss + self.kd_weight * kd
        metrics["loss/student"] = loss.detach().float()
        engine.set_gradient_accumulation_boundary(last_micro_batch)
        engine.backward(loss)
        return metrics


CACHE_DIR = "teacher_logits"


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and values): what its outputs are a function of."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _part_name(rank: int, world: int) -> str:
    return f"part{rank:05d}of{world:05d}.safetensors"


@torch.no_grad()
def teacher_logit_cache(
    teacher: FixedTeacher,
    eval_loader,
    num_samples: int,
    run_dir: Path,
    *,
    key: str,
    mean,
    std,
    device,
    rank: int,
    world: int,
) -> tuple[torch.Tensor, int]:
    """([num_samples, classes] fp32 logits, samples without logits) of ``teacher`` on every training image under the eval transform.

    Each rank computes its share into ``RUN/teacher_logits/partRofW.safetensors`` (written atomically, with
    ``key`` naming the teacher and the data in its metadata); then every rank reads all parts.  Parts already
    there with the same key and sample count are reused, so a resumed run does not compute them again.  Samples
    that could not be decoded have no logits (NaN rows); training never sees them either."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(run_dir) / CACHE_DIR
    metadata = {"key": key, "num_samples": str(num_samples)}

    def current(path: Path) -> bool:
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() == metadata

    own = folder / _part_name(rank, world)
    if not current(own):
        folder.mkdir(parents=True, exist_ok=True)
        indices, logits = [], []
        eval_loader.set_epoch(0)
        for batch in eval_loader:
            batch = batch.to(device)
            keep = batch.valid
            logits.append(teacher(normalize(batch.images, mean, std), None)[keep].cpu())
            indices.append(batch.indices[keep.cpu()].cpu())
        tensors = {
            "indices": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64),
            "logits": torch.cat(logits) if logits else torch.zeros(0, teacher.network.num_classes),
        }
        with atomic_output(own) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    if dist.is_initialized() and world > 1:
        dist.barrier()
    cache = torch.full((num_samples, teacher.network.num_classes), float("nan"))
    for r in range(world):
        path = folder / _part_name(r, world)
        if not current(path):
            raise RuntimeError(f"teacher logit cache part {path} is missing or was written for another teacher")
        with safe_open(str(path), framework="pt") as f:
            cache[f.get_tensor("indices")] = f.get_tensor("logits")
    return cache, int(torch.isnan(cache[:, 0]).sum().item())
