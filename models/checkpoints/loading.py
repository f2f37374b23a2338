"""`load_model`: any SD1.5 / SD2.x / SDXL checkpoint -> a `ModelBundle` of our native modules.

Sources: a diffusers folder (plain, fp16-variant or sharded weights), a single-file checkpoint
(`.safetensors`), a Hugging Face repo id / file / URL, plus optional separate `vae=` / `unet=`
files or folders. Pickle checkpoints (.ckpt/.pt/.bin) only with `allow_pickle=True`.

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
from collections.abc import Mapping
from pathlib import Path

import torch

from ..bundle import ModelBundle
from ..families import FAMILIES, lineages
from .diffusers_folder import (
    PICKLE_SUFFIXES,
    FolderError,
    load_tokenizer,
    pickle_weights_file,
    pipeline_class,
    prediction_type,
    read_json,
    weights_file,
)
from .diffusers_keys import (
    VAE_DIFFUSERS_LEGACY_NAMES,
    UnsupportedConfigError,
    clip_config_from_transformers,
    unet_config_from_diffusers,
    unet_prefix_map,
    unet_to_diffusers_key,
    vae_config_from_diffusers,
    vae_to_diffusers_key,
)
from .hub import HubError, download, parse_hub_source
from .openclip_keys import (
    HF_IGNORED_KEYS,
    openclip_name_to_hf,
    openclip_to_hf,
)
from .materialize import ModelLoadError, Part, materialize, title, validate_parts
from .safetensors_io import SafetensorsError, TensorStore
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
from ..unet import UNetConfig
from ..vae import VAEConfig

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
) -> ModelBundle:
    """Load a checkpoint into a ModelBundle (modules in eval mode).

    source: diffusers folder, single `.safetensors` file, hub repo id, `user/repo/file.safetensors`
        or a huggingface.co file URL.
    family: "sdxl" / "sd15" / "sd2" (or a tiny test family) to insist on; None detects it.
    dtype: parameter dtype; None keeps what the file stores (per module, the widest float dtype).
    device: where the parameters are created.
    vae / unet: a separate VAE / UNet file or folder (ldm or diffusers layout) replacing the
        source's (e.g. the fp16-fix SDXL VAE).
    variant: weight variant of a diffusers folder ("fp16"); the plain weights are used when
        the folder has none (and the variant when it has only that).
    allow_pickle: load .ckpt/.pt/.bin files with `torch.load(weights_only=True)`.
    prediction_type: "epsilon" / "v_prediction" overriding what the checkpoint implies.
    mmap: on the CPU, keep tensors whose stored dtype is already the target as copy-on-write
        views of the file (no copy: faster, memory = file pages shared with the page cache).
        Pass False for private copies, e.g. if the file may be rewritten in place (not by
        rename) while the model is in use.
    quantize: part (`unet`, `text_encoder`, `text_encoder_2`) -> `fp8` | `int8` | `nf4` | `none`:
        pack those parts' quantizable weights while loading (`models.quant`).
    Raises ModelLoadError.
    """
    try:
        return _load(source, family, dtype, torch.device(device), vae, unet, variant, allow_pickle, prediction_type,
                     mmap, quantize or {})
    except _EXPECTED_ERRORS as e:
        raise ModelLoadError(str(e)) from None


def open_weights(path: str | Path, allow_pickle: bool = False) -> TensorStore:
    """A TensorStore over a `.safetensors` file, a sharded index, or (opt-in) a pickle checkpoint."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} is a pickle checkpoint ({path.suffix}), which can run arbitrary code when loaded; convert it "
                f"once with `python -m trainer convert {path} {path.with_suffix('.safetensors')} --allow-pickle` "
                "(or pass allow_pickle=True if you trust the file)"
            )
        return _pickle_store(path)
    try:
        return TensorStore.open(path)
    except SafetensorsError as e:
        raise ModelLoadError(str(e)) from None


