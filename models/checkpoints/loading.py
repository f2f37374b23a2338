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
missing / unexpected / mis-shaped tensors and the likely cause.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..bundle import FAMILIES, ModelBundle
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
    hf_name_to_openclip,
    openclip_name_to_hf,
    openclip_to_hf,
)
from .safetensors_io import SafetensorsError, TensorStore
from .single_file import (
    OPENCLIP_PREFIXES,
    SUPPORTED,
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    UnsupportedModelError,
    describe_foreign,
    detect_family,
    infer_clip_config,
    infer_unet_config,
    infer_vae_config,
    is_ignored,
    looks_like_lora,
    matching_family,
    meta_module,
    pick_config,
    prediction_type_hint,
    presets_for,
    same_clip_shapes,
    same_unet_shapes,
    same_vae_shapes,
)
from ..tokenizer import CLIPTokenizer
from ..unet import UNetConfig
from ..vae import VAEConfig

__all__ = ["ModelLoadError", "load_model", "open_weights"]

_BASES = ("sdxl", "sd15", "sd2")
_BASE_NAMES = {"sdxl": "SDXL", "sd15": "SD1.5", "sd2": "SD2.x"}
_TEXT_SLOTS = ("text_encoder", "text_encoder_2")
_EXPECTED_ERRORS = (SafetensorsError, FolderError, HubError, UnsupportedConfigError, UnsupportedModelError)


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


