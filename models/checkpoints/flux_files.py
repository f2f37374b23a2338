"""FLUX.1 checkpoints in the layouts users have, assembled into the parts of a flux-family bundle.

| layout                      | transformer                                   | VAE                     | CLIP-L                               | T5-XXL                              | T5 tokenizer       |
|-----------------------------|-----------------------------------------------|-------------------------|--------------------------------------|-------------------------------------|--------------------|
| BFL / ComfyUI split files   | `flux1-dev.safetensors` (BFL names, bare or under `model.diffusion_model.`) | `vae=ae.safetensors` (ldm names, no quant convs) | `text_encoders[0]`: `clip_l.safetensors` (HF names, with or without `text_model.`) | `text_encoders[1]`: `t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn[_scaled].safetensors` (HF names) | `tokenizers[1]` |
| ComfyUI all-in-one file     | `model.diffusion_model.`                      | `vae.`                  | `text_encoders.clip_l.transformer.`  | `text_encoders.t5xxl.transformer.`  | `tokenizers[1]`    |
| diffusers `FluxPipeline`    | `transformer/` (diffusers names, sharded)     | `vae/`                  | `text_encoder/`                      | `text_encoder_2/` (sharded)         | `tokenizer_2/`     |

The single-file prefixes are the family's (`FamilySpec.single_file_vae_prefix`,
`single_file_text_prefixes`). Any part may also be given separately (`vae=`, `unet=` for the
transformer, `text_encoders=[clip, t5]` with None keeping the source's), as a file, a diffusers
component folder or a pipeline folder; from a file holding more, only that part's tensors are read.
The family comes from the transformer: `guidance_in` present is FLUX.1-dev, absent schnell, and the
shapes pick a test-size family. CLIP-L's tokenizer ships with lorasmith; no T5 vocabulary does, so
without a `tokenizer_2/` or `tokenizers[1]` the bundle gets the family's stand-in, which says how to
give one when it is used.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..families import FAMILIES, FamilySpec, families_of, lineages
from ..t5 import t5_config_from_transformers
from .components import (
    component_store,
    folder_text,
    folder_vae,
    local_path,
    open_weights,
)
from .diffusers_folder import (
    PICKLE_SUFFIXES,
    FolderError,
    load_tokenizer,
    pipeline_class,
    read_json,
)
from .flux_components import (
    CLIP_IGNORED,
    clip_part,
    is_aux_key,
    t5_part,
    transformer_part,
    vae_part,
)
from .flux_keys import flux_config_from_diffusers, flux_transformer_layout
from .hub import download_tokenizer, parse_hub_source
from .materialize import ModelLoadError, Part
from .safetensors_io import TensorStore
from .single_file import (
    UnsupportedModelError,
    describe_component,
    describe_foreign,
    detect_family,
    looks_like_lora,
)

__all__ = ["FLUX_BASE", "FLUX_SUPPORTED", "FluxParts", "flux_parts", "is_flux_source"]

FLUX_BASE = "flux"
"""Lineage (`FamilySpec.base`) of the FLUX.1 families."""
FLUX_SUPPORTED = ("FLUX.1 sources: a transformer file (flux1-dev.safetensors) with vae= and text_encoders=, a ComfyUI "
                  "all-in-one file, or a diffusers FluxPipeline folder / hub id")
SLOTS = ("text_encoder", "text_encoder_2")
KINDS = ("CLIP-L", "T5-XXL")
_T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
_CLIP_KEYS = ("text_model.encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.weight")

Builder = Callable[[FamilySpec], tuple[Part, set]]


@dataclass
class FluxParts:
    """What `flux_parts` found: the family, its parts (slots `unet`, `vae`, `text_encoder`,
    `text_encoder_2`), the tokenizers, and where each part came from (for messages)."""

    family: str
    parts: dict[str, Part]
    tokenizers: list
    where: dict[str, str] = field(default_factory=dict)

    def check_widths(self) -> None:
        """The parts fit together: VAE latents, pooled CLIP width and T5 width are what the
        transformer reads. Raises ModelLoadError naming the odd file."""
        cfg = self.parts["unet"].config
        vae, clip, t5 = (self.parts[s].config for s in ("vae", *SLOTS))
        t = self.where["unet"]
        if vae.z_channels * 4 != cfg.in_channels:
            raise ModelLoadError(f"{self.where['vae']} is a VAE with {vae.z_channels} latent channels but the transformer "
                                 f"({t}) reads {cfg.in_channels // 4}-channel latents; FLUX.1 needs its own VAE "
                                 "(ae.safetensors, 16 channels)")
        if clip.hidden_size != cfg.vec_in_dim:
            raise ModelLoadError(f"{self.where['text_encoder']} is a CLIP text encoder of width {clip.hidden_size} but the "
                                 f"transformer ({t}) reads a {cfg.vec_in_dim}-wide pooled vector; give the CLIP-L of "
                                 "this model (text_encoders[0])")
        if t5.d_model != cfg.context_in_dim:
            raise ModelLoadError(f"{self.where['text_encoder_2']} is a T5 of width {t5.d_model} but the transformer ({t}) "
                                 f"reads {cfg.context_in_dim}-wide text states; give the T5-XXL of this model "
                                 "(text_encoders[1])")


@dataclass
class _Options:
    """How component folders and files are read (as `load_model`'s arguments say)."""

    variant: str | None
    prefer_half: bool
    allow_pickle: bool


def is_flux_source(path: Path, allow_pickle: bool = False) -> bool:
    """Whether `path` is a FLUX.1 source (a FluxPipeline folder, a diffusers transformer folder, a
    file holding a FLUX.1 transformer) or a T5 file given as one (answered with a how-to)."""
    if path.is_dir():
        try:
            if (path / "model_index.json").is_file():
                return pipeline_class(path) in _pipelines()
            if (path / "config.json").is_file():
                return read_json(path / "config.json").get("_class_name") == "FluxTransformer2DModel"
        except FolderError:
            return False
        return False
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        return False
    store = open_weights(path, allow_pickle)
    try:
        keys = list(store)
        return flux_transformer_layout(keys) is not None or _T5_KEY in store
    finally:
        store.close()


def flux_parts(path: Path, family: str | None, *, variant: str | None = None, prefer_half: bool = False,
               allow_pickle: bool = False, vae=None, denoiser=None, text_encoders: Sequence | None = None,
               tokenizers: Sequence | None = None) -> FluxParts:
    """The parts of the FLUX.1 model at `path` plus the separately given ones (module docstring).
    Raises ModelLoadError with one line saying what is wrong and what to give."""
    te_src, tok_src = _slots(text_encoders, "text_encoders"), _slots(tokenizers, "tokenizers")
    opts = _Options(variant, prefer_half, allow_pickle)
    builders: dict[str, Builder] = {}
    where: dict[str, str] = {}
    tok_dirs: dict[int, Path] = {}
    main: tuple[TensorStore, set[str]] | None = None  # a single file and the keys its parts claim
    if path.is_dir():
        _from_folder(path, opts, builders, where, tok_dirs)
    else:
        main = _from_file(path, family, opts, builders, where)
    if denoiser is not None:
        d = local_path(denoiser, prefer_half, component=True)
        builders["unet"] = _transformer_source(d, opts, f"unet={d}")
        where["unet"] = f"unet={d}"
    if vae is not None:
        v = local_path(vae, prefer_half, component=True)
        builders["vae"] = _vae_source(v, opts, f"vae={v}")
        where["vae"] = f"vae={v}"
    for i, src in enumerate(te_src):
        if src is not None:
            t = local_path(src, prefer_half, component=True)
            label = f"text_encoders[{i}]={t}"
            builders[SLOTS[i]] = _text_source(i, t, opts, label, tok_dirs)
            where[SLOTS[i]] = label
    if "unet" not in builders:
        raise ModelLoadError(f"{path} has no FLUX.1 transformer (no transformer/ component); give it as unet=... "
                             f"or use a complete model; {FLUX_SUPPORTED}")
    transformer, used = builders["unet"](None)
    name = _family_of(transformer.config, family, where["unet"])
    spec = FAMILIES[name]
    lacking = [slot for slot in ("vae", *SLOTS) if slot not in builders]
    if lacking:
        raise ModelLoadError(_missing_message(path, lacking))
    parts = {"unet": transformer}
    claimed = set(used)
    for slot in ("vae", *SLOTS):
        parts[slot], used = builders[slot](spec)
        claimed |= used
    if main is not None:  # tensors of the file that no part of it owns
        store, prefixed = main
        parts["unet"].unexpected += sorted(k for k in store if k not in prefixed and k not in claimed)
    return FluxParts(name, parts, _tokenizers(spec, tok_dirs, tok_src), where)


# ---- sources ------------------------------------------------------------------------------------
def _slots(values: Sequence | None, key: str) -> list:
    if values is None:
        return [None, None]
    if isinstance(values, (str, Path)) or len(values) != len(SLOTS):
        raise ModelLoadError(f"{key}: give one entry per text encoder, [CLIP-L, T5-XXL] (null keeps the checkpoint's), "
                             f"got {values!r}")
    return list(values)


def _pipelines() -> set[str]:
    return {s.diffusers_pipeline for s in families_of(FLUX_BASE) if s.diffusers_pipeline}


def _from_file(path: Path, family, opts: _Options, builders: dict, where: dict) -> tuple[TensorStore, set[str]]:
    store = open_weights(path, opts.allow_pickle)
    keys = list(store)
    layout = flux_transformer_layout(keys)
    if layout is None:
        asked = f"; family={family!r} was requested" if family is not None else ""
        raise ModelLoadError(f"{path} is {describe_file(keys)}, not a FLUX.1 checkpoint{asked}; {FLUX_SUPPORTED}")
    kind, prefix = layout
    lineage = lineages()[FLUX_BASE]
    builders["unet"] = lambda spec: transformer_part(store, prefix, kind, _presets(), str(path))
    prefixes = [prefix]
    vae_prefix = lineage.single_file_vae_prefix
    if vae_prefix and any(k.startswith(vae_prefix) for k in keys):
        builders["vae"] = lambda spec: vae_part(store, vae_prefix, spec.vae_config(), str(path))
        prefixes.append(vae_prefix)
    for i, text_prefix in enumerate(lineage.single_file_text_prefixes):
        if any(k.startswith(text_prefix) for k in keys):
            builders[SLOTS[i]] = _text_builder(i, store, text_prefix, str(path))
            prefixes.append(text_prefix)
    for slot in ("unet", "vae", *SLOTS):
        where[slot] = str(path)
    # Keys under a part's prefix belong to it (a part given separately replaces it, unread).
    owned = {k for k in keys if k.startswith(tuple(prefixes)) or is_aux_key(k)}
    return store, owned


def _presets() -> list:
    return [s.denoiser_config() for s in families_of(FLUX_BASE)]


def _from_folder(path: Path, opts: _Options, builders: dict, where: dict, tok_dirs: dict) -> None:
    if not (path / "model_index.json").is_file():  # a diffusers transformer folder alone
        builders["unet"] = _transformer_source(path, opts, str(path))
        where["unet"] = str(path)
        return
    cls = pipeline_class(path)
    if cls not in _pipelines():
        raise ModelLoadError(f"{path} is a {cls or 'unknown'} pipeline, not a FLUX.1 text-to-image one; {FLUX_SUPPORTED}")
    index = read_json(path / "model_index.json")

    def has(component: str) -> bool:
        return index.get(component) not in (None, [None, None]) and (path / component).is_dir()

    for slot, component in (("unet", "transformer"), ("vae", "vae"), *zip(SLOTS, SLOTS)):
        if not has(component):
            continue
        where[slot] = str(path / component)
        if slot == "unet":
            builders[slot] = _transformer_source(path / component, opts, where[slot])
        elif slot == "vae":
            builders[slot] = _vae_source(path / component, opts, where[slot])
        else:
            builders[slot] = _text_source(SLOTS.index(slot), path / component, opts, where[slot], {})
    for i, name in enumerate(("tokenizer", "tokenizer_2")):
        if (path / name).is_dir():
            tok_dirs[i] = path / name


def _transformer_source(path: Path, opts: _Options, label: str) -> Builder:
    """A transformer file (any known names and prefix), a diffusers `transformer/` folder, or a
    pipeline folder holding one."""
    config = None
    if path.is_dir():
        folder = path / "transformer" if (path / "model_index.json").is_file() else path
        cfg_path = folder / "config.json"
        try:
            config = flux_config_from_diffusers(read_json(cfg_path), str(cfg_path))
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        store = component_store(folder, opts.variant, opts.prefer_half, opts.allow_pickle)
    else:
        store = open_weights(path, opts.allow_pickle)
    layout = flux_transformer_layout(list(store))
    if layout is None:
        raise ModelLoadError(f"{label} is {describe_file(list(store))}, not a FLUX.1 transformer")
    kind, prefix = layout
    if kind == "bfl":
        config = None  # reference names: the shapes say it all
    return lambda spec: transformer_part(store, prefix, kind, _presets(), label, config)


def _vae_source(path: Path, opts: _Options, label: str) -> Builder:
    """A VAE file (ldm names bare or under a single-file prefix, or diffusers names with a
    config.json beside it), a diffusers `vae/` folder, or a pipeline folder holding one."""
    if path.is_dir():
        folder = path / "vae" if (path / "model_index.json").is_file() else path
        return lambda spec: (folder_vae(folder, opts.variant, opts.prefer_half, opts.allow_pickle), set())
    store = open_weights(path, opts.allow_pickle)
    keys = list(store)
    lineage = lineages()[FLUX_BASE]
    for prefix in dict.fromkeys((lineage.single_file_vae_prefix, "first_stage_model.", "")):
        if prefix + "encoder.conv_in.weight" in store:
            return lambda spec: vae_part(store, prefix, spec.vae_config(), label, path.parent)
    raise ModelLoadError(f"{label} holds no VAE (no encoder.conv_in.weight, bare or under "
                         f"{lineage.single_file_vae_prefix!r} / 'first_stage_model.'): it is {describe_file(keys)}")


def _text_builder(i: int, store: TensorStore, prefix: str, where: str, config=None) -> Builder:
    if i == 0:
        return lambda spec: clip_part(store, prefix, spec.text_encoder_configs()[0], where)
    return lambda spec: t5_part(store, prefix, spec.text_encoder_configs()[1], where, config)


def _text_source(i: int, path: Path, opts: _Options, label: str, tok_dirs: dict) -> Builder:
    """Text encoder `i` (0 CLIP-L, 1 T5) from a file (bare HF names or under the family's
    single-file prefix), a transformers component folder, or a pipeline folder holding one (whose
    tokenizer folder then comes along)."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            tok = path / ("tokenizer" if i == 0 else "tokenizer_2")
            if tok.is_dir():
                tok_dirs[i] = tok
            path = path / SLOTS[i]
        cfg_path = path / "config.json"
        found = _config_kind(read_json(cfg_path))
        if found != KINDS[i]:
            raise ModelLoadError(f"{label}: {cfg_path} describes {found or 'an unknown model'}, but slot {i} takes "
                                 f"{KINDS[i]} (order: [CLIP-L, T5-XXL])")
        if i == 0:
            return lambda spec: (folder_text(path, opts.variant, opts.prefer_half, opts.allow_pickle, "text_encoder",
                                             CLIP_IGNORED), set())
        try:
            config = t5_config_from_transformers(read_json(cfg_path), str(cfg_path))
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        store = component_store(path, opts.variant, opts.prefer_half, opts.allow_pickle)
        return _text_builder(1, store, "", label, config)
    store = open_weights(path, opts.allow_pickle)
    keys = list(store)
    found = _text_location(store, i)
    if found is None:
        raise ModelLoadError(f"{label} holds no {KINDS[i]} text encoder: it is {describe_file(keys)}")
    kind, prefix = found
    if kind != i:
        raise ModelLoadError(f"{label} is a {KINDS[kind]} text encoder, but slot {i} takes {KINDS[i]} "
                             f"(order: text_encoders=[CLIP-L, T5-XXL])")
    return _text_builder(i, store, prefix, label)


def _config_kind(d: dict) -> str | None:
    kind = str(d.get("model_type", ""))
    if kind == "t5":
        return KINDS[1]
    if kind.startswith("clip"):
        return KINDS[0]
    return None


def _text_location(store: TensorStore, want: int) -> tuple[int, str] | None:
    """(encoder index, prefix) of a text encoder in `store`: the wanted kind first, bare or under
    the family's single-file prefix for it."""
    prefixes = lineages()[FLUX_BASE].single_file_text_prefixes
    for kind in (want, 1 - want):
        for prefix in ("", prefixes[kind]):
            signature = (_T5_KEY,) if kind == 1 else _CLIP_KEYS
            if any(prefix + k in store for k in signature):
                return kind, prefix
    return None


# ---- family, messages, tokenizers ----------------------------------------------------------------
def _family_of(cfg, family: str | None, where: str) -> str:
    """The flux family whose transformer preset is `cfg`; else (a custom size) the requested one or
    the closest with the same guidance embedding (dev: guidance_in; schnell: none)."""
    specs = families_of(FLUX_BASE, first=family)
    exact = [s.name for s in specs if s.denoiser_config() == cfg]
    if exact:
        name = exact[0]
    else:
        same = [s for s in specs if s.denoiser_config().guidance_embed == cfg.guidance_embed] or specs
        names = [s.name for s in same]
        name = family if family in names else max(same, key=lambda s: _agreement(s.denoiser_config(), cfg)).name
    if family is not None and name != family:
        guidance = "with" if cfg.guidance_embed else "without"
        raise ModelLoadError(
            f"{where} is a {FAMILIES[name].title} transformer ({guidance} guidance_in, width {cfg.hidden_size}, "
            f"{cfg.depth}+{cfg.depth_single_blocks} blocks) but family={family!r} was requested; pass family={name!r} "
            "or leave family unset")
    return name


def _agreement(a, b) -> int:
    fields = ("hidden_size", "num_heads", "depth", "depth_single_blocks", "context_in_dim", "vec_in_dim", "in_channels")
    return sum(getattr(a, f) == getattr(b, f) for f in fields)


def _missing_message(path: Path, lacking: list[str]) -> str:
    has = "holds only the FLUX.1 transformer" if len(lacking) == 3 else "lacks part of the model"
    needs = ["the VAE as vae=ae.safetensors (config model.vae)"] if "vae" in lacking else []
    files = ["clip_l.safetensors" if SLOTS[0] in lacking else "null",
             "t5xxl_fp16.safetensors" if SLOTS[1] in lacking else "null"]
    if "null" in files:
        which = KINDS[files.index("null") ^ 1]
        needs.append(f"the {which} text encoder as text_encoders=[{', '.join(files)}] (config model.text_encoders)")
    elif SLOTS[0] in lacking:
        needs.append(f"the text encoders as text_encoders=[{', '.join(files)}] (config model.text_encoders)")
    return (f"{path} {has}: also give {' and '.join(needs)}. Without a diffusers folder the T5 tokenizer comes "
            "from tokenizers=[null, <folder with tokenizer.json or spiece.model, e.g. FLUX.1-dev/tokenizer_2>] "
            "(config model.tokenizers)")


def describe_file(keys: list[str]) -> str:
    """What a file that is not a FLUX.1 transformer holds, in a few words (for messages)."""
    if looks_like_lora(keys):
        return describe_foreign(keys)
    component = describe_component(keys)
    if component is not None:
        advice = {"a T5": "; FLUX.1 takes it as text_encoders=[<CLIP-L file>, <this file>] beside the transformer",
                  "a CLIP": "; FLUX.1 takes CLIP-L as text_encoders=[<this file>, <T5 file>] beside the transformer",
                  "a VAE": "; give it as vae=..."}
        return component + next(v for k, v in advice.items() if component.startswith(k))
    try:
        base = detect_family(keys, "the file")
        return f"an {lineages()[base].title} checkpoint"
    except UnsupportedModelError:
        pass
    foreign = describe_foreign(keys)
    if foreign:
        return foreign
    shown = ", ".join(repr(k) for k in sorted(keys)[:3])
    return f"an unknown set of {len(keys)} tensors (keys like {shown})"


def _tokenizers(spec: FamilySpec, tok_dirs: dict[int, Path], tok_src: list) -> list:
    """CLIP-L's and T5's tokenizers: the source's folders, else the family's (CLIP-L's shipped BPE;
    T5's stand-in or test vocabulary); `tokenizers=` entries override both. T5 rows have the
    family's length (512 dev, 256 schnell)."""
    defaults = spec.make_tokenizers()
    out = list(defaults)
    if 0 in tok_dirs:
        out[0] = load_tokenizer(tok_dirs[0], spec.pad_token_ids[0])
    if 1 in tok_dirs:
        out[1] = _t5_tokenizer(tok_dirs[1], defaults[1].max_length, str(tok_dirs[1]))
    if tok_src[0] is not None:
        folder = Path(tok_src[0]).expanduser()
        if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
            raise ModelLoadError(f"tokenizers[0]={tok_src[0]}: no vocab.json + merges.txt there; give a CLIP tokenizer "
                                 "folder, or null for the CLIP-L vocabulary that ships with lorasmith")
        out[0] = load_tokenizer(folder, spec.pad_token_ids[0])
    if tok_src[1] is not None:
        out[1] = _t5_tokenizer(_tokenizer_path(tok_src[1]), defaults[1].max_length, f"tokenizers[1]={tok_src[1]}")
    return out


def _tokenizer_path(source) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and (path / "model_index.json").is_file():
            return path / "tokenizer_2"
        return path
    ref = parse_hub_source(str(source))
    if ref is None:
        raise ModelLoadError(f"tokenizers[1]={source} does not exist: give the T5 tokenizer folder (tokenizer.json or "
                             "spiece.model; a FLUX.1 diffusers folder has it in tokenizer_2/), one of those files, or a "
                             "hub repo id")
    return download_tokenizer(ref)


def _t5_tokenizer(path: Path, max_length: int, label: str):
    from ..t5_tokenizer import T5Tokenizer

    try:
        return T5Tokenizer.from_files(path, max_length=max_length)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"{label}: cannot load the T5 tokenizer ({e})") from None

