"""The denoising objective: noise, timesteps, targets and the weighted loss.

Everything here is float32 whatever the model dtype: noise is drawn in fp32, the noisy input and
the target come from `NoiseSchedule` in fp32, and the loss upcasts the prediction before
subtracting. The model input is cast to the model dtype by the caller.

Noise and timesteps are drawn per *sample* from a generator seeded by (run seed, global sample
index). A sample therefore gets the same noise however the global batch is split across
processes or gradient-accumulation micro-batches, and resuming needs no generator state. The
draws of one sample, in order: the timestep, the noise, the noise-offset constant, the pyramid
levels, the input-perturbation noise (each only when its option is on, so turning an option on
does not change the draws before it).

Loss of a batch (`loss`), with l = elementwise loss (mse | huber | smooth_l1, see `trainer.losses`):

    loss = mean_b( s_b * w_b * mean_{c,h,w}( m_bhw * l_bchw ) )

m = per-pixel weights (masked loss; 1 without), w_b = SNR weighting (Min-SNR-gamma or debiased
estimation; 1 without), s_b = per-sample weight (prior-preservation weight of regularisation images).
The mean over c, h, w divides by every pixel, masked or not (as kohya): a sample whose mask keeps
a quarter of the image contributes a quarter of the loss of a full one, and a mask of zeros gives
zero loss, never NaN.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import losses
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
    """Noise + timestep sampling, training targets and the weighted loss (see the module docstring).

    Args:
        schedule: the training `NoiseSchedule` (zero-terminal-SNR already applied if wanted).
        prediction_type: "epsilon" (target = noise) or "v_prediction" (target = velocity).
        noise_offset: std of an extra per-sample, per-channel constant added to the noise
            (helps very dark/bright images); 0 disables it.
        min_snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023); None disables it.
        timestep_min, timestep_max: timesteps are drawn from the integers in [min, max).
        loss, huber_c, huber_schedule: elementwise loss and its threshold schedule (`trainer.losses`).
        debiased_estimation: weight each sample by 1/sqrt(snr) (v-prediction: 1/(snr+1)).
        timestep_sampling, logit_mean, logit_std, timestep_shift: how timesteps are drawn
            (uniform with shift 1 draws uniform integers directly).
        multires_noise_iterations, multires_noise_discount: pyramid noise levels and their decay.
        ip_noise_gamma: input perturbation: the model input gets noise + gamma * extra noise while
            the target keeps the plain noise.
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
        loss: str = "mse",
        huber_c: float = 0.1,
        huber_schedule: str = "snr",
        debiased_estimation: bool = False,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        timestep_shift: float = 1.0,
        multires_noise_iterations: int = 0,
        multires_noise_discount: float = 0.3,
        ip_noise_gamma: float = 0.0,
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
        if debiased_estimation and min_snr_gamma is not None:
            raise ValueError("debiased_estimation and min_snr_gamma both weight the loss by SNR; use one")
        if (debiased_estimation and prediction_type == "epsilon" and timestep_max == schedule.num_train_timesteps
                and float(schedule.alphas_cumprod[-1]) == 0.0):
            raise ValueError("debiased_estimation with epsilon prediction weighs the zero-SNR last timestep by "
                             "1/sqrt(0); use v-prediction, timestep_max < 1000 or no zero_terminal_snr")
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.noise_offset = float(noise_offset)
        self.min_snr_gamma = min_snr_gamma
        self.timestep_min = timestep_min
        self.timestep_max = timestep_max
        self.loss_type, self.huber_c, self.huber_schedule = loss, float(huber_c), huber_schedule
        self.debiased_estimation = bool(debiased_estimation)
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, float(logit_mean), float(logit_std)
        self.timestep_shift = float(timestep_shift)
        self.multires_noise_iterations = int(multires_noise_iterations)
        self.multires_noise_discount = float(multires_noise_discount)
        self.ip_noise_gamma = float(ip_noise_gamma)

    # ---- sampling -------------------------------------------------------------------------
    def _timestep(self, gen: torch.Generator) -> torch.Tensor:
        """One timestep (1,) int64 drawn from `gen`."""
        if self.timestep_sampling == "uniform" and self.timestep_shift == 1.0:
            return torch.randint(self.timestep_min, self.timestep_max, (1,), generator=gen)
        u = losses.timestep_fraction(gen, self.timestep_sampling, mean=self.logit_mean, std=self.logit_std,
                                     shift=self.timestep_shift)
        return torch.tensor([losses.fraction_to_timestep(u, self.timestep_min, self.timestep_max)])

    def draw(
        self, latent_shape: Sequence[int], indices: Sequence[int], seed: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Noise, timesteps and the model-input noise for a batch of samples.

        latent_shape: (C, H, W) of one latent; indices: global sample indices (len B), one per
        batch row. Returns noise (B, C, H, W) float32 (the target's noise), timesteps (B,) int64
        and, with `ip_noise_gamma`, the noise the model input is made with (B, C, H, W) (else
        None), all on `device`. Drawn on CPU so results do not depend on the device's RNG.
        """
        c, h, w = latent_shape
        noises, steps, inputs = [], [], []
        gen = torch.Generator()
        for index in indices:
            gen.manual_seed(sample_seed(seed, int(index)))
            t = self._timestep(gen)
            noise = torch.randn((c, h, w), generator=gen, dtype=torch.float32)
            if self.noise_offset:
                noise = noise + self.noise_offset * torch.randn((c, 1, 1), generator=gen, dtype=torch.float32)
            if self.multires_noise_iterations:
                noise = losses.pyramid_noise(noise, gen, self.multires_noise_iterations, self.multires_noise_discount)
            if self.ip_noise_gamma:
                inputs.append(noise + self.ip_noise_gamma * torch.randn((c, h, w), generator=gen, dtype=torch.float32))
            noises.append(noise)
            steps.append(t)
        noise = to_device(torch.stack(noises), device)
        timesteps = to_device(torch.cat(steps), device)
        return noise, timesteps, to_device(torch.stack(inputs), device) if inputs else None

    def sample(
        self, latent_shape: Sequence[int], indices: Sequence[int], seed: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (B, C, H, W) float32 and timesteps (B,) int64 of `draw` (without the input noise)."""
        noise, timesteps, _ = self.draw(latent_shape, indices, seed, device)
        return noise, timesteps

    # ---- targets and loss -------------------------------------------------------------------
    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t and the regression target, both float32 (B, C, H, W).

        latents: scaled clean latents x_0; noise: (B, C, H, W) fp32; timesteps: (B,) int64;
        input_noise: the noise x_t is made with when it differs from the target's (input
        perturbation, see `draw`).
        """
        noisy = self.schedule.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
        target = self.schedule.training_target(latents, noise, timesteps, self.prediction_type)
        return noisy, target

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample SNR loss weights (B,) float32 (Min-SNR-gamma or debiased estimation), or None.

        Min-SNR, epsilon: min(snr, gamma) / snr, written as 1 where snr < gamma so snr = 0
        (zero-terminal SNR) gives its limit 1 rather than 0/0. v_prediction: min(snr, gamma) / (snr + 1).
        """
        if self.debiased_estimation:
            return losses.debiased_weights(self.schedule.snr(timesteps), self.prediction_type)
        if self.min_snr_gamma is None:
            return None
        snr = self.schedule.snr(timesteps)
        gamma = torch.full_like(snr, float(self.min_snr_gamma))
        if self.prediction_type == "epsilon":
            return torch.where(snr < gamma, torch.ones_like(snr), gamma / snr.clamp(min=1e-20))
        return torch.minimum(snr, gamma) / (snr + 1.0)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, *,
             pixel_weights: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted loss of a batch, a float32 scalar (formula in the module docstring).

        pred: model output (B, C, H, W) in any dtype (upcast here); target: float32, same shape;
        pixel_weights: (B, 1, H, W) in [0, 1] (masked loss); sample_weights: (B,) (prior loss weight).
        """
        return self.per_sample_loss(pred, target, timesteps, pixel_weights=pixel_weights,
                                    sample_weights=sample_weights).mean()

    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, *,
                        pixel_weights: torch.Tensor | None = None,
                        sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Unreduced version of `loss`: (B,) float32."""
        huber_c = None
        if self.loss_type != "mse":
            huber_c = losses.huber_threshold(self.huber_schedule, self.huber_c, timesteps,
                                             self.schedule.alphas_cumprod, self.schedule.num_train_timesteps)
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


def build_objective(t, spec, prediction_type: str):
    """The training objective of family `spec` configured by the `train` section `t`: a
    `DiffusionObjective` over the family's noise schedule, or the rectified-flow objective of
    `trainer.flow` for `flow` families. Raises ValueError on a bad combination."""
    common = dict(noise_offset=t.noise_offset, timestep_min=t.timestep_min, timestep_max=t.timestep_max,
                  loss=t.loss, huber_c=t.huber_c, huber_schedule=t.huber_schedule,
                  timestep_sampling=t.timestep_sampling, logit_mean=t.logit_mean, logit_std=t.logit_std,
                  timestep_shift=t.timestep_shift, multires_noise_iterations=t.multires_noise_iterations,
                  multires_noise_discount=t.multires_noise_discount, ip_noise_gamma=t.ip_noise_gamma)
    if spec.objective == "flow":
        from .flow import FlowMatchingObjective

        shift = t.resolution_shift if t.resolution_shift is not None else spec.flow_shift is not None
        return FlowMatchingObjective(resolution_shift=(spec.flow_shift or (0.5, 1.15)) if shift else None,
                                     weighting=t.flow_weighting,
                                     min_snr_gamma=t.min_snr_gamma, debiased_estimation=t.debiased_estimation,
                                     **common)
    schedule = NoiseSchedule(zero_terminal_snr=t.zero_terminal_snr)
    return DiffusionObjective(schedule, prediction_type, min_snr_gamma=t.min_snr_gamma,
                              debiased_estimation=t.debiased_estimation, **common)
