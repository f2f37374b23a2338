"""`load_model`: any SD1.5 / SD2.x / SDXL or FLUX.1 checkpoint -> a `ModelBundle` of our native modules.

Sources: a diffusers folder (plain, fp16-variant or sharded weights), a single-file checkpoint
(`.safetensors`), a Hugging Face repo id / file / URL, plus optional separate `vae=` / `unet=`
files or folders. Pickle checkpoints (.ckpt/.pt/.bin) only with `allow_pickle=True`. FLUX.1
checkpoints (a transformer file with separate VAE / text-encoder files, a ComfyUI all-in-one file,
a diffusers `FluxPipeline` folder) are assembled by `flux_files`; `text_encoders=` / `tokenizers=`
name the separate text-encoder files and the T5 tokenizer.

How: each part's config comes from its config.json (diffusers) or from the tensor shapes (single
file); modules are built on the `meta` device (no memory, no random init). On the CPU, tensors
already stored in the target dtype become copy-on-write views of the memory-mapped file (no
copy; `mmap=False` copies instead). Every other tensor is copied once into new memory of the
target dtype/device, after which its mapped pages are dropped. Tensors are assigned with
`load_state_dict(assign=True)`. Peak memory is the loaded model's size plus one tensor.

Strict: every tensor of the file must be used or be on an explicit ignore list, and every
parameter must be found with the right shape; otherwise one ModelLoadError lists the first few
missing / unexpected / mis-shaped tensors and the likely cause. Every parameter is checked for
NaN/inf as it is materialised (one fused min/max pass over data that is being read anyway;
`safetensors_io.all_finite`), so a damaged checkpoint fails here instead of giving black images.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..bundle import ModelBundle
from ..families import FAMILIES, lineages
from .components import (
    folder_text,
    folder_unet,
    folder_vae,
    local_path,
    open_weights,
    shapes_of,
    text_part,
    unet_from_diffusers_store,
    vae_from_diffusers_store,
)
from .diffusers_folder import FolderError, load_tokenizer, pipeline_class, prediction_type, read_json
from .diffusers_keys import UnsupportedConfigError, unet_config_from_diffusers, vae_config_from_diffusers
from .flux_files import FLUX_BASE, flux_parts, is_flux_source
from .hub import HubError
from .materialize import ModelLoadError, Part, materialize, title, validate_parts
from .safetensors_io import SafetensorsError
from .single_file import (
    SUPPORTED,
    UNET_PREFIX,
    VAE_PREFIX,
    UnsupportedModelError,
    describe_foreign,
    detect_family,
    infer_clip_config,
    infer_unet_config,
    infer_vae_config,
    is_ignored,
    is_openclip_prefix,
    matching_family,
    meta_module,
    pick_config,
    prediction_type_hint,
    presets_for,
    same_clip_shapes,
    same_unet_shapes,
    same_vae_shapes,
    text_prefixes,
)
from ..clip import CLIPTextConfig
from ..tokenizer import CLIPTokenizer

__all__ = ["ModelLoadError", "load_model", "open_weights"]
# ModelLoadError lives with the checks that raise most of them; it is part of this module's API.


_TEXT_SLOTS = ("text_encoder", "text_encoder_2")
_EXPECTED_ERRORS = (SafetensorsError, FolderError, HubError, UnsupportedConfigError, UnsupportedModelError)


# ---- public ---------------------------------------------------------------------------------
def load_model(
    source: str | Path,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    vae: str | Path | None = None,
    unet: str | Path | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    *,
    prediction_type: str | None = None,
    mmap: bool = True,
    quantize: Mapping[str, str] | None = None,
    text_encoders: Sequence[str | Path | None] | None = None,
    tokenizers: Sequence[str | Path | None] | None = None,
) -> ModelBundle:
    """Load a checkpoint into a ModelBundle (modules in eval mode).

    source: diffusers folder, single `.safetensors` file, hub repo id, `user/repo/file.safetensors`,
        a huggingface.co file URL, or the name of a family that ships weights (`toy-sdxl`: the file
        under `models/assets/`, offline).
    family: "sdxl" / "sd15" / "sd2" / "flux-dev" / "flux-schnell" (or a tiny test family) to insist
        on; None detects it.
    dtype: parameter dtype; None keeps what the file stores (per module, the widest float dtype;
        fp8-stored weights are upcast to it, never computed in fp8).
    device: where the parameters are created.
    vae / unet: a separate VAE / denoiser (UNet or FLUX.1 transformer) file or folder (ldm, BFL or
        diffusers layout) replacing the source's (e.g. the fp16-fix SDXL VAE, or FLUX.1's
        `ae.safetensors` beside a transformer-only file).
    variant: weight variant of a diffusers folder ("fp16"); the plain weights are used when
        the folder has none (and the variant when it has only that).
    allow_pickle: load .ckpt/.pt/.bin files with `torch.load(weights_only=True)`.
    prediction_type: "epsilon" / "v_prediction" overriding what the checkpoint implies (SD only).
    mmap: on the CPU, keep tensors whose stored dtype is already the target as copy-on-write
        views of the file (no copy: faster, memory = file pages shared with the page cache).
        Pass False for private copies, e.g. if the file may be rewritten in place (not by
        rename) while the model is in use.
    quantize: part (`unet`, `text_encoder`, `text_encoder_2`) -> `fp8` | `int8` | `nf4` | `none`:
        pack those parts' quantizable weights while loading (`models.quant`).
    text_encoders: FLUX.1 only: one file or folder per text encoder, in order [CLIP-L, T5-XXL]
        (e.g. [`clip_l.safetensors`, `t5xxl_fp16.safetensors`]); None entries keep the source's.
    tokenizers: FLUX.1 only: one tokenizer source per text encoder; None entries keep the
        source's (CLIP-L's vocabulary ships with lorasmith). The T5 tokenizer is a folder holding
        `tokenizer.json` or `spiece.model` (a FLUX.1 diffusers `tokenizer_2/`), one of those
        files, or a hub repo id.
    Raises ModelLoadError.
    """
    try:
        source, family = _shipped(source, family)
        return _load(source, family, dtype, torch.device(device), vae, unet, variant, allow_pickle, prediction_type,
                     mmap, quantize or {}, text_encoders, tokenizers)
    except _EXPECTED_ERRORS as e:
        raise ModelLoadError(str(e)) from None


# ---- orchestration --------------------------------------------------------------------------
def _shipped(source, family: str | None) -> tuple[str | Path, str | None]:
    """The name of a family that ships weights as that file, with that family (the name wins over a
    same-named path, as in `open_model`); any other source unchanged. The name of a family without
    shipped weights that is no path either gets a clear error instead of a hub lookup."""
    if not isinstance(source, str) or source not in FAMILIES:
        return source, family
    spec = FAMILIES[source]
    if spec.pretrained is None:
        if Path(source).expanduser().exists():
            return source, family
        raise ModelLoadError(f"{source!r} is a model family that ships no weights; build_model({source!r}) (or "
                             "open_model) gives it random weights, or load a checkpoint of it")
    if family is not None and family != source:
        raise ModelLoadError(f"family={family!r} contradicts source={source!r} (the {source} family's shipped "
                             f"weights); leave family unset or set it to {source!r}")
    try:
        return spec.pretrained_path(), source
    except FileNotFoundError as exc:
        raise ModelLoadError(str(exc)) from None


def _check_family(family: str | None) -> str | None:
    if family is None:
        return None
    if family not in FAMILIES:
        raise ModelLoadError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)} (or None to detect it)")
    return FAMILIES[family].base


def _load(source, family, dtype, device, vae, unet, variant, allow_pickle, pred, zero_copy, quantize,
          text_encoders, tokenizers) -> ModelBundle:
    want_base = _check_family(family)
    prefer_half = dtype == torch.float16 or variant == "fp16"
    path = local_path(source, prefer_half)
    if want_base == FLUX_BASE or is_flux_source(path, allow_pickle):
        if pred is not None:
            raise ModelLoadError(f"prediction_type={pred!r} does not apply to FLUX.1 (a flow-matching model that "
                                 "predicts velocity); leave it unset")
        flux = flux_parts(path, family, variant=variant, prefer_half=prefer_half, allow_pickle=allow_pickle,
                          vae=vae, denoiser=unet, text_encoders=text_encoders, tokenizers=tokenizers)
        return _assemble(flux.family, flux.parts, flux.tokenizers, FAMILIES[flux.family], FLUX_BASE, family,
                         dtype, device, zero_copy, quantize, check=flux.check_widths)
    if text_encoders is not None or tokenizers is not None:
        given = "text_encoders" if text_encoders is not None else "tokenizers"
        raise ModelLoadError(f"{given}= names separate text-encoder files / tokenizers of a FLUX.1 model; {path} is "
                             "not one (SD checkpoints carry their text encoders: leave it unset)")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is a folder without model_index.json, so not a diffusers pipeline; "
                                 f"supported: {SUPPORTED}")
        base, parts, tokenizers, hinted = _from_folder(path, want_base, family, variant, prefer_half, allow_pickle)
    else:
        base, parts, tokenizers, hinted = _from_single_file(path, want_base, family, allow_pickle)
    if vae is not None:
        vae_path = local_path(vae, prefer_half, component=True)
        parts["vae"] = separate_part("vae", vae_path, base, parts["vae"].config, variant, prefer_half, allow_pickle)
    if unet is not None:
        unet_path = local_path(unet, prefer_half, component=True)
        parts["unet"] = separate_part("unet", unet_path, base, parts["unet"].config, variant, prefer_half, allow_pickle)
    name = matching_family(base, family, parts["unet"].config, parts["vae"].config,
                           [parts[s].config for s in _TEXT_SLOTS if s in parts])
    spec = FAMILIES[name]
    if pred is not None or hinted is not None:
        spec = dataclasses.replace(spec, prediction_type=pred or hinted)
    return _assemble(name, parts, tokenizers, spec, base, family, dtype, device, zero_copy, quantize)


def _assemble(name, parts, tokenizers, spec, base, family, dtype, device, zero_copy, quantize,
              check=None) -> ModelBundle:
    """Check every part against its module (then `check()`, how the parts fit together),
    materialise them and make the bundle."""
    modules = {slot: meta_module(part.config) for slot, part in parts.items()}
    validate_parts(parts, modules, base, family)
    if check is not None:
        check()
    for slot, part in parts.items():
        materialize(modules[slot], part, dtype, device, zero_copy, quantize.get(slot))
    for part in parts.values():
        part.sources.clear()  # drop the last views so the memory maps can close
        part.store.close()
    encoders = [modules[s] for s in _TEXT_SLOTS if s in modules]
    bundle = ModelBundle(family=name, denoiser=modules["unet"], vae=modules["vae"], text_encoders=encoders,
                         tokenizers=tokenizers, spec=spec)
    for module in bundle.modules().values():
        module.eval()
    return bundle


# ---- single files ---------------------------------------------------------------------------
def _from_single_file(path: Path, want_base, family, allow_pickle):
    store = open_weights(path, allow_pickle)
    keys = list(store)
    base = detect_family(keys, str(path))
    if want_base is not None and want_base != base:
        raise ModelLoadError(
            f"{path} is an {title(base)} checkpoint (keys under {text_prefixes(base)[0]!r}) but family="
            f"{family!r} was requested; pass family={base!r} or leave family unset"
        )
    hinted = prediction_type_hint(keys, store.metadata)
    parts = {}
    claimed = set()
    unet_src = {k[len(UNET_PREFIX):]: k for k in keys if k.startswith(UNET_PREFIX)}
    cfg = pick_config("unet", shapes_of(unet_src, store), base, family, lambda s: infer_unet_config(s, base))
    parts["unet"] = _prefixed_part("unet", cfg, store, unet_src, UNET_PREFIX)
    vae_src = {k[len(VAE_PREFIX):]: k for k in keys if k.startswith(VAE_PREFIX) and not is_ignored(k)}
    like = presets_for("vae", base, family)[0]
    cfg = pick_config("vae", shapes_of(vae_src, store), base, family, lambda s: infer_vae_config(s, like))
    parts["vae"] = _prefixed_part("vae", cfg, store, vae_src, VAE_PREFIX)
    claimed.update(unet_src.values(), vae_src.values())
    for i, prefix in enumerate(text_prefixes(base)):
        slot = _TEXT_SLOTS[i]
        part = text_part(slot, prefix, store, keys, is_ignored)
        shapes = shapes_of(part.sources, store)
        activation = "gelu" if is_openclip_prefix(prefix) else "quick_gelu"
        try:
            inferred = infer_clip_config(shapes, activation)
        except (KeyError, ValueError):
            inferred = None
        presets = [p[i] for p in presets_for("text", base, family)]
        part.config = next((p for p in presets if inferred is not None and same_clip_shapes(p, inferred)),
                           inferred or presets[0])
        parts[slot] = part
        claimed.update(k for k in keys if k.startswith(prefix))
    leftovers = [k for k in keys if k not in claimed and not is_ignored(k)]
    parts["unet"].unexpected += leftovers  # reported with the rest; they belong to no part
    tokenizers = [CLIPTokenizer(pad_token_id=pad) for pad in lineages()[base].pad_token_ids]
    return base, parts, tokenizers, hinted


def _prefixed_part(slot, config, store, sources, prefix) -> Part:
    return Part(slot, config, store, sources, label=dict(sources), prefix=prefix)


# ---- diffusers folders ----------------------------------------------------------------------
def _from_folder(path: Path, want_base, family, variant, prefer_half, allow_pickle):
    cls = pipeline_class(path)
    index = read_json(path / "model_index.json")
    if not cls.startswith("StableDiffusion") or cls.startswith("StableDiffusion3"):
        raise ModelLoadError(f"{path} is a {cls or 'unknown'} pipeline; supported: {SUPPORTED}")
    if not index.get("text_encoder") or index.get("text_encoder") == [None, None]:
        raise ModelLoadError(f"{path} is a {cls} without a CLIP-L text encoder (an SDXL refiner?); "
                             f"supported: {SUPPORTED}")
    has_te2 = bool(index.get("text_encoder_2")) and index.get("text_encoder_2") != [None, None]
    parts = {"unet": folder_unet(path / "unet", variant, prefer_half, allow_pickle),
             "vae": folder_vae(path / "vae", variant, prefer_half, allow_pickle)}
    for slot in _TEXT_SLOTS[: 2 if has_te2 else 1]:
        parts[slot] = folder_text(path / slot, variant, prefer_half, allow_pickle)
    base = _folder_lineage(path, cls, [parts[s].config for s in _TEXT_SLOTS if s in parts])
    if want_base is not None and want_base != base:
        raise ModelLoadError(f"{path} is an {title(base)} pipeline ({cls}) but family={family!r} was "
                             f"requested; pass family={base!r} or leave family unset")
    pads = lineages()[base].pad_token_ids
    tokenizers = [load_tokenizer(path / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}"), pad)
                  for i, pad in enumerate(pads)]
    return base, parts, tokenizers, prediction_type(path)


def _folder_lineage(path: Path, cls: str, encoders: list) -> str:
    """The lineage of a diffusers pipeline folder: the family declaring this pipeline class with
    as many text encoders, of the same activation (OpenCLIP towers use gelu, CLIP-L quick_gelu)."""
    for spec in lineages().values():
        if spec.diffusers_pipeline != cls or len(spec.text_encoders) != len(encoders):
            continue
        presets = spec.text_encoder_configs()
        if all(isinstance(p, CLIPTextConfig) and p.activation == e.activation for p, e in zip(presets, encoders)):
            return spec.base
    raise ModelLoadError(f"{path} is a {cls} whose {len(encoders)} text encoder(s) match no supported family; "
                         f"supported: {SUPPORTED}")


# ---- overrides ------------------------------------------------------------------------------
def separate_part(slot: str, path: Path, base, default, variant, prefer_half, allow_pickle):
    """The `unet` or `vae` part given separately (`unet=` / `vae=`): a diffusers folder (or its
    component folder), a bare file with diffusers names (config from a `config.json` beside it),
    or ldm names with or without the single-file prefix (from a full checkpoint only that part's
    tensors are used). A file with the default's shapes keeps the default config (e.g. the
    source's latent scaling)."""
    unet = slot == "unet"
    if path.is_dir():
        folder = path / slot if (path / "model_index.json").is_file() else path
        return (folder_unet if unet else folder_vae)(folder, variant, prefer_half, allow_pickle)
    store = open_weights(path, allow_pickle)
    keys = list(store)
    foreign = describe_foreign(keys)
    if foreign:
        raise ModelLoadError(f"{slot}={path} is {foreign}")
    if any(k.startswith("down_blocks." if unet else "encoder.down_blocks.") for k in keys):
        cfg_path = path.parent / "config.json"
        from_diffusers = unet_config_from_diffusers if unet else vae_config_from_diffusers
        config = from_diffusers(read_json(cfg_path), str(cfg_path)) if cfg_path.is_file() else default
        return (unet_from_diffusers_store if unet else vae_from_diffusers_store)(store, config)
    full = UNET_PREFIX if unet else VAE_PREFIX
    prefix = full if any(k.startswith(full) for k in keys) else ""
    sources = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and not is_ignored(k)}
    infer = (lambda sh: infer_unet_config(sh, base)) if unet else (lambda sh: infer_vae_config(sh, default))
    config = pick_config(slot, shapes_of(sources, store), base, None, infer)
    if (same_unet_shapes if unet else same_vae_shapes)(config, default):
        config = default
    return _prefixed_part(slot, config, store, sources, prefix)
