"""`python -m trainer generate`: text-to-image with a base model and optional LoRAs.

    python -m trainer generate --model tiny-sdxl --prompt "a red fox" --steps 20 --out outputs/
    python -m trainer generate --model sd_xl_base_1.0.safetensors --prompt "a red fox, watercolor" \\
        --negative "blurry" --lora fox.safetensors:0.8 --sampler dpmpp_2m_karras --size 1024x1024 --n 4 --out outputs/
    python -m trainer generate --config configs/my_run.yaml --prompt "a sks dog" --out outputs/

`--model` takes a family name (no download: `toy-sdxl`, the small model whose trained weights ship
with lorasmith; `tiny-sdxl`, `tiny-sd15`, ...: random weights, for tests), a single-file
checkpoint, a diffusers folder or a hub id. With `--config`, the model, sampling defaults and the
run's exported LoRA (`<output.dir>/<output.name>/<name>.safetensors`, when it exists and no
`--lora` is given) come from that training config; flags override them.

Images are written as `<out>/<index>-<seed>.png` with an A1111-style `parameters` chunk, so
they can be dragged into A1111/ComfyUI-compatible viewers to read the settings back.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import re
import sys
import time
import typing
from pathlib import Path

import torch

from ..config import DTYPE_NAMES, PredictionType, torch_dtype
from ..sampling.samplers import SAMPLER_NAMES, TIMESTEP_SPACINGS


class GenerateArgumentError(ValueError):
    """A command-line value is invalid; the message names the flag and the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="family name (toy-sdxl, tiny-sdxl, ...), checkpoint file, diffusers folder "
                        "or hub id; default: model.source of --config")
    parser.add_argument("--prompt", "-p", action="append", required=True,
                        help="prompt; repeat the flag for several prompts")
    parser.add_argument("--negative", default=None, help='negative prompt (default: "" or the config\'s)')
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="LoRA file and strength (default 1.0); repeat for several")
    parser.add_argument("--merge", action="store_true",
                        help="fold the LoRAs into the base weights (faster sampling) instead of running them alongside")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help="sampler (default: euler)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the model's, e.g. 28 for FLUX.1-dev, 4 for schnell; else 30)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale; <= 1 disables guidance (default 7). FLUX.1-dev: the "
                        "guidance value it embeds (default 3.5; no CFG); FLUX.1-schnell: none, ignored")
    # Old spelling, kept so existing scripts keep working.
    parser.add_argument("--cfg", dest="guidance_scale", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the first image; image k uses seed + k (default 0; -1 = random)")
    parser.add_argument("--size", default=None, metavar="WxH",
                        help="image size in pixels, e.g. 1024x1024 or 768 (default: the model's resolution)")
    parser.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per sampling run (default: all n of a prompt at once)")
    parser.add_argument("--out", required=True, help="output directory for the PNG files")
    parser.add_argument("--config", "-c", default=None,
                        help="training YAML whose model/sample settings are the defaults")
    parser.add_argument("--family", default=None, help="model family when it cannot be detected (sdxl, sd15, sd2)")
    parser.add_argument("--vae", default=None, help="separate VAE file/folder replacing the model's")
    add_part_arguments(parser)
    parser.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                        help="UNet/text-encoder dtype (auto: fp16 on GPU, fp32 on CPU; the SDXL VAE stays fp32)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--prediction-type", choices=typing.get_args(PredictionType), default=None,
                        help="override the model's prediction type")
    parser.add_argument("--zero-terminal-snr", action="store_true", default=None,
                        help="sample with the zero-terminal-SNR schedule (models trained with it)")
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
                        help="leading (SD default) or trailing (default with --zero-terminal-snr)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- argument parsing ---------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """"1024x768" -> (1024, 768) (width, height); "768" -> (768, 768)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×*]\s*(\d+))?\s*", str(text))
    if not match:
        raise GenerateArgumentError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024 (or one number)")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    if width <= 0 or height <= 0:
        raise GenerateArgumentError(f"--size {text!r}: width and height must be positive")
    if width % 8 or height % 8:
        raise GenerateArgumentError(
            f"--size {text!r}: width and height must be multiples of 8 (the VAE works on 8x8 pixel blocks)"
        )
    return width, height


def parse_lora(text: str) -> tuple[Path, float]:
    """"file.safetensors:0.8" -> (path, 0.8); without ":STRENGTH" the strength is 1.0.

    Only a trailing ":number" is a strength, so Windows paths like C:\\x.safetensors work."""
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
            path = head
        except ValueError:
            pass
    p = Path(path).expanduser()
    if not p.is_file():
        why = "is a directory" if p.is_dir() else "no such file"
        raise GenerateArgumentError(f"--lora {text!r}: {p}: {why} (expected FILE.safetensors[:STRENGTH])")
    return p, strength


def pick_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise GenerateArgumentError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateArgumentError(f"--device {text}: no CUDA device is available; use --device cpu")
    return device


def add_part_arguments(parser: argparse.ArgumentParser) -> None:
    """--text-encoders / --tokenizers: parts given per text-encoder slot (shared by generate and convert)."""
    parser.add_argument("--text-encoders", nargs="+", default=None, metavar="PATH",
                        help="text-encoder files/folders replacing the model's, one per slot in the family's order "
                             "('none' keeps a slot), e.g. FLUX.1: clip_l.safetensors t5xxl_fp16.safetensors")
    parser.add_argument("--tokenizers", nargs="+", default=None, metavar="PATH",
                        help="tokenizer folders/files, one per slot ('none' keeps a slot); FLUX.1 outside a diffusers "
                             "folder needs its T5 tokenizer: --tokenizers none /models/FLUX.1-dev/tokenizer_2")


def parse_slots(values: list[str] | None) -> list[str | None] | None:
    """Per-slot flag values with 'none'/'null'/'-' meaning "keep the model's"."""
    if not values:
        return None
    return [None if v.lower() in ("none", "null", "-") else v for v in values]


@dataclasses.dataclass
class GenerateSettings:
    """Resolved settings of one `generate` run: flags over config over defaults."""

    model: str
    """Family name, checkpoint file, diffusers folder or hub id."""
    prompts: list[str]
    negative: str
    loras: list[tuple[Path, float]]
    """(file, strength) of each LoRA."""
    sampler: str
    steps: int | None
    """None = the model's default (`Txt2ImgPipeline.prepare`)."""
    guidance_scale: float | None
    """None = the model's default (CFG 7, or a guidance-distilled model's embedded value)."""
    seed: int
    size: tuple[int, int] | None
    """(width, height) in pixels; None = the model's resolution."""
    n: int
    batch_size: int
    out: Path
    family: str | None = None
    vae: str | None = None
    text_encoders: list[str | None] | None = None
    """Per encoder slot: a file/folder replacing the model's text encoder (None keeps it)."""
    tokenizers: list[str | None] | None = None
    """Per encoder slot: a tokenizer folder/file (None keeps the model's)."""
    variant: str | None = None
    allow_pickle: bool = False
    model_seed: int = 0
    """Seed of the random weights of family-name models."""
    random_weights: bool = False
    """Random weights even for a family that ships trained ones (the config's `model.random_weights`)."""
    prediction_type: str | None = None
    zero_terminal_snr: bool = False
    timestep_spacing: str = "leading"


