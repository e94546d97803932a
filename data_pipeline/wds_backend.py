"""WebDataset tar shards read by random access through a tar index, decoded in DataLoader workers.

The worker processes are started once per loader and kept between epochs: an epoch that is only a few
hundred images long otherwise pays for forking and warming up its workers every time (on 2 cores, a
quarter to a third of a 400-image epoch).  Each epoch hands the persistent DataLoader its own batch
list, so batches stay a pure function of (seed, epoch, rank, position).  An epoch left before its end (a
resume point, the first batches for BN calibration) shuts its workers down rather than have them decode
the batches they had queued; the next epoch starts new ones.  A worker reads a sample with one ``pread``
on a shard it keeps open, and sends a batch as one shared-memory tensor (the images) plus small arrays.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from data_pipeline.batch import Batch
from data_pipeline.config import MAX_IMAGE_PIXELS, DataConfig
from data_pipeline.jpeg_region import UndecodableImage, decode_rgb
from data_pipeline.manifest import has_manifest, split_entry
from data_pipeline.shards import index_shards, split_shards
from data_pipeline.transforms import eval_transform, seeded, train_decode_transform
from data_pipeline.worker_start import stay_unless_orphaned, worker_context

_OPEN_SHARDS = 64
"""Shard descriptors a process keeps open (a split of 64 MB shards of ImageNet has about 2,200 shards)."""


class _Samples(Dataset):
    """Item = (sample index, augmentation seed, valid) → (image, label, valid, index) or a skip record."""

    def __init__(self, refs, transform, train: bool, max_pixels: int = MAX_IMAGE_PIXELS):
        self.refs = refs
        self.transform = transform
        self.train = train
        self.max_pixels = max_pixels
        """Eval images whose header declares more pixels are skipped, not decoded (train: the transform's own)."""
        self._files: OrderedDict[str, int] = OrderedDict()
        self._files_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self):
        return {**self.__dict__, "_files": OrderedDict()}

    def _read(self, shard: str, span: tuple[int, int]) -> torch.Tensor:
        """The bytes at ``span`` of ``shard`` in a new uint8 tensor: one positioned read (``pread``) on a
        descriptor that this process keeps open (the ``_OPEN_SHARDS`` most recently used ones), instead of an
        open, a seek, a read and a copy per sample."""
        if self._files_pid != os.getpid():  # a forked worker: descriptors of its own
            self._files, self._files_pid = OrderedDict(), os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if len(self._files) > _OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(shard)
        offset, length = span
        out = torch.empty(length, dtype=torch.uint8)
        got = os.preadv(fd, [out.numpy()], offset)
        if got != length:
            raise OSError(f"short read: {got} of {length} bytes at offset {offset} (file cut?)")
        return out

    def close(self) -> None:
        files, self._files = self._files, OrderedDict()
        if files and self._files_pid == os.getpid():
            for fd in files.values():
                os.close(fd)

    def __del__(self):
        self.close()

    def __getitem__(self, item: tuple[int, int, bool]):
        index, seed, valid = item
        ref = self.refs[index]
        try:
            data = self._read(ref.shard, ref.image)
            image = (
                seeded(self.transform, data, seed) if self.train else self.transform(decode_rgb(data, self.max_pixels))
            )
        except (UndecodableImage, OSError) as exc:
            return ("skip", Path(ref.shard).name, ref.key, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return image, ref.label, valid, index


def _collate(items, resolution: int):
    """A worker's batch: the images stacked into shared memory (sending them then copies nothing), the
    small per-sample fields as NumPy arrays, which travel inside the message; as tensors each would be one
    more shared-memory file whose descriptor the rank must fetch from the worker (~2 ms each)."""
    # ``isinstance``, not ``it[0] == "skip"``: comparing a tensor with a string costs ~16 µs in torch.
    good = [it for it in items if not isinstance(it[0], str)]
    skipped = [tuple(it[1:]) for it in items if isinstance(it[0], str)]
    if good:
        first = good[0][0]
        channels, height, width = first.shape
        size = len(good) * first.numel()
        if get_worker_info() is not None:
            flat = first.new(first.untyped_storage()._new_shared(size * first.element_size()))
        else:
            flat = torch.empty(size, dtype=first.dtype)
        images = flat.as_strided((len(good), channels, height, width), (first.numel(), 1, width * channels, channels))
        for k, it in enumerate(good):
            images[k].copy_(it[0])
    else:
        images = torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
    labels = np.array([it[1] for it in good], dtype=np.int64)
    valid = np.array([it[2] for it in good], dtype=bool)
    indices = np.array([it[3] for it in good], dtype=np.int64)
    return images, labels, valid, indices, skipped


def _to_batch(collated) -> Batch:
    images, labels, valid, indices, skipped = collated
    return Batch(images, torch.from_numpy(labels), torch.from_numpy(valid), torch.from_numpy(indices), skipped)


def _init_worker(worker_id: int) -> None:
    """A data worker decodes one sample at a time: one torch thread, so workers and ranks share the cores.
    It sets aside SIGTERM and SIGUSR1, which SLURM sends to every process of a job step, and SIGINT, which Ctrl-C
    sends to the terminal's process group, while its parent lives: its rank handles them (saves at the next step boundary) and still needs its workers until then.
    The workers end when their rank shuts the loader down, or exits; with no parent left, those signals end
    them too (and under the fork server the kernel ends them with it, see :mod:`data_pipeline.worker_start`)."""
    torch.set_num_threads(1)
    stay_unless_orphaned(os.getppid())


class _EpochBatches:
    """The batch sampler of a persistent DataLoader: the batch list of the epoch being read, set per epoch
    (DataLoader reads it anew at every ``iter()``)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int, bool]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


_LIVE: weakref.WeakSet = weakref.WeakSet()
"""Backends that may hold idle workers, for the exit hook below."""


def _close_all() -> None:
    """At exit, end idle workers before multiprocessing's own exit hook, which would terminate them (they
    set SIGTERM aside, see ``_init_worker``) and then wait for them for ever.  Exit hooks run last-registered
    first: this one is registered after torch (and so multiprocessing) was imported, so it runs before their
    hooks (after torch's, a DataLoader no longer shuts its workers down)."""
    for backend in list(_LIVE):
        backend.close()


atexit.register(_close_all)


class WebDatasetBackend:
    def __init__(self, config: DataConfig, split: str, train: bool, seed: int):
        self.config = config
        self.refs, self.problems = index_shards(split_shards(config.root, split, verify=config.verify == "start"))
        entry = split_entry(config.root, split) if has_manifest(config.root) else {}
        self._skipped_at_prepare = entry.get("webdataset_skipped", [])
        # Train: the crop is drawn before decoding, and only its pixels are decoded.
        transform = train_decode_transform(config) if train else eval_transform(config)
        self.dataset = _Samples(self.refs, transform, train, config.max_image_pixels)
        self._idle: DataLoader | None = None
        """A DataLoader whose workers finished an epoch and wait for the next one."""
        _LIVE.add(self)

    @property
    def num_samples(self) -> int:
        return len(self.refs)

    def _new_loader(self) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(
            self.dataset,
            batch_sampler=_EpochBatches(),
            num_workers=workers,
            collate_fn=partial(_collate, resolution=self.config.base_resolution),
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers else None,
            persistent_workers=workers > 0,
            # Its own generator: creating the iterator must not consume torch's global RNG, which the
            # trainer checkpoints (dropout) — or a resumed run would draw different masks.  (Augmentation
            # does not depend on it: every sample is seeded from the plan.)
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=_init_worker,
            multiprocessing_context=worker_context() if workers else None,
        )

    def iterate(self, batches: list[list[tuple[int, int, bool]]], epoch: int) -> Iterator[Batch]:
        if not batches:
            return
        # The idle loader, if any, is this epoch's; a second epoch read at the same time gets its own.
        loader = self._idle if self._idle is not None else self._new_loader()
        self._idle = None
        loader.batch_sampler.batches = batches
        finished = False
        try:
            yield from map(_to_batch, loader)
            finished = True
        finally:
            loader.batch_sampler.batches = []
            if finished and self.config.num_workers > 0 and self._idle is None:
                self._idle = loader
            else:
                _shut_down(loader)

    def close(self) -> None:
        """End the worker processes now (they also end with the loader, or the process)."""
        if self._idle is not None:
            _shut_down(self._idle)
            self._idle = None
        self.dataset.close()

    def problem_lines(self) -> list[str]:
        prepared = [f"{s['key']} skipped at prepare time ({s['reason']})" for s in self._skipped_at_prepare]
        return self.problems.lines() + prepared


def _shut_down(loader: DataLoader) -> None:
    """Stop ``loader``'s workers: what a DataLoader iterator does when it is garbage-collected, done now."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
