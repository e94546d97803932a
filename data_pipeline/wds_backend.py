"""WebDataset tar shards read by random access through a tar index, decoded in DataLoader workers."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from data_pipeline.batch import Batch
from data_pipeline.config import DataConfig
from data_pipeline.manifest import has_manifest, split_entry
from data_pipeline.shards import index_shards, read_bytes, split_shards
from data_pipeline.transforms import eval_transform, seeded, train_transform


class _Samples(Dataset):
    """Item = (sample index, augmentation seed, valid) → (image, label, valid, index) or a skip record."""

    def __init__(self, refs, transform, train: bool):
        self.refs = refs
        self.transform = transform
        self.train = train

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: tuple[int, int, bool]):
        index, seed, valid = item
        ref = self.refs[index]
        try:
            data = torch.frombuffer(bytearray(read_bytes(ref.shard, ref.image)), dtype=torch.uint8)
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError, OSError) as exc:
            return ("skip", Path(ref.shard).name, ref.key, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        image = seeded(self.transform, image, seed) if self.train else self.transform(image)
        return image, ref.label, valid, index


def _collate(items, resolution: int) -> Batch:
    good = [it for it in items if it[0] != "skip"]
    skipped = [tuple(it[1:]) for it in items if it[0] == "skip"]
    if good:
        first = good[0][0]
        out = None
        if get_worker_info() is not None:  # stack straight into shared memory: no copy when it is sent
            storage = first.untyped_storage()._new_shared(len(good) * first.numel() * first.element_size())
            out = first.new(storage).resize_(len(good), *first.shape)
        images = torch.stack([it[0] for it in good], out=out)
    else:
        images = torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
    labels = torch.tensor([it[1] for it in good], dtype=torch.int64)
    valid = torch.tensor([it[2] for it in good], dtype=torch.bool)
    indices = torch.tensor([it[3] for it in good], dtype=torch.int64)
    return Batch(images, labels, valid, indices, skipped)


def _init_worker(worker_id: int) -> None:
    """A data worker decodes one sample at a time: one torch thread, so workers and ranks share the cores.
    It ignores SIGTERM and SIGUSR1, which SLURM sends to every process of a job step: its rank handles them
    (saves at the next step boundary) and still needs its workers until then.  The workers end when their
    rank shuts the loader down, or exits."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class WebDatasetBackend:
    def __init__(self, config: DataConfig, split: str, train: bool, seed: int):
        self.config = config
        self.refs, self.problems = index_shards(split_shards(config.root, split, verify=config.verify == "start"))
        entry = split_entry(config.root, split) if has_manifest(config.root) else {}
        self._skipped_at_prepare = entry.get("webdataset_skipped", [])
        transform = train_transform(config) if train else eval_transform(config)
        self.dataset = _Samples(self.refs, transform, train)

    @property
    def num_samples(self) -> int:
        return len(self.refs)

    def iterate(self, batches: list[list[tuple[int, int, bool]]], epoch: int) -> Iterator[Batch]:
        if not batches:
            return iter(())
        workers = self.config.num_workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=partial(_collate, resolution=self.config.base_resolution),
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers else None,
            # Its own generator: creating the iterator must not consume torch's global RNG, which the
            # trainer checkpoints (dropout) — or a resumed run would draw different masks.
            generator=torch.Generator().manual_seed(epoch),
            worker_init_fn=_init_worker,
        )
        return iter(loader)

    def problem_lines(self) -> list[str]:
        prepared = [f"{s['key']} skipped at prepare time ({s['reason']})" for s in self._skipped_at_prepare]
        return self.problems.lines() + prepared
