"""Loading: DataLoader with workers, collate, exact resume with prefetching workers, device prefetch,
benchmark smoke test."""
import numpy as np
import pytest
import torch
from PIL import Image

from trainer.bench.data import benchmark_pipeline
from data.config import DataConfig
from data.dataset import build_dataset
from data.loader import DevicePrefetcher, build_dataloader, collate_batch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_imgs")
    sizes = [(64, 64), (96, 64), (64, 96)]
    for i in range(12):
        w, h = sizes[i % 3]
        arr = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"tag{i}, red, round, small")
    cfg = DataConfig(path=str(root), resolution=64, bucket_step=32, min_size=16, flip=True, random_crop=True,
                     shuffle_tags=True, keep_tokens=1)
    return build_dataset(cfg, seed=7, log_summary=False)


def _signature(batches):
    return [(b["index"].tolist(), b["caption"], b["crop_top_left"], float(b["pixels"].sum())) for b in batches]


def test_two_workers_match_main_process(dataset):
    ref = build_dataloader(dataset, 2, seed=1, num_workers=0)
    ref.set_epoch(2)
    expected = _signature(list(ref))
    loader = build_dataloader(dataset, 2, seed=1, num_workers=2)
    loader.set_epoch(2)
    batches = list(loader)
    assert _signature(batches) == expected
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(len(dataset)))
    for b in batches:
        n = len(b["caption"])
        assert b["pixels"].dtype == torch.float32 and b["pixels"].shape[:2] == (n, 3)
        assert b["pixels"].shape[2:] == tuple(b["target_size"][0])
        assert b["add_time_ids"].shape == (n, 6)
        assert b["add_time_ids"][0].tolist() == [*b["original_size"][0], *b["crop_top_left"][0], *b["target_size"][0]]


def test_resume_is_exact_despite_worker_prefetch(dataset):
    full = build_dataloader(dataset, 2, seed=3, num_workers=0)
    full.set_epoch(1)
    expected = _signature(list(full))
    loader = build_dataloader(dataset, 2, seed=3, num_workers=2, prefetch_factor=2)
    loader.set_epoch(1)
    it = iter(loader)
    head = [next(it), next(it)]
    state = loader.state_dict()
    assert (state["epoch"], state["batch_index"]) == (1, 2)
    del it, loader
    resumed = build_dataloader(dataset, 2, seed=3, num_workers=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])
    assert _signature(head + list(resumed)) == expected


def test_samples_are_deterministic_per_seed_epoch_index(dataset):
    a, b = dataset[(3, 1)], dataset[(3, 1)]
    assert a["caption"] == b["caption"] and torch.equal(a["pixels"], b["pixels"])
    assert a["caption"].startswith("tag3, ")  # keep_tokens=1
    variants = {(dataset[(3, e)]["caption"], dataset[(3, e)]["crop_top_left"]) for e in range(8)}
    assert len(variants) > 3  # shuffles, crops and flips change with the epoch


def test_collate_and_cpu_prefetcher():
    samples = [{"pixels": torch.zeros(3, 8, 8), "caption": c, "original_size": (9, 8), "crop_top_left": (0, 1),
                "target_size": (8, 8), "index": i, "name": f"n{i}", "pooled": None} for i, c in enumerate("ab")]
    batch = collate_batch(samples)
    assert batch["pixels"].shape == (2, 3, 8, 8) and batch["caption"] == ["a", "b"] and batch["pooled"] is None
    assert batch["original_size"] == [(9, 8), (9, 8)]
    with pytest.raises(ValueError, match="one bucket"):
        collate_batch([samples[0], {**samples[1], "pixels": torch.zeros(3, 8, 16)}])
    moved = list(DevicePrefetcher([batch], "cpu"))
    assert torch.equal(moved[0]["pixels"], batch["pixels"]) and moved[0]["caption"] == ["a", "b"]


@pytest.mark.gpu
def test_cuda_prefetcher_overlaps_and_preserves_values(dataset):
    loader = build_dataloader(dataset, 2, seed=0, num_workers=2, device="cuda")
    ref = build_dataloader(dataset, 2, seed=0, num_workers=0)
    for got, want in zip(loader, ref):
        assert got["pixels"].is_cuda and torch.equal(got["pixels"].cpu(), want["pixels"])


def test_benchmark_smoke():
    result = benchmark_pipeline(n=4, res=128, num_workers=0, batch_size=2)
    assert result["n"] == 4 and result["decode_img_s"] > 0 and result["cached_latents_img_s"] > 0
    assert result["goal_img_s"] == 6.5
