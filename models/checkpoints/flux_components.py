"""The parts of a FLUX.1 bundle read from the tensors of one file or folder: the transformer (BFL or
diffusers names), the 16-channel VAE (ldm or diffusers names), CLIP-L and T5-XXL (HF names), each
under a key prefix, with their configs read off the shapes (the family's preset when the shapes
are its own) and their fp8 scales.

fp8 storage: weights stored as float8 are upcast when loaded (`materialize`). ComfyUI's scaled
fp8 files (a `scaled_fp8` marker tensor) keep each Linear weight as fp8 with an fp32 scale beside
it, `<layer>.scale_weight`; its newer mixed-precision files name the scale `<layer>.weight_scale`
and describe the format in `<layer>.comfy_quant` (UTF-8 JSON). The weight is fp8 x scale. The
input scales (`scale_input` / `input_scale`) only serve fp8 matmuls and are not needed.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..clip import CLIPTextConfig
from ..flux import FluxConfig
from ..t5 import T5_EMBEDDING_KEYS, T5Config
from ..vae import VAEConfig
from .components import shapes_of, text_part, vae_from_diffusers_store
from .diffusers_folder import read_json
from .diffusers_keys import vae_config_from_diffusers
from .flux_keys import STANDARD_AXES_DIM, FluxDiffusersView, flux_config_from_shapes
from .materialize import Lazy, ModelLoadError, Part
from .openclip_keys import HF_IGNORED_KEYS
from .safetensors_io import TensorStore
from .single_file import (
    infer_clip_config,
    infer_vae_config,
    same_clip_shapes,
    same_vae_shapes,
)

__all__ = [
    "CLIP_IGNORED",
    "attach_scales",
    "clip_part",
    "is_aux_key",
    "t5_part",
    "transformer_part",
    "vae_part",
]

CLIP_IGNORED = HF_IGNORED_KEYS | {"text_projection.weight"}
"""CLIP-L entries FLUX.1 does not use: ComfyUI's CLIP-L keeps a projection (and a logit scale),
but FLUX.1 conditions on the pooled state before any projection."""
_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
_AUX_SUFFIXES = (*_SCALE_SUFFIXES, "scale_input", "input_scale", "comfy_quant")
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_MARKERS = ("scaled_fp8", "logit_scale")


def is_aux_key(key: str, prefix: str = "") -> bool:
    """Whether `key` (under `prefix`) is fp8 bookkeeping (scales, markers) or a logit scale,
    none of which is a parameter."""
    leaf = key[len(prefix):].rpartition(".")[2]
    return leaf in _MARKERS or leaf in _AUX_SUFFIXES


def attach_scales(part: Part, where: str) -> set[str]:
    """Record the scale of every scaled-fp8 weight of `part` (`Part.scales`) and check the stored
    format; returns the store keys of the part's fp8 bookkeeping (to be counted as used)."""
    store, used = part.store, set()
    for name, key in list(part.sources.items()):
        if isinstance(key, Lazy):  # pieces fused on load: a scale per piece is not a layout we know
            scaled = next((k for k in key.keys for s in _SCALE_SUFFIXES if k[: -len("weight")] + s in store), None)
            if scaled is not None:
                raise ModelLoadError(f"{where}: {scaled!r} is scaled fp8 in diffusers names, which this loader does "
                                     "not read; use the file in BFL names or unscaled")
            continue
        if not isinstance(key, str) or not key.endswith("weight"):
            continue
        base = key[: -len("weight")]
        for aux in _AUX_SUFFIXES:
            if base + aux in store:
                used.add(base + aux)
        if base + "comfy_quant" in store:
            fmt = _quant_format(store, base + "comfy_quant")
            if fmt not in _FP8_FORMATS:
                raise ModelLoadError(f"{where}: {key!r} is stored in ComfyUI's {fmt!r} quantized format, which "
                                     "this loader does not read; use an fp16, bf16 or fp8 file of the model")
        scale = next((base + s for s in _SCALE_SUFFIXES if base + s in store), None)
        if scale is None:
            continue
        dtype, shape, rows = store.dtype(key), store.shape(scale), store.shape(key)[0]
        if dtype.itemsize != 1 or not dtype.is_floating_point:
            raise ModelLoadError(f"{where}: {key!r} has a scale ({scale!r}) but is stored as {dtype}, not fp8; the "
                                 "file mixes quantization formats this loader does not read")
        if math.prod(shape) not in (1, rows):
            raise ModelLoadError(f"{where}: {scale!r} has shape {list(shape)}; expected one scale per tensor or per "
                                 f"output row ({rows}) - the file is damaged")
        part.scales[name] = scale
    return used


