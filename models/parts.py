"""Which module a part's config builds: `module_class(config)` (UNetConfig -> UNet, FluxConfig ->
FluxTransformer, ...), so bundles and loaders build any family's parts from their configs."""
from __future__ import annotations

from importlib import import_module

from torch import nn

# config class name -> (module, class) of the part it builds; resolved on use (no import cycle)
_PARTS = {
    "UNetConfig": ("models.unet", "UNet"),
    "FluxConfig": ("models.flux", "FluxTransformer"),
    "VAEConfig": ("models.vae", "AutoencoderKL"),
    "CLIPTextConfig": ("models.clip", "CLIPTextEncoder"),
    "T5Config": ("models.t5", "T5Encoder"),
}


def module_class(config) -> type[nn.Module]:
    """The `nn.Module` class built from `config` (a part config dataclass)."""
    try:
        module, name = _PARTS[type(config).__name__]
    except KeyError:
        raise TypeError(f"no model part is built from a {type(config).__name__}; known: {', '.join(_PARTS)}") from None
    return getattr(import_module(module), name)


def build_part(config) -> nn.Module:
    """The part for `config`, on the current default device (see `torch.device(...)` contexts)."""
    return module_class(config)(config)
