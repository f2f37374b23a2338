"""The rectified-flow (flow matching) objective of FLUX.1-style families: noise, times, targets, loss.

With clean latents x0, Gaussian noise eps and a time t in (0, 1) (t = 1 is pure noise):

    x_t = (1 - t) x0 + t eps          target (velocity) v = eps - x0

and the denoiser regresses v. `FlowMatchingObjective` has the interface of `DiffusionObjective`
(`draw`, `sample`, `noisy_and_target`, `weights`, `loss`, `per_sample_loss`), so the training
loop and the validation loss use either; timesteps are float32 t in (0, 1) instead of integers.

Times are drawn per sample from a generator seeded by (run seed, global sample index), with the
draws in the order of `DiffusionObjective`: the time, the noise, the noise-offset constant, the
pyramid levels, the input-perturbation noise. A time is drawn as

    u ~ uniform [0, 1) or logit-normal sigmoid(N(logit_mean, logit_std))
    u <- s u / (1 + (s - 1) u)                       fixed shift s = timestep_shift (SD3 style)
    u <- e^mu / (e^mu + 1/u - 1)                     resolution shift (FLUX), when enabled
    t = t_min + u (t_max - t_min)                    t_min, t_max = timestep_min / 1000, timestep_max / 1000

where mu grows linearly with the image token count L = (h/2)(w/2) of the latent (h, w): from
base_shift at L = 256 to max_shift at L = 4096 (BFL `get_lin_function`; 0.5 and 1.15 for
FLUX.1-dev), and the shift is BFL's `time_shift(mu, 1, t)`. Both shifts move times towards noise.

Loss (as `DiffusionObjective`): loss = mean_b(s_b * w_b * mean_{c,h,w}(m_bhw * l_bchw)) with the
weighting w_b of `weighting` (none, or SD3's sigma_sqrt / cosmap with sigma = t).

Huber thresholds: the SNR of x_t is ((1 - t) / t)^2, so the VE noise level of the DDPM formula
sigma = 1/sqrt(snr) is t / (1 - t) and `snr`: c_t = (1 - c) / (1 + sigma)^2 + c = (1 - c)(1 - t)^2 + c
(1 at t = 0 down to c at t = 1, finite everywhere); `exponential`: c^t; `constant`: c.

Min-SNR-gamma and debiased estimation re-weight epsilon/v targets by a DDPM schedule's SNR; they
have no counterpart for the velocity target and are refused.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import losses
from .objective import sample_seed, to_device

FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
"""Token counts at which the resolution shift's mu equals base_shift and max_shift (BFL)."""
_T_EDGE = 2.0**-24  # times are kept in [2^-24, 1 - 2^-24] so they stay inside (0, 1) in float32


def shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the resolution shift for `image_seq_len` image tokens: the line through
    (256, base_shift) and (4096, max_shift) (BFL `get_lin_function`, diffusers `calculate_shift`)."""
    m = (max_shift - base_shift) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return image_seq_len * m + (base_shift - m * BASE_SEQ_LEN)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """BFL `time_shift(mu, 1, t)` = e^mu / (e^mu + 1/t - 1) elementwise (0 -> 0, 1 -> 1); t a float tensor."""
    e = math.exp(mu)
    safe = torch.where(t > 0, t, torch.ones_like(t))
    return torch.where(t > 0, e / (e + (1.0 / safe - 1.0)), torch.zeros_like(t))


def image_seq_len(height: int, width: int, patch: int = 2) -> int:
    """Image tokens of (height, width) latents packed in patch x patch patches (FLUX.1: 2x2)."""
    return (height // patch) * (width // patch)


class FlowMatchingObjective:
    """Noise + time sampling, velocity targets and the weighted loss of rectified flow (module docstring).

    Args (as `DiffusionObjective` where they mean the same):
        noise_offset, multires_noise_iterations, multires_noise_discount, ip_noise_gamma: noise variants.
        timestep_min, timestep_max: times are drawn in [min / 1000, max / 1000) (integers as the
            DDPM objective's, so one config serves both).
        loss, huber_c, huber_schedule: elementwise loss and its threshold schedule (module docstring).
        timestep_sampling, logit_mean, logit_std, timestep_shift: how u is drawn and the fixed shift.
        resolution_shift: (base_shift, max_shift) of the FLUX resolution-dependent shift, or None.
        weighting: per-sample loss weight of t: "none", "sigma_sqrt" (1 / t^2) or "cosmap"
            (2 / (pi (1 - 2t + 2t^2))), SD3's schemes with sigma = t.
        min_snr_gamma, debiased_estimation: accepted so one call serves both objectives; any value
            other than None / False raises ValueError.
        patch: latent patch side of one image token (for L of the resolution shift).
    """

    def __init__(
        self,
        *,
        noise_offset: float = 0.0,
        timestep_min: int = 0,
        timestep_max: int = 1000,
        loss: str = "mse",
        huber_c: float = 0.1,
        huber_schedule: str = "snr",
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        timestep_shift: float = 1.0,
        resolution_shift: tuple[float, float] | None = None,
        weighting: str = "none",
        multires_noise_iterations: int = 0,
        multires_noise_discount: float = 0.3,
        ip_noise_gamma: float = 0.0,
        min_snr_gamma: float | None = None,
        debiased_estimation: bool = False,
        patch: int = 2,
    ) -> None:
        if min_snr_gamma is not None:
            raise ValueError("min_snr_gamma weights epsilon/v targets by a noise schedule's SNR; rectified-flow "
                             "training (velocity target) has no such weighting: remove it")
        if debiased_estimation:
            raise ValueError("debiased_estimation weights epsilon/v targets by a noise schedule's SNR; "
                             "rectified-flow training (velocity target) has no such weighting: remove it")
        if not 0 <= timestep_min < timestep_max <= 1000:
            raise ValueError(f"need 0 <= timestep_min < timestep_max <= 1000 (times min/1000 .. max/1000), "
                             f"got [{timestep_min}, {timestep_max})")
        if loss not in losses.LOSS_TYPES:
            raise ValueError(f"loss must be one of {losses.LOSS_TYPES}, got {loss!r}")
        if huber_schedule not in losses.HUBER_SCHEDULES:
            raise ValueError(f"huber_schedule must be one of {losses.HUBER_SCHEDULES}, got {huber_schedule!r}")
        if loss != "mse" and not 0 < huber_c <= 1:
            raise ValueError(f"huber_c must be in (0, 1], got {huber_c}")
        if timestep_sampling not in losses.TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {losses.TIMESTEP_SAMPLINGS}, got {timestep_sampling!r}")
        if logit_std <= 0 or timestep_shift <= 0:
            raise ValueError(f"logit_std and timestep_shift must be > 0, got {logit_std}, {timestep_shift}")
        if resolution_shift is not None:
            if len(resolution_shift) != 2 or not all(math.isfinite(float(v)) for v in resolution_shift):
                raise ValueError(f"resolution_shift must be (base_shift, max_shift) floats, got {resolution_shift!r}")
            resolution_shift = (float(resolution_shift[0]), float(resolution_shift[1]))
        if weighting not in FLOW_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {FLOW_WEIGHTINGS}, got {weighting!r}")
        if not isinstance(patch, int) or patch < 1:
            raise ValueError(f"patch must be a positive integer, got {patch!r}")
        self.noise_offset = float(noise_offset)
        self.timestep_min, self.timestep_max = int(timestep_min), int(timestep_max)
        self.loss_type, self.huber_c, self.huber_schedule = loss, float(huber_c), huber_schedule
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, float(logit_mean), float(logit_std)
        self.timestep_shift = float(timestep_shift)
        self.resolution_shift = resolution_shift
        self.weighting = weighting
        self.multires_noise_iterations = int(multires_noise_iterations)
        self.multires_noise_discount = float(multires_noise_discount)
        self.ip_noise_gamma = float(ip_noise_gamma)
        self.patch = patch

    def __repr__(self) -> str:
        return (f"FlowMatchingObjective(timestep_sampling={self.timestep_sampling!r}, timestep_shift="
                f"{self.timestep_shift}, resolution_shift={self.resolution_shift}, loss={self.loss_type!r})")

    # ---- sampling -------------------------------------------------------------------------
    def mu(self, height: int, width: int) -> float | None:
        """mu of the resolution shift for (height, width) latents, None without it."""
        if self.resolution_shift is None:
            return None
        return shift_mu(image_seq_len(height, width, self.patch), *self.resolution_shift)

    def _time(self, gen: torch.Generator, mu: float | None) -> float:
        """One t drawn from `gen` (module docstring), as a Python float in (0, 1)."""
        u = losses.timestep_fraction(gen, self.timestep_sampling, mean=self.logit_mean, std=self.logit_std,
                                     shift=self.timestep_shift)
        if mu is not None and u > 0.0:  # time_shift in float64 (it maps 0 to 0)
            u = math.exp(mu) / (math.exp(mu) + 1.0 / u - 1.0)
        lo, hi = self.timestep_min / 1000.0, self.timestep_max / 1000.0
        return min(max(lo + u * (hi - lo), _T_EDGE), 1.0 - _T_EDGE)

    def draw(
        self, latent_shape: Sequence[int], indices: Sequence[int], seed: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Noise, times and the model-input noise for a batch of samples.

        latent_shape: (C, H, W) of one latent; indices: global sample indices (len B). Returns
        noise (B, C, H, W) float32 (the target's noise), times t (B,) float32 in (0, 1) and, with
        `ip_noise_gamma`, the noise x_t is made with (B, C, H, W) (else None), all on `device`.
        Drawn on CPU, one generator seeding per sample, so a sample's draws do not depend on the
        batch it is in or on the device.
        """
        c, h, w = latent_shape
        mu = self.mu(h, w)
        noises, times, inputs = [], [], []
        gen = torch.Generator()
        for index in indices:
            gen.manual_seed(sample_seed(seed, int(index)))
            times.append(self._time(gen, mu))
            noise = torch.randn((c, h, w), generator=gen, dtype=torch.float32)
            if self.noise_offset:
                noise = noise + self.noise_offset * torch.randn((c, 1, 1), generator=gen, dtype=torch.float32)
            if self.multires_noise_iterations:
                noise = losses.pyramid_noise(noise, gen, self.multires_noise_iterations, self.multires_noise_discount)
            if self.ip_noise_gamma:
                inputs.append(noise + self.ip_noise_gamma * torch.randn((c, h, w), generator=gen, dtype=torch.float32))
            noises.append(noise)
        noise = to_device(torch.stack(noises), device)
        t = to_device(torch.tensor(times, dtype=torch.float32), device)
        return noise, t, to_device(torch.stack(inputs), device) if inputs else None

    def sample(
        self, latent_shape: Sequence[int], indices: Sequence[int], seed: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (B, C, H, W) float32 and times (B,) float32 of `draw` (without the input noise)."""
        noise, t, _ = self.draw(latent_shape, indices, seed, device)
        return noise, t

    # ---- targets and loss -------------------------------------------------------------------
    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = (1 - t) x0 + t eps and the velocity target eps - x0, both float32 (B, C, H, W).

        latents: scaled clean latents x0; noise: (B, C, H, W); timesteps: t (B,) float in [0, 1];
        input_noise: the noise x_t is made with when it differs from the target's (input perturbation).
        """
        x0, eps = latents.float(), noise.float()
        t = timesteps.float().view(-1, *([1] * (x0.dim() - 1)))
        noisy = (1.0 - t) * x0 + t * (eps if input_noise is None else input_noise.float())
        return noisy, eps - x0

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights (B,) float32 of `weighting` for times t (B,), or None ("none")."""
        if self.weighting == "none":
            return None
        t = timesteps.float()
        if self.weighting == "sigma_sqrt":
            return t.pow(-2.0)
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t * t))

    def huber_threshold(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample huber / smooth-L1 threshold c_t (B,) float32 for times t (B,) (module docstring)."""
        t = timesteps.float()
        if self.huber_schedule == "constant":
            return torch.full_like(t, self.huber_c)
        if self.huber_schedule == "exponential":
            return torch.exp(math.log(self.huber_c) * t)
        return (1.0 - self.huber_c) * (1.0 - t).pow(2) + self.huber_c

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, *,
             pixel_weights: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted loss of a batch, a float32 scalar (module docstring).

        pred: model output (B, C, H, W) in any dtype (upcast here); target: float32, same shape;
        timesteps: t (B,); pixel_weights: (B, 1, H, W) in [0, 1] (masked loss); sample_weights: (B,).
        """
        return self.per_sample_loss(pred, target, timesteps, pixel_weights=pixel_weights,
                                    sample_weights=sample_weights).mean()

    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, *,
                        pixel_weights: torch.Tensor | None = None,
                        sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Unreduced version of `loss`: (B,) float32."""
        huber_c = None if self.loss_type == "mse" else self.huber_threshold(timesteps)
        elementwise = losses.elementwise_loss(pred, target, self.loss_type, huber_c)
        if pixel_weights is not None:
            elementwise = elementwise * pixel_weights.float()
        per_sample = elementwise.flatten(1).mean(dim=1)
        weights = self.weights(timesteps)
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.device)
        if sample_weights is not None:
            per_sample = per_sample * sample_weights.to(per_sample.device, torch.float32)
        return per_sample
