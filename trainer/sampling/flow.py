"""The reference rectified-flow sampler of FLUX.1: BFL's time schedule and Euler steps on the velocity.

The model predicts the velocity v = noise - x0 of x_t = (1 - t) x0 + t noise, so the flow ODE
dx/dt = v is integrated from t = 1 (pure noise) to t = 0:

    x <- x + (t_next - t) * v(x, t)

over BFL's schedule (`flux.sampling.get_schedule`): t = linspace(1, 0, steps + 1), then, for
models trained with the resolution-dependent shift (FLUX.1-dev; not schnell),
t <- e^mu / (e^mu + 1/t - 1) with mu linear in the image token count (`trainer.flow.shift_mu`).
This equals diffusers' FluxPipeline with FlowMatchEulerDiscreteScheduler (dynamic shifting, mu
from `calculate_shift`) up to float32 rounding.

Initial latents are unit Gaussian noise used as is (t = 1 is pure noise: no scaling). The
sampler is deterministic; guidance (the embedded guidance value of a guidance-distilled model)
goes inside `denoise_fn`.
"""
from __future__ import annotations

import torch

from ..flow import image_seq_len, shift_mu, time_shift
from .samplers import DenoiseFn, Generators, StepCallback


def flow_timesteps(steps: int, image_seq_len: int, shift: tuple[float, float] | None) -> torch.Tensor:
    """The `steps + 1` times (float64, 1 down to 0) of a run over `image_seq_len` image tokens.

    shift: (base_shift, max_shift) of the resolution-dependent shift, or None for the plain
    linspace (FLUX.1-schnell)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift is not None:
        t = time_shift(shift_mu(image_seq_len, *shift), t)
    return t


class FlowEulerSampler:
    """Euler steps on the velocity over `flow_timesteps` (module docstring).

    Args:
        shift: (base_shift, max_shift) of the resolution-dependent shift, or None.
        patch: latent patch side of one image token (FLUX.1: 2), for the token count.
    """

    name, display_name = "euler", "Euler"
    stochastic = False

    def __init__(self, shift: tuple[float, float] | None = None, patch: int = 2) -> None:
        self.shift = None if shift is None else (float(shift[0]), float(shift[1]))
        self.patch = patch

    def __repr__(self) -> str:
        return f"FlowEulerSampler(shift={self.shift})"

    def mu(self, height: int, width: int) -> float | None:
        """mu of the shift for (height, width) latents, None without shift."""
        if self.shift is None:
            return None
        return shift_mu(image_seq_len(height, width, self.patch), *self.shift)

    def plan(self, steps: int, latent_size: tuple[int, int]) -> torch.Tensor:
        """Times (steps + 1,) float64 for latents of (height, width) `latent_size`."""
        h, w = latent_size
        return flow_timesteps(steps, image_seq_len(h, w, self.patch), self.shift)

    @torch.no_grad()
    def sample(
        self,
        denoise_fn: DenoiseFn,
        latents: torch.Tensor,
        steps: int,
        generator: Generators = None,
        prediction_type: str | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Integrate from noise (t = 1) to a clean latent (t = 0).

        denoise_fn(x, t): velocity (B, C, H, W) for x (B, C, H, W) float32 at times t (B,) float32
            in [0, 1].
        latents: (B, C, H, W) unit-variance Gaussian noise (the state at t = 1).
        generator, prediction_type: unused (deterministic sampler; the model predicts velocity),
            accepted for the interface of `trainer.sampling.samplers.Sampler.sample`.
        callback(i, t, denoised): after each step, with the x0 prediction x - t v.
        Returns (B, C, H, W) float32 clean latents (still scaled and shifted as the VAE's latents).
        """
        times = self.plan(steps, tuple(latents.shape[-2:])).tolist()
        x = latents.float()
        for i in range(steps):
            t, t_next = times[i], times[i + 1]
            t_batch = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
            v = denoise_fn(x, t_batch).float()
            if v.shape != x.shape:
                raise ValueError(f"denoise_fn returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
            denoised = x - t * v if callback is not None else None
            x = x + (t_next - t) * v
            if callback is not None:
                callback(i, t, denoised)
        return x
