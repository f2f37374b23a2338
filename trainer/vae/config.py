"""Typed configuration of `python -m trainer vae`: dataclass sections, YAML loading and checks.

A VAE config is YAML with the sections `model`, `data`, `loss`, `train`, `optim`, `eval` and
`output` (configs/README.md, "VAE training", documents every key). `data` is the LoRA trainer's
`DataConfig` (captions are read but unused). `load_vae_config(path, ["train.max_steps=50"])`
applies dotted overrides, builds the dataclasses (unknown keys and wrong types raise one
`ConfigError` naming the key) and runs `check_vae_config` - all without importing torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.config import DataConfig

from ..config import ConfigError, apply_override, load_raw, parse_override
from ..config_build import build_dataclass

__all__ = [
    "ConfigError",
    "VAEEvalConfig",
    "VAELossConfig",
    "VAEModelConfig",
    "VAEOptimConfig",
    "VAEOutputConfig",
    "VAERunConfig",
    "VAETrainConfig",
    "check_vae_config",
    "load_vae_config",
]

ReconstructionLoss = Literal["mse", "l1"]
"""`trainer.vae.losses.RECONSTRUCTION_LOSSES`."""
VAESchedule = Literal["constant", "linear", "cosine"]
LatentScaleMode = Literal["fold", "config"]
VAE_PRESETS = ("sdxl", "sd15", "sd2", "flux", "tiny", "toy", "tiny-flux")
"""Names `models.vae.VAEConfig.preset` accepts (tests/test_vae_train.py checks they agree)."""


@dataclass
class VAEModelConfig:
    """The autoencoder that is trained."""

    preset: str = "tiny"
    """`models.vae.VAEConfig` preset the network is built from: `toy` (the shipped `toy-sdxl`'s VAE:
    4x downsampling, 4 latent channels), `tiny` (the `tiny-sdxl` / `tiny-sd15` families' VAE: 8x
    downsampling, 4 latent channels, 1.0 M parameters), `tiny-flux`, `sdxl`, `sd15`, `sd2` or `flux`."""
    init: str | None = None
    """VAE to fine-tune: a VAE file (ldm names, bare or under `first_stage_model.`, or diffusers
    names), a full single-file checkpoint, a diffusers VAE folder, or a file this trainer exported;
    its shapes must be the preset's. null = random initialisation from `train.seed`."""
    init_logvar: float | None = -6.0
    """Random initialisation only: the posterior log-variance starts at this value for every input
    (the encoder's log-variance outputs get zero weights and this bias), so the decoder sees
    informative latents from the first step rather than unit-variance noise, which a small
    `kl_weight` lets training shrink anyway. null = the layer's default init (log-variance ~ 0)."""
    gradient_checkpointing: bool = False
    """Recompute each ResNet/attention block in the backward pass (less memory, about +30% time)."""


@dataclass
class VAELossConfig:
    """The training objective: reconstruction + KL (+ optional edge term), all per pixel."""

    reconstruction: ReconstructionLoss = "mse"
    """Per-pixel reconstruction error: `mse` (mean squared error, what PSNR measures) or `l1` (mean
    absolute error, the SD VAE's choice). On the shapes world MSE reached in 300 steps about what
    L1 did in 600, and looked sharper (configs/README.md, "VAE training")."""
    kl_weight: float = 1e-6
    """Weight of the KL divergence of the posterior from N(0, I), summed over the latent and divided
    by the pixel count (3 H W), so the value means what ldm's `kl_weight` means (1e-6 for the SD
    VAEs). Small values keep the latent detailed; its scale is fixed at export (`output.latent_scale`)."""
    edge_weight: float = 0.0
    """Weight of a multi-scale image-gradient term: L1 between the horizontal and vertical finite
    differences of image and reconstruction, at `edge_scales` scales (2x average-pooled each). 0 = off."""
    edge_scales: int = 2
    """Scales of the edge term (1 = full resolution only)."""


