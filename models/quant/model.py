"""Which layers of a frozen model are quantized, and quantizing them in place.

The rule (`quantizable`), the same for the denoiser and the text encoders:

- every nn.Linear, and every nn.Conv2d with groups 1 and numeric zero padding (all of them in
  the UNet: ResBlock 3x3 convs, skip 1x1 convs, resamplers, transformer proj_in/out) ...
- ... with at least `MIN_PARAMS` (4096) weights: smaller layers save nothing worth an extra op;
- ... that reads and writes more than `EDGE_CHANNELS` (16) features: the layers at the edges of
  latent space (the UNet's `conv_in` and `conv_out`, 4 channels) stay exact, since their error
  reaches the prediction directly and they are tiny.

Norms, embeddings (CLIP token / position tables), biases and everything else keep the compute
dtype. For SDXL that quantizes 792 of 794 UNet layers (99.999 % of their weights) and every
Linear of both text encoders (69 % / 91 % of their parameters; the rest is the token table).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .formats import MODES
from .layers import QuantConv2d, QuantLinear, is_quantized

__all__ = ["EDGE_CHANNELS", "MIN_PARAMS", "base_quantization", "compute_dtype", "quantizable", "quantization_of", "quantize_model",
           "select_layers"]

MIN_PARAMS = 4096
"""Layers with fewer weights stay in the compute dtype."""
EDGE_CHANNELS = 16
"""Layers reading or writing at most this many features (latent / pixel space) stay in the compute dtype."""


def quantizable(layer: nn.Module) -> bool:
    """Whether the default rule quantizes `layer` (see the module docstring)."""
    if isinstance(layer, nn.Linear):
        ins, outs = layer.in_features, layer.out_features
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return False
        ins, outs = layer.in_channels, layer.out_channels
    else:
        return False
    return layer.weight.numel() >= MIN_PARAMS and min(ins, outs) > EDGE_CHANNELS


def select_layers(module: nn.Module, which: Callable[[str, nn.Module], bool] | None = None) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every layer of `module` to quantize: `which(path, layer)`, default
    `quantizable(layer)`. Refuses a module with LoRA adapters injected (quantize first)."""
    chosen = []
    for path, layer in module.named_modules():
        if getattr(layer, "is_lora_wrapper", False):
            raise ValueError(f"cannot quantize {path}: it carries LoRA adapters; quantize the base model before "
                             "injecting or loading a LoRA")
        if which(path, layer) if which is not None else quantizable(layer):
            chosen.append((path, layer))
    return chosen


def replace_layer(module: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` of `module` (a direct child of its parent)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    parent._modules[leaf] = new


def quant_class(layer: nn.Module) -> type[QuantLinear] | type[QuantConv2d]:
    return QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear


def check_mode(mode: str, what: str = "quantize") -> None:
    if mode not in MODES:
        raise ValueError(f"{what}: unknown mode {mode!r}; use one of {', '.join(MODES)}")


@torch.no_grad()
def quantize_model(module: nn.Module, mode: str, *, which: Callable[[str, nn.Module], bool] | None = None,
                   compute_dtype: torch.dtype | None = None) -> int:
    """Replace the chosen layers of `module` (see `select_layers`) by QuantLinear / QuantConv2d in
    format `mode` (`none`: nothing), in place, one layer at a time (peak memory: the model plus
    one layer's temporaries). Compute dtype: `compute_dtype` or each layer's weight dtype.
    Works on meta (shapes only). Returns the number of layers quantized."""
    check_mode(mode)
    if mode == "none":
        return 0
    layers = select_layers(module, which)
    for path, layer in layers:
        replace_layer(module, path, quant_class(layer).from_module(layer, mode, compute_dtype))
    return len(layers)


def quantization_of(module: nn.Module) -> str | None:
    """The format of `module`'s quantized layers (seen through LoRA wrappers), None if it has
    none, or `mixed` for several formats."""
    found = {m.quant_format for m in _bases(module.modules()) if is_quantized(m)}
    if not found:
        return None
    return found.pop() if len(found) == 1 else "mixed"


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in: that of its first layer with weights (a quantized layer's
    `compute_dtype`, seen through a LoRA wrapper, else the dtype of its first floating-point
    Parameter); float32 for a module without any. The packed uint8/int8 weights and the fp32
    scales of quantized layers say nothing about it."""
    for m in module.modules():
        base = m.__dict__.get("base_layer", m) if getattr(m, "is_lora_wrapper", False) else m
        if is_quantized(base):
            return base.compute_dtype
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def base_quantization(bundle) -> dict[str, str]:
    """{part: format} for each part of a `ModelBundle` with quantized layers (`unet`,
    `text_encoder`, ...); empty for a full-precision model. LoRA exports record it as metadata."""
    found = {part: quantization_of(module) for part, module in bundle.modules().items() if module is not None}
    return {part: fmt for part, fmt in found.items() if fmt is not None}


def _bases(modules: Iterable[nn.Module]) -> Iterable[nn.Module]:
    for m in modules:
        yield m.__dict__.get("base_layer", m) if getattr(m, "is_lora_wrapper", False) else m