def _quant_format(store: TensorStore, key: str) -> str:
    try:
        return str(json.loads(bytes(store[key].to(torch.uint8).tolist()).decode("utf-8")).get("format", "?"))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return "unreadable"


# ---- transformer -------------------------------------------------------------------------------
def transformer_part(store: TensorStore, prefix: str, layout: str, presets: list[FluxConfig], where: str,
                     config: FluxConfig | None = None) -> tuple[Part, set[str]]:
    """The transformer stored under `prefix` in BFL (`layout` "bfl") or diffusers names, and the
    store keys it uses. Config: `config` (a diffusers config.json) or read off the shapes, the
    RoPE split taken from the preset with the same head width."""
    mine = [k for k in store if k.startswith(prefix) and not is_aux_key(k, prefix)]
    shapes = {k[len(prefix):]: store.shape(k) for k in mine}
    if config is None:
        bfl = shapes if layout == "bfl" else _bfl_shapes(shapes, where)
        config = _config_from_shapes(bfl, presets, where)
    if layout == "bfl":
        sources = {k[len(prefix):]: k for k in mine}
        part = Part("unet", config, store, sources, label=dict(sources), prefix=prefix)
    else:
        part = _diffusers_transformer(store, prefix, config, where)
    used = set(mine) | attach_scales(part, where) | {prefix + m for m in _MARKERS if prefix + m in store}
    return part, used


def _config_from_shapes(shapes: Mapping[str, tuple[int, ...]], presets: list[FluxConfig], where: str) -> FluxConfig:
    first = "double_blocks.0.img_attn.norm.query_norm.scale"
    norm = shapes.get(first) or shapes.get("single_blocks.0.norm.query_norm.scale")
    head_dim = norm[0] if norm else None
    axes = next((p.axes_dim for p in presets if p.head_dim == head_dim), None)
    if head_dim is not None and axes is None and head_dim != sum(STANDARD_AXES_DIM):
        widths = sorted({p.head_dim for p in presets})
        raise ModelLoadError(f"{where}: attention heads of {head_dim} channels match no FLUX.1 family (heads of "
                             f"{', '.join(map(str, widths))}); the RoPE split of such a model is unknown")
    try:
        return flux_config_from_shapes(shapes, axes_dim=axes, where=where)
    except (ValueError, KeyError, IndexError) as e:
        raise ModelLoadError(str(e)) from None


def _bfl_shapes(shapes: Mapping[str, tuple[int, ...]], where: str) -> dict[str, tuple[int, ...]]:
    """The reference-named shapes `flux_config_from_shapes` reads, from diffusers-named ones."""
    def get(key):
        if key not in shapes:
            raise ModelLoadError(f"{where}: no {key}; not a FLUX.1 transformer in diffusers names (or a damaged one)")
        return shapes[key]

    out = {"img_in.weight": get("x_embedder.weight"), "txt_in.weight": get("context_embedder.weight"),
           "vector_in.in_layer.weight": get("time_text_embed.text_embedder.linear_1.weight"),
           "final_layer.linear.weight": get("proj_out.weight")}
    if "time_text_embed.guidance_embedder.linear_1.weight" in shapes:
        out["guidance_in.in_layer.weight"] = shapes["time_text_embed.guidance_embedder.linear_1.weight"]
    for i in sorted({int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[dst + "img_attn.norm.query_norm.scale"] = get(src + "attn.norm_q.weight")
        out[dst + "img_mlp.0.weight"] = get(src + "ff.net.0.proj.weight")
        if src + "attn.to_q.bias" in shapes:
            out[dst + "img_attn.qkv.bias"] = shapes[src + "attn.to_q.bias"]
    for i in sorted({int(m.group(1)) for k in shapes if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))}):
        src = f"single_transformer_blocks.{i}."
        rows = sum(get(src + n)[0] for n in ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight",
                                             "proj_mlp.weight"))
        out[f"single_blocks.{i}.norm.query_norm.scale"] = get(src + "attn.norm_q.weight")
        out[f"single_blocks.{i}.linear1.weight"] = (rows, *get(src + "attn.to_q.weight")[1:])
    return out


