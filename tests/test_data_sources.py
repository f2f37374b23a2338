"""Scanning sources: nested folders, captions and fallbacks, subsets/repeats, kohya folders,
metadata files, broken files, strict mode, and HF datasets (save_to_disk, DatasetDict, parquet)."""
import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import DataConfig, SubsetConfig
from data.dataset import build_dataset
from data.errors import DataConfigError, DataError, DataScanError


def _img(path, size=(96, 64), seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, fmt)
    return path


def _captions(ds):
    return {r.name.split("/")[-1]: r.caption for r in ds.records}


def _build(tmp_path, **kw):
    kw.setdefault("resolution", 64)
    kw.setdefault("bucket_step", 32)
    kw.setdefault("min_size", 16)
    return build_dataset(DataConfig(**kw), log_summary=False)


def test_nested_folder_captions_and_fallbacks(tmp_path):
    root = tmp_path / "imgs"
    _img(root / "a.png")
    (root / "a.txt").write_text("tagged, image", encoding="utf-8")
    _img(root / "sub" / "deeper" / "b.jpg")
    (root / "sub" / "deeper" / "b.caption").write_text("custom ext", encoding="utf-8")
    _img(root / "c_no_caption.webp", fmt="WEBP")
    _img(root / "d.bmp")
    (root / "d.txt").write_bytes(b"")
    _img(root / "e.png")
    (root / "e.txt").write_bytes("東京 café ✓".encode())
    _img(root / "f.png")
    (root / "f.txt").write_bytes("caf\xe9".encode("cp1252"))
    _img(root / ".hidden" / "x.png")
    (root / "notes.md").write_text("ignored")
    ds = _build(tmp_path, path=str(root))
    caps = _captions(ds)
    assert set(caps) == {"a.png", "b.jpg", "c_no_caption.webp", "d.bmp", "e.png", "f.png"}
    assert caps["a.png"] == "tagged, image" and caps["e.png"] == "東京 café ✓" and caps["f.png"] == "café"
    assert caps["c_no_caption.webp"] == "c no caption"  # file stem, underscores as spaces
    assert caps["b.jpg"] == "b"  # .caption files are not read with the default extension
    notes = dict(ds.report.caption_notes)
    assert "empty caption file" in notes[str(root / "d.bmp")]
    assert [n for n, _ in ds.report.caption_errors] == [str(root / "f.png")]
    ds = _build(tmp_path, path=str(root), caption_extension="caption", default_caption="a photo",
                caption_from_stem=False)
    caps = _captions(ds)
    assert caps["b.jpg"] == "custom ext" and caps["a.png"] == "a photo"


