"""Which adapter weights a training run reads, and how they are checkpointed and restored.

Three views of the adapters exist: the training weights (what the optimizer steps), the weights to
*use* (schedule-free AdamW: its average x; every other optimizer: the training weights) and, with
`train.ema_decay`, their EMA. Samples, validation, exports and checkpoints read the weights to use
(`for_use`); afterwards the training weights are restored bit for bit, so reading never changes
training. A checkpoint stores the weights to use as `adapter.safetensors` plus what resuming
exactly needs: `ema` (the EMA) and, for schedule-free, `train_weights` (its training point y).
"""
from __future__ import annotations

import contextlib

from .ema import AdapterEMA
from .optim import eval_weights, is_schedule_free


class TrainingWeights:
    """The weight views of `network` trained by `optimizer` (module docstring); `ema` may be None."""

    def __init__(self, network, optimizer, ema: AdapterEMA | None = None) -> None:
        self.network, self.optimizer, self.ema = network, optimizer, ema
        self.params = [p for p in network.parameters() if p.requires_grad]

    def for_use(self):
        """Context: the network holds the weights to use (see module docstring)."""
        return eval_weights(self.optimizer, self.params)

    def averaged(self, use_ema: bool):
        """Context: the EMA weights when `use_ema`, else the weights to use."""
        if use_ema:
            if self.ema is None:
                raise ValueError("the EMA weights were asked for but train.ema_decay is null")
            return self.ema.swapped()
        return self.for_use()

    def save_checkpoint(self, save):
        """Call `save(weights=..., tensors=...)` (a `CheckpointManager.save` bound to the rest of
        its arguments) with the weights to use and the extra tensor sets; returns its result. The
        optimizer state is saved in the mode schedule-free expects (eval)."""
        extra = {}
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        if is_schedule_free(self.optimizer):
            extra["train_weights"] = {n: p.detach().clone() for n, p in self.network.named_parameters()}
        with self.for_use():
            return save(weights=self.network.state_dict(), tensors=extra)

    def restore(self, extra: dict) -> str | None:
        """After the network and optimizer states are loaded from a checkpoint, restore the extra
        tensor sets; returns a notice when the EMA had to start afresh."""
        import torch

        notice = None
        if self.ema is not None:
            if "ema" in extra:
                self.ema.load_state_dict(extra["ema"])
            else:
                self.ema.load_state_dict({n: p.detach().float() for n, p in self.ema.params.items()})
                notice = "the checkpoint has no EMA weights (train.ema_decay was off): the EMA starts from its weights"
        if is_schedule_free(self.optimizer):
            getattr(self.optimizer, "optimizer", self.optimizer).train()  # saved in eval mode
            saved = extra.get("train_weights")
            if saved is not None:  # the exact training point (eval -> train rounds in floating point)
                with torch.no_grad():
                    for n, p in self.network.named_parameters():
                        p.copy_(saved[n])
        return notice

    @contextlib.contextmanager
    def evaluating(self):
        """Context: adapters in eval mode (no dropout) and the RNG state untouched, for validation."""
        import torch

        was_training = self.network.training
        self.network.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                yield
        finally:
            self.network.train(was_training)
