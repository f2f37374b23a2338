"""A whole text-to-image model: denoiser, VAE, text encoders and tokenizers of one family.

`build_model(family)` makes one with random weights (`device="meta"` allocates nothing);
`models.load_model(source)` fills one from a checkpoint. What the parts are and how a prompt
conditions the denoiser is the family's business (`models.families`): the bundle delegates to its
`spec`, so the same bundle code serves every family.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .families import FAMILIES, FamilySpec, family_spec
from .parts import build_part
from .vae import AutoencoderKL

__all__ = ["FAMILIES", "FamilySpec", "ModelBundle", "build_model", "family_spec"]


class ModelBundle:
    """Denoiser + VAE + text encoders + tokenizers of one family. Modules are plain `nn.Module`s.

    `denoiser` is the generic name of the diffusion network; `unet` is the same module for the
    UNet families.
    """

    def __init__(self, family: str, denoiser: nn.Module | None = None, vae: AutoencoderKL | None = None,
                 text_encoders: list[nn.Module] | None = None, tokenizers: list | None = None,
                 spec: FamilySpec | None = None, *, unet: nn.Module | None = None) -> None:
        if (denoiser is None) == (unet is None):
            raise ValueError("ModelBundle needs exactly one of denoiser= or unet= (the same thing)")
        self.family = family
        self.denoiser = denoiser if denoiser is not None else unet
        self.vae = vae
        self.text_encoders = list(text_encoders or [])
        self.tokenizers = list(tokenizers or [])
        self.spec = spec if spec is not None else family_spec(family)
        if len(self.text_encoders) != len(self.spec.text_encoders):
            raise ValueError(
                f"family {self.family!r} needs {len(self.spec.text_encoders)} text encoder(s), "
                f"got {len(self.text_encoders)}"
            )
        if len(self.tokenizers) != len(self.text_encoders):
            raise ValueError(f"got {len(self.tokenizers)} tokenizer(s) for {len(self.text_encoders)} text encoder(s)")

    @property
    def unet(self) -> nn.Module:
        """The denoiser (UNet families' name for it)."""
        return self.denoiser

    @unet.setter
    def unet(self, module: nn.Module) -> None:
        self.denoiser = module

    def __repr__(self) -> str:
        return f"ModelBundle(family={self.family!r}, denoiser={type(self.denoiser).__name__})"

    # ---- conditioning -------------------------------------------------------------------
    def tokenize(self, prompts: str | list[str]) -> list[torch.Tensor]:
        """Token ids for each text encoder: a list of (B, 77) int64 tensors on the encoders' devices."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = []
        for tok, te in zip(self.tokenizers, self.text_encoders):
            out.append(tok(list(prompts)).to(_module_device(te)))
        return out

    def conditioning(self, token_ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The family's conditioning tensors from token ids (one (B, 77) tensor per encoder), e.g.
        {"context": (B, 77, D)} or, for SDXL, also "pooled" (B, 1280). See `FamilySpec.encode`."""
        return self.spec.encode(self, token_ids)

    def encode_tokens(self, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled) from token ids (one (B, 77) tensor per encoder). See `encode_prompt`."""
        cond = self.conditioning(token_ids)
        return cond["context"], cond.get("pooled")

    def encode_prompt(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning for `prompts`.

        Returns (context, pooled): context (B, 77, D) with D = 768 (SD1.5), 1024 (SD2) or 2048
        (SDXL), or FLUX.1's T5 states (B, 512, 4096); pooled (B, 1280) for SDXL, (B, 768) CLIP-L for
        FLUX.1, None otherwise. Gradients flow when the encoders
        require them (text-encoder training); wrap in `torch.no_grad()` otherwise.
        """
        return self.encode_tokens(self.tokenize(prompts))

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                time_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Denoiser prediction (B, C, h, w) for noisy latents under `cond` (see `FamilySpec.denoise`):
        noise/velocity for the family's objective; `guidance` (B,) feeds a guidance-distilled denoiser."""
        if guidance is None:
            return self.spec.denoise(self, noisy, timesteps, cond, time_ids)
        return self.spec.denoise(self, noisy, timesteps, cond, time_ids, guidance)

    def sdxl_vector(self, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SDXL `y` (B, pooled_dim + 1536) from pooled (B, P) and time ids (B, 6) in pixels:
        [orig_h, orig_w, crop_top, crop_left, target_h, target_w]."""
        from .unet import sdxl_vector

        return sdxl_vector(pooled, time_ids)

    # ---- device / dtype -----------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        """Named parts: `unet` (the denoiser), `vae`, `text_encoder`, `text_encoder_2` (SDXL)."""
        parts: dict[str, nn.Module] = {"unet": self.denoiser, "vae": self.vae}
        for i, te in enumerate(self.text_encoders):
            parts["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te
        return parts

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModelBundle":
        """Move every part in place; returns self."""
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    def requires_grad_(self, flag: bool = False) -> "ModelBundle":
        for module in self.modules().values():
            module.requires_grad_(flag)
        return self


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def build_model(
    family: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int | None = None
) -> ModelBundle:
    """A `ModelBundle` of `family` with random weights.

    `device="meta"` builds shapes only and allocates no memory (materialise with `to_empty`).
    `seed` makes the random init reproducible (it seeds a local generator state, restoring the
    global RNG afterwards).
    """
    spec = family_spec(family)
    device = torch.device(device)
    configs = [spec.denoiser_config(), spec.vae_config(), *spec.text_encoder_configs()]
    if device.type == "meta":
        from .checkpoints.single_file import meta_module  # imports this module: resolve at call time

        # Shapes only: skipping init avoids running initialisers on meta tensors for nothing.
        unet, vae, *encoders = [meta_module(c) for c in configs]
    else:
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng, torch.device(device):
            if seed is not None:
                torch.manual_seed(seed)
            unet, vae, *encoders = [build_part(c) for c in configs]
    parts = [unet, vae, *encoders]
    if dtype != torch.float32:
        for module in parts:
            module.to(dtype=dtype)
    tokenizers = spec.make_tokenizers()
    for module in parts:
        module.eval()
    return ModelBundle(family=spec.name, denoiser=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers, spec=spec)
