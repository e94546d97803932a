"""Decoded + augmented images/s at 224×224: torchvision ImageFolder (baseline) vs our WebDataset and FFCV paths.

    .venv/bin/python -m bench.data_throughput [--images 400] [--workers 2] [--batch-size 32] [--rounds 4]

Images are ImageNet-sized JPEGs (about 500×375) synthesised from the real photographs bundled with
scikit-image (random crops, flips and scales), since nothing can be downloaded.  Every path uses the
same images, the same worker count and batch size, RandomResizedCrop(224) + horizontal flip, uint8 output.

Two baselines, both torchvision ``ImageFolder`` + ``DataLoader`` (shuffled, last partial batch dropped,
batches pinned when there is a GPU): PyTorch's default, which starts its worker processes at every epoch,
and the same with ``persistent_workers=True``, which keeps them as our WebDataset loader does.  With
epochs as short as the default 400 images (12 batches, under a second), starting workers is a good part
of an epoch; ``--images 2000`` measures closer to the steady state of a long epoch.

Both our paths draw the crop from the image size in the JPEG header (or the .beton's metadata) and decode
only the crop's pixels (``data_pipeline.jpeg_region``); the baseline decodes every image whole.

Our FFCV path is measured twice: on a ``.beton`` of JPEGs (the default of ``prepare``) and on one of raw
pixels (``prepare --ffcv-images raw``), which skips the decode at the price of disk space (printed).

After a warm-up epoch of every loader (reported as "first epoch"; FFCV compiles its pipeline in it),
``--rounds`` rounds each time one epoch of every loader, one loader after the other, so that a change in
the load of a shared machine hits all of them alike; a figure is the best of its rounds.  Then the CPU
time per image on one thread of each path's decode + crop/resize + flip and of its decode alone (no
workers, no batching; the paths take turns too), and the bound that puts on a loader with ``--workers``
cores: once the workers' start is paid, the ratios cannot exceed the ratios of these costs.  Last, the
cost of the on-device bicubic rescale of a batch relative to a forward+backward pass of the smallest
AlphaNet sub-network.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import argument_parser


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


def epoch_seconds(make_iter) -> tuple[float, int]:
    start, count = time.perf_counter(), 0
    for images, _ in make_iter():
        count += images.shape[0]
    return time.perf_counter() - start, count


def interleaved(loaders: dict, rounds: int) -> dict[str, tuple[float, float, int]]:
    """name → (seconds of the first epoch, best seconds of the ``rounds`` later ones, images per epoch)."""
    first = {name: epoch_seconds(make_iter) for name, make_iter in loaders.items()}
    best = {name: float("inf") for name in loaders}
    for _ in range(rounds):
        for name, make_iter in loaders.items():
            best[name] = min(best[name], epoch_seconds(make_iter)[0])
    return {name: (first[name][0], best[name], first[name][1]) for name in loaders}


def per_image_ms(paths: dict, items, repeats: int = 5) -> dict[str, float]:
    """name → best over ``repeats`` of the mean CPU milliseconds of ``paths[name](item)`` over ``items``, on
    this thread; the paths take turns, as the loaders do."""
    for fn in paths.values():
        for item in items[:2]:
            fn(item)
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.thread_time()
            for item in items:
                fn(item)
            best[name] = min(best[name], (time.thread_time() - start) / len(items))
    return {name: seconds * 1e3 for name, seconds in best.items()}


def single_thread_costs(folder, refs, beton: Path, count: int) -> dict[str, float]:
    """ms per image on one thread of each path's decode + crop/resize + flip, as its workers run it, and of
    its decode alone (``name + " decode"``)."""
    from ffcv.reader import Reader
    from numba import njit

    from data_pipeline import DataConfig
    from data_pipeline.bicubic import resize_into_chw
    from data_pipeline.config import MAX_IMAGE_PIXELS
    from data_pipeline.ffcv_backend import _seeded_crop_and_flip
    from data_pipeline.jpeg_region import decode_region, decode_region_into, image_size
    from data_pipeline.shards import read_bytes
    from data_pipeline.transforms import _seed_cpu_rngs, train_decode_transform

    picks = list(range(0, len(folder), max(1, len(folder) // count)))[:count]

    transform = train_decode_transform(DataConfig(base_resolution=224, eval_resize=256))
    spans = {i: torch.frombuffer(bytearray(read_bytes(refs[i].shard, refs[i].image)), dtype=torch.uint8) for i in picks}
    crops = {}  # each sample's crop, as its seeded transform draws it: what "decode" decodes
    for i in picks:
        _seed_cpu_rngs(i)
        params = transform.transforms[0].draw(image_size(spans[i]))
        crops[i] = (params["top"], params["left"], params["height"], params["width"])

    def ours(i):
        _seed_cpu_rngs(i)  # what a worker does per sample (seeded), then decode the crop, resize, flip
        return transform(spans[i])

    reader = Reader(str(beton))
    fields = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    table = reader.alloc_table
    raw = np.fromfile(beton, dtype=np.uint8)
    jpegs = {}  # looked up before timing: FFCV's pipeline has each sample's pointer and size at hand
    for i in picks:
        pointer = int(fields[i]["data_ptr"])
        size = int(table["size"][table["ptr"] == pointer][0])
        jpegs[i] = (int(fields[i]["height"]), int(fields[i]["width"]), raw[pointer : pointer + size])
    crop, region_into = njit(_seeded_crop_and_flip), njit(decode_region_into)
    scratch, out = np.empty(512 * 512 * 3, np.uint8), np.empty((3, 224, 224), np.uint8)
    ffcv_crops = {}
    for i in picks:
        height, width, _ = jpegs[i]
        ffcv_crops[i] = crop(height, width, 0.08, 1.0, np.log(3 / 4), np.log(4 / 3), i)

    def region(i, y, x, h, w):  # the crop's pixels, as the pipeline decodes them
        region_into(jpegs[i][2], scratch, y, x, h, w, MAX_IMAGE_PIXELS)
        return scratch[: h * w * 3].reshape(h, w, 3)

    def ffcv_decode(i):
        return region(i, *ffcv_crops[i][:4])

    def ffcv(i):
        height, width, _ = jpegs[i]
        y, x, h, w, flip = crop(height, width, 0.08, 1.0, np.log(3 / 4), np.log(4 / 3), i)
        resize_into_chw(region(i, y, x, h, w), 224, 224, 0, 0, out, flip)

    paths = {
        "torchvision ImageFolder": folder.__getitem__,
        "alphanet-train webdataset": ours,
        "alphanet-train ffcv": ffcv,
        "torchvision ImageFolder decode": lambda i: folder.loader(folder.samples[i][0]),
        "alphanet-train webdataset decode": lambda i: decode_region(spans[i], *crops[i]),
        "alphanet-train ffcv decode": ffcv_decode,
    }
    return per_image_ms(paths, picks)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="timed epochs of each loader, after the warm-up one")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    from data_pipeline import DataConfig, build_loader
    from data_pipeline.prepare import prepare
    from data_pipeline.shards import index_shards, split_shards

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
        prepare(  # the same images as raw pixels: no decode when read, several times the disk
            str(root / "folder"),
            root / "prepared_raw",
            ["ffcv"],
            max_side=512,
            quality=90,
            quiet=True,
            ffcv_images="raw",
        )

        baseline_tf = v2.Compose(
            [v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()]
        )
        folder = datasets.ImageFolder(str(root / "folder" / "train"), transform=baseline_tf)
        loaders = {}
        for name, persistent in (("(baseline)", False), ("+ persistent_workers", True)):
            baseline = DataLoader(
                folder,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=args.workers,
                drop_last=True,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=persistent and args.workers > 0,
            )
            loaders[f"torchvision ImageFolder {name}"] = lambda baseline=baseline: iter(baseline)
        ours = {}
        for fmt, prepared, label in (
            ("webdataset", "prepared", "webdataset"),
            ("ffcv", "prepared", "ffcv"),
            ("ffcv", "prepared_raw", "ffcv, raw pixels"),
        ):
            cfg = DataConfig(
                format=fmt,
                root=root / prepared,
                base_resolution=224,
                batch_size=args.batch_size,
                num_workers=args.workers,
                eval_resize=256,
            )
            ours[label] = build_loader(cfg, "train", train=True, seed=0)
            loaders[f"alphanet-train {label}"] = lambda loader=ours[label]: ((b.images, b.labels) for b in loader)
        results = interleaved(loaders, args.rounds)
        for loader in ours.values():
            loader.close()

        refs, _ = index_shards(split_shards(root / "prepared", "train"))
        costs = single_thread_costs(folder, refs, root / "prepared" / "train.beton", min(100, args.images))
        sizes = {
            "JPEG files": sum(p.stat().st_size for p in (root / "folder" / "train").rglob("*.jpg")),
            "webdataset shards": sum(p.stat().st_size for p in (root / "prepared").glob("train-*.tar")),
            "ffcv .beton": (root / "prepared" / "train.beton").stat().st_size,
            "ffcv .beton, raw pixels": (root / "prepared_raw" / "train.beton").stat().st_size,
        }

    print(
        f"{args.images} JPEGs of ~500x375, RandomResizedCrop(224)+flip, {args.workers} workers, batch "
        f"{args.batch_size}; epochs of {args.images // args.batch_size} batches, best of {args.rounds} "
        "interleaved rounds"
    )
    rates = {name: count / best for name, (_, best, count) in results.items()}
    plain, kept = list(rates.values())[:2]
    print(f"{'':44s} {'img/s':>6s}   {'ratio':>5s}   {'vs persistent':>13s}")
    for name, (first, _, _) in results.items():
        rate = rates[name]
        print(f"{name:44s} {rate:6.0f}   {rate / plain:5.2f}   {rate / kept:13.2f}   (first epoch {first:5.1f} s)")
    print("disk: " + ", ".join(f"{name} {size / 2**20:.0f} MB" for name, size in sizes.items()))
    print(
        f"per image on one thread: decode + crop/resize + flip (of which decode; ours decode only the crop); "
        f"bound with {args.workers} cores"
    )
    for name in rates:
        name = name.removesuffix(" (baseline)").removesuffix(" + persistent_workers")
        if name in costs:
            ms = costs.pop(name)
            print(
                f"  {name:42s} {ms:5.2f} ms ({costs[name + ' decode']:4.2f})  <= {args.workers * 1e3 / ms:5.0f} img/s"
            )

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
