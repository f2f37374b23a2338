"""Exponential moving average of the adapter weights.

    ema = AdapterEMA(network.named_parameters(), decay=0.999, every=1, device=None)
    ...after each optimizer step:  ema.update(step)     # step = optimizer steps done (1-based)
    with ema.swapped():                                  # the network holds the EMA weights
        network.save("lora-ema.safetensors")

Update every `every` steps: ema <- decay * ema + (1 - decay) * weights, in fp32 (decay 0: the EMA
is the current weights). The EMA starts as the initial weights. Its tensors (and the step of the
last update) go into checkpoints, so a resumed run continues the same average bit for bit.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


class AdapterEMA:
    """EMA of named trainable parameters (see module docstring).

    named_params: (name, parameter) pairs (names are the checkpoint keys); decay: 0 <= decay < 1;
    every: update period in optimizer steps; device: where the EMA lives (None = with each
    parameter; "cpu" saves accelerator memory).
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float, every: int = 1,
                 device: torch.device | str | None = None) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"train.ema_every must be >= 1, got {every}")
        self.decay, self.every = float(decay), int(every)
        self.params = {name: p for name, p in named_params if p.requires_grad}
        with torch.no_grad():
            self.shadow = {name: p.detach().to(device or p.device, torch.float32, copy=True)
                           for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average the current weights in when `step` (optimizer steps done) is a multiple of `every`."""
        if step % self.every:
            return
        names = list(self.params)
        shadow = [self.shadow[n] for n in names]
        current = [self.params[n].detach().to(s.device, torch.float32) for n, s in zip(names, shadow)]
        # lerp: ema + (1 - decay) * (w - ema), the same rounding on every device and on resume
        torch._foreach_lerp_(shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """Within the block the parameters hold the EMA weights; afterwards exactly their own again."""
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA tensors by parameter name (fp32)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the tensors of `state_dict`; ValueError when names or shapes differ."""
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys()) or sorted(state.keys() - self.shadow.keys())
            raise ValueError(f"EMA weights do not match the adapters (e.g. {missing[0]})")
        for n, t in state.items():
            if t.shape != self.shadow[n].shape:
                raise ValueError(f"EMA weight {n} has shape {tuple(t.shape)}, expected {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(t)