def _diffusers_transformer(store: TensorStore, prefix: str, cfg: FluxConfig, where: str) -> Part:
    """Our parameters over diffusers-named tensors: unfused ones are the stored tensors (zero-copy
    possible), fused ones (`Lazy`) the row-wise concatenation of their pieces by `FluxDiffusersView`,
    built when read. Missing and mis-sized pieces are left for the validation to list."""
    view = FluxDiffusersView(store, cfg, prefix, where)
    rows: dict[str, int] = {}
    for pieces in view.layout.values():
        for key, _, stop in pieces:
            rows[key] = max(rows.get(key, 0), stop)
    part = Part("unet", cfg, store, prefix=prefix)
    for name, pieces in view.layout.items():
        keys = [prefix + p.key for p in pieces]
        part.label[name] = keys[0]
        missing = next((k for k in keys if k not in store), None)
        if missing is not None:
            part.label[name] = missing
            continue
        wrong = next((k for k, p in zip(keys, pieces) if store.shape(k)[:1] != (rows[p.key],)), None)
        if wrong is not None:  # shown with its stored rows, so the validation reports it
            part.sources[name] = Lazy(store.shape(wrong), store.dtype(wrong), view.__getitem__, (wrong,))
            part.label[name] = wrong
        elif len(pieces) == 1:
            part.sources[name] = keys[0]
        else:
            total = sum(p.stop - p.start for p in pieces)
            part.sources[name] = Lazy((total, *store.shape(keys[0])[1:]), store.dtype(keys[0]),
                                      functools.partial(view.__getitem__, name), tuple(dict.fromkeys(keys)))
    part.unexpected = [k for k in view.unused() if not is_aux_key(k, prefix)]
    return part


# ---- VAE -----------------------------------------------------------------------------------------
def vae_part(store: TensorStore, prefix: str, like: VAEConfig, where: str, config_dir: Path | None = None,
             ) -> tuple[Part, set[str]]:
    """The VAE under `prefix`, in ldm names (BFL `ae.safetensors`: no prefix, no quant convs) or
    diffusers names (config from `config_dir/config.json` when there is one, else `like`)."""
    mine = [k for k in store if k.startswith(prefix)]
    if any(k.startswith(prefix + "encoder.down_blocks.") for k in mine):
        if prefix:
            raise ModelLoadError(f"{where}: a diffusers-named VAE under {prefix!r} is not a layout this loader knows")
        cfg_path = (config_dir or Path()) / "config.json"
        config = vae_config_from_diffusers(read_json(cfg_path), str(cfg_path)) if config_dir and cfg_path.is_file() \
            else like
        part = vae_from_diffusers_store(store, config)
        return part, set(mine)
    sources = {k[len(prefix):]: k for k in mine}
    try:
        inferred = infer_vae_config(shapes_of(sources, store), like)
    except (KeyError, ValueError, IndexError, ZeroDivisionError):
        inferred = None  # damaged: the preset's names make the validation list what is off
    config = like if inferred is None or same_vae_shapes(like, inferred) else inferred
    return Part("vae", config, store, sources, label=dict(sources), prefix=prefix), set(mine)


