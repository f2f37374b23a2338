"""Value and cross-field checks of a built `Config`, run by `load_config` before any model loads.

Each check raises `ConfigError` naming the key (`train.batch_size: ...`) and what to change. Checks
that need the model family use `model.family`, or `model.source` when it is a family name; for hub
ids and files whose family is only known after loading they are skipped here.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import typing

from .config import BuiltinFamily, Config, ConfigError

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


def family_names() -> tuple[str, ...]:
    """Family names a config may use: the built-in ones, plus any a plug-in has registered.

    A plug-in registers through `models.families`, so its registry is only looked at when that
    module is already imported (importing it here would import torch).
    """
    registry = sys.modules.get("models.families.registry")
    return tuple(dict.fromkeys([*typing.get_args(BuiltinFamily), *getattr(registry, "FAMILIES", {})]))


def family_of(cfg: Config) -> str | None:
    """The model family when the config states it (explicitly or as `model.source`), else None."""
    if cfg.model.family is not None:
        return cfg.model.family
    return cfg.model.source if cfg.model.source in family_names() else None


def _is_hub_id(value: str) -> bool:
    """A hub repo id / file (`owner/name[/file]`) or URL rather than a local path."""
    if value.startswith(("http://", "https://", "hf://")):
        return True
    local = value.startswith((".", "/", "~")) or os.path.exists(value)
    return bool(_HUB_ID.match(value)) and not local


def _check_model(cfg: Config) -> None:
    m = cfg.model
    families = family_names()
    if m.family is not None:
        _choice("model.family", m.family, families)
        if m.source in families and m.family != m.source:
            _fail("model.family", f"{m.family!r} contradicts model.source={m.source!r} (a family name); drop "
                  "model.family or make them equal")
    if m.random_weights and m.source not in families:
        _fail("model.random_weights", f"true builds a family-name model.source with random weights, but "
              f"model.source={m.source!r} is a checkpoint whose weights are loaded; set it to false or give a "
              "family name")
    for key, value in (("model.source", m.source), ("model.vae", m.vae)):
        if value is None or value in families or _is_hub_id(value):
            continue
        if not os.path.exists(os.path.expanduser(value)):
            _fail(key, f"{value!r} does not exist; give an existing file or folder, a hub id like 'owner/name' "
                  f"or a family name ({', '.join(families)})")
    mp = cfg.train.mixed_precision
    if m.dtype != "fp32" and mp != m.dtype:
        _fail("train.mixed_precision", f"{mp!r} does not match model.dtype={m.dtype!r}; half-precision base weights need "
              f"train.mixed_precision={m.dtype} (or set model.dtype: fp32)")
    if m.quantize_text_encoders != "none" and cfg.train.train_text_encoders:
        _fail("model.quantize_text_encoders", f"{m.quantize_text_encoders!r} is only for frozen text encoders, but "
              "train.train_text_encoders is true: adapters trained through a quantized encoder would learn its "
              "rounding error and then be used on full-precision encoders; set it to none")


def _check_full(cfg: Config) -> None:
    """`train.mode: full` against the keys that only make sense for LoRA adapters, and the full-mode
    keys in a LoRA run."""
    t, o = cfg.train, cfg.optim
    if t.mode != "full":
        for key, on in (("train.full_dtype", t.full_dtype != "fp32"), ("train.full_targets", t.full_targets is not None),
                        ("output.export_diffusers", cfg.output.export_diffusers)):
            if on:
                _fail(key, "applies to train.mode: full (the model's own weights train); remove it or set "
                      "train.mode: full")
        return
    from dataclasses import fields

    from models.lora.options import LoRAOptions

    default = LoRAOptions()
    for f in fields(LoRAOptions):
        if getattr(cfg.lora, f.name) != getattr(default, f.name):
            _fail(f"lora.{f.name}", "configures LoRA adapters, but train.mode is full (the model's own weights "
                  "train, no adapters); remove the lora section or set train.mode: lora")
    for name in ("lora_plus_ratio", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_weight"):
        if getattr(o, name) is not None:
            _fail(f"optim.{name}", "sets learning rates of LoRA adapters (LoRA+ / UNet block multipliers), which "
                  "train.mode: full does not have; remove it")
    if cfg.model.quantize != "none":
        _fail("model.quantize", f"{cfg.model.quantize!r} stores the denoiser quantized, but train.mode: full trains "
              "its weights; set model.quantize: none")
    if t.full_targets is not None:
        if not t.full_targets:
            _fail("train.full_targets", "is an empty list; give regexes or null to train every parameter")
        for i, pattern in enumerate(t.full_targets):
            try:
                re.compile(pattern)
            except re.error as exc:
                _fail(f"train.full_targets[{i}]", f"invalid regex {pattern!r} ({exc})")
    if t.full_dtype == "bf16":
        if o.name != "adamw":
            _fail("train.full_dtype", f"bf16 weights train with AdamW and stochastic rounding only, got "
                  f"optim.name={o.name}; set optim.name: adamw or train.full_dtype: fp32")
        if t.mixed_precision != "bf16":
            _fail("train.mixed_precision", f"{t.mixed_precision!r} with train.full_dtype: bf16; bf16 weights need "
                  "train.mixed_precision: bf16")


def _check_lora(cfg: Config) -> None:
    _check_full(cfg)
    if cfg.train.mode == "full":
        return
    lora = cfg.lora
    try:
        lora.check()
    except ValueError as exc:
        raise ConfigError(f"lora.{exc}") from None
    if cfg.train.train_text_encoders:
        if lora.text_encoders is None:
            _fail("lora.text_encoders", "is null but train.train_text_encoders is true; give `te` or regexes")
    elif lora.unet_targets is None:
        _fail("lora.preset", "is null and lora.targets too, so no layer gets an adapter; choose a preset or set "
              "train.train_text_encoders: true")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    for name in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every"):
        _at_least(t, "train", name, 1)
    _at_least(t, "train", "cpu_threads", 1)
    _at_least(t, "train", "distributed_timeout_minutes", 1)
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


def prediction_type_of(cfg: Config) -> str | None:
    """The prediction type training will use, when known before loading (explicit or the family's)."""
    if cfg.model.prediction_type is not None:
        return cfg.model.prediction_type
    family = family_of(cfg)
    if family is None:
        return None
    from models.families import (
        FAMILIES,  # torch-free: the registry of family declarations
    )

    spec = FAMILIES.get(family)
    return None if spec is None else spec.prediction_type


def _check_objective(cfg: Config) -> None:
    """Loss shape, weighting, timestep sampling and noise variants, and how they combine."""
    t = cfg.train
    if not 0 < t.huber_c <= 1:
        _fail("train.huber_c", f"must be in (0, 1] (0.1 is common), got {t.huber_c}")
    if t.logit_std <= 0:
        _fail("train.logit_std", f"must be > 0, got {t.logit_std}")
    if t.timestep_shift <= 0:
        _fail("train.timestep_shift", f"must be > 0 (1 = no shift), got {t.timestep_shift}")
    _at_least(t, "train", "multires_noise_iterations", 0)
    if not 0 < t.multires_noise_discount <= 1:
        _fail("train.multires_noise_discount", f"must be in (0, 1], got {t.multires_noise_discount}")
    _at_least(t, "train", "ip_noise_gamma", 0)
    _at_least(t, "train", "prior_loss_weight", 0)
    if t.debiased_estimation and t.min_snr_gamma is not None:
        _fail("train.debiased_estimation", "cannot be combined with train.min_snr_gamma: both weight the loss by the "
              "SNR; set one of them (debiased_estimation: false or min_snr_gamma: null)")
    if (t.debiased_estimation and t.zero_terminal_snr and t.timestep_max == 1000
            and prediction_type_of(cfg) == "epsilon"):
        _fail("train.debiased_estimation", "with train.zero_terminal_snr and epsilon prediction the last timestep has "
              "SNR 0, which debiased estimation weighs by 1/sqrt(0); use model.prediction_type: v_prediction, "
              "train.timestep_max: 999 or drop one of them")
    if not 0 <= t.unmasked_weight <= 1:
        _fail("train.unmasked_weight", f"must be in [0, 1], got {t.unmasked_weight}")
    if cfg.data.alpha_mask and not t.masked_loss:
        _fail("data.alpha_mask", "chooses where the loss masks come from but train.masked_loss is false; set "
              "train.masked_loss: true (or data.alpha_mask: false)")
    if t.ema_decay is not None and not 0 <= t.ema_decay < 1:
        _fail("train.ema_decay", f"must be in [0, 1) (0.999 is common) or null (no EMA), got {t.ema_decay}")
    _at_least(t, "train", "ema_every", 1)
    if t.ema_decay is not None and cfg.optim.name == "adamw_schedulefree":
        _fail("train.ema_decay", "cannot be combined with optim.name=adamw_schedulefree: schedule-free training already "
              "averages its weights (its exported weights are that average); set train.ema_decay: null")
    if cfg.sample.images_per_prompt < 1:
        _fail("sample.images_per_prompt", f"must be >= 1, got {cfg.sample.images_per_prompt}")
    if cfg.sample.use_ema and t.ema_decay is None:
        _fail("sample.use_ema", "needs the EMA weights, but train.ema_decay is null; set train.ema_decay (e.g. 0.999) "
              "or sample.use_ema: false")


def _check_optim(cfg: Config) -> None:
    o = cfg.optim  # names (optimizer, scheduler, sampler, ...) are checked by their Literal types
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
    if o.name == "adamw_schedulefree" and o.scheduler != "constant":
        _fail("optim.scheduler", f"{o.scheduler!r} cannot be used with optim.name=adamw_schedulefree, which replaces the "
              "learning-rate schedule (its warmup is optim.warmup_steps); set optim.scheduler: constant")
    for name in ("d0", "d_coef"):
        if getattr(o, name) <= 0:
            _fail(f"optim.{name}", f"must be > 0, got {getattr(o, name)}")
    if o.growth_rate is not None and o.growth_rate <= 1:
        _fail("optim.growth_rate", f"must be > 1 or null (unbounded), got {o.growth_rate}")
    if o.beta3 is not None and not 0 <= o.beta3 < 1:
        _fail("optim.beta3", f"must be in [0, 1) or null, got {o.beta3}")
    if o.lora_plus_ratio is not None and o.lora_plus_ratio <= 0:
        _fail("optim.lora_plus_ratio", f"must be > 0 (16 is common) or null, got {o.lora_plus_ratio}")
    _check_block_weights(cfg)
    if o.name == "prodigy":  # prodigyopt refuses parameter groups with different learning rates
        blocks = [v for n in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_weight")
                  for v in (getattr(o, n) if isinstance(getattr(o, n), list) else [getattr(o, n)]) if v is not None]
        uneven = [("optim.te_lr", o.te_lr is not None and o.te_lr != o.lr),
                  ("optim.lora_plus_ratio", o.lora_plus_ratio not in (None, 1.0)),
                  ("optim.block_lr_weight" if o.block_lr_weight else "optim.down_lr_weight",
                   any(v not in (0.0, 1.0) for v in blocks))]
        for key, bad in uneven:
            if bad:
                _fail(key, "gives some adapters another learning rate, which Prodigy (prodigyopt) does not support "
                      "(it learns one step size for all); drop it, use block multipliers of 0 or 1 only, or "
                      "another optim.name")


def _check_block_weights(cfg: Config) -> None:
    """Per-block learning-rate multipliers: non-negative, one form at a time. Their lengths depend on
    the UNet and are checked when the model is built."""
    o = cfg.optim
    split = [n for n in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") if getattr(o, n) is not None]
    if o.block_lr_weight is not None and split:
        _fail("optim.block_lr_weight", f"gives every block's multiplier; drop optim.{split[0]} (or use only "
              "down/mid/up_lr_weight)")
    for name in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_weight"):
        value = getattr(o, name)
        values = value if isinstance(value, list) else [] if value is None else [value]
        if isinstance(value, list) and not value:
            _fail(f"optim.{name}", "is an empty list; give one multiplier per block or null")
        if any(v < 0 for v in values):
            _fail(f"optim.{name}", f"multipliers must be >= 0 (0 = the block is not trained), got {value}")
    if cfg.lora.preset is None and cfg.lora.targets is None and (split or o.block_lr_weight is not None):
        _fail("optim." + (split[0] if split else "block_lr_weight"), "weighs UNet blocks but no UNet layer gets an "
              "adapter (lora.preset is null)")


def _check_data_and_family(cfg: Config) -> None:
    try:
        cfg.data.check_sources()
    except ValueError as exc:
        raise ConfigError(f"data.{exc}") from None
    limit = cfg.data.cache_memory_limit
    if limit is not None and not 0 < limit <= 1:
        _fail("data.cache_memory_limit", f"must be in (0, 1] (a share of the available memory) or null (no limit), "
              f"got {limit}")
    family = family_of(cfg)
    if family is None:
        return
    from models.families import (
        FAMILIES,  # torch-free: the registry of family declarations
    )

    spec = FAMILIES.get(family)
    if spec is not None and cfg.data.resolution < spec.resolution // 2:
        _fail("data.resolution", f"{cfg.data.resolution} is too small for {spec.title} (trained at {spec.resolution} "
              f"px); use {spec.resolution} (or at least {spec.resolution // 2})")
    if spec is None:
        return
    # Pixel sizes are multiples of 8 (the VAE's block; data.config checks those) times what the
    # denoiser needs of the latent grid (the UNet takes any size; Flux packs 2x2 latent patches).
    px = 8 * spec.latent_multiple
    size = cfg.sample.size
    if size is not None and size % px:
        _fail("sample.size", f"{size} must be a multiple of {px} for {spec.title or family} (8-pixel VAE blocks"
              + (f", {spec.latent_multiple}x{spec.latent_multiple} latent patches)" if px > 8 else ")"))
    if px > 8:
        d = cfg.data
        for key, value in (("resolution", d.resolution), ("bucket_step", d.bucket_step)):
            if value % px:
                _fail(f"data.{key}", f"{value} must be a multiple of {px} for {spec.title or family} (8-pixel VAE "
                      f"blocks, {spec.latent_multiple}x{spec.latent_multiple} latent patches)")
    _check_family_training(cfg, spec)


def _check_family_training(cfg: Config, spec) -> None:
    """Training options that depend on the family: checkpointing granularity, objective, guidance."""
    t = cfg.train
    preset = cfg.lora.preset
    if t.mode != "full" and cfg.lora.targets is None and preset is not None and preset not in spec.lora_presets:
        _fail("lora.preset", f"{preset!r} does not apply to {spec.title or spec.name}; choose one of "
              f"{', '.join(spec.lora_presets)} (or lora.targets regexes)")
    granularity = t.gradient_checkpointing
    if granularity not in (False, True) and granularity not in spec.checkpointing_granularities:
        _fail("train.gradient_checkpointing", f"{granularity!r} is not available for {spec.title or spec.name}; "
              f"choose one of {', '.join(spec.checkpointing_granularities)} (or true)")
    if spec.objective == "flow":
        for key, on in (("train.min_snr_gamma", t.min_snr_gamma is not None),
                        ("train.debiased_estimation", t.debiased_estimation),
                        ("train.zero_terminal_snr", t.zero_terminal_snr),
                        ("model.prediction_type", cfg.model.prediction_type is not None)):
            if on:
                _fail(key, f"belongs to noise-schedule (DDPM) training; {spec.title or spec.name} trains with "
                      "rectified flow (velocity target, t in [0, 1]); remove it")
        if cfg.sample.sampler != "euler":
            _fail("sample.sampler", f"{cfg.sample.sampler!r} is a noise-schedule sampler; {spec.title or spec.name} "
                  "samples with the flow Euler sampler: set sample.sampler: euler")
    else:
        for key, on in (("train.resolution_shift", t.resolution_shift is not None),
                        ("train.flow_weighting", t.flow_weighting != "none")):
            if on:
                _fail(key, f"applies to rectified-flow families (FLUX.1); {spec.title or spec.name} uses a noise "
                      "schedule: remove it")
    if t.guidance is not None and spec.distilled_guidance is None:
        _fail("train.guidance", f"{spec.title or spec.name} has no guidance input (only guidance-distilled models such "
              "as FLUX.1-dev do); remove it")


def _check_sample_output(cfg: Config) -> None:
    s = cfg.sample
    _at_least(s, "sample", "every", 0)
    _at_least(s, "sample", "steps", 1)
    _at_least(s, "sample", "guidance_scale", 0)
    _at_least(s, "sample", "size", 8)
    if s.every and not s.prompts:
        _fail("sample.every", "is set but sample.prompts is empty; add prompts or set sample.every: 0")
    name = cfg.output.name
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        _fail("output.name", f"{name!r} must be a plain file name (no directories); put directories in output.dir")
    for key in ("wandb", "wandb_name"):
        value = getattr(cfg.output, key)
        if value is not None and not value.strip():
            _fail(f"output.{key}", "is empty; give a name or null")


def _check_validation(cfg: Config) -> None:
    v = cfg.validation
    if v.path is not None and v.split:
        _fail("validation.split", "cannot be combined with validation.path (held-out images come from one of them); "
              "set validation.split: 0 or validation.path: null")
    if not 0 <= v.split < 1:
        _fail("validation.split", f"must be a fraction in [0, 1) of the training images (0.1 is common), got {v.split}")
    _at_least(v, "validation", "every", 0)
    if v.every and v.path is None and not v.split:
        _fail("validation.every", "is set but there are no validation images; set validation.path or validation.split")
    if v.path is not None and not _is_hub_id(v.path) and not os.path.exists(os.path.expanduser(v.path)):
        _fail("validation.path", f"{v.path!r} does not exist; give a folder of held-out images or a dataset")
    if not v.timesteps:
        _fail("validation.timesteps", "is empty; give the timesteps to measure at, e.g. [100, 300, 500, 700, 900]")
    bad = [t for t in v.timesteps if not 0 <= t < 1000]
    if bad:
        _fail("validation.timesteps", f"timesteps must lie in [0, 1000), got {bad}")


def check_config(cfg: Config) -> None:
    """Run every check; raises ConfigError on the first problem."""
    _check_model(cfg)
    _check_lora(cfg)
    _check_train(cfg)
    _check_objective(cfg)
    _check_optim(cfg)
    _check_sample_output(cfg)
    _check_validation(cfg)
    _check_data_and_family(cfg)
