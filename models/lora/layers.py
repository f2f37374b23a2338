"""LoRA layers: the per-layer adapter and the wrappers that stand in for adapted base layers.

`Adapter` is what every adapter kind shares (multiplier, merge state, module dropout, DoRA
magnitude, alpha in the state dict, W + m * delta); `LoRAAdapter` is the low-rank pair below, and
`models.lora.lycoris` adds LoHa, LoKr and full-weight differences on the same base.

One LoRA adapter (rank r, base weight W of shape out x in [x kh x kw]) computes

    y = base(x) + multiplier * (alpha / r) * up(dropout(down(x)))

`down` has the base layer's kernel, stride and padding (3x3 for LoCon convs), `up` is 1x1; this is
kohya's layout (with `tucker`, LyCORIS's LoCon core: `down` 1x1, `lora_mid` r x r with the kernel,
`up` 1x1, so the update is up @ (mid x_1 down)), so ComfyUI's W += strength * (alpha/r) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
gives the same function. LoRA parameters are float32 whatever the base dtype; the LoRA branch casts
its input to float32 and its result back to the base output's dtype, so a bf16/fp16 base trains
fp32 adapters without a separate master copy. (Under autocast the matmuls still run in the autocast
dtype.) Dropouts follow kohya (see `LoRAAdapter.branch`).

DoRA (ComfyUI/LyCORIS convention): a trainable magnitude `dora_scale` of shape (1, in[, 1, 1])
initialised to the column norms of W (norm over the output dim, per input feature); the adapted
weight is W' = dora_scale * (W + s*up@down) / ||W + s*up@down||_col, and a multiplier m gives
W + m * (W' - W) as in ComfyUI. Scaling input columns equals scaling the input features, so the
forward pass computes base(c*x) + s*lora(c*x) with c = dora_scale / norm, without building W'.
Files from LyCORIS may instead hold a per-output magnitude (out, 1[, 1, 1]) (its default
`wd_on_out`): W' = dora_scale * (W + D) / ||W + D||_row, which scales output features instead
(the norm of the adapted weight, as LyCORIS trains it).

`LoRALinear` / `LoRAConv2d` replace an adapted nn.Linear / nn.Conv2d in its parent and register the
base layer's own Parameter objects under `weight` / `bias`, so every state-dict key of the model is
unchanged. Adapters hang under the wrapper as `lora_adapters.<tag>` (one per stacked network) so
that `.to()`, `.train()` and `.parameters()` of the model reach them, but they are left out of the
model's state dict: a checkpoint saved or loaded while a LoRA is injected holds only base weights.

Quantized bases (`models.quant`: QuantLinear / QuantConv2d, fp8 / int8 / NF4 frozen weights) are
wrapped the same way: the wrapper registers the base's packed `qweight` / `qscale` Parameters and
runs the base layer's own op on them (`forward_with`), which dequantizes inside the layer and keeps
no full-size weight for backward. Where an adapter needs W itself (DoRA's norms, the DoRA
magnitude's initial value), it is dequantized once per use (`base_weight`) and shared by the norm
and the base op of that forward pass. Merging into a quantized base is refused by `LoRANetwork.merge`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.layers import QuantConv2d, QuantLinear, is_quantized

__all__ = ["ADAPTABLE", "Adapter", "LoRAAdapter", "LoRAConv2d", "LoRALinear", "column_norm", "draw_module_dropout",
           "base_device", "full_weight", "is_conv", "row_norm", "weight_shape"]

ADAPTABLE = (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)
"""Layer types an adapter can wrap: full-precision or quantized Linear / Conv2d."""


def is_conv(layer: nn.Module) -> bool:
    """Whether `layer` (a base layer, not a wrapper) is a convolution (full-precision or quantized)."""
    return isinstance(layer, (nn.Conv2d, QuantConv2d))


def weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """Shape of the (full) weight of a base layer or wrapper: (out, in) or (out, in, kh, kw)."""
    base = layer.__dict__.get("base_layer", layer)
    return tuple(base.weight_shape) if is_quantized(base) else tuple(base.weight.shape)


def full_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of a base layer: its Parameter, or for a quantized layer a dequantized copy
    (in `dtype`, default its compute dtype)."""
    return layer.dequantize(dtype=dtype) if is_quantized(layer) else layer.weight


def base_device(layer: nn.Module) -> torch.device:
    """Device of a base layer's weight (packed or not)."""
    return layer.qweight.device if is_quantized(layer) else layer.weight.device


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


