"""Typed training configuration: dataclass sections, YAML loading, dotted overrides, validation.

A config file is YAML with one mapping per section (`model`, `lora`, `data`, `train`, `optim`,
`output`, `sample`); omitted keys keep their defaults. `load_config(path, ["train.max_steps=50"])`
applies command-line overrides (values parsed as YAML), builds the dataclasses, rejects unknown
keys and wrong types naming the key path (with the closest valid key as a suggestion) and runs
the cross-field checks in `check_config` — all before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from data.config import DataConfig

Precision = Literal["fp32", "fp16", "bf16"]
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""torch dtype name of each precision name used in configs and on the command line."""


def torch_dtype(name: str):
    """The torch dtype of a precision name: fp32 | fp16 | bf16."""
    import torch  # configs are read and checked without importing torch

    return getattr(torch, DTYPE_NAMES[name])

_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the key and how to fix it."""


# ---- sections -----------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The base model that is adapted (kept frozen)."""

    source: str = "tiny-sdxl"
    """A family name (random weights from `seed`, no download: `tiny-sdxl`/`tiny-sd15` for tests and
    the quickstart), a hub id (`stabilityai/stable-diffusion-xl-base-1.0`, or `owner/repo/file.safetensors`),
    a diffusers folder or a single `.safetensors` file."""
    family: str | None = None
    """Model family (`sd15`, `sd2`, `sdxl`, `tiny-sd15`, `tiny-sdxl`) when it cannot be detected from
    `source`; null = detect."""
    dtype: Precision = "fp32"
    """Storage dtype of the frozen base weights. LoRA weights always train in fp32."""
    vae: str | None = None
    """Separate VAE (single file, folder or hub id) replacing the base model's, e.g. an fp16-fix VAE."""
    vae_dtype: Precision | None = None
    """VAE dtype; null = fp32 for SDXL (its VAE overflows in fp16) and `dtype` otherwise."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override the family's prediction type (null = the family default)."""
    variant: str | None = None
    """Weight variant of a diffusers folder / hub repo (e.g. `fp16`); null = the plain weights."""
    allow_pickle: bool = False
    """Allow `.ckpt`/`.pt`/`.bin` pickle checkpoints (loaded with torch's weights-only unpickler)."""
    seed: int = 0
    """Seed of the random weights when `source` is a family name."""


