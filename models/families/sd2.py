"""Stable Diffusion 2.x: OpenCLIP ViT-H, conditioning on its penultimate layer (final layer norm)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import FamilySpec
from .registry import register_family


@dataclass(frozen=True)
class SD2Family(FamilySpec):
    """SD2.x conditioning: context = final_layer_norm(ViT-H hidden_states[-2]), (B, 77, 1024)."""

    def _layer(self, num_layers: int) -> int:
        # diffusers folders ship the encoder cut to the 23 layers SD2 reads; then the last is the one.
        return -1 if num_layers == 23 else -2

    def encode(self, bundle, token_ids):
        (te,) = bundle.text_encoders
        layer = self._layer(te.config.num_layers)
        out = te(token_ids[0], output_layer=layer)
        return {"context": te.text_model.final_layer_norm(out.hidden_states[layer])}

    def text_layers_used(self, index, num_layers):
        return num_layers + 1 + self._layer(num_layers)


SD2 = register_family(SD2Family(
    name="sd2", base="sd2", unet="sd2", vae="sd2", text_encoders=("clip-h",), pad_token_ids=(0,), resolution=768,
    title="SD2.x", single_file_text_prefixes=("cond_stage_model.model.",),
    openclip_text_prefixes=frozenset({"cond_stage_model.model."}), diffusers_pipeline="StableDiffusionPipeline",
    base_model_version="sd_v2", architecture="stable-diffusion-v2-512", architecture_v="stable-diffusion-v2-768-v",
    kohya_v2=True,
    diffusers_index_extras=(("safety_checker", [None, None]), ("feature_extractor", [None, None]),
                            ("requires_safety_checker", False)),
))
