"""Finding images and captions: image folders (with sidecar or metadata captions) and source dispatch.

Folder layout: images anywhere under the folder (hidden files/folders skipped), with
- a sidecar caption `stem<caption_extension>` (or `name.ext<caption_extension>`), and/or
- HF imagefolder metadata: `metadata.jsonl` / `metadata.csv` in any folder, rows with `file_name`
  (relative to that folder) and the caption column; metadata captions win over sidecars.
Without a caption: default_caption, else the kohya folder name, else the file stem (underscores
as spaces) when caption_from_stem, else "" - and the image is noted in the scan report.

kohya_repeats: only sub-folders named `N_name` are read, each with N repeats (the subset's repeats
are ignored); anything else at the top level is reported as skipped.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .captions import normalise_caption, read_caption_file
from .config import SubsetConfig
from .errors import DataConfigError
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageLoadError, probe_image
from .scan import ImageRecord, ScanReport

MASK_SUFFIX = "-masklabel.png"
"""Sidecar loss masks are named `<image stem>-masklabel.png` (see data/masks.py)."""


def is_mask_file(name: str) -> bool:
    """Whether a file name is a sidecar mask (never used as a training image)."""
    return name.lower().endswith(MASK_SUFFIX)


def sidecar_path(image_path: str) -> str:
    """`photo.jpg` -> `photo-masklabel.png` (same folder)."""
    return os.path.splitext(image_path)[0] + MASK_SUFFIX

log = logging.getLogger(__name__)

_KOHYA_DIR = re.compile(r"^(\d+)_(.*)$")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class ScanOptions:
    """File checks of a scan: pixel-count limit, minimum shorter side, full decode of every image."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_size: int = 1
    verify: bool = False
    threads: int = 0  # 0 = automatic (I/O bound: several per core)

    def pool_size(self) -> int:
        return self.threads or min(32, 4 * (os.cpu_count() or 1))


