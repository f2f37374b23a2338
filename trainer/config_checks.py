"""Value and cross-field checks of a built `Config`, run by `load_config` before any model loads.

Each check raises `ConfigError` naming the key (`train.batch_size: ...`) and what to change. Checks
that need the model family use `model.family`, or `model.source` when it is a family name; for hub
ids and files whose family is only known after loading they are skipped here.
"""
from __future__ import annotations

import difflib
import os
import re

from .config import Config, ConfigError
from .optim import OPTIMIZERS, SCHEDULERS

FAMILY_NAMES = ("sd15", "sd2", "sdxl", "tiny-sd15", "tiny-sdxl")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?$")


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


def _at_least(cfg_section, section: str, name: str, minimum: float) -> None:
    value = getattr(cfg_section, name)
    if value is not None and value < minimum:
        _fail(f"{section}.{name}", f"must be >= {minimum}, got {value}")


def _choice(key: str, value: str, options) -> None:
    if value not in options:
        match = difflib.get_close_matches(value, list(options), n=1, cutoff=0.5)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        _fail(key, f"must be one of {', '.join(options)}, got {value!r}{hint}")


def family_of(cfg: Config) -> str | None:
    """The model family when the config states it (explicitly or as `model.source`), else None."""
    if cfg.model.family is not None:
        return cfg.model.family
    return cfg.model.source if cfg.model.source in FAMILY_NAMES else None


def _is_hub_id(value: str) -> bool:
    """A hub repo id / file (`owner/name[/file]`) or URL rather than a local path."""
    if value.startswith(("http://", "https://", "hf://")):
        return True
    local = value.startswith((".", "/", "~")) or os.path.exists(value)
    return bool(_HUB_ID.match(value)) and not local


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if m.family is not None:
        _choice("model.family", m.family, FAMILY_NAMES)
        if m.source in FAMILY_NAMES and m.family != m.source:
            _fail("model.family", f"{m.family!r} contradicts model.source={m.source!r} (a family name); drop "
                  "model.family or make them equal")
    for key, value in (("model.source", m.source), ("model.vae", m.vae)):
        if value is None or value in FAMILY_NAMES or _is_hub_id(value):
            continue
        if not os.path.exists(os.path.expanduser(value)):
            _fail(key, f"{value!r} does not exist; give an existing file or folder, a hub id like 'owner/name' "
                  f"or a family name ({', '.join(FAMILY_NAMES)})")
    mp = cfg.train.mixed_precision
    if m.dtype != "fp32" and mp != m.dtype:
        _fail("train.mixed_precision", f"{mp!r} does not match model.dtype={m.dtype!r}; half-precision base weights need "
              f"train.mixed_precision={m.dtype} (or set model.dtype: fp32)")