def test_broken_files_skipped_reported_once_and_strict(tmp_path, caplog):
    root = tmp_path / "imgs"
    for i in range(3):
        _img(root / f"ok{i}.png", seed=i)
    good = (root / "ok0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "fake.jpg").write_text("not really a jpeg")
    _img(root / "tiny.png", size=(8, 8))
    with caplog.at_level(logging.INFO, logger="data"):
        ds = build_dataset(DataConfig(path=str(root), resolution=64, bucket_step=32, min_size=16))
    assert len(ds) == 3
    reasons = dict(ds.report.skipped)
    assert set(reasons) == {str(root / n) for n in ("truncated.png", "zero.jpg", "fake.jpg", "tiny.png")}
    assert "truncated" in reasons[str(root / "truncated.png")] and "empty" in reasons[str(root / "zero.jpg")]
    assert "too small" in reasons[str(root / "tiny.png")]
    summaries = [r.getMessage() for r in caplog.records if "data scan" in r.getMessage()]
    assert len(summaries) == 1 and all(n in summaries[0] for n in ("truncated.png", "zero.jpg", "fake.jpg"))
    with pytest.raises(DataScanError) as err:
        _build(tmp_path, path=str(root), strict=True)
    assert all(n in str(err.value) for n in ("truncated.png", "zero.jpg", "fake.jpg", "tiny.png"))


def test_pixel_limit_and_no_images(tmp_path):
    _img(tmp_path / "big" / "a.png", size=(100, 100))
    _img(tmp_path / "big" / "b.png", size=(40, 40))
    ds = _build(tmp_path, path=str(tmp_path / "big"), max_pixels=5000)
    assert len(ds) == 1 and "too many pixels" in ds.report.skipped[0][1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        _build(tmp_path, path=str(tmp_path / "empty"))
    with pytest.raises(DataConfigError, match="does not exist"):
        _build(tmp_path, path=str(tmp_path / "missing"))


def test_subsets_repeats_resolution_and_caption_settings(tmp_path):
    for i in range(2):
        _img(tmp_path / "a" / f"{i}.png", size=(64, 64), seed=i)
        _img(tmp_path / "b" / f"{i}.png", size=(128, 64), seed=i + 5)
    ds = _build(tmp_path, subsets=[
        SubsetConfig(path=str(tmp_path / "a"), repeats=3, caption_prefix="trig"),
        {"path": str(tmp_path / "b"), "resolution": 96, "default_caption": "wide"},
    ])
    assert len(ds) == 2 * 3 + 2
    assert sorted(ds.bucket_counts().values()) == [2, 6]
    assert ds[0]["caption"].startswith("trig, ") and ds[6]["caption"] == "wide"
    assert ds[6]["target_size"][0] * ds[6]["target_size"][1] <= 96 * 96
    assert [s[0] for s in ds.report.subsets] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_kohya_repeat_folders(tmp_path):
    _img(tmp_path / "k" / "10_ohwx dog" / "a.png")
    _img(tmp_path / "k" / "2_cat" / "b.png")
    (tmp_path / "k" / "2_cat" / "b.txt").write_text("a cat")
    _img(tmp_path / "k" / "loose.png")
    _img(tmp_path / "k" / "misc" / "c.png")
    ds = _build(tmp_path, path=str(tmp_path / "k"), kohya_repeats=True)
    assert len(ds) == 12
    assert {r.caption: r.repeats for r in ds.records} == {"ohwx dog": 10, "a cat": 2}
    assert {n.split("/")[-1] for n, _ in ds.report.skipped} == {"loose.png", "misc"}


def test_metadata_jsonl_and_csv(tmp_path):
    root = tmp_path / "hf_folder"
    _img(root / "train" / "x.png")
    _img(root / "train" / "sub" / "y.png")
    _img(root / "train" / "z.png")
    (root / "train" / "z.txt").write_text("sidecar")
    rows = [{"file_name": "x.png", "text": "meta x"}, {"file_name": "sub/y.png", "text": "meta y"},
            {"file_name": "gone.png", "text": "missing"}]
    (root / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    ds = _build(tmp_path, path=str(root))
    assert _captions(ds) == {"x.png": "meta x", "y.png": "meta y", "z.png": "sidecar"}
    assert any("gone.png" in n for n, _ in ds.report.skipped)
    assert any("invalid JSON" in r for _, r in ds.report.caption_errors)
    csv_root = tmp_path / "csv"
    _img(csv_root / "p.png")
    (csv_root / "metadata.csv").write_text('file_name,prompt\np.png,"from, csv"\n', encoding="utf-8")
    assert _captions(_build(tmp_path, path=str(csv_root), caption_column="prompt")) == {"p.png": "from, csv"}


def _hf_dataset(tmp_path, n=4):
    import datasets

    paths = [str(_img(tmp_path / "src" / f"{i}.png", size=(64 + 32 * (i % 2), 64), seed=i)) for i in range(n)]
    paths.append(str(tmp_path / "src" / "broken.png"))
    (tmp_path / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    caps = [f"caption {i}" for i in range(n)] + ["broken"]
    caps[1] = None
    return datasets.Dataset.from_dict({"image": paths, "caption": caps}, features=features)


def test_hf_save_to_disk_datasetdict_and_parquet(tmp_path):
    import datasets

    ds_hf = _hf_dataset(tmp_path)
    ds_hf.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds_hf, "test": ds_hf.select([0])}).save_to_disk(str(tmp_path / "dict"))
    ds_hf.to_parquet(str(tmp_path / "data.parquet"))
    common = {"caption_column": "caption", "default_caption": "fallback", "cache_dir": str(tmp_path / "cache"),
              "resolution": 128}
    for source, split in (("saved", "train"), ("dict", "test"), ("data.parquet", "train")):
        ds = _build(tmp_path, path=str(tmp_path / source), split=split, **common)
        n = 1 if split == "test" else 4
        assert len(ds) == n, source
        if n == 4:
            assert [r.caption for r in ds.records] == ["caption 0", "fallback", "caption 2", "caption 3"]
            assert any("[4]" in name for name, _ in ds.report.skipped)
            assert sorted(ds.bucket_counts().values()) == [2, 2]
        sample = ds[0]
        assert sample["pixels"].shape[0] == 3 and sample["caption"] == "caption 0"
        clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
        assert torch.equal(clone[0]["pixels"], sample["pixels"])
    with pytest.raises(DataConfigError, match="caption_column.*columns: image, caption"):
        _build(tmp_path, path=str(tmp_path / "saved"), caption_column="nope")
    with pytest.raises(DataConfigError, match="split"):
        _build(tmp_path, path=str(tmp_path / "dict"), split="validation", caption_column="caption")


def test_shipped_quickstart_data_scans_cleanly():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "examples" / "quickstart_data"
    ds = build_dataset(DataConfig(path=str(root), resolution=128, bucket_step=32), log_summary=False)
    assert len(ds) == 12 and not ds.report.errors and not ds.report.caption_notes
    assert len(ds.bucket_counts()) == 3  # square, landscape and portrait images
    assert sum(p.stat().st_size for p in root.iterdir()) < 200_000
    assert ds[0]["caption"] == "a red circle on a white background"