class Adapter(nn.Module):
    """What every adapter kind shares: one per (base layer, network).

    Subclasses define `delta_weight` (the update D, float32, shaped like the base weight, scale
    applied, no multiplier), `update` (the branch output before scale for an input x) and
    `file_tensors` (their tensors under the file's key suffixes). This base holds the multiplier
    (ComfyUI strength), the merge state, the module-dropout factor, an optional DoRA magnitude
    and `alpha` (a Python float saved as a 0-dim `alpha` state-dict entry, so it survives
    `to_empty`).
    """

    algo = "?"
    """Name of the algorithm (`lora`, `loha`, `lokr`, `full`)."""
    has_alpha = True
    """Whether files carry an `alpha` for it (full-weight differences do not)."""
    tucker = False
    """Whether 3x3 convs carry a Tucker core (set by the kinds that have one)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, *, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, dora: bool | str = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        for name, p in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"LoRA {name} must be in [0, 1), got {p}")
        if is_conv(base):
            if base.groups != 1:
                raise ValueError(f"LoRA on grouped convolutions is not supported (groups={base.groups})")
        elif not isinstance(base, ADAPTABLE):
            raise TypeError(f"LoRA adapts nn.Linear and nn.Conv2d (full-precision or quantized), not "
                            f"{type(base).__name__}")
        self.weight_shape = weight_shape(base)
        """Shape of the adapted weight: (out, in) or (out, in, kh, kw)."""
        self.conv_args = ((base.stride, base.padding, base.dilation) if is_conv(base) else None)
        """stride, padding, dilation of a conv base (None for Linear): how a full-size update runs."""
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout, self.rank_dropout, self.module_dropout = float(dropout), float(rank_dropout), float(module_dropout)
        self.multiplier = 1.0
        self.merged = False
        self._keep: torch.Tensor | None = None
        """Module-dropout factor of the current forward pass: 0-dim float32 on the adapter's
        device, 1 keeps the adapter and 0 drops it (set by `draw_module_dropout`)."""
        self._merge_backup: torch.Tensor | None = None
        self._bias_backup: torch.Tensor | None = None
        axis = {False: None, None: None, True: "in", "in": "in", "out": "out"}.get(dora, "?")
        if axis == "?":
            raise ValueError(f"dora must be False, True/'in' (per input channel) or 'out' (per output), got {dora!r}")
        self.dora_axis: str | None = axis
        """None, `in` (magnitude per input channel) or `out` (per output channel)."""
        self.dora_scale: nn.Parameter | None = None

    def _finish_init(self, base: nn.Linear | nn.Conv2d) -> None:
        """Last step of a subclass's __init__: the DoRA magnitude (registered after the update's
        parameters, so state dicts list them first) and the initial values."""
        if self.dora_axis is not None:
            out, inn, *k = self.weight_shape
            shape = (1, inn) if self.dora_axis == "in" else (out, 1)
            self.dora_scale = nn.Parameter(torch.empty(*shape, *([1] * len(k)), device=base_device(base),
                                                       dtype=torch.float32))
        # DoRA's magnitude starts at the norms of W: a quantized base dequantizes it once for that.
        on_meta = base_device(base).type == "meta"
        self.reset_parameters(full_weight(base, torch.float32) if self.dora_axis is not None and not on_meta else None)

    @property
    def scale(self) -> float:
        """alpha / rank: the factor ComfyUI and kohya apply to up @ down."""
        return self.alpha / self.rank

    @property
    def is_dora(self) -> bool:
        return self.dora_scale is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- to be defined by each kind -----------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The update D, float32, shaped like the base weight, scale applied, no multiplier."""
        raise NotImplementedError

    def update(self, x: torch.Tensor, use_multiplier: bool = True) -> tuple[torch.Tensor, float]:
        """(branch output before scale, scale): the caller adds u * scale to the base output."""
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Trainable tensors under their file key suffixes (`lora_down.weight`, `hada_w1_a`, ...)."""
        raise NotImplementedError

    def init_weights(self) -> None:
        """Initialise the update's parameters (the update itself starts at zero)."""
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        """Update of the base bias (out,), float32, or None (only full-weight differences have one)."""
        return None

    # -- shared -----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, base_weight: torch.Tensor | None = None) -> None:
        """`init_weights`; DoRA magnitude = norms of `base_weight`. Nothing to do on meta."""
        if next(self.parameters()).is_meta:
            return
        self.init_weights()
        if self.dora_scale is not None and base_weight is not None:
            norm = column_norm if self.dora_axis == "in" else row_norm
            self.dora_scale.copy_(norm(base_weight.float()))

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Every file tensor of this module by key suffix: `file_tensors`, `dora_scale`, 0-dim `alpha`."""
        out = {k: t.detach() for k, t in self.file_tensors().items()}
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.detach()
        if self.has_alpha:
            out["alpha"] = torch.tensor(self.alpha, dtype=torch.float32, device=self.device)
        return out

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file tensors (suffix -> tensor, any float dtype, same element count) into the parameters."""
        own = dict(self.file_tensors())
        if self.dora_scale is not None:
            own["dora_scale"] = self.dora_scale
        for key, param in own.items():
            param.copy_(tensors[key].reshape(param.shape))

    def adapted_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """Base weight with this adapter merged at its multiplier, float32 (ComfyUI's formula)."""
        w = base_weight.float()
        if self.dora_scale is None:
            return w + self.multiplier * self.delta_weight()
        direction = w + self.delta_weight()
        norm = column_norm if self.dora_axis == "in" else row_norm
        full = direction * (self.dora_scale / norm(direction))
        return w + self.multiplier * (full - w)

    def branch(self, x: torch.Tensor, out_dtype: torch.dtype, use_multiplier: bool = True) -> torch.Tensor:
        """multiplier * scale * update(x) in float32, returned in `out_dtype` (without the
        multiplier when `use_multiplier` is False)."""
        u, scale = self.update(x, use_multiplier)
        return (u * scale).to(out_dtype)

    def dora_input_scale(self, base_weight: torch.Tensor) -> torch.Tensor:
        """c = dora_scale / ||W + D||_col, shaped to multiply the input: (in,) for Linear
        inputs (..., in), (1, in, 1, 1) for conv maps."""
        direction = base_weight.float() + self.delta_weight()
        c = self.dora_scale / column_norm(direction)
        return c.reshape(-1) if base_weight.dim() == 2 else c

    def dora_output_scale(self, base_weight: torch.Tensor) -> torch.Tensor:
        """c = dora_scale / ||W + D||_row, shaped to multiply the output: (out,) for Linear
        outputs (..., out), (1, out, 1, 1) for conv maps."""
        direction = base_weight.float() + self.delta_weight()
        c = (self.dora_scale / row_norm(direction)).reshape(-1)
        return c if base_weight.dim() == 2 else c[None, :, None, None]

    def module_keep(self) -> torch.Tensor | None:
        """This forward pass's module-dropout factor (0-dim, 0 or 1), or None when the adapter
        always runs (evaluation, no module dropout, or no decision drawn)."""
        if self.training and self.module_dropout > 0:
            return self._keep
        return None

    def input_as_float(self, x: torch.Tensor) -> torch.Tensor:
        """x in the adapter's float32 unless autocast picks the compute dtype."""
        if x.dtype != torch.float32 and not _autocast_enabled(x.device.type):
            return x.float()
        return x

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer's operation with another weight: F.linear, or F.conv2d with the base
        conv's stride/padding/dilation."""
        if self.conv_args is None:
            return F.linear(x, weight, bias)
        stride, padding, dilation = self.conv_args
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    # -- alpha in the state dict ------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.has_alpha:
            destination[prefix + "alpha"] = torch.tensor(self.alpha, dtype=torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "alpha"
        if key in state_dict:
            self.alpha = float(state_dict[key])
        elif strict and self.has_alpha:
            missing_keys.append(key)
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k != key}, prefix, local_metadata, strict,
            missing_keys, unexpected_keys, error_msgs,
        )

    def extra_repr(self) -> str:
        return (f"algo={self.algo}, rank={self.rank}, alpha={self.alpha:g}, dora={self.dora_axis or False}, "
                f"multiplier={self.multiplier:g}")


