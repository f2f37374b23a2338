"""Diffusers pipeline folders: find the weight files of each component, read the pipeline-level
facts (family, prediction type, tokenizers), and write a bundle back out as such a folder.

A folder looks like:

    model_index.json                     pipeline class and components
    scheduler/scheduler_config.json      prediction_type ("epsilon" / "v_prediction")
    unet/config.json + diffusion_pytorch_model[.fp16].safetensors   (or sharded: *.safetensors.index[.fp16].json)
    vae/config.json + diffusion_pytorch_model[.fp16].safetensors
    text_encoder[_2]/config.json + model[.fp16].safetensors
    tokenizer[_2]/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json

A FLUX.1 (`FluxPipeline`) folder has `transformer/` (diffusers names, `flux_keys`) instead of
`unet/`, a T5 `text_encoder_2/` (transformers `T5EncoderModel`) and its `tokenizer_2/tokenizer.json`,
and a flow-matching scheduler config.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .diffusers_keys import (
    DIFFUSERS_VERSION,
    clip_config_to_transformers,
    unet_config_to_diffusers,
    unet_state_dict_to_diffusers,
    vae_config_to_diffusers,
    vae_state_dict_to_diffusers,
)
from .fileio import read_json as _read_json
from .fileio import write_json
from .safetensors_io import save_file
from ..tokenizer import CLIPTokenizer

__all__ = [
    "PICKLE_SUFFIXES",
    "TEXT_ENCODER_SLOTS",
    "WEIGHT_FILES",
    "FolderError",
    "diffusers_state_dicts",
    "is_pipeline_folder",
    "load_tokenizer",
    "pipeline_class",
    "prediction_type",
    "read_json",
    "save_diffusers",
    "weights_file",
    "write_diffusers_configs",
]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TEXT_ENCODER_SLOTS = ("text_encoder", "text_encoder_2")
"""Pipeline component names of the text encoders, in bundle order (tokenizers: `tokenizer[_2]`)."""
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "transformer": "diffusion_pytorch_model.safetensors",
                "vae": "diffusion_pytorch_model.safetensors", **{slot: "model.safetensors" for slot in TEXT_ENCODER_SLOTS}}
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


class FolderError(ValueError):
    """A diffusers folder that is incomplete or malformed (message names the file and the fix)."""


def is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def read_json(path: Path) -> dict:
    return _read_json(path, FolderError, what="the diffusers folder is incomplete or damaged (re-download it)")


def _variant_of(name: str) -> tuple[str, str | None] | None:
    """('single'|'index', variant) for a weight file name, None for anything else."""
    if name.endswith(".json"):
        m = re.fullmatch(r"[^.]+\.safetensors\.index(?:\.([^.]+))?\.json", name)
        return ("index", m.group(1)) if m else None
    if name.endswith(".safetensors") and not _SHARD.search(name):
        m = re.fullmatch(r"[^.]+(?:\.([^.]+))?\.safetensors", name)
        return ("single", m.group(1)) if m else None
    return None


def weights_file(folder: Path, variant: str | None = None, prefer_half: bool = False) -> Path:
    """The safetensors file (or sharded index) holding a component's weights.

    variant: "fp16" picks `*.fp16.safetensors` / `*.safetensors.index.fp16.json` and falls back
    to the plain files when the folder has none. None picks the plain files, or the fp16 variant
    when `prefer_half` (loading in fp16 anyway) or when only variant files exist.
    Raises FolderError; pickle-only folders get a message on converting them.
    """
    if not folder.is_dir():
        raise FolderError(f"{folder} is missing; the diffusers folder is incomplete (re-download it)")
    found: dict[str | None, list[Path]] = {}
    pickles = []
    for p in sorted(folder.iterdir()):
        kind = _variant_of(p.name)
        if kind:
            found.setdefault(kind[1], []).append(p)
        elif p.suffix in PICKLE_SUFFIXES:
            pickles.append(p)
    order: list[str | None] = []
    if variant is not None:
        order.append(variant)
    elif prefer_half:
        order.append("fp16")
    order += [None, "fp16", *sorted(v for v in found if v not in (None, "fp16"))]
    for v in order:
        if v in found:
            # A single file wins over an index when both exist (same weights, fewer opens).
            return min(found[v], key=lambda p: (p.name.endswith(".json"), p.name))
    if pickles:
        raise FolderError(
            f"{folder} has only pickle weights ({pickles[0].name}), which can run arbitrary code when loaded; "
            f"convert the model once with `python -m trainer convert {folder.parent} OUT --allow-pickle` "
            "or pass allow_pickle=True"
        )
    raise FolderError(f"{folder} has no .safetensors weights; the diffusers folder is incomplete (re-download it)")


def pickle_weights_file(folder: Path) -> Path | None:
    """The pickle weight file of a component folder (used only with allow_pickle)."""
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.suffix in PICKLE_SUFFIXES and not p.name.endswith(".index.json"):
            return p
    return None


def pipeline_class(folder: Path) -> str:
    return str(read_json(folder / "model_index.json").get("_class_name", ""))


def prediction_type(folder: Path) -> str | None:
    """`prediction_type` from scheduler/scheduler_config.json, if the folder has one."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    value = read_json(path).get("prediction_type")
    return value if value in ("epsilon", "v_prediction") else None


