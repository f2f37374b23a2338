"""Latent and text-encoder output caches (on disk as safetensors, or in memory).

Latent cache key = hash(image file bytes, model_id, bucket, resize size, crop corner, background
colour, flip variant, loss-mask source and bytes, pipeline version): a changed image, resolution/bucket or model gives a new key,
so a stale entry is never read (old files simply stay unused). The cache always encodes the
*center* crop; random crops are refused (`check_latent_cache_allowed`) because one cached latent
cannot represent a new crop each epoch. With flips on, each entry also holds the latent of the
mirrored image (encoded separately: a flipped latent is not the latent of the flipped image). With
loss masks on, each entry also holds the mask on the latent grid ("mask", (1, h, w), area-averaged
from the pixel mask); the flipped variant's mask is its mirror image, made when read.

Text cache key = hash(caption text, model_id). It is only valid when a caption always maps to the
same text and the text encoders are frozen (`check_text_cache_allowed`); whole-caption dropout is
fine (the empty caption is cached too).

Files are written to a temporary name and moved into place with os.replace, so an interrupted
build leaves only complete entries and the next build resumes where it stopped.

In-memory caches (no cache_dir) are sized before anything is encoded: `estimate_memory_cache`
adds up every entry from the scan (bucket sizes, flips, unique captions) and the model's shapes
(`CacheShapes.of`), and `check_memory_cache` refuses when that exceeds a share of MemAvailable.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models.checkpoints.safetensors_io import SafetensorsError, read_tensors, save_file

from .errors import CacheError
from .images import ImageLoadError, content_hash

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when resizing/cropping/normalisation changes pixels
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_latent_cache_allowed(*, random_crop: bool) -> None:
    """CacheError when latents cannot be cached with these settings (random crops)."""
    if random_crop:
        raise CacheError("cache_latents: cannot be used with random_crop (a cached latent fixes one center crop); "
                         "set data.random_crop: false or data.cache_latents: false")


def check_text_cache_allowed(*, shuffle_tags: bool, tag_dropout: float, train_text_encoder: bool,
                             caption_dropout: float = 0.0) -> None:
    """CacheError when cached text-encoder outputs would be wrong for these settings.

    Tag shuffle and tag dropout create new caption texts every epoch; a trained text encoder
    changes its outputs every step. Whole-caption dropout is allowed (the empty caption is cached).
    """
    del caption_dropout  # accepted for a uniform call site: whole-caption dropout is cacheable
    problems = []
    if shuffle_tags:
        problems.append("shuffle_tags is on (each epoch makes a new caption text)")
    if tag_dropout > 0:
        problems.append(f"tag_dropout={tag_dropout} (each epoch makes a new caption text)")
    if train_text_encoder:
        problems.append("the text encoders are trained (their outputs change every step)")
    if problems:
        raise CacheError("cache_text: cached text embeddings would be wrong because " + "; ".join(problems)
                         + ". Set data.cache_text: false, or turn those settings off")


def _digest(payload: dict) -> str:
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=20).hexdigest()


class _Store:
    """key -> dict of tensors, in a directory (one safetensors file per key) or in memory."""

    def __init__(self, directory: str | os.PathLike | None, dtype: str):
        if dtype not in DTYPES:
            raise CacheError(f"cache_dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dir = Path(directory) if directory is not None else None
        self.dtype = DTYPES[dtype]
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return key in self.memory if self.dir is None else self.path(key).is_file()

    def save(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        # clone: own storage per tensor (no shared memory between entries, no batch kept alive by a view)
        tensors = {k: v.detach().to("cpu", self.dtype).clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        if self.dir is None:
            self.memory[key] = tensors
            return
        final = self.path(key)
        # Atomic, without fsync: a cache entry can always be computed again.
        save_file(tensors, final, metadata=metadata, durable=False)

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """Stored tensors as float32."""
        if self.dir is None:
            try:
                entry = self.memory[key]
            except KeyError:
                raise CacheError(f"cache entry {key} is missing; build the cache before training") from None
        else:
            path = self.path(key)
            try:
                entry, _ = read_tensors(path)
            except FileNotFoundError:
                raise CacheError(f"cache file {path} is missing; build the cache before training") from None
            except (SafetensorsError, OSError, ValueError) as exc:
                raise CacheError(f"cache file {path} is corrupt ({exc}); delete it and build the cache again") from None
        return {k: v.float() for k, v in entry.items()}


def _mean_std(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) from an encoder output: a (mean, std) pair or a DiagonalGaussian-like object."""
    out = getattr(out, "latent_dist", out)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        mean, std = out
    elif not isinstance(out, torch.Tensor) and isinstance(getattr(out, "mean", None), torch.Tensor):
        mean = out.mean
        std = out.std if isinstance(getattr(out, "std", None), torch.Tensor) else torch.exp(0.5 * out.logvar)
    else:
        raise CacheError("encode_fn must return (mean, std) tensors or an object with .mean and .std tensors "
                         f"(a DiagonalGaussian), got {type(out).__name__}")
    if not (isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)) or mean.shape != std.shape:
        raise CacheError("encode_fn returned mean/std that are not tensors of the same shape")
    return mean, std


