"""Validation images during training: the sample prompts rendered with the LoRA as it is now."""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch


def image_grid(images, columns: int | None = None):
    """Tile PIL images (same size) into one PIL image, `columns` wide (default: up to 4)."""
    from PIL import Image

    columns = columns or min(4, len(images))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "black")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return grid


@torch.no_grad()
def render_samples(bundle, network, sample_cfg, *, size: int, device: torch.device, prediction_type: str,
                   zero_terminal_snr: bool, model_name: str, autocast: AbstractContextManager | None = None):
    """One PIL grid of `sample_cfg.prompts` (`SampleConfig`) at size x size pixels: up to 4 per
    row, or one row per prompt of `images_per_prompt` images when that is above 1.

    The LoRA stays attached (unmerged) and is put in eval mode (no adapter dropout) for the
    duration; parts that were offloaded to the CPU after caching visit `device` and go back.
    Zero-terminal-SNR models sample with "trailing" timesteps, which reach the last step.
    """
    from .sampling.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline(bundle, sampler=sample_cfg.sampler, zero_terminal_snr=zero_terminal_snr,
                           timestep_spacing="trailing" if zero_terminal_snr else "leading",
                           prediction_type=prediction_type, model_name=model_name)
    parts = [bundle.vae, *bundle.text_encoders]
    homes = [next(p.parameters()).device for p in parts]
    for part in parts:
        part.to(device)
    network.eval()
    try:
        with autocast or nullcontext():
            images = pipe(list(sample_cfg.prompts), negative_prompt=sample_cfg.negative_prompt,
                          steps=sample_cfg.steps or bundle.spec.default_steps or 20,
                          guidance_scale=sample_cfg.guidance_scale, seed=sample_cfg.seed,
                          width=size, height=size, n=sample_cfg.images_per_prompt, progress=False)
    finally:
        network.train()
        for part, home in zip(parts, homes):
            part.to(home)
    per_prompt = sample_cfg.images_per_prompt
    return image_grid(images, columns=per_prompt if per_prompt > 1 else None)
