"""Native samplers over the DDPM schedule: Euler, Euler ancestral, DDIM, DPM++ 2M (+ Karras).

All samplers run in the "variance exploding" parametrisation x = x_0 + sigma * noise, with
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (see `trainer.schedule`). The UNet was trained on
x_t = x / sqrt(1 + sigma^2), so that is what `denoise_fn` receives. In this form

- Euler:       x <- x + (sigma_next - sigma) * (x - x0) / sigma
- Euler a:     Euler to sigma_down, then add fresh noise of std sigma_up
- DDIM (eta 0): the same update as Euler; it differs by its timesteps and by ending at
  sigma(t=0) instead of 0 (the reference DDIM with `set_alpha_to_one=False`)
- DPM++ 2M:    the second-order multistep exponential integrator in log-sigma (Lu et al. 2022),
  first-order on the first step and on the step to sigma = 0.

Defaults follow the scheduler configs shipped with SD1.5 / SDXL checkpoints: scaled-linear betas
0.00085..0.012, `timestep_spacing="leading"`, `steps_offset=1`. With these, results equal the
reference EulerDiscrete / EulerAncestralDiscrete / DDIM (`clip_sample=False`,
`set_alpha_to_one=False`) / DPMSolverMultistep (`dpmsolver++`, order 2, optionally
`use_karras_sigmas`) scheduler loops.

Initial latents: `sample()` takes unit-variance Gaussian noise (B, C, H, W) and scales it to the
first noise level itself (the reference `init_noise_sigma`): by sqrt(1 + sigma_max^2) for "leading"
spacing and for DDIM/DPM++ (the noise is x_T of the variance-preserving process), by sigma_max for
Euler samplers with "linspace"/"trailing" spacing (as the reference Euler schedulers do).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..objective import PREDICTION_TYPES, to_device
from ..schedule import NoiseSchedule

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


class DenoiseFn(Protocol):
    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) float32 model input; timesteps: (B,) float32. Returns eps or v, shaped as x."""


Generators = torch.Generator | list[torch.Generator] | None
"""One generator for the whole batch, one per batch element, or None (global RNG)."""

StepCallback = Callable[[int, float, torch.Tensor], None]
"""callback(step_index, timestep, denoised): after each step, with the x0 prediction (B, C, H, W)."""


@dataclass(frozen=True)
class SamplingPlan:
    """Noise levels of one sampling run with n steps."""

    timesteps: torch.Tensor
    """(n,) float64: the model's timestep at each step (fractional for Euler with "linspace" spacing)."""
    sigmas: torch.Tensor
    """(n + 1,) float64: sigma at each step, then the final sigma (0, or sigma(t=0) for DDIM)."""
    init_scale: float
    """Factor applied to unit-variance initial noise before the first step."""


