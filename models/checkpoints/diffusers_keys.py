"""Diffusers folder layout <-> our (ldm-named) modules: parameter names and config.json files.

Our UNet and VAE use the original single-file (ldm/sgm) parameter names; diffusers renames
blocks. The maps here are derived from the config, level by level, exactly as both codebases
build their blocks, so they hold for any UNet/VAE shape (tiny test models included):

UNet: the map of `models.checkpoints.unet_names` (shared with the LoRA name table).
VAE (decoder levels are numbered from the output side in diffusers; the Flux.1 VAE has no
quant_conv / post_quant_conv, which keep their names where they exist)
    {en,de}coder.norm_out            {en,de}coder.conv_norm_out
    encoder.down.l.block.r           encoder.down_blocks.l.resnets.r   (nin_shortcut -> conv_shortcut)
    encoder.down.l.downsample.conv   encoder.down_blocks.l.downsamplers.0.conv
    decoder.up.l.block.r             decoder.up_blocks.(L-1-l).resnets.r
    decoder.up.l.upsample.conv       decoder.up_blocks.(L-1-l).upsamplers.0.conv
    *.mid.block_{1,2}                *.mid_block.resnets.{0,1}
    *.mid.attn_1.{norm,q,k,v,proj_out}  *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
        (1x1 conv weights (C,C,1,1) in ldm, Linear (C,C) in diffusers)
CLIP text encoders already use the transformers names (`text_model.*`, `text_projection.weight`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..clip import CLIPTextConfig
from ..unet import SDXL_SIZE_EMBED_DIM, UNetConfig
from ..vae import VAEConfig
from .unet_names import unet_diffusers_path

__all__ = [
    "VAE_DIFFUSERS_LEGACY_NAMES",
    "UnsupportedConfigError",
    "clip_config_from_transformers",
    "clip_config_to_transformers",
    "is_vae_attention_matrix",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_prefix_map",
    "unet_state_dict_to_diffusers",
    "unet_to_diffusers_key",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_state_dict_to_diffusers",
    "vae_to_diffusers_key",
]

DIFFUSERS_VERSION = "0.30.0"
"""Version written into config.json files (the oldest diffusers release the layout is known to load in)."""


class UnsupportedConfigError(ValueError):
    """A diffusers/transformers config.json describing something our modules cannot represent."""


# ---- UNet -----------------------------------------------------------------------------------
def unet_prefix_map(cfg: UNetConfig) -> int:
    """What the UNet names of `cfg` depend on, for `unet_to_diffusers_key`: ResBlocks per level."""
    return cfg.num_res_blocks


def unet_to_diffusers_key(key: str, layers_per_block: int) -> str | None:
    """Diffusers name of the ldm UNet parameter `key` (None when it has none).

    `layers_per_block` comes from `unet_prefix_map(cfg)`; the map is `unet_names.unet_diffusers_path`.
    """
    return unet_diffusers_path(key, layers_per_block)


def unet_state_dict_to_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet state dict (ldm names) under diffusers names, same tensors (views; works on meta).

    Raises ValueError naming the first parameter that has no diffusers name.
    """
    out = {}
    for key, value in state.items():
        name = unet_to_diffusers_key(key, cfg.num_res_blocks)
        if name is None:
            raise ValueError(f"UNet parameter {key!r} has no diffusers name")
        out[name] = value
    return out


# ---- VAE ------------------------------------------------------------------------------------
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
VAE_DIFFUSERS_LEGACY_NAMES = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}
"""Attention names of diffusers VAEs saved before 0.14, accepted on load."""
_VAE_RES = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)$")
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)$")


def vae_to_diffusers_key(key: str, cfg: VAEConfig) -> str | None:
    """Diffusers name of the ldm VAE parameter `key` (None when it is not a VAE parameter)."""
    levels = len(cfg.ch_mult)
    if key.startswith(("encoder.norm_out.", "decoder.norm_out.")):
        return key.replace(".norm_out.", ".conv_norm_out.", 1)
    if re.match(r"^((en|de)coder\.conv_(in|out)|quant_conv|post_quant_conv)\.", key):
        return key
    m = _VAE_RES.match(key)
    if m:
        part, kind, level, what, block, rest = m.groups()
        level = int(level)
        if (part, kind) == ("encoder", "down"):
            idx = level
        elif (part, kind) == ("decoder", "up"):
            idx = levels - 1 - level
        else:
            return None
        base = f"{part}.{kind}_blocks.{idx}."
        if block is not None:
            return f"{base}resnets.{block}.{rest.replace('nin_shortcut.', 'conv_shortcut.')}"
        if (what, kind) in (("downsample", "down"), ("upsample", "up")):
            return f"{base}{kind}samplers.0.{rest}"
        return None
    m = _VAE_MID.match(key)
    if m:
        part, what, rest = m.groups()
        if what == "attn_1":
            for old, new in _VAE_ATTN.items():
                if rest.startswith(old):
                    return f"{part}.mid_block.attentions.0.{new}{rest[len(old):]}"
            return None
        idx = 0 if what == "block_1" else 1
        return f"{part}.mid_block.resnets.{idx}.{rest.replace('nin_shortcut.', 'conv_shortcut.')}"
    return None