def resolve_settings(args: argparse.Namespace) -> GenerateSettings:
    """Merge flags with the optional training config; raises GenerateArgumentError."""
    cfg = None
    if args.config:
        from ..config import load_config

        cfg = load_config(args.config, check=False)

    def pick(flag, from_cfg, default):
        if flag is not None:
            return flag
        return from_cfg if cfg is not None and from_cfg is not None else default

    model = pick(args.model, cfg and cfg.model.source, None)
    if model is None:
        raise GenerateArgumentError("--model is required (or give --config with model.source)")
    sample = cfg.sample if cfg is not None else None
    size = parse_size(args.size) if args.size is not None else None
    if size is None and sample is not None:
        side = sample.size or cfg.data.resolution
        size = (side, side) if side else None
    loras = [parse_lora(text) for text in args.lora]
    if not loras and cfg is not None:
        exported = cfg.run_dir / f"{cfg.output.name}.safetensors"
        if exported.is_file():
            loras = [(exported, 1.0)]
    steps = pick(args.steps, sample and sample.steps, None)
    n = args.n
    for flag, value in (("--steps", steps), ("--n", n)):
        if value is not None and value < 1:
            raise GenerateArgumentError(f"{flag} must be >= 1, got {value}")
    batch_size = args.batch_size or n
    if batch_size < 1:
        raise GenerateArgumentError(f"--batch-size must be >= 1, got {batch_size}")
    seed = pick(args.seed, sample and sample.seed, 0)
    if seed == -1:
        seed = random.randrange(2**31)
    if seed < 0:
        raise GenerateArgumentError(f"--seed must be >= 0 (or -1 for a random seed), got {seed}")
    zsnr = pick(args.zero_terminal_snr, cfg and cfg.train.zero_terminal_snr, False)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise GenerateArgumentError(f"--out {out}: exists and is not a directory")
    same_model = cfg is not None and args.model in (None, cfg.model.source)
    m = cfg.model if same_model else None
    return GenerateSettings(
        model=model,
        prompts=list(args.prompt),
        negative=pick(args.negative, sample and sample.negative_prompt, ""),
        loras=loras,
        sampler=pick(args.sampler, sample and sample.sampler, "euler"),
        steps=steps,
        guidance_scale=pick(args.guidance_scale, sample and sample.guidance_scale, None),
        seed=seed,
        size=size,
        n=n,
        batch_size=batch_size,
        out=out,
        family=args.family or (m.family if m else None),
        vae=args.vae or (m.vae if m else None),
        text_encoders=parse_slots(args.text_encoders) or (m.text_encoders if m else None),
        tokenizers=parse_slots(args.tokenizers) or (m.tokenizers if m else None),
        variant=m.variant if m else None,
        allow_pickle=m.allow_pickle if m else False,
        model_seed=m.seed if m else 0,
        random_weights=m.random_weights if m else False,
        prediction_type=args.prediction_type or (m.prediction_type if m else None),
        zero_terminal_snr=bool(zsnr),
        timestep_spacing=args.timestep_spacing or ("trailing" if zsnr else "leading"),
    )


