"""``build_loader``: one resumable loader per split, the same batches from WebDataset or FFCV storage."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.batch import Batch
from data_pipeline.config import DataConfig
from data_pipeline.plan import EpochPlan

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass(slots=True)
class EpochSummary:
    epoch: int
    batches: int = 0
    images: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    """(shard, key, reason) of samples that failed to decode this epoch."""
    problems: list[str] = field(default_factory=list)
    """Static problems found when the split was indexed (truncated shards, missing labels)."""

    @classmethod
    def merged(cls, summaries: list[EpochSummary]) -> EpochSummary:
        """One summary for all ranks of an epoch: counts and skipped samples added up, indexing problems
        (the same split indexed by every rank) listed once."""
        return cls(
            epoch=summaries[0].epoch,
            batches=sum(s.batches for s in summaries),
            images=sum(s.images for s in summaries),
            skipped=[item for s in summaries for item in s.skipped],
            problems=list(dict.fromkeys(p for s in summaries for p in s.problems)),
        )

    def record(self, limit: int = 100) -> dict[str, Any]:
        """The summary as a metrics record (the first ``limit`` skipped samples and problems listed)."""
        return {
            "epoch": self.epoch,
            "epoch/batches": self.batches,
            "epoch/images": self.images,
            "epoch/skipped": len(self.skipped),
            "epoch/problems": len(self.problems),
            "epoch/skipped_samples": [list(item) for item in self.skipped[:limit]],
            "epoch/problem_lines": self.problems[:limit],
        }

    def text(self) -> str:
        line = f"epoch {self.epoch}: {self.batches} batches, {self.images} images"
        if self.skipped or self.problems:
            line += f", {len(self.skipped)} undecodable skipped, {len(self.problems)} indexing problem(s)"
        details = [f"  {shard}/{key}: {reason}" for shard, key, reason in self.skipped[:20]]
        details += [f"  {p}" for p in self.problems[:20]]
        return "\n".join([line, *details])


class LoaderStateMismatch(ValueError):
    """A saved loader position that does not apply to this loader (another batch size, dataset or split)."""

    def __init__(self, key: str, saved: Any, have: Any):
        super().__init__(f"loader state was saved with {key}={saved}, this loader has {key}={have}")
        self.key, self.saved, self.have = key, saved, have


class ResumableLoader:
    """Iterates one epoch per ``iter()``; ``state_dict`` pins the epoch and the next batch exactly."""

    def __init__(self, backend, plan: EpochPlan, split: str):
        self.backend = backend
        self.plan = plan
        self.split = split
        self.epoch = 0
        self.position = 0
        """Batches of the current epoch already yielded."""
        self.last_summary: EpochSummary | None = None

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        summary = EpochSummary(epoch=epoch, problems=self.backend.problem_lines())
        batches = self.backend.iterate(self.plan.batches(epoch, self.position), epoch)
        try:
            for batch in batches:
                self.position += 1
                summary.batches += 1
                summary.images += len(batch)
                summary.skipped += batch.skipped
                for shard, key, reason in batch.skipped:
                    log.warning("%s split: skipped %s/%s: %s", self.split, shard, key, reason)
                yield batch
        finally:  # an epoch left early (break, resume point): the backend drops what it had read ahead
            batches.close()
        self.last_summary = summary
        self.epoch, self.position = epoch + 1, 0

    def groups(self, size: int) -> Iterator[tuple[list[Batch], bool]]:
        """The rest of the current epoch in groups of ``size`` batches, each with a flag that is True for the
        epoch's last group.  A remainder smaller than a group is read and dropped.  The last group is
        yielded after the epoch has ended (``epoch`` advanced, ``position`` 0, ``last_summary`` set), so a
        checkpoint taken then resumes at the start of the next epoch."""
        batches = iter(self)
        group: list[Batch] = []
        for batch in batches:
            group.append(batch)
            if len(group) < size:
                continue
            if len(self) - self.position < size:  # no full group left: finish the epoch, then hand it over
                for _ in batches:
                    pass
                yield group, True
                return
            yield group, False
            group = []

    def close(self) -> None:
        """End the loader's worker processes now rather than when it is garbage-collected (a later epoch
        starts new ones)."""
        self.backend.close()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": self.epoch,
            "position": self.position,
            "rank": self.plan.rank,
            "world_size": self.plan.world_size,
            "num_samples": self.plan.num_samples,
            "batch_size": self.plan.batch_size,
        }

    def resharded_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state``, saved by this split's loader on another world size or batch size, as this loader's own: the
        same epoch, continued after the samples that all ranks together had consumed of it.

        Every rank's share of a training epoch interleaves one order that depends on (seed, epoch) only (rank r
        takes the order's positions r, r + world, r + 2·world, ...), so after ``p`` batches of ``b`` on ``w`` ranks
        the ranks have consumed exactly the order's first ``p·b·w`` samples, whatever ``w`` was.  This loader
        resumes at the batch where its own ranks have consumed that same prefix; nothing of the epoch is lost or
        repeated.  ValueError when the prefix is not a whole number of batches over this loader's ranks (a global
        batch that was not kept)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for key, have in (("split", self.split), ("num_samples", self.plan.num_samples)):
            if state[key] != have:
                raise ValueError(f"loader state was saved with {key}={state[key]}, this loader has {key}={have}")
        consumed = int(state["position"]) * int(state["batch_size"]) * int(state["world_size"])
        per_batch = self.plan.batch_size * self.plan.world_size
        if consumed % per_batch:
            raise ValueError(
                f"loader state was saved after {consumed} samples of epoch {state['epoch']} (over all ranks), not a "
                f"whole number of batches of {self.plan.batch_size} on {self.plan.world_size} rank(s)"
            )
        return {
            **state,
            "position": consumed // per_batch,
            "rank": self.plan.rank,
            "world_size": self.plan.world_size,
            "batch_size": self.plan.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for key in ("world_size", "num_samples", "batch_size", "split"):
            have = getattr(self.plan, key, None) if key != "split" else self.split
            if state[key] != have:
                raise LoaderStateMismatch(key, state[key], have)
        if not 0 <= state["position"] <= self.plan.num_batches:
            raise ValueError(f"loader position {state['position']} outside 0..{self.plan.num_batches}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def build_loader(
    config: DataConfig, split: str, *, train: bool, rank: int = 0, world_size: int = 1, seed: int = 0
) -> ResumableLoader:
    """The loader of ``split`` for this rank: NCHW uint8 batches at ``config.base_resolution``.

    Raises ``DataError`` at once for a missing dataset, shard or split.
    """
    if config.format == "webdataset":
        from data_pipeline.wds_backend import WebDatasetBackend

        backend = WebDatasetBackend(config, split, train, seed)
    else:
        from data_pipeline.ffcv_backend import FFCVBackend

        backend = FFCVBackend(config, split, train, seed)
    plan = EpochPlan(
        num_samples=backend.num_samples,
        batch_size=config.batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        train=train,
    )
    return ResumableLoader(backend, plan, split)
