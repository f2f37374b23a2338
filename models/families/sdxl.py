"""Stable Diffusion XL: CLIP-L + OpenCLIP bigG, a pooled vector and size/crop micro-conditioning."""
from __future__ import annotations

from dataclasses import dataclass

from .base import FamilySpec
from .registry import register_family


@dataclass(frozen=True)
class SDXLFamily(FamilySpec):
    """SDXL conditioning: context = concat(CLIP-L hidden_states[-2], bigG hidden_states[-2]) without
    final layer norm, (B, 77, 2048); pooled = bigG text_projection(final_layer_norm(last)[first EOS]),
    (B, 1280); the UNet's `y` is pooled followed by the six 256-d size/crop embeddings (2816)."""

    def encode(self, bundle, token_ids):
        import torch  # family modules import torch lazily: config checks read the registry

        te1, te2 = bundle.text_encoders
        # Only the penultimate layer of CLIP-L is used; bigG also needs the last for pooling.
        out1 = te1(token_ids[0], output_layer=-2)
        out2 = te2(token_ids[1])
        h1 = out1.hidden_states[-2]
        context = torch.cat([h1, out2.hidden_states[-2].to(h1.dtype)], dim=-1)
        return {"context": context, "pooled": out2.pooled}

    def denoise(self, bundle, noisy, timesteps, cond, time_ids=None):
        import torch

        from ..unet import sdxl_vector

        pooled = cond["pooled"]
        if time_ids is None:  # no size information: the target size, uncropped, as at inference
            h, w = noisy.shape[-2:]
            f = bundle.vae.config.downsample_factor
            time_ids = torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]], dtype=torch.float32).expand(noisy.shape[0], 6)
        y = sdxl_vector(pooled, time_ids.to(pooled.device))
        unet = bundle.denoiser
        return unet(noisy.to(unet.dtype), timesteps, cond["context"], y)

    def text_layers_used(self, index, num_layers):
        # CLIP-L is read at its penultimate layer; bigG's last layer feeds the pooled vector.
        return num_layers - 1 if index == 0 else num_layers


_COMMON = dict(
    base="sdxl", pad_token_ids=(49407, 0), title="SDXL",
    single_file_text_prefixes=("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    openclip_text_prefixes=frozenset({"conditioner.embedders.1.model."}),
    diffusers_pipeline="StableDiffusionXLPipeline", diffusers_index_extras=(("force_zeros_for_empty_prompt", True),),
    lora_text_components=("te1", "te2"), lora_unet_names="ldm", base_model_version="sdxl_base_v1-0",
    architecture="stable-diffusion-xl-v1-base", implementation="https://github.com/Stability-AI/generative-models",
)
SDXL = register_family(SDXLFamily(name="sdxl", unet="sdxl", vae="sdxl", text_encoders=("clip-l", "bigg"),
                                  resolution=1024, **_COMMON))
TINY_SDXL = register_family(SDXLFamily(name="tiny-sdxl", unet="tiny-sdxl", vae="tiny",
                                       text_encoders=("tiny-clip-l", "tiny-bigg"), resolution=64, **_COMMON))
# The toy model: trained from scratch on the shapes world, its weights ship with the package.
TOY_SDXL = register_family(SDXLFamily(name="toy-sdxl", unet="toy-sdxl", vae="toy",
                                      text_encoders=("tiny-clip-l", "tiny-bigg"), resolution=64,
                                      pretrained="toy-sdxl.safetensors", **{**_COMMON, "title": "toy SDXL"}))