def _check_lora(cfg: Config) -> None:
    lora = cfg.lora
    for name in ("rank", "conv_rank", "text_encoder_rank"):
        _at_least(lora, "lora", name, 1)
    for name in ("alpha", "conv_alpha", "text_encoder_alpha"):
        value = getattr(lora, name)
        if value is not None and value <= 0:
            _fail(f"lora.{name}", f"must be > 0 (or null), got {value}")
    for name in ("dropout", "rank_dropout", "module_dropout"):
        value = getattr(lora, name)
        if not 0.0 <= value < 1.0:
            _fail(f"lora.{name}", f"must be in [0, 1), got {value}")
    for name in ("targets", "include", "exclude"):
        for i, pattern in enumerate(getattr(lora, name) or []):
            try:
                re.compile(pattern)
            except re.error as exc:
                _fail(f"lora.{name}[{i}]", f"invalid regex {pattern!r}: {exc}")
    if lora.targets is not None and not lora.targets:
        _fail("lora.targets", "is an empty list; give regexes or null to use lora.preset")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    for name in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every"):
        _at_least(t, "train", name, 1)
    _at_least(t, "train", "cpu_threads", 1)
    for name in ("save_every", "export_every", "noise_offset"):
        _at_least(t, "train", name, 0)
    if t.min_snr_gamma is not None and t.min_snr_gamma <= 0:
        _fail("train.min_snr_gamma", f"must be > 0 (5.0 is common) or null, got {t.min_snr_gamma}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        _fail("train.max_grad_norm", f"must be > 0 or null (no clipping), got {t.max_grad_norm}")
    if not 0 <= t.timestep_min < t.timestep_max <= 1000:
        _fail("train.timestep_min", f"need 0 <= timestep_min < timestep_max <= 1000, got [{t.timestep_min}, {t.timestep_max})")
    if t.resume not in (None, "latest") and not os.path.isdir(t.resume):
        _fail("train.resume", f"checkpoint directory {t.resume!r} does not exist; use null, 'latest' or a "
              f"<run>/checkpoints/step-N directory")
    if t.train_text_encoders and cfg.data.cache_text:
        _fail("data.cache_text", "cannot be combined with train.train_text_encoders (the text encoders change while "
              "training, so cached embeddings would be stale); set data.cache_text: false")
    if cfg.lora.text_encoders != "te":
        try:
            re.compile(cfg.lora.text_encoders)
        except re.error as exc:
            _fail("lora.text_encoders", f"{cfg.lora.text_encoders!r} is neither the preset 'te' nor a regex: {exc}")


def _check_optim(cfg: Config) -> None:
    o = cfg.optim
    _choice("optim.name", o.name, OPTIMIZERS)
    _choice("optim.scheduler", o.scheduler, SCHEDULERS)
    for name in ("lr", "te_lr", "eps"):
        value = getattr(o, name)
        if value is not None and value <= 0:
            _fail(f"optim.{name}", f"must be > 0, got {value}")
    _at_least(o, "optim", "weight_decay", 0)
    _at_least(o, "optim", "momentum", 0)
    _at_least(o, "optim", "warmup_steps", 0)
    _at_least(o, "optim", "num_cycles", 1)
    if not all(0.0 <= b < 1.0 for b in o.betas):
        _fail("optim.betas", f"each beta must be in [0, 1), got {list(o.betas)}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps > cfg.train.max_steps:
        _fail("optim.warmup_steps", f"{o.warmup_steps} is more than train.max_steps={cfg.train.max_steps}")


def _check_data_and_family(cfg: Config) -> None:
    try:
        cfg.data.check_sources()
    except ValueError as exc:
        raise ConfigError(f"data.{exc}") from None
    family = family_of(cfg)
    if family is None:
        return
    if family == "sdxl" and cfg.data.resolution < 512:
        _fail("data.resolution", f"{cfg.data.resolution} is too small for SDXL (trained at 1024 px); use 1024 (or at least 512)")
    # Pixel sizes only need to be multiples of 8 (the VAE's block; data.config checks those): the
    # UNet takes any latent size, as diffusers' does.
    size = cfg.sample.size
    if size is not None and size % 8:
        _fail("sample.size", f"{size} must be a multiple of 8 (the VAE works on 8x8 pixel blocks)")


def _check_sample_output(cfg: Config) -> None:
    s = cfg.sample
    _at_least(s, "sample", "every", 0)
    _at_least(s, "sample", "steps", 1)
    _at_least(s, "sample", "cfg", 0)
    _at_least(s, "sample", "size", 8)
    from .sampling.samplers import SAMPLER_NAMES

    _choice("sample.sampler", s.sampler, SAMPLER_NAMES)
    if s.every and not s.prompts:
        _fail("sample.every", "is set but sample.prompts is empty; add prompts or set sample.every: 0")
    name = cfg.output.name
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        _fail("output.name", f"{name!r} must be a plain file name (no directories); put directories in output.dir")


def check_config(cfg: Config) -> None:
    """Run every check; raises ConfigError on the first problem."""
    _check_model(cfg)
    _check_lora(cfg)
    _check_train(cfg)
    _check_optim(cfg)
    _check_sample_output(cfg)
    _check_data_and_family(cfg)