class LatentCache:
    """VAE latent distributions (mean, std) per image, keyed as described in the module docstring.

    cache_dir: directory (entries under `<cache_dir>/latents/`) or None for in-memory; model_id:
    identity of the VAE (e.g. family + weights hash) - changing it invalidates every entry;
    dtype: storage dtype name. Loaded tensors are float32 (C, H/8, W/8).
    """

    def __init__(self, cache_dir: str | os.PathLike | None, model_id: str, *, dtype: str = "float32"):
        if not isinstance(model_id, str) or not model_id:
            raise CacheError("LatentCache: model_id must be a non-empty string identifying the VAE weights")
        self.model_id = model_id
        self.store = _Store(None if cache_dir is None else Path(cache_dir) / "latents", dtype)

    def key(self, image_hash: str, crop, background, flip: bool, mask: str | None = None) -> str:
        """Entry key of an image (content hash) rendered with `crop` (a CropPlan); `mask`: what
        identifies its loss mask (`ImageCaptionDataset.mask_identity`), None without masks."""
        payload = {"v": PIPELINE_VERSION, "kind": "latent", "image": image_hash, "model": self.model_id,
                   "size": list(crop.size), "bucket": list(crop.bucket), "resized": list(crop.resized),
                   "crop": [crop.top, crop.left], "background": list(background), "flip": bool(flip)}
        if mask is not None:  # keys of mask-free entries stay what they were
            payload["mask"] = mask
        return _digest(payload)

    def __contains__(self, key: str) -> bool:
        return key in self.store

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """{"mean", "std"[, "mean_flip", "std_flip"]}: float32 (C, h, w) tensors."""
        return self.store.load(key)

    def keys_for(self, dataset, threads: int | None = None) -> list[str | None]:
        """Key of every record of `dataset` (reads and hashes each image file; None if unreadable)."""
        def one(rid: int):
            try:
                digest = content_hash(dataset.read_bytes(rid))
            except ImageLoadError as exc:
                dataset._warn_failed(rid, exc.reason)
                return None
            flip = bool(dataset.subsets[dataset.records[rid].subset].flip)
            mask = dataset.mask_identity(rid) if hasattr(dataset, "mask_identity") else None
            return self.key(digest, dataset.cache_plan(rid), dataset.background, flip, mask)

        with ThreadPoolExecutor(threads or min(16, 4 * (os.cpu_count() or 1))) as pool:
            return list(pool.map(one, range(len(dataset.records))))

    def build(self, dataset, encode_fn: Callable, *, batch_size: int = 4, device=None, dtype=None,
              progress: bool = True, rank: int = 0, world_size: int = 1) -> dict:
        """Encode every record of `dataset` that is not cached yet, then attach the cache to it.

        encode_fn(pixels) gets float32 (B, 3, H, W) in [-1, 1] (moved to `device`/`dtype` when
        given; one bucket per call) and returns (mean, std) or a DiagonalGaussian-like object.
        With world_size > 1 each rank encodes a disjoint share of the missing entries; the caller
        must synchronise ranks before training (every rank then reads every entry).
        Returns {"entries", "cached", "computed", "failed"}.
        """
        for sub in dataset.subsets:
            check_latent_cache_allowed(random_crop=bool(sub.random_crop))
        keys = self.keys_for(dataset)
        missing = {k: r for r, k in enumerate(keys) if k is not None and k not in self.store}
        todo = sorted(missing.values(), key=lambda r: (int(dataset.record_bucket[r]), r))[rank::world_size]
        stats = {"entries": len(keys), "cached": sum(k is not None and k not in missing for k in keys),
                 "computed": 0, "failed": keys.count(None)}
        batches, current = [], []
        for rid in todo:
            if current and dataset.record_bucket[current[0]] != dataset.record_bucket[rid] or len(current) == batch_size:
                batches.append(current)
                current = []
            current.append(rid)
        if current:
            batches.append(current)

        def load(batch):
            pixels, masks, ok = [], [], []
            for rid in batch:
                try:
                    if hasattr(dataset, "load_pixels_and_mask"):
                        px, mask = dataset.load_pixels_and_mask(rid, dataset.cache_plan(rid))
                    else:
                        px, mask = dataset.load_pixels(rid, dataset.cache_plan(rid)), None
                    pixels.append(px)
                    masks.append(mask)
                    ok.append(rid)
                except ImageLoadError as exc:
                    dataset._warn_failed(rid, exc.reason)
            return ok, pixels, masks

        bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not progress or not todo)
        with ThreadPoolExecutor(2) as pool, torch.no_grad():
            pending = [pool.submit(load, b) for b in batches[:2]]  # decode ahead of encoding
            for i in range(len(batches)):
                ok, pixels, masks = pending.pop(0).result()
                if i + 2 < len(batches):
                    pending.append(pool.submit(load, batches[i + 2]))
                failed = set(batches[i]) - set(ok)
                for rid in failed:
                    keys[rid] = None
                stats["failed"] += len(failed)
                if ok:
                    self._encode(dataset, ok, torch.stack(pixels), keys, encode_fn, device, dtype, masks)
                    stats["computed"] += len(ok)
                bar.update(len(batches[i]))
        bar.close()
        dataset.attach_latent_cache(self, keys)
        return stats

    def _encode(self, dataset, rids, pixels, keys, encode_fn, device, dtype, masks=None) -> None:
        def run(x):
            x = x.to(device=device or x.device, dtype=dtype or x.dtype)
            mean, std = _mean_std(encode_fn(x))
            return mean.float().cpu(), std.float().cpu()

        mean, std = run(pixels)
        flips = [dataset.subsets[dataset.records[r].subset].flip for r in rids]
        if any(flips):
            mean_f, std_f = run(pixels.flip(-1))
        for j, rid in enumerate(rids):
            tensors = {"mean": mean[j], "std": std[j]}
            if masks is not None and masks[j] is not None:
                from .masks import to_latent_grid

                tensors["mask"] = to_latent_grid(masks[j], tuple(mean.shape[-2:]))
            if flips[j]:
                tensors.update(mean_flip=mean_f[j], std_flip=std_f[j])
            self.store.save(keys[rid], tensors, {"model_id": self.model_id, "image": dataset.records[rid].name})


