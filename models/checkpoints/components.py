"""Building blocks of the loaders: where a source is on disk, opening its tensors, and the `Part`
of one component (UNet, VAE, CLIP text encoder) read from a diffusers component folder, from a
file with diffusers names, or from single-file (ldm / HF) names under a prefix.

`loading` assembles SD1.5 / SD2 / SDXL checkpoints from these, `flux_files` FLUX.1 ones.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..unet import UNetConfig
from ..vae import VAEConfig
from .diffusers_folder import (
    PICKLE_SUFFIXES,
    FolderError,
    pickle_weights_file,
    read_json,
    weights_file,
)
from .diffusers_keys import (
    VAE_DIFFUSERS_LEGACY_NAMES,
    clip_config_from_transformers,
    unet_config_from_diffusers,
    unet_prefix_map,
    unet_to_diffusers_key,
    vae_config_from_diffusers,
    vae_to_diffusers_key,
)
from .hub import download, parse_hub_source
from .materialize import Lazy, ModelLoadError, Part
from .openclip_keys import HF_IGNORED_KEYS, openclip_name_to_hf, openclip_to_hf
from .safetensors_io import SafetensorsError, TensorStore
from .single_file import is_openclip_prefix, meta_module

__all__ = [
    "component_store",
    "folder_text",
    "folder_unet",
    "folder_vae",
    "local_path",
    "map_part",
    "open_weights",
    "pickle_store",
    "shapes_of",
    "text_part",
    "unet_from_diffusers_store",
    "vae_from_diffusers_store",
]


def local_path(source: str | Path, prefer_half: bool, component: bool = False) -> Path:
    """`source` on disk: the path itself when it exists, else the hub download it names
    (`component`: a one-model repo, e.g. a VAE, rather than a pipeline)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    ref = parse_hub_source(str(source))
    if ref is None:
        raise ModelLoadError(f"{source} does not exist: give a local file or folder, a hub repo id "
                             "(user/repo), a hub file (user/repo/file.safetensors) or a huggingface.co URL")
    return download(ref, prefer_half=prefer_half, component=component)


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
        return pickle_store(path)
    try:
        return TensorStore.open(path)
    except SafetensorsError as e:
        raise ModelLoadError(str(e)) from None


def pickle_store(path: Path) -> TensorStore:
    """The tensors of a weights-only pickle checkpoint (a nested `state_dict` is unwrapped)."""
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


def shapes_of(sources: Mapping[str, str | torch.Tensor | Lazy], store: TensorStore) -> dict[str, tuple[int, ...]]:
    """Shape of every source (a store key, a tensor view or a `Lazy`), without reading data."""
    return {k: (store.shape(v) if isinstance(v, str) else tuple(v.shape)) for k, v in sources.items()}


def component_store(folder: Path, variant, prefer_half, allow_pickle) -> TensorStore:
    """The weights of a diffusers component folder (a pickle only with `allow_pickle`)."""
    try:
        return TensorStore.open(weights_file(folder, variant, prefer_half))
    except FolderError:
        pickled = pickle_weights_file(folder) if allow_pickle else None
        if pickled is None:
            raise
        return pickle_store(pickled)


def map_part(slot: str, config, store: TensorStore, names: Mapping[str, list[str]],
             ignored: frozenset[str] = HF_IGNORED_KEYS) -> Part:
    """A part whose parameter `p` comes from the first of `names[p]` present in `store`."""
    part = Part(slot, config, store)
    used = set()
    for param, candidates in names.items():
        hit = next((c for c in candidates if c in store), None)
        part.label[param] = candidates[0]
        if hit is not None:
            part.sources[param] = hit
            used.add(hit)
    part.unexpected = [k for k in store if k not in used and k not in ignored]
    return part


def folder_unet(folder: Path, variant, prefer_half, allow_pickle, config=None) -> Part:
    if config is None:
        config = unet_config_from_diffusers(read_json(folder / "config.json"), str(folder / "config.json"))
    store = component_store(folder, variant, prefer_half, allow_pickle)
    return unet_from_diffusers_store(store, config)


def unet_from_diffusers_store(store: TensorStore, config: UNetConfig) -> Part:
    prefix_map = unet_prefix_map(config)
    params = meta_module(config).state_dict()
    return map_part("unet", config, store, {p: [unet_to_diffusers_key(p, prefix_map) or p] for p in params})


def folder_vae(folder: Path, variant, prefer_half, allow_pickle) -> Part:
    config = vae_config_from_diffusers(read_json(folder / "config.json"), str(folder / "config.json"))
    store = component_store(folder, variant, prefer_half, allow_pickle)
    return vae_from_diffusers_store(store, config)


def vae_from_diffusers_store(store: TensorStore, config: VAEConfig) -> Part:
    names = {}
    for p in meta_module(config).state_dict():
        name = vae_to_diffusers_key(p, config) or p
        alts = [name]
        for legacy, current in VAE_DIFFUSERS_LEGACY_NAMES.items():  # e.g. `query.` for `to_q.`
            if f".attentions.0.{current}" in name:
                alts.append(name.replace(f".attentions.0.{current}", f".attentions.0.{legacy}"))
        names[p] = alts
    return map_part("vae", config, store, names)


def folder_text(folder: Path, variant, prefer_half, allow_pickle, slot: str | None = None,
                ignored: frozenset[str] = HF_IGNORED_KEYS) -> Part:
    """A CLIP text encoder component folder (transformers `CLIPTextModel[WithProjection]`)."""
    store = component_store(folder, variant, prefer_half, allow_pickle)
    projection = "text_projection.weight" in store and "text_projection.weight" not in ignored
    config = clip_config_from_transformers(read_json(folder / "config.json"), projection, str(folder / "config.json"))
    # transformers >= 5 saves CLIPTextModel without the `text_model.` level; older files have it.
    names = {p: [p, p.removeprefix("text_model.")] for p in meta_module(config).state_dict()}
    return map_part(slot or folder.name, config, store, names, ignored)


def text_part(slot: str, prefix: str, store: TensorStore, keys: list[str], is_ignored=lambda k: False,
              ignored: frozenset[str] = HF_IGNORED_KEYS) -> Part:
    """The CLIP text encoder stored under `prefix` of a single file, in HF names (with or without
    the `text_model.` level) or, for an OpenCLIP prefix, OpenCLIP names. `ignored`: names after
    the prefix that carry nothing the encoder needs. The config is left for the caller."""
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
            if name in ignored:
                continue
            if not name.startswith(("text_model.", "text_projection")):
                name = "text_model." + name  # transformers >= 5 and some exports drop the `text_model.` level
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
