"""The training dataset: scanned records + buckets + per-sample transforms and caption processing.

`build_dataset(config)` scans every subset, logs one summary of skipped files and caption
problems (raising DataScanError in strict mode), assigns buckets and returns an
`ImageCaptionDataset`. Samples are addressed by (index, epoch) keys (what `BucketBatchSampler`
yields): flips, random crops and caption variants come from generators seeded by
(seed, epoch, index), so a sample is the same in any worker, after a resume, on any machine.

A sample (dict):
    pixels          float32 (3, H, W) in [-1, 1]            (unless latents are cached)
    latent_mean     float32 (C, H/8, W/8), latent_std same  (with a latent cache)
    context         float32 (T, D), pooled (P,) or None     (with a text cache)
    caption         processed caption (str)
    original_size   (h, w) of the source image after EXIF orientation
    crop_top_left   (top, left) in the resized (and flipped) image
    target_size     (h, w) of the bucket
    index, name     dataset index and image path/row label
    is_reg          whether the image is a regularization image (`SubsetConfig.is_reg`)
    mask            float32 loss mask in [0, 1] (with masks on, see data/masks.py): (1, H, W) from
                    pixels, (1, H/8, W/8) from the latent cache
    failed          [(record, reason)] of images a DataLoader worker had to replace (only then)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch.utils.data

from .buckets import Bucket, assign_bucket, format_bucket_table
from .captions import CaptionProcessor, CaptionSettings
from .config import DataConfig, SubsetConfig
from .errors import CacheError, DataError
from .images import ImageLoadError, content_hash, load_image, read_bytes
from .masks import (
    MaskSettings,
    check_not_empty,
    full_mask,
    read_sidecar,
    render_mask,
    sidecar_path,
)
from .scan import ImageRecord, ScanReport
from .sources import ScanOptions
from .subsets import scan_subset
from .transforms import CropPlan, plan_crop, render, to_tensor

log = logging.getLogger(__name__)

# Sub-streams of the per-sample generator, so e.g. enabling flips does not change the crops.
_FLIP, _CROP, _CAPTION = 1, 2, 3
_MAX_SUBSTITUTES = 16


@dataclass(frozen=True)
class SamplePlan:
    """Everything about a sample that is decided before decoding: record, geometry, caption."""

    record: int
    crop: CropPlan
    caption: str


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Map-style dataset of scanned image records (see module docstring for the sample layout).

    records: usable images; subsets: resolved SubsetConfigs (record.subset indexes them); tables:
    per subset the HFTable rows refer to, or None; seed: base of all per-sample randomness;
    masks: read loss masks (None = no masks). Length = sum of repeats; index i is repeat k of
    record index_map[i].
    """

    def __init__(self, records: list[ImageRecord], subsets: list[SubsetConfig], tables: list, *,
                 config: DataConfig, seed: int = 0, report: ScanReport | None = None,
                 masks: MaskSettings | None = None):
        # SeedSequence needs non-negative entries: negative seeds wrap around (still distinct).
        self.config, self.subsets, self.tables, self.seed = config, subsets, tables, int(seed) % 2**64
        self.masks = masks
        self.held_out: ImageCaptionDataset | None = None  # see build_dataset(holdout=...)
        self.report = report if report is not None else ScanReport()
        self.background = tuple(config.background)
        self.processors = [CaptionProcessor(CaptionSettings(
            shuffle_tags=s.shuffle_tags, keep_tokens=s.keep_tokens, tag_separator=s.tag_separator,
            tag_dropout=s.tag_dropout, caption_dropout=s.caption_dropout, caption_prefix=s.caption_prefix))
            for s in subsets]
        kept, buckets = [], []
        for rec in records:
            sub = subsets[rec.subset]
            b = assign_bucket(rec.width, rec.height, resolution=sub.resolution, min_side=config.bucket_min_side,
                              max_side=config.bucket_max_side, step=config.bucket_step,
                              no_upscale=config.bucket_no_upscale, enable=config.enable_buckets)
            if b is None:
                self.report.skip(rec.name, f"too small for a {config.bucket_step}px bucket without upscaling "
                                           f"({rec.width}x{rec.height}, bucket_no_upscale)")
                continue
            kept.append(rec)
            buckets.append(b)
        self.records = kept
        self.bucket_sizes: list[Bucket] = sorted(set(buckets), key=lambda b: (b[0] / b[1], b))
        bucket_id = {b: i for i, b in enumerate(self.bucket_sizes)}
        self.record_bucket = np.asarray([bucket_id[b] for b in buckets], dtype=np.int64)
        repeats = np.asarray([r.repeats for r in kept], dtype=np.int64)
        self.index_map = np.repeat(np.arange(len(kept), dtype=np.int64), repeats)
        self._members = [np.flatnonzero(self.record_bucket == i) for i in range(len(self.bucket_sizes))]
        self._latent_cache = None
        self._latent_keys: list[str | None] | None = None
        self._text_cache = None
        self._failed: set[int] = set()
        self._worker_failures: list[tuple[int, str]] = []

    # -- sizes and buckets --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index_map)

    @property
    def buckets(self) -> np.ndarray:
        """Bucket id of every dataset index (input of BucketBatchSampler)."""
        return self.record_bucket[self.index_map]

    @property
    def regularization(self) -> np.ndarray | None:
        """Whether each dataset index is a regularization image, or None when there are none."""
        if not hasattr(self, "_regularization"):
            flags = np.asarray([self.subsets[r.subset].is_reg for r in self.records], dtype=bool)
            self._regularization = flags[self.index_map] if flags.any() else None
        return self._regularization

    def count_images(self, regularization: bool = False) -> int:
        """Training (or regularization) images, without repeats."""
        return sum(self.subsets[r.subset].is_reg == regularization for r in self.records)

    def bucket_of(self, index: int) -> Bucket:
        """(width, height) of the bucket of dataset index `index`."""
        return self.bucket_sizes[self.record_bucket[self.index_map[index]]]

    def bucket_counts(self) -> dict[Bucket, int]:
        """Samples per bucket (repeats included)."""
        counts = np.bincount(self.buckets, minlength=len(self.bucket_sizes))
        return {b: int(n) for b, n in zip(self.bucket_sizes, counts) if n}

    def bucket_table(self, batch_size: int | None = None) -> str:
        return format_bucket_table(self.bucket_counts(), batch_size)

    # -- planning ----------------------------------------------------------------------------------
    def _rng(self, index: int, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index, stream])

    def plan(self, index: int, epoch: int = 0, record: int | None = None) -> SamplePlan:
        """Geometry and caption of sample `index` in `epoch` (for `record`, default its own)."""
        rid = int(self.index_map[index]) if record is None else record
        rec = self.records[rid]
        sub = self.subsets[rec.subset]
        flip = bool(sub.flip) and self._rng(index, epoch, _FLIP).random() < 0.5
        rng = self._rng(index, epoch, _CROP) if sub.random_crop else None
        crop = plan_crop((rec.width, rec.height), self.bucket_sizes[self.record_bucket[rid]],
                         random_crop=bool(sub.random_crop), flip=flip, rng=rng)
        proc = self.processors[rec.subset]
        caption = (proc(rec.caption, self._rng(index, epoch, _CAPTION)) if proc.is_random_for(rec.caption)
                   else proc.base(rec.caption))
        return SamplePlan(record=rid, crop=crop, caption=caption)

    def cache_plan(self, record: int) -> CropPlan:
        """Center-crop, unflipped geometry of `record` (what the latent cache encodes)."""
        rec = self.records[record]
        return plan_crop((rec.width, rec.height), self.bucket_sizes[self.record_bucket[record]])

    # -- reading -----------------------------------------------------------------------------------
    def read_bytes(self, record: int) -> bytes:
        """Encoded bytes of `record`'s image (ImageLoadError if unreadable)."""
        rec = self.records[record]
        if rec.path is not None:
            return read_bytes(rec.path)
        return self.tables[rec.subset].image_bytes(rec.row)

    def load_pixels(self, record: int, crop: CropPlan) -> torch.Tensor:
        """float32 (3, H, W) in [-1, 1] of `record` rendered with `crop` (ImageLoadError if broken)."""
        return self.load_pixels_and_mask(record, crop)[0]

    def load_pixels_and_mask(self, record: int, crop: CropPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels (see `load_pixels`) and, with masks on, the loss mask float32 (1, H, W) cut out
        exactly like them (all ones for an image without a mask); MaskError for a bad mask."""
        rec = self.records[record]
        source = rec.path if rec.path is not None else self.tables[rec.subset].image_bytes(rec.row)
        alpha = self.masks is not None and self.masks.source == "alpha"
        img = load_image(source, background=self.background, max_pixels=self.config.max_pixels,
                         min_decode_size=crop.resized, with_alpha=alpha)
        img, mask = img if alpha else (img, None)
        if (img.width > rec.width or img.height > rec.height
                or abs(img.width / img.height - rec.width / rec.height) > 0.02 * rec.width / rec.height):
            raise ImageLoadError(f"image changed on disk since the scan ({rec.width}x{rec.height} -> {img.width}x{img.height})")
        pixels = to_tensor(render(img, crop))
        if self.masks is None:
            return pixels, None
        if not alpha:
            mask = read_sidecar(rec.path, (rec.width, rec.height), self.config.max_pixels)
        if mask is None:
            return pixels, full_mask(crop)
        check_not_empty(mask, rec.name, self.masks)
        return pixels, render_mask(mask, crop)

    def mask_identity(self, record: int) -> str | None:
        """What the latent cache key records about `record`'s mask: None without masks, "alpha"
        (the image bytes already identify it), else a hash of the sidecar file or "none"."""
        if self.masks is None:
            return None
        if self.masks.source == "alpha":
            return "alpha"
        rec = self.records[record]
        path = None if rec.path is None else sidecar_path(rec.path)
        return content_hash(read_bytes(path)) if path is not None and os.path.exists(path) else "none"

    def _substitutes(self, record: int):
        """Other records of the same bucket, in a fixed order after `record`."""
        members = self._members[self.record_bucket[record]]
        start = int(np.searchsorted(members, record))
        order = np.concatenate([members[start + 1:], members[:start]])
        return [int(r) for r in order[:_MAX_SUBSTITUTES] if int(r) not in self._failed]

    def _warn_failed(self, record: int, reason: str) -> None:
        if record in self._failed:
            return
        if torch.utils.data.get_worker_info() is not None:
            # Every DataLoader worker has its own `_failed`: hand the failure to the main process
            # with the sample (`report_failure` via BucketLoader), which warns once per file.
            self._failed.add(record)
            self._worker_failures.append((record, reason))
        else:
            self.report_failure(record, reason)

    def report_failure(self, record: int, reason: str) -> None:
        """In the main process: warn, once per record, that `record` cannot be decoded and is replaced."""
        if record not in self._failed:
            self._failed.add(record)
            log.warning("skipping unreadable image %s: %s (a same-bucket image is used instead)",
                        self.records[record].name, reason)

    # -- samples -----------------------------------------------------------------------------------
    def __getitem__(self, key) -> dict:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        if not 0 <= index < len(self):
            raise IndexError(f"dataset index {index} out of range (0..{len(self) - 1})")
        plan = self.plan(index, epoch)
        out: dict = {}
        if self._latent_cache is not None:
            plan = self._latent_sample(index, epoch, plan, out)
        else:
            plan = self._pixel_sample(index, epoch, plan, out)
        if self._text_cache is not None:
            out.update(self._text_cache.get(plan.caption))
        if self._worker_failures:
            out["failed"], self._worker_failures = self._worker_failures, []
        crop = plan.crop
        out.update(caption=plan.caption, original_size=crop.original_size, crop_top_left=crop.crop_top_left,
                   target_size=crop.target_size, index=index, name=self.records[plan.record].name,
                   is_reg=bool(self.subsets[self.records[plan.record].subset].is_reg))
        return out

    def _pixel_sample(self, index: int, epoch: int, plan: SamplePlan, out: dict) -> SamplePlan:
        for rid in [plan.record] + self._substitutes(plan.record):
            if rid in self._failed:
                continue
            plan = plan if rid == plan.record else self.plan(index, epoch, record=rid)
            try:
                out["pixels"], mask = self.load_pixels_and_mask(rid, plan.crop)
                if mask is not None:
                    out["mask"] = mask
                return plan
            except ImageLoadError as exc:
                self._warn_failed(rid, exc.reason)
        raise DataError(f"no readable image left in bucket {self.bucket_of(index)} (last tried "
                        f"{self.records[plan.record].name}); see the warnings above")

    def _latent_sample(self, index: int, epoch: int, plan: SamplePlan, out: dict) -> SamplePlan:
        keys = self._latent_keys
        rid = plan.record
        if keys[rid] is None:
            alternatives = [r for r in self._substitutes(rid) if keys[r] is not None]
            if not alternatives:
                raise CacheError(f"no cached latent for {self.records[rid].name} or any image of its bucket")
            plan = self.plan(index, epoch, record=alternatives[0])
            rid = plan.record
        entry = self._latent_cache.load(keys[rid])
        suffix = "_flip" if plan.crop.flip else ""
        if "mean" + suffix not in entry:
            raise CacheError(f"latent cache entry of {self.records[rid].name} has no flipped variant; rebuild the cache")
        out["latent_mean"], out["latent_std"] = entry["mean" + suffix], entry["std" + suffix]
        if self.masks is not None:
            if "mask" not in entry:
                raise CacheError(f"latent cache entry of {self.records[rid].name} has no loss mask; rebuild the cache")
            out["mask"] = entry["mask"].flip(-1) if plan.crop.flip else entry["mask"]
        return plan

    # -- caches --------------------------------------------------------------------------------------
    def attach_latent_cache(self, cache, keys: list[str | None]) -> None:
        """Serve latents from `cache` (keys[record] = entry key, None for images that failed)."""
        if any(self.subsets[i].random_crop for i in range(len(self.subsets))):
            raise CacheError("random_crop: cannot be combined with a latent cache (a cached latent fixes one crop)")
        if len(keys) != len(self.records):
            raise CacheError(f"attach_latent_cache: {len(keys)} keys for {len(self.records)} records")
        self._latent_cache, self._latent_keys = cache, list(keys)

    def attach_text_cache(self, cache) -> None:
        """Serve `context`/`pooled` for each processed caption from `cache`."""
        self._text_cache = cache

    def cache_captions(self) -> list[str]:
        """Every text a sample can have when captions are deterministic (plus "" with caption dropout)."""
        texts = set()
        for r in self.records:
            try:
                texts.update(self.processors[r.subset].variants(r.caption))
            except ValueError as exc:
                raise CacheError(f"cache_text: {r.name}: {exc}; set data.cache_text: false") from None
        if any(s.caption_dropout > 0 for s in self.subsets):
            texts.add("")
        return sorted(texts)


def build_dataset(config: DataConfig, *, seed: int = 0, log_summary: bool = True, masks: MaskSettings | None = None,
                  holdout: float = 0.0) -> ImageCaptionDataset:
    """Scan every subset of `config` and build the dataset (see module docstring).

    masks: read loss masks (sidecar masks are checked now: MaskError naming a bad one). holdout:
    fraction of the training images set aside (`data.validation.split_holdout`) as
    `dataset.held_out`, a dataset of them rendered without randomness (None without a hold-out).
    Raises DataConfigError for bad paths/columns, DataScanError (listing every file) in strict mode
    when anything was skipped, DataError when no usable image is left.
    """
    from .validation import fixed_subset, split_holdout

    config.check_sources()
    subsets = config.resolved_subsets()
    # Strict mode promises every unusable file before training: only a full decode finds damage
    # in the middle of a file whose header and end marker are intact.
    opts = ScanOptions(max_pixels=config.max_pixels, min_size=config.min_size,
                       verify=config.verify_images or config.strict)
    hf_cache = None if config.cache_dir is None else os.path.join(config.cache_dir, "hf")
    report = ScanReport()
    records, tables = [], []
    for i, sub in enumerate(subsets):
        recs, table = scan_subset(sub, i, opts, report, hf_cache_dir=hf_cache)
        records.extend(recs)
        tables.append(table)
    if masks is not None and masks.source == "sidecar":
        _check_sidecar_masks(records, masks, config.max_pixels)
    held = []
    if holdout and records:
        records, held = split_holdout(records, subsets, holdout, seed)
        report.held_out = len(held)
    dataset = ImageCaptionDataset(records, subsets, tables, config=config, seed=seed, report=report, masks=masks)
    dataset.held_out = (ImageCaptionDataset(held, [fixed_subset(s) for s in subsets], tables, config=config, seed=seed,
                                            masks=masks) if held else None)
    for i, sub in enumerate(subsets):
        recs = [r for r in dataset.records if r.subset == i]
        report.subsets.append((sub.name or sub.path, len(recs), sum(r.repeats for r in recs)))
        if sub.is_reg:
            report.regularization.add(sub.name or sub.path)
    if config.strict:
        report.raise_if_errors()  # lists every problem itself: no summary first, so each is named once
    if log_summary:
        level = logging.WARNING if report.skipped or report.caption_errors else logging.INFO
        log.log(level, "%s", report.summary())
    if not dataset.records:
        raise DataError("no usable images found in " + ", ".join(repr(s.path) for s in subsets) + "\n" + report.summary())
    if log_summary:
        log.info("buckets:\n%s", dataset.bucket_table())
    return dataset


def _check_sidecar_masks(records: list[ImageRecord], masks: MaskSettings, max_pixels: int) -> None:
    """MaskError naming the first (by path) sidecar mask that is unreadable, misshapen or, unless
    allowed, ignores every pixel: found before training rather than in its middle."""
    from concurrent.futures import ThreadPoolExecutor

    def check(rec: ImageRecord) -> None:
        mask = read_sidecar(rec.path, (rec.width, rec.height), max_pixels)
        if mask is not None:
            check_not_empty(mask, rec.name, masks)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(check, [r for r in records if r.path is not None]))
