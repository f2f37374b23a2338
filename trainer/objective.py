"""The denoising objective: noise, timesteps, targets and the weighted MSE loss.

Everything here is float32 whatever the model dtype: noise is drawn in fp32, the noisy input and
the target come from `NoiseSchedule` in fp32, and the loss upcasts the prediction before
subtracting. The model input is cast to the model dtype by the caller.

Noise and timesteps are drawn per *sample* from a generator seeded by (run seed, global sample
index). A sample therefore gets the same noise however the global batch is split across
processes or gradient-accumulation micro-batches, and resuming needs no generator state.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .schedule import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction")
_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, index) pairs over the seed space


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move a CPU tensor to `device`; to CUDA through pinned memory without blocking the host,
    so drawing noise on the CPU does not stall the queue of GPU work."""
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def sample_seed(seed: int, index: int) -> int:
    """Generator seed of global sample `index` in a run seeded with `seed` (a 63-bit integer)."""
    return ((seed + 1) * _SEED_MIX + index * 0xBF58476D1CE4E5B9) % (2**63)


class DiffusionObjective:
    """Noise + timestep sampling, training targets and min-SNR-weighted MSE.

    Args:
        schedule: the training `NoiseSchedule` (zero-terminal-SNR already applied if wanted).
        prediction_type: "epsilon" (target = noise) or "v_prediction" (target = velocity).
        noise_offset: std of an extra per-sample, per-channel constant added to the noise
            (helps very dark/bright images); 0 disables it.
        min_snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023); None disables it.
        timestep_min, timestep_max: timesteps are drawn uniformly from the integers in [min, max).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        *,
        noise_offset: float = 0.0,
        min_snr_gamma: float | None = None,
        timestep_min: int = 0,
        timestep_max: int = 1000,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if not 0 <= timestep_min < timestep_max <= schedule.num_train_timesteps:
            raise ValueError(
                f"need 0 <= timestep_min < timestep_max <= {schedule.num_train_timesteps}, "
                f"got [{timestep_min}, {timestep_max})"
            )
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.noise_offset = float(noise_offset)
        self.min_snr_gamma = min_snr_gamma
        self.timestep_min = timestep_min
        self.timestep_max = timestep_max

    # ---- sampling -------------------------------------------------------------------------
    def sample(
        self, latent_shape: Sequence[int], indices: Sequence[int], seed: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps for a batch of samples.

        latent_shape: (C, H, W) of one latent; indices: global sample indices (len B), one per
        batch row. Returns noise (B, C, H, W) float32 and timesteps (B,) int64, both on `device`.
        Drawn on CPU so results do not depend on the device's RNG implementation.
        """
        c, h, w = latent_shape
        noises, steps = [], []
        gen = torch.Generator()
        for index in indices:
            gen.manual_seed(sample_seed(seed, int(index)))
            t = torch.randint(self.timestep_min, self.timestep_max, (1,), generator=gen)
            noise = torch.randn((c, h, w), generator=gen, dtype=torch.float32)
            if self.noise_offset:
                noise = noise + self.noise_offset * torch.randn((c, 1, 1), generator=gen, dtype=torch.float32)
            noises.append(noise)
            steps.append(t)
        noise = to_device(torch.stack(noises), device)
        timesteps = to_device(torch.cat(steps), device)
        return noise, timesteps

    # ---- targets and loss -------------------------------------------------------------------
    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t and the regression target, both float32 (B, C, H, W).

        latents: scaled clean latents x_0; noise: (B, C, H, W) fp32; timesteps: (B,) int64.
        """
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        target = self.schedule.training_target(latents, noise, timesteps, self.prediction_type)
        return noisy, target

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights (B,) float32 for Min-SNR-gamma, or None without it.

        epsilon: min(snr, gamma) / snr, written as 1 where snr < gamma so snr = 0 (zero-terminal
        SNR) gives its limit 1 rather than 0/0. v_prediction: min(snr, gamma) / (snr + 1).
        """
        if self.min_snr_gamma is None:
            return None
        snr = self.schedule.snr(timesteps)
        gamma = torch.full_like(snr, float(self.min_snr_gamma))
        if self.prediction_type == "epsilon":
            return torch.where(snr < gamma, torch.ones_like(snr), gamma / snr.clamp(min=1e-20))
        return torch.minimum(snr, gamma) / (snr + 1.0)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Weighted MSE, a float32 scalar: mean over batch of w_b * mean_{c,h,w}(pred - target)^2.

        pred: model output (B, C, H, W) in any dtype (upcast here); target: float32, same shape.
        """
        return self.per_sample_loss(pred, target, timesteps).mean()

    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Unreduced version of `loss`: (B,) float32."""
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        weights = self.weights(timesteps)
        return per_sample if weights is None else per_sample * weights.to(per_sample.device)
