"""`Denoiser`: the trained computation of a LoRA run as one module."""
from __future__ import annotations

from torch import nn


class Denoiser(nn.Module):
    """The trained computation as one module, so DDP sees every adapter: optional text encoding
    (when the text encoders train), then the family's denoising step (`ModelBundle.denoise`).

    forward(noisy (B,C,h,w), timesteps (B,), cond {name: tensor} | None, token_ids list[(B,77)] | None,
    time_ids (B,6) | None, guidance (B,) | None) -> prediction (B,C,h,w). `cond` holds the family's conditioning
    tensors (cached or encoded without gradients); with `token_ids` the encoders run here instead.
    """

    def __init__(self, bundle, encode_text: bool) -> None:
        super().__init__()
        self.denoiser = bundle.denoiser
        self.text_encoders = nn.ModuleList(bundle.text_encoders if encode_text else [])
        object.__setattr__(self, "bundle", bundle)  # not a submodule: parts are registered above

    def forward(self, noisy, timesteps, cond=None, token_ids=None, time_ids=None, guidance=None):
        if token_ids is not None:
            cond = self.bundle.conditioning(token_ids)
        return self.bundle.denoise(noisy, timesteps, cond, time_ids, guidance)
