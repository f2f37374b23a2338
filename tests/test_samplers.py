"""Native samplers against the reference scheduler loops, driven by the same toy model.

The toy model is a small random conv net whose output depends on x and (non-linearly) on the
timestep, so a wrong timestep, sigma, input scaling or update rule changes the result.
Reference configs are those shipped with SD1.5/SDXL checkpoints (scaled-linear 0.00085..0.012,
leading spacing, steps_offset 1; DDIM with clip_sample=False, set_alpha_to_one=False).
"""
import pytest
import torch
from torch import nn

from trainer.sampling.samplers import SAMPLER_NAMES, get_sampler, karras_sigmas, spaced_timesteps
from trainer.schedule import NoiseSchedule

SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
)



def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class ToyModel(nn.Module):
    """out = conv2(silu(conv1(x) * (1 + 0.5 sin(t / 97)))) + 0.1 x cos(t / 311); deterministic."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.timesteps_seen = []

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        self.timesteps_seen.append(float(t[0]))
        t = t.expand(x.shape[0]).reshape(-1, 1, 1, 1)
        h = self.conv1(x) * (1 + 0.5 * torch.sin(t / 97.0))
        return self.conv2(torch.nn.functional.silu(h)) + 0.1 * x * torch.cos(t / 311.0)


def _reference_scheduler(name, prediction_type, **overrides):
    import diffusers

    cfg = dict(SD_CONFIG, prediction_type=prediction_type, **overrides)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**cfg)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**cfg)
    if name == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **cfg)
    return diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=name == "dpmpp_2m_karras", **cfg
    )


def _reference_loop(scheduler, model, noise, steps, generator=None):
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    kwargs = {"generator": generator} if generator is not None else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_matches_reference_loop(name, steps, prediction_type):
    model = ToyModel()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    stochastic = name == "euler_a"
    ref = _reference_loop(
        _reference_scheduler(name, prediction_type),
        model,
        noise,
        steps,
        generator=torch.Generator().manual_seed(11) if stochastic else None,
    )
    ref_timesteps = list(model.timesteps_seen)
    model.timesteps_seen.clear()

    seen = []
    ours = get_sampler(name).sample(
        model,
        noise,
        steps,
        generator=torch.Generator().manual_seed(11) if stochastic else None,
        prediction_type=prediction_type,
        callback=lambda i, t, x0: seen.append((i, t, x0.shape)),
    )
    assert ours.dtype == torch.float32 and ours.shape == noise.shape
    assert model.timesteps_seen == ref_timesteps
    assert [s[0] for s in seen] == list(range(steps))
    assert rel(ours, ref) < 1e-5, name


# Not DDIM + linspace: the reference DDIM steps from t to t - T // steps, which is not the next
# linspace timestep; ours steps to the next listed timestep (see DDIMSampler).
@pytest.mark.parametrize(
    "name,spacing",
    [
        ("euler", "linspace"),
        ("euler", "trailing"),
        ("ddim", "trailing"),
        ("dpmpp_2m", "linspace"),
        ("dpmpp_2m", "trailing"),
    ],
)
def test_other_spacings_match_reference(name, spacing):
    model = ToyModel()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _reference_loop(_reference_scheduler(name, "epsilon", timestep_spacing=spacing), model, noise, 20)
    ours = get_sampler(name, timestep_spacing=spacing).sample(model, noise, 20)
    assert rel(ours, ref) < 1e-5


def test_zero_terminal_snr_v_prediction_matches_reference():
    # Trailing spacing starts at t=999 where a zero-SNR schedule has sigma = 4096 (clamped alpha_bar).
    model = ToyModel()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ref_sched = _reference_scheduler("euler", "v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    ref = _reference_loop(ref_sched, model, noise, 15)
    sampler = get_sampler("euler", schedule=NoiseSchedule(zero_terminal_snr=True), timestep_spacing="trailing")
    ours = sampler.sample(model, noise, 15, prediction_type="v_prediction")
    assert rel(ours, ref) < 1e-5


def test_euler_a_noise_comes_from_generator():
    model = ToyModel()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = get_sampler("euler_a")
    a = sampler.sample(model, noise, 8, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(model, noise, 8, generator=torch.Generator().manual_seed(1))
    c = sampler.sample(model, noise, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and rel(a, c) > 1e-3


def test_plans_are_the_documented_ones():
    assert spaced_timesteps(20, "leading", 1, 1000).tolist() == list(range(951, 0, -50))
    plan = get_sampler("dpmpp_2m").plan(30)
    assert plan.timesteps[0] == 961 and plan.timesteps[-1] == 33 and plan.sigmas[-1] == 0
    ddim = get_sampler("ddim").plan(10)
    assert ddim.sigmas[-1] == NoiseSchedule().sigmas64[0]  # ends at alpha_bar[0], not at sigma 0
    k = get_sampler("dpmpp_2m_karras").plan(12)
    assert torch.allclose(k.sigmas[:-1], karras_sigmas(0.029167, 14.614642, 12), rtol=1e-4)
    assert get_sampler("DPM++ 2M Karras").display_name == "DPM++ 2M Karras"


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*euler"):
        get_sampler("heun")
    with pytest.raises(ValueError, match="timestep_spacing"):
        get_sampler("euler", timestep_spacing="even")
    with pytest.raises(ValueError, match="steps"):
        get_sampler("euler").plan(0)
    with pytest.raises(ValueError, match="prediction_type"):
        get_sampler("euler").sample(ToyModel(), torch.randn(1, 4, 8, 8), 4, prediction_type="sample")


def test_per_sample_generators_reproduce_single_sample_runs():
    # A batch with one generator per sample equals running each sample alone with its generator.
    model = ToyModel()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = get_sampler("euler_a")
    both = sampler.sample(model, noise, 6, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    second = sampler.sample(model, noise[1:], 6, generator=torch.Generator().manual_seed(6))
    assert rel(both[1:], second) < 1e-6
