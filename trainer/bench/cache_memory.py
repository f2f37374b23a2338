"""Memory of the in-memory latent/text caches: measured RSS growth against the estimate.

    python -m trainer.bench.cache_memory --images 2000 --cache latents|text [--family tiny-sdxl] [--resolution 64]

Writes `--images` random RGB PNGs with distinct captions into a temporary folder, builds the
dataset and the family's random-weight model, encodes one batch to warm up, then builds the
latent and the text cache in memory (no cache_dir) and reads VmRSS from /proc/self/status
before and after (one cache per process). Prints the growth per 1,000 images next to the tensor
bytes held and `estimate_memory_cache`, and
the estimate for full-size SDXL at 1024 x 1024 (fp32 and fp16 storage), which needs no weights.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path
from types import SimpleNamespace


def _rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _write_images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"a random picture number {i}")


def sdxl_estimate(images: int, resolution: int, dtype: str) -> int:
    """Estimated bytes of the in-memory caches of `images` square SDXL images (unique captions)."""
    import models
    from data.cache import CacheShapes, estimate_memory_cache

    shapes = CacheShapes.of(models.build_model("sdxl", device="meta"))
    fake = SimpleNamespace(records=[SimpleNamespace(subset=0)] * images, bucket_sizes=[(resolution, resolution)],
                           record_bucket=[0] * images, subsets=[SimpleNamespace(flip=False)],
                           cache_captions=lambda: [str(i) for i in range(images)])
    return estimate_memory_cache(fake, shapes, latents=True, text=True, dtype=dtype).total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench.cache_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--family", default="tiny-sdxl")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--cache", choices=["latents", "text"], default="latents",
                        help="which cache to build (one per process, so neither inherits the other's freed heap)")
    args = parser.parse_args(argv)

    import torch

    import models
    from data.cache import CacheShapes, LatentCache, TextCache, estimate_memory_cache
    from data.config import DataConfig
    from data.dataset import build_dataset

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_images(folder, args.images, args.resolution)
        cfg = DataConfig(path=str(folder), resolution=args.resolution, bucket_step=32, cache_latents=True,
                         cache_text=True, num_workers=0)
        dataset = build_dataset(cfg, log_summary=False)
        bundle = models.build_model(args.family)
        with torch.no_grad():  # warm-up: allocator pools and lazily created kernels are not cache memory
            bundle.vae.encode(torch.zeros(4, 3, args.resolution, args.resolution))
            bundle.encode_prompt(["warm up"] * 16)
        est = estimate_memory_cache(dataset, CacheShapes.of(bundle), latents=True, text=True)
        gc.collect()
        before = _rss()
        if args.cache == "latents":
            cache = LatentCache(None, "bench")
            cache.build(dataset, bundle.vae.encode, progress=False)
            estimate, what = est.latent_bytes, "images"
        else:
            cache = TextCache(None, "bench")
            cache.build(dataset, lambda c: bundle.encode_prompt(list(c)), progress=False)
            estimate, what = est.text_bytes, "captions"
        gc.collect()
        grown = _rss() - before
    held = sum(t.nbytes for entry in cache.store.memory.values() for t in entry.values())
    per_k = 1000 / args.images
    print(f"{args.family} at {args.resolution} px, {args.cache} cache of {args.images} {what}, fp32 storage, per 1000:"
          f" RSS +{grown * per_k / 1e6:.3f} MB, tensor data {held * per_k / 1e6:.3f} MB, estimate "
          f"{estimate * per_k / 1e6:.3f} MB")
    for dtype in ("float32", "float16"):
        per_image = sdxl_estimate(1000, 1024, dtype) / 1000
        print(f"SDXL 1024x1024, {dtype}: estimate {per_image / 1e6:.3f} MB per image (latents + text)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
