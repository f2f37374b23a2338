"""Hugging Face `datasets` sources: save_to_disk folders, parquet files and hub ids.

Images may be an `Image` feature (stored bytes and/or paths), raw bytes or file-path strings; they
are read undecoded (`Image(decode=False)`) so the scan only parses headers and each worker decodes
with the same robust loader as image folders. `datasets` is imported only when such a source is used.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .captions import normalise_caption
from .config import SubsetConfig
from .errors import DataConfigError
from .images import ImageLoadError, probe_image, read_bytes
from .scan import ImageRecord, ScanReport
from .sources import ScanOptions, caption_value, fallback_caption

log = logging.getLogger(__name__)

# Caption columns tried, in order, when the configured one is the default and does not exist.
_CAPTION_GUESSES = ("text", "caption", "prompt", "captions", "description")


class HFTable:
    """Image/caption access to the rows of a `datasets.Dataset` (picklable for DataLoader workers).

    label: the subset path (for messages); base_dir: folder relative image paths are resolved in.
    """

    def __init__(self, ds, image_column: str, caption_column: str | None, label: str, base_dir: str | None):
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.label, self.base_dir = label, base_dir

    def __len__(self) -> int:
        return len(self.ds)

    def name(self, row: int) -> str:
        return f"{self.label}[{row}]"

    def _bytes_of(self, value) -> tuple[bytes, str | None]:
        path = None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data:
                return bytes(data), path
        elif isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value), None
        elif isinstance(value, str):
            path = value
        if not path:
            raise ImageLoadError("row has no image data")
        if not os.path.isabs(path) and self.base_dir and not os.path.exists(path):
            path = os.path.join(self.base_dir, path)
        return read_bytes(path), path

    def image_bytes(self, row: int) -> bytes:
        """Encoded image bytes of `row`; ImageLoadError when missing/unreadable."""
        return self._bytes_of(self.ds[row][self.image_column])[0]


def _load(sub: SubsetConfig, kind: str, cache_dir: str | None):
    import datasets

    path = sub.path
    if kind == "saved":
        obj = datasets.load_from_disk(path)
    elif kind == "parquet":
        p = Path(path)
        files = [str(p)] if p.is_file() else sorted(str(f) for f in p.rglob("*.parquet"))
        obj = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
    else:
        hub_id = path.removeprefix("hf://datasets/")
        try:
            obj = datasets.load_dataset(hub_id, split=sub.split, cache_dir=cache_dir)
        except Exception as exc:  # offline, unknown id, gated ...: say which source failed
            raise DataConfigError(f"path: cannot load hub dataset {hub_id!r} (split {sub.split!r}): {exc}") from exc
    if isinstance(obj, datasets.DatasetDict):
        if sub.split not in obj:
            raise DataConfigError(f"split: {path!r} has splits {sorted(obj)}, not {sub.split!r}; set data.split")
        obj = obj[sub.split]
    return obj


def _pick_column(ds, wanted: str, default: str, guesses, what: str, path: str) -> str | None:
    cols = list(ds.column_names)
    if wanted in cols:
        return wanted
    if wanted == default:
        for guess in guesses:
            if guess in cols:
                log.info("%s: using column %r for %s (no %r column)", path, guess, what, wanted)
                return guess
    return None


def open_table(sub: SubsetConfig, kind: str, cache_dir: str | None = None) -> HFTable:
    """HFTable of a saved dataset / parquet / hub subset; DataConfigError naming missing columns."""
    import datasets

    ds = _load(sub, kind, cache_dir)
    image_features = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    img_col = _pick_column(ds, sub.image_column, "image", image_features, "images", sub.path)
    if img_col is None:
        raise DataConfigError(f"image_column: {sub.image_column!r} is not a column of {sub.path!r} "
                              f"(columns: {', '.join(ds.column_names)}); set data.image_column")
    cap_col = _pick_column(ds, sub.caption_column, "text", _CAPTION_GUESSES, "captions", sub.path)
    if cap_col is None and sub.default_caption is None:
        raise DataConfigError(f"caption_column: {sub.caption_column!r} is not a column of {sub.path!r} "
                              f"(columns: {', '.join(ds.column_names)}); set data.caption_column, or "
                              "data.default_caption to train every image on one caption")
    if isinstance(ds.features[img_col], datasets.Image):
        ds = ds.cast_column(img_col, datasets.Image(decode=False))
    ds = ds.select_columns([c for c in (img_col, cap_col) if c])
    base = sub.path if os.path.isdir(sub.path) else (os.path.dirname(sub.path) or None)
    return HFTable(ds, img_col, cap_col, sub.path, base)


def scan_table(table: HFTable, sub: SubsetConfig, subset_index: int, opts: ScanOptions,
               report: ScanReport) -> list[ImageRecord]:
    """Records of every usable row (header-probed in a thread pool); problems go to `report`."""
    def work(item):
        row, value, raw_caption = item
        try:
            data, path = table._bytes_of(value)
            info = probe_image(data, max_pixels=opts.max_pixels, verify=opts.verify)
        except ImageLoadError as exc:
            return None, exc.reason, None
        if min(info.width, info.height) < opts.min_size:
            return None, f"too small: {info.width}x{info.height} (shorter side < min_size {opts.min_size})", None
        caption = normalise_caption(caption_value(raw_caption) or "")
        note = None
        if not caption:
            stem = os.path.splitext(os.path.basename(path))[0] if path else ""
            caption, how = fallback_caption(sub, stem, None) if (stem or sub.default_caption is not None) else ("", "used an empty caption")
            note = ("no caption column" if table.caption_column is None else "empty caption") + f"; {how}"
        rec = ImageRecord(name=table.name(row), path=None, row=row, subset=subset_index, repeats=sub.repeats,
                          width=info.width, height=info.height, caption=caption)
        return rec, None, note

    records: list[ImageRecord] = []
    row = 0
    with ThreadPoolExecutor(opts.pool_size()) as pool:
        for batch in table.ds.iter(batch_size=256):
            images = batch[table.image_column]
            captions = batch[table.caption_column] if table.caption_column else [None] * len(images)
            items = [(row + i, v, c) for i, (v, c) in enumerate(zip(images, captions))]
            row += len(items)
            for (r, _, _), (rec, skip, note) in zip(items, pool.map(work, items)):
                if skip is not None:
                    report.skip(table.name(r), skip)
                    continue
                if note:
                    report.caption_notes.append((table.name(r), note))
                records.append(rec)
    return records
