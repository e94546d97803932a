"""Scored candidates on disk: ``candidates.jsonl`` plus per-rank partial files of a generation in flight.

Every score is on disk as soon as it exists: each rank appends its own results to
``candidates.rank{r}.partial.jsonl``; once a generation's results are exchanged, rank 0 appends them
all to ``candidates.jsonl`` and the partial files go.  A rerun reads both, so a killed search
evaluates only what is missing; lines cut by a kill are skipped (those candidates run again).

A score holds for the weights and the settings that produced it: ``identity.json`` records them (the
checkpoint tag of the weights, the calibration and validation settings, the data).  When they change, the
earlier files are set aside as ``*.stale-N.jsonl`` and every candidate is evaluated again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from fileops import atomic_write_text
from models.families import Arch
from search.evolution import Candidate, arch_key

CANDIDATES = "candidates.jsonl"
PARTIAL = "candidates.rank{rank}.partial.jsonl"
IDENTITY = "identity.json"


def set_aside_if_stale(out: Path, identity: dict) -> str | None:
    """Rank 0: when ``out`` holds scores of another identity (or of an unknown one), rename them aside and say
    why; write ``identity``.  Returns the line to print, or None."""
    path = out / IDENTITY
    previous = json.loads(path.read_text()) if path.is_file() else None
    files = [out / CANDIDATES, *sorted(out.glob(PARTIAL.format(rank="*")))]
    existing = [f for f in files if f.is_file()]
    message = None
    if existing and previous != identity:
        n = 1 + len(list(out.glob("*.stale-*.jsonl")))
        for f in existing:
            f.rename(f.with_name(f"{f.stem}.stale-{n}.jsonl"))
        changed = sorted(k for k in {**identity, **(previous or {})} if (previous or {}).get(k) != identity.get(k))
        why = f"{', '.join(changed)} changed" if previous is not None else f"no {IDENTITY} recorded what produced them"
        message = f"earlier scores set aside as *.stale-{n}.jsonl ({why}): every candidate is evaluated again"
    if previous != identity:
        atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True))
    return message


def read_candidates(out: Path) -> dict[str, dict]:
    """Records already on disk in ``out`` (the merged file and any partial files), by architecture key."""
    cache = {}
    for path in [out / CANDIDATES, *sorted(out.glob(PARTIAL.format(rank="*")))]:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = Candidate.from_record(json.loads(line)).to_record()
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                    continue  # a line cut by a kill, or not a candidate: evaluated again
                cache[arch_key(Candidate.from_record(record).arch)] = record
    return cache


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


Progress = Callable[[int, int, int, Candidate], None]
"""``(done, this rank's share, new over all ranks, the candidate just scored)``."""


class CandidateStore:
    """The scores of one search folder, shared by every rank; :meth:`score` evaluates only what is new."""

    def __init__(self, out: Path, rank: int, world_size: int, identity: dict | None = None):
        """``identity``: what the scores depend on (see the module docstring); earlier scores of another identity
        are set aside (:attr:`note` says so)."""
        self.out, self.rank, self.world_size = out, rank, world_size
        self.path, self.partial = out / CANDIDATES, out / PARTIAL.format(rank=rank)
        self.note = set_aside_if_stale(out, identity) if identity is not None and rank == 0 else None
        _barrier()  # rank 0 has set stale scores aside before any rank reads
        self.cache = read_candidates(out)
        _barrier()  # every rank has read the partial files before rank 0 merges them away
        partials = list(out.glob(PARTIAL.format(rank="*")))
        if rank == 0 and (self.path.exists() or partials):  # one clean file: partials merged, no cut line left
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.cache.values()))
            for stale in partials:
                stale.unlink()
        _barrier()

    def __len__(self) -> int:
        return len(self.cache)

    def score(
        self, archs: list[Arch], evaluate: Callable[[Arch], Candidate], progress: Progress | None = None
    ) -> list[Candidate]:
        """Candidates of ``archs``: cached ones looked up, new ones split over the ranks (uneven shares are
        fine: no collective runs inside an evaluation) and exchanged once.  ``progress(done, share, new,
        candidate)`` is called after each evaluation of this rank's share (``new``: over all ranks)."""
        missing = [a for a in archs if arch_key(a) not in self.cache]
        share = missing[self.rank :: self.world_size]
        records = []
        with self.partial.open("a") as sink:
            for done, arch in enumerate(share, 1):
                candidate = evaluate(arch)
                records.append(candidate.to_record())
                sink.write(json.dumps(records[-1]) + "\n")
                sink.flush()
                if progress is not None:
                    progress(done, len(share), len(missing), candidate)
        if self.world_size > 1:
            parts: list = [None] * self.world_size
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        if self.rank == 0 and records:
            with self.path.open("a") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)
        for record in records:
            self.cache[arch_key(Candidate.from_record(record).arch)] = record
        _barrier()  # rank 0 has appended everything before the partial files go
        self.partial.unlink(missing_ok=True)
        return [Candidate.from_record(self.cache[arch_key(a)]) for a in archs]