def load_tokenizer(folder: Path, pad_token_id: int) -> CLIPTokenizer:
    """The tokenizer stored in `folder` (vocab.json + merges.txt), or the shipped CLIP vocabulary
    with `pad_token_id` when the folder has none."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.is_file() and merges.is_file():
        try:
            return CLIPTokenizer.from_files(vocab, merges)
        except (OSError, ValueError) as e:
            raise FolderError(f"{folder}: cannot load the tokenizer ({e})") from None
    return CLIPTokenizer(pad_token_id=pad_token_id)


# ---- writing ----------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _write_json(path: Path, data: dict) -> None:
    write_json(path, data)


def _write_tokenizer(tok: CLIPTokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", dict(sorted(tok.encoder.items(), key=lambda kv: kv[1])))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges), encoding="utf-8")
    pad = tok.decoder[tok.pad_token_id]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json",
                {**special, "model_max_length": tok.max_length, "tokenizer_class": "CLIPTokenizer",
                 "do_lower_case": True, "clean_up_tokenization_spaces": True})


def _is_flux(bundle) -> bool:
    from ..flux import FluxConfig

    return isinstance(bundle.denoiser.config, FluxConfig)


def diffusers_state_dicts(bundle) -> dict[str, dict[str, torch.Tensor]]:
    """{component: state dict under diffusers/transformers names} (views; works on meta)."""
    from ..t5 import T5_EMBEDDING_KEYS

    if _is_flux(bundle):
        from .flux_keys import flux_state_dict_to_diffusers

        out = {"transformer": flux_state_dict_to_diffusers(bundle.denoiser.state_dict(), bundle.denoiser.config)}
    else:
        out = {"unet": unet_state_dict_to_diffusers(bundle.unet.state_dict(), bundle.unet.config)}
    out["vae"] = vae_state_dict_to_diffusers(bundle.vae.state_dict(), bundle.vae.config)
    for slot, te in zip(TEXT_ENCODER_SLOTS, bundle.text_encoders):
        out[slot] = {k: v for k, v in te.state_dict().items() if k != T5_EMBEDDING_KEYS[1]}  # T5: tied, written once
    return out


def _scheduler_config(bundle) -> dict:
    spec = bundle.spec
    if _is_flux(bundle):  # FLUX.1's: dev shifts t with the image size, schnell does not
        shift = spec.flow_shift
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                "num_train_timesteps": 1000, "shift": 3.0 if shift else 1.0, "use_dynamic_shifting": bool(shift),
                "base_shift": shift[0] if shift else 0.5, "max_shift": shift[1] if shift else 1.15,
                "base_image_seq_len": 256, "max_image_seq_len": 4096}
    return {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": bundle.spec.prediction_type,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    }


def save_diffusers(bundle, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `bundle` as a diffusers pipeline folder that diffusers' `from_pretrained` and our
    `load_model` both read. dtype: convert floating tensors (None keeps each tensor's dtype).

    Each file is written atomically; component weights are single (unsharded) safetensors files.
    """
    folder = Path(folder)
    param_dtype = dtype or next(p.dtype for p in bundle.denoiser.parameters() if p.is_floating_point())
    write_diffusers_configs(bundle, folder, param_dtype)
    for component, state in diffusers_state_dicts(bundle).items():
        save_file(state, folder / component / WEIGHT_FILES[component], {"format": "pt"}, dtype)
    return folder


def write_diffusers_configs(bundle, folder: str | Path, param_dtype: torch.dtype = torch.float32) -> Path:
    """Everything of a diffusers folder but the weights: model_index.json, the components'
    config.json, scheduler config and tokenizer files (works for a bundle on `meta`)."""
    from ..clip import CLIPTextConfig
    from ..t5 import t5_config_to_transformers

    folder = Path(folder)
    spec = bundle.spec
    if not spec.diffusers_pipeline:
        raise ValueError(f"no diffusers pipeline layout for family {bundle.family!r}")
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": spec.diffusers_pipeline, "_diffusers_version": DIFFUSERS_VERSION}
    sample = bundle.spec.resolution // bundle.vae.config.downsample_factor
    if _is_flux(bundle):
        from .flux_keys import flux_config_to_diffusers

        index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        _write_json(folder / "transformer" / "config.json",
                    {**flux_config_to_diffusers(bundle.denoiser.config), "_diffusers_version": DIFFUSERS_VERSION})
    else:
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
        _write_json(folder / "unet" / "config.json", unet_config_to_diffusers(bundle.unet.config, sample_size=sample))
    index["vae"] = ["diffusers", "AutoencoderKL"]
    _write_json(folder / "vae" / "config.json", vae_config_to_diffusers(bundle.vae.config, sample_size=bundle.spec.resolution))
    dtype_name = _DTYPE_NAMES.get(param_dtype, "float32")
    for slot, te, tok in zip(TEXT_ENCODER_SLOTS, bundle.text_encoders, bundle.tokenizers):
        tokenizer = slot.replace("text_encoder", "tokenizer")
        if isinstance(te.config, CLIPTextConfig):
            config = clip_config_to_transformers(te.config, dtype_name)
            _write_tokenizer(tok, folder / tokenizer)
            index[tokenizer] = ["transformers", "CLIPTokenizer"]
        else:  # T5: its vocabulary, when the bundle has one (no T5 vocabulary ships with lorasmith)
            config = t5_config_to_transformers(te.config, dtype_name)
            saved = callable(getattr(tok, "save", None))
            if saved:
                tok.save(folder / tokenizer)
            index[tokenizer] = ["transformers", "T5TokenizerFast"] if saved else [None, None]
        index[slot] = ["transformers", config["architectures"][0]]
        _write_json(folder / slot / "config.json", config)
    index.update(dict(spec.diffusers_index_extras))
    _write_json(folder / "scheduler" / "scheduler_config.json", _scheduler_config(bundle))
    _write_json(folder / "model_index.json", index)
    return folder
