"""Loss masks (`train.masked_loss`): where they come from and how they follow the image.

A mask is an 8-bit grey image the size (or at least the aspect ratio) of its image: white (255) =
learn, black (0) = ignore, grey between. It comes from a sidecar file `<image stem>-masklabel.png`
beside the image, or (`data.alpha_mask`) from the image's alpha channel. Images without one are
learnt whole. Masks are never training images themselves: the folder scan skips `*-masklabel.png`.

A mask goes through exactly the image's geometry (`transforms.render`: the same cover resize,
crop box and flip), then becomes a float (1, H, W) in [0, 1], and is reduced to the latent grid by
area averaging (`to_latent_grid`: each latent pixel gets the mean of the 8 x 8 pixels it encodes).
The latent cache stores that latent-resolution mask with the latent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DataError
from .images import ImageLoadError, _open, read_bytes
from .sources import MASK_SUFFIX, is_mask_file, sidecar_path  # noqa: F401 - the mask file names live with the scan
from .transforms import CropPlan, render

_ASPECT_TOLERANCE = 0.02


class MaskError(DataError):
    """A mask is unusable (unreadable, wrong aspect ratio, or ignores every pixel)."""


@dataclass(frozen=True)
class MaskSettings:
    """How a dataset reads masks: `source` "sidecar" or "alpha"; `allow_empty`: a mask that ignores
    every pixel is accepted (only sensible when unmasked pixels still count, `train.unmasked_weight` > 0)."""

    source: str = "sidecar"
    allow_empty: bool = False


def read_sidecar(image_path: str | None, size: tuple[int, int], max_pixels: int) -> Image.Image | None:
    """The sidecar mask of an image of `size` (w, h) as an "L" image, or None when there is none.

    Raises MaskError naming the mask file when it is unreadable or its aspect ratio differs from
    the image's (a mask of another resolution but the same aspect ratio is scaled with the image).
    """
    if image_path is None:
        return None
    path = sidecar_path(image_path)
    if not os.path.exists(path):
        return None
    try:
        img = _open(read_bytes(path), max_pixels)
        img.load()
    except (ImageLoadError, OSError) as exc:
        reason = exc.reason if isinstance(exc, ImageLoadError) else str(exc)
        raise MaskError(f"mask {path}: {reason}; fix or remove it") from None
    w, h = size
    if abs(img.width / img.height - w / h) > _ASPECT_TOLERANCE * w / h:
        raise MaskError(f"mask {path} is {img.width}x{img.height} but its image is {w}x{h} (another aspect ratio); "
                        "save the mask at the image's size")
    return img.convert("L")


def check_not_empty(mask: Image.Image, name: str, settings: MaskSettings) -> None:
    """MaskError naming `name` when `mask` is black everywhere and empty masks are not allowed."""
    if not settings.allow_empty and mask.getextrema()[1] == 0:
        raise MaskError(f"mask of {name} ignores every pixel (all black), so the image would teach nothing; fix the "
                        "mask, remove the image, or set train.unmasked_weight > 0")


def render_mask(mask: Image.Image, plan: CropPlan) -> torch.Tensor:
    """float32 (1, H, W) in [0, 1] of `mask` cut out exactly as the image is for `plan`."""
    out = render(mask, plan)
    arr = np.asarray(out, dtype=np.float32) * np.float32(1 / 255)
    return torch.from_numpy(arr.copy())[None]


def full_mask(plan: CropPlan) -> torch.Tensor:
    """The all-ones (1, H, W) mask of an image without a mask."""
    w, h = plan.bucket
    return torch.ones((1, h, w), dtype=torch.float32)


def to_latent_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-average masks (B, 1, H, W) (or one (1, H, W)) onto a latent grid `size` = (h, w)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    single = mask.dim() == 3
    out = F.interpolate(mask[None] if single else mask, size=tuple(size), mode="area")
    return out[0] if single else out
