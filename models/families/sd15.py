"""Stable Diffusion 1.x: one CLIP-L text encoder, conditioning on its final-layer-norm output."""
from __future__ import annotations

from dataclasses import dataclass

from .base import FamilySpec
from .registry import register_family


@dataclass(frozen=True)
class SD15Family(FamilySpec):
    """SD1.x conditioning: context = CLIP-L `last_hidden_state` (final layer norm), (B, 77, 768)."""

    def encode(self, bundle, token_ids):
        (te,) = bundle.text_encoders
        return {"context": te(token_ids[0]).last_hidden_state}


_COMMON = dict(
    base="sd15", pad_token_ids=(49407,), title="SD1.5", single_file_text_prefixes=("cond_stage_model.transformer.",),
    diffusers_pipeline="StableDiffusionPipeline", unet_num_heads=8, unet_head_channels=None,
    base_model_version="sd_v1", architecture="stable-diffusion-v1",
    diffusers_index_extras=(("safety_checker", [None, None]), ("feature_extractor", [None, None]),
                            ("requires_safety_checker", False)),
)
SD15 = register_family(SD15Family(name="sd15", unet="sd15", vae="sd15", text_encoders=("clip-l",), resolution=512,
                                  **_COMMON))
TINY_SD15 = register_family(SD15Family(name="tiny-sd15", unet="tiny-sd15", vae="tiny",
                                       text_encoders=("tiny-clip-l",), resolution=64, **_COMMON))
