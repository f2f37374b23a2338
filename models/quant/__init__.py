"""Frozen base weights stored quantized: fp8, int8 or NF4 (`model.quantize`,
`model.quantize_text_encoders`).

formats   quantize / dequantize one weight per format (byte layouts, bitsandbytes-compatible)
layers    QuantLinear / QuantConv2d: packed weight + scales, dequantized inside each forward
model     which layers are quantized (`quantizable`) and `quantize_model`
loading   quantize while a checkpoint loads (`LoadQuantizer`, used by `materialize`)
cuda      bitsandbytes' CUDA kernel for NF4 dequantization

LoRA adapters of every kind wrap quantized layers as they wrap full-precision ones
(`models.lora.layers`); merging into a quantized layer is refused.

Names resolve lazily, as in `models.lora`.
"""
from ..lazy import lazy_exports

_EXPORTS = {
    "FORMATS": "models.quant.formats",
    "MODES": "models.quant.formats",
    "dequantize": "models.quant.formats",
    "quantize": "models.quant.formats",
    "QuantConv2d": "models.quant.layers",
    "QuantLinear": "models.quant.layers",
    "is_quantized": "models.quant.layers",
    "quantizable": "models.quant.model",
    "quantization_of": "models.quant.model",
    "quantize_model": "models.quant.model",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
