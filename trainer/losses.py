"""Loss shapes, loss weightings and noise/timestep variants of the denoising objective.

Everything here is a pure function of its tensor arguments (and, for the random parts, of a
`torch.Generator` the caller seeds per sample), so `DiffusionObjective` can keep its per-sample
determinism. Formulas follow kohya sd-scripts where a user would switch from it:

- `elementwise_loss`: "mse" (d^2), "huber" (2c(sqrt(d^2 + c^2) - c), a pseudo-Huber that is d^2
  near 0 and 2c|d| far away) and "smooth_l1" (2(sqrt(d^2 + c^2) - c): |d|-like, c^2 smoothing);
- `huber_threshold`: c per sample from the timestep: constant c; exponential c^(t / T) (1 at t = 0
  down to c at t = T); snr (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - abar) / abar);
- `debiased_weights`: 1 / sqrt(snr) (epsilon) or 1 / (snr + 1) (v-prediction), snr capped at 1000;
- `timestep_fraction`: u in (0, 1) uniform or logit-normal (sigmoid of N(mean, std)), then the
  shift u' = s u / (1 + (s - 1) u) (s > 1 moves timesteps towards noise);
- `pyramid_noise`: multi-resolution ("pyramid") noise, renormalised to unit std per sample.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("mse", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
SNR_CAP = 1000.0  # debiased estimation: snr at t = 0 is ~1e4; kohya caps it here


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced loss (B, C, H, W) float32 of `pred` against `target` (both upcast to fp32).

    kind: one of LOSS_TYPES; huber_c: (B,) thresholds (see `huber_threshold`), needed for huber
    and smooth_l1.
    """
    diff = pred.float() - target.float()
    if kind == "mse":
        return diff.pow(2)
    if kind not in LOSS_TYPES:
        raise ValueError(f"train.loss: unknown loss {kind!r}; choose one of {', '.join(LOSS_TYPES)}")
    if huber_c is None:
        raise ValueError(f"train.loss={kind} needs per-sample thresholds (huber_c)")
    c = huber_c.float().view(-1, *([1] * (diff.dim() - 1)))
    smooth = torch.sqrt(diff.pow(2) + c * c) - c
    return 2 * c * smooth if kind == "huber" else 2 * smooth


def huber_threshold(schedule: str, huber_c: float, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                    num_train_timesteps: int) -> torch.Tensor:
    """Per-sample threshold c_t (B,) float32 for timesteps (B,) int64 (see module docstring).

    alphas_cumprod: (T,) of the training schedule (read by the `snr` schedule only).
    """
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, float(huber_c))
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t / num_train_timesteps)
    if schedule == "snr":
        abar = alphas_cumprod.to(timesteps.device)[timesteps].double()
        sigma = ((1.0 - abar) / abar).sqrt()  # inf at zero terminal SNR: the threshold becomes c
        return ((1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c).float()
    raise ValueError(f"train.huber_schedule: unknown schedule {schedule!r}; choose one of {', '.join(HUBER_SCHEDULES)}")


def debiased_weights(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased-estimation loss weights (B,) for per-sample snr (B,): 1 / sqrt(min(snr, 1000))
    for epsilon, 1 / (min(snr, 1000) + 1) for v-prediction. Epsilon at snr = 0 (zero terminal
    SNR, last timestep) would be infinite: the config checker refuses that combination."""
    snr = snr.float().clamp(max=SNR_CAP)
    if prediction_type == "v_prediction":
        return 1.0 / (snr + 1.0)
    return snr.rsqrt()


def timestep_fraction(gen: torch.Generator, sampling: str, *, mean: float = 0.0, std: float = 1.0,
                      shift: float = 1.0) -> float:
    """One u in [0, 1) drawn from `gen`: uniform or logit-normal, then shifted (module docstring)."""
    if sampling == "uniform":
        u = float(torch.rand((1,), generator=gen, dtype=torch.float64))
    elif sampling == "logit_normal":
        z = float(torch.randn((1,), generator=gen, dtype=torch.float64))
        u = 1.0 / (1.0 + math.exp(-(mean + std * z)))
    else:
        raise ValueError(f"train.timestep_sampling: unknown {sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
    if shift != 1.0:
        u = shift * u / (1.0 + (shift - 1.0) * u)
    return min(max(u, 0.0), math.nextafter(1.0, 0.0))


def fraction_to_timestep(u: float, timestep_min: int, timestep_max: int) -> int:
    """Integer timestep in [min, max) for u in [0, 1): min + floor(u (max - min))."""
    return min(timestep_min + int(u * (timestep_max - timestep_min)), timestep_max - 1)


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise for one sample, as kohya's `pyramid_noise_like`: noise
    (C, H, W) plus, for i = 0..iterations-1, N(0, 1) noise of size H / r^i x W / r^i (r uniform in
    [2, 4) per level) upsampled bilinearly and scaled by discount^i, stopping after the first level
    that is 1 px wide or high; then divided by its std so it stays unit-variance. Level 0 is a
    second full-resolution draw (as in kohya). Normalised per sample rather than per batch, so the
    result does not depend on how samples are batched.
    """
    c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((1,), generator=gen, dtype=torch.float64)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((1, c, hn, wn), generator=gen, dtype=torch.float32)
        if (hn, wn) != (h, w):
            coarse = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        out += coarse[0] * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()
