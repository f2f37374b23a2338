"""Rectified-flow sampling: BFL's schedule (written out here) and diffusers' FlowMatchEulerDiscrete
loop as oracles, an exact stand-in velocity field, and whole runs through `Txt2ImgPipeline` on
the tiny FLUX family (dev-like, with guidance embedding) and a schnell-like variant of it."""
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from trainer.sampling.flow import FlowEulerSampler, flow_timesteps

SHIFT = (0.5, 1.15)


# ---- BFL's flux/sampling.py, written out ----------------------------------------------------------
def bfl_time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def bfl_get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15):
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def bfl_get_schedule(num_steps, image_seq_len, base_shift=0.5, max_shift=1.15, shift=True):
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = bfl_get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = bfl_time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 6144])
def test_schedule_matches_bfl(steps, seq_len):
    ours = flow_timesteps(steps, seq_len, SHIFT)
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float64
    assert np.allclose(ours.numpy(), bfl_get_schedule(steps, seq_len), atol=1e-6, rtol=0)
    plain = flow_timesteps(steps, seq_len, None)
    assert np.allclose(plain.numpy(), bfl_get_schedule(steps, seq_len, shift=False), atol=1e-6, rtol=0)
    custom = flow_timesteps(steps, seq_len, (0.2, 2.0))
    assert np.allclose(custom.numpy(), bfl_get_schedule(steps, seq_len, 0.2, 2.0), atol=1e-6, rtol=0)


def test_shift_moves_times_towards_noise_with_resolution():
    plain = flow_timesteps(10, 1024, None)
    small, large = flow_timesteps(10, 256, SHIFT), flow_timesteps(10, 4096, SHIFT)
    inner = slice(1, -1)
    assert bool((small[inner] > plain[inner]).all()) and bool((large[inner] > small[inner]).all())
    for t in (plain, small, large):
        assert t[0] == 1 and t[-1] == 0 and bool((t[1:] < t[:-1]).all())
    with pytest.raises(ValueError, match="steps"):
        flow_timesteps(0, 256, SHIFT)


# ---- diffusers' FluxPipeline scheduler loop -----------------------------------------------------
def _reference_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if shift is None:  # FLUX.1-schnell's scheduler config
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=shift[0], max_shift=shift[1],
        base_image_seq_len=256, max_image_seq_len=4096)


