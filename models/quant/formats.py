"""Weight formats of a quantized frozen base: quantize one weight, dequantize it again.

Each format turns a weight W (out, in[, kh, kw]) into two tensors, `qweight` and `qscale`:

    fp8   qweight uint8 like W: the bit patterns of torch.float8_e4m3fn (max 448) of W / s, with
          s = absmax of the output channel / 448 (qscale fp32 (out,)): per-output-channel scale.
          Held as uint8 so that a module-wide `.to(dtype)` cannot upcast it (float8 counts as a
          floating type there); `.view(torch.float8_e4m3fn)` reads it back. 1 byte per weight.
    int8  qweight int8 like W: round(W * 127 / absmax) per output channel (row of W flattened to
          (out, -1)), qscale fp32 (out,) = that absmax. bitsandbytes' `int8_vectorwise_quant`
          layout (LLM.int8 row statistics, threshold 0), dequantized as q * absmax * (1/127).
          1 byte per weight.
    nf4   qweight uint8 (ceil(n/2),): W flattened into blocks of 64, each scaled by its absmax
          (qscale fp32 (ceil(n/64),)) and rounded to the nearest of the 16 NF4 levels (QLoRA's
          normal-float code, `NF4_CODE`), two 4-bit indices per byte, the first in the high
          nibble. bitsandbytes' `quantize_4bit(blocksize=64, quant_type="nf4")` layout without
          double quantization of the absmax. 0.5625 bytes per weight.

Quantization always runs here, in torch (the same bytes on every device, meta included: shapes
only). Dequantization returns W in the compute dtype; the arithmetic is fp32, as bitsandbytes
does it, with one rounding to the compute dtype at the end. On CUDA, NF4 dequantizes with
bitsandbytes' fused kernel (`models.quant.cuda`), which computes the same fp32 products
(`tests/test_quant_gpu.py` compares the two).

bitsandbytes 0.50.2 (installed) also runs these on the CPU (`quantize_4bit`, `dequantize_4bit`,
`int8_vectorwise_quant`, `Linear4bit`, `Linear8bitLt` all work there); our own torch code is used
instead so that the meta-device memory predictor and quantize-while-loading need no optional
kernel, and tests pin it to bitsandbytes' CPU output byte for byte.
"""
from __future__ import annotations

import math

import torch

__all__ = ["CHUNK", "FORMATS", "MODES", "NF4_BLOCK", "NF4_CODE", "FP8_MAX", "dequantize", "empty_packed",
           "packed_layout", "quantize", "packed_nbytes"]

FORMATS = ("fp8", "int8", "nf4")
"""The quantized weight formats."""
MODES = ("none", *FORMATS)
"""Values of `model.quantize` / `model.quantize_text_encoders` (`none` = full precision)."""
FP8_MAX = 448.0
"""Largest finite torch.float8_e4m3fn value."""
NF4_BLOCK = 64
"""Weights per NF4 absmax block."""
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
"""The 16 NF4 levels (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0): QLoRA's table, as
bitsandbytes ships it."""


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")


