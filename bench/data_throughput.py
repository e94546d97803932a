"""Decoded + augmented images/s at 224×224: torchvision ImageFolder (baseline) vs our WebDataset and FFCV paths.

    .venv/bin/python bench/data_throughput.py [--images 400] [--workers 2] [--epochs 2]

Images are ImageNet-sized JPEGs (about 500×375) synthesised from the real photographs bundled with
scikit-image (random crops, flips and scales), since nothing can be downloaded.  Every path uses the
same images, the same worker count, RandomResizedCrop(224) + horizontal flip, uint8 output.  Each
figure is the best of the timed epochs after one warm-up epoch; FFCV's per-epoch compilation is
reported separately.  Also prints the cost of the on-device bicubic rescale of a batch relative to a
forward+backward pass of the smallest AlphaNet sub-network.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthesise(root: Path, count: int, seed: int = 0) -> None:
    from PIL import Image
    from skimage import data

    photos = [
        getattr(data, name)()
        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    ]
    photos = [p if p.ndim == 3 else np.stack([p] * 3, -1) for p in photos]
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)][..., :3]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(photo[y : y + ch, x : x + cw])
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.resize((int(rng.integers(440, 560)), int(rng.integers(330, 420))), Image.Resampling.BICUBIC)
        folder = root / "train" / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def time_epochs(make_iter, epochs: int) -> tuple[float, float, int]:
    """(seconds of the first epoch, best seconds of the later ones, images per epoch)."""
    times, count = [], 0
    for _ in range(epochs + 1):
        start, count = time.perf_counter(), 0
        for images, _ in make_iter():
            count += images.shape[0]
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:]), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    from data_pipeline import DataConfig, build_loader
    from data_pipeline.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesise(root / "folder", args.images)
        prepare(
            str(root / "folder"),
            root / "prepared",
            ["webdataset", "ffcv"],
            shard_mb=16,
            max_side=512,
            quality=90,
            quiet=True,
        )

        baseline_tf = v2.Compose(
            [v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()]
        )
        folder = datasets.ImageFolder(str(root / "folder" / "train"), transform=baseline_tf)
        baseline = DataLoader(
            folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
        )
        results = {"torchvision ImageFolder (baseline)": time_epochs(lambda: iter(baseline), args.epochs)}

        for fmt in ("webdataset", "ffcv"):
            cfg = DataConfig(
                format=fmt,
                root=root / "prepared",
                base_resolution=224,
                batch_size=args.batch_size,
                num_workers=args.workers,
                eval_resize=256,
            )
            loader = build_loader(cfg, "train", train=True, seed=0)
            results[f"alphanet-train {fmt}"] = time_epochs(
                lambda loader=loader: ((b.images, b.labels) for b in loader), args.epochs
            )

        base_rate = None
        print(
            f"{args.images} JPEGs of ~500x375, RandomResizedCrop(224)+flip, {args.workers} workers, batch {args.batch_size}"
        )
        for name, (first, best, count) in results.items():
            rate = count / best
            base_rate = base_rate or rate
            print(f"{name:38s} {rate:8.0f} img/s   ratio {rate / base_rate:5.2f}   (first epoch {first:5.1f} s)")

    # Rescale cost vs the smallest sub-network's forward+backward (the work it feeds).
    from data_pipeline import rescale
    from models import ModelConfig, build_supernet

    torch.set_num_threads(2)
    net = build_supernet(ModelConfig(search_space="alphanet")).train()
    arch = net.space.smallest()
    net.set_arch(arch)
    batch = torch.rand(args.batch_size, 3, 224, 224)

    def best_of(fn, repeats=5):
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    t_rescale = best_of(lambda: rescale(batch, arch.resolution))
    t_step = best_of(lambda: net(rescale(batch, arch.resolution)).sum().backward(), repeats=2)
    print(
        f"bicubic rescale 224->{arch.resolution} of a batch of {args.batch_size}: {t_rescale * 1e3:.1f} ms = "
        f"{t_rescale / t_step:.3f} x forward+backward of the smallest sub-network ({t_step * 1e3:.0f} ms), CPU"
    )


if __name__ == "__main__":
    main()