@dataclass
class _Part:
    """One module to build: its config and, per parameter, where its tensor comes from."""

    slot: str  # unet, vae, text_encoder, text_encoder_2
    config: object
    store: TensorStore
    sources: dict[str, str | torch.Tensor] = field(default_factory=dict)  # param -> store key or view
    unexpected: list[str] = field(default_factory=list)  # store keys nothing uses
    label: dict[str, str] = field(default_factory=dict)  # param -> name in the file, for messages
    prefix: str = ""  # file-name prefix of parameters the file lacks, for messages
    origin: dict[str, str] = field(default_factory=dict)  # param given as a view -> store key it views


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
    Raises ModelLoadError.
    """
    try:
        return _load(source, family, dtype, torch.device(device), vae, unet, variant, allow_pickle, prediction_type,
                     mmap)
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
    if family not in FAMILIES and family not in _BASES:
        raise ModelLoadError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)} (or None to detect it)")
    return FAMILIES[family].base if family in FAMILIES else family


def _load(source, family, dtype, device, vae, unet, variant, allow_pickle, pred, zero_copy) -> ModelBundle:
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
        parts["vae"] = _override_vae(vae_path, base, parts["vae"].config, variant, prefer_half, allow_pickle)
    if unet is not None:
        unet_path = _local(unet, prefer_half, component=True)
        parts["unet"] = _override_unet(unet_path, base, parts["unet"].config, variant, prefer_half, allow_pickle)
    modules = {slot: meta_module(part.config) for slot, part in parts.items()}
    _validate(parts, modules, base, family)
    for slot, part in parts.items():
        _materialize(modules[slot], part, dtype, device, zero_copy)
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
            f"{path} is an {_BASE_NAMES[base]} checkpoint (keys under {TEXT_PREFIXES[base][0]!r}) but family="
            f"{family!r} was requested; pass family={base!r} or leave family unset"
        )
    hinted = prediction_type_hint(keys, store.metadata)
    parts: dict[str, _Part] = {}
    claimed = set()
    unet_src = {k[len(UNET_PREFIX):]: k for k in keys if k.startswith(UNET_PREFIX)}
    cfg = pick_config("unet", _shapes(unet_src, store), base, family, lambda s: infer_unet_config(s, base))
    parts["unet"] = _Part("unet", cfg, store, unet_src, label=dict(unet_src), prefix=UNET_PREFIX)
    vae_src = {k[len(VAE_PREFIX):]: k for k in keys if k.startswith(VAE_PREFIX) and not is_ignored(k)}
    like = presets_for("vae", base, family)[0]
    cfg = pick_config("vae", _shapes(vae_src, store), base, family, lambda s: infer_vae_config(s, like))
    parts["vae"] = _Part("vae", cfg, store, vae_src, label=dict(vae_src), prefix=VAE_PREFIX)
    claimed.update(unet_src.values(), vae_src.values())
    for i, prefix in enumerate(TEXT_PREFIXES[base]):
        slot = _TEXT_SLOTS[i]
        part = _text_part(slot, prefix, store, keys)
        shapes = _shapes(part.sources, store)
        activation = "gelu" if prefix in OPENCLIP_PREFIXES else "quick_gelu"
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
    tokenizers = [CLIPTokenizer(pad_token_id=pad) for pad in FAMILIES[base].pad_token_ids]
    return base, parts, tokenizers, hinted


def _text_part(slot: str, prefix: str, store: TensorStore, keys: list[str]) -> _Part:
    part = _Part(slot, None, store, prefix=prefix)
    mine = [k for k in keys if k.startswith(prefix) and not is_ignored(k)]
    if prefix in OPENCLIP_PREFIXES:
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
    parts: dict[str, _Part] = {"unet": _folder_unet(path / "unet", variant, prefer_half, allow_pickle),
                               "vae": _folder_vae(path / "vae", variant, prefer_half, allow_pickle)}
    for slot in _TEXT_SLOTS[: 2 if has_te2 else 1]:
        parts[slot] = _folder_text(path / slot, variant, prefer_half, allow_pickle)
    if has_te2:
        base = "sdxl"
    else:
        base = "sd2" if parts["text_encoder"].config.activation == "gelu" else "sd15"
    if want_base is not None and want_base != base:
        raise ModelLoadError(f"{path} is an {_BASE_NAMES[base]} pipeline ({cls}) but family={family!r} was "
                             f"requested; pass family={base!r} or leave family unset")
    pads = FAMILIES[base].pad_token_ids
    tokenizers = [load_tokenizer(path / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}"), pad)
                  for i, pad in enumerate(pads)]
    return base, parts, tokenizers, prediction_type(path)


def _map_part(slot: str, config, store: TensorStore, names: Mapping[str, list[str]]) -> _Part:
    """A part whose parameter `p` comes from the first of `names[p]` present in `store`."""
    part = _Part(slot, config, store)
    used = set()
    for param, candidates in names.items():
        hit = next((c for c in candidates if c in store), None)
        part.label[param] = candidates[0]
        if hit is not None:
            part.sources[param] = hit
            used.add(hit)
    part.unexpected = [k for k in store if k not in used and k not in HF_IGNORED_KEYS]
    return part


def _folder_unet(folder: Path, variant, prefer_half, allow_pickle, config=None) -> _Part:
    if config is None:
        config = unet_config_from_diffusers(read_json(folder / "config.json"), str(folder / "config.json"))
    store = _component_store(folder, variant, prefer_half, allow_pickle)
    return _unet_from_diffusers_store(store, config)


def _unet_from_diffusers_store(store: TensorStore, config: UNetConfig) -> _Part:
    prefix_map = unet_prefix_map(config)
    params = meta_module(config).state_dict()
    return _map_part("unet", config, store, {p: [unet_to_diffusers_key(p, prefix_map) or p] for p in params})


def _folder_vae(folder: Path, variant, prefer_half, allow_pickle) -> _Part:
    config = vae_config_from_diffusers(read_json(folder / "config.json"), str(folder / "config.json"))
    store = _component_store(folder, variant, prefer_half, allow_pickle)
    return _vae_from_diffusers_store(store, config)


def _vae_from_diffusers_store(store: TensorStore, config: VAEConfig) -> _Part:
    names = {}
    for p in meta_module(config).state_dict():
        name = vae_to_diffusers_key(p, config) or p
        alts = [name]
        for legacy, current in VAE_DIFFUSERS_LEGACY_NAMES.items():  # e.g. `query.` for `to_q.`
            if f".attentions.0.{current}" in name:
                alts.append(name.replace(f".attentions.0.{current}", f".attentions.0.{legacy}"))
        names[p] = alts
    return _map_part("vae", config, store, names)


def _folder_text(folder: Path, variant, prefer_half, allow_pickle) -> _Part:
    store = _component_store(folder, variant, prefer_half, allow_pickle)
    config = clip_config_from_transformers(read_json(folder / "config.json"), "text_projection.weight" in store,
                                           str(folder / "config.json"))
    # transformers >= 5 saves CLIPTextModel without the `text_model.` level; older files have it.
    names = {p: [p, p.removeprefix("text_model.")] for p in meta_module(config).state_dict()}
    return _map_part(folder.name, config, store, names)


# ---- overrides ------------------------------------------------------------------------------
def _override_vae(path: Path, base, default: VAEConfig, variant, prefer_half, allow_pickle) -> _Part:
    if path.is_dir():
        folder = path / "vae" if (path / "model_index.json").is_file() else path
        return _folder_vae(folder, variant, prefer_half, allow_pickle)
    store = open_weights(path, allow_pickle)
    keys = list(store)
    if any(k.startswith("encoder.down_blocks.") for k in keys):  # diffusers names in a bare file
        cfg_path = path.parent / "config.json"
        config = vae_config_from_diffusers(read_json(cfg_path), str(cfg_path)) if cfg_path.is_file() else default
        return _vae_from_diffusers_store(store, config)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in keys) else ""
    sources = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and not is_ignored(k)}
    config = pick_config("vae", _shapes(sources, store), base, None, lambda s: infer_vae_config(s, default))
    if same_vae_shapes(config, default):
        config = default  # keep the source's latent scaling
    # From a full checkpoint given as vae=, only the `first_stage_model.` tensors are used.
    return _Part("vae", config, store, sources, label=dict(sources), prefix=prefix)


def _override_unet(path: Path, base, default: UNetConfig, variant, prefer_half, allow_pickle) -> _Part:
    if path.is_dir():
        folder = path / "unet" if (path / "model_index.json").is_file() else path
        return _folder_unet(folder, variant, prefer_half, allow_pickle)
    store = open_weights(path, allow_pickle)
    keys = list(store)
    foreign = describe_foreign(keys)
    if foreign:
        raise ModelLoadError(f"unet={path} is {foreign}")
    if any(k.startswith("down_blocks.") for k in keys):
        cfg_path = path.parent / "config.json"
        config = unet_config_from_diffusers(read_json(cfg_path), str(cfg_path)) if cfg_path.is_file() else default
        return _unet_from_diffusers_store(store, config)
    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in keys) else ""
    sources = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and not is_ignored(k)}
    config = pick_config("unet", _shapes(sources, store), base, None, lambda s: infer_unet_config(s, base))
    if same_unet_shapes(config, default):
        config = default
    return _Part("unet", config, store, sources, label=dict(sources), prefix=prefix)


# ---- validation and materialisation ---------------------------------------------------------
def _validate(parts: dict[str, _Part], modules: dict[str, nn.Module], base: str, family: str | None) -> None:
    missing, unexpected, mismatched = [], [], []
    where = sorted({p.store.name for p in parts.values()})
    for slot, part in parts.items():
        expected = modules[slot].state_dict()
        for name, ref in expected.items():
            src = part.sources.get(name)
            label = part.label.get(name) or _file_name(part, name)
            if src is None:
                missing.append(label)
                continue
            shape = part.store.shape(src) if isinstance(src, str) else tuple(src.shape)
            if tuple(shape) != tuple(ref.shape) and not _reshapeable(shape, tuple(ref.shape)):
                mismatched.append(f"{label} {list(shape)} vs model {list(ref.shape)}")
        extra = [part.label.get(n, n) for n in part.sources if n not in expected]
        unexpected += part.unexpected + extra
    if not (missing or unexpected or mismatched):
        return
    lines = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            shown = "; ".join(items[:4]) + (f"; ... (+{len(items) - 4} more)" if len(items) > 4 else "")
            lines.append(f"{len(items)} {what}: {shown}")
    raise ModelLoadError(
        f"{', '.join(where)} does not match the {_BASE_NAMES[base]} model ({' | '.join(lines)}). "
        f"Likely cause: {_likely_cause(missing, unexpected, mismatched, family)}"
    )


def _file_name(part: _Part, name: str) -> str:
    """How the file would spell our parameter `name` (for listing missing tensors)."""
    if part.prefix in OPENCLIP_PREFIXES:
        try:
            target = hf_name_to_openclip(name)
        except KeyError:
            target = None
        if target is not None:
            return part.prefix + target[0]
    return part.prefix + name


def _reshapeable(shape, target) -> bool:
    """VAE attention: (C, C) Linear in diffusers files <-> (C, C, 1, 1) conv in ours."""
    return len(shape) == 2 and tuple(target) == (*shape, 1, 1)


def _likely_cause(missing, unexpected, mismatched, family) -> str:
    if looks_like_lora(unexpected):
        return describe_foreign(unexpected)
    if mismatched:
        return ("the checkpoint is a different architecture or size than the requested/detected family "
                f"({family or 'auto'}): wrong family, or a modified model")
    if missing and any("model_ema" in k for k in unexpected):
        return "an EMA-only training checkpoint; export its EMA weights to the normal names first"
    if missing:
        return ("a pruned or partial file (for a UNet-only or VAE-only file, load a full base model and pass it "
                "as unet=... / vae=...), or an interrupted conversion")
    return "tensors this loader does not know (a newer or modified architecture, or a merged extra network)"


def _stored_dtype(part: _Part) -> torch.dtype:
    """Widest floating dtype among the part's tensors (dtype=None keeps what the file has)."""
    best = None
    for src in part.sources.values():
        dt = part.store.dtype(src) if isinstance(src, str) else src.dtype
        if dt.is_floating_point and (best is None or dt.itemsize > best.itemsize):
            best = dt
    return best or torch.float32