def packed_layout(shape: tuple[int, ...], fmt: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{"qweight": (shape, dtype), "qscale": (shape, dtype)} of a weight of `shape` in `fmt`."""
    _check_format(fmt)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if fmt == "fp8":
        return {"qweight": (shape, torch.uint8), "qscale": ((shape[0],), torch.float32)}
    if fmt == "int8":
        return {"qweight": (shape, torch.int8), "qscale": ((shape[0],), torch.float32)}
    return {"qweight": (((n + 1) // 2,), torch.uint8), "qscale": ((-(-n // NF4_BLOCK),), torch.float32)}


def packed_nbytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes of `qweight` + `qscale` for a weight of `shape` in `fmt`."""
    return sum(math.prod(s) * d.itemsize for s, d in packed_layout(shape, fmt).values())


CHUNK = 1 << 22
"""Weights quantized per step (rows of them for fp8 / int8, 64-blocks for nf4): the fp32
temporaries stay under 16 MB whatever the layer's size. With whole-layer temporaries between
the long-lived packed outputs, the C allocator kept the holes: quantizing SDXL's UNet while
loading left about 3 GiB of freed memory resident (docs/benchmarks.md)."""


def empty_packed(shape: tuple[int, ...], fmt: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (qweight, qscale) for a weight of `shape` in `fmt`."""
    return tuple(torch.empty(s, dtype=d, device=device) for s, d in packed_layout(shape, fmt).values())


@torch.no_grad()
def quantize(weight: torch.Tensor, fmt: str,
             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, qscale) of `weight` (out, in[, kh, kw], any float dtype) in `fmt`, on its device
    (written into `out`, from `empty_packed`, when given).

    On meta only the shapes and dtypes are produced. Rows (fp8, int8) or blocks (nf4) that are all
    zero get a scale that dequantizes them to exact zeros."""
    _check_format(fmt)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"quantize: weights must be floating point, got {weight.dtype}")
    qweight, qscale = out if out is not None else empty_packed(tuple(weight.shape), fmt, weight.device)
    if weight.is_meta:
        return qweight, qscale
    if fmt == "nf4":
        flat = weight.reshape(-1)
        for start in range(0, flat.numel(), CHUNK):  # CHUNK is a multiple of the block and of 2
            end = min(start + CHUNK, flat.numel())
            _quantize_nf4(flat[start:end], qweight[start // 2:(end + 1) // 2],
                          qscale[start // NF4_BLOCK:-(-end // NF4_BLOCK)])
        return qweight, qscale
    rows, out = weight.reshape(weight.shape[0], -1), qweight.view(weight.shape[0], -1)
    step = max(1, CHUNK // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        _quantize_rows(rows[i:i + step], fmt, out[i:i + step], qscale[i:i + step])
    return qweight, qscale


def _quantize_rows(rows: torch.Tensor, fmt: str, qweight: torch.Tensor, qscale: torch.Tensor) -> None:
    """fp8 / int8 of rows (r, k) into qweight (r, k) and qscale (r,)."""
    rows = rows.float()
    absmax = rows.abs().amax(dim=1)
    if fmt == "fp8":
        scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
        qscale.copy_(scale)
        qweight.copy_((rows / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8))
        return
    # int8: bitsandbytes' formula, round(W * (127 / absmax)); an all-zero row stays zero.
    factor = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    qscale.copy_(absmax)
    qweight.copy_(torch.round(rows * factor[:, None]).to(torch.int8))


def _quantize_nf4(flat: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor) -> None:
    """NF4 of `flat` (n,) (the last piece of a weight may end inside a block or a byte) into
    qweight (ceil(n/2),) and qscale (ceil(n/64),)."""
    n = flat.numel()
    flat = flat.float()
    if n % NF4_BLOCK:
        flat = torch.nn.functional.pad(flat, (0, -n % NF4_BLOCK))
    blocks = flat.view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    qscale.copy_(absmax)
    # As bitsandbytes: multiply by the reciprocal (the same rounding), clamp, nearest level by midpoints.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1)[:n]
    del flat, blocks  # (temporaries go as soon as the next one exists: two fp32 copies at most)
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=qweight.device)
    index = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True)
    del scaled
    index = index.to(torch.uint8)
    torch.bitwise_or(index[0::2] << 4, index[1::2], out=qweight)


def dequantize(qweight: torch.Tensor, qscale: torch.Tensor, fmt: str, shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
    """The weight (`shape`, `dtype`) that `quantize` packed into (qweight, qscale): a new tensor
    (transient: the caller frees it after use)."""
    _check_format(fmt)
    if fmt == "nf4":
        if qweight.is_meta:  # as bitsandbytes' CUDA kernel: the output, no temporaries
            return torch.empty(shape, dtype=dtype, device="meta")
        if qweight.is_cuda:
            from .cuda import dequantize_nf4

            return dequantize_nf4(qweight, qscale, shape, dtype)
        n = math.prod(shape)
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=qweight.device)
        index = torch.stack((qweight >> 4, qweight & 0xF), dim=1).reshape(-1)[:n]
        blocks = -(-n // NF4_BLOCK)
        values = torch.nn.functional.pad(code[index.long()], (0, blocks * NF4_BLOCK - n)).view(blocks, NF4_BLOCK)
        return (values * qscale[:, None]).reshape(-1)[:n].reshape(shape).to(dtype)
    view = (-1,) + (1,) * (len(shape) - 1)
    if fmt == "fp8":
        return qweight.view(torch.float8_e4m3fn).float().mul_(qscale.float().view(view)).to(dtype)
    # int8: bitsandbytes' int8_vectorwise_dequant, (A * absmax) * (1/127) in fp32.
    return qweight.float().mul_(qscale.float().view(view)).mul_(7.874015718698502e-3).to(dtype)
