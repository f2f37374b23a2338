"""Data side of the training recipes: loss masks through resize, crop, flip, buckets and the latent
cache; regularization images in the sampler and the scan summary; the validation hold-out; caption
wildcards."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data.cache import LatentCache, TextCache
from data.captions import CaptionProcessor, CaptionSettings
from data.config import DataConfig
from data.dataset import build_dataset
from data.errors import DataError
from data.masks import MaskError, MaskSettings, to_latent_grid
from data.sampler import BucketBatchSampler

SIDECAR = MaskSettings("sidecar")


def _shape_image(folder, name: str, size: tuple[int, int], box: tuple[int, int, int, int], alpha: bool = False):
    """An image that is red inside `box` (x0, y0, x1, y1) and black elsewhere, with a mask that is
    white exactly there: as a sidecar file, or (alpha) as the image's alpha channel."""
    w, h = size
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, box)
    rgb = Image.merge("RGB", (mask, Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)))
    if alpha:
        rgb = Image.merge("RGBA", (*rgb.split(), mask))
    else:
        mask.save(folder / f"{name}-masklabel.png")
    rgb.save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(name)


def _config(folder, **kw):
    base = {"path": str(folder), "resolution": 64, "bucket_step": 32, "bucket_min_side": 32,
            "bucket_max_side": 128, "num_workers": 0, "background": [0, 0, 0]}
    base.update(kw)
    return DataConfig(**base)


# ---- masks ------------------------------------------------------------------------------------------
def test_center_crop_mask_on_the_latent_grid(tmp_path):
    """128x64 image, white x < 48, square 64 px training: the center crop keeps x in [32, 96), so
    the mask is white in crop columns 0..15 = latent columns 0 and 1; mirrored when flipped."""
    _shape_image(tmp_path, "wide", (128, 64), (0, 0, 48, 64))
    ds = build_dataset(_config(tmp_path, enable_buckets=False, flip=True), log_summary=False, masks=SIDECAR)
    assert [r.name.endswith("wide.png") for r in ds.records] == [True]  # the mask file is not an image
    want = torch.zeros(1, 8, 8)
    want[..., :2] = 1.0
    seen = set()
    for epoch in range(8):
        sample = ds[(0, epoch)]
        plan = ds.plan(0, epoch)
        latent = to_latent_grid(sample["mask"], (8, 8))
        torch.testing.assert_close(latent, want.flip(-1) if plan.crop.flip else want, atol=0.02, rtol=0)
        seen.add(plan.crop.flip)
    assert seen == {True, False}


@pytest.mark.parametrize("options", [{"random_crop": True, "flip": True}, {"flip": True}, {"enable_buckets": False}],
                         ids=["random-crop+flip", "buckets+flip", "square"])
