"""FFCV ``.beton`` files: JPEG decode + crop + resize in FFCV's compiled, multi-threaded pipeline.

FFCV's own RandomResizedCrop and flip draw from unseeded per-thread generators, so their output
depends on thread scheduling and cannot be resumed exactly.  Our decoder (``_make_decoder``) draws each
sample's crop and flip from a generator seeded by the run seed, the sample index and the batch it
belongs to (its first sample index).  Batches are a pure function of (seed, epoch, rank, position), so
augmentation is reproducible on resume and still changes from epoch to epoch; and the pipeline is
compiled once per loader, not once per epoch.

The images are those our torchvision transforms make of the decoded image (the WebDataset path's): the
crop is resized with torchvision's antialiased bicubic (``data_pipeline.bicubic``, the same integer
arithmetic, compiled by numba), not FFCV's OpenCV ``INTER_AREA``; eval resizes the short side and takes the
centre window, as ``Resize`` + ``CenterCrop`` do.  The resize writes CHW images itself, flipped as needed,
in FFCV's decode threads: FFCV's ``ToTorchImage`` would permute and copy every batch in its one pipeline
thread while the decode threads wait.  The crop is drawn from the image size in the metadata, and only its
pixels are decoded (``data_pipeline.jpeg_region``, with the fast inverse DCT that
FFCV's own decoder uses, so the pixels are those of FFCV's full decode); FFCV itself could crop a JPEG before
decoding only through a lossless transform (entropy-decode everything, re-encode the crop), which costs
more than it saves.

One FFCV ``Loader`` is built per split and compiled once; each epoch (or resume) runs FFCV's epoch
iterator over this rank's remaining indices, in order, reusing the previous epoch's buffers.  This uses
``ffcv.loader.epoch_iterator`` directly (pinned ffcv 1.0.2), because ``Loader.__iter__`` cannot start
mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data_pipeline.batch import Batch
from data_pipeline.bicubic import centre_offset, resize_into_chw, resized_size
from data_pipeline.config import MAX_IMAGE_PIXELS, DataConfig
from data_pipeline.jpeg_region import region_decoder_for_numba
from data_pipeline.manifest import DataError, ffcv_entry, split_entry
from data_pipeline.plan import splitmix64
from data_pipeline.transforms import seeded, train_transform

_MASK32 = np.uint64(0xFFFFFFFF)


def _seeded_crop_and_flip(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, seed):
    """torchvision's RandomResizedCrop parameter rule plus a flip bit, from one seed (runs in numba)."""
    np.random.seed(seed)
    area = height * width
    for _ in range(10):
        target_area = area * np.random.uniform(scale_lo, scale_hi)
        aspect = np.exp(np.random.uniform(log_ratio_lo, log_ratio_hi))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = np.random.randint(0, height - h + 1)
            j = np.random.randint(0, width - w + 1)
            return i, j, h, w, np.random.random() < 0.5
    ratio_lo, ratio_hi = np.exp(log_ratio_lo), np.exp(log_ratio_hi)
    in_ratio = width / height
    if in_ratio < ratio_lo:
        w, h = width, int(round(width / ratio_lo))
    elif in_ratio > ratio_hi:
        h, w = height, int(round(height * ratio_hi))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, np.random.random() < 0.5


