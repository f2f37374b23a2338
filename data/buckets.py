"""Aspect-ratio buckets (kohya-style): a grid of (width, height) sizes with area <= resolution^2.

Grid: for every width w from min_side to max_side in `step`s, the largest height h (multiple of
`step`, <= max_side) with w * h <= resolution^2, plus its transpose and the square bucket. An image
goes to the bucket whose aspect ratio is nearest in log space (|log(w/h) - log(bw/bh)|; ties go
to the larger area), so 2:1 and 1:2 are equally far from 1:1.

No-upscale: an image that would have to be enlarged to cover its grid bucket instead gets its own
bucket - its size (shrunk only to respect the area and max side) rounded down to `step` - so it is
only ever cropped by less than `step` pixels per side, never enlarged.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

Bucket = tuple[int, int]  # (width, height) in pixels


def square_side(resolution: int, step: int) -> int:
    """Side of the square bucket: resolution rounded down to `step` (at least `step`)."""
    return max(step, resolution // step * step)


@lru_cache(maxsize=64)
def generate_buckets(resolution: int, *, min_side: int = 256, max_side: int = 2048, step: int = 64) -> tuple[Bucket, ...]:
    """Bucket grid for `resolution`, sorted by aspect ratio (w/h) ascending.

    min_side is lowered to half the square side when larger (so small resolutions still get aspect
    buckets) and max_side raised to the square side when smaller (so the square bucket exists).
    """
    if step <= 0 or resolution <= 0:
        raise ValueError(f"generate_buckets: resolution and step must be positive, got {resolution}, {step}")
    sq = square_side(resolution, step)
    lo = min(max(step, min_side // step * step), max(step, sq // 2 // step * step))
    hi = max(max_side // step * step, sq)
    max_area = resolution * resolution
    found = {(sq, sq)}
    for w in range(lo, hi + 1, step):
        h = min(hi, max_area // w // step * step)
        if h >= lo:
            found.add((w, h))
            found.add((h, w))
    return tuple(sorted(found, key=lambda b: (b[0] / b[1], b[0] * b[1])))


def nearest_bucket(width: int, height: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """Bucket with the nearest log-aspect ratio to width x height (ties: larger area)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 12), -b[0] * b[1]))


def assign_bucket(
    width: int,
    height: int,
    *,
    resolution: int,
    min_side: int = 256,
    max_side: int = 2048,
    step: int = 64,
    no_upscale: bool = False,
    enable: bool = True,
) -> Bucket | None:
    """Bucket (w, h) for an image of width x height pixels; None when no_upscale leaves < `step`.

    enable=False gives the resolution x resolution square for every image (no_upscale ignored).
    """
    if not enable:
        return (resolution, resolution)
    bucket = nearest_bucket(width, height, generate_buckets(resolution, min_side=min_side, max_side=max_side, step=step))
    if not no_upscale or max(bucket[0] / width, bucket[1] / height) <= 1.0:
        return bucket
    hi = max(max_side // step * step, square_side(resolution, step))
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)), hi / width, hi / height)
    bw = int(width * scale) // step * step
    bh = int(height * scale) // step * step
    if bw < step or bh < step:
        return None
    return (bw, bh)


def format_bucket_table(counts: Mapping[Bucket, int], batch_size: int | None = None) -> str:
    """Printable table of buckets: size, aspect, images and (with batch_size) batches, plus a total.

    counts maps (width, height) -> number of samples (repeats included).
    """
    rows = sorted(counts.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0]))
    head = f"{'bucket':>11}  {'aspect':>6}  {'images':>7}"
    if batch_size:
        head += f"  {'batches':>7}"
    lines = [head]
    total_batches = 0
    for (w, h), n in rows:
        line = f"{f'{w}x{h}':>11}  {w / h:>6.2f}  {n:>7}"
        if batch_size:
            nb = math.ceil(n / batch_size)
            total_batches += nb
            line += f"  {nb:>7}"
        lines.append(line)
    total = f"{f'{len(rows)} buckets':>11}  {'':>6}  {sum(counts.values()):>7}"
    if batch_size:
        total += f"  {total_batches:>7}"
    lines.append(total)
    return "\n".join(lines)