@dataclass
class LoRAConfig:
    """Which layers get low-rank adapters and their shape (see `models.inject_lora`)."""

    preset: Literal["attn", "kohya", "locon"] = "kohya"
    """UNet targets: `attn` (q/k/v/out of every attention), `kohya` (every Linear / 1x1 conv in the
    transformer blocks), `locon` (kohya + ResBlocks and up/downsampling convs)."""
    targets: list[str] | None = None
    """Regexes on UNet module paths (e.g. `attn2\\.to_k`); replaces `preset` when set."""
    include: list[str] = field(default_factory=list)
    """Keep only modules whose `<component>.<path>` matches one of these regexes (components
    `unet`, `te` or `te1`/`te2`)."""
    exclude: list[str] = field(default_factory=list)
    """Drop modules whose `<component>.<path>` matches one of these regexes."""
    rank: int = 16
    """Rank r of Linear and 1x1-conv adapters."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank. null = rank (scale 1)."""
    conv_rank: int | None = None
    """Rank of 3x3-conv adapters (preset `locon`); null = rank."""
    conv_alpha: float | None = None
    """Alpha of 3x3-conv adapters; null = conv_rank."""
    dropout: float = 0.0
    """Dropout on the rank-r activations during training."""
    rank_dropout: float = 0.0
    """Probability of zeroing whole rank channels per sample during training."""
    module_dropout: float = 0.0
    """Probability of skipping a whole adapter per step during training."""
    text_encoders: str = "te"
    """Text-encoder targets (`te` = attention and MLP Linears, or a regex), used when
    `train.train_text_encoders` is true."""
    text_encoder_rank: int | None = None
    """Rank of text-encoder adapters; null = rank."""
    text_encoder_alpha: float | None = None
    """Alpha of text-encoder adapters; null = alpha (or their rank)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): also learn a per-input-channel magnitude."""


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 1000
    """Number of optimizer steps."""
    batch_size: int = 1
    """Samples per micro-batch and process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size * grad_accum * processes)."""
    seed: int = 0
    """Seed of LoRA init, data order, noise and timesteps."""
    save_every: int = 500
    """Write a resumable checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 3
    """Keep the newest K checkpoints."""
    resume: str | None = None
    """null = start fresh, `latest` = the newest complete checkpoint of this run (fresh start if
    none), or a checkpoint directory."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision of the forward pass (`fp16` adds loss scaling). Match `model.dtype`: with
    bf16/fp16 weights and `no`, the fp32 LoRA branches keep fp32 copies of their inputs (about 2x
    the activation memory)."""
    gradient_checkpointing: bool | Literal["block", "layer", "transformer"] = False
    """Recompute UNet activations in the backward pass to save memory (about +33% compute).
    `true` / `block`: each UNet block as a whole; `layer`: each ResBlock and transformer block
    separately (lowest peak for SDXL at 1024 px); `transformer`: only the transformer blocks."""
    compile: bool = False
    """torch.compile each UNet transformer block (after LoRA injection). The first steps are slow
    while the graphs compile; pays off on long GPU runs."""
    channels_last: bool = False
    """Channels-last memory format for the UNet weights; convolution outputs follow (faster
    convolutions on recent GPUs with bf16/fp16)."""
    train_text_encoders: bool = False
    """Also train LoRA adapters on the text encoders (needs `data.cache_text: false`)."""
    noise_offset: float = 0.0
    """Std of a per-sample, per-channel constant added to the noise (0 = off; 0.0357 is common)."""
    min_snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (5.0 is common); null = plain MSE."""
    timestep_min: int = 0
    """Smallest training timestep (inclusive)."""
    timestep_max: int = 1000
    """Largest training timestep (exclusive)."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule to zero SNR at the last step (use with v-prediction)."""
    export_every: int = 0
    """Export the LoRA (ComfyUI/kohya file) every N steps; the final export always happens."""
    log_every: int = 10
    """Log scalars (loss, lr, grad norm, throughput, memory) every N steps."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of the adapters; null = no clipping."""
    device: Literal["auto", "cpu"] = "auto"
    """`auto` uses the GPU when there is one; `cpu` forces CPU."""
    cpu_threads: int | None = None
    """Intra-op threads of torch on the CPU (null = torch's default, one per core). Small models
    train fastest with 1, and so does any model when other processes share the cores."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"
    """One of adamw, adam, sgd, adafactor (torch) or adamw8bit, adam8bit, paged_adamw8bit,
    lion8bit, paged_lion8bit (bitsandbytes)."""
    lr: float = 1e-4
    """Learning rate of the UNet adapters."""
    te_lr: float | None = None
    """Learning rate of the text-encoder adapters; null = `lr`."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW/Lion) or L2 (Adam/SGD)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/Lion betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.0
    """SGD momentum."""
    scheduler: str = "constant"
    """constant, linear, cosine or cosine_with_restarts (all after linear warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    num_cycles: int = 1
    """Cosine cycles for cosine_with_restarts."""
    min_lr_ratio: float = 0.0
    """Floor of the decaying schedules as a fraction of the peak rate."""


@dataclass
class OutputConfig:
    """Where results go: `<dir>/<name>/` holds the LoRA, checkpoints, logs and samples."""

    dir: str = "runs"
    """Parent directory of run directories."""
    name: str = "lora"
    """Run name: the run directory and the exported file `<name>.safetensors`."""
    export_dtype: Precision = "fp16"
    """dtype of the exported LoRA tensors."""
    overwrite: bool = False
    """Allow starting fresh in a run directory that already has checkpoints (they are deleted)."""
    tensorboard: bool = True
    """Write tensorboard event files under `<run>/logs`."""


@dataclass
class SampleConfig:
    """Validation images generated during training."""

    prompts: list[str] = field(default_factory=list)
    """Prompts rendered every `every` steps (empty = no validation images)."""
    negative_prompt: str = ""
    """Negative prompt used for every validation image."""
    every: int = 0
    """Render every N steps (0 = only at the end when prompts are given)."""
    steps: int = 20
    """Sampler steps per image."""
    cfg: float = 7.0
    """Classifier-free guidance scale."""
    sampler: str = "euler"
    """Sampler name of the generation pipeline (e.g. euler, euler_a, ddim, dpmpp_2m)."""
    seed: int = 0
    """Seed of the initial noise (fixed so images are comparable across steps)."""
    size: int | None = None
    """Square image side in pixels; null = `data.resolution`."""


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.name


# ---- building dataclasses from plain data ---------------------------------------------------------
def _suggest(key: str, options) -> str:
    match = difflib.get_close_matches(str(key), list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options)}"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true | false"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, key: str):
    """`value` checked against type `tp`; raises ConfigError naming `key` on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: `mixed_precision: no`
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((a for a in args if isinstance(a, str) and a in words), value)
        if value in args and type(value) in {type(a) for a in args}:
            return value
        hint = _suggest(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `1e-4` (no dot) as a string; accept exactly such numeric spellings.
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r} (quote it in YAML)")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is list:
            return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp in (Path, os.PathLike):
        if isinstance(value, str):
            return Path(value)
        raise ConfigError(f"{key}: expected a path string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls, raw: dict, prefix: str = ""):
    """An instance of dataclass `cls` from the mapping `raw`, with type checks on every field.

    Unknown keys raise ConfigError with the closest valid key; errors raised by the dataclass's
    own validation (`__post_init__`) are re-raised as ConfigError prefixed with the section path.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key{_suggest(key, fields)}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(_join(prefix, str(exc))) from exc


def _join(prefix: str, message: str) -> str:
    """`data` + `subsets[1].repeats: ...` -> `data.subsets[1].repeats: ...` (else `data: ...`)."""
    if not prefix:
        return message
    if re.match(r"^[A-Za-z_][\w\[\].]*:", message):
        return f"{prefix}.{message}"
    return f"{prefix}: {message}"


# ---- loading ----------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value); `a.b=` is the empty string, `a.b=null` null."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.max_steps=100")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_override(raw: dict, parts: list[str], value: Any) -> None:
    """Set `raw[parts[0]][parts[1]]... = value`, creating mappings; list items by numeric index."""
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_index(node, part, path)]
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{path}: is a {type(node).__name__}, cannot set {'.'.join(parts)}")
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, ".".join(parts))] = value
    else:
        node[last] = value


def _index(items: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"{path}: expected a list index below {len(items)}")
    return int(part)


def load_raw(path: str | os.PathLike) -> dict:
    """The YAML mapping in `path` (empty file = {}); ConfigError if unreadable or not a mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, ...), got {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), check: bool = True) -> Config:
    """Config from a YAML file (or defaults when `path` is None) plus `key=value` overrides.

    Relative data/output paths are kept as written (relative to the working directory).
    Raises ConfigError, prefixed with the file name, on any problem.
    """
    raw = load_raw(path) if path is not None else {}
    for text in overrides:
        apply_override(raw, *parse_override(text))
    try:
        cfg = build_dataclass(Config, raw)
        if check:
            check_config(cfg)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def check_config(cfg: Config) -> None:
    """Value and cross-field checks (see `trainer.config_checks`); raises ConfigError."""
    from .config_checks import check_config as run_checks

    run_checks(cfg)


def config_to_dict(cfg) -> dict:
    """Plain (YAML-safe) dict of a config dataclass; tuples become lists, paths strings."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    Path(path).write_text("# Resolved configuration of this run (defaults filled in).\n" + text)

