"""LoRA layers: the per-layer adapter and the wrappers that stand in for adapted base layers.

One adapter (rank r, base weight W of shape out x in [x kh x kw]) computes

    y = base(x) + multiplier * (alpha / r) * up(dropout(down(x)))

`down` has the base layer's kernel, stride and padding (3x3 for LoCon convs), `up` is 1x1; this is
kohya's layout, so ComfyUI's W += strength * (alpha/r) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
gives the same function. LoRA parameters are float32 whatever the base dtype; the LoRA branch casts
its input to float32 and its result back to the base output's dtype, so a bf16/fp16 base trains
fp32 adapters without a separate master copy. (Under autocast the matmuls still run in the autocast
dtype.) Dropouts follow kohya (see `LoRAAdapter.branch`).

DoRA (ComfyUI/LyCORIS convention): a trainable magnitude `dora_scale` of shape (1, in[, 1, 1])
initialised to the column norms of W (norm over the output dim, per input feature); the adapted
weight is W' = dora_scale * (W + s*up@down) / ||W + s*up@down||_col, and a multiplier m gives
W + m * (W' - W) as in ComfyUI. Scaling input columns equals scaling the input features, so the
forward pass computes base(c*x) + s*lora(c*x) with c = dora_scale / norm, without building W'.

`LoRALinear` / `LoRAConv2d` replace an adapted nn.Linear / nn.Conv2d in its parent and register the
base layer's own Parameter objects under `weight` / `bias`, so every state-dict key of the model is
unchanged. Adapters hang under the wrapper as `lora_adapters.<tag>` (one per stacked network) so
that `.to()`, `.train()` and `.parameters()` of the model reach them, but they are left out of the
model's state dict: a checkpoint saved or loaded while a LoRA is injected holds only base weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRAAdapter", "LoRAConv2d", "LoRALinear", "column_norm"]


# ------------------------------------------------------------------------------------------------
# Adapter: the trainable low-rank pair of one layer for one network
# ------------------------------------------------------------------------------------------------
class _Linear(nn.Linear):
    """nn.Linear left uninitialised: `LoRAAdapter.reset_parameters` initialises it (once, and
    not at all on meta, where init ops are slow)."""

    def reset_parameters(self) -> None:
        pass


class _Conv2d(nn.Conv2d):
    """nn.Conv2d left uninitialised, see `_Linear`."""

    def reset_parameters(self) -> None:
        pass


class LoRAAdapter(nn.Module):
    """Low-rank update of one base layer: `lora_down` (rank r) then `lora_up`, scaled by alpha/r.

    Linear base (out, in): down = Linear(in, r), up = Linear(r, out).
    Conv2d base (out, in, kh, kw): down = Conv2d(in, r, (kh, kw), base stride/padding/dilation),
    up = Conv2d(r, out, 1). Both bias-free, float32, on the base weight's device.
    `alpha` is a Python float saved as a 0-dim `alpha` state-dict entry (so it survives `to_empty`).
    """

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        dora: bool = False,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        for name, p in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"LoRA {name} must be in [0, 1), got {p}")
        fk = {"device": base.weight.device, "dtype": torch.float32}
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"LoRA on grouped convolutions is not supported (groups={base.groups})")
            self.lora_down = _Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                bias=False, padding_mode=base.padding_mode, **fk,
            )
            self.lora_up = _Conv2d(rank, base.out_channels, 1, bias=False, **fk)
        elif isinstance(base, nn.Linear):
            self.lora_down = _Linear(base.in_features, rank, bias=False, **fk)
            self.lora_up = _Linear(rank, base.out_features, bias=False, **fk)
        else:
            raise TypeError(f"LoRA adapts nn.Linear and nn.Conv2d, not {type(base).__name__}")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout, self.rank_dropout, self.module_dropout = float(dropout), float(rank_dropout), float(module_dropout)
        self.multiplier = 1.0
        self.merged = False
        self._merge_backup: torch.Tensor | None = None
        if dora:
            shape = (1, base.weight.shape[1], *([1] * (base.weight.dim() - 2)))
            self.dora_scale = nn.Parameter(torch.empty(shape, **fk))
        else:
            self.dora_scale = None
        self.reset_parameters(base.weight)

    @property
    def scale(self) -> float:
        """alpha / rank: the factor ComfyUI and kohya apply to up @ down."""
        return self.alpha / self.rank

    @property
    def is_dora(self) -> bool:
        return self.dora_scale is not None

    @torch.no_grad()
    def reset_parameters(self, base_weight: torch.Tensor | None = None) -> None:
        """kaiming-uniform(a=sqrt(5)) `lora_down`, zero `lora_up` (the adapted layer starts equal to the
        base); DoRA magnitude = column norms of `base_weight`. Nothing to do on meta."""
        if self.lora_down.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        if self.dora_scale is not None and base_weight is not None:
            self.dora_scale.copy_(column_norm(base_weight.float()))

    # -- weights ----------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * up @ down reshaped like the base weight, float32 (no multiplier)."""
        up, down = self.lora_up.weight, self.lora_down.weight
        w = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return w * self.scale

    def adapted_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """Base weight with this adapter merged at its multiplier, float32 (ComfyUI's formula)."""
        w = base_weight.float()
        if self.dora_scale is None:
            return w + self.multiplier * self.delta_weight()
        direction = w + self.delta_weight()
        full = direction * (self.dora_scale / column_norm(direction))
        return w + self.multiplier * (full - w)

    # -- forward ----------------------------------------------------------------------------------
    def branch(self, x: torch.Tensor, out_dtype: torch.dtype, use_multiplier: bool = True) -> torch.Tensor:
        """multiplier * (alpha/r) * up(dropout(down(x))) in float32, returned in `out_dtype`
        (without the multiplier when `use_multiplier` is False).

        Dropouts follow kohya: `dropout` on the rank-r activations, `rank_dropout` zeroes whole
        rank channels per sample (rescaled by 1/(1-p)); both only in training mode.
        """
        u, scale = self.update(x, use_multiplier)
        return (u * scale).to(out_dtype)

    def update(self, x: torch.Tensor, use_multiplier: bool = True) -> tuple[torch.Tensor, float]:
        """(up(dropout(down(x))), scale) with the scale not yet applied, so the caller can fold it
        into an add. The branch runs in float32 unless autocast picks the compute dtype."""
        if x.dtype != self.lora_down.weight.dtype and not _autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        h = self.lora_down(x)
        scale = self.scale * self.multiplier if use_multiplier else self.scale
        if self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout > 0:
            keep = torch.rand(h.shape[0], self.rank, device=h.device) >= self.rank_dropout
            if h.dim() == 3:  # (B, T, r) tokens
                keep = keep[:, None, :]
            elif h.dim() == 4:  # (B, r, H, W) maps
                keep = keep[:, :, None, None]
            h = h * keep.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h), scale

    def dora_input_scale(self, base_weight: torch.Tensor) -> torch.Tensor:
        """c = dora_scale / ||W + s*up@down||_col, shaped to multiply the input: (in,) for Linear
        inputs (..., in), (1, in, 1, 1) for conv maps."""
        direction = base_weight.float() + self.delta_weight()
        c = self.dora_scale / column_norm(direction)
        return c.reshape(-1) if base_weight.dim() == 2 else c

    def skipped(self) -> bool:
        """Module dropout (kohya): in training, skip the whole adapter with probability p."""
        return self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout

    # -- alpha in the state dict ------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "alpha"] = torch.tensor(self.alpha, dtype=torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "alpha"
        if key in state_dict:
            self.alpha = float(state_dict[key])
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k != key}, prefix, local_metadata, strict,
            missing_keys, unexpected_keys, error_msgs,
        )

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, dora={self.is_dora}, multiplier={self.multiplier:g}"


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled, False on devices without autocast (meta: shape/memory tracing)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of W over every dim but the input one: (1, in[, 1, 1]) for W (out, in[, kh, kw])."""
    dims = [0, *range(2, weight.dim())]
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


# ------------------------------------------------------------------------------------------------
# Wrappers: stand in for the base layer in the model tree
# ------------------------------------------------------------------------------------------------
class _LoRAWrapper(nn.Module):
    """Shared logic of LoRALinear / LoRAConv2d.

    Registers the base layer's Parameters as its own `weight` / `bias` (same objects, same state-dict
    paths) and holds the original module unregistered in `base_layer`; `lora_adapters` maps a
    network tag to that network's `LoRAAdapter`. Attributes not found here (in_features,
    kernel_size, ...) are read from the base layer.
    """

    is_lora_wrapper = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.weight = base.weight
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias
        self.lora_adapters = nn.ModuleDict()
        # Set last: `__getattr__` falls back to it, which would shadow the registrations above.
        object.__setattr__(self, "base_layer", base)
        # The model's state dict stays exactly the base one (a checkpoint saved or loaded while a
        # LoRA is injected is a plain checkpoint); adapters are saved by their LoRANetwork.
        self.register_state_dict_post_hook(_drop_adapter_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_adapter_keys)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = [a for a in self.lora_adapters.values() if not a.merged and not a.skipped()]
        doras = [a for a in active if a.is_dora]
        if len(doras) > 1:
            raise RuntimeError("two unmerged DoRA adapters on one layer; merge one of them first")
        if doras:
            d = doras[0]
            c = d.dora_input_scale(self.weight)
            xs = x * c.to(x.dtype)
            y_dora = self.base_forward(xs)
            y_dora = y_dora + d.branch(xs, y_dora.dtype, use_multiplier=False)
            # Multiplier m interpolates between base and DoRA output, as ComfyUI's strength does.
            y = y_dora if d.multiplier == 1.0 else torch.lerp(self.base_forward(x), y_dora, d.multiplier)
            for a in active:
                if not a.is_dora:
                    y = y + a.branch(x, y.dtype)
            return y
        # Plain adapters: token-major 2-D matmuls and the scale folded into an in-place add keep
        # the autograd graph small (the base output is not needed by its own backward).
        shape = x.shape
        # (rank dropout draws one mask per sample, so it needs the batch axis kept)
        flat = isinstance(self, LoRALinear) and x.dim() > 2 and not any(a.training and a.rank_dropout > 0 for a in active)
        if flat:
            x = x.reshape(-1, shape[-1])
        y = self.base_forward(x)
        for a in active:
            u, scale = a.update(x)
            y = y.add_(u.to(y.dtype), alpha=scale)
        return y.view(*shape[:-1], y.shape[-1]) if flat else y

    def restore(self) -> nn.Module:
        """The original module with the current Parameters (they may have been re-created by
        `to_empty` / `to(device)` after injection)."""
        base = self.base_layer
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        return base


def _drop_adapter_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "lora_adapters.")]:
        del state_dict[key]


def _ignore_missing_adapter_keys(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".lora_adapters." not in k]


class LoRALinear(_LoRAWrapper):
    """nn.Linear with stacked LoRA adapters; x (..., in) -> (..., out)."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LoRAConv2d(_LoRAWrapper):
    """nn.Conv2d with stacked LoRA adapters; x (B, in, H, W) -> (B, out, H', W')."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.weight, self.bias)