def is_vae_attention_matrix(ldm_key: str) -> bool:
    """True for the VAE attention weights stored (C,C,1,1) in ldm files and (C,C) in diffusers."""
    return bool(re.match(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def vae_state_dict_to_diffusers(state: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our VAE state dict (ldm names) under diffusers names; attention matrices (C,C,1,1) -> (C,C)
    views (works on meta). Raises ValueError naming the first parameter that has no diffusers name."""
    out = {}
    for key, value in state.items():
        name = vae_to_diffusers_key(key, cfg)
        if name is None:
            raise ValueError(f"VAE parameter {key!r} has no diffusers name")
        out[name] = value.reshape(value.shape[:2]) if is_vae_attention_matrix(key) else value
    return out


# ---- config.json <-> our config dataclasses -------------------------------------------------
def _per_level(value, levels: int, name: str, where: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise UnsupportedConfigError(f"{where}: {name} has {len(value)} entries for {levels} levels")
        return list(value)
    return [value] * levels


def _require(cfg: dict, where: str, **expected) -> None:
    for name, allowed in expected.items():
        value = cfg.get(name, allowed[0])
        if value not in allowed:
            raise UnsupportedConfigError(
                f"{where}: {name}={value!r} is not supported (supported: {', '.join(map(repr, allowed))}); "
                "only SD1.5 / SD2.x / SDXL-style UNets load"
            )


def unet_config_from_diffusers(d: dict, where: str = "unet/config.json") -> UNetConfig:
    """UNetConfig for a diffusers `UNet2DConditionModel` config.json dict (raises UnsupportedConfigError)."""
    cls = d.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise UnsupportedConfigError(f"{where}: _class_name {cls!r} is not a UNet2DConditionModel (SD1.5/SD2/SDXL)")
    _require(
        d, where,
        mid_block_type=("UNetMidBlock2DCrossAttn",), act_fn=("silu",), resnet_time_scale_shift=("default",),
        time_embedding_type=("positional",), flip_sin_to_cos=(True,), freq_shift=(0,), center_input_sample=(False,),
        conv_in_kernel=(3,), conv_out_kernel=(3,), class_embed_type=(None,), encoder_hid_dim=(None,),
        time_cond_proj_dim=(None,), timestep_post_act=(None,), time_embedding_dim=(None,),
        dual_cross_attention=(False,), only_cross_attention=(False,), norm_eps=(1e-5,),
        addition_embed_type=(None, "text_time"), attention_type=("default",), num_class_embeds=(None,),
        downsample_padding=(1,), mid_block_scale_factor=(1, 1.0), resnet_out_scale_factor=(1.0, 1),
        resnet_skip_time_act=(False,), class_embeddings_concat=(False,), time_embedding_act_fn=(None,),
        encoder_hid_dim_type=(None,), cross_attention_norm=(None,), mid_block_only_cross_attention=(None, False),
    )
    channels = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    mc = channels[0]
    if any(c % mc for c in channels):
        raise UnsupportedConfigError(f"{where}: block_out_channels {channels} are not multiples of the first")
    down = list(d.get("down_block_types", ()))
    up = list(d.get("up_block_types", ()))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if len(down) != levels or any(t not in kinds for t in down):
        raise UnsupportedConfigError(f"{where}: down_block_types {down} (supported: CrossAttnDownBlock2D, DownBlock2D)")
    attn = [kinds[t] for t in down]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if up != expected_up:
        raise UnsupportedConfigError(f"{where}: up_block_types {up} must mirror down_block_types ({expected_up})")
    layers = _per_level(d.get("layers_per_block", 2), levels, "layers_per_block", where)
    if len(set(layers)) != 1:
        raise UnsupportedConfigError(f"{where}: layers_per_block {layers} must be the same at every level")
    depth = _per_level(d.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block", where)
    if any(isinstance(x, (list, tuple)) for x in depth) or d.get("reverse_transformer_layers_per_block"):
        raise UnsupportedConfigError(f"{where}: per-block transformer depths (asymmetric UNets) are not supported")
    if d.get("num_attention_heads") is not None:
        heads = _per_level(d["num_attention_heads"], levels, "num_attention_heads", where)
    else:
        # diffusers' `attention_head_dim` historically holds the number of heads.
        heads = _per_level(d.get("attention_head_dim", 8), levels, "attention_head_dim", where)
    num_heads, head_channels = None, None
    # Decide on every level first (keeps presets round-tripping), then on the levels that have
    # attention (the mid block uses the last level's heads).
    for group in (list(range(levels)), [lvl for lvl in range(levels) if attn[lvl]] + [levels - 1]):
        if len({heads[lvl] for lvl in group}) == 1:
            num_heads = heads[group[0]]
            break
        if all(channels[lvl] % heads[lvl] == 0 for lvl in group) and len({channels[lvl] // heads[lvl] for lvl in group}) == 1:
            head_channels = channels[group[0]] // heads[group[0]]
            break
    else:
        raise UnsupportedConfigError(
            f"{where}: attention heads {heads} are neither a fixed count nor a fixed width per head"
        )
    context = d.get("cross_attention_dim", 1280)
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise UnsupportedConfigError(f"{where}: per-level cross_attention_dim {context} is not supported")
        context = context[0]
    adm = None
    if d.get("addition_embed_type") == "text_time":
        if d.get("addition_time_embed_dim") != SDXL_SIZE_EMBED_DIM:
            raise UnsupportedConfigError(
                f"{where}: addition_time_embed_dim={d.get('addition_time_embed_dim')} (SDXL uses {SDXL_SIZE_EMBED_DIM})"
            )
        adm = int(d["projection_class_embeddings_input_dim"])
    return UNetConfig(
        in_channels=int(d.get("in_channels", 4)),
        out_channels=int(d.get("out_channels", 4)),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=int(layers[0]),
        transformer_depth=tuple(int(x) if a else 0 for x, a in zip(depth, attn)),
        transformer_depth_middle=int(depth[-1]),
        num_heads=num_heads,
        num_head_channels=head_channels,
        context_dim=int(context),
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        adm_in_channels=adm,
        norm_num_groups=int(d.get("norm_num_groups", 32)),
        dropout=float(d.get("dropout", 0.0)),
    )


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int | None = None) -> dict:
    """A `UNet2DConditionModel` config.json dict equivalent to `cfg`."""
    levels = len(cfg.channel_mult)
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [d > 0 for d in cfg.transformer_depth]
    if attn[-1] and cfg.transformer_depth[-1] != cfg.transformer_depth_middle:
        raise UnsupportedConfigError(
            "diffusers gives the mid block the last level's transformer depth; this UNet has "
            f"{cfg.transformer_depth[-1]} vs {cfg.transformer_depth_middle}"
        )
    depth = [d if d else 1 for d in cfg.transformer_depth]
    depth[-1] = cfg.transformer_depth_middle
    if cfg.num_head_channels is not None:
        heads: int | list[int] = [c // cfg.num_head_channels for c in channels]
    else:
        heads = cfg.num_heads
    out = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": cfg.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "downsample_padding": 1,
        "dropout": cfg.dropout,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": cfg.in_channels,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": cfg.norm_num_groups,
        "out_channels": cfg.out_channels,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "use_linear_projection": cfg.use_linear_in_transformer,
    }
    if sample_size is not None:
        out["sample_size"] = sample_size
    if cfg.adm_in_channels is not None:
        out.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_SIZE_EMBED_DIM,
            projection_class_embeddings_input_dim=cfg.adm_in_channels,
        )
    assert len(out["down_block_types"]) == levels
    return out


def vae_config_from_diffusers(d: dict, where: str = "vae/config.json") -> VAEConfig:
    """VAEConfig for a diffusers `AutoencoderKL` config.json dict (raises UnsupportedConfigError)."""
    cls = d.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise UnsupportedConfigError(f"{where}: _class_name {cls!r} is not an AutoencoderKL")
    _require(d, where, act_fn=("silu",), mid_block_add_attention=(True,), latents_mean=(None,), latents_std=(None,))
    quant = d.get("use_quant_conv", True)
    if not isinstance(quant, bool) or d.get("use_post_quant_conv", True) is not quant:
        raise UnsupportedConfigError(
            f"{where}: use_quant_conv={quant!r} with use_post_quant_conv={d.get('use_post_quant_conv', True)!r} "
            "is not supported; both must be true (SD/SDXL VAEs) or both false (Flux.1 VAE)"
        )
    channels = list(d.get("block_out_channels", (64,)))
    ch = channels[0]
    if any(c % ch for c in channels):
        raise UnsupportedConfigError(f"{where}: block_out_channels {channels} are not multiples of the first")
    levels = len(channels)
    down = list(d.get("down_block_types", ["DownEncoderBlock2D"] * levels))
    up = list(d.get("up_block_types", ["UpDecoderBlock2D"] * levels))
    if down != ["DownEncoderBlock2D"] * levels or up != ["UpDecoderBlock2D"] * levels:
        raise UnsupportedConfigError(f"{where}: only DownEncoderBlock2D / UpDecoderBlock2D VAEs are supported")
    return VAEConfig(
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=int(d.get("layers_per_block", 1)),
        z_channels=int(d.get("latent_channels", 4)),
        norm_num_groups=int(d.get("norm_num_groups", 32)),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        shift_factor=d.get("shift_factor"),
        force_upcast=bool(d.get("force_upcast", True)),
        use_quant_conv=quant,
    )


def vae_config_to_diffusers(cfg: VAEConfig, sample_size: int | None = None) -> dict:
    """An `AutoencoderKL` config.json dict equivalent to `cfg`."""
    levels = len(cfg.ch_mult)
    out = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": cfg.force_upcast,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.z_channels,
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.norm_num_groups,
        "out_channels": cfg.out_channels,
        "scaling_factor": cfg.scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }
    if cfg.shift_factor is not None:
        out["shift_factor"] = cfg.shift_factor
    if not cfg.use_quant_conv:  # written only when off, so SD/SDXL configs stay as before
        out["use_quant_conv"] = out["use_post_quant_conv"] = False
    if sample_size is not None:
        out["sample_size"] = sample_size
    return out


_CLIP_BOS, _CLIP_EOS, _CLIP_VOCAB = 49406, 49407, 49408


def clip_config_from_transformers(d: dict, has_projection: bool, where: str = "text_encoder/config.json") -> CLIPTextConfig:
    """CLIPTextConfig for a transformers `CLIPTextModel[WithProjection]` config.json dict.

    has_projection: whether the weights include `text_projection.weight` (a plain CLIPTextModel
    config also carries a `projection_dim` field that no layer uses).
    """
    if "text_config" in d:  # a full CLIPModel config: the text part is what we need
        d = d["text_config"]
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise UnsupportedConfigError(f"{where}: hidden_act={act!r} (supported: 'quick_gelu', 'gelu')")
    vocab = int(d.get("vocab_size", _CLIP_VOCAB))
    bos, eos = int(d.get("bos_token_id", _CLIP_BOS)), int(d.get("eos_token_id", _CLIP_EOS))
    if vocab == _CLIP_VOCAB and (bos, eos) != (_CLIP_BOS, _CLIP_EOS):
        # SD configs written by old transformers carry placeholder ids (bos 0, eos 2); their
        # pooling then used argmax(input_ids), which is the first EOS of the real vocabulary.
        bos, eos = _CLIP_BOS, _CLIP_EOS
    return CLIPTextConfig(
        hidden_size=int(d.get("hidden_size", 512)),
        num_layers=int(d.get("num_hidden_layers", 12)),
        num_heads=int(d.get("num_attention_heads", 8)),
        intermediate_size=int(d.get("intermediate_size", 2048)),
        activation=act,
        projection_dim=int(d.get("projection_dim", 512)) if has_projection else None,
        vocab_size=vocab,
        max_position=int(d.get("max_position_embeddings", 77)),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
        bos_token_id=bos,
        eos_token_id=eos,
    )


def clip_config_to_transformers(cfg: CLIPTextConfig, dtype_name: str = "float32") -> dict:
    """A transformers config.json dict for `cfg` (`CLIPTextModelWithProjection` when it projects)."""
    arch = "CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"
    return {
        "architectures": [arch],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": 1,
        "hidden_act": cfg.activation,
        "hidden_size": cfg.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "max_position_embeddings": cfg.max_position,
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "projection_dim": cfg.projection_dim or cfg.hidden_size,
        "torch_dtype": dtype_name,
        "vocab_size": cfg.vocab_size,
    }