def _set_reference_timesteps(sched, steps, seq_len, shift):
    """As FluxPipeline.__call__ does: sigmas linspace(1, 1/steps), mu from `calculate_shift`."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = None if shift is None else calculate_shift(seq_len, 256, 4096, shift[0], shift[1])
    sched.set_timesteps(sigmas=sigmas, mu=mu)


@pytest.mark.parametrize("shift", [SHIFT, None], ids=["dev", "schnell"])
@pytest.mark.parametrize("steps, seq_len", [(4, 256), (28, 1024), (50, 4096), (20, 3600)])
def test_schedule_matches_diffusers(shift, steps, seq_len):
    sched = _reference_scheduler(shift)
    _set_reference_timesteps(sched, steps, seq_len, shift)
    ours = flow_timesteps(steps, seq_len, shift)
    assert torch.allclose(ours.float(), sched.sigmas, atol=1e-6, rtol=0)


class ToyVelocity(torch.nn.Module):
    """v = conv(x) * (1 + 0.5 sin(3 t)) + 0.2 x cos(2 t): depends on x and non-linearly on t."""

    def __init__(self, channels=16):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def forward(self, x, t):
        t = t.float().view(-1, 1, 1, 1)
        return self.conv(x) * (1 + 0.5 * torch.sin(3 * t)) + 0.2 * x * torch.cos(2 * t)


@pytest.mark.parametrize("shift", [SHIFT, None], ids=["dev", "schnell"])
@pytest.mark.parametrize("steps, hw", [(4, (32, 32)), (9, (48, 64))])
def test_euler_loop_matches_diffusers(shift, steps, hw):
    model = ToyVelocity()
    noise = torch.randn(2, 16, *hw, generator=torch.Generator().manual_seed(5))
    seen = []

    def denoise(x, t):
        seen.append(t)
        return model(x, t)

    with torch.no_grad():
        ours = FlowEulerSampler(shift).sample(denoise, noise, steps)
        sched = _reference_scheduler(shift)
        _set_reference_timesteps(sched, steps, (hw[0] // 2) * (hw[1] // 2), shift)
        x = noise.clone()
        for t in sched.timesteps:  # FluxPipeline feeds the transformer t / 1000
            x = sched.step(model(x, (t / 1000).expand(x.shape[0])), t, x).prev_sample
    assert len(seen) == steps and all(s.shape == (2,) and s.dtype == torch.float32 for s in seen)
    assert (ours - x).abs().max().item() <= 1e-6


def test_exact_velocity_lands_on_the_data_point():
    """For data concentrated at one latent x*, the true velocity is (x - x*) / t: Euler then follows
    the straight path exactly, every x0 prediction is x*, and the run ends at x*."""
    g = torch.Generator().manual_seed(3)
    target, noise = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 16, 8, 12, generator=g)
    steps = 6
    times = flow_timesteps(steps, 24, SHIFT).tolist()
    calls, denoised = [], []

    def velocity(x, t):
        calls.append(t[0].item())
        return (x - target) / t.view(-1, 1, 1, 1)

    out = FlowEulerSampler(SHIFT).sample(velocity, noise, steps, callback=lambda i, t, d: denoised.append((i, t, d)))
    assert calls == pytest.approx(times[:-1], abs=1e-7)
    assert [(i, t) for i, t, _ in denoised] == [(i, times[i]) for i in range(steps)]
    assert all(torch.allclose(d, target, atol=1e-5) for _, _, d in denoised)
    assert torch.allclose(out, target, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        FlowEulerSampler().sample(lambda x, t: x[:, :4], noise, 2)


# ---- the pipeline on the tiny FLUX family -------------------------------------------------------
@pytest.fixture(scope="module")
def dev():
    import models

    return models.build_model("tiny-flux", seed=0)


@pytest.fixture(scope="module")
def schnell(dev):
    """tiny-flux as schnell is built: no guidance embedding, no time shift, 4 default steps."""
    import models
    from models.bundle import ModelBundle
    from models.flux import FluxTransformer

    spec = dataclasses.replace(dev.spec, name="tiny-flux-schnell", distilled_guidance=None, flow_shift=None,
                               default_steps=4)
    config = dataclasses.replace(dev.denoiser.config, guidance_embed=False)
    torch.manual_seed(1)
    denoiser = FluxTransformer(config)
    base = models.build_model("tiny-flux", seed=0)
    return ModelBundle("tiny-flux", denoiser=denoiser, vae=base.vae, text_encoders=base.text_encoders,
                       tokenizers=base.tokenizers, spec=spec)


def _record_denoise(bundle):
    """Record (batch, t, guidance) of every transformer call; returns (calls, hook handle)."""
    calls = []

    def hook(module, args):  # forward(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        guidance = args[6] if len(args) > 6 else None
        calls.append((args[0].shape[0], args[4].clone(), None if guidance is None else guidance.clone()))

    return calls, bundle.denoiser.register_forward_pre_hook(hook)


def test_pipeline_matches_the_reference_denoise_loop(dev):
    """BFL's `denoise` loop (one transformer pass per step with the guidance vector) on our bundle."""
    from trainer.sampling.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline(dev)
    noise = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(2))
    job = pipe.prepare("a fox", steps=5, guidance_scale=4.0, width=32, height=48, latents=noise)
    ours = pipe.sample(job)
    with torch.no_grad():
        cond = dev.conditioning(dev.tokenize(["a fox"]))
        timesteps = bfl_get_schedule(5, 3 * 2)
        img, guidance = noise.clone(), torch.full((1,), 4.0)
        for t_curr, t_prev in itertools.pairwise(timesteps):
            pred = dev.denoise(img, torch.full((1,), t_curr), cond, guidance=guidance)
            img = img + (t_prev - t_curr) * pred
    assert (ours - img).abs().max().item() < 1e-5


