"""Reference (oracle) models holding our weights, for parity tests.

diffusers' UNet gets our ldm-named weights through diffusers' own single-file converter
(`convert_ldm_unet_checkpoint`); transformers' CLIP text models take our state dict by name (our
CLIP parameter names are the Hugging Face names).
"""
from __future__ import annotations

import torch


def diffusers_unet_config(c) -> dict:
    """diffusers UNet2DConditionModel kwargs for our UNetConfig `c`."""
    widths = [c.model_channels * m for m in c.channel_mult]
    cfg = dict(
        sample_size=8, in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=widths,
        layers_per_block=c.num_res_blocks,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in c.transformer_depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(c.transformer_depth)],
        mid_block_type="UNetMidBlock2DCrossAttn",
        # diffusers takes the middle block's depth from the last entry
        transformer_layers_per_block=[max(d, 1) for d in c.transformer_depth[:-1]] + [c.transformer_depth_middle],
        attention_head_dim=[c.heads_at(w)[0] for w in widths],  # diffusers' name for the head count
        cross_attention_dim=c.context_dim, use_linear_projection=c.use_linear_in_transformer,
        norm_num_groups=c.norm_num_groups, flip_sin_to_cos=True, freq_shift=0,
    )
    if c.adm_in_channels is not None:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=c.adm_in_channels)
    return cfg


def diffusers_unet(unet):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    """UNet2DConditionModel with the weights of our `unet` (strict load)."""
    du = UNet2DConditionModel(**diffusers_unet_config(unet.config)).eval()
    ldm = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    du.load_state_dict(convert_ldm_unet_checkpoint(ldm, du.config), strict=True)
    return du


def hf_text_encoder(te):
    """transformers CLIPTextModel(WithProjection) with the weights of our encoder `te`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = te.config
    hc = CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, max_position_embeddings=c.max_position,
        hidden_act=c.activation, layer_norm_eps=c.layer_norm_eps, projection_dim=c.projection_dim or c.hidden_size,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=1,
    )
    model = (CLIPTextModelWithProjection if c.projection_dim else CLIPTextModel)(hc).eval()
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