class LoRAAdapter(Adapter):
    """Low-rank update of one base layer: `lora_down` (rank r) then `lora_up`, scaled by alpha/r.

    Linear base (out, in): down = Linear(in, r), up = Linear(r, out).
    Conv2d base (out, in, kh, kw): down = Conv2d(in, r, (kh, kw), base stride/padding/dilation),
    up = Conv2d(r, out, 1); with `tucker` and a kernel other than 1x1: down = Conv2d(in, r, 1),
    `lora_mid` = Conv2d(r, r, (kh, kw), base stride/padding/dilation). All bias-free, float32, on
    the base weight's device.
    """

    algo = "lora"

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        dora: bool | str = False,
        tucker: bool = False,
    ):
        super().__init__(base, rank, alpha, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                         dora=dora)
        fk = {"device": base_device(base), "dtype": torch.float32}
        self.lora_mid = None
        if is_conv(base):
            conv = (base.stride, base.padding, base.dilation)
            if tucker and tuple(base.kernel_size) != (1, 1):
                self.lora_down = _Conv2d(base.in_channels, rank, 1, bias=False, **fk)
                self.lora_mid = _Conv2d(rank, rank, base.kernel_size, *conv, bias=False,
                                        padding_mode=base.padding_mode, **fk)
            else:
                self.lora_down = _Conv2d(base.in_channels, rank, base.kernel_size, *conv, bias=False,
                                         padding_mode=base.padding_mode, **fk)
            self.lora_up = _Conv2d(rank, base.out_channels, 1, bias=False, **fk)
        else:
            self.lora_down = _Linear(base.in_features, rank, bias=False, **fk)
            self.lora_up = _Linear(rank, base.out_features, bias=False, **fk)
        self._finish_init(base)

    @property
    def tucker(self) -> bool:
        return self.lora_mid is not None

    def init_weights(self) -> None:
        """kaiming-uniform(a=sqrt(5)) `lora_down` (and `lora_mid`), zero `lora_up` (the adapted
        layer starts equal to the base)."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.lora_mid is not None:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}
        if self.lora_mid is not None:
            out["lora_mid.weight"] = self.lora_mid.weight
        return out

    # -- weights ----------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * up @ down reshaped like the base weight, float32 (no multiplier); with a
        Tucker core, down is first replaced by mid x_1 down (r, in, kh, kw)."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if self.lora_mid is not None:
            down = torch.einsum("abhw,bi->aihw", self.lora_mid.weight, down.flatten(1))
        w = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return w * self.scale

    # -- forward ----------------------------------------------------------------------------------
    def update(self, x: torch.Tensor, use_multiplier: bool = True) -> tuple[torch.Tensor, float]:
        """(up(dropout(down(x))), scale) with the scale not yet applied, so the caller can fold it
        into an add. The branch runs in float32 unless autocast picks the compute dtype.

        Dropouts follow kohya: `dropout` on the rank-r activations, `rank_dropout` zeroes whole
        rank channels per sample (rescaled by 1/(1-p)); both only in training mode. Module dropout
        multiplies the rank-r activations by this pass's 0/1 factor (see `draw_module_dropout`).
        """
        if x.dtype != self.lora_down.weight.dtype and not _autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        h = self.lora_down(x)
        if self.lora_mid is not None:
            h = self.lora_mid(h)
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
        if (keep_module := self.module_keep()) is not None:
            h = h * keep_module
        return self.lora_up(h), scale


def draw_module_dropout(adapters: list[Adapter]) -> None:
    """Draw the module-dropout decisions of one forward pass for `adapters` (kohya: each adapter
    is dropped with probability `module_dropout`).

    One `torch.rand(n)` from the global CPU generator for the n adapters in training mode with
    module dropout, in the order given, so a resumed run (which restores that generator) draws
    the same decisions. The 0/1 factors reach each device in one pinned, non-blocking copy, and
    adapters multiply by them instead of branching: no per-layer host read, and a compiled
    block sees a tensor, not a Python condition that would break its graph. A dropped adapter
    therefore gets zero gradients (not none) for that pass.
    """
    live = [a for a in adapters if a.training and a.module_dropout > 0]
    if not live:
        return
    p = torch.tensor([a.module_dropout for a in live])
    keep = (torch.rand(len(live)) >= p).float()
    devices = {a.device for a in live}
    on_device = {d: keep.pin_memory().to(d, non_blocking=True) if d.type == "cuda" else keep.to(d) for d in devices}
    for i, a in enumerate(live):
        a._keep = on_device[a.device][i]


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


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of W over every dim but the output one: (out, 1[, 1, 1]) for W (out, in[, kh, kw])."""
    return torch.linalg.vector_norm(weight, dim=list(range(1, weight.dim())), keepdim=True)