_materialize_mode = "auto"
"""How parameters get their memory, for the benchmark (`python -m trainer.bench.load --mode`):
"auto" (zero-copy views where load_model's `mmap` allows, else a new tensor per parameter and
`load_state_dict(assign=True)`), "assign" (always a new tensor) or "to_empty"
(`module.to_empty()`, then copy in place)."""


def _owns_storage(tensor: torch.Tensor) -> bool:
    """A contiguous tensor spanning exactly its own storage (not a slice of a bigger one)."""
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def _materialize(module: nn.Module, part: _Part, dtype: torch.dtype | None, device: torch.device,
                 zero_copy: bool) -> None:
    """Give every parameter its tensor in the target dtype/device: the file view itself when
    allowed (CPU, same dtype, own storage), else one copy, after which the file pages are dropped."""
    target = dtype or _stored_dtype(part)
    zero_copy = zero_copy and _materialize_mode == "auto" and device.type == "cpu"

    def source(name: str, shape) -> torch.Tensor:
        src = part.sources[name]
        tensor = part.store[src] if isinstance(src, str) else src
        return tensor if tuple(tensor.shape) == tuple(shape) else tensor.reshape(shape)

    def done(name: str) -> None:
        key = part.sources[name] if isinstance(part.sources[name], str) else part.origin.get(name)
        if key is not None:
            part.store.release(key)  # drop the file pages just copied

    if _materialize_mode == "to_empty":
        module.to(dtype=target).to_empty(device=device)
        with torch.no_grad():
            for name, param in module.state_dict(keep_vars=True).items():
                param.copy_(source(name, param.shape))
                done(name)
        return
    state = {}
    for name, ref in module.state_dict().items():
        tensor = source(name, ref.shape)
        wanted = target if tensor.is_floating_point() else tensor.dtype
        if zero_copy and tensor.dtype == wanted:
            if not _owns_storage(tensor) and tensor.is_contiguous() and name in part.origin:
                # A row block of a fused tensor (OpenCLIP q/k/v): view just those bytes.
                part_view = part.store.view_part(part.origin[name], tensor.storage_offset(), tuple(ref.shape))
                tensor = tensor if part_view is None else part_view
            if _owns_storage(tensor):
                state[name] = tensor  # a copy-on-write view of the file: no copy at all
                continue
        out = torch.empty(ref.shape, dtype=wanted, device=device)
        out.copy_(tensor)
        state[name] = out
        done(name)
    module.load_state_dict(state, strict=True, assign=True)