def _make_decoder(
    output_size,
    *,
    train: bool,
    scale=None,
    ratio=None,
    hflip=False,
    run_seed=0,
    eval_resize=None,
    max_pixels=MAX_IMAGE_PIXELS,
):
    """A decoder that writes uint8 CHW images as our torchvision transforms make them from the decoded image:
    train, the seeded RandomResizedCrop (bicubic, antialiased) + flip; eval, ``Resize(eval_resize)`` (bicubic,
    antialiased) + ``CenterCrop``.  The resize (``data_pipeline.bicubic``) writes the CHW layout and the flip.
    The region decoder refuses a JPEG whose header declares more than ``max_pixels`` pixels."""
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_center_crop
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class SeededCHWCropDecoder(ResizedCropRGBImageDecoder):
        @property
        def get_crop_generator(self):  # required by the base class; generate_code below uses its own
            return _seeded_crop_and_flip if train else get_center_crop

        def declare_state_and_memory(self, previous_state):
            state, (_, temp) = super().declare_state_and_memory(previous_state)
            height, width = self.output_size
            chw = AllocationQuery((3, height, width), np.dtype("<u1"))
            return replace(state, shape=(3, height, width)), (chw, temp)

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            region_c = Compiler.compile(region_decoder_for_numba())
            crop_c = Compiler.compile(_seeded_crop_and_flip)
            mix_c = Compiler.compile(splitmix64)
            is_train = train
            scale_lo, scale_hi = (float(scale[0]), float(scale[1])) if train else (0.0, 0.0)
            log_lo, log_hi = (float(np.log(ratio[0])), float(np.log(ratio[1]))) if train else (0.0, 0.0)
            short_side = int(eval_resize or 0)
            side = int(output_size[0])
            do_flip = hflip
            base = np.uint64(run_seed)
            pixel_bound = np.uint64(max_pixels)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                batch_key = mix_c(base ^ mix_c(np.uint64(batch_indices[0])))
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    flip = False
                    if is_train:
                        seed = mix_c(batch_key ^ np.uint64(source_ix)) & _MASK32
                        i, j, h, w, flip = crop_c(height, width, scale_lo, scale_hi, log_lo, log_hi, seed)
                    else:  # the whole image, resized, then the centre window of that
                        i, j, h, w = 0, 0, height, width
                    if field["mode"] == jpg:
                        scratch = temp_storage[dst_ix].reshape(-1)
                        if region_c(image_data, scratch, i, j, h, w, pixel_bound) == 0:  # the crop's pixels only
                            crop = scratch[: 3 * h * w].reshape(h, w, 3)
                        else:  # a file the region decoder refuses: FFCV's full decode
                            imdecode_c(image_data, scratch, height, width, height, width, 0, 0, 1, 1, False, False)
                            crop = scratch[: 3 * height * width].reshape(height, width, 3)[i : i + h, j : j + w]
                    else:
                        crop = image_data.reshape(height, width, 3)[i : i + h, j : j + w]
                    if is_train:
                        resize_into_chw(crop, side, side, 0, 0, destination[dst_ix], do_flip and flip)
                    else:
                        out_h, out_w = resized_size(height, width, short_side)
                        top, left = centre_offset(out_h, side), centre_offset(out_w, side)
                        resize_into_chw(crop, out_h, out_w, top, left, destination[dst_ix], False)
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededCHWCropDecoder(output_size)


class _ReusedBuffers:
    """Stands in for ``graph.allocate_memory``: FFCV allocates every epoch's decode buffers anew (and pins
    them when CUDA is there), so each epoch first page-faults through ~100 MB; the buffers of an epoch whose
    pipeline thread has ended are handed to the next epoch instead."""

    def __init__(self, graph):
        self.allocate = graph.allocate_memory
        self.free: tuple | None = None
        graph.allocate_memory = self

    def __call__(self, batch_size: int, slots: int):
        free, self.free = self.free, None
        if free is not None and free[0] == (batch_size, slots):
            return free[1]
        return self.allocate(batch_size, slots)

    def release(self, iterator) -> None:
        if not iterator.is_alive():  # else its thread may still write into them
            self.free = ((iterator.loader.batch_size, iterator.loader.batches_ahead + 2), iterator.memory_allocations)


