"""Single-file (ldm/sgm layout) checkpoints: recognise them, read their configs off the tensor
shapes, and write them.

Layout (prefix -> our module, which uses the same names after the prefix):

| family | UNet                     | VAE                 | text encoder(s)                                         |
|--------|--------------------------|---------------------|---------------------------------------------------------|
| sdxl   | `model.diffusion_model.` | `first_stage_model.`| `conditioner.embedders.0.transformer.` (CLIP-L, HF names), `conditioner.embedders.1.model.` (OpenCLIP bigG) |
| sd15   | same                     | same                | `cond_stage_model.transformer.` (CLIP-L, HF names)      |
| sd2    | same                     | same                | `cond_stage_model.model.` (OpenCLIP ViT-H)              |

OpenCLIP towers are renamed by `models.checkpoints.openclip_keys`. Entries that carry nothing our modules
need are listed explicitly in `IGNORED_KEYS` / `IGNORED_PREFIXES`; everything else must be used.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..families import FAMILIES, families_of, lineages
from ..clip import CLIPTextConfig
from .openclip_keys import hf_to_openclip
from .safetensors_io import save_file
from ..parts import build_part
from ..unet import UNetConfig
from ..vae import VAEConfig

__all__ = [
    "IGNORED_KEYS",
    "IGNORED_PREFIXES",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "UnsupportedModelError",
    "describe_component",
    "detect_family",
    "infer_clip_config",
    "infer_unet_config",
    "infer_vae_config",
    "is_ignored",
    "is_openclip_prefix",
    "text_prefixes",
    "looks_like_lora",
    "matching_family",
    "meta_module",
    "pick_config",
    "prediction_type_hint",
    "presets_for",
    "same_clip_shapes",
    "same_unet_shapes",
    "same_vae_shapes",
    "save_single_file",
    "single_file_state_dict",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def text_prefixes(base: str) -> tuple[str, ...]:
    """Single-file key prefix of each text encoder of lineage `base` (`FamilySpec.single_file_text_prefixes`)."""
    spec = lineages().get(base)
    if spec is None or not spec.single_file_text_prefixes:
        raise ValueError(f"no single-file layout for family lineage {base!r}")
    return spec.single_file_text_prefixes


def is_openclip_prefix(prefix: str) -> bool:
    """Whether a single-file text prefix holds OpenCLIP-named tensors (some family declares so)."""
    return any(prefix in s.openclip_text_prefixes for s in FAMILIES.values())

IGNORED_KEYS = frozenset(
    {
        # DDPM schedule buffers of the ldm training wrapper (recomputed by our scheduler).
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
        "lvlb_weights", "logvar", "denoiser.sigmas", "denoiser.log_sigmas",
        # Markers some v-prediction checkpoints carry (read by `prediction_type_hint`).
        "v_pred", "ztsnr",
        # CLIP-L's constant position-id buffer and OpenCLIP's contrastive temperature / mask.
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.model.logit_scale", "conditioner.embedders.1.model.logit_scale",
        "cond_stage_model.model.attn_mask", "conditioner.embedders.1.model.attn_mask",
        # SD2 uses ViT-H's penultimate hidden state, never its projection.
        "cond_stage_model.model.text_projection",
    }
)
IGNORED_PREFIXES = (
    "model_ema.",  # EMA copy of the UNet (flattened names) in training checkpoints
    "conditioner.embedders.1.model.visual.",  # image tower of a full OpenCLIP model
    "cond_stage_model.model.visual.",
    "first_stage_model.loss.",  # VAE training discriminator
    "loss.",  # same, in a bare VAE file
)

_LORA_MARKERS = ("lora_down", "lora_up", "lora.down.", "lora.up.", "lora_A.", "lora_B.", "hada_w1", "lokr_w1",
                 "oft_blocks", ".alpha")


class UnsupportedModelError(ValueError):
    """The tensors are not an SD1.5/SD2/SDXL checkpoint (message says what they look like)."""


def is_ignored(key: str) -> bool:
    """True for entries known to carry nothing our modules need (see the module docstring)."""
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _sample(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


def looks_like_lora(keys: Iterable[str]) -> bool:
    """Whether any key has a LoRA / LyCORIS adapter name (lora_down, lora_A, hada_w1, ...)."""
    return any(any(m in k for m in _LORA_MARKERS) for k in keys)


def describe_foreign(keys: list[str]) -> str | None:
    """What a non-SD key set looks like (LoRA, SD3, Flux, ...), or None when it is not recognised."""
    if looks_like_lora(keys):
        return ("a LoRA/LyCORIS adapter (keys like " + _sample([k for k in keys if "lora" in k or "alpha" in k] or keys)
                + "), not a model; load a base model and apply it with models.load_lora(bundle, path)")
    if any("joint_blocks." in k for k in keys):
        return "a Stable Diffusion 3 (MMDiT) checkpoint (keys like 'model.diffusion_model.joint_blocks.*')"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        from .flux_keys import is_flux_transformer

        if is_flux_transformer(keys):
            return "a FLUX.1 checkpoint (keys like 'double_blocks.*')"
        return ("a Flux-style transformer that is not FLUX.1 (keys like 'double_blocks.*' without FLUX.1's per-block "
                "'img_mod'): Chroma, FLUX.2 or another relative, which this loader does not read")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and not any(
        k.startswith("conditioner.embedders.1.") for k in keys
    ):
        return "an SDXL refiner checkpoint (only an OpenCLIP bigG text encoder)"
    if any(k.startswith(UNET_PREFIX) for k in keys) and not any(k.startswith(UNET_PREFIX + "input_blocks.") for k in keys):
        return "a diffusion model whose backbone is not an SD UNet (keys like " + _sample(
            [k for k in keys if k.startswith(UNET_PREFIX)]) + ")"
    return None


def describe_component(keys: Iterable[str]) -> str | None:
    """What a file holding one component, not a model, is ("a VAE (keys like ...)"), else None."""
    keys = set(keys)
    if any(k.endswith("encoder.block.0.layer.0.SelfAttention.q.weight") for k in keys):
        return "a T5 text encoder (keys like 'encoder.block.*')"
    if any(k.endswith(("text_model.encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.weight"))
           for k in keys) and not any(k.startswith(UNET_PREFIX) for k in keys):
        return "a CLIP text encoder (keys like 'text_model.*')"
    if {"encoder.conv_in.weight", "decoder.conv_out.weight"} <= keys:
        return "a VAE (keys like 'encoder.conv_in.weight')"
    return None


SUPPORTED = ("SD1.5, SD2.x and SDXL single-file checkpoints (model.diffusion_model.*, first_stage_model.* and "
             "their text encoders), diffusers folders, or hub ids of those; FLUX.1 transformer files, ComfyUI "
             "all-in-one files and FluxPipeline folders")


def detect_family(keys: Iterable[str], where: str) -> str:
    """Base family ("sdxl", "sd15", "sd2") of a single-file checkpoint's key set.

    Raises UnsupportedModelError with one sentence naming what was found instead.
    """
    keys = list(keys)
    foreign = describe_foreign(keys)
    if foreign:
        raise UnsupportedModelError(f"{where} is {foreign}; supported: {SUPPORTED}")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        component = describe_component(keys)
        if component is not None:
            raise UnsupportedModelError(
                f"{where} is {component}, not a full model: a VAE goes in vae=..., a UNet in unet=..., FLUX.1's "
                "CLIP-L and T5 files in text_encoders=[clip_l, t5xxl] beside the FLUX.1 transformer")
        raise UnsupportedModelError(
            f"{where} has no SD UNet ('model.diffusion_model.input_blocks.*'; found {len(keys)} tensors like "
            f"{_sample(keys)}); supported: {SUPPORTED}. A bare UNet or VAE file goes in unet=... / vae=..."
        )
    # The lineage all of whose text-encoder prefixes are present; the most specific (most prefixes) wins.
    fits = [s for s in lineages().values() if s.single_file_text_prefixes
            and all(any(k.startswith(p) for k in keys) for p in s.single_file_text_prefixes)]
    if fits:
        return max(fits, key=lambda s: len(s.single_file_text_prefixes)).base
    raise UnsupportedModelError(
        f"{where} has a UNet but no recognised text encoder (expected 'conditioner.embedders.*' for SDXL or "
        f"'cond_stage_model.*' for SD1.5/SD2); supported: {SUPPORTED}"
    )


def prediction_type_hint(keys: Iterable[str], metadata: Mapping[str, str]) -> str | None:
    """'v_prediction' when the file says so (a `v_pred` marker tensor or modelspec metadata)."""
    keys = set(keys)
    if "v_pred" in keys:
        return "v_prediction"
    value = str(metadata.get("modelspec.prediction_type", "")).lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if value in ("epsilon", "eps"):
        return "epsilon"
    return None


# ---- configs from shapes ----------------------------------------------------------------------
_UNET_SHAPE_FIELDS = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                      "transformer_depth", "transformer_depth_middle", "context_dim", "use_linear_in_transformer",
                      "adm_in_channels")


def _count(keys: set[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


_RES_WIDTH_PARAMS = ("out_layers.3.weight", "in_layers.2.weight", "emb_layers.1.weight", "out_layers.0.weight",
                     "out_layers.3.bias", "in_layers.2.bias")


def _first_dim(shapes: Mapping[str, tuple[int, ...]], names: list[str]) -> int:
    """Output width from the first of `names` present (a damaged file may lack some)."""
    for name in names:
        if name in shapes:
            return shapes[name][0]
    raise KeyError(names[0])


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]], base: str) -> UNetConfig:
    """UNetConfig read off ldm UNet tensor shapes (keys without prefix).

    Head layout and GroupNorm groups are not visible in shapes: they follow the family (SD1.5: 8
    heads; SD2/SDXL: 64 channels per head; 32 groups). Raises KeyError/ValueError on a malformed set.
    Callers prefer a preset with the same shapes (`same_unet_shapes`), which fixes heads and groups.
    """
    keys = set(shapes)
    conv_in = shapes["input_blocks.0.0.weight"]
    mc, in_ch = conv_in[0], conv_in[1]
    levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.weight$") + 1
    n_in = _count(keys, r"input_blocks\.(\d+)\.")
    nrb = (n_in - 1 - (levels - 1)) // levels
    if nrb < 1 or 1 + levels * nrb + levels - 1 != n_in:
        raise ValueError(f"cannot read the UNet layout: {n_in} input blocks for {levels} levels")
    mult, depth = [], []
    for level in range(levels):
        first = 1 + level * (nrb + 1)
        width = _first_dim(shapes, [f"input_blocks.{first}.0.{n}" for n in _RES_WIDTH_PARAMS])
        if width % mc:
            raise ValueError(f"level {level} width {width} is not a multiple of {mc}")
        mult.append(width // mc)
        depth.append(_count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."))
    widths = [mc * m for m in mult]
    # Not visible in shapes: the family's head layout and 32 GroupNorm groups, reduced to a
    # divisor of every width when the model is too small for them (test-size models).
    spec = lineages()[base]
    if spec.unet_num_heads is not None:
        n = spec.unet_num_heads
        heads = {"num_heads": n if all(w % n == 0 for w in widths) else 1, "num_head_channels": None}
    else:
        heads = {"num_heads": None, "num_head_channels": math.gcd(spec.unet_head_channels, *widths)}
    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    proj = next((s for k, s in shapes.items() if k.endswith(".proj_in.weight")), None)
    adm = shapes.get("label_emb.0.0.weight")
    return UNetConfig(
        in_channels=in_ch,
        out_channels=shapes["out.2.weight"][0],
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=nrb,
        transformer_depth=tuple(depth),
        transformer_depth_middle=max(1, _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")),
        context_dim=context if context is not None else 768,
        use_linear_in_transformer=proj is not None and len(proj) == 2,
        adm_in_channels=adm[1] if adm is not None else None,
        norm_num_groups=math.gcd(32, *widths),
        **heads,
    )


def same_unet_shapes(a: UNetConfig, b: UNetConfig) -> bool:
    """Whether two configs give identical parameter shapes (heads and norm groups aside)."""
    return all(getattr(a, f) == getattr(b, f) for f in _UNET_SHAPE_FIELDS)


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]], like: VAEConfig) -> VAEConfig:
    """VAEConfig read off ldm VAE tensor shapes (keys without prefix); latent scaling, norm groups
    and upcasting come from `like` (the family's preset)."""
    keys = set(shapes)
    ch = shapes["encoder.conv_in.weight"][0]
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    nrb = _count(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    mult = [shapes[f"encoder.down.{lvl}.block.{nrb - 1}.conv2.weight"][0] // ch for lvl in range(levels)]
    groups = like.norm_num_groups if all((ch * m) % like.norm_num_groups == 0 for m in mult) else math.gcd(ch, 32)
    return VAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        ch=ch,
        ch_mult=tuple(mult),
        num_res_blocks=nrb,
        z_channels=shapes["decoder.conv_in.weight"][1],
        use_quant_conv="quant_conv.weight" in keys,  # the Flux VAE has none
        norm_num_groups=groups,
        norm_eps=like.norm_eps,
        scaling_factor=like.scaling_factor,
        shift_factor=like.shift_factor,
        force_upcast=like.force_upcast,
    )


def same_vae_shapes(a: VAEConfig, b: VAEConfig) -> bool:
    """Whether two configs give identical parameter shapes (norm groups and latent scaling aside)."""
    fields = ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def infer_clip_config(shapes: Mapping[str, tuple[int, ...]], activation: str) -> CLIPTextConfig:
    """CLIPTextConfig read off HF-named text encoder shapes; heads assume CLIP's 64 channels per head."""
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    proj = shapes.get("text_projection.weight")
    return CLIPTextConfig(
        hidden_size=hidden,
        num_layers=_count(set(shapes), r"text_model\.encoder\.layers\.(\d+)\."),
        num_heads=max(1, hidden // 64),
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        activation=activation,
        projection_dim=proj[0] if proj is not None else None,
        vocab_size=vocab,
        max_position=shapes["text_model.embeddings.position_embedding.weight"][0],
    )


def same_clip_shapes(a: CLIPTextConfig, b: CLIPTextConfig) -> bool:
    """Whether two configs give identical parameter shapes (heads aside)."""
    fields = ("hidden_size", "num_layers", "intermediate_size", "activation", "projection_dim", "vocab_size",
              "max_position")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


# ---- choosing configs ------------------------------------------------------------------------
_INIT_FUNCTIONS = frozenset(
    fn for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(fn := getattr(nn.init, n))
)


class _SkipInit(TorchFunctionMode):
    """Turns `torch.nn.init.*_` into no-ops while building on meta: the values are replaced by
    the checkpoint anyway, and some meta init kernels (normal_) pull in torch._dynamo, which costs
    seconds on first use."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INIT_FUNCTIONS:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def meta_module(config) -> nn.Module:
    """The module for a part config (`models.parts`) on the meta device: shapes only, no memory,
    no init."""
    with torch.device("meta"), _SkipInit():
        return build_part(config)


def presets_for(kind: str, base: str, family: str | None) -> list:
    """Preset configs of one part kind ("unet", "vae", "text": a list per family) to try, the
    requested family's first, then every family of `base`."""
    out = []
    for spec in families_of(base, first=family):
        if kind == "unet":
            out.append(UNetConfig.preset(spec.unet))
        elif kind == "vae":
            out.append(VAEConfig.preset(spec.vae))
        else:
            out.append([CLIPTextConfig.preset(p) for p in spec.text_encoders])
    return out


def pick_config(kind: str, shapes: Mapping[str, tuple[int, ...]], base: str, family: str | None,
                infer: Callable[[Mapping[str, tuple[int, ...]]], UNetConfig | VAEConfig]):
    """Config for a part of a single file: the preset with the file's shapes; else the config
    inferred from the shapes (a custom model); else, for a damaged file (inference fails or a
    preset fits 90% of the tensors), the closest preset so the error lists what is off."""
    same = {"unet": same_unet_shapes, "vae": same_vae_shapes}[kind]
    presets = presets_for(kind, base, family)
    try:
        inferred = infer(shapes)
    except (KeyError, ValueError, IndexError, ZeroDivisionError):
        inferred = None
    if inferred is not None:
        for preset in presets:
            if same(preset, inferred):
                return preset
        try:
            meta_module(inferred)
        except (ValueError, RuntimeError):
            inferred = None
    best = max(presets, key=lambda preset: _agreement(preset, shapes))
    if inferred is None or _agreement(best, shapes) >= 0.9 * len(shapes):
        return best
    return inferred


def _agreement(config, shapes) -> int:
    """How many of the file's (name, shape) pairs the module of `config` has."""
    expected = meta_module(config).state_dict()
    return sum(1 for name, shape in shapes.items() if name in expected and tuple(expected[name].shape) == tuple(shape))


def matching_family(base: str, family: str | None, unet: UNetConfig, vae: VAEConfig,
                    encoders: list[CLIPTextConfig]) -> str:
    """The FAMILIES entry whose presets have these parameter shapes, else the base family."""
    for spec in families_of(base, first=family):
        name = spec.name
        if same_unet_shapes(unet, UNetConfig.preset(spec.unet)) and same_vae_shapes(vae, VAEConfig.preset(spec.vae)) \
                and all(same_clip_shapes(c, CLIPTextConfig.preset(p)) for c, p in zip(encoders, spec.text_encoders)):
            return name
    return base


# ---- writing ----------------------------------------------------------------------------------
# ln(100): the clamped temperature every released OpenCLIP model ends training with.
_LOGIT_SCALE = math.log(100.0)


def single_file_state_dict(bundle) -> dict[str, torch.Tensor]:
    """The bundle's weights under single-file names (views where no conversion is needed).

    Adds the constant entries single files conventionally carry (CLIP-L `position_ids`, OpenCLIP
    `logit_scale`), so an SDXL/SD1.5 bundle gives exactly the reference key set. The VAE and text
    encoders go under the family's prefixes (FLUX.1: ComfyUI's `vae.` and `text_encoders.*`); a T5
    writes its tied embedding once, as `shared.weight`. Works on `meta`.
    """
    from ..t5 import T5_EMBEDDING_KEYS

    spec = bundle.spec
    prefixes = spec.single_file_text_prefixes
    if not prefixes:
        raise ValueError(f"no single-file layout for family {bundle.family!r}")
    out: dict[str, torch.Tensor] = {}
    for k, v in bundle.denoiser.state_dict().items():
        out[UNET_PREFIX + k] = v
    for k, v in bundle.vae.state_dict().items():
        out[spec.single_file_vae_prefix + k] = v
    for prefix, encoder in zip(prefixes, bundle.text_encoders):
        sd = encoder.state_dict()
        if not isinstance(encoder.config, CLIPTextConfig):
            out.update({prefix + k: v for k, v in sd.items() if k != T5_EMBEDDING_KEYS[1]})
            continue
        weight = sd["text_model.embeddings.token_embedding.weight"]
        if is_openclip_prefix(prefix):
            out.update(hf_to_openclip(sd, prefix))
            out[prefix + "logit_scale"] = torch.tensor(_LOGIT_SCALE, dtype=weight.dtype, device=weight.device)
        else:
            for k, v in sd.items():
                out[prefix + k] = v
            n = encoder.config.max_position
            out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n, device=weight.device).unsqueeze(0)
    return out


def save_single_file(bundle_or_state, path: str | Path, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a single-file checkpoint (atomically) from a ModelBundle or a ready state dict.

    dtype: convert floating tensors (None keeps each tensor's dtype). A bundle whose spec says
    v-prediction records it as `modelspec.prediction_type` metadata.
    """
    meta = {"format": "pt"}
    if isinstance(bundle_or_state, Mapping):
        state = bundle_or_state
    else:
        state = single_file_state_dict(bundle_or_state)
        if bundle_or_state.spec.prediction_type == "v_prediction":
            meta["modelspec.prediction_type"] = "v"
    meta.update(metadata or {})
    return save_file(state, path, metadata=meta, dtype=dtype)
