"""Sharded DeepSpeed checkpoints with a commit marker, per-rank trainer state, retention and fallback.

Layout: ``<run>/checkpoints/<tag>/`` holds DeepSpeed's files (every rank writes its own shards) plus
``trainer_rank{r}.pt`` (loader position and RNG states of rank r, as tensors, numbers and strings).
Every file is written to a temporary name, fsynced and renamed.  ``<run>/checkpoints/latest`` names the
newest committed tag; rank 0 writes it only after an all-reduce says that every rank wrote all of its
files, so a checkpoint with a missing or partial file is never committed (a failed one is removed and
training stops with the failing ranks' errors).  Resuming reads only data (``weights_only``, see
:mod:`trainer.state.safe_checkpoint`); when a file of the newest committed checkpoint cannot be read on any
rank, every rank falls back to the previous retained one, and the log says which file and why.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fileops import atomic_output, atomic_write_text
from trainer.runtime.collectives import all_reduce_
from trainer.state.reshard import (
    check_global_batch,
    reshard_zero_optimizer,
    saved_world_size,
    source_rank,
    zero_optim_files,
)
from trainer.state.safe_checkpoint import CheckpointFileError, GuardedCheckpointEngine, safe_load

LATEST = "latest"
TAG_PATTERN = re.compile(r"^step(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written on some rank, or no committed checkpoint can be read."""


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tuples, numbers, strings and tensors (loadable with
    ``weights_only``); on a GPU also the current GPU's generator, which draws dropout and drop-path masks
    of tensors on it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # a checkpoint written on a CPU has none: left as seeded
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The committed tag named by ``latest`` (None when there is no committed checkpoint)."""
    marker = Path(checkpoint_dir) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if TAG_PATTERN.match(tag) and (Path(checkpoint_dir) / tag).is_dir() else None


def committed_tags(checkpoint_dir: Path) -> list[str]:
    """Committed tags, newest first: the one named by ``latest`` and the retained ones before it (a tag
    folder newer than ``latest`` is an uncommitted, possibly partial save)."""
    newest = latest_tag(checkpoint_dir)
    if newest is None:
        return []
    tags = (p.name for p in Path(checkpoint_dir).iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    return sorted((t for t in tags if t <= newest), reverse=True)


def rank_files(tag_dir: Path, rank: int, saved_world: int | None = None) -> list[Path]:
    """The files rank ``rank`` reads when resuming from ``tag_dir``: the shared model states (ZeRO 0–2),
    its own ZeRO shards, and its trainer state.  On another world size than ``saved_world`` (the ranks that wrote
    it): the shared model states, every old rank's ZeRO-1/2 optimizer partition, and the trainer state of the old
    rank it continues (:func:`trainer.state.reshard.source_rank`)."""
    files = [p for p in [tag_dir / "mp_rank_00_model_states.pt"] if p.is_file()]
    if saved_world is not None and saved_world != 0:
        source = source_rank(rank, saved_world)
        return [*files, *zero_optim_files(tag_dir), tag_dir / f"trainer_rank{source}.pt"]
    files += sorted(tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_*.pt"))
    return [*files, tag_dir / f"trainer_rank{rank}.pt"]


@dataclass(slots=True)
class Resumed:
    """What :meth:`Checkpointer.resume` loaded."""

    tag: str
    client_state: dict[str, Any]
    rank_state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    """One line per newer committed checkpoint that could not be read, naming the file and the reason."""
    saved_world: int = 0
    """How many ranks wrote it (0: unknown, an older layout); ``rank_state`` is then old rank
    ``rank mod saved_world``'s."""


def check_resumable(
    resumed: Resumed, where: Path, *, model_hash: str, world: int, micro_batch: int = 0, accumulation: int = 0
) -> None:
    """A CheckpointError unless ``resumed`` was written for the same model config, and by the same number of ranks
    or with the global batch that ``micro_batch × accumulation × world`` keeps."""
    client = resumed.client_state
    if client.get("model_hash") != model_hash:
        raise CheckpointError(
            f"checkpoint {where} was written for a different model config (hash {client.get('model_hash')} vs "
            f"{model_hash}); use a new run_dir or the original config"
        )
    saved_world = client.get("world_size")
    if saved_world != world:
        problem = check_global_batch(
            client,
            resumed.tag,
            saved_world=saved_world,
            world=world,
            micro_batch=micro_batch,
            accumulation=accumulation,
        )
        if problem is not None:
            raise CheckpointError(problem)