class FFCVBackend:
    def __init__(self, config: DataConfig, split: str, train: bool, seed: int):
        self.config, self.split, self.train, self.seed = config, split, train, seed
        entry = ffcv_entry(config.root, split, verify=config.verify == "start")
        self.path = Path(config.root) / entry["name"]
        if not self.path.is_file():
            raise DataError(f"missing FFCV file {self.path}")
        self._num_samples = int(entry["count"])
        self._skipped_at_prepare = split_entry(config.root, split).get("ffcv_skipped", [])
        self._torch_augment = train_transform(config, crop=False) if train and config.auto_augment != "none" else None
        try:
            self._loader = self._build_loader()
        except Exception as exc:  # FFCV reports a damaged file with assorted low-level errors
            raise DataError(f"cannot read FFCV file {self.path}: {type(exc).__name__}: {exc}") from exc
        if self._loader.reader.num_samples != self._num_samples:
            raise DataError(
                f"{self.path} holds {self._loader.reader.num_samples} samples, the manifest says {self._num_samples}"
            )

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def _build_loader(self):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor

        c = self.config
        size = (c.base_resolution, c.base_resolution)
        if self.train:
            decoder = _make_decoder(
                size,
                train=True,
                scale=c.crop_scale,
                ratio=(3 / 4, 4 / 3),
                hflip=c.hflip,
                run_seed=self.seed,
                max_pixels=c.max_image_pixels,
            )
        else:
            decoder = _make_decoder(size, train=False, eval_resize=c.eval_resize, max_pixels=c.max_image_pixels)
        threads = torch.get_num_threads()
        try:
            loader = Loader(
                str(self.path),
                batch_size=c.batch_size,
                num_workers=ffcv_threads(c.num_workers),
                order=OrderOption.SEQUENTIAL,
                drop_last=False,
                pipelines={
                    "image": [decoder, ToTensor()],
                    "label": [IntDecoder(), ToTensor(), Squeeze(1)],
                },
            )
        finally:  # FFCV sets torch's thread count of the calling thread to its own decode threads
            torch.set_num_threads(threads)
        self._buffers = _ReusedBuffers(loader.graph)
        return loader

    def iterate(self, batches: list[list[tuple[int, int, bool]]], epoch: int) -> Iterator[Batch]:
        from ffcv.loader.epoch_iterator import EpochIterator

        if not batches:
            return
        flat = [item for batch in batches for item in batch]
        order = np.array([i for i, _, _ in flat], dtype=np.uint64)
        valid = torch.tensor([v for _, _, v in flat], dtype=torch.bool)
        seeds = [s for _, s, _ in flat]
        if self._loader.code is None:
            self._loader.generate_code()
        iterator = EpochIterator(self._loader, order)
        pin = torch.cuda.is_available()
        offset, finished = 0, False
        try:
            for images, labels in iterator:
                n = int(labels.shape[0])
                # FFCV reuses its output buffers for later batches: copy (into pinned memory for the
                # transfer to the GPU) before handing them out.
                out = torch.empty(images.shape, dtype=images.dtype, pin_memory=pin)
                out.copy_(images)
                if self._torch_augment is not None:
                    out = torch.stack(
                        [seeded(self._torch_augment, img, seeds[offset + k]) for k, img in enumerate(out)]
                    )
                indices = torch.from_numpy(order[offset : offset + n].astype(np.int64))
                yield Batch(out, labels.long().clone(), valid[offset : offset + n].clone(), indices)
                offset += n
            finished = True
        finally:
            iterator.close()
            if finished:
                iterator.join()  # it has handed over its last batch and is returning
            self._buffers.release(iterator)

    def close(self) -> None:
        """Nothing to end: FFCV's pipeline thread ends with its epoch."""

    def problem_lines(self) -> list[str]:
        return [
            f"{self.path.name}: {s['key']} skipped at prepare time ({s['reason']})" for s in self._skipped_at_prepare
        ]


def ffcv_threads(requested: int) -> int:
    """FFCV decodes in numba threads, and numba refuses more than the CPUs this process may run on (a
    1-core allocation or ``taskset``): ``requested`` capped at that, at least 1."""
    import numba

    return max(1, min(requested, numba.config.NUMBA_NUM_THREADS))
