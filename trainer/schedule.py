"""The DDPM noise schedule shared by training and sampling.

Stable Diffusion 1.x/2.x and SDXL were all trained with 1000 discrete timesteps and the
"scaled linear" betas `linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`. The forward process is

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise,   alpha_bar_t = prod_{s<=t} (1 - beta_s)

The table is computed in float64 and stored in float32; every helper upcasts its inputs to
float32 and returns float32, whatever the model dtype, because half-precision `alpha_bar` near
t=999 (~0.005) loses most of its digits. Callers cast the result to the model dtype.

Samplers work with the equivalent "variance exploding" noise level
`sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)` (x_t / sqrt(alpha_bar_t) = x_0 + sigma_t * noise).
"""
from __future__ import annotations

import torch

BETA_SCHEDULES = ("scaled_linear", "linear")

# A zero-terminal-SNR schedule has alpha_bar = 0 at the last timestep, i.e. sigma = inf. Sampling
# clamps it to this value (as the reference Euler/DPM-Solver schedulers do) so sigma stays finite
# (~4096); training uses the exact 0.
TERMINAL_ALPHA_BAR = 2.0**-24


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale `betas` (T,) so the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed", Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged;
    returns the betas of that alpha_bar, in the dtype of `betas` (pass float64 for accuracy).
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """Discrete DDPM schedule: betas, alpha_bar, sigmas and the training-time helpers.

    Args:
        num_train_timesteps: number of discrete timesteps T (1000 for every SD family).
        beta_start, beta_end: first/last beta (SD: 0.00085, 0.012).
        beta_schedule: "scaled_linear" (SD, betas linear in sqrt) or "linear".
        zero_terminal_snr: rescale betas so alpha_bar[T-1] == 0 (train with v-prediction).

    Attributes (float32, CPU, shape (T,)): `betas`, `alphas_cumprod` (alpha_bar), `sigmas`
    (sqrt((1 - alpha_bar) / alpha_bar), terminal value clamped for zero-terminal-SNR, see
    `TERMINAL_ALPHA_BAR`). `alphas_cumprod64` / `sigmas64` keep the float64 values for samplers.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        zero_terminal_snr: bool = False,
    ) -> None:
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.beta_schedule = beta_schedule
        self.zero_terminal_snr = zero_terminal_snr

        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        sampling_ab = alpha_bar.clone()
        if zero_terminal_snr:
            sampling_ab[-1] = TERMINAL_ALPHA_BAR
        self.alphas_cumprod64 = alpha_bar
        self.sigmas64 = ((1.0 - sampling_ab) / sampling_ab).sqrt()
        self.betas = betas.float()
        self.alphas_cumprod = alpha_bar.float()
        self.sigmas = self.sigmas64.float()
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}, beta_schedule={self.beta_schedule!r}, "
            f"zero_terminal_snr={self.zero_terminal_snr})"
        )

    # ---- lookups ------------------------------------------------------------------------------
    def _alpha_bar(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        """alpha_bar[t] as float32 on t's device, shaped (B, 1, ..., 1) with `ndim` dims."""
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        if timesteps.is_floating_point():
            raise TypeError("timesteps must be an integer tensor (indices into the 1000-step schedule)")
        # Range check on CPU only: on an accelerator it would synchronise every training step
        # (out-of-range indices still fail there, with a device-side assert).
        on_cpu = timesteps.device.type == "cpu"
        if on_cpu and timesteps.numel() and (
            int(timesteps.min()) < 0 or int(timesteps.max()) >= self.num_train_timesteps
        ):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps}), got range "
                f"[{int(timesteps.min())}, {int(timesteps.max())}]"
            )
        device = timesteps.device
        table = self._per_device.get(device)
        if table is None:
            table = self._per_device[device] = self.alphas_cumprod.to(device)
        ab = table[timesteps.reshape(-1)]
        return ab.reshape(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0).

        x0, noise: (B, ...) clean latents and unit Gaussian noise; timesteps: (B,) int in [0, T).
        Returns float32 (B, ...): sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise.
        """
        ab = self._alpha_bar(timesteps, x0.ndim)
        return ab.sqrt() * x0.float() + (1.0 - ab).sqrt() * noise.float()

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v-prediction target (Salimans & Ho 2022): sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x0.

        Shapes as in `add_noise`; returns float32.
        """
        ab = self._alpha_bar(timesteps, x0.ndim)
        return ab.sqrt() * noise.float() - (1.0 - ab).sqrt() * x0.float()

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
    ) -> torch.Tensor:
        """What the model should output at x_t: `noise` for "epsilon", the velocity for "v_prediction"."""
        if prediction_type == "epsilon":
            return noise.float()
        if prediction_type == "v_prediction":
            return self.get_velocity(x0, noise, timesteps)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'")

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float32 (B,) (0 at a zero-SNR terminal step)."""
        ab = self._alpha_bar(timesteps, 1)
        return ab / (1.0 - ab)

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for integer timesteps, float32 (B,) on their device."""
        if timesteps.is_floating_point():
            raise TypeError("timesteps must be an integer tensor; use sigma_at() for fractional timesteps")
        return self.sigmas.to(timesteps.device)[timesteps.reshape(-1)]

    # ---- continuous lookups used by samplers ---------------------------------------------------
    def sigma_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma at possibly fractional timesteps (float64 (N,)), linearly interpolated in t."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        t = t.clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        return (1 - w) * self.sigmas64[lo] + w * self.sigmas64[lo + 1]

    def sigma_to_t(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma (float64 (N,)): linear interpolation in log(sigma)
        between the two neighbouring table entries; clamped to [0, T-1]."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        log_table = self.sigmas64.log()
        log_s = s.clamp(min=1e-10).log()
        # Index of the last table entry with log_sigma <= log_s (the table increases with t).
        lo = (log_table[None, :] <= log_s[:, None]).sum(dim=1) - 1
        lo = lo.clamp(0, self.num_train_timesteps - 2)
        low, high = log_table[lo], log_table[lo + 1]
        w = ((low - log_s) / (low - high)).clamp(0, 1)
        return lo.double() + w