def test_masks_follow_every_crop_flip_and_bucket(tmp_path, options):
    """The image is red exactly where its mask is white, so after any geometry the red channel and
    the mask must still agree pixel for pixel (same resampling), and the latent mask is its 8x8 mean."""
    sizes = [(128, 64), (64, 128), (100, 70), (90, 90)]
    for i, size in enumerate(sizes):
        w, h = size
        _shape_image(tmp_path, f"img{i}", size, (w // 5, h // 3, w // 5 + w // 2, h // 3 + h // 2))
    ds = build_dataset(_config(tmp_path, **options), seed=3, log_summary=False, masks=SIDECAR)
    buckets = set()
    for index in range(len(ds)):
        for epoch in range(3):
            sample = ds[(index, epoch)]
            red = (sample["pixels"][0] + 1) / 2  # [-1, 1] -> [0, 1]
            mask = sample["mask"][0]
            assert mask.shape == red.shape
            assert (red - mask).abs().max() < 1.5 / 255, (index, epoch)
            assert 0.05 < mask.mean() < 0.95
            h, w = mask.shape
            latent = to_latent_grid(sample["mask"], (h // 8, w // 8))
            torch.testing.assert_close(latent[0], mask.reshape(h // 8, 8, w // 8, 8).mean(dim=(1, 3)))
            buckets.add((w, h))
    if options.get("enable_buckets", True):
        assert len(buckets) > 1


def test_latent_cache_stores_the_latent_grid_mask(tmp_path):
    from test_data_cache import FakeVAE

    _shape_image(tmp_path, "a", (128, 64), (0, 0, 40, 64))
    _shape_image(tmp_path, "b", (64, 96), (10, 50, 64, 96))
    cfg = _config(tmp_path, flip=True, cache_latents=True)
    uncached = build_dataset(cfg, log_summary=False, masks=SIDECAR)
    cached = build_dataset(cfg, log_summary=False, masks=SIDECAR)
    cache = LatentCache(None, "fake", dtype="float32")
    cache.build(cached, FakeVAE(), progress=False)
    for index in range(len(cached)):
        for epoch in range(4):
            got = cached[(index, epoch)]["mask"]
            pixel = uncached[(index, epoch)]["mask"]
            assert got.shape[-2:] == cached[(index, epoch)]["latent_mean"].shape[-2:]
            torch.testing.assert_close(got, to_latent_grid(pixel, tuple(got.shape[-2:])), atol=1e-5, rtol=0)
    # the mask is part of the key: a changed mask is a new entry
    keys = cache.keys_for(cached)
    Image.new("L", (128, 64), 255).save(tmp_path / "a-masklabel.png")
    assert cache.keys_for(cached)[0] != keys[0] and cache.keys_for(cached)[1] == keys[1]


def test_alpha_channel_masks(tmp_path):
    _shape_image(tmp_path, "cut", (96, 64), (0, 0, 40, 64), alpha=True)
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "opaque.png")  # no alpha: learnt whole
    ds = build_dataset(_config(tmp_path, enable_buckets=False), log_summary=False, masks=MaskSettings("alpha"))
    by_name = {r.name.rsplit("/", 1)[-1]: i for i, r in enumerate(ds.records)}
    cut = ds[(by_name["cut.png"], 0)]["mask"][0]
    red = (ds[(by_name["cut.png"], 0)]["pixels"][0] + 1) / 2
    assert (red - cut).abs().max() < 1.5 / 255 and 0.1 < cut.mean() < 0.9
    assert torch.equal(ds[(by_name["opaque.png"], 0)]["mask"], torch.ones(1, 64, 64))


def test_a_mask_that_ignores_everything_names_the_file(tmp_path):
    _shape_image(tmp_path, "fine", (64, 64), (0, 0, 32, 64))
    Image.new("RGB", (64, 64)).save(tmp_path / "dark.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "dark-masklabel.png")
    with pytest.raises(MaskError, match=r"dark\.png ignores every pixel.*unmasked_weight"):
        build_dataset(_config(tmp_path), log_summary=False, masks=SIDECAR)
    ds = build_dataset(_config(tmp_path), log_summary=False, masks=MaskSettings("sidecar", allow_empty=True))
    assert len(ds) == 2
    Image.new("L", (64, 32), 255).save(tmp_path / "dark-masklabel.png")
    with pytest.raises(MaskError, match=r"dark-masklabel\.png is 64x32 but its image is 64x64"):
        build_dataset(_config(tmp_path), log_summary=False, masks=SIDECAR)


# ---- regularization images -----------------------------------------------------------------------------
def test_regularization_draws_follow_the_training_images():
    train, reg = 4, 10
    buckets = [0, 1, 0, 1] + [0, 1] * 5
    flags = [False] * train + [True] * reg
    sampler = BucketBatchSampler(buckets, 2, seed=1, regularization=flags)
    draws = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        indices = [i for b in batches for i, _ in b]
        assert sorted(i for i in indices if i < train) == list(range(train))  # every training sample once
        regs = [i for i in indices if i >= train]
        assert len(regs) == train  # as many regularization samples as training samples
        draws += regs
        for b in batches:
            assert len({buckets[i] for i, _ in b}) == 1  # batched by bucket, mixed kinds allowed
    counts = np.bincount(np.asarray(draws) - train, minlength=reg)
    assert counts.tolist() == [2] * reg  # 20 draws = the set cycled through exactly twice
    # deterministic, and resumable mid-epoch
    again = BucketBatchSampler(buckets, 2, seed=1, regularization=flags)
    again.set_epoch(3)
    sampler.set_epoch(3)
    full = list(sampler)
    again.load_state_dict(sampler.state_dict(batches_done=2))
    assert list(again) == full[2:]
    plain = BucketBatchSampler(buckets[:train], 2, seed=1)
    assert len(plain) == 2


def test_scan_summary_counts_training_and_regularization_images(tmp_path, caplog):
    for folder, n in (("train", 3), ("reg", 5)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / folder / f"{i}.png")
    cfg = DataConfig(subsets=[{"path": str(tmp_path / "train"), "repeats": 2},
                              {"path": str(tmp_path / "reg"), "is_reg": True}], resolution=64, bucket_step=32)
    with caplog.at_level(logging.INFO):
        ds = build_dataset(cfg)
    text = caplog.text
    assert "3 usable training images (6 samples per epoch) and 5 regularization images" in text
    assert ds.count_images() == 3 and ds.count_images(regularization=True) == 5
    assert ds.regularization.sum() == 5 and len(ds) == 11
    with pytest.raises(DataError, match="every subset is is_reg"):
        build_dataset(DataConfig(subsets=[{"path": str(tmp_path / "reg"), "is_reg": True}], resolution=64))


# ---- validation hold-out --------------------------------------------------------------------------
def test_holdout_is_deterministic_and_never_takes_regularization_images(tmp_path):
    for folder, n in (("train", 10), ("reg", 4)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.new("RGB", (64, 64), (i * 20, 0, 0)).save(tmp_path / folder / f"{i}.png")
    cfg = DataConfig(subsets=[{"path": str(tmp_path / "train"), "repeats": 3, "flip": True},
                              {"path": str(tmp_path / "reg"), "is_reg": True}], resolution=64, bucket_step=32)
    a = build_dataset(cfg, seed=5, log_summary=False, holdout=0.2)
    b = build_dataset(cfg, seed=5, log_summary=False, holdout=0.2)
    c = build_dataset(cfg, seed=6, log_summary=False, holdout=0.2)
    held = [r.name for r in a.held_out.records]
    assert len(held) == 2 and held == [r.name for r in b.held_out.records]
    assert held != [r.name for r in c.held_out.records]
    assert all("/train/" in n for n in held)
    assert not set(held) & {r.name for r in a.records} and a.count_images() == 8
    assert len(a.held_out) == 2 and not a.held_out.subsets[0].flip  # once each, without randomness
    with pytest.raises(DataError, match="leaving none to train on"):
        build_dataset(cfg, log_summary=False, holdout=0.95)


# ---- wildcards ----------------------------------------------------------------------------------------
def test_wildcards_are_drawn_per_use_and_cached_in_every_variant(tmp_path):
    proc = CaptionProcessor(CaptionSettings(caption_prefix="{sks|zwx}"))
    texts = {proc("a {red|green|blue} circle, {big|small}", np.random.default_rng([0, e])) for e in range(60)}
    assert len(texts) == 2 * 3 * 2 and all(t.split(", ")[0] in ("sks", "zwx") for t in texts)
    assert proc("a {red|green} circle", np.random.default_rng(3)) == proc("a {red|green} circle", np.random.default_rng(3))
    plain = CaptionProcessor(CaptionSettings(shuffle_tags=True))
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    assert plain("a, b, c, {x}", rng_a) == plain("a, b, c, {x}", rng_b)  # braces without | are text
    assert "{x}" in plain("a, b, c, {x}", np.random.default_rng(1))
    Image.new("RGB", (64, 64)).save(tmp_path / "one.png")
    (tmp_path / "one.txt").write_text("a {red|green} shape")
    ds = build_dataset(_config(tmp_path, cache_text=True), log_summary=False)
    assert ds.cache_captions() == ["a green shape", "a red shape"]
    seen = {ds[(0, e)]["caption"] for e in range(20)}
    assert seen == {"a green shape", "a red shape"}
    cache = TextCache(None, "fake")
    cache.build(ds, lambda caps: torch.zeros(len(caps), 2, 3), progress=False)
    assert all(cap in cache for cap in seen)
