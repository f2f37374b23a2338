"""LoRA adapters: the layers that wrap base weights (`layers`), the network that injects and
trains them (`network`), its options (`options`), the kohya/ComfyUI/diffusers key names (`names`;
Flux transformer presets and names in `flux_names`, its fused layers' diffusers pieces in `pieces`)
and the files (`files`).

Names resolve lazily so that `from models.lora.options import LoRAOptions` (read by training
configs) does not import torch.
"""
from ..lazy import lazy_exports

_EXPORTS = {
    "LoRAOptions": "models.lora.options",
    "LoRAConv2d": "models.lora.layers",
    "LoRALinear": "models.lora.layers",
    "LoRANetwork": "models.lora.network",
    "inject_lora": "models.lora.network",
    "LoRAFileError": "models.lora.files",
    "load_lora": "models.lora.files",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
