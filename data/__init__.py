"""Image/caption data pipeline: sources, aspect-ratio buckets, transforms, caches, loaders.

Public API (stable):

    from data import DataConfig, build_dataset, build_dataloader, LatentCache, TextCache
    dataset = build_dataset(cfg.data, seed=cfg.train.seed)          # scan + report + buckets
    LatentCache(cfg.data.cache_dir, model_id).build(dataset, vae_encode)   # optional
    loader = build_dataloader(dataset, batch_size, seed=seed, rank=rank, world_size=world, device=device)

Names resolve lazily so that `from data.config import DataConfig` does not import torch.
See data/README.md for the whole pipeline.
"""
from models.lazy import lazy_exports

_EXPORTS = {
    "DataConfig": "data.config",
    "SubsetConfig": "data.config",
    "DataError": "data.errors",
    "DataConfigError": "data.errors",
    "DataScanError": "data.errors",
    "CacheError": "data.errors",
    "ImageLoadError": "data.images",
    "load_image": "data.images",
    "probe_image": "data.images",
    "CaptionProcessor": "data.captions",
    "CaptionSettings": "data.captions",
    "generate_buckets": "data.buckets",
    "assign_bucket": "data.buckets",
    "format_bucket_table": "data.buckets",
    "CropPlan": "data.transforms",
    "plan_crop": "data.transforms",
    "ScanReport": "data.scan",
    "ImageRecord": "data.scan",
    "ImageCaptionDataset": "data.dataset",
    "build_dataset": "data.dataset",
    "BucketBatchSampler": "data.sampler",
    "BucketLoader": "data.loader",
    "DevicePrefetcher": "data.loader",
    "build_dataloader": "data.loader",
    "collate_batch": "data.loader",
    "LatentCache": "data.cache",
    "TextCache": "data.cache",
    "build_caches": "data.cache",
    "check_latent_cache_allowed": "data.cache",
    "check_text_cache_allowed": "data.cache",
    "benchmark_pipeline": "trainer.bench.data",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