def source_kind(path: str) -> str:
    """'folder', 'saved' (save_to_disk), 'parquet' or 'hub' for a subset path; DataConfigError if none."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".parquet":
            return "parquet"
        raise DataConfigError(f"path: {path!r} is a file; expected an image folder, a saved dataset folder or a .parquet file")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()):
            return "saved"
        has_parquet = False
        for _dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                ext = os.path.splitext(fn)[1].lower()
                if ext in IMAGE_EXTENSIONS:
                    return "folder"
                has_parquet = has_parquet or ext == ".parquet"
        return "parquet" if has_parquet else "folder"
    from .config import _HUB_ID

    if _HUB_ID.match(path):
        return "hub"
    raise DataConfigError(f"path: {path!r} does not exist (and is not a hub id like 'owner/name')")


# ---- metadata.jsonl / metadata.csv ----------------------------------------------------------------
def caption_value(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # some datasets store several captions: the first non-empty one is used
        return next((v for v in value if isinstance(v, str) and v.strip()), None)
    return None


def read_metadata(folder: str, caption_column: str, report: ScanReport) -> dict[str, str | None]:
    """{absolute image path: caption or None} from the metadata files in `folder` (if any)."""
    out: dict[str, str | None] = {}
    for fname in METADATA_FILES:
        mpath = os.path.join(folder, fname)
        if not os.path.isfile(mpath):
            continue
        try:
            with open(mpath, encoding="utf-8-sig", newline="") as fh:
                if fname.endswith(".jsonl"):
                    rows = []
                    for n, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            rows.append((n, json.loads(line)))
                        except json.JSONDecodeError as exc:
                            report.caption_errors.append((f"{mpath}:{n}", f"invalid JSON line ({exc.msg})"))
                else:
                    rows = list(enumerate(csv.DictReader(fh), 2))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            report.caption_errors.append((mpath, f"metadata file unreadable ({exc})"))
            continue
        for n, row in rows:
            name = row.get("file_name") if isinstance(row, dict) else None
            if not isinstance(name, str) or not name:
                report.caption_errors.append((f"{mpath}:{n}", "row has no file_name"))
                continue
            full = os.path.normpath(os.path.join(folder, name))
            if not os.path.isfile(full):
                report.skip(full, f"listed in {fname} (line {n}) but the file does not exist")
                continue
            out[full] = caption_value(row.get(caption_column))
    return out


# ---- folder scan ----------------------------------------------------------------------------------
def fallback_caption(sub: SubsetConfig, stem: str, folder_caption: str | None) -> tuple[str, str]:
    if sub.default_caption is not None:
        return normalise_caption(sub.default_caption), "used default_caption"
    if folder_caption:
        return folder_caption, "used the folder name"
    if sub.caption_from_stem:
        return normalise_caption(stem.replace("_", " ")), "used the file name"
    return "", "used an empty caption"


def _groups(sub: SubsetConfig, report: ScanReport) -> list[tuple[str, int, str | None]]:
    """(folder, repeats, folder caption) of a subset: the root, or its kohya `N_name` sub-folders."""
    if not sub.kohya_repeats:
        return [(sub.path, sub.repeats, None)]
    groups = []
    for entry in sorted(os.scandir(sub.path), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        m = _KOHYA_DIR.match(entry.name) if entry.is_dir() else None
        if m and int(m.group(1)) > 0:
            groups.append((entry.path, int(m.group(1)), normalise_caption(m.group(2).replace("_", " ")) or None))
        elif entry.is_dir():
            report.skip(entry.path, "folder name is not `N_name` (kohya_repeats: true reads only such folders)")
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and not is_mask_file(entry.name):
            report.skip(entry.path, "image outside any `N_name` folder (kohya_repeats: true)")
    if not groups:
        raise DataConfigError(f"kohya_repeats: {sub.path!r} has no sub-folder named like `10_name`")
    return groups


def scan_folder(sub: SubsetConfig, subset_index: int, opts: ScanOptions, report: ScanReport) -> list[ImageRecord]:
    """Records of every usable image of a folder subset (sorted by path); problems go to `report`."""
    jobs: list[tuple[str, int, str | None, str | None, bool]] = []
    for root, repeats, folder_caption in _groups(sub, report):
        metadata: dict[str, str | None] = {}
        visited = {os.path.realpath(root)}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            # Follow symlinked folders, but each real folder once (a link to a parent would loop).
            keep = []
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if not d.startswith(".") and real not in visited:
                    visited.add(real)
                    keep.append(d)
            dirnames[:] = keep
            if any(f in filenames for f in METADATA_FILES):
                metadata.update(read_metadata(dirpath, sub.caption_column, report))
            for fn in sorted(filenames):
                if fn.startswith(".") or os.path.splitext(fn)[1].lower() not in IMAGE_EXTENSIONS or is_mask_file(fn):
                    continue  # loss masks (`*-masklabel.png`) belong to their image
                path = os.path.join(dirpath, fn)
                key = os.path.normpath(path)
                jobs.append((path, repeats, folder_caption, metadata.get(key), key in metadata))

    def work(job):
        path, repeats, folder_caption, meta_caption, listed = job
        try:
            info = probe_image(path, max_pixels=opts.max_pixels, verify=opts.verify)
        except ImageLoadError as exc:
            return None, exc.reason, None, None
        if min(info.width, info.height) < opts.min_size:
            return None, f"too small: {info.width}x{info.height} (shorter side < min_size {opts.min_size})", None, None
        caption, problem = (normalise_caption(meta_caption), None) if meta_caption else (None, None)
        error = note = None
        if caption is None:
            stem = os.path.splitext(path)[0]
            for candidate in (stem + sub.caption_extension, path + sub.caption_extension):
                caption, problem = read_caption_file(candidate)
                if caption is not None or problem is not None:
                    break
            if problem and problem != "empty caption file":
                error = f"{os.path.basename(candidate)}: {problem}"
            if not caption:
                caption, how = fallback_caption(sub, os.path.basename(stem), folder_caption)
                why = "empty caption file" if problem == "empty caption file" else (
                    "empty caption in metadata" if listed else "no caption file")
                note = f"{why}; {how}"
        rec = ImageRecord(name=path, path=path, row=None, subset=subset_index, repeats=repeats,
                          width=info.width, height=info.height, caption=caption)
        return rec, None, error, note

    records = []
    with ThreadPoolExecutor(opts.pool_size()) as pool:
        for job, (rec, skip, error, note) in zip(jobs, pool.map(work, jobs)):
            if skip is not None:
                report.skip(job[0], skip)
                continue
            if error:
                report.caption_errors.append((job[0], error))
            if note:
                report.caption_notes.append((job[0], note))
            records.append(rec)
    return records
