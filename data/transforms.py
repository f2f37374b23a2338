"""Resize-to-cover, crop, flip and normalise: from a decoded image to a bucket-sized tensor.

Geometry is planned from the probed image size alone (`plan_crop`), so the conditioning values
(original size, crop corner, target size) are known without decoding - cached-latent training never
opens the image. Conventions (SDXL / kohya):

- original_size = (h, w) of the image after EXIF orientation, before resizing;
- crop_top_left = (top, left) of the crop in the resized image; after a horizontal flip
  left = resized_w - left - crop_w (the corner of the crop in the flipped image);
- target_size = (h, w) of the bucket.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

Size = tuple[int, int]  # (width, height) in pixels

# LANCZOS is the sharpest PIL filter; reducing_gap=3 first box-reduces by an integer factor when
# shrinking a lot (much faster, visually identical per PIL's docs for gaps >= 3).
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class CropPlan:
    """Where the bucket-sized crop comes from.

    size: (w, h) of the source image; resized: (w, h) after the cover resize; bucket: (w, h);
    top/left: crop corner in the resized image *before* any flip; flip: horizontal flip.
    """

    size: Size
    resized: Size
    bucket: Size
    top: int
    left: int
    flip: bool = False

    @property
    def original_size(self) -> tuple[int, int]:
        """(h, w) of the source image."""
        return (self.size[1], self.size[0])

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) in the (flipped, if flip) resized image - the SDXL conditioning value."""
        left = self.resized[0] - self.left - self.bucket[0] if self.flip else self.left
        return (self.top, left)

    @property
    def target_size(self) -> tuple[int, int]:
        """(h, w) of the bucket."""
        return (self.bucket[1], self.bucket[0])


def cover_size(size: Size, bucket: Size) -> Size:
    """(w, h) of `size` scaled (keeping its aspect) to the smallest size covering `bucket`."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    return (max(bw, round(w * scale)), max(bh, round(h * scale)))


def plan_crop(size: Size, bucket: Size, *, random_crop: bool = False, flip: bool = False,
              rng: np.random.Generator | None = None) -> CropPlan:
    """Cover-resize geometry and crop corner (center, or uniform random with `rng`)."""
    rw, rh = cover_size(size, bucket)
    bw, bh = bucket
    if random_crop:
        if rng is None:
            raise ValueError("plan_crop: random_crop needs an rng")
        top = int(rng.integers(0, rh - bh + 1))
        left = int(rng.integers(0, rw - bw + 1))
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    return CropPlan(size=tuple(size), resized=(rw, rh), bucket=tuple(bucket), top=top, left=left, flip=flip)


def render(img: Image.Image, plan: CropPlan) -> Image.Image:
    """Bucket-sized RGB image for `plan`.

    `img` may be smaller than plan.size (JPEG draft decoding); coordinates are scaled accordingly.
    Only the kept region is resampled (PIL's resize box) - same pixels as resize-then-crop, less work.
    """
    (rw, rh), (bw, bh) = plan.resized, plan.bucket
    fx, fy = img.width / rw, img.height / rh  # decoded-image pixels per resized pixel
    box = (plan.left * fx, plan.top * fy, (plan.left + bw) * fx, (plan.top + bh) * fy)
    if img.size == (rw, rh):  # no scaling needed (e.g. an image of bucket width): crop only
        out = img.crop((plan.left, plan.top, plan.left + bw, plan.top + bh))
    else:
        out = img.resize((bw, bh), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    if plan.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"to_tensor: expected an RGB image, got mode {img.mode} with shape {arr.shape}")
    # numpy rather than torch ops: single-threaded and fast whatever torch's thread settings are
    # (torch's intra-op threads contend with DataLoader workers on small machines).
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
    np.multiply(arr.transpose(2, 0, 1), np.float32(1 / 127.5), out=out, dtype=np.float32)
    out -= np.float32(1.0)
    return torch.from_numpy(out)
