"""The VAE objective and its quality measure.

    loss = rec(x, x') + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W) + edge_weight * edge(x, x')

Images are (B, 3, H, W) in [-1, 1]. `rec` is the mean per-pixel squared error (default) or L1.
The KL is summed over the latent and divided by the pixel count, which is ldm's objective
(sums over pixels and latent, `kl_weight` 1e-6 for the SD VAEs) divided by 3 H W: the same
`kl_weight` means the same trade-off, while the loss stays a per-pixel number.

Why MSE by default: the SD VAE used L1 (plus LPIPS and a GAN), and L1 was expected to keep flat
colours and edges sharper. Measured on the shapes world (configs/README.md, "VAE training") MSE
learns much faster: it weighs the large errors (a shape's colour and outline) above the many small
background ones, where L1 pulls every pixel equally and, while the shape is still uncertain, its
median solution is the background. L1 stays available.

Why no perceptual term: LPIPS needs downloaded network weights (not available here), and a learned
feature metric buys texture realism that flat-coloured shapes do not have. The cheap alternative
offered is `edge`: L1 between the finite differences (horizontal and vertical) of image and
reconstruction at a few 2x average-pooled scales, which weighs edge placement and sharpness more
than the plain per-pixel loss does. It is off by default: on the shapes world it slowed training
down (same README section).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.vae import DiagonalGaussian

RECONSTRUCTION_LOSSES = ("mse", "l1")


def reconstruction_loss(images: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-pixel error of (B, C, H, W) tensors: `l1` |x - x'| or `mse` (x - x')^2; 0-dim fp32."""
    diff = recon.float() - images.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "mse":
        return diff.square().mean()
    raise ValueError(f"loss.reconstruction: unknown loss {kind!r}; choose one of {', '.join(RECONSTRUCTION_LOSSES)}")


def kl_per_pixel(posterior: DiagonalGaussian, pixels: int) -> torch.Tensor:
    """KL(q || N(0, I)) summed over each latent, averaged over the batch, divided by `pixels` (3 H W)."""
    return posterior.kl().float().mean() / pixels


def edge_loss(images: torch.Tensor, recon: torch.Tensor, scales: int) -> torch.Tensor:
    """Mean L1 between image gradients (finite differences along H and W) of `images` and `recon`,
    averaged over `scales` scales (each a 2x average pool of the previous); 0-dim fp32."""
    x, y = images.float(), recon.float()
    total = x.new_zeros(())
    for level in range(scales):
        if level:
            if min(x.shape[-2:]) < 4:
                scales = level
                break
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        for dim in (-1, -2):
            total = total + (torch.diff(y, dim=dim) - torch.diff(x, dim=dim)).abs().mean()
    return total / (2 * scales)


def psnr(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of [-1, 1] images (B, C, H, W) mapped to [0, 1], the
    reconstruction clamped: 10 log10(1 / MSE) per image, averaged over the batch; (0-dim fp32)."""
    diff = (recon.float().clamp(-1, 1) - images.float()) / 2
    mse = diff.square().flatten(1).mean(1).clamp_min(1e-10)
    return (-10.0 * torch.log10(mse)).mean()

