"""Data-pipeline throughput: `python -m trainer.bench.data [--n 64] [--res 1024] [--workers 2] [--batch 4]`.

Generates `n` JPEGs of SDXL-like sizes (about res x res pixels, several aspect ratios) in a temporary
folder and measures images/s of
- decode + bucket + resize/crop/flip + normalise + collate through the DataLoader with N workers;
- loading cached latents (a cheap stand-in encoder fills the cache: the figure is I/O + collate).

Goal: >= 4x what training consumes. An SDXL LoRA step on an H100 takes ~0.6 s per image at 1024
(~1.6 img/s), so the pipeline should deliver >= ~6.5 img/s per GPU process.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

GOAL_IMG_S = 6.5

# (width, height) as fractions of res: square, 3:2, 2:3, 16:9-ish, 9:16-ish, and larger photos.
_SHAPES = [(1.0, 1.0), (1.19, 0.81), (0.81, 1.19), (1.31, 0.75), (0.75, 1.31), (1.5, 1.0), (1.0, 1.5)]


def make_jpegs(folder: str, n: int, res: int, seed: int = 0) -> list[str]:
    """Write `n` photo-like JPEGs (gradients, shapes, mild noise) of ~res^2 pixels with captions."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        fw, fh = _SHAPES[i % len(_SHAPES)]
        w, h = int(res * fw), int(res * fh)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
        base = base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
            x1, y1 = x0 + int(rng.integers(1, w // 2)), y0 + int(rng.integers(1, h // 2))
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = os.path.join(folder, f"img_{i:04d}.jpg")
        img.save(path, quality=90)
        with open(os.path.join(folder, f"img_{i:04d}.txt"), "w", encoding="utf-8") as fh_:
            fh_.write(f"photo {i}, shapes, gradient")
        paths.append(path)
    return paths


def _rate(loader, n_images: int, warmup_batches: int) -> float:
    it = iter(loader)
    seen = 0
    for _ in range(warmup_batches):
        seen += len(next(it)["caption"])
    start = time.perf_counter()
    counted = 0
    for batch in it:
        counted += len(batch["caption"])
    elapsed = time.perf_counter() - start
    return counted / elapsed if elapsed > 0 and counted else float("nan")


def benchmark_pipeline(n: int = 64, res: int = 1024, num_workers: int = 2, batch_size: int = 4,
                       flip: bool = True, folder: str | None = None, progress: bool = False) -> dict:
    """Measure the pipeline on generated images; returns a dict of figures (see module docstring).

    Keys: n, res, workers, batch_size, decode_img_s (wall clock through the DataLoader),
    cached_latents_img_s, decode_cpu_ms_per_img / per_core_img_s (CPU time of one process per
    sample: the rate each worker adds on an otherwise idle core), goal_img_s, meets_goal.
    """
    from data.cache import LatentCache
    from data.config import DataConfig
    from data.dataset import build_dataset
    from data.loader import build_dataloader

    with tempfile.TemporaryDirectory(prefix="lorasmith-bench-") as tmp:
        images = folder or os.path.join(tmp, "images")
        if folder is None:
            os.makedirs(images)
            make_jpegs(images, n, res)
        cfg = DataConfig(path=images, resolution=res, flip=flip, num_workers=num_workers)
        ds = build_dataset(cfg, seed=0, log_summary=False)
        # CPU time of one process per sample: independent of other load on the machine, so it gives
        # the per-core rate that wall-clock figures on a busy machine understate.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ds[0]
            count = min(len(ds), 16)
            start = time.process_time()
            for i in range(count):
                ds[i]
            cpu_ms = (time.process_time() - start) / count * 1000
        finally:
            torch.set_num_threads(threads)
        warm = max(1, num_workers)
        loader = build_dataloader(ds, batch_size, seed=0, num_workers=num_workers)
        decode = _rate(loader, len(ds), warm)
        del loader

        def fake_vae(x: torch.Tensor):  # 8x average pool to 4 channels: shapes of a real VAE, no cost
            z = torch.nn.functional.avg_pool2d(x, 8)
            z = torch.cat([z, z[:, :1]], dim=1)
            return z, torch.full_like(z, 0.01)

        cache = LatentCache(os.path.join(tmp, "cache"), "bench-fake-vae")
        cache.build(ds, fake_vae, batch_size=batch_size, progress=progress)
        loader = build_dataloader(ds, batch_size, seed=0, num_workers=num_workers)
        cached = _rate(loader, len(ds), warm)
        del loader
    return {"n": len(ds), "res": res, "workers": num_workers, "batch_size": batch_size,
            "decode_img_s": round(decode, 2), "cached_latents_img_s": round(cached, 2),
            "decode_cpu_ms_per_img": round(cpu_ms, 1), "per_core_img_s": round(1000 / cpu_ms, 2),
            "goal_img_s": GOAL_IMG_S, "meets_goal": bool(decode >= GOAL_IMG_S)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="number of generated images (default 64)")
    parser.add_argument("--res", type=int, default=1024, help="training resolution (default 1024)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--folder", default=None, help="benchmark an existing image folder instead")
    args = parser.parse_args(argv)
    r = benchmark_pipeline(n=args.n, res=args.res, num_workers=args.workers, batch_size=args.batch,
                           folder=args.folder, progress=True)
    print(f"images: {r['n']} at resolution {r['res']}, batch {r['batch_size']}, {r['workers']} workers "
          f"({os.cpu_count()} CPUs)")
    print(f"decode + bucket + transform: {r['decode_img_s']:8.2f} img/s")
    print(f"  per core (CPU time):       {r['per_core_img_s']:8.2f} img/s ({r['decode_cpu_ms_per_img']} ms CPU per image)")
    print(f"cached latents loading:      {r['cached_latents_img_s']:8.2f} img/s")
    verdict = "meets" if r["meets_goal"] else "is below"
    print(f"goal >= {GOAL_IMG_S} img/s (4x an H100 SDXL step at ~0.6 s/img): decoding {verdict} it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