def test_dev_embeds_guidance_without_cfg(dev):
    from trainer.sampling.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline(dev)
    calls, handle = _record_denoise(dev)
    try:
        job = pipe.prepare("a fox", "blurry", seed=4, n=2)
        default = pipe.sample(job)
        explicit = pipe.sample(pipe.prepare("a fox", "blurry", seed=4, n=2, guidance_scale=3.5))
        other = pipe.sample(pipe.prepare("a fox", "blurry", seed=4, n=2, guidance_scale=1.0))
    finally:
        handle.remove()
    assert job.steps == dev.spec.default_steps and job.guidance_scale == 1.0 and not job.guidance
    assert job.distilled_guidance == 3.5 and job.negatives == [""] and job.noise.shape == (2, 16, 8, 8)
    assert len(calls) == 3 * job.steps and all(b == 2 for b, _, _ in calls)  # one pass per step: no CFG
    assert torch.equal(calls[0][2], torch.full((2,), 3.5)) and torch.equal(calls[-1][2], torch.full((2,), 1.0))
    expected_t = flow_timesteps(job.steps, 16, dev.spec.flow_shift)[:-1].float()
    assert torch.equal(torch.stack([t[0] for _, t, _ in calls[: job.steps]]), expected_t)
    assert torch.equal(default, explicit) and (default - other).abs().max() > 1e-4
    info = pipe.to_images(job, pipe.decode(default))[0].info["parameters"]
    mu = (0.5 + (16 - 256) * 0.65 / 3840)
    assert f"Steps: {job.steps}, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Shift: mu {mu:.4g}," in info
    assert "Negative prompt" not in info


def test_seeded_images_are_reproducible_alone_or_in_a_batch(dev):
    from trainer.sampling.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline(dev)
    batch = pipe.sample(pipe.prepare(["a cat", "a dog"], seed=10, n=2, steps=3))
    again = pipe.sample(pipe.prepare(["a cat", "a dog"], seed=10, n=2, steps=3))
    alone = pipe.sample(pipe.prepare("a dog", seed=13, steps=3))
    assert torch.equal(batch, again)
    assert torch.allclose(batch[3:], alone, atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # seed + k differs per image


def test_schnell_samples_four_steps_without_guidance(schnell):
    from trainer.sampling.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline(schnell)
    calls, handle = _record_denoise(schnell)
    try:
        job = pipe.prepare("a fox", "blurry", seed=1, guidance_scale=7.0)
        out = pipe.sample(job)
    finally:
        handle.remove()
    assert job.steps == 4 and job.distilled_guidance is None and job.guidance_scale == 1.0
    assert len(calls) == 4 and all(b == 1 and g is None for b, _, g in calls)
    assert [t[0].item() for _, t, _ in calls] == [1.0, 0.75, 0.5, 0.25]
    assert torch.isfinite(out).all()
    info = pipe.to_images(job, pipe.decode(out))[0].info["parameters"]
    assert "Steps: 4, Sampler: Euler, CFG scale: 1, Shift: none, Seed: 1" in info and "Distilled" not in info


def test_decode_undoes_the_flux_latent_scale_and_shift(dev):
    from trainer.sampling.pipeline import Txt2ImgPipeline

    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    cfg = dev.vae.config
    assert cfg.shift_factor is not None and cfg.shift_factor != 0
    with torch.no_grad():
        expected = dev.vae.decode(z / cfg.scaling_factor + cfg.shift_factor)
    assert torch.allclose(Txt2ImgPipeline(dev).decode(z), expected, atol=1e-6)


def test_flow_pipeline_errors(dev):
    from trainer.sampling.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline(dev)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.prepare("x", width=40, height=64)
    with pytest.raises(ValueError, match="not available .* rectified-flow"):
        Txt2ImgPipeline(dev, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="not available"):
        pipe.prepare("x", sampler="euler_a")
    with pytest.raises(ValueError, match="steps"):
        pipe.prepare("x", steps=0)
