"""FFCV ``.beton`` files: JPEG decode + crop + resize in FFCV's compiled, multi-threaded pipeline.

FFCV's own RandomResizedCrop and flip draw from unseeded per-thread generators, so their output
depends on thread scheduling and cannot be resumed exactly.  :class:`SeededRandomResizedCropDecoder`
draws each sample's crop and flip from a generator seeded by the run seed, the sample index and the
batch it belongs to (its first sample index).  Batches are a pure function of (seed, epoch, rank,
position), so augmentation is reproducible on resume and still changes from epoch to epoch; and the
pipeline is compiled once per loader, not once per epoch.

One FFCV ``Loader`` is built per split and compiled once; each epoch (or resume) runs FFCV's epoch
iterator over this rank's remaining indices, in order.  This uses ``ffcv.loader.epoch_iterator``
directly (pinned ffcv 1.0.2), because ``Loader.__iter__`` cannot start mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data_pipeline.batch import Batch
from data_pipeline.config import DataConfig
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


def _make_decoder(output_size, scale, ratio, hflip: bool, run_seed: int):
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
        @property
        def get_crop_generator(self):  # required by the base class; generate_code below uses its own
            return _seeded_crop_and_flip

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            crop_c = Compiler.compile(_seeded_crop_and_flip)
            mix_c = Compiler.compile(splitmix64)
            scale_lo, scale_hi = float(scale[0]), float(scale[1])
            log_lo, log_hi = float(np.log(ratio[0])), float(np.log(ratio[1]))
            do_flip = hflip
            base = np.uint64(run_seed)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                batch_key = mix_c(base ^ mix_c(np.uint64(batch_indices[0])))
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp = temp_storage[dst_ix]
                        imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp = temp.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        temp = image_data.reshape(height, width, 3)
                    seed = mix_c(batch_key ^ np.uint64(source_ix)) & _MASK32
                    i, j, h, w, flip = crop_c(height, width, scale_lo, scale_hi, log_lo, log_hi, seed)
                    resize_crop_c(temp, i, i + h, j, j + w, destination[dst_ix])
                    if do_flip and flip:
                        destination[dst_ix] = destination[dst_ix][:, ::-1].copy()
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededRandomResizedCropDecoder(output_size)


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
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

        c = self.config
        size = (c.base_resolution, c.base_resolution)
        if self.train:
            decoder = _make_decoder(size, c.crop_scale, (3 / 4, 4 / 3), c.hflip, self.seed)
        else:
            decoder = CenterCropRGBImageDecoder(size, ratio=c.base_resolution / c.eval_resize)
        return Loader(
            str(self.path),
            batch_size=c.batch_size,
            num_workers=ffcv_threads(c.num_workers),
            order=OrderOption.SEQUENTIAL,
            drop_last=False,
            pipelines={
                "image": [decoder, ToTensor(), ToTorchImage(channels_last=False)],
                "label": [IntDecoder(), ToTensor(), Squeeze(1)],
            },
        )

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
        offset = 0
        try:
            for images, labels in iterator:
                n = int(labels.shape[0])
                # FFCV reuses its output buffers for later batches: copy before handing them out.
                images = images.contiguous().clone()
                if self._torch_augment is not None:
                    images = torch.stack(
                        [seeded(self._torch_augment, img, seeds[offset + k]) for k, img in enumerate(images)]
                    )
                indices = torch.from_numpy(order[offset : offset + n].astype(np.int64))
                yield Batch(images, labels.long().clone(), valid[offset : offset + n].clone(), indices)
                offset += n
        finally:
            iterator.close()

    def problem_lines(self) -> list[str]:
        return [
            f"{self.path.name}: {s['key']} skipped at prepare time ({s['reason']})" for s in self._skipped_at_prepare
        ]


def ffcv_threads(requested: int) -> int:
    """FFCV decodes in numba threads, and numba refuses more than the CPUs this process may run on (a
    1-core allocation or ``taskset``): ``requested`` capped at that, at least 1."""
    import numba

    return max(1, min(requested, numba.config.NUMBA_NUM_THREADS))
