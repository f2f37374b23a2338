"""One way to open a model for work: `open_model` (used by training, `generate`, `convert`, the
LoRA tools and the benchmarks).

A source is a family name (random weights, for tests, benchmarks and the quickstart) or anything
`load_model` reads (diffusers folder, single file, hub id). `open_model` also applies the one VAE
precision policy: the VAE's parameters stay in fp32 when its config says it must compute in fp32
(`VAEConfig.force_upcast`, the SDXL VAE that overflows in fp16), else they follow `dtype`; an
explicit `vae_dtype` wins. The bundle comes back frozen (no gradients) and in eval mode.
"""
from __future__ import annotations

import dataclasses

import torch

from ..bundle import ModelBundle, build_model
from ..families import FAMILIES
from .loading import ModelLoadError, load_model

__all__ = ["open_model", "vae_dtype_for"]


def vae_dtype_for(vae_config, dtype: torch.dtype | None, vae_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """Parameter dtype of the VAE: `vae_dtype` if given; with `dtype` None (stored dtypes kept)
    None; else fp32 when the VAE must compute in fp32 (`force_upcast`), else the model's `dtype`."""
    if vae_dtype is not None or dtype is None:
        return vae_dtype
    return torch.float32 if getattr(vae_config, "force_upcast", False) else dtype


def open_model(source: str, *, family: str | None = None, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu", vae: str | None = None, unet: str | None = None,
               vae_dtype: torch.dtype | None = None,
               variant: str | None = None, allow_pickle: bool = False, prediction_type: str | None = None,
               seed: int | None = None,
               labels: tuple[str, str, str] = ("model.family", "model.source", "model.vae")) -> ModelBundle:
    """The `ModelBundle` of `source` on `device`, frozen and in eval mode.

    family: expected family (None detects it; for a family-name source it must agree).
    dtype: parameter dtype (None keeps each stored tensor's dtype: conversion is then bit-exact).
    vae / unet: a separate VAE / UNet file or folder replacing the checkpoint's. seed: init seed of a family-name
    source. prediction_type: override of the family default (`epsilon` | `v_prediction`).
    labels: how the caller names family, source and vae in messages (config keys or CLI flags).
    """
    family_key, source_key, vae_key = labels
    if source in FAMILIES:
        if family is not None and family != source:
            raise ModelLoadError(f"{family_key}: {family!r} contradicts {source_key}={source!r}; leave it unset "
                                 f"or set it to {source!r}")
        if vae is not None or unet is not None:
            raise ModelLoadError(f"{vae_key if vae is not None else 'unet'} replaces a part of a loaded checkpoint; "
                                 "it cannot be used with a random-weight family source")
        bundle = build_model(source, device="cpu", dtype=dtype or torch.float32, seed=seed)
        if prediction_type is not None:
            bundle.spec = dataclasses.replace(bundle.spec, prediction_type=prediction_type)
    else:
        bundle = load_model(source, family=family, dtype=dtype, vae=vae, unet=unet, variant=variant,
                            allow_pickle=allow_pickle, prediction_type=prediction_type)
    if (vae_param_dtype := vae_dtype_for(bundle.vae.config, dtype, vae_dtype)) is not None:
        bundle.vae.to(dtype=vae_param_dtype)
    bundle.to(device=device)
    bundle.requires_grad_(False)
    for module in bundle.modules().values():
        module.eval()  # frozen base: no dropout
    return bundle