# ---- text encoders -------------------------------------------------------------------------------
def clip_part(store: TensorStore, prefix: str, like: CLIPTextConfig, where: str) -> tuple[Part, set[str]]:
    """CLIP-L under `prefix` in HF names (with or without `text_model.`); its projection and
    logit scale, which FLUX.1 does not use, are skipped."""
    keys = list(store)
    part = text_part("text_encoder", prefix, store, keys, lambda k: is_aux_key(k, prefix), CLIP_IGNORED)
    try:
        inferred = infer_clip_config(shapes_of(part.sources, store), like.activation)
    except (KeyError, ValueError, IndexError):
        inferred = None
    part.config = like if inferred is None or same_clip_shapes(like, inferred) else inferred
    used = {k for k in keys if k.startswith(prefix)} | attach_scales(part, where) | _wrapper_aux(store, prefix)
    return part, used


def t5_part(store: TensorStore, prefix: str, like: T5Config, where: str,
            config: T5Config | None = None) -> tuple[Part, set[str]]:
    """T5 v1.1 encoder under `prefix` in HF names. The tied embedding may be stored as
    `shared.weight`, `encoder.embed_tokens.weight` or both (which must then be equal)."""
    mine = [k for k in store if k.startswith(prefix) and not is_aux_key(k, prefix)]
    sources = {k[len(prefix):]: k for k in mine}
    present = [n for n in T5_EMBEDDING_KEYS if n in sources]
    if len(present) == 2:
        a, b = (store[sources[n]] for n in T5_EMBEDDING_KEYS)
        if a.shape != b.shape or not torch.equal(a, b.to(a.dtype)):
            raise ModelLoadError(f"{where}: {prefix}shared.weight and {prefix}encoder.embed_tokens.weight differ; T5 "
                                 "has one tied token embedding - the file is damaged or mixes two models")
    if present:  # both names of the one Parameter read the same stored tensor
        for name in T5_EMBEDDING_KEYS:
            sources[name] = sources[present[0]]
    if any(".DenseReluDense.wi.weight" in k for k in sources):
        raise ModelLoadError(f"{where}: a T5 v1.0 encoder (DenseReluDense.wi); FLUX.1 uses T5 v1.1 (gated wi_0/wi_1), "
                             "e.g. t5xxl_fp16.safetensors")
    if config is None:
        config = _t5_config(shapes_of(sources, store), like)
    part = Part("text_encoder_2", config, store, sources, label={n: k for n, k in sources.items()}, prefix=prefix)
    used = set(mine) | attach_scales(part, where) | _wrapper_aux(store, prefix)
    return part, used


def _wrapper_aux(store: TensorStore, prefix: str) -> set[str]:
    """Markers beside a text encoder: under its prefix, and ComfyUI's `logit_scale` one level up
    (`text_encoders.clip_l.logit_scale` beside `text_encoders.clip_l.transformer.`)."""
    parent = prefix[: -len("transformer.")] if prefix.endswith("transformer.") else None
    out = {prefix + m for m in _MARKERS}
    if parent is not None:
        out |= {parent + m for m in _MARKERS}
    return {k for k in out if k in store}


def _t5_config(shapes: Mapping[str, tuple[int, ...]], like: T5Config) -> T5Config:
    """T5Config read off HF shapes; the relative-distance limit and norm epsilon (not in shapes)
    come from `like`, the family's preset, which wins when the shapes are its own."""
    try:
        vocab, d_model = shapes["shared.weight"]
        buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        layers = len({m.group(1) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
        inferred = T5Config(d_model=d_model, d_kv=inner // heads, d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                            num_layers=layers, num_heads=heads, vocab_size=vocab, relative_attention_num_buckets=buckets,
                            relative_attention_max_distance=like.relative_attention_max_distance,
                            layer_norm_epsilon=like.layer_norm_epsilon)
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return like  # damaged: the preset's names make the validation list what is off
    fields = ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size", "relative_attention_num_buckets")
    return like if all(getattr(like, f) == getattr(inferred, f) for f in fields) else inferred
