"""models.checkpoints.diffusers_keys: ldm <-> diffusers names and config.json mapping, checked against diffusers'
own converters (`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`) for every preset,
full-size ones on the meta device."""
import pytest
import torch

from models.checkpoints.diffusers_keys import (
    UnsupportedConfigError,
    clip_config_from_transformers,
    is_vae_attention_matrix,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_prefix_map,
    unet_to_diffusers_key,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_to_diffusers_key,
)
from models.unet import UNet, UNetConfig
from models.vae import AutoencoderKL, VAEConfig


def origin(t):
    """The ldm name a converted tensor came from (sliced tensors are views of the tagged one)."""
    return getattr(t, "ldm_name", None) or t._base.ldm_name


def tagged(module, prefix):
    """Meta tensors of the module's shapes under `prefix`, each tagged with its ldm name."""
    out = {}
    for name, p in module.state_dict().items():
        t = torch.empty(p.shape, device="meta")
        t.ldm_name = name
        out[prefix + name] = t
    return out


@pytest.mark.parametrize("preset", ["sd15", "sd2", "sdxl", "tiny-sd15", "tiny-sdxl"])
def test_unet_names_match_diffusers_converter(preset):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = UNetConfig.preset(preset)
    unet = UNet(cfg, device="meta")
    converted = convert_ldm_unet_checkpoint(tagged(unet, "model.diffusion_model."), unet_config_to_diffusers(cfg))
    prefix_map = unet_prefix_map(cfg)
    ours = {unet_to_diffusers_key(name, prefix_map): name for name in unet.state_dict()}
    assert None not in ours and len(ours) == len(unet.state_dict())
    assert {k: origin(v) for k, v in converted.items()} == ours
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg


@pytest.mark.parametrize("preset", ["sd15", "sdxl", "tiny"])
def test_vae_names_match_diffusers_converter(preset):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = VAEConfig.preset(preset)
    vae = AutoencoderKL(cfg, device="meta")
    converted = convert_ldm_vae_checkpoint(tagged(vae, "first_stage_model."), vae_config_to_diffusers(cfg))
    ours = {vae_to_diffusers_key(name, cfg): name for name in vae.state_dict()}
    assert {k: origin(v) for k, v in converted.items()} == ours
    for name in vae.state_dict():  # 1x1 conv attention in ldm, Linear in diffusers
        d = vae_to_diffusers_key(name, cfg)
        assert is_vae_attention_matrix(name) == (converted[d].ndim == 2 and name.endswith("weight") and ".attn_1." in name)
    assert vae_config_from_diffusers(vae_config_to_diffusers(cfg)) == cfg


def test_tiny_configs_build_identical_diffusers_modules():
    from diffusers import AutoencoderKL as DVAE
    from diffusers import UNet2DConditionModel

    for preset in ("tiny-sd15", "tiny-sdxl"):
        cfg = UNetConfig.preset(preset)
        d = {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
        ref = UNet2DConditionModel(**d).state_dict()
        pm = unet_prefix_map(cfg)
        ours = {unet_to_diffusers_key(k, pm): tuple(v.shape) for k, v in UNet(cfg, device="meta").state_dict().items()}
        assert ours == {k: tuple(v.shape) for k, v in ref.items()}
    cfg = VAEConfig.preset("tiny")
    ref = DVAE(**{k: v for k, v in vae_config_to_diffusers(cfg).items() if not k.startswith("_")}).state_dict()
    ours = {vae_to_diffusers_key(k, cfg) for k in AutoencoderKL(cfg, device="meta").state_dict()}
    assert ours == set(ref)


def test_real_sdxl_and_sd15_diffusers_configs():
    """config.json values as published for SDXL base / SD1.5 / SD2.1 map onto our presets."""
    sdxl = {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2,
            "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
            "num_attention_heads": None, "sample_size": 128, "upcast_attention": None}
    assert unet_config_from_diffusers(sdxl) == UNetConfig.preset("sdxl")
    sd15 = {"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2,
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    assert unet_config_from_diffusers(sd15) == UNetConfig.preset("sd15")
    sd21 = dict(sd15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                upcast_attention=True)
    assert unet_config_from_diffusers(sd21) == UNetConfig.preset("sd2")
    with pytest.raises(UnsupportedConfigError, match="time_cond_proj_dim=256 is not supported"):
        unet_config_from_diffusers(dict(sd15, time_cond_proj_dim=256))
    with pytest.raises(UnsupportedConfigError, match="UNet2DConditionModel"):
        unet_config_from_diffusers({"_class_name": "SD3Transformer2DModel"})
    # old transformers configs of SDXL's text_encoder_2 carry placeholder ids bos=0 / eos=2
    te2 = {"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
           "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
           "bos_token_id": 0, "eos_token_id": 2, "vocab_size": 49408}
    cfg = clip_config_from_transformers(te2, has_projection=True)
    assert (cfg.eos_token_id, cfg.projection_dim, cfg.activation) == (49407, 1280, "gelu")