@dataclass
class VAETrainConfig:
    """The training loop."""

    max_steps: int = 2000
    """Number of optimizer steps."""
    batch_size: int = 16
    """Images per step."""
    seed: int = 0
    """Seed of the initialisation, data order, flips and posterior samples."""
    save_every: int = 500
    """Write a resumable checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest K checkpoints."""
    resume: str | None = None
    """null = start fresh, `latest` = the newest complete checkpoint of this run (fresh start if
    none), or a checkpoint directory."""
    log_every: int = 25
    """Log loss, reconstruction PSNR of the batch, lr and throughput every N steps."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """`bf16` autocasts the forward pass (GPUs and bf16-capable CPUs); `no` = fp32."""
    channels_last: bool = False
    """Channels-last memory format for weights and images (about 25% faster convolutions on x86
    CPUs with oneDNN; try it on GPUs with bf16)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm; null = no clipping."""
    device: Literal["auto", "cpu"] = "auto"
    """`auto` uses the GPU when there is one; `cpu` forces CPU."""
    cpu_threads: int | None = None
    """Intra-op threads of torch on the CPU (null = torch's default, one per core)."""


@dataclass
class VAEOptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 2.5e-4
    """Peak learning rate. The SD-style VAE is sensitive to it: on the shapes world 5e-4 learns
    clearly slower than 2.5e-4, and 2e-3 stalls (configs/README.md, "VAE training")."""
    betas: tuple[float, float] = (0.5, 0.9)
    """AdamW betas; (0.5, 0.9) as ldm trained its VAEs (faster here than (0.9, 0.99))."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    warmup_steps: int = 50
    """Linear warmup steps (the first step runs at lr / warmup_steps)."""
    scheduler: VAESchedule = "cosine"
    """After warmup: `constant`, `linear` or `cosine` decay to `min_lr_ratio` * lr at `max_steps`."""
    min_lr_ratio: float = 0.05
    """Floor of the decaying schedules as a fraction of `lr`."""


@dataclass
class VAEEvalConfig:
    """Reconstruction quality on fixed images: PSNR logged, and the reconstruction grid."""

    holdout: float = 0.05
    """Fraction of the images held out from training and used for evaluation (0 < holdout < 1, the
    same images for a given `train.seed`); 0 = evaluate on the first training images."""
    images: int = 32
    """Evaluation images (at most; fewer when the hold-out is smaller)."""
    every: int = 250
    """Evaluate every N steps and at the end (0 = only at the end)."""
    grid_images: int = 8
    """Images in `samples/reconstructions.png` (originals above, reconstructions below)."""


@dataclass
class VAEOutputConfig:
    """Where results go and how the VAE is exported: `<dir>/<name>/<name>.safetensors`."""

    dir: str = "runs"
    """Parent directory of run directories."""
    name: str = "vae"
    """Run name: the run directory and the exported file `<name>.safetensors`."""
    overwrite: bool = False
    """Allow starting fresh in a run directory that already has checkpoints (they are deleted)."""
    break_lock: bool = False
    """Take over the run directory's lock even when it names a run on another machine."""
    export_dtype: Literal["fp32", "fp16"] = "fp32"
    """dtype of the exported weights."""
    latent_scale: LatentScaleMode = "fold"
    """How the diffusion model gets unit-variance latents. `fold`: normalise each latent channel
    (mean 0, std 1 / the preset's `scaling_factor`) by rewriting `quant_conv` / `post_quant_conv`
    (decoded images unchanged), so the preset's constant (SDXL's 0.13025) is right, wherever the
    VAE goes: single files, ComfyUI's fixed SDXL latent format. `config`: keep the weights and set
    `scaling_factor` = 1 / std of the latents (as SD did), recorded in the file's metadata and
    `<name>.json` (a loader that takes the scale from the base model's family does not see it)."""
    latent_shift: bool = False
    """With `latent_scale: config`: also set `shift_factor` = the latents' mean (as Flux.1)."""
    stats_images: int = 256
    """Training images encoded to measure the latent statistics at export."""
    diffusers_folder: bool = False
    """Also write `<name>-diffusers/` (config.json + diffusers-named weights), which diffusers'
    `AutoencoderKL.from_pretrained` and `model.vae` both read with the exported scaling."""


@dataclass
class VAERunConfig:
    """A whole VAE training run."""

    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    optim: VAEOptimConfig = field(default_factory=VAEOptimConfig)
    eval: VAEEvalConfig = field(default_factory=VAEEvalConfig)
    output: VAEOutputConfig = field(default_factory=VAEOutputConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.name


# ---- loading --------------------------------------------------------------------------------
def load_vae_config(path: str | os.PathLike | None, overrides: list[str] = (), check: bool = True) -> VAERunConfig:
    """VAERunConfig from a YAML file (None = defaults) plus `key=value` overrides; ConfigError
    prefixed with the file name on any problem."""
    raw = load_raw(path) if path is not None else {}
    for text in overrides:
        apply_override(raw, *parse_override(text))
    try:
        cfg = build_dataclass(VAERunConfig, raw)
        if check:
            check_vae_config(cfg)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def _fail(key: str, message: str):
    raise ConfigError(f"{key}: {message}")


def _at_least(section, prefix: str, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            _fail(f"{prefix}.{name}", f"must be >= {minimum}, got {value}")


def check_vae_config(cfg: VAERunConfig) -> None:
    """Value and cross-field checks; ConfigError naming the key and what to change."""
    m, d, lo, t, o, ev, out = cfg.model, cfg.data, cfg.loss, cfg.train, cfg.optim, cfg.eval, cfg.output
    if m.preset not in VAE_PRESETS:
        import difflib

        close = difflib.get_close_matches(m.preset, VAE_PRESETS, n=1, cutoff=0.5)
        _fail("model.preset", f"unknown VAE preset {m.preset!r}{f'; did you mean {close[0]!r}?' if close else ''} "
              f"(valid: {', '.join(VAE_PRESETS)})")
    if m.init is not None and not os.path.exists(m.init):
        _fail("model.init", f"{m.init!r} does not exist; give a VAE file or folder to fine-tune, or null to start "
              "from random weights")
    try:
        d.check_sources()
    except ValueError as exc:  # DataConfigError: "path: ..." / "subsets[1].path: ..."
        raise ConfigError(f"data.{exc}") from None
    if d.cache_latents or d.cache_text:
        key = "cache_latents" if d.cache_latents else "cache_text"
        _fail(f"data.{key}", "caches serve diffusion training; a VAE trains on pixels: set it to false")
    factor = 8  # every preset downsamples by 8 (models/vae.py: 2 ** (len(ch_mult) - 1))
    for i, sub in enumerate(d.resolved_subsets() or [d]):
        if sub.resolution % factor:
            where = f"data.subsets[{i}].resolution" if d.subsets else "data.resolution"
            _fail(where, f"must be a multiple of {factor} (the VAE's downsampling), got {sub.resolution}")
    _at_least(lo, "loss", 0.0, "kl_weight", "edge_weight")
    _at_least(lo, "loss", 1, "edge_scales")
    _at_least(t, "train", 1, "max_steps", "batch_size", "keep_last", "log_every", "cpu_threads")
    _at_least(t, "train", 0, "save_every")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        _fail("train.max_grad_norm", f"must be > 0 or null (no clipping), got {t.max_grad_norm}")
    if not o.lr > 0:
        _fail("optim.lr", f"must be > 0, got {o.lr}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        _fail("optim.betas", f"each beta must be in [0, 1), got {list(o.betas)}")
    if not o.eps > 0:
        _fail("optim.eps", f"must be > 0, got {o.eps}")
    _at_least(o, "optim", 0.0, "weight_decay")
    _at_least(o, "optim", 0, "warmup_steps")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if not 0.0 <= ev.holdout < 1.0:
        _fail("eval.holdout", f"must be in [0, 1) (0 = evaluate on training images), got {ev.holdout}")
    _at_least(ev, "eval", 1, "images", "grid_images")
    _at_least(ev, "eval", 0, "every")
    if not out.name or "/" in out.name or "\\" in out.name:
        _fail("output.name", f"must be a plain file name without slashes, got {out.name!r}")
    _at_least(out, "output", 1, "stats_images")
    if out.latent_shift and out.latent_scale != "config":
        _fail("output.latent_shift", "applies to latent_scale: config only (fold already centres every channel)")
    from models.vae import VAEConfig  # the preset's layout decides whether there is a conv to fold into

    if out.latent_scale == "fold" and not VAEConfig.preset(m.preset).use_quant_conv:
        _fail("output.latent_scale", f"fold rewrites quant_conv / post_quant_conv, which preset {m.preset!r} does not "
              "have; use latent_scale: config")

