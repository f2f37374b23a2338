"""Diffusers pipeline folders: find the weight files of each component, read the pipeline-level
facts (family, prediction type, tokenizers), and write a bundle back out as such a folder.

A folder looks like:

    model_index.json                     pipeline class and components
    scheduler/scheduler_config.json      prediction_type ("epsilon" / "v_prediction")
    unet/config.json + diffusion_pytorch_model[.fp16].safetensors   (or sharded: *.safetensors.index[.fp16].json)
    vae/config.json + diffusion_pytorch_model[.fp16].safetensors
    text_encoder[_2]/config.json + model[.fp16].safetensors
    tokenizer[_2]/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from .diffusers_keys import (
    DIFFUSERS_VERSION,
    clip_config_to_transformers,
    is_vae_attention_matrix,
    unet_config_to_diffusers,
    unet_prefix_map,
    unet_to_diffusers_key,
    vae_config_to_diffusers,
    vae_to_diffusers_key,
)
from .safetensors_io import save_file
from ..tokenizer import CLIPTokenizer

__all__ = [
    "PICKLE_SUFFIXES",
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
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


class FolderError(ValueError):
    """A diffusers folder that is incomplete or malformed (message names the file and the fix)."""


def is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FolderError(f"{path} is missing; the diffusers folder is incomplete (re-download it)") from None
    except (OSError, ValueError) as e:
        raise FolderError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise FolderError(f"{path}: expected a JSON object")
    return data


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
_PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


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


def diffusers_state_dicts(bundle) -> dict[str, dict[str, torch.Tensor]]:
    """{component: state dict under diffusers/transformers names} (views; works on meta)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    prefix_map = unet_prefix_map(bundle.unet.config)
    unet = {}
    for k, v in bundle.unet.state_dict().items():
        name = unet_to_diffusers_key(k, prefix_map)
        if name is None:
            raise ValueError(f"UNet parameter {k!r} has no diffusers name")
        unet[name] = v
    out["unet"] = unet
    vae = {}
    for k, v in bundle.vae.state_dict().items():
        name = vae_to_diffusers_key(k, bundle.vae.config)
        if name is None:
            raise ValueError(f"VAE parameter {k!r} has no diffusers name")
        vae[name] = v.reshape(v.shape[:2]) if is_vae_attention_matrix(k) else v
    out["vae"] = vae
    for i, te in enumerate(bundle.text_encoders):
        out["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = dict(te.state_dict())
    return out


def _scheduler_config(bundle) -> dict:
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
    param_dtype = dtype or bundle.unet.input_blocks[0][0].weight.dtype
    write_diffusers_configs(bundle, folder, param_dtype)
    for component, state in diffusers_state_dicts(bundle).items():
        save_file(state, folder / component / WEIGHT_FILES[component], {"format": "pt"}, dtype)
    return folder


WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def write_diffusers_configs(bundle, folder: str | Path, param_dtype: torch.dtype = torch.float32) -> Path:
    """Everything of a diffusers folder but the weights: model_index.json, the components'
    config.json, scheduler config and tokenizer files (works for a bundle on `meta`)."""
    folder = Path(folder)
    base = bundle.spec.base
    if base not in _PIPELINES:
        raise ValueError(f"no diffusers pipeline layout for family base {base!r}")
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": _PIPELINES[base], "_diffusers_version": DIFFUSERS_VERSION}
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    sample = bundle.spec.resolution // bundle.vae.config.downsample_factor
    _write_json(folder / "unet" / "config.json", unet_config_to_diffusers(bundle.unet.config, sample_size=sample))
    _write_json(folder / "vae" / "config.json", vae_config_to_diffusers(bundle.vae.config, sample_size=bundle.spec.resolution))
    for i, (te, tok) in enumerate(zip(bundle.text_encoders, bundle.tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"
        config = clip_config_to_transformers(te.config, _DTYPE_NAMES.get(param_dtype, "float32"))
        index[f"text_encoder{suffix}"] = ["transformers", config["architectures"][0]]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        _write_json(folder / f"text_encoder{suffix}" / "config.json", config)
        _write_tokenizer(tok, folder / f"tokenizer{suffix}")
    if base == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    _write_json(folder / "scheduler" / "scheduler_config.json", _scheduler_config(bundle))
    _write_json(folder / "model_index.json", index)
    return folder