# ------------------------------------------------------------------------------------------------
# Wrappers: stand in for the base layer in the model tree
# ------------------------------------------------------------------------------------------------
class _LoRAWrapper(nn.Module):
    """Shared logic of LoRALinear / LoRAConv2d.

    Registers the base layer's Parameters as its own `weight` / `bias` (a quantized base:
    `qweight` / `qscale` / `bias`; same objects, same state-dict paths) and holds the original
    module unregistered in `base_layer`; `lora_adapters` maps a network tag to that network's
    `Adapter` (any kind). Attributes not found here (in_features, kernel_size, ...) are read from
    the base layer.
    """

    is_lora_wrapper = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.quantization: str | None = base.quant_format if is_quantized(base) else None
        """Weight format of a quantized base (`fp8`, `int8`, `nf4`), None for a full-precision one."""
        if self.quantization is None:
            self.weight = base.weight
        else:
            self.qweight, self.qscale = base.qweight, base.qscale
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

    def base_forward(self, x: torch.Tensor, with_bias: bool = True, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer's output for x; `weight`: the base weight already at hand (`base_weight`),
        so that a quantized base is not dequantized twice in one forward pass."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """W: the base Parameter, or for a quantized base its dequantized copy in the compute dtype
        (a new tensor each call)."""
        if self.quantization is None:
            return self.weight
        return self.base_layer.dequantize(self.qweight, self.qscale)

    def _output_dora_forward(self, x: torch.Tensor, d: Adapter, others: list[Adapter]) -> torch.Tensor:
        """Per-output DoRA: y = Wx + b + m * (c * (Wx + Dx) - Wx) with c = dora_scale / ||W + D||_row
        (ComfyUI's strength rule), then the other adapters' branches."""
        w = self.base_weight()
        wx = self.base_forward(x, with_bias=False, weight=w)
        u, s = d.update(x, use_multiplier=False)
        full = (wx + u.to(wx.dtype) * s) * d.dora_output_scale(w).to(wx.dtype)
        keep = d.module_keep()
        gain = d.multiplier if keep is None else (keep * d.multiplier).to(wx.dtype)
        y = self.base_forward(x, weight=w) + (full - wx) * gain
        for a in others:
            y = y + a.branch(x, y.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = [a for a in self.lora_adapters.values() if not a.merged]
        doras = [a for a in active if a.is_dora]
        if len(doras) > 1:
            raise RuntimeError("two unmerged DoRA adapters on one layer; merge one of them first")
        if doras:
            d = doras[0]
            if d.dora_axis == "out":
                return self._output_dora_forward(x, d, [a for a in active if a is not d])
            w = self.base_weight()
            c = d.dora_input_scale(w)
            xs = x * c.to(x.dtype)
            y_dora = self.base_forward(xs, weight=w)
            y_dora = y_dora + d.branch(xs, y_dora.dtype, use_multiplier=False)
            # Multiplier m interpolates between base and DoRA output, as ComfyUI's strength does;
            # a module-dropped DoRA adapter leaves the base output (its factor is 0).
            keep = d.module_keep()
            if keep is not None:
                base = self.base_forward(x, weight=w)
                y = base + (y_dora - base) * (keep * d.multiplier).to(y_dora.dtype)
            elif d.multiplier == 1.0:
                y = y_dora
            else:
                y = torch.lerp(self.base_forward(x, weight=w), y_dora, d.multiplier)
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
        y = self._add(x, self.base_forward(x), active)
        return y.view(*shape[:-1], y.shape[-1]) if flat else y

    @property
    def additive(self) -> bool:
        """Whether the output is the base output plus the adapters' updates (no active DoRA adapter
        changes the base computation, and the base is full precision): then `add_updates` applies."""
        return self.quantization is None and not any(a.is_dora for a in self.lora_adapters.values() if not a.merged)

    def add_updates(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y, the base output for input x computed by the caller (e.g. by the fused kernel of the
        UNet's upsampling conv, so that at strength 0 the output stays the base's bit for bit),
        plus every active adapter's update for x, added in place. Only when `additive`."""
        return self._add(x, y, [a for a in self.lora_adapters.values() if not a.merged])

    @staticmethod
    def _add(x: torch.Tensor, y: torch.Tensor, active: list[Adapter]) -> torch.Tensor:
        for a in active:
            u, scale = a.update(x)
            y = y.add_(u.to(y.dtype), alpha=scale)
        return y

    def restore(self) -> nn.Module:
        """The original module with the current Parameters (they may have been re-created by
        `to_empty` / `to(device)` after injection)."""
        base = self.base_layer
        if self.quantization is None:
            base.weight = self.weight
        else:
            base.qweight, base.qscale = self.qweight, self.qscale
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
    """nn.Linear (or QuantLinear) with stacked LoRA adapters; x (..., in) -> (..., out)."""

    def base_forward(self, x: torch.Tensor, with_bias: bool = True, weight: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if with_bias else None
        if self.quantization is not None:
            return self.base_layer.forward_with(x, self.qweight, self.qscale, bias, weight)
        return F.linear(x, self.weight, bias)


class LoRAConv2d(_LoRAWrapper):
    """nn.Conv2d (or QuantConv2d) with stacked LoRA adapters; x (B, in, H, W) -> (B, out, H', W')."""

    def base_forward(self, x: torch.Tensor, with_bias: bool = True, weight: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if with_bias else None
        if self.quantization is not None:
            return self.base_layer.forward_with(x, self.qweight, self.qscale, bias, weight)
        return self.base_layer._conv_forward(x, self.weight, bias)
