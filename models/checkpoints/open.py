"""One way to open a model for work: `open_model` (used by training, `generate`, `convert`, the
LoRA tools and the benchmarks).

A source is a family name or anything `load_model` reads (diffusers folder, single file, hub id).
A family name gives the family's shipped weights where it has them (`toy-sdxl`, offline, loaded as
a checkpoint), else random weights from `seed` (the `tiny-*` families, for tests, benchmarks and the
quickstart); `random_weights=True` builds even a shipping family with random weights.

`open_model` also applies the one VAE precision policy: the VAE's parameters stay in fp32 when
its config says it must compute in fp32 (`VAEConfig.force_upcast`, the SDXL VAE that overflows in
fp16), else they follow `dtype`; an explicit `vae_dtype` wins. The bundle comes back frozen (no
gradients) and in eval mode.

It also applies the frozen-weight quantization (`models.quant`): `quantize` for the denoiser,
`quantize_text_encoders` for the text encoders, each `none` | `fp8` | `int8` | `nf4`. A checkpoint
is quantized while it loads, tensor by tensor, on `device` (the full-precision weights never all
exist in memory); a random-weight family source is built, then quantized. The VAE is
never quantized. The compute dtype of quantized layers is `dtype` (the stored dtype with None).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..bundle import ModelBundle, build_model
from ..families import FAMILIES
from .components import local_path
from .loading import (  # the VAE-override rules of a checkpoint
    ModelLoadError,
    load_model,
    separate_part,
)
from .materialize import load_part

__all__ = ["gives_random_weights", "open_model", "vae_dtype_for"]

_TEXT_PARTS = ("text_encoder", "text_encoder_2")
"""`ModelBundle.modules()` names of the text encoders (as `load_model` names its parts)."""


def vae_dtype_for(vae_config, dtype: torch.dtype | None, vae_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """Parameter dtype of the VAE: `vae_dtype` if given; with `dtype` None (stored dtypes kept)
    None; else fp32 when the VAE must compute in fp32 (`force_upcast`), else the model's `dtype`."""
    if vae_dtype is not None or dtype is None:
        return vae_dtype
    return torch.float32 if getattr(vae_config, "force_upcast", False) else dtype


def _load_vae(vae: str, bundle: ModelBundle, dtype: torch.dtype | None, variant: str | None,
              allow_pickle: bool, vae_key: str):
    """The VAE at `vae` (file or folder, as `load_model(vae=...)` reads it) for the family-built
    `bundle`: checked like a checkpoint's VAE override (every tensor used, shapes right, finite);
    a file with the family VAE's shapes keeps the family's latent scaling, a diffusers folder or
    file with a config.json beside it brings its own."""
    prefer_half = dtype == torch.float16 or variant == "fp16"
    try:
        path = local_path(vae, prefer_half, component=True)
        part = separate_part("vae", path, bundle.spec.base, bundle.vae.config, variant, prefer_half, allow_pickle)
        return load_part(part, bundle.spec.base, bundle.family, dtype)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{vae_key}: {exc}") from None


def gives_random_weights(source: str, random_weights: bool = False) -> bool:
    """Whether `open_model(source, random_weights=...)` builds random weights (from its seed): a
    family name whose family ships no weights, or any family name with `random_weights`."""
    return source in FAMILIES and (random_weights or FAMILIES[source].pretrained is None)


def open_model(source: str, *, family: str | None = None, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu", vae: str | None = None, unet: str | None = None,
               vae_dtype: torch.dtype | None = None,
               variant: str | None = None, allow_pickle: bool = False, prediction_type: str | None = None,
               seed: int | None = None, random_weights: bool = False,
               labels: tuple[str, str, str] = ("model.family", "model.source", "model.vae"),
               quantize: str = "none", quantize_text_encoders: str = "none",
               text_encoders: Sequence[str | None] | None = None,
               tokenizers: Sequence[str | None] | None = None) -> ModelBundle:
    """The `ModelBundle` of `source` on `device`, frozen and in eval mode.

    family: expected family (None detects it; for a family-name source it must agree).
    dtype: parameter dtype (None keeps each stored tensor's dtype: conversion is then bit-exact).
    vae / unet: a separate VAE / UNet file or folder replacing the checkpoint's (a VAE also replaces a
    family-name source's random one, e.g. a trained VAE for training from scratch).
    seed: init seed of a random-weight family source.
    random_weights: build a family-name source with random weights even where the family ships
    trained ones (training from scratch); an error for any other source.
    prediction_type: override of the family default (`epsilon` | `v_prediction`).
    labels: how the caller names family, source and vae in messages (config keys or CLI flags).
    quantize / quantize_text_encoders: weight format of the frozen denoiser / text encoders
    (`none` | `fp8` | `int8` | `nf4`, see `models.quant`).
    text_encoders / tokenizers: separate text-encoder files and tokenizer sources, one entry per
    encoder (None keeps the checkpoint's); FLUX.1 from ComfyUI-style files:
    text_encoders=[clip_l.safetensors, t5xxl_fp16.safetensors], tokenizers=[None, <T5 tokenizer folder>].
    """
    from ..quant.model import check_mode, quantize_model

    check_mode(quantize, "model.quantize")
    check_mode(quantize_text_encoders, "model.quantize_text_encoders")
    plan = {"unet": quantize, **{part: quantize_text_encoders for part in _TEXT_PARTS}}
    quantized = any(mode != "none" for mode in plan.values())
    family_key, source_key, vae_key = labels
    if source in FAMILIES and family is not None and family != source:
        raise ModelLoadError(f"{family_key}: {family!r} contradicts {source_key}={source!r}; leave it unset "
                             f"or set it to {source!r}")
    if random_weights and source not in FAMILIES:
        raise ModelLoadError(f"random_weights builds a family-name source with random weights, but {source_key}="
                             f"{source!r} is a checkpoint (its weights are loaded); drop random_weights or give a "
                             "family name")
    if gives_random_weights(source, random_weights):
        replaced = [name for name, value in (("unet", unet), ("text_encoders", text_encoders),
                                             ("tokenizers", tokenizers)) if value is not None]
        if replaced:
            raise ModelLoadError(f"{replaced[0]} replaces a part of a loaded checkpoint; it cannot be used with a "
                                 "random-weight family source")
        bundle = build_model(source, device="cpu", dtype=dtype or torch.float32, seed=seed)
        if vae is not None:
            # A trained VAE under random-weight parts (a model trained from scratch on its latents).
            bundle.vae = _load_vae(vae, bundle, dtype, variant, allow_pickle, vae_key)
        if prediction_type is not None:
            bundle.spec = dataclasses.replace(bundle.spec, prediction_type=prediction_type)
        for part, module in bundle.modules().items():
            quantize_model(module, plan.get(part, "none"))
    else:  # a checkpoint, or the shipped weights of a family (`load_model` resolves the name)
        # Quantizing loads straight onto `device`: the packing then runs there, and only packed
        # weights ever reach it.
        bundle = load_model(source, family=family, dtype=dtype, vae=vae, unet=unet, variant=variant,
                            allow_pickle=allow_pickle, prediction_type=prediction_type,
                            device=device if quantized else "cpu", quantize=plan if quantized else None,
                            text_encoders=text_encoders, tokenizers=tokenizers)
    if (vae_param_dtype := vae_dtype_for(bundle.vae.config, dtype, vae_dtype)) is not None:
        bundle.vae.to(dtype=vae_param_dtype)
    bundle.to(device=device)
    bundle.requires_grad_(False)
    for module in bundle.modules().values():
        module.eval()  # frozen base: no dropout
    return bundle