class TextCache:
    """Text-encoder outputs per caption text: context (T, D) and optional pooled (P,).

    cache_dir: directory (entries under `<cache_dir>/text/`) or None for in-memory; model_id:
    identity of the text encoders and tokenizers.
    """

    def __init__(self, cache_dir: str | os.PathLike | None, model_id: str, *, dtype: str = "float32"):
        if not isinstance(model_id, str) or not model_id:
            raise CacheError("TextCache: model_id must be a non-empty string identifying the text encoders")
        self.model_id = model_id
        self.store = _Store(None if cache_dir is None else Path(cache_dir) / "text", dtype)

    def key(self, caption: str) -> str:
        return _digest({"v": PIPELINE_VERSION, "kind": "text", "caption": caption, "model": self.model_id})

    def __contains__(self, caption: str) -> bool:
        return self.key(caption) in self.store

    def get(self, caption: str) -> dict:
        """{"context": float32 (T, D), "pooled": float32 (P,) or None} of `caption`."""
        entry = self.store.load(self.key(caption))
        return {"context": entry["context"], "pooled": entry.get("pooled")}

    def build_captions(self, captions: Iterable[str], encode_fn: Callable, *, batch_size: int = 16,
                       progress: bool = True) -> dict:
        """Encode every caption not cached yet. encode_fn(list[str]) -> (context (B,T,D), pooled (B,P) | None)
        or a context tensor alone. Returns {"entries", "cached", "computed"}."""
        unique = sorted(set(captions))
        todo = [c for c in unique if c not in self]
        bar = tqdm(total=len(todo), desc="caching text", unit="caption", disable=not progress or not todo)
        with torch.no_grad():
            for s in range(0, len(todo), batch_size):
                chunk = todo[s:s + batch_size]
                out = encode_fn(chunk)
                context, pooled = (out if isinstance(out, (tuple, list)) else (out, None))
                if not isinstance(context, torch.Tensor) or context.shape[0] != len(chunk):
                    raise CacheError(f"text encode_fn must return a (B, T, D) context tensor for B={len(chunk)} captions")
                for j, caption in enumerate(chunk):
                    tensors = {"context": context[j]}
                    if pooled is not None:
                        tensors["pooled"] = pooled[j]
                    self.store.save(self.key(caption), tensors, {"model_id": self.model_id})
                bar.update(len(chunk))
        bar.close()
        return {"entries": len(unique), "cached": len(unique) - len(todo), "computed": len(todo)}

    def build(self, dataset, encode_fn: Callable, *, train_text_encoder: bool = False, batch_size: int = 16,
              progress: bool = True) -> dict:
        """Validate the dataset's caption settings, cache all its caption texts and attach the cache."""
        for sub in dataset.subsets:
            check_text_cache_allowed(shuffle_tags=bool(sub.shuffle_tags), tag_dropout=float(sub.tag_dropout),
                                     train_text_encoder=train_text_encoder, caption_dropout=float(sub.caption_dropout))
        stats = self.build_captions(dataset.cache_captions(), encode_fn, batch_size=batch_size, progress=progress)
        dataset.attach_text_cache(self)
        return stats


