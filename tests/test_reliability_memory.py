"""In-memory latent/text caches are sized before anything is encoded, and a run whose caches would
not fit in the available memory stops with one line that says to use `data.cache_dir`.

The estimate comes from the scan and the model's shapes; it is checked against the bytes the
caches really hold for the tiny families (with flips, so mirrored latents count) and against the
SDXL arithmetic. Low memory is injected by replacing `data.cache.available_memory` (which reads
MemAvailable from /proc/meminfo) with a small number.
"""
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from training_runs import TINY_LORA, copy_quickstart_images

import data.cache as cache_module
import models
import trainer.__main__ as cli
from data.cache import (
    ENTRY_OVERHEAD,
    TENSOR_OVERHEAD,
    CacheEstimate,
    CacheShapes,
    LatentCache,
    TextCache,
    available_memory,
    check_memory_cache,
    estimate_memory_cache,
)
from data.config import DataConfig
from data.dataset import build_dataset
from data.errors import CacheError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return copy_quickstart_images(tmp_path_factory.mktemp("images"), 6)


def test_sdxl_estimate_is_about_1_2_mb_per_image_at_1024_px():
    shapes = CacheShapes.of(models.build_model("sdxl", device="meta"))
    assert shapes == CacheShapes(latent_channels=4, downsample=8, text={"context": (77, 2048), "pooled": (1280,)})
    n = 1000
    dataset = SimpleNamespace(records=[SimpleNamespace(subset=0)] * n, bucket_sizes=[(1024, 1024)],
                              record_bucket=[0] * n, subsets=[SimpleNamespace(flip=False)],
                              cache_captions=lambda: [f"caption {i}" for i in range(n)])
    est = estimate_memory_cache(dataset, shapes, latents=True, text=True, dtype="float32")
    assert est.latent_bytes == n * (2 * (4 * 128 * 128 * 4 + TENSOR_OVERHEAD) + ENTRY_OVERHEAD)
    assert est.text_bytes == n * ((77 * 2048 + 1280) * 4 + 2 * TENSOR_OVERHEAD + ENTRY_OVERHEAD)
    assert 1.15e6 < est.total / n < 1.2e6
    half = estimate_memory_cache(dataset, shapes, latents=True, text=True, dtype="float16")
    assert half.total < 0.51 * est.total


@pytest.mark.parametrize("family", ["tiny-sdxl", "tiny-sd15"])
def test_estimate_covers_what_the_caches_really_hold(images, family):
    bundle = models.build_model(family)
    cfg = DataConfig(path=str(images), resolution=64, bucket_step=32, flip=True, cache_latents=True,
                     cache_text=True, num_workers=0)
    dataset = build_dataset(cfg, log_summary=False)
    latents, text = LatentCache(None, "m"), TextCache(None, "m")
    latents.build(dataset, bundle.vae.encode, progress=False)
    text.build(dataset, lambda c: bundle.encode_prompt(list(c)), progress=False)
    est = estimate_memory_cache(dataset, CacheShapes.of(bundle), latents=True, text=True)

    def held(store):
        tensors = [t for entry in store.memory.values() for t in entry.values()]
        return sum(t.nbytes for t in tensors) + TENSOR_OVERHEAD * len(tensors) + ENTRY_OVERHEAD * len(store.memory)

    assert est.latent_bytes == held(latents.store) and est.images == len(latents.store.memory)
    assert est.text_bytes == held(text.store) and est.captions == len(text.store.memory)


def test_check_refuses_beyond_the_limit_and_counts_every_process():
    est = CacheEstimate(latent_bytes=300, text_bytes=100, images=3, captions=3)
    check_memory_cache(est, limit=0.5, available=800)
    with pytest.raises(CacheError, match=r"about 400 B: .* x 2 processes, more than data.cache_memory_limit=0.5 of "
                                         r"the 1.5 kB available; set data.cache_dir"):
        check_memory_cache(est, limit=0.5, processes=2, available=1500)
    check_memory_cache(est, limit=None, available=1)  # null = no limit
    assert available_memory() is None or available_memory() > 0


def _train(out: Path, data: Path, *extra) -> list[str]:
    return ["--config", str(TINY_LORA), f"output.dir={out}", f"data.path={data}", "train.max_steps=2",
            "optim.warmup_steps=0", "output.tensorboard=false", "data.num_workers=0", *extra]


def test_a_run_whose_caches_do_not_fit_stops_before_encoding(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cache_module, "available_memory", lambda meminfo="/proc/meminfo": 100_000)
    code = cli.main(_train(tmp_path, images))
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: in-memory caches (no data.cache_dir): about ")
    assert ("more than data.cache_memory_limit=0.5 of the 100.0 kB available; set data.cache_dir to a folder to "
            "keep the caches on disk") in errors[0]
    assert "caching latents" not in err and "caching text" not in err
    assert not list((tmp_path / "quickstart").glob("checkpoints/step-*"))

    from accelerate.state import AcceleratorState

    for extra in (["data.cache_memory_limit=null"], [f"data.cache_dir={tmp_path / 'cache'}"]):
        AcceleratorState._reset_state()
        shutil.rmtree(tmp_path / "quickstart", ignore_errors=True)
        assert cli.main(_train(tmp_path, images, *extra)) == 0, capsys.readouterr().err
    assert "in-memory caches" not in capsys.readouterr().err  # on disk: nothing to size


def test_cache_memory_limit_is_checked(images, tmp_path, capsys):
    assert cli.main(_train(tmp_path, images, "data.cache_memory_limit=1.5")) == 2
    assert "data.cache_memory_limit: must be in (0, 1]" in capsys.readouterr().err
