"""Aspect-ratio bucket grid, nearest-aspect assignment, no-upscale buckets, bucket table."""
import math

import pytest

from data.buckets import assign_bucket, format_bucket_table, generate_buckets


@pytest.mark.parametrize("res,step", [(1024, 64), (512, 64), (768, 32), (128, 32)])
def test_grid_invariants(res, step):
    buckets = generate_buckets(res, min_side=256, max_side=2048, step=step)
    sq = res // step * step
    assert (sq, sq) in buckets
    for w, h in buckets:
        assert w * h <= res * res and w % step == 0 and h % step == 0
        assert (h, w) in buckets
        assert max(w, h) <= max(2048, sq)
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects)


@pytest.mark.parametrize("size,expected", [
    ((1024, 1024), (1024, 1024)),
    ((1536, 1024), (1216, 832)),   # 3:2
    ((1920, 1080), (1344, 768)),   # 16:9
    ((1080, 1920), (768, 1344)),   # 9:16
    ((800, 1200), (832, 1216)),    # 2:3, smaller than the bucket area: upscaled by default
    ((5000, 500), (2048, 256)),    # 10:1 -> the widest bucket (8:1)
])
def test_nearest_log_aspect(size, expected):
    assert assign_bucket(*size, resolution=1024) == expected
    w, h = expected
    target = math.log(size[0] / size[1])
    best = min(abs(math.log(bw / bh) - target) for bw, bh in generate_buckets(1024))
    assert abs(abs(math.log(w / h) - target) - best) < 1e-12


def test_transposed_image_gets_transposed_bucket():
    for w, h in [(1300, 700), (999, 1001), (640, 480), (3000, 1000)]:
        assert assign_bucket(w, h, resolution=1024) == assign_bucket(h, w, resolution=1024)[::-1]


def test_no_upscale():
    # big enough for its grid bucket: unchanged
    assert assign_bucket(1536, 1024, resolution=1024, no_upscale=True) == (1216, 832)
    # small: own bucket = size rounded down to the step, never larger than the image
    assert assign_bucket(300, 200, resolution=1024, no_upscale=True) == (256, 192)
    assert assign_bucket(300, 200, resolution=1024) == (1216, 832)
    w, h = assign_bucket(700, 650, resolution=1024, no_upscale=True)
    assert (w, h) == (640, 640) and w <= 700 and h <= 650
    # extreme aspect bigger than the area budget is shrunk to it, not enlarged
    w, h = assign_bucket(4000, 300, resolution=1024, no_upscale=True)
    assert w <= 2048 and h <= 300 and w * h <= 1024 * 1024
    assert assign_bucket(50, 400, resolution=1024, no_upscale=True, step=64) is None


def test_disabled_buckets_are_square():
    assert assign_bucket(1920, 1080, resolution=512, enable=False) == (512, 512)


def test_bucket_table():
    text = format_bucket_table({(1024, 1024): 10, (1216, 832): 3}, batch_size=4)
    lines = text.splitlines()
    assert "bucket" in lines[0] and "batches" in lines[0]
    assert "1216x832" in text and "1.46" in text
    assert lines[-1].split()[-2:] == ["13", "4"]  # 13 images, 3 + 1 batches
