"""The manifest of a prepared dataset (``manifest.json``): what ``prepare`` wrote and what loaders read.

It lists the splits with their counts per class, the WebDataset shards and the FFCV file of each split
(name, size, sha256, samples) and the options the data was prepared with.  It is written last, so a
folder without it is not a finished dataset.  Every problem reading it is a :class:`DataError` that names
the file.
"""

from __future__ import annotations

import hashlib
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checked_file(root: Path, entry: dict[str, Any], *, verify: bool = False) -> Path:
    """The file a manifest ``entry`` names, after checking that it exists with the listed size (and, with
    ``verify``, the listed sha256): a file that changed after ``prepare`` wrote the manifest (an interrupted
    re-run, a copy cut short) is a DataError, never a silently smaller dataset."""
    path = _inside(root, entry.get("name"))
    if not path.is_file():
        raise DataError(f"missing data file {path} (listed in {manifest_path(root)})")
    size, listed = path.stat().st_size, entry.get("size")
    if listed is not None and size != listed:
        raise DataError(
            f"{path} has {size} bytes but {manifest_path(root)} lists {listed}: the data changed after it was "
            "prepared (an interrupted prepare or copy?); prepare it again"
        )
    if verify and entry.get("sha256") and sha256_of(path) != entry["sha256"]:
        raise DataError(f"{path} does not match the sha256 in {manifest_path(root)}: prepare the dataset again")
    return path


def webdataset_shards(root: Path, split: str, *, verify: bool = False) -> list[Path]:
    """The WebDataset shard files the manifest lists for ``split``, each checked by :func:`checked_file`."""
    entries = split_entry(root, split).get("webdataset", {}).get("shards", [])
    if not entries:
        raise DataError(f"{manifest_path(root)} lists no WebDataset shards for split '{split}'")
    return [checked_file(root, entry, verify=verify) for entry in entries]


def ffcv_entry(root: Path, split: str, *, verify: bool = False) -> dict[str, Any]:
    """``{"name", "size", "sha256", "count"}`` of the FFCV file of ``split``, checked by :func:`checked_file`."""
    entry = split_entry(root, split)
    if "ffcv" not in entry:
        raise DataError(f"{manifest_path(root)} has no FFCV file for split '{split}'")
    checked_file(root, entry["ffcv"], verify=verify)
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