# ---- model ----------------------------------------------------------------------------------------
def load_bundle(settings: GenerateSettings, device: torch.device, dtype: torch.dtype):
    """The ModelBundle of `settings.model` on `device` (`open_model`: random weights for a family
    name, else `models.load_model`; the VAE precision policy applies)."""
    from models.checkpoints.open import open_model

    return open_model(settings.model, family=settings.family, dtype=dtype, device=device, vae=settings.vae,
                      text_encoders=settings.text_encoders, tokenizers=settings.tokenizers,
                      variant=settings.variant, allow_pickle=settings.allow_pickle,
                      prediction_type=settings.prediction_type, seed=settings.model_seed,
                      random_weights=settings.random_weights,
                      labels=("--family", "--model", "--vae"))


def _model_name(source: str) -> str:
    """Metadata name: a checkpoint file's stem, a folder's name, else the source as given (hub id)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return source


def _next_index(out: Path) -> int:
    taken = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    return max(taken, default=-1) + 1


# ---- run ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    try:
        settings = resolve_settings(args)
        device = pick_device(args.device)
    except GenerateArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dtype = torch_dtype(("fp16" if device.type == "cuda" else "fp32") if args.dtype == "auto" else args.dtype)

    from ..sampling.pipeline import Txt2ImgPipeline, save_png

    t0 = time.perf_counter()
    try:
        bundle = load_bundle(settings, device, dtype)
    except GenerateArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipe = Txt2ImgPipeline(
        bundle, sampler=settings.sampler, timestep_spacing=settings.timestep_spacing,
        zero_terminal_snr=settings.zero_terminal_snr, model_name=_model_name(settings.model),
    )
    width, height = settings.size or (bundle.spec.resolution, bundle.spec.resolution)
    try:
        pipe.check_size(width, height)
    except ValueError as exc:
        print(f"error: --size: {exc}", file=sys.stderr)
        return 2
    for path, strength in settings.loras:
        network = pipe.add_lora(path, strength)
        if args.merge:
            network.merge()
    spec = bundle.spec
    if spec.objective == "flow" and spec.distilled_guidance is None and settings.guidance_scale is not None:
        print(f"note: --guidance-scale {settings.guidance_scale:g} is ignored: {spec.title or spec.name} has no "
              "classifier-free or embedded guidance", file=sys.stderr)
    print(f"loaded {settings.model} ({bundle.family}, {str(dtype).replace('torch.', '')}, {device}) "
          f"in {time.perf_counter() - t0:.1f}s" + "".join(f"; LoRA {p.name}:{s:g}" for p, s in settings.loras),
          file=sys.stderr)

    settings.out.mkdir(parents=True, exist_ok=True)
    index = _next_index(settings.out)
    seed = settings.seed
    sample_s, steps_done, job = 0.0, 0, None
    for prompt in settings.prompts:
        remaining = settings.n
        while remaining:
            count = min(settings.batch_size, remaining)
            job = pipe.prepare(prompt, settings.negative, steps=settings.steps,
                               guidance_scale=settings.guidance_scale, seed=seed, width=width, height=height, n=count)
            t1 = time.perf_counter()
            latents = pipe.sample(job, progress=not args.no_progress)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            sample_s += time.perf_counter() - t1
            steps_done += job.steps
            for image, image_seed in zip(pipe.to_images(job, pipe.decode(latents)), job.seeds):
                path = save_png(image, settings.out / f"{index:05d}-{image_seed}.png")
                print(path)
                index += 1
            seed += count
            remaining -= count
    used = f"{job.steps} steps, CFG {job.guidance_scale:g}" if job is not None else ""
    if job is not None and job.distilled_guidance is not None:
        used += f", embedded guidance {job.distilled_guidance:g}"
    if job is not None and job.shift is not None:
        used += f", shift {job.shift}"
    print(f"{settings.n * len(settings.prompts)} image(s), {sample_s / max(steps_done, 1):.3f} s/step "
          f"({width}x{height}, {settings.sampler}, {used}, batch {settings.batch_size})", file=sys.stderr)
    return 0
