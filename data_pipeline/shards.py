"""Locating a prepared dataset and indexing WebDataset tar shards for random access.

A shard is indexed once by walking its tar headers (no image is decoded): each sample key maps to
the byte ranges of its members.  Problems are recorded, not raised: a member without a label is
dropped, and a truncated tar keeps the samples that are complete before the truncation.
"""

from __future__ import annotations

import glob
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.manifest import DataError, has_manifest, webdataset_shards


@dataclass(frozen=True, slots=True)
class SampleRef:
    shard: str
    key: str
    image: tuple[int, int]
    """(offset, size) of the image bytes in the shard."""
    label: int


@dataclass(slots=True)
class ShardProblems:
    """What indexing found wrong, reported in every epoch summary."""

    missing_label: list[tuple[str, str]] = field(default_factory=list)
    missing_image: list[tuple[str, str]] = field(default_factory=list)
    truncated: list[tuple[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{shard}: truncated ({why}); later samples lost" for shard, why in self.truncated]
        out += [f"{shard}/{key}: no label (.cls), skipped" for shard, key in self.missing_label]
        out += [f"{shard}/{key}: no image (.jpg), skipped" for shard, key in self.missing_image]
        return out


def prepare_hint(root: Path) -> str:
    """The next step when ``root`` is not a prepared dataset."""
    if not root.exists():
        return f"{root} does not exist; prepare a dataset there with python -m data_pipeline.prepare"
    looks_like_images = root.is_dir() and any(p.is_dir() for p in root.iterdir())
    what = "it looks like an ImageFolder tree (class folders): " if looks_like_images else ""
    return (
        f"{what}data.root must be a prepared dataset; make one with "
        f"python -m data_pipeline.prepare --source {root} --out data/{root.name or 'mydata'}"
    )


def split_shards(root: Path, split: str, *, verify: bool = False) -> list[Path]:
    """The shard files of ``split``: from the manifest when there is one (sizes checked, sha256 too with
    ``verify``), else a glob pattern."""
    root = Path(root)
    if has_manifest(root):
        paths = webdataset_shards(root, split, verify=verify)
    else:
        pattern = str(root / f"{split}-*.tar") if root.is_dir() else str(root)
        paths = [Path(p) for p in sorted(glob.glob(pattern))]
        if not paths:
            raise DataError(f"no shards match {pattern}: {prepare_hint(root)}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"missing shard file(s): {', '.join(missing)}")
    return paths


def index_shard(path: Path, problems: ShardProblems) -> list[SampleRef]:
    """Samples of one shard in file order; members grouped by key (basename up to the first dot)."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"member {info.name} ends past the end of the file")
                base = info.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext.lower()] = (info.offset_data, info.size)
    except (tarfile.ReadError, EOFError, OSError) as exc:
        problems.truncated.append((path.name, str(exc) or type(exc).__name__))
    samples = []
    with path.open("rb") as f:  # one handle for every label of the shard
        for key in order:
            parts = members[key]
            image = parts.get("jpg") or parts.get("jpeg")
            if image is None:
                problems.missing_image.append((path.name, key))
                continue
            if "cls" not in parts:
                problems.missing_label.append((path.name, key))
                continue
            offset, length = parts["cls"]
            f.seek(offset)
            try:
                label = int(f.read(length).decode().strip())
            except ValueError:
                problems.missing_label.append((path.name, key))
                continue
            samples.append(SampleRef(shard=str(path), key=key, image=image, label=label))
    return samples


def index_shards(paths: list[Path]) -> tuple[list[SampleRef], ShardProblems]:
    problems = ShardProblems()
    samples = [s for p in paths for s in index_shard(p, problems)]
    if not samples:
        raise DataError(f"no usable samples in {len(paths)} shard(s): " + "; ".join(problems.lines()[:5]))
    return samples, problems


def read_bytes(shard: str, span: tuple[int, int]) -> bytes:
    offset, length = span
    with open(shard, "rb") as f:
        f.seek(offset)
        return f.read(length)