def spaced_timesteps(
    steps: int, spacing: str, steps_offset: int, num_train_timesteps: int, fractional: bool = False
) -> torch.Tensor:
    """`steps` decreasing timesteps (float64) picked from [0, T) as the reference schedulers do.

    leading:  0, r, 2r, ... (r = T // steps) + steps_offset, reversed (SD default: 951 ... 1 for 20)
    linspace: evenly from T-1 down to 0 (rounded unless `fractional`)
    trailing: T-1, T-1-r, ... with r = T / steps
    """
    T = num_train_timesteps
    if spacing == "leading":
        ratio = T // steps
        t = torch.arange(steps, dtype=torch.float64) * ratio + steps_offset
        return t.flip(0)
    if spacing == "linspace":
        t = torch.linspace(0, T - 1, steps, dtype=torch.float64)
        return (t if fractional else t.round()).flip(0)
    if spacing == "trailing":
        ratio = T / steps
        t = torch.arange(T, 0, -ratio, dtype=torch.float64).round() - 1
        return t
    raise ValueError(f"unknown timestep_spacing {spacing!r}; supported: {', '.join(TIMESTEP_SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 noise levels (float64 (steps,)), from sigma_max down to sigma_min, evenly
    spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class Sampler:
    """Base sampler: builds the plan, runs the model, converts its output to x0; subclasses step.

    Args:
        schedule: the training noise schedule (default: SD scaled-linear, 1000 steps).
        timestep_spacing: "leading" (default, SD/SDXL configs), "linspace" or "trailing".
        steps_offset: added to "leading" timesteps (1 for SD/SDXL).
    """

    name = ""
    display_name = ""
    """Name as A1111/ComfyUI users know it (written to PNG metadata)."""
    stochastic = False

    def __init__(
        self, schedule: NoiseSchedule | None = None, timestep_spacing: str = "leading", steps_offset: int = 1
    ) -> None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"unknown timestep_spacing {timestep_spacing!r}; supported: {', '.join(TIMESTEP_SPACINGS)}"
            )
        self.schedule = schedule if schedule is not None else NoiseSchedule()
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset

    def __repr__(self) -> str:
        return f"{type(self).__name__}(timestep_spacing={self.timestep_spacing!r}, steps_offset={self.steps_offset})"

    # ---- plan -------------------------------------------------------------------------------
    def plan(self, steps: int) -> SamplingPlan:
        """Timesteps and sigmas for `steps` model evaluations."""
        T = self.schedule.num_train_timesteps
        if not isinstance(steps, int) or steps < 1 or steps > T:
            raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
        t = spaced_timesteps(steps, self.timestep_spacing, self.steps_offset, T, fractional=True)
        sigmas = self.schedule.sigma_at(t)
        return SamplingPlan(t, torch.cat([sigmas, sigmas.new_zeros(1)]), self._init_scale(sigmas[0].item()))

    def _init_scale(self, sigma_max: float) -> float:
        # Reference Euler schedulers use sigma_max unless spacing is "leading"; everything else
        # treats the initial noise as x_T of the variance-preserving process.
        if self.timestep_spacing == "leading":
            return math.sqrt(sigma_max**2 + 1.0)
        return sigma_max

    # ---- loop -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        denoise_fn: DenoiseFn,
        latents: torch.Tensor,
        steps: int,
        generator: Generators = None,
        prediction_type: str = "epsilon",
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Integrate from noise to a clean latent.

        denoise_fn(x, t): model output (eps or v, per `prediction_type`) for model input x
            (B, C, H, W) float32 and timesteps t (B,) float32; classifier-free guidance goes inside.
        latents: (B, C, H, W) unit-variance Gaussian noise; scaled here by `plan.init_scale`.
        generator: source of the ancestral noise (Euler a): one generator, or one per sample.
        callback(i, t, denoised): called after each step with the current x0 prediction.
        Returns (B, C, H, W) float32 clean latents (still multiplied by the VAE scaling factor).
        """
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
        plan = self.plan(steps)
        sigmas = plan.sigmas.tolist()
        x = latents.float() * plan.init_scale
        state: dict = {}
        for i, t in enumerate(plan.timesteps.tolist()):
            sigma = sigmas[i]
            model_in = x / math.sqrt(sigma**2 + 1.0)
            t_batch = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
            out = denoise_fn(model_in, t_batch).float()
            if out.shape != x.shape:
                raise ValueError(f"denoise_fn returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
            denoised = self._to_x0(out, x, sigma, prediction_type)
            x = self.step(i, x, denoised, sigmas, generator, state)
            if callback is not None:
                callback(i, t, denoised)
        return x / math.sqrt(sigmas[-1] ** 2 + 1.0)

    @staticmethod
    def _to_x0(out: torch.Tensor, x: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
        """x0 prediction from the model output at noise level sigma (x in VE form)."""
        if prediction_type == "epsilon":
            return x - sigma * out
        # v = sqrt(ab) * eps - sqrt(1 - ab) * x0 with x_vp = x / sqrt(1 + sigma^2)
        return x / (sigma**2 + 1.0) - out * (sigma / math.sqrt(sigma**2 + 1.0))

    def step(
        self,
        i: int,
        x: torch.Tensor,
        denoised: torch.Tensor,
        sigmas: list[float],
        generator: Generators,
        state: dict,
    ) -> torch.Tensor:
        """x at sigmas[i + 1] from x and the x0 prediction at sigmas[i]. `state` persists across steps."""
        raise NotImplementedError


class EulerSampler(Sampler):
    """First-order Euler on the probability-flow ODE (reference: EulerDiscreteScheduler)."""

    name, display_name = "euler", "Euler"

    def step(self, i, x, denoised, sigmas, generator, state):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        return x + (x - denoised) * ((sigma_next - sigma) / sigma)


def gaussian_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Unit Gaussian noise shaped like x (float32, on x's device), drawn on the generator's device
    and moved, so a CPU generator gives the same numbers whatever device x is on. A list of
    generators (one per batch element) draws each sample's noise from its own generator."""
    return ancestral_noise(x, generator, 1)[0]


def ancestral_noise(x: torch.Tensor, generator: Generators, count: int) -> torch.Tensor:
    """`count` unit Gaussian draws shaped like x: (count, *x.shape) float32 on x's device.

    Draw j is the j-th `torch.randn(x.shape, generator=...)` of the generator (for a list, the
    j-th (1, ...) draw of each sample's own generator), on the generator's device. Noise drawn
    elsewhere crosses to x's device in one pinned, non-blocking copy, instead of one blocking
    copy per sampler step.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        parts = [_draws((1, *x.shape[1:]), g, x.device, count) for g in generator]
        if len({p.device for p in parts}) > 1:
            parts = [to_device(p, x.device) for p in parts]
        return to_device(torch.cat(parts, dim=1), x.device)
    return to_device(_draws(tuple(x.shape), generator, x.device, count), x.device)


def _draws(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, count: int):
    """(count, *shape) float32 on the generator's device (`device` without a generator)."""
    device = generator.device if generator is not None else device
    # One draw per step, not one big draw: CPU randn of n values is not the concatenation of
    # smaller draws, and each step must see exactly the numbers the reference scheduler draws.
    return torch.stack([torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                        for _ in range(count)])