# ---- orchestration --------------------------------------------------------------------------
def _local(source: str | Path, prefer_half: bool, component: bool = False) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    ref = parse_hub_source(str(source))
    if ref is None:
        raise ModelLoadError(f"{source} does not exist: give a local file or folder, a hub repo id "
                             "(user/repo), a hub file (user/repo/file.safetensors) or a huggingface.co URL")
    return download(ref, prefer_half=prefer_half, component=component)


def _check_family(family: str | None) -> str | None:
    if family is None:
        return None
    if family not in FAMILIES:
        raise ModelLoadError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)} (or None to detect it)")
    return FAMILIES[family].base


def _load(source, family, dtype, device, vae, unet, variant, allow_pickle, pred, zero_copy, quantize) -> ModelBundle:
    want_base = _check_family(family)
    prefer_half = dtype == torch.float16 or variant == "fp16"
    path = _local(source, prefer_half)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is a folder without model_index.json, so not a diffusers pipeline; "
                                 f"supported: {SUPPORTED}")
        base, parts, tokenizers, hinted = _from_folder(path, want_base, family, variant, prefer_half, allow_pickle)
    else:
        base, parts, tokenizers, hinted = _from_single_file(path, want_base, family, allow_pickle)
    if vae is not None:
        vae_path = _local(vae, prefer_half, component=True)
        parts["vae"] = _override("vae", vae_path, base, parts["vae"].config, variant, prefer_half, allow_pickle)
    if unet is not None:
        unet_path = _local(unet, prefer_half, component=True)
        parts["unet"] = _override("unet", unet_path, base, parts["unet"].config, variant, prefer_half, allow_pickle)
    modules = {slot: meta_module(part.config) for slot, part in parts.items()}
    validate_parts(parts, modules, base, family)
    for slot, part in parts.items():
        materialize(modules[slot], part, dtype, device, zero_copy, quantize.get(slot))
    for part in parts.values():
        part.sources.clear()  # drop the last views so the memory maps can close
        part.store.close()
    name = matching_family(base, family, parts["unet"].config, parts["vae"].config,
                           [parts[s].config for s in _TEXT_SLOTS if s in parts])
    spec = FAMILIES[name]
    if pred is not None or hinted is not None:
        spec = dataclasses.replace(spec, prediction_type=pred or hinted)
    encoders = [modules[s] for s in _TEXT_SLOTS if s in modules]
    bundle = ModelBundle(family=name, unet=modules["unet"], vae=modules["vae"], text_encoders=encoders,
                         tokenizers=tokenizers, spec=spec)
    for module in bundle.modules().values():
        module.eval()
    return bundle


