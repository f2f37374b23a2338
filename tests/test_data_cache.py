"""Latent and text caches: hits, misses, invalidation, flips, resume after interruption, refusals."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data.cache import LatentCache, TextCache, check_text_cache_allowed
from data.config import DataConfig
from data.dataset import build_dataset
from data.errors import CacheError, DataConfigError


class FakeVAE:
    """Deterministic stand-in: 8x average pool -> 4 channels; counts encoded images."""

    def __init__(self, offset=0.0):
        self.calls = 0
        self.offset = offset

    def __call__(self, x):
        self.calls += x.shape[0]
        z = torch.nn.functional.avg_pool2d(x, 8)
        z = torch.cat([z, z[:, :1] * 0.5], dim=1) + self.offset
        return z, torch.full_like(z, 0.1)


class FakeGaussian:
    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar
        self.std = torch.exp(0.5 * logvar)


def _images(root, n=4):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 255, (64, 64 + 32 * (i % 2), 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"caption {i}")
    return root


def _dataset(root, **kw):
    kw = {"resolution": 64, "bucket_step": 32, "min_size": 16, **kw}
    return build_dataset(DataConfig(path=str(root), **kw), log_summary=False)


def test_hits_and_invalidation(tmp_path):
    root = _images(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    vae = FakeVAE()
    ds = _dataset(root)
    stats = LatentCache(cache_dir, "vae-A").build(ds, vae, batch_size=3, progress=False)
    assert stats == {"entries": 4, "cached": 0, "computed": 4, "failed": 0} and vae.calls == 4
    # unchanged: everything is a hit
    vae.calls = 0
    stats = LatentCache(cache_dir, "vae-A").build(_dataset(root), vae, progress=False)
    assert stats["cached"] == 4 and vae.calls == 0
    # changed image bytes: only that image is recomputed
    arr = np.asarray(Image.open(root / "2.png")).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(root / "2.png")
    assert LatentCache(cache_dir, "vae-A").build(_dataset(root), vae, progress=False)["computed"] == 1
    # changed caption: latents stay valid (they do not depend on the caption) ...
    (root / "0.txt").write_text("a new caption")
    assert LatentCache(cache_dir, "vae-A").build(_dataset(root), vae, progress=False)["computed"] == 0
    # ... changed resolution (new buckets) and changed model: everything recomputed
    assert LatentCache(cache_dir, "vae-A").build(_dataset(root, resolution=96), vae, progress=False)["computed"] == 4
    assert LatentCache(cache_dir, "vae-B").build(_dataset(root), vae, progress=False)["computed"] == 4
    # changed background colour changes pixels of transparent images, so it is part of the key too
    assert LatentCache(cache_dir, "vae-B").build(_dataset(root, background="black"), vae, progress=False)["computed"] == 4


def test_samples_from_cache_match_encoder_and_flip(tmp_path):
    root = _images(tmp_path / "imgs", n=2)
    ds = _dataset(root, flip=True)
    pixel_ds = _dataset(root, flip=True)
    vae = FakeVAE()
    cache = LatentCache(None, "vae", dtype="float32")  # in-memory
    cache.build(ds, vae, progress=False)
    entry = cache.load(ds._latent_keys[1])
    assert set(entry) == {"mean", "std", "mean_flip", "std_flip"}
    flips = set()
    for epoch in range(6):
        s, p = ds[(1, epoch)], pixel_ds[(1, epoch)]
        assert "pixels" not in s and s["latent_mean"].shape == (4, 8, 8)
        ref_mean, _ = vae(p["pixels"][None])
        assert torch.allclose(s["latent_mean"], ref_mean[0], atol=1e-5)  # flipped variant when flipped
        assert s["crop_top_left"] == p["crop_top_left"] and s["caption"] == p["caption"]
        flips.add(torch.equal(s["latent_mean"], entry["mean_flip"]))
    assert flips == {True, False}  # both variants were served


def test_gaussian_object_dtype_and_corrupt_file(tmp_path):
    root = _images(tmp_path / "imgs", n=1)
    ds = _dataset(root)

    def encode(x):
        z = torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4]
        return FakeGaussian(z, torch.full_like(z, -2.0))

    cache = LatentCache(tmp_path / "c", "g", dtype="float16")
    cache.build(ds, encode, progress=False)
    s = ds[0]
    assert s["latent_std"].dtype == torch.float32 and torch.allclose(s["latent_std"], torch.full_like(s["latent_std"], np.exp(-1.0)), atol=1e-3)
    files = list((tmp_path / "c" / "latents").rglob("*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(b"garbage")
    with pytest.raises(CacheError, match="corrupt"):
        ds[0]
    with pytest.raises(CacheError, match="encode_fn must return"):
        LatentCache(tmp_path / "d", "x").build(_dataset(root), lambda x: x, progress=False)


def test_interrupted_build_resumes(tmp_path):
    root = _images(tmp_path / "imgs", n=4)
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return FakeVAE()(x)

    with pytest.raises(KeyboardInterrupt):
        LatentCache(tmp_path / "c", "m").build(_dataset(root), flaky, batch_size=1, progress=False)
    entries = [p.name for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert len(entries) == 2 and all(name.endswith(".safetensors") for name in entries)  # no partial files
    vae = FakeVAE()
    stats = LatentCache(tmp_path / "c", "m").build(_dataset(root), vae, progress=False)
    assert stats["cached"] == 2 and stats["computed"] == 2 and vae.calls == 2


def test_random_crop_refused(tmp_path):
    with pytest.raises(DataConfigError, match="random_crop.*cache_latents"):
        DataConfig(path=str(tmp_path), random_crop=True, cache_latents=True)
    ds = _dataset(_images(tmp_path / "imgs", n=1), random_crop=True)
    with pytest.raises(CacheError, match="random_crop"):
        LatentCache(None, "m").build(ds, FakeVAE(), progress=False)


def test_text_cache_keys_and_refusals(tmp_path):
    root = _images(tmp_path / "imgs", n=3)
    seen = []

    def encode_text(captions):
        seen.extend(captions)
        ctx = torch.stack([torch.full((77, 8), float(len(c))) for c in captions])
        return ctx, ctx[:, 0, :4]

    ds = _dataset(root, caption_dropout=0.5, caption_prefix="trig")
    stats = TextCache(tmp_path / "t", "te-A").build(ds, encode_text, progress=False)
    assert stats["computed"] == 4 and "" in seen and "trig, caption 0" in seen
    for epoch in range(4):
        s = ds[(0, epoch)]
        assert s["context"].shape == (77, 8) and s["pooled"].shape == (4,)
        assert s["context"][0, 0].item() == len(s["caption"])
    # hit, caption change (miss for that caption only), model change (all miss)
    assert TextCache(tmp_path / "t", "te-A").build(_dataset(root, caption_dropout=0.5, caption_prefix="trig"),
                                                   encode_text, progress=False)["computed"] == 0
    (root / "1.txt").write_text("edited")
    assert TextCache(tmp_path / "t", "te-A").build(_dataset(root, caption_dropout=0.5, caption_prefix="trig"),
                                                   encode_text, progress=False)["computed"] == 1
    assert TextCache(tmp_path / "t", "te-B").build(ds, encode_text, progress=False)["computed"] == 4
    # refusals name the reason
    with pytest.raises(CacheError, match="shuffle_tags"):
        check_text_cache_allowed(shuffle_tags=True, tag_dropout=0.0, train_text_encoder=False)
    with pytest.raises(CacheError, match="tag_dropout"):
        check_text_cache_allowed(shuffle_tags=False, tag_dropout=0.1, train_text_encoder=False)
    with pytest.raises(CacheError, match="text encoders are trained"):
        TextCache(None, "te").build(ds, encode_text, train_text_encoder=True, progress=False)
    check_text_cache_allowed(shuffle_tags=False, tag_dropout=0.0, train_text_encoder=False, caption_dropout=0.2)
    with pytest.raises(DataConfigError, match="shuffle_tags.*cache_text"):
        DataConfig(path=str(root), shuffle_tags=True, cache_text=True)
    assert not any(name.endswith(".tmp") for _, _, names in os.walk(tmp_path / "t") for name in names)


def test_build_caches_from_config_flags(tmp_path):
    from data.cache import build_caches

    root = _images(tmp_path / "imgs", n=2)
    ds = _dataset(root, cache_latents=True, cache_text=True, cache_dir=str(tmp_path / "c"), cache_dtype="float16")
    with pytest.raises(CacheError, match="needs the VAE"):
        build_caches(ds)
    stats = build_caches(ds, latent_encode=FakeVAE(), latent_model_id="v",
                         text_encode=lambda caps: torch.zeros(len(caps), 77, 8), text_model_id="t", progress=False)
    assert stats["latents"]["computed"] == 2 and stats["text"]["computed"] == 2
    s = ds[1]
    assert s["latent_mean"].shape == (4, 8, 8) and s["context"].shape == (77, 8) and s["pooled"] is None
    assert {p.parent.parent.name for p in (tmp_path / "c").rglob("*.safetensors")} == {"latents", "text"}
