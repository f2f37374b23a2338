"""bitsandbytes' fused CUDA kernel for NF4 dequantization (imported only for CUDA tensors).

Our NF4 layout is bitsandbytes' (`models.quant.formats`), so its kernel reads our buffers as they
are: packed uint8 indices, one fp32 absmax per 64 weights, no double quantization.
"""
from __future__ import annotations

import torch

__all__ = ["dequantize_nf4"]


def dequantize_nf4(qweight: torch.Tensor, qscale: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """W (`shape`, `dtype` fp32 / fp16 / bf16) from packed NF4 on a CUDA device, in one kernel."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    from .formats import NF4_BLOCK

    return torch.ops.bitsandbytes.dequantize_4bit(qweight.contiguous(), qscale.contiguous(), NF4_BLOCK, "nf4",
                                                  list(shape), dtype)
