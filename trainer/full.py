"""Full fine-tuning (`train.mode: full`): the model's own weights train instead of LoRA adapters.

`FullWeights` is the trained-weights object of a full run. It answers what the training loop asks
of a `LoRANetwork` (trained parameters by name, optimizer groups, checkpoint state, export,
train/eval mode), so `trainer.recipe` runs both modes with one loop, one checkpoint format and the
same resume, EMA, sample and validation code.

Which weights train: every parameter of the denoiser and, with `train.train_text_encoders`, of the
text encoders, narrowed by `train.full_targets` (regexes searched in `<component>.<parameter name>`,
components named as in `lora.include`: `unet` (the denoiser), `te` or `te1`/`te2`/`te3`). Text-encoder
parameters the family's conditioning never reads (SDXL's CLIP-L is read at its penultimate layer, so
its last layer, final norm and projection are unused) are found by one backward pass through
`bundle.conditioning` at setup and stay frozen: they would never get a gradient, and under data
parallelism a missing gradient stops the run. The VAE and everything else stay frozen.

Precision: each trained component is cast whole (a module keeps one dtype) to `train.full_dtype`:
`fp32` master weights (the default; `train.mixed_precision` autocasts the forward pass) or `bf16`
(half the weight, gradient and checkpoint memory, trained by `trainer.stochastic.StochasticAdamW`,
which rounds the fp32 update into bf16 stochastically). Frozen parts keep `model.dtype`.

Names: checkpoint tensors are `<component>.<parameter name>` (e.g. `unet.input_blocks.0.0.weight`,
`te1.text_model.embeddings.token_embedding.weight`), in the training dtype.

Export: the whole model (trained and frozen parts) as the family's single-file checkpoint
(`models.checkpoints.single_file.save_single_file`, which `models.load_model` reads back) and, with
`output.export_diffusers`, as a diffusers folder `<stem>-diffusers/` beside it.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .config import torch_dtype


class FullWeights:
    """The trained weights of a full fine-tuning run over `bundle` (see module docstring).

    train: the `TrainConfig` (`train_text_encoders`, `full_targets`, `full_dtype`, `seed`);
    export_diffusers: also write a diffusers folder at each export.
    Raises ValueError (one line, naming the key) when the selection leaves nothing to train.
    """

    def __init__(self, bundle, train, export_diffusers: bool = False) -> None:
        from models.lora.names import components_of

        self.bundle, self.export_diffusers, self.seed = bundle, export_diffusers, train.seed
        self.dtype = torch_dtype(train.full_dtype)
        parts = components_of(bundle)
        trained = {"unet": parts["unet"]}
        if train.train_text_encoders:
            trained.update({name: module for name, module in parts.items() if name != "unet"})
        self.components: dict[str, nn.Module] = trained
        for module in trained.values():
            module.to(dtype=self.dtype)
        unread = _unread_text_parameters(bundle, {n: m for n, m in trained.items() if n != "unet"})
        patterns = [re.compile(p) for p in train.full_targets or []]
        self._params: dict[str, nn.Parameter] = {}
        for component, module in trained.items():
            for name, p in module.named_parameters():
                key = f"{component}.{name}"
                if key in unread or (patterns and not any(r.search(key) for r in patterns)):
                    continue
                self._params[key] = p
        if not self._params:
            raise ValueError(f"full_targets: {train.full_targets!r} matches no trainable parameter of "
                             f"{', '.join(trained)} (names like `unet.input_blocks.0.0.weight`)")
        if train.train_text_encoders and not any(k.split(".", 1)[0] != "unet" for k in self._params):
            raise ValueError(f"full_targets: {train.full_targets!r} matches no text-encoder parameter but "
                             "train.train_text_encoders is true; widen the regexes or set it to false")
        for p in self._params.values():
            p.requires_grad_(True)
        self.training = True
        self.train()

    # ---- what the loop reads ---------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trained parameters as (`<component>.<name>`, parameter)."""
        return iter(self._params.items())

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self._params.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights by name (detached views, training dtype): the checkpoint's weights."""
        return {k: p.detach() for k, p in self._params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` (same names and shapes as `state_dict`, checked by the caller) into the weights."""
        for key, p in self._params.items():
            p.copy_(state[key])

    def to(self, device) -> FullWeights:
        for module in self.components.values():
            module.to(device)
        return self

    def train(self, mode: bool = True) -> FullWeights:
        """Train mode for the trained components (dropout on, where a model has any); the frozen
        parts stay in eval mode."""
        self.training = mode
        for module in self.components.values():
            module.train(mode)
        return self

    def eval(self) -> FullWeights:
        return self.train(False)

    def param_groups(self, lr: float, te_lr: float | None = None, *, lora_plus_ratio: float | None = None,
                     unet_block_lr: dict[str, float] | None = None) -> list[dict]:
        """Optimizer groups: `denoiser` at `lr`, `text_encoders` at `te_lr` (default `lr`); empty groups
        are left out. LoRA+ ratios and UNet block multipliers belong to LoRA training (ValueError)."""
        if lora_plus_ratio is not None or unet_block_lr is not None:
            raise ValueError("optim.lora_plus_ratio and the UNet block learning-rate multipliers apply to LoRA "
                             "adapters only; remove them for train.mode: full")
        denoiser = [p for k, p in self._params.items() if k.startswith("unet.")]
        text = [p for k, p in self._params.items() if not k.startswith("unet.")]
        groups = [{"name": "denoiser", "params": denoiser, "lr": lr}] if denoiser else []
        if text:
            groups.append({"name": "text_encoders", "params": text, "lr": lr if te_lr is None else te_lr})
        return groups

    def build_optimizer(self, groups: list[dict], cfg, allow_fused: bool = True) -> torch.optim.Optimizer:
        """The optimizer of `optim` (`cfg`) over `groups`: any of `trainer.optim` for fp32 weights;
        for bf16 weights AdamW with stochastic rounding (`trainer.stochastic.StochasticAdamW`)."""
        from .optim import build_optimizer

        if self.dtype == torch.float32:
            return build_optimizer(groups, cfg, allow_fused=allow_fused)
        if cfg.name != "adamw":
            raise ValueError(f"train.full_dtype: bf16 weights train with AdamW and stochastic rounding only; set "
                             f"optim.name: adamw (got {cfg.name}) or train.full_dtype: fp32")
        from .stochastic import StochasticAdamW

        return StochasticAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                               weight_decay=cfg.weight_decay, seed=self.seed)

    # ---- export ----------------------------------------------------------------------------
    def save(self, path: str | Path, dtype: torch.dtype | None = torch.float16, metadata: dict | None = None) -> Path:
        """Write the whole model (its current weights) as the family's single-file checkpoint at
        `path` (floating tensors in `dtype`; None keeps each part's dtype) and, with
        `export_diffusers`, as the diffusers folder `<stem>-diffusers/` beside it. Atomic per file."""
        from models.checkpoints.single_file import save_single_file

        path = Path(path)
        save_single_file(self.bundle, path, dtype=dtype, metadata=metadata)
        if self.export_diffusers:
            from models.checkpoints.diffusers_folder import save_diffusers

            save_diffusers(self.bundle, path.with_name(f"{path.stem}-diffusers"), dtype=dtype)
        return path


def _unread_text_parameters(bundle, encoders: dict[str, nn.Module]) -> set[str]:
    """`<component>.<name>` of the encoder parameters that get no gradient from the family's
    conditioning of an empty prompt (one forward and backward pass; nothing else changes)."""
    if not encoders:
        return set()
    params = {f"{c}.{n}": p for c, m in encoders.items() for n, p in m.named_parameters()}
    flags = {k: p.requires_grad for k, p in params.items()}
    try:
        with torch.enable_grad():
            for p in params.values():
                p.requires_grad_(True)
                p.grad = None
            cond = bundle.conditioning(bundle.tokenize([""]))
            total = sum(v.float().sum() for v in cond.values() if v is not None and v.requires_grad)
            total.backward()
        return {k for k, p in params.items() if p.grad is None}
    finally:
        for k, p in params.items():
            p.grad = None
            p.requires_grad_(flags[k])
