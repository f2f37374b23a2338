"""Reference (oracle) models holding our weights, for parity tests.

Configs come from our config.json builders (`models.checkpoints.diffusers_keys`), so the parity
tests also check that what we write describes the same network. Weights reach diffusers' UNet
through diffusers' own single-file converter (`convert_ldm_unet_checkpoint`), an independent
definition of the ldm names; transformers' CLIP text models take our state dict by name (our CLIP
parameter names are the Hugging Face names).
"""
from __future__ import annotations

import torch

from models.checkpoints.diffusers_keys import (
    clip_config_to_transformers,
    unet_config_to_diffusers,
    vae_config_to_diffusers,
)


def _init_kwargs(config_json: dict) -> dict:
    """A diffusers config.json dict as constructor kwargs (without its `_class_name`-style metadata)."""
    return {k: v for k, v in config_json.items() if not k.startswith("_")}


def diffusers_unet_config(c, sample_size: int = 8) -> dict:
    """diffusers UNet2DConditionModel kwargs for our UNetConfig `c`."""
    return _init_kwargs(unet_config_to_diffusers(c, sample_size=sample_size))


def diffusers_vae_config(c, sample_size: int = 32) -> dict:
    """diffusers AutoencoderKL kwargs for our VAEConfig `c`."""
    return _init_kwargs(vae_config_to_diffusers(c, sample_size=sample_size))


def diffusers_unet(unet):
    """UNet2DConditionModel with the weights of our `unet` (strict load)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    du = UNet2DConditionModel(**diffusers_unet_config(unet.config)).eval()
    ldm = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    du.load_state_dict(convert_ldm_unet_checkpoint(ldm, du.config), strict=True)
    return du


def hf_text_encoder(te):
    """transformers CLIPTextModel(WithProjection) with the weights of our encoder `te`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hc = CLIPTextConfig.from_dict(clip_config_to_transformers(te.config))
    model = (CLIPTextModelWithProjection if te.config.projection_dim else CLIPTextModel)(hc).eval()
    sd = te.state_dict()
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norm scales around 1, biases around 0, weights ~ 1/sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
                if module.bias is not None:
                    module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
