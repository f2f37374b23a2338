"""Typed training configuration: dataclass sections, YAML loading, dotted overrides, validation.

A config file is YAML with one mapping per section (`model`, `lora`, `data`, `train`, `optim`,
`output`, `sample`, `validation`); omitted keys keep their defaults. `load_config(path, ["train.max_steps=50"])`
applies command-line overrides (values parsed as YAML), builds the dataclasses, rejects unknown
keys and wrong types naming the key path (with the closest valid key as a suggestion) and runs
the cross-field checks in `check_config` — all before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.config import DataConfig

from .config_build import ConfigError, build_dataclass  # noqa: F401  (ConfigError is part of this module's API)
from models.lora.options import LoRAOptions

# ---- choices ------------------------------------------------------------------------------------
# Names a config may use. Each mirrors a registry of the code that runs them (optimizers, samplers,
# ...); those modules import torch, configs must not, and tests/test_config_choices.py checks that
# each Literal equals its registry.
Precision = Literal["fp32", "fp16", "bf16"]
MixedPrecision = Literal["no", "fp16", "bf16"]
PredictionType = Literal["epsilon", "v_prediction"]
"""`trainer.objective.PREDICTION_TYPES`."""
Checkpointing = Literal["block", "layer", "transformer"]
"""`models.unet.GRANULARITIES`."""
OptimizerName = Literal["adamw", "adam", "sgd", "adafactor",
                        "adamw8bit", "adam8bit", "paged_adamw8bit", "lion8bit", "paged_lion8bit",
                        "prodigy", "adamw_schedulefree"]
"""`trainer.optim.OPTIMIZERS`."""
FlowWeighting = Literal["none", "sigma_sqrt", "cosmap"]
"""`trainer.flow.FLOW_WEIGHTINGS`."""
LossType = Literal["mse", "huber", "smooth_l1"]
"""`trainer.losses.LOSS_TYPES`."""
HuberSchedule = Literal["constant", "exponential", "snr"]
"""`trainer.losses.HUBER_SCHEDULES`."""
TimestepSampling = Literal["uniform", "logit_normal"]
"""`trainer.losses.TIMESTEP_SAMPLINGS`."""
SchedulerName = Literal["constant", "linear", "cosine", "cosine_with_restarts"]
"""`trainer.optim.SCHEDULERS`."""
SamplerName = Literal["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras"]
"""`trainer.sampling.samplers.SAMPLER_NAMES`."""
QuantizeMode = Literal["none", "fp8", "int8", "nf4"]
"""`models.quant.formats.MODES`."""
TrainMode = Literal["lora", "full"]
"""What a run trains: LoRA adapters or the model's own weights (`trainer.full`)."""
FullDtype = Literal["fp32", "bf16"]
"""Dtypes of fully trained weights (`trainer.full.FullWeights`)."""
BuiltinFamily = Literal["sd15", "sd2", "sdxl", "flux-dev", "flux-schnell", "tiny-sd15", "tiny-sdxl", "tiny-flux",
                        "toy-sdxl"]
