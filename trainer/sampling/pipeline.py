"""Text-to-image generation with a `ModelBundle`: prompt encoding, classifier-free guidance,
a native sampler, VAE decoding, and A1111-style PNG metadata.

    bundle = models.build_model("tiny-sdxl", seed=0)
    pipe = Txt2ImgPipeline(bundle, sampler="euler_a")
    images = pipe("a watercolor fox", negative_prompt="blurry", steps=30, guidance_scale=7.0, seed=42, n=2)
    save_png(images[0], "fox.png")          # keeps the `parameters` text chunk

Reproducibility: image k of a call uses seed `seed + k`; its initial noise (and, for Euler a, its
ancestral noise) comes from its own CPU `torch.Generator().manual_seed(seed + k)`, then moves to
the model's device. So an image is reproduced by the seed in its metadata with n=1, and results
do not depend on the device or on the batch it was generated in (up to kernel rounding).

Rectified-flow families (`spec.objective == "flow"`, FLUX.1) sample with `FlowEulerSampler`
(`trainer.sampling.flow`) over the family's time shift (`spec.flow_shift`) and without
classifier-free guidance: a guidance-distilled model (`spec.distilled_guidance`, FLUX.1-dev) gets
`guidance_scale` (default: that value) through its guidance embedding instead; FLUX.1-schnell
has neither, and `guidance_scale` is ignored. `spec.default_steps` sets the steps when none are given.

LoRAs are applied to the bundle by the caller (e.g. `models.load_lora(bundle, path, strength)`,
merged or dynamic) or through `Txt2ImgPipeline.add_lora`; the pipeline only records them for the
metadata.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..schedule import NoiseSchedule
from .flow import FlowEulerSampler
from .samplers import Sampler, get_sampler


@dataclass
class GenerationParams:
    """Settings of one generated image, as written to its PNG `parameters` chunk."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    """Display name, e.g. "Euler a", "DPM++ 2M Karras"."""
    guidance_scale: float
    seed: int
    width: int
    height: int
    model: str
    loras: list[tuple[str, float]] = field(default_factory=list)
    """(name, strength) of every LoRA applied to the model."""
    distilled_guidance: float | None = None
    """Guidance value embedded by a guidance-distilled model (FLUX.1-dev), else None (not written)."""
    shift: str | None = None
    """Time shift of a flow model ("mu 1.15", or "none"), else None (not written)."""

    def infotext(self) -> str:
        """The A1111 `parameters` text: prompt, "Negative prompt: ...", then "Key: value, ..."."""
        fields = [
            ("Steps", self.steps),
            ("Sampler", self.sampler),
            ("CFG scale", f"{self.guidance_scale:g}"),
        ]
        if self.distilled_guidance is not None:  # Forge's name for FLUX.1-dev's embedded guidance
            fields.append(("Distilled CFG Scale", f"{self.distilled_guidance:g}"))
        if self.shift is not None:
            fields.append(("Shift", self.shift))
        fields += [("Seed", self.seed), ("Size", f"{self.width}x{self.height}"), ("Model", self.model)]
        if self.loras:
            fields.append(("LoRAs", ", ".join(f"{name}:{strength:g}" for name, strength in self.loras)))
        fields.append(("Version", "lorasmith"))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in fields))
        return "\n".join(lines)


def _quote(value: str) -> str:
    # A1111's parser splits on ", " and ": "; such values are written as JSON strings.
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write `image` as PNG with a `parameters` tEXt chunk (`parameters` or image.info's)."""
    path = Path(path)
    text = parameters if parameters is not None else image.info.get("parameters")
    info = PngInfo()
    if text:
        info.add_text("parameters", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def latents_to_images(images: torch.Tensor) -> list[Image.Image]:
    """Decoded images (B, 3, H, W) in [-1, 1] -> RGB PIL images (rounded to uint8)."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


@dataclass
class GenerationJob:
    """Everything `Txt2ImgPipeline.sample` needs, built by `prepare`."""

    prompts: list[str]
    negatives: list[str]
    """Negative prompt per prompt ("" when guidance is off)."""
    n: int
    steps: int
    guidance_scale: float
    seeds: list[int]
    """Seed per image (seed + k)."""
    generators: list[torch.Generator]
    """CPU generator per image; after the noise draw they feed ancestral samplers."""
    width: int
    height: int
    sampler: Sampler | FlowEulerSampler
    noise: torch.Tensor
    """(B, C, H/f, W/f) float32 initial noise on the model device."""
    cond: dict[str, torch.Tensor]
    """The family's conditioning tensors (B or 2B rows, [uncond; cond] with guidance) on the model
    device in the denoiser dtype (`ModelBundle.conditioning`)."""
    time_ids: torch.Tensor
    """(B or 2B, 6) float32 size/crop ids in pixels on the model device."""
    distilled_guidance: float | None = None
    """Guidance value a guidance-distilled flow model embeds (FLUX.1-dev), else None."""
    shift: str | None = None
    """Flow families: the time shift used ("mu <value>" or "none"); None for noise-schedule families."""

    @property
    def guidance(self) -> bool:
        return self.guidance_scale > 1.0


class Txt2ImgPipeline:
    """Text-to-image sampling with a `ModelBundle` (SD1.5, SD2, SDXL, FLUX.1 and their tiny variants).

    Args:
        bundle: the model; its denoiser's device and dtype are used for sampling.
        sampler: default sampler name ("euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras";
            flow families: "euler" only).
        timestep_spacing: "leading" (SD/SDXL default), "trailing" (use with zero-terminal-SNR
            models) or "linspace". Not read by flow families.
        zero_terminal_snr: sample with the zero-terminal-SNR schedule the model was trained on.
        prediction_type: override the family's ("epsilon" or "v_prediction"; flow families
            predict velocity whatever this says).
        model_name: name written to metadata (default: the family name).
    """

    def __init__(
        self,
        bundle,
        sampler: str = "euler",
        *,
        timestep_spacing: str = "leading",
        zero_terminal_snr: bool = False,
        prediction_type: str | None = None,
        model_name: str | None = None,
    ) -> None:
        self.bundle = bundle
        self.flow = bundle.spec.objective == "flow"
        self.schedule = NoiseSchedule(zero_terminal_snr=zero_terminal_snr)
        self.timestep_spacing = timestep_spacing
        self.sampler = sampler
        self._make_sampler(sampler)  # validates the name and spacing now
        self.prediction_type = prediction_type or bundle.spec.prediction_type
        self.model_name = model_name or bundle.family
        self.loras: list[tuple[str, float]] = []

    def _make_sampler(self, name: str) -> Sampler | FlowEulerSampler:
        if self.flow:
            spec = self.bundle.spec
            if name.strip().lower() != FlowEulerSampler.name:
                raise ValueError(f"sampler {name!r} is not available for {spec.title or spec.name}: rectified-flow "
                                 f"models sample with {FlowEulerSampler.name!r}")
            return FlowEulerSampler(spec.flow_shift, patch=spec.latent_multiple)
        return get_sampler(name, schedule=self.schedule, timestep_spacing=self.timestep_spacing)

    def add_lora(self, path: str | Path, strength: float = 1.0):
        """Apply a LoRA file to the bundle (`models.load_lora`) and record it; returns its network."""
        from models import load_lora

        network = load_lora(self.bundle, path, strength)
        self.loras.append((Path(path).stem, float(strength)))
        return network

    # ---- geometry -----------------------------------------------------------------------------
    def check_size(self, width: int, height: int) -> None:
        patch = self.bundle.spec.latent_multiple  # the denoiser's latent patch (Flux: 2x2)
        px = 8 * patch
        why = "the VAE works on 8x8 pixel blocks" if patch == 1 else f"8-pixel VAE blocks, {patch}x{patch} latent patches"
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
            if value % px:
                raise ValueError(f"{name}={value} is not a multiple of {px} ({why})")

    # ---- conditioning -------------------------------------------------------------------------
    def encode(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None,
        n: int,
        size: tuple[int, int],
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> tuple[dict, dict | None, torch.Tensor]:
        """Conditioning for len(prompts) * n images (each prompt repeated n times in a row).

        size: (height, width) in pixels. Returns (cond, neg_cond, time_ids): the family's
        conditioning dicts (`ModelBundle.conditioning`, e.g. context (B, 77, D) and SDXL's pooled
        vector), the negative one None without guidance (`negative_prompts` None), and time ids
        (B, 6) float32 = [orig_h, orig_w, crop_top, crop_left, target_h, target_w], original and
        target size defaulting to `size` (read by families with size conditioning).
        """
        bundle = self.bundle
        cond = bundle.conditioning(bundle.tokenize(list(prompts)))
        neg = None if negative_prompts is None else bundle.conditioning(bundle.tokenize(list(negative_prompts)))
        ids = [*(original_size or size), *crop_top_left, *(target_size or size)]
        time_ids = torch.tensor([ids] * (len(prompts) * n), dtype=torch.float32)

        def rep(c):
            return None if c is None else {k: v.repeat_interleave(n, dim=0) for k, v in c.items()}

        return rep(cond), rep(neg), time_ids

    # ---- generation ---------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str],
        *args,
        return_latents: bool = False,
        progress: bool = True,
        callback: Callable[[int, float, torch.Tensor], None] | None = None,
        **kwargs,
    ):
        """Generate len(prompt) * n images (prompt-major order; image k uses seed + k).

        Takes `prepare`'s arguments (negative_prompt, steps, guidance_scale, seed, width, height,
        n, sampler, original_size, crop_top_left, target_size, latents), then:
        callback(i, t, denoised) is called after each step. Returns a list of PIL images (each with
        `info["parameters"]`), or (images, final latents (B, C, H/f, W/f) float32) with
        `return_latents`.
        """
        job = self.prepare(prompt, *args, **kwargs)
        result = self.sample(job, progress=progress, callback=callback)
        images = self.to_images(job, self.decode(result))
        return (images, result) if return_latents else images

    def prepare(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        n: int = 1,
        sampler: str | None = None,
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        latents: torch.Tensor | None = None,
    ) -> GenerationJob:
        """Validate the arguments, encode the prompts and draw the initial noise.

        steps: sampler steps (default: the family's `default_steps`, else 30).
        width/height: pixels (default: the family's resolution), multiples of the VAE factor (8)
            times the denoiser's latent patch (Flux: 16).
        guidance_scale: classifier-free guidance scale (default 7); <= 1 disables it (one denoiser
            pass per step). Flow families: never CFG; a guidance-distilled model embeds this value
            (default: the family's `distilled_guidance`), others ignore it.
        original_size / crop_top_left / target_size: size micro-conditioning as (h, w) / (top, left),
        read by families that take it (SDXL).
        latents: (B, C, H/f, W/f) unit-variance initial noise replacing the seeded draw.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty: give a string or a non-empty list of strings")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (images per prompt) must be a positive integer, got {n!r}")
        spec = self.bundle.spec
        width = spec.resolution if width is None else width
        height = spec.resolution if height is None else height
        self.check_size(width, height)
        if steps is None:
            steps = spec.default_steps or 30
        batch = len(prompts) * n
        f = self.bundle.vae.config.downsample_factor
        latent_shape = (batch, self.bundle.vae.config.z_channels, height // f, width // f)
        sampler_obj = self._make_sampler(sampler or self.sampler)
        distilled, shift = None, None
        if self.flow:
            sampler_obj.plan(steps, latent_shape[-2:])  # validates steps before any work
            mu = sampler_obj.mu(*latent_shape[-2:])
            shift = "none" if mu is None else f"mu {mu:.4g}"
            if spec.distilled_guidance is not None:
                distilled = float(spec.distilled_guidance if guidance_scale is None else guidance_scale)
            guidance_scale = 1.0  # no classifier-free guidance
        else:
            sampler_obj.plan(steps)  # validates steps before any work
            guidance_scale = 7.0 if guidance_scale is None else guidance_scale
        device, dtype = self.bundle.denoiser.device, self.bundle.denoiser.dtype

        seeds = [seed + k for k in range(batch)]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        if latents is None:
            noise = torch.cat([torch.randn((1, *latent_shape[1:]), generator=g) for g in generators])
        else:
            if tuple(latents.shape) != latent_shape:
                raise ValueError(f"latents must have shape {latent_shape} for this call, got {tuple(latents.shape)}")
            noise = latents.float()

        guidance = guidance_scale > 1.0
        with torch.inference_mode():
            cond, neg, time_ids = self.encode(
                prompts, negatives if guidance else None, n, (height, width),
                original_size, crop_top_left, target_size,
            )
            if guidance:  # one batched denoiser call per step: [uncond; cond]
                cond = {k: torch.cat([neg[k], v]) for k, v in cond.items()}
                time_ids = torch.cat([time_ids, time_ids])
        return GenerationJob(
            prompts=prompts, negatives=negatives if guidance else [""] * len(prompts), n=n, steps=steps,
            guidance_scale=guidance_scale, seeds=seeds, generators=generators, width=width, height=height,
            sampler=sampler_obj,
            noise=noise.to(device), cond={k: v.to(device=device, dtype=dtype) for k, v in cond.items()},
            time_ids=time_ids.to(device), distilled_guidance=distilled, shift=shift,
        )

    def sample(
        self,
        job: GenerationJob,
        progress: bool = False,
        callback: Callable[[int, float, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Run the sampler of a prepared job: final latents (B, C, H/f, W/f) float32."""
        bundle, cond, time_ids, scale = self.bundle, job.cond, job.time_ids, job.guidance_scale

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if job.distilled_guidance is not None:  # embedded guidance: one pass, no CFG
                g = torch.full((x.shape[0],), job.distilled_guidance, dtype=torch.float32, device=x.device)
                return bundle.denoise(x, t, cond, time_ids, guidance=g).float()
            if job.guidance:
                out = bundle.denoise(torch.cat([x, x]), torch.cat([t, t]), cond, time_ids).float()
                uncond, positive = out.chunk(2)
                return uncond + scale * (positive - uncond)
            return bundle.denoise(x, t, cond, time_ids).float()

        bar = _progress(job.steps, progress)

        def on_step(i: int, t: float, denoised: torch.Tensor) -> None:
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(i, t, denoised)

        try:
            with torch.inference_mode():
                return job.sampler.sample(
                    denoise, job.noise, job.steps, generator=job.generators,
                    prediction_type=self.prediction_type, callback=on_step,
                )
        finally:
            if bar is not None:
                bar.close()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents (B, C, h, w) -> images (B, 3, f*h, f*w) in ~[-1, 1], float32.

        Undoes the latent scaling and shift first; the VAE's own precision policy
        (`VAEConfig.force_upcast`: the SDXL VAE overflows in fp16) decides the compute dtype."""
        vae = self.bundle.vae
        with torch.inference_mode():
            z = vae.unscale_latents(latents.float()).to(vae.device)
            return vae.decode(z).float()

    def to_images(self, job: GenerationJob, decoded: torch.Tensor) -> list[Image.Image]:
        """PIL images from decoded pixels, each with its A1111 `parameters` text in `info`."""
        images = latents_to_images(decoded)
        for k, image in enumerate(images):
            params = GenerationParams(
                prompt=job.prompts[k // job.n], negative_prompt=job.negatives[k // job.n], steps=job.steps,
                sampler=job.sampler.display_name, guidance_scale=job.guidance_scale, seed=job.seeds[k], width=job.width,
                height=job.height, model=self.model_name, loras=list(self.loras),
                distilled_guidance=job.distilled_guidance, shift=job.shift,
            )
            image.info["parameters"] = params.infotext()
        return images


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but generation must not need it
        return None
    return tqdm(total=total, desc="sampling", unit="step", leave=False)


def benchmark_sampling(
    bundle,
    steps: int = 20,
    *,
    width: int | None = None,
    height: int | None = None,
    batch: int = 1,
    sampler: str = "euler",
    guidance_scale: float = 7.0,
    warmup_steps: int = 2,
) -> dict:
    """Time `steps` sampler steps (UNet with guidance + update) on the bundle's device and dtype.

    Text encoding and VAE decoding are timed separately and excluded from the per-step figure;
    a short run of `warmup_steps` comes first. Returns a dict: s_per_step, steps_per_s, sample_s,
    encode_s, decode_s, steps, batch, width, height, sampler, guidance_scale, device, dtype.
    """
    pipe = Txt2ImgPipeline(bundle, sampler=sampler)
    device = bundle.denoiser.device

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    prompts = ["a photograph of an astronaut riding a horse"] * batch
    kwargs = dict(guidance_scale=guidance_scale, width=width, height=height)
    if warmup_steps:
        pipe.sample(pipe.prepare(prompts, steps=warmup_steps, **kwargs))
    t0 = clock()
    job = pipe.prepare(prompts, steps=steps, **kwargs)
    t1 = clock()
    latents = pipe.sample(job)
    t2 = clock()
    pipe.decode(latents)
    t3 = clock()
    s_per_step = (t2 - t1) / steps
    return {
        "s_per_step": s_per_step,
        "steps_per_s": 1.0 / s_per_step if s_per_step > 0 else math.inf,
        "sample_s": t2 - t1,
        "encode_s": t1 - t0,
        "decode_s": t3 - t2,
        "steps": steps,
        "batch": batch,
        "width": job.width,
        "height": job.height,
        "sampler": sampler,
        "guidance_scale": guidance_scale,
        "device": str(device),
        "dtype": str(bundle.denoiser.dtype).replace("torch.", ""),
    }