# ---- single files ---------------------------------------------------------------------------
def _pickle_store(path: Path) -> TensorStore:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise ModelLoadError(f"{path}: cannot load it as a weights-only pickle ({type(e).__name__}: {e}); "
                             "it may contain code or be corrupt") from None
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    return TensorStore(tensors={k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, name=str(path))


def _shapes(sources: Mapping[str, str | torch.Tensor], store: TensorStore) -> dict[str, tuple[int, ...]]:
    return {k: (store.shape(v) if isinstance(v, str) else tuple(v.shape)) for k, v in sources.items()}


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
    parts: dict[str, Part] = {}
    claimed = set()
    unet_src = {k[len(UNET_PREFIX):]: k for k in keys if k.startswith(UNET_PREFIX)}
    cfg = pick_config("unet", _shapes(unet_src, store), base, family, lambda s: infer_unet_config(s, base))
    parts["unet"] = Part("unet", cfg, store, unet_src, label=dict(unet_src), prefix=UNET_PREFIX)
    vae_src = {k[len(VAE_PREFIX):]: k for k in keys if k.startswith(VAE_PREFIX) and not is_ignored(k)}
    like = presets_for("vae", base, family)[0]
    cfg = pick_config("vae", _shapes(vae_src, store), base, family, lambda s: infer_vae_config(s, like))
    parts["vae"] = Part("vae", cfg, store, vae_src, label=dict(vae_src), prefix=VAE_PREFIX)
    claimed.update(unet_src.values(), vae_src.values())
    for i, prefix in enumerate(text_prefixes(base)):
        slot = _TEXT_SLOTS[i]
        part = _text_part(slot, prefix, store, keys)
        shapes = _shapes(part.sources, store)
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


def _text_part(slot: str, prefix: str, store: TensorStore, keys: list[str]) -> Part:
    part = Part(slot, None, store, prefix=prefix)
    mine = [k for k in keys if k.startswith(prefix) and not is_ignored(k)]
    if is_openclip_prefix(prefix):
        usable = {}
        for k in mine:
            try:
                openclip_name_to_hf(k[len(prefix):])
                usable[k] = True
            except KeyError:
                part.unexpected.append(k)
        try:
            views = openclip_to_hf(_Subset(store, usable), prefix) if usable else {}
        except ValueError as e:
            raise ModelLoadError(f"{store.name}: {e}") from None
        part.sources.update(views)
        for key in usable:
            for target in openclip_name_to_hf(key[len(prefix):]) or ():
                part.origin[target] = key
                part.label[target] = key
    else:
        for k in mine:
            name = k[len(prefix):]
            if name in HF_IGNORED_KEYS:
                continue
            if not name.startswith(("text_model.", "text_projection")):
                name = "text_model." + name  # files from older transformers lack the `text_model.` level
            part.sources[name] = k
            part.label[name] = k
    return part


class _Subset(Mapping):
    """The keys of `store` listed in `keys` (lets openclip_to_hf see only the usable ones)."""

    def __init__(self, store: TensorStore, keys: Mapping[str, bool]):
        self._store, self._keys = store, keys

    def __getitem__(self, key):
        return self._store[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


# ---- diffusers folders ----------------------------------------------------------------------
def _component_store(folder: Path, variant, prefer_half, allow_pickle) -> TensorStore:
    try:
        return TensorStore.open(weights_file(folder, variant, prefer_half))
    except FolderError:
        pickled = pickle_weights_file(folder) if allow_pickle else None
        if pickled is None:
            raise
        return _pickle_store(pickled)


def _from_folder(path: Path, want_base, family, variant, prefer_half, allow_pickle):
    cls = pipeline_class(path)
    index = read_json(path / "model_index.json")
    if not cls.startswith("StableDiffusion") or cls.startswith("StableDiffusion3"):
        raise ModelLoadError(f"{path} is a {cls or 'unknown'} pipeline; supported: {SUPPORTED}")
    if not index.get("text_encoder") or index.get("text_encoder") == [None, None]:
        raise ModelLoadError(f"{path} is a {cls} without a CLIP-L text encoder (an SDXL refiner?); "
                             f"supported: {SUPPORTED}")
    has_te2 = bool(index.get("text_encoder_2")) and index.get("text_encoder_2") != [None, None]
    parts: dict[str, Part] = {"unet": _folder_unet(path / "unet", variant, prefer_half, allow_pickle),
                               "vae": _folder_vae(path / "vae", variant, prefer_half, allow_pickle)}
    for slot in _TEXT_SLOTS[: 2 if has_te2 else 1]:
        parts[slot] = _folder_text(path / slot, variant, prefer_half, allow_pickle)
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
        presets = [CLIPTextConfig.preset(p) for p in spec.text_encoders]
        if spec.diffusers_pipeline == cls and len(presets) == len(encoders) and all(
                p.activation == e.activation for p, e in zip(presets, encoders)):
            return spec.base
    raise ModelLoadError(f"{path} is a {cls} whose {len(encoders)} text encoder(s) match no supported family; "
                         f"supported: {SUPPORTED}")


def _map_part(slot: str, config, store: TensorStore, names: Mapping[str, list[str]]) -> Part:
    """A part whose parameter `p` comes from the first of `names[p]` present in `store`."""
    part = Part(slot, config, store)
    used = set()
    for param, candidates in names.items():
        hit = next((c for c in candidates if c in store), None)
        part.label[param] = candidates[0]
        if hit is not None:
            part.sources[param] = hit
            used.add(hit)
    part.unexpected = [k for k in store if k not in used and k not in HF_IGNORED_KEYS]
    return part


def _folder_unet(folder: Path, variant, prefer_half, allow_pickle, config=None) -> Part:
    if config is None:
        config = unet_config_from_diffusers(read_json(folder / "config.json"), str(folder / "config.json"))
    store = _component_store(folder, variant, prefer_half, allow_pickle)
    return _unet_from_diffusers_store(store, config)


def _unet_from_diffusers_store(store: TensorStore, config: UNetConfig) -> Part:
    prefix_map = unet_prefix_map(config)
    params = meta_module(config).state_dict()
    return _map_part("unet", config, store, {p: [unet_to_diffusers_key(p, prefix_map) or p] for p in params})


def _folder_vae(folder: Path, variant, prefer_half, allow_pickle) -> Part:
    config = vae_config_from_diffusers(read_json(folder / "config.json"), str(folder / "config.json"))
    store = _component_store(folder, variant, prefer_half, allow_pickle)
    return _vae_from_diffusers_store(store, config)


def _vae_from_diffusers_store(store: TensorStore, config: VAEConfig) -> Part:
    names = {}
    for p in meta_module(config).state_dict():
        name = vae_to_diffusers_key(p, config) or p
        alts = [name]
        for legacy, current in VAE_DIFFUSERS_LEGACY_NAMES.items():  # e.g. `query.` for `to_q.`
            if f".attentions.0.{current}" in name:
                alts.append(name.replace(f".attentions.0.{current}", f".attentions.0.{legacy}"))
        names[p] = alts
    return _map_part("vae", config, store, names)


def _folder_text(folder: Path, variant, prefer_half, allow_pickle) -> Part:
    store = _component_store(folder, variant, prefer_half, allow_pickle)
    config = clip_config_from_transformers(read_json(folder / "config.json"), "text_projection.weight" in store,
                                           str(folder / "config.json"))
    # transformers >= 5 saves CLIPTextModel without the `text_model.` level; older files have it.
    names = {p: [p, p.removeprefix("text_model.")] for p in meta_module(config).state_dict()}
    return _map_part(folder.name, config, store, names)


# ---- overrides ------------------------------------------------------------------------------
def _override(slot: str, path: Path, base, default, variant, prefer_half, allow_pickle) -> Part:
    """The `unet` or `vae` part given separately (`unet=` / `vae=`): a diffusers folder (or its
    component folder), a bare file with diffusers names (config from a `config.json` beside it),
    or ldm names with or without the single-file prefix (from a full checkpoint only that part's
    tensors are used). A file with the default's shapes keeps the default config (e.g. the
    source's latent scaling)."""
    unet = slot == "unet"
    if path.is_dir():
        folder = path / slot if (path / "model_index.json").is_file() else path
        return (_folder_unet if unet else _folder_vae)(folder, variant, prefer_half, allow_pickle)
    store = open_weights(path, allow_pickle)
    keys = list(store)
    foreign = describe_foreign(keys)
    if foreign:
        raise ModelLoadError(f"{slot}={path} is {foreign}")
    if any(k.startswith("down_blocks." if unet else "encoder.down_blocks.") for k in keys):
        cfg_path = path.parent / "config.json"
        from_diffusers = unet_config_from_diffusers if unet else vae_config_from_diffusers
        config = from_diffusers(read_json(cfg_path), str(cfg_path)) if cfg_path.is_file() else default
        return (_unet_from_diffusers_store if unet else _vae_from_diffusers_store)(store, config)
    full = UNET_PREFIX if unet else VAE_PREFIX
    prefix = full if any(k.startswith(full) for k in keys) else ""
    sources = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and not is_ignored(k)}
    infer = (lambda sh: infer_unet_config(sh, base)) if unet else (lambda sh: infer_vae_config(sh, default))
    config = pick_config(slot, _shapes(sources, store), base, None, infer)
    if (same_unet_shapes if unet else same_vae_shapes)(config, default):
        config = default
    return Part(slot, config, store, sources, label=dict(sources), prefix=prefix)