"""The families `models.families` registers itself. Plug-ins may register more, so
`model.family` is a plain string checked against both (see `trainer.config_checks`)."""

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""torch dtype name of each precision name used in configs and on the command line."""


def torch_dtype(name: str):
    """The torch dtype of a precision name: fp32 | fp16 | bf16."""
    import torch  # configs are read and checked without importing torch

    return getattr(torch, DTYPE_NAMES[name])


# ---- sections -----------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The base model that is adapted (kept frozen)."""

    source: str = "tiny-sdxl"
    """A family name (no download: `toy-sdxl`, a small SDXL-architecture model whose trained weights
    ship with lorasmith; the `tiny-*` families, random weights from `seed`, for tests), a hub id
    (`stabilityai/stable-diffusion-xl-base-1.0`, or `owner/repo/file.safetensors`), a diffusers
    folder or a single `.safetensors` file."""
    family: str | None = None
    """Model family (`sd15`, `sd2`, `sdxl`, `flux-dev`, `flux-schnell`, the `tiny-*` test families, or
    one a plug-in registered) when
    it cannot be detected from `source`; null = detect."""
    dtype: Precision = "fp32"
    """Storage dtype of the frozen base weights. LoRA weights always train in fp32; fully trained
    parts in `train.full_dtype`."""
    vae: str | None = None
    """Separate VAE (single file, folder or hub id) replacing the base model's, e.g. an fp16-fix VAE."""
    text_encoders: list[str | None] | None = None
    """Separate text-encoder files, one entry per encoder slot in the family's order (null keeps the
    checkpoint's), e.g. FLUX.1 from ComfyUI files: `[clip_l.safetensors, t5xxl_fp16.safetensors]`."""
    tokenizers: list[str | None] | None = None
    """Tokenizer folder/file per encoder slot (null = the checkpoint's or the shipped one). No T5
    vocabulary ships: FLUX.1 without a diffusers folder needs `[null, <folder with tokenizer.json or
    spiece.model>]`."""
    vae_dtype: Precision | None = None
    """VAE dtype; null = fp32 for SDXL (its VAE overflows in fp16) and `dtype` otherwise."""
    prediction_type: PredictionType | None = None
    """Override the family's prediction type (null = the family default)."""
    variant: str | None = None
    """Weight variant of a diffusers folder / hub repo (e.g. `fp16`); null = the plain weights."""
    allow_pickle: bool = False
    """Allow `.ckpt`/`.pt`/`.bin` pickle checkpoints (loaded with torch's weights-only unpickler)."""
    seed: int = 0
    """Seed of the random weights when `source` is a family name (without shipped weights, or with
    `random_weights`)."""
    random_weights: bool = False
    """Build a family-name `source` with random weights from `seed` even where the family ships
    trained ones (`toy-sdxl`): training from scratch. Only with a family-name source."""
    quantize: QuantizeMode = "none"
    """Storage format of the frozen denoiser's weights: `none` (`dtype`), `fp8` (float8 e4m3 with a
    scale per output channel, 1 byte/weight), `int8` (per-row absmax, 1 byte) or `nf4` (4-bit
    NormalFloat, blocks of 64, 0.56 byte). Quantized while loading; each layer dequantizes to
    `dtype` inside its forward pass. Linear and conv layers with >= 4096 weights are quantized,
    except the 4-channel latent input/output convs; norms and embeddings keep `dtype`. The LoRA
    trains and exports as usual (a plain LoRA file); it cannot be merged into the quantized base."""
    quantize_text_encoders: QuantizeMode = "none"
    """Storage format of the frozen text encoders' Linear weights (choices as `quantize`). Only
    when they do not train (`train.train_text_encoders: false`)."""


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
    mixed_precision: MixedPrecision = "no"
    """Autocast precision of the forward pass (`fp16` adds loss scaling). Match `model.dtype`: with
    bf16/fp16 weights and `no`, the fp32 LoRA branches keep fp32 copies of their inputs (about 2x
    the activation memory)."""
    gradient_checkpointing: bool | Checkpointing = False
    """Recompute UNet activations in the backward pass to save memory (about +33% compute).
    `true` / `block`: each UNet block as a whole; `layer`: each ResBlock and transformer block
    separately (lowest peak for SDXL at 1024 px); `transformer`: only the transformer blocks."""
    compile: bool = False
    """torch.compile each UNet transformer block (after LoRA injection). The first steps are slow
    while the graphs compile; pays off on long GPU runs."""
    channels_last: bool = False
    """Channels-last memory format for the UNet weights; convolution outputs follow (faster
    convolutions on recent GPUs with bf16/fp16)."""
    mode: TrainMode = "lora"
    """What trains: `lora` (adapters on the frozen model, exported as a LoRA file) or `full` (the
    denoiser's own weights, and the text encoders' with `train_text_encoders`; exported as a whole
    single-file model). Full runs checkpoint, resume, average (EMA), sample and validate as LoRA runs
    do; the `lora` section, LoRA+ and block multipliers do not apply to them."""
    full_dtype: FullDtype = "fp32"
    """`mode: full`: dtype of the trained weights. `fp32` master weights (`mixed_precision` autocasts
    the forward pass); `bf16` halves weight, gradient and checkpoint memory, with AdamW whose fp32
    update is rounded into bf16 stochastically (needs `optim.name: adamw`, `mixed_precision: bf16`)."""
    full_targets: list[str] | None = None
    """`mode: full`: train only the parameters whose `<component>.<name>` matches one of these regexes
    (components `unet` (the denoiser), `te` or `te1`/`te2`/`te3`; e.g. `[attn1, attn2]` for the UNet's
    attention); null = every parameter of the trained parts."""
    train_text_encoders: bool = False
    """Also train the text encoders: LoRA adapters on them, or with `mode: full` their weights (needs
    `data.cache_text: false`)."""
    offload_frozen: bool = True
    """Move the frozen parts that caching made idle to CPU memory once the caches are built: the
    VAE with `data.cache_latents`, the text encoders with `data.cache_text` (unless they train).
    They come back to the device only to render sample images. `false` keeps them on the device
    (faster sampling, about 1.6 GB more for SDXL in bf16)."""
    noise_offset: float = 0.0
    """Std of a per-sample, per-channel constant added to the noise (0 = off; 0.0357 is common)."""
    min_snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (5.0 is common); null = no SNR weighting."""
    loss: LossType = "mse"
    """Elementwise loss: `mse`; `huber` (2c(sqrt(d^2 + c^2) - c): squared error near 0, linear for
    large errors) or `smooth_l1` (2(sqrt(d^2 + c^2) - c)), both with threshold c from `huber_c` and
    `huber_schedule` (kohya's definitions)."""
    huber_c: float = 0.1
    """Threshold c of `huber` / `smooth_l1` in (0, 1] (see `huber_schedule`)."""
    huber_schedule: HuberSchedule = "snr"
    """How c varies with the timestep t: `constant` (c), `exponential` (c^(t/1000): 1 at t = 0 down
    to c) or `snr` ((1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - abar_t) / abar_t))."""
    debiased_estimation: bool = False
    """Weight each sample's loss by 1/sqrt(snr) (v-prediction: 1/(snr + 1)), snr capped at 1000
    (debiased estimation). Not with `min_snr_gamma`."""
    timestep_sampling: TimestepSampling = "uniform"
    """How training timesteps are drawn in [timestep_min, timestep_max): `uniform`, or
    `logit_normal` (u = sigmoid(N(logit_mean, logit_std)), t = min + floor(u (max - min)))."""
    logit_mean: float = 0.0
    """Mean of the normal behind `logit_normal` timestep sampling (> 0 favours noisier timesteps)."""
    logit_std: float = 1.0
    """Std of the normal behind `logit_normal` timestep sampling (> 0)."""
    timestep_shift: float = 1.0
    """Shift s of the drawn fraction u before it becomes a timestep: u' = s u / (1 + (s - 1) u);
    s > 1 moves timesteps towards noise, 1 = none. Applies to both samplings."""
    resolution_shift: bool | None = None
    """Flow families (FLUX.1): shift the drawn t towards noise by the image token count, as the
    reference sampler does (mu from 0.5 at 256 tokens to 1.15 at 4096, t' = e^mu / (e^mu + 1/t - 1)),
    on top of `timestep_shift`; null = the family's choice (dev: true, schnell: false)."""
    flow_weighting: FlowWeighting = "none"
    """Flow families: per-sample loss weight from t (SD3's schemes, sigma = t): `sigma_sqrt` (1/t^2,
    very large near t = 0: use it only with logit-normal sampling) or `cosmap`; `none` = 1."""
    guidance: float | None = None
    """Guidance value embedded while training a guidance-distilled model (FLUX.1-dev); null = the
    family's (1.0). Other models have no guidance input."""
    multires_noise_iterations: int = 0
    """Pyramid (multi-resolution) noise levels added to the noise (6-10 is common; 0 = off)."""
    multires_noise_discount: float = 0.3
    """Weight decay per pyramid-noise level: level i is scaled by discount^i (0 < discount <= 1)."""
    ip_noise_gamma: float = 0.0
    """Input perturbation: the model input is made with noise + gamma * extra noise while the target
    keeps the plain noise (0.1 is common; 0 = off)."""
    prior_loss_weight: float = 1.0
    """Loss weight of regularization images (`data.subsets[].is_reg`) relative to training images."""
    masked_loss: bool = False
    """Weight the per-pixel loss by a mask: `<image stem>-masklabel.png` beside each image (white =
    learn, black = ignore, grey between), or the alpha channel with `data.alpha_mask`. Images
    without a mask are learnt whole."""
    unmasked_weight: float = 0.0
    """Loss weight of the pixels a mask ignores, in [0, 1] (0 = ignored completely)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the trained weights (adapters, or the model's with
    `mode: full`), ema = decay * ema + (1 - decay) * weights every `ema_every` steps, exported as
    `<name>-ema.safetensors`; null = off. 0 <= decay
    < 1 (0 = the EMA equals the current weights; 0.999 averages over about 1000 updates)."""
    ema_every: int = 1
    """Update the EMA every N optimizer steps."""
    ema_on_cpu: bool = False
    """Keep the EMA weights in CPU memory (saves accelerator memory; slower updates)."""
    timestep_min: int = 0
    """Smallest training timestep (inclusive)."""
    timestep_max: int = 1000
    """Largest training timestep (exclusive)."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule to zero SNR at the last step (use with v-prediction)."""
    export_every: int = 0
    """Export the LoRA (ComfyUI/kohya file; `mode: full`: the model) every N steps; the final export
    always happens."""
    log_every: int = 10
    """Log scalars (loss, lr, grad norm, throughput, memory) every N steps."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of the trained weights; null = no clipping."""
    device: Literal["auto", "cpu"] = "auto"
    """`auto` uses the GPU when there is one; `cpu` forces CPU."""
    cpu_threads: int | None = None
    """Intra-op threads of torch on the CPU (null = torch's default, one per core). Small models
    train fastest with 1, and so does any model when other processes share the cores."""
    distributed_timeout_minutes: int = 120
    """Multi-process runs: how long a process waits at a barrier or collective before the run
    aborts. Other processes wait while the main one builds the dataset and the text cache, so
    this must cover that (accelerate's default is 10)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: OptimizerName = "adamw"
    """One of adamw, adam, sgd, adafactor (torch), adamw8bit, adam8bit, paged_adamw8bit,
    lion8bit, paged_lion8bit (bitsandbytes), prodigy (package `prodigyopt`: learns the step size,
    use lr 1.0) or adamw_schedulefree (package `schedulefree`: no schedule needed; its warmup is
    `warmup_steps`)."""
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
    scheduler: SchedulerName = "constant"
    """constant, linear, cosine or cosine_with_restarts (all after linear warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    num_cycles: int = 1
    """Cosine cycles for cosine_with_restarts."""
    min_lr_ratio: float = 0.0
    """Floor of the decaying schedules as a fraction of the peak rate."""
    d0: float = 1e-6
    """Prodigy: initial estimate of the step size D."""
    d_coef: float = 1.0
    """Prodigy: multiplier of the estimated step size (below 1 = more careful)."""
    growth_rate: float | None = None
    """Prodigy: largest factor by which D may grow per step; null = unbounded."""
    use_bias_correction: bool = False
    """Prodigy: Adam-style bias correction of the step size."""
    safeguard_warmup: bool = False
    """Prodigy: keep D from growing too fast during an LR warmup."""
    beta3: float | None = None
    """Prodigy: decay of the step-size estimate's averages; null = sqrt(beta2)."""
    lora_plus_ratio: float | None = None
    """LoRA+: the up (B) matrices learn at ratio x the rate of the down (A) matrices (16 is
    common); null = one rate."""
    down_lr_weight: float | list[float] | None = None
    """Learning-rate multiplier of the UNet input (down) blocks: one number for all, or one per block
    IN00, IN01, ... (see "UNet blocks" below); 0 = that block is not trained."""
    mid_lr_weight: float | None = None
    """Learning-rate multiplier of the UNet middle block (MID)."""
    up_lr_weight: float | list[float] | None = None
    """Learning-rate multiplier of the UNet output (up) blocks: one number, or one per block OUT00, ..."""
    block_lr_weight: list[float] | None = None
    """Per-block form: one multiplier per UNet block in the order IN00.., MID, OUT00.. (25 values for
    SD1.5/SD2, 19 for SDXL); not together with the down/mid/up keys."""


@dataclass
class OutputConfig:
    """Where results go: `<dir>/<name>/` holds the LoRA, checkpoints, logs and samples."""

    dir: str = "runs"
    """Parent directory of run directories."""
    name: str = "lora"
    """Run name: the run directory and the exported file `<name>.safetensors`."""
    export_dtype: Precision = "fp16"
    """dtype of the exported LoRA tensors (`train.mode: full`: of the exported model's tensors)."""
    export_diffusers: bool = False
    """`train.mode: full`: also write every exported model as a diffusers folder `<stem>-diffusers/`
    beside its single file."""
    overwrite: bool = False
    """Allow starting fresh in a run directory that already has checkpoints (they are deleted)."""
    tensorboard: bool = True
    """Write tensorboard event files under `<run>/logs`."""
    break_lock: bool = False
    """Take over the run directory's lock (`<run>/.lock`) even when it names a run on another
    machine, whose liveness cannot be checked (see docs/reliability.md). Only when that run is gone."""
    wandb: str | None = None
    """Also log to Weights & Biases under this project (package `wandb`, `pip install
    'lorasmith[wandb]'`): the tensorboard scalars and sample images; null = off."""
    wandb_name: str | None = None
    """Weights & Biases run name; null = `name`. A resumed run continues the same wandb run."""


@dataclass
class SampleConfig:
    """Validation images generated during training."""

    prompts: list[str] = field(default_factory=list)
    """Prompts rendered every `every` steps (empty = no validation images)."""
    negative_prompt: str = ""
    """Negative prompt used for every validation image."""
    every: int = 0
    """Render every N steps (0 = only at the end when prompts are given)."""
    steps: int | None = None
    """Sampler steps per image; null = the family's default (FLUX.1-dev 28, schnell 4), else 20."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale (<= 1 disables guidance); for a guidance-distilled model
    (FLUX.1-dev) the guidance value it embeds instead (no CFG pass). null = 7, or the embedded
    default of a guidance-distilled model (3.5). Old name: `cfg`."""
    sampler: SamplerName = "euler"
    """Sampler of the generation pipeline."""
    seed: int = 0
    """Seed of the initial noise (fixed so images are comparable across steps)."""
    size: int | None = None
    """Square image side in pixels; null = `data.resolution`."""
    use_ema: bool = False
    """Render the images with the EMA weights (`train.ema_decay`) instead of the trained ones."""
    images_per_prompt: int = 1
    """Images per prompt; the grid then has one row per prompt (image k of the grid uses seed + k,
    so the same cell shows the same noise at every step)."""
    at_start: bool = False
    """Also render the prompts before the first step (`samples/step-00000000.png`): the untouched
    base model, since a new LoRA starts as a no-op. With the final grid this is a before/after pair
    on the same prompts and seeds. Skipped when a run resumes."""


@dataclass
class ValidationConfig:
    """Validation loss on held-out images, at fixed timesteps and fixed noise per image (so values
    are comparable across steps, runs and resumes): logged as `val/loss` and printed with the step."""

    path: str | None = None
    """Folder (or dataset) of held-out images, read like `data.path` with the data section's
    resolution and buckets (no flips, crops or caption randomness)."""
    split: float = 0.0
    """Fraction of the training images held out instead (0 < split < 1; the same images for a
    given `train.seed`; never regularization images); 0 = no split."""
    every: int = 0
    """Compute the validation loss every N steps (and at the end); 0 = only at the end."""
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """Timesteps each validation image is noised at; the loss is the mean over images and these."""
    seed: int = 0
    """Seed of the fixed validation noise."""


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.name


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
        _rename_deprecated(raw)
        cfg = build_dataclass(Config, raw)
        if check:
            check_config(cfg)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


# (section, old key, new key) of renamed keys that are still read, with a warning.
_RENAMED_KEYS = (("sample", "cfg", "guidance_scale"),)


def _rename_deprecated(raw: dict) -> None:
    """Move renamed keys of `raw` to their new names in place, warning once per key."""
    for section, old, new in _RENAMED_KEYS:
        node = raw.get(section)
        if not isinstance(node, dict) or old not in node:
            continue
        if new in node:
            raise ConfigError(f"{section}.{old}: renamed to {section}.{new}; give only {section}.{new}")
        logging.getLogger("trainer").warning(
            "%s.%s is deprecated; rename it to %s.%s (read as that for now)", section, old, section, new)
        node[new] = node.pop(old)


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
    from models.checkpoints.fileio import write_text  # torch-free

    write_text(path, "# Resolved configuration of this run (defaults filled in).\n" + text)

