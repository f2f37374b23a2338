"""Sizing the in-memory caches of a training run before anything is encoded."""
from __future__ import annotations

import os


def check_memory_cache(dataset, bundle, data_cfg, *, is_main: bool, world: int, log) -> None:
    """Print (`log`) the in-memory caches' size and raise CacheError before encoding when it exceeds
    `data.cache_memory_limit` of the available memory (every process holds its own copy). The
    main process decides, since MemAvailable read by each process could differ."""
    from data.cache import CacheShapes, estimate_memory_cache
    from data.cache import check_memory_cache as check
    from data.errors import CacheError

    from .run_control import agreed

    d = data_cfg
    estimate = estimate_memory_cache(dataset, CacheShapes.of(bundle), latents=d.cache_latents, text=d.cache_text,
                                     dtype=d.cache_dtype)
    log(estimate.describe())
    problem = None
    if is_main:
        try:
            check(estimate, limit=d.cache_memory_limit, processes=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        except CacheError as exc:
            problem = str(exc)
    problem = agreed(problem, world)
    if problem is not None:
        raise CacheError(problem)
