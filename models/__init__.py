"""Native PyTorch modules for Stable Diffusion XL / SD1.5 / SD2 and their LoRA adapters.

Public API (stable):

    from models import UNet, UNetConfig, AutoencoderKL, VAEConfig, CLIPTextEncoder, CLIPTextConfig, CLIPTokenizer
    bundle = models.build_model("sdxl", device="meta")
    bundle = models.load_model("path/or/hub-id")
    net = models.inject_lora(bundle, unet="kohya", rank=16)
    net = models.load_lora(bundle, "file.safetensors")

Names resolve lazily so that importing one module does not import every other one.
"""
from .lazy import lazy_exports

_EXPORTS = {
    "UNet": "models.unet",
    "UNetConfig": "models.unet",
    "AutoencoderKL": "models.vae",
    "VAEConfig": "models.vae",
    "DiagonalGaussian": "models.vae",
    "CLIPTextEncoder": "models.clip",
    "CLIPTextConfig": "models.clip",
    "CLIPTextOutput": "models.clip",
    "CLIPTokenizer": "models.tokenizer",
    "FluxTransformer": "models.flux",
    "FluxConfig": "models.flux",
    "T5Encoder": "models.t5",
    "T5Config": "models.t5",
    "T5Tokenizer": "models.t5_tokenizer",
    "ModelBundle": "models.bundle",
    "FamilySpec": "models.families",
    "register_family": "models.families",
    "FAMILIES": "models.bundle",
    "build_model": "models.bundle",
    "load_model": "models.checkpoints.loading",
    "ModelLoadError": "models.checkpoints.loading",
    "LoRALinear": "models.lora.layers",
    "LoRAConv2d": "models.lora.layers",
    "LoRANetwork": "models.lora.network",
    "inject_lora": "models.lora.network",
    "LoRAOptions": "models.lora.options",
    "load_lora": "models.lora.files",
    "LoRAFileError": "models.lora.files",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
