"""Validation images: a deterministic hold-out of the training images (`validation.split`) or a
separate source (`validation.path`), rendered without randomness (center crop, no flip, plain
caption) so that the validation loss measures the same thing at every step, run and resume."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .config import DataConfig, SubsetConfig
from .errors import DataError
from .scan import ImageRecord

_SPLIT_STREAM = 0x7A1D  # separates the hold-out draw from every other use of the seed


def fixed_subset(sub: SubsetConfig) -> SubsetConfig:
    """`sub` with every random or repeating setting off (validation renders each image once, the same way)."""
    return replace(sub, repeats=1, flip=False, random_crop=False, shuffle_tags=False, tag_dropout=0.0,
                   caption_dropout=0.0, is_reg=False)


def split_holdout(records: list[ImageRecord], subsets: list[SubsetConfig], fraction: float,
                  seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, held-out) records: round(fraction x training images) (at least 1) of the
    non-regularization records, chosen by a permutation seeded with `seed` (the same images for
    the same data and seed). DataError when nothing would be left to train on."""
    candidates = [i for i, r in enumerate(records) if not subsets[r.subset].is_reg]
    count = max(1, round(fraction * len(candidates)))
    if count >= len(candidates):
        raise DataError(f"validation.split={fraction} holds out {count} of {len(candidates)} training images, leaving "
                        "none to train on; lower validation.split or add images")
    perm = np.random.default_rng([int(seed) % 2**64, _SPLIT_STREAM]).permutation(len(candidates))
    held = {candidates[i] for i in perm[:count]}
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [replace(r, repeats=1) for i, r in enumerate(records) if i in held]


def validation_data_config(config: DataConfig, path: str) -> DataConfig:
    """The data settings of a `validation.path` source: the training data's resolution, buckets and
    caption reading, with one fixed rendering per image and no caches."""
    return replace(config, path=path, subsets=[], repeats=1, kohya_repeats=False, flip=False, random_crop=False,
                   shuffle_tags=False, tag_dropout=0.0, caption_dropout=0.0, cache_latents=False, cache_text=False,
                   strict=False)
