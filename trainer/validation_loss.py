"""Validation loss: the training objective on held-out images at fixed timesteps and fixed noise.

Each validation image i is encoded once (the VAE posterior mean: no sampling) and noised at every
timestep t_k of `validation.timesteps` with noise seeded by (validation.seed, i, k) (rectified-flow
objectives use the time t_k / 1000 in [0, 1)); the loss is the
objective's per-sample loss (loss type, SNR weighting and mask as in training, but plain Gaussian
noise: no offset, pyramid or input perturbation) averaged over images and timesteps. Nothing here
depends on the training step, the process count or the RNG state, so values are comparable across
steps, runs and resumes; the global RNG is left untouched.

With several processes each one takes images i = rank, rank + W, ...; the sums are all-reduced.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .flow import FlowMatchingObjective
from .objective import DiffusionObjective, sample_seed, to_device


@dataclass
class _Item:
    """One prepared validation image: scaled latents (1, C, h, w), its conditioning (or token ids
    when the text encoders train), SDXL size ids (1, 6) and its latent-grid mask (1, 1, h, w) or None."""

    index: int
    latents: torch.Tensor
    cond: dict | None
    token_ids: list | None
    time_ids: torch.Tensor
    mask: torch.Tensor | None


class ValidationLoss:
    """Fixed-noise validation loss over `dataset` (an ImageCaptionDataset rendered without randomness).

    timesteps: the fixed timesteps, integers in [0, 1000) (a flow objective gets t / 1000); seed:
    seed of the fixed noise; rank/world: this process's share; guidance: the value a
    guidance-distilled denoiser (FLUX.1-dev) embeds, as in training (None: no guidance input).
    """

    def __init__(self, dataset, objective: DiffusionObjective | FlowMatchingObjective, timesteps: list[int],
                 seed: int, *, device, rank: int = 0, world: int = 1, guidance: float | None = None) -> None:
        self.dataset, self.objective, self.guidance = dataset, objective, guidance
        self.timesteps = [int(t) for t in timesteps]
        self.seed, self.device, self.rank, self.world = int(seed), device, rank, world
        self.items: list[_Item] = []

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def prepare(self, bundle, *, encode_text: bool) -> None:
        """Encode this process's images with the VAE (and captions, unless `encode_text`: then the
        text encoders train and run at every validation)."""
        from data.loader import TokenizeCaptions, collate_batch
        from data.masks import to_latent_grid

        tokenize = TokenizeCaptions(bundle.tokenizers)
        for i in range(self.rank, len(self.dataset), self.world):
            batch = collate_batch([self.dataset[i]], tokenize=tokenize)
            latents = bundle.vae.scale_latents(bundle.vae.encode(batch["pixels"].to(self.device)).mean.float())
            token_ids = [t.to(self.device) for t in batch["token_ids"]]
            mask = batch.get("mask")
            if mask is not None:
                mask = to_latent_grid(mask.to(self.device), tuple(latents.shape[-2:]))
            self.items.append(_Item(i, latents, None if encode_text else bundle.conditioning(token_ids),
                                    token_ids if encode_text else None, batch["add_time_ids"].to(self.device), mask))

    def _times(self) -> torch.Tensor:
        """The fixed timesteps as the objective takes them: (k,) int64, or float32 t / 1000 for flow."""
        if isinstance(self.objective, FlowMatchingObjective):
            return torch.tensor([t / 1000.0 for t in self.timesteps], dtype=torch.float32, device=self.device)
        return torch.tensor(self.timesteps, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def compute(self, predict: Callable, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        """Mean validation loss. predict(noisy, timesteps, cond=..., token_ids=..., time_ids=...)
        runs the model; reduce: sums a (2,) tensor over processes (None = single process)."""
        k = len(self.timesteps)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of losses, count)
        gen = torch.Generator()
        with torch.random.fork_rng(devices=[]):
            for item in self.items:
                c, h, w = item.latents.shape[1:]
                noise = []
                for j in range(k):
                    gen.manual_seed(sample_seed(self.seed, item.index * k + j))
                    noise.append(torch.randn((c, h, w), generator=gen, dtype=torch.float32))
                noise = to_device(torch.stack(noise), self.device)
                t = self._times()
                latents = item.latents.expand(k, -1, -1, -1)
                noisy, target = self.objective.noisy_and_target(latents, noise, t)
                cond = None if item.cond is None else {n: v.expand(k, *v.shape[1:]) for n, v in item.cond.items()
                                                       if v is not None}
                token_ids = None if item.token_ids is None else [ids.expand(k, -1) for ids in item.token_ids]
                pred = predict(noisy, t, cond=cond, token_ids=token_ids, time_ids=item.time_ids.expand(k, -1))
                mask = None if item.mask is None else item.mask.expand(k, -1, -1, -1)
                losses = self.objective.per_sample_loss(pred, target, t, pixel_weights=mask)
                total += torch.stack([losses.sum().double(), torch.tensor(float(k), dtype=torch.float64,
                                                                          device=self.device)])
        if reduce is not None:
            total = reduce(total)
        return float(total[0] / total[1].clamp(min=1))

    def measure(self, weights, denoiser, accelerator) -> dict[str, float]:
        """`val/loss` of the weights to use and, with EMA, `val/loss_ema`: adapters in eval mode,
        the RNG untouched (weights: a `TrainingWeights`; denoiser: the unwrapped `Denoiser`)."""
        def predict(noisy, timesteps, cond=None, token_ids=None, time_ids=None):
            extra = {}
            if self.guidance is not None:
                extra["guidance"] = torch.full((noisy.shape[0],), self.guidance, device=noisy.device)
            with accelerator.autocast():
                return denoiser(noisy, timesteps, cond=cond, token_ids=token_ids, time_ids=time_ids, **extra)

        reduce = (lambda x: accelerator.reduce(x, "sum")) if self.world > 1 else None
        scalars = {}
        with weights.evaluating():
            with weights.for_use():
                scalars["val/loss"] = self.compute(predict, reduce)
            if weights.ema is not None:
                with weights.ema.swapped():
                    scalars["val/loss_ema"] = self.compute(predict, reduce)
        return scalars


def build_validation(cfg, held_out, bundle, objective: DiffusionObjective | FlowMatchingObjective, masks, *,
                     device, rank: int, world: int, log, guidance: float | None = None) -> ValidationLoss | None:
    """The validation loss of a run: over `held_out` (the `validation.split` hold-out) or the images
    of `validation.path`, encoded now; None when the config asks for none. guidance: the value the
    denoiser embeds while training (guidance-distilled models), else None."""
    from data.dataset import build_dataset
    from data.validation import validation_data_config

    v, t = cfg.validation, cfg.train
    data = held_out
    if v.path is not None:
        data = build_dataset(validation_data_config(cfg.data, v.path), seed=t.seed, log_summary=False, masks=masks)
    if data is None:
        return None
    validation = ValidationLoss(data, objective, v.timesteps, v.seed, device=device, rank=rank, world=world,
                                guidance=guidance)
    validation.prepare(bundle, encode_text=t.train_text_encoders)
    log(f"validation loss on {len(data)} images x {len(v.timesteps)} timesteps")
    return validation