_LOADER_KEYS = {
    "batch_size": "data.batch_size",
    "num_samples": "the training split's size (data.root, data.train_split)",
    "split": "data.train_split",
    "world_size": "the world size",
}
"""The config key behind each value a loader position depends on, for the message that refuses it."""


def restore_loader(loader, state: dict[str, Any], where: Path, rank: int) -> None:
    """``loader.load_state_dict(state)``, or a one-line :class:`CheckpointError` naming the file and the key
    when the saved position belongs to another batch size or dataset (a change ``--allow-config-change``
    accepted, but which no data position carries over)."""
    from data_pipeline.loader import LoaderStateMismatch

    try:
        loader.load_state_dict(state)
    except LoaderStateMismatch as exc:
        key = _LOADER_KEYS.get(exc.key, exc.key)
        raise CheckpointError(
            f"{where / f'trainer_rank{rank}.pt'}: its data position is for {key} {exc.saved}, this run has "
            f"{exc.have}; resume with the checkpoint's value, or train into a new run_dir"
        ) from None


def _failed_ranks(failed: bool, rank: int, world_size: int) -> list[int]:
    """Ranks whose ``failed`` is true (a collective: every rank must call it)."""
    if not dist.is_initialized() or world_size == 1:
        return [rank] if failed else []
    flags = torch.zeros(world_size)
    flags[rank] = float(failed)
    all_reduce_(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


class Checkpointer:
    """Saves, prunes and loads the run's checkpoints; :meth:`should_save` is the one saving rule."""

    def __init__(
        self,
        checkpoint_dir: Path,
        rank: int,
        world_size: int,
        *,
        keep: int,
        every_steps: int,
        reshard_refusal: str | None = None,
    ):
        """``reshard_refusal``: why this run cannot resume a checkpoint of another world size (None: it can)."""
        self.dir = Path(checkpoint_dir)
        self.reshard_refusal = reshard_refusal
        self.rank, self.world_size, self.keep, self.every_steps = rank, world_size, keep, every_steps
        self.last_tag: str | None = None
        """The newest tag this run saved or resumed from."""
        self._preloaded: dict[str, Any] = {}

    def should_save(
        self, step: int, *, last: bool = False, epoch_end: bool = False, stop: bool = False, healthy: bool = True
    ) -> bool:
        """Save at ``step``?  Always at the final step, an epoch end or a stop request; every ``every_steps``
        steps only when ``healthy`` (never during a streak of skipped steps, so the newest periodic
        checkpoint stays a good one); and never twice for the same step."""
        if self.last_tag == tag_for(step):
            return False
        return last or epoch_end or stop or (healthy and step % self.every_steps == 0)

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> str:
        """Write ``tag_for(step)`` on every rank and commit it; raise :class:`CheckpointError` on every rank
        (after removing the partial tag) when any rank could not write one of its files."""
        tag = tag_for(step)
        if self.rank == 0 and (self.dir / tag).exists() and tag != latest_tag(self.dir):
            shutil.rmtree(self.dir / tag, ignore_errors=True)  # left by a save that was killed: start clean
        if dist.is_initialized():
            dist.barrier()
        guarded = _guarded(engine)
        guarded.reset_failures()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        rank_file = self.dir / tag / f"trainer_rank{self.rank}.pt"
        try:
            with atomic_output(rank_file) as tmp:
                torch.save(rank_state, tmp)
        except OSError as exc:
            guarded.record(rank_file, exc)
        failures = list(guarded.failures)
        failed = _failed_ranks(bool(failures), self.rank, self.world_size)
        if failed:
            if self.rank == 0 and tag != latest_tag(self.dir):
                shutil.rmtree(self.dir / tag, ignore_errors=True)
            own = f"; this rank (rank {self.rank}): " + "; ".join(failures) if failures else ""
            kept = latest_tag(self.dir)
            raise CheckpointError(
                f"checkpoint {self.dir / tag} was not committed: rank(s) {failed} could not write their files{own}. "
                f"The last committed checkpoint is {self.dir / kept if kept else 'none'}"
            )
        if self.rank == 0:
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep_tag=tag)
        if dist.is_initialized():
            dist.barrier()
        self.last_tag = tag
        return tag

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
        for old in [t for t in tags if t != keep_tag][: max(0, len(tags) - self.keep)]:
            shutil.rmtree(self.dir / old, ignore_errors=True)

    def _read_rank_files(self, tag: str, saved_world: int) -> tuple[dict[str, Any] | None, str | None]:
        """(this rank's trainer state, None), or (None, why a file of ``tag`` this rank needs is unreadable).
        DeepSpeed's files are read into the guarded engine's cache, so the real load reads them once."""
        try:
            files = rank_files(self.dir / tag, self.rank, saved_world if saved_world != self.world_size else None)
            loaded = {path: safe_load(path) for path in files}
        except CheckpointFileError as exc:
            return None, str(exc)
        self._preloaded = {str(p): v for p, v in loaded.items() if not p.name.startswith("trainer_rank")}
        return loaded[files[-1]], None

    def resume(self, engine) -> Resumed | None:
        """Load the newest committed checkpoint every rank can read (weights, optimizer, states), or None
        when there is none; raise :class:`CheckpointError` when committed ones exist but none is readable."""
        skipped: list[str] = []
        for tag in committed_tags(self.dir):
            self._preloaded = {}
            saved_world = saved_world_size(self.dir / tag)
            if saved_world not in (0, self.world_size) and self.reshard_refusal is not None:
                raise CheckpointError(
                    f"checkpoint {tag} was written by {saved_world} ranks, this run has {self.world_size}: "
                    f"{self.reshard_refusal}"
                )
            rank_state, problem = self._read_rank_files(tag, saved_world)
            if problem is not None and self.rank != 0:  # rank 0 logs its own; the others say theirs here
                print(f"rank {self.rank}: skipping unreadable checkpoint: {problem}", file=sys.stderr, flush=True)
            failed = _failed_ranks(problem is not None, self.rank, self.world_size)
            if failed:
                skipped.append(problem or f"{self.dir / tag}: rank(s) {failed} could not read their files")
                continue
            guarded = _guarded(engine)
            guarded.preloaded = self._preloaded
            try:
                if saved_world in (0, self.world_size):
                    path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
                else:
                    path, client_state = self._load_resharded(engine, tag)
            finally:
                guarded.preloaded, self._preloaded = {}, {}
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
            self.last_tag = tag
            return Resumed(tag, client_state, rank_state, skipped, saved_world)
        if skipped:
            raise CheckpointError("no committed checkpoint can be read: " + "; ".join(skipped))
        return None

    def _load_resharded(self, engine, tag: str) -> tuple[str | None, dict[str, Any]]:
        """Load ``tag``, written by another number of ranks.  ZeRO-0 keeps the whole optimizer beside the weights,
        so DeepSpeed's own load reads it on any world size; under ZeRO-1/2 DeepSpeed refuses optimizer partitions of
        another data-parallel degree, so it loads the module only and the partitions are cut again here."""
        if not engine.zero_optimization():
            return engine.load_checkpoint(str(self.dir), tag=tag)
        partitions = [_guarded(engine).load(str(p)) for p in zero_optim_files(self.dir / tag)]
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag, load_module_only=True)
        if path is None:
            return path, client_state
        try:
            reshard_zero_optimizer(engine.optimizer, [p["optimizer_state_dict"] for p in partitions])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {self.dir / tag}: the ZeRO optimizer state cannot be resharded: {exc}"
            ) from exc
        # what load_module_only leaves out of DeepSpeed's own counters (the trainer keeps its own step)
        engine.global_steps = client_state.pop("global_steps", engine.global_steps)
        engine.global_samples = client_state.pop("global_samples", engine.global_samples)
        engine.skipped_steps = client_state.pop("skipped_steps", engine.skipped_steps)
        return path, client_state


def _guarded(engine) -> GuardedCheckpointEngine:
    guarded = engine.checkpoint_engine
    if not isinstance(guarded, GuardedCheckpointEngine):
        raise TypeError(
            "the engine was not built by trainer.runtime.engine.build_engine (no guarded checkpoint engine)"
        )
    return guarded