class EulerAncestralSampler(Sampler):
    """Euler to sigma_down plus fresh noise of std sigma_up (reference: EulerAncestralDiscreteScheduler).

    The noise of every step with sigma_up > 0 is drawn before the first one (`ancestral_noise`):
    the same draws, in the same order, as the reference scheduler's `step` with the same
    generator(s), moved to the latents' device once per run.
    """

    name, display_name = "euler_a", "Euler a"
    stochastic = True

    @staticmethod
    def _sigma_up(sigma: float, sigma_next: float) -> float:
        return math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)

    def step(self, i, x, denoised, sigmas, generator, state):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = self._sigma_up(sigma, sigma_next)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = x + (x - denoised) * ((sigma_down - sigma) / sigma)
        if sigma_up == 0.0:
            return x
        if "noise" not in state:
            # Steps i..n-1 that add noise, in order; the generator(s) serve nothing else meanwhile.
            noisy = [j for j in range(i, len(sigmas) - 1) if self._sigma_up(sigmas[j], sigmas[j + 1]) != 0.0]
            state["noise"] = dict(zip(noisy, ancestral_noise(x, generator, len(noisy))))
        return x + state["noise"].pop(i) * sigma_up


class DDIMSampler(EulerSampler):
    """Deterministic DDIM (eta = 0). Timesteps are integers; the last step lands on sigma(t=0),
    i.e. alpha_bar_prev = alpha_bar[0] (reference: DDIMScheduler with set_alpha_to_one=False).
    Each step goes to the next listed timestep (the reference uses t - T // steps, which is the
    same for "leading" spacing and whenever steps divides T)."""

    name, display_name = "ddim", "DDIM"

    def plan(self, steps: int) -> SamplingPlan:
        super().plan(steps)  # validates steps
        t = spaced_timesteps(steps, self.timestep_spacing, self.steps_offset, self.schedule.num_train_timesteps)
        sigmas = self.schedule.sigma_at(t)
        final = self.schedule.sigmas64[:1]
        return SamplingPlan(t, torch.cat([sigmas, final]), math.sqrt(sigmas[0].item() ** 2 + 1.0))


class DPMPP2MSampler(Sampler):
    """DPM-Solver++(2M): second-order multistep in lambda = -log(sigma) (reference:
    DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2, final sigma 0).

    Timesteps: integers; spacing uses steps + 1 points with the last (t=0) dropped, as the
    reference does. `karras=True` uses Karras sigmas between the schedule's extremes, with the
    model's timestep the rounded log-sigma interpolated t.
    """

    name, display_name = "dpmpp_2m", "DPM++ 2M"

    def __init__(self, schedule=None, timestep_spacing="leading", steps_offset=1, karras: bool = False):
        super().__init__(schedule, timestep_spacing, steps_offset)
        self.karras = karras
        if karras:
            self.name, self.display_name = "dpmpp_2m_karras", "DPM++ 2M Karras"

    def plan(self, steps: int) -> SamplingPlan:
        super().plan(steps)  # validates steps
        sched = self.schedule
        T = sched.num_train_timesteps
        if self.karras:
            sigmas = karras_sigmas(sched.sigmas64[0].item(), sched.sigmas64[-1].item(), steps)
            t = sched.sigma_to_t(sigmas).round()
        else:
            if self.timestep_spacing == "leading":
                ratio = T // (steps + 1)
                t = (torch.arange(steps + 1, dtype=torch.float64) * ratio).flip(0)[:-1] + self.steps_offset
            elif self.timestep_spacing == "linspace":
                t = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
            else:
                t = spaced_timesteps(steps, "trailing", self.steps_offset, T)
            sigmas = sched.sigma_at(t)
        return SamplingPlan(t, torch.cat([sigmas, sigmas.new_zeros(1)]), math.sqrt(sigmas[0].item() ** 2 + 1.0))

    def step(self, i, x, denoised, sigmas, generator, state):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        prev = state.get("prev")
        state["prev"] = (denoised, sigma)
        if sigma_next == 0.0:
            return denoised  # the exponential integrator's limit at sigma = 0
        h = math.log(sigma) - math.log(sigma_next)
        if prev is None:
            d = denoised
        else:
            old_denoised, old_sigma = prev
            r = (math.log(old_sigma) - math.log(sigma)) / h
            d = denoised + (denoised - old_denoised) * (0.5 / r)
        return x * (sigma_next / sigma) - d * math.expm1(-h)


_SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "ddim": DDIMSampler,
    "dpmpp_2m": DPMPP2MSampler,
    "dpmpp_2m_karras": lambda **kw: DPMPP2MSampler(karras=True, **kw),
}
SAMPLER_NAMES = tuple(_SAMPLERS)


def get_sampler(
    name: str, schedule: NoiseSchedule | None = None, timestep_spacing: str = "leading", steps_offset: int = 1
) -> Sampler:
    """A sampler by name: "euler", "euler_a", "ddim", "dpmpp_2m" or "dpmpp_2m_karras"."""
    key = name.strip().lower().replace("-", "_").replace("++", "pp").replace(" ", "_")
    if key not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; supported: {', '.join(SAMPLER_NAMES)}")
    return _SAMPLERS[key](schedule=schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
