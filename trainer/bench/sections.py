"""The load, data and sample sections of `python -m trainer bench` (the train section and the
command line are in `trainer.bench.train`)."""
from __future__ import annotations

import time

import torch

from .train import DATA_WORKERS, GIB, BenchConfig, _check_size

def bench_load(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Checkpoint load time and peak memory via `trainer.bench.load`: a random fp16 single-file
    checkpoint of the family is written to a temporary folder, then loaded to the CPU in this process."""
    import tempfile
    from pathlib import Path

    from . import load as loader_bench

    with tempfile.TemporaryDirectory(prefix="lorasmith-bench-load-") as tmp:
        t0 = time.perf_counter()
        source = loader_bench.generate("single-file", Path(tmp), cfg.family)
        written = time.perf_counter() - t0
        r = loader_bench.measure(source, "assign")
        size = source.stat().st_size
    return {"source": "trainer.bench.load", "file_gib": size / GIB, "write_s": written, "load_s": r["load_s"],
            "ready_s": r["ready_s"], "peak_rss_increase_gib": (r["peak_rss"] - r["rss_before"]) / GIB,
            "param_gib": r["param_bytes"] / GIB}


def print_load(r: dict) -> None:
    print(f"model load (single-file fp16 {r['file_gib']:.3f} GiB to CPU, page cache warm): load {r['load_s']:.2f} s, "
          f"ready {r['ready_s']:.2f} s, peak RSS +{r['peak_rss_increase_gib']:.3f} GiB for {r['param_gib']:.3f} GiB")


def bench_data(cfg: BenchConfig) -> dict:
    from trainer.bench.data import benchmark_pipeline
    from models.families import family_spec

    res = cfg.res or family_spec(cfg.family).resolution
    return benchmark_pipeline(n=cfg.data_images, res=res, num_workers=DATA_WORKERS, batch_size=cfg.batch)


def print_data(r: dict) -> None:
    print(f"data pipeline ({r['n']} images at {r['res']} px, batch {r['batch_size']}, {r['workers']} workers): "
          f"decode+transform {r['decode_img_s']:.2f} img/s ({r['per_core_img_s']:.2f} per core), "
          f"cached latents {r['cached_latents_img_s']:.2f} img/s; goal {r['goal_img_s']} img/s")


def bench_sample(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict:
    from models.checkpoints.open import open_model
    from trainer.sampling.pipeline import benchmark_sampling

    bundle = open_model(cfg.family, device=device, dtype=dtype, seed=cfg.seed)  # as generate opens it
    res = _check_size(cfg)
    return benchmark_sampling(bundle, steps=cfg.sample_steps, width=res, height=res, batch=cfg.batch)


def print_sample(r: dict) -> None:
    print(f"sampling ({r['sampler']}, guidance {r['guidance_scale']}, {r['width']}x{r['height']}, batch {r['batch']}, "
          f"{r['dtype']}): {r['s_per_step']:.4f} s/step ({r['steps_per_s']:.2f} steps/s); "
          f"text encode {r['encode_s']:.3f} s, VAE decode {r['decode_s']:.3f} s")


