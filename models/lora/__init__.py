"""LoRA adapters: the layers that wrap base weights (`layers`), the network that injects and
trains them (`network`), the kohya/ComfyUI/diffusers key names (`names`) and the files (`files`)."""
from .files import LoRAFileError, load_lora
from .layers import LoRAConv2d, LoRALinear
from .network import LoRAConfig, LoRANetwork, inject_lora

__all__ = ["LoRAConfig", "LoRAConv2d", "LoRAFileError", "LoRALinear", "LoRANetwork", "inject_lora", "load_lora"]