# ---- sizing in-memory caches ----------------------------------------------------------------------
# Measured cost of one in-memory tensor beyond its data (torch tensor + storage objects, allocator
# rounding, its dict slot) and of one entry (key string, dict): `python -m trainer.bench.cache_memory`.
TENSOR_OVERHEAD = 500
ENTRY_OVERHEAD = 450


@dataclass(frozen=True)
class CacheShapes:
    """What one cache entry holds, from the model: a latent is `latent_channels` x (H / downsample)
    x (W / downsample) for an H x W image (mean and std are stored); one caption's entry holds the
    tensors of `text`, e.g. {"context": (77, 2048), "pooled": (1280,)} for SDXL."""

    latent_channels: int
    downsample: int
    text: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, bundle) -> CacheShapes:
        """Shapes of `bundle` (a ModelBundle): VAE latent channels and downsampling factor, and the
        family's conditioning tensors per caption (`FamilySpec.conditioning_shapes`)."""
        vae = bundle.vae.config
        return cls(vae.z_channels, vae.downsample_factor, dict(bundle.spec.conditioning_shapes(bundle)))


@dataclass
class CacheEstimate:
    """Bytes the in-memory caches will take (data + measured per-tensor overheads)."""

    latent_bytes: int = 0
    text_bytes: int = 0
    images: int = 0
    captions: int = 0

    @property
    def total(self) -> int:
        return self.latent_bytes + self.text_bytes

    def describe(self) -> str:
        parts = []
        if self.images:
            parts.append(f"latents {_size(self.latent_bytes)} for {self.images} images "
                         f"({_size(self.latent_bytes / self.images)} each)")
        if self.captions:
            parts.append(f"text {_size(self.text_bytes)} for {self.captions} captions "
                         f"({_size(self.text_bytes / self.captions)} each)")
        return f"in-memory caches (no data.cache_dir): about {_size(self.total)}: " + ", ".join(parts)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def estimate_memory_cache(dataset, shapes: CacheShapes, *, latents: bool, text: bool,
                          dtype: str = "float32") -> CacheEstimate:
    """Bytes of the in-memory caches for `dataset` (after its scan), without encoding anything.

    Latents: per image, mean and std of C x (h / f) x (w / f) at its bucket size (w, h), twice with
    flips; text: per unique caption (`cache_captions`), the `shapes.text` tensors. `dtype` is the
    storage dtype name (`data.cache_dtype`)."""
    itemsize = DTYPES[dtype].itemsize
    est = CacheEstimate()
    if latents:
        f = shapes.downsample
        for rid in range(len(dataset.records)):
            w, h = dataset.bucket_sizes[dataset.record_bucket[rid]]
            variants = 2 if dataset.subsets[dataset.records[rid].subset].flip else 1
            one = shapes.latent_channels * (h // f) * (w // f) * itemsize + TENSOR_OVERHEAD
            mask = (h // f) * (w // f) * itemsize + TENSOR_OVERHEAD if getattr(dataset, "masks", None) else 0
            est.latent_bytes += 2 * variants * one + mask + ENTRY_OVERHEAD
        est.images = len(dataset.records)
    if text:
        est.captions = len(dataset.cache_captions())
        per = sum(_numel(s) * itemsize + TENSOR_OVERHEAD for s in shapes.text.values()) + ENTRY_OVERHEAD
        est.text_bytes = est.captions * per
    return est


def available_memory(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes (what can be allocated without swapping), or None where unknown."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory_cache(estimate: CacheEstimate, *, limit: float | None, processes: int = 1,
                       available: int | None = None) -> None:
    """CacheError when `processes` copies of the in-memory caches (each process holds its own)
    need more than `limit` (data.cache_memory_limit) times the available memory. `available`
    defaults to MemAvailable; no check where it is unknown or `limit` is None."""
    available = available_memory() if available is None else available
    need = estimate.total * processes
    if limit is None or available is None or need <= limit * available:
        return
    copies = f" x {processes} processes" if processes > 1 else ""
    raise CacheError(
        f"{estimate.describe()}{copies}, more than data.cache_memory_limit={limit:g} of the {_size(available)} "
        "available; set data.cache_dir to a folder to keep the caches on disk (data.cache_dtype=float16 halves "
        "them), or raise data.cache_memory_limit (null = no limit)")


def build_caches(dataset, *, latent_encode: Callable | None = None, latent_model_id: str | None = None,
                 text_encode: Callable | None = None, text_model_id: str | None = None,
                 train_text_encoder: bool = False, batch_size: int = 4, device=None, dtype=None,
                 progress: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """Build and attach the caches `dataset.config` asks for (`cache_latents`, `cache_text`).

    Uses `cache_dir` (None = in memory) and `cache_dtype` from the config. latent_encode /
    text_encode and their model ids are required for the caches that are on. Returns
    {"latents": stats or None, "text": stats or None}.
    """
    cfg = dataset.config
    out = {"latents": None, "text": None}
    if cfg.cache_latents:
        if latent_encode is None or not latent_model_id:
            raise CacheError("cache_latents: needs the VAE encode function and a model id")
        cache = LatentCache(cfg.cache_dir, latent_model_id, dtype=cfg.cache_dtype)
        out["latents"] = cache.build(dataset, latent_encode, batch_size=batch_size, device=device, dtype=dtype,
                                     progress=progress, rank=rank, world_size=world_size)
    if cfg.cache_text:
        if text_encode is None or not text_model_id:
            raise CacheError("cache_text: needs the text encode function and a model id")
        cache = TextCache(cfg.cache_dir, text_model_id, dtype=cfg.cache_dtype)
        out["text"] = cache.build(dataset, text_encode, train_text_encoder=train_text_encoder,
                                  batch_size=max(batch_size, 16), progress=progress)
    return out
