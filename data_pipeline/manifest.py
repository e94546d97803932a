"""The manifest of a prepared dataset (``manifest.json``): what ``prepare`` wrote and what loaders read.

It lists the splits with their counts per class, the WebDataset shards and the FFCV file of each split
(name, size, sha256, samples) and the options the data was prepared with.  It is written last, so a
folder without it is not a finished dataset.  Every problem reading it is a :class:`DataError` that names
the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fileops import atomic_write_text

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class DataError(RuntimeError):
    """A dataset that cannot be used at all (missing files, empty pattern): raised before any batch."""


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST


def has_manifest(root: Path) -> bool:
    return manifest_path(root).is_file()


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the dataset in ``root``."""
    path = manifest_path(root)
    if not path.is_file():
        raise DataError(f"{path} not found: prepare the dataset first (python -m data_pipeline.prepare --out {root})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}): prepare the dataset again") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path} has no 'splits' mapping: prepare the dataset again")
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    return atomic_write_text(manifest_path(root), json.dumps(manifest, indent=2))


def split_entry(root: Path, split: str) -> dict[str, Any]:
    """The manifest's entry of ``split``."""
    splits = read_manifest(root)["splits"]
    if split not in splits:
        raise DataError(f"split '{split}' not in {manifest_path(root)} (has {sorted(splits)})")
    return splits[split]


def _inside(root: Path, name: object) -> Path:
    """``root / name`` for a plain file name; a path that would leave ``root`` is a DataError."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise DataError(f"{manifest_path(root)} names {name!r}: a file must be named inside {root}")
    return Path(root) / name


def webdataset_shards(root: Path, split: str) -> list[Path]:
    """The WebDataset shard files the manifest lists for ``split``."""
    names = [s.get("name") for s in split_entry(root, split).get("webdataset", {}).get("shards", [])]
    if not names:
        raise DataError(f"{manifest_path(root)} lists no WebDataset shards for split '{split}'")
    return [_inside(root, name) for name in names]


def ffcv_entry(root: Path, split: str) -> dict[str, Any]:
    """``{"name", "size", "sha256", "count"}`` of the FFCV file of ``split``."""
    entry = split_entry(root, split)
    if "ffcv" not in entry:
        raise DataError(f"{manifest_path(root)} has no FFCV file for split '{split}'")
    _inside(root, entry["ffcv"].get("name"))
    return entry["ffcv"]


def listed_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file entry (shards and FFCV files) of every split."""
    files = []
    for split in manifest["splits"].values():
        files += split.get("webdataset", {}).get("shards", [])
        if "ffcv" in split:
            files.append(split["ffcv"])
    return files


def is_complete(root: Path, formats: list[str], options: dict[str, Any]) -> bool:
    """True when ``root`` holds a finished dataset prepared with ``options`` in (at least) ``formats``, every
    listed file present with its size."""
    try:
        manifest = read_manifest(root)
    except DataError:
        return False
    if manifest.get("options") != options or not set(formats) <= set(manifest.get("formats", [])):
        return False
    root = Path(root)
    return all(
        (root / f["name"]).is_file() and (root / f["name"]).stat().st_size == f["size"] for f in listed_files(manifest)
    )
