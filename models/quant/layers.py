"""Linear and Conv2d layers whose frozen weight is stored quantized (fp8, int8 or NF4).

`QuantLinear` / `QuantConv2d` hold the packed weight `qweight` and its scales `qscale` (see
`models.quant.formats`) and the bias in the compute dtype. They are frozen Parameters
(requires_grad=False), not buffers: DDP broadcasts buffers before every forward pass, which for
a base model's weights would move gigabytes per step, and `.to(device)` keeps a Parameter's
identity, so a LoRA wrapper that registers the same objects stays in sync with its base layer.
Integer Parameters are never touched by `.to(dtype)`.

Every forward pass dequantizes the weight to the compute dtype (`compute_dtype`: the dtype the
unquantized model would have had), runs the layer's op and drops the weight again. The autograd
functions below keep only the packed tensors for backward and dequantize once more there, so a
training step holds at most one layer's full-size weight at a time, not one per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .formats import dequantize, packed_layout, quantize

__all__ = ["QuantConv2d", "QuantLinear", "is_quantized"]


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a `QuantLinear` / `QuantConv2d`."""
    return isinstance(module, _QuantLayer)


@dataclass(frozen=True)
class _Weight:
    """How to rebuild one layer's weight: format, shape (out, in[, kh, kw]) and compute dtype."""

    fmt: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __call__(self, qweight: torch.Tensor, qscale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(qweight, qscale, self.fmt, self.shape, dtype or self.dtype)


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (never saved).
    x (..., in) -> (..., out); `weight` is an already dequantized W to use in forward, or None."""

    @staticmethod
    def forward(ctx, x, bias, weight, qweight, qscale, spec: _Weight):
        w = spec(qweight, qscale) if weight is None else weight
        ctx.save_for_backward(qweight, qscale)
        ctx.spec, ctx.x_dtype = spec, x.dtype
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        qweight, qscale = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad.matmul(ctx.spec(qweight, qscale, grad.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gb, None, None, None, None


class _DequantConv2d(torch.autograd.Function):
    """conv2d(x, W, b) with W dequantized in forward and again in backward (never saved).
    x (B, in, H, W) -> (B, out, H', W'); `args` = (stride, padding, dilation, groups)."""

    @staticmethod
    def forward(ctx, x, bias, weight, qweight, qscale, spec: _Weight, args):
        w = spec(qweight, qscale) if weight is None else weight
        ctx.save_for_backward(qweight, qscale)
        ctx.spec, ctx.args, ctx.x_dtype, ctx.x_shape = spec, args, x.dtype, x.shape
        return F.conv2d(x, w, bias, *args)

    @staticmethod
    def backward(ctx, grad):
        qweight, qscale = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            w = ctx.spec(qweight, qscale, grad.dtype)
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, *ctx.args).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gb = grad.sum((0, 2, 3))
        return gx, gb, None, None, None, None, None


class _QuantLayer(nn.Module):
    """What QuantLinear and QuantConv2d share: the packed Parameters, the bias, dequantization."""

    is_quantized = True

    def __init__(self, fmt: str, weight_shape: tuple[int, ...], bias: bool, compute_dtype: torch.dtype,
                 device=None) -> None:
        super().__init__()
        layout = packed_layout(weight_shape, fmt)
        for name, (shape, dtype) in layout.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device),
                                                       requires_grad=False))
        self.bias = (nn.Parameter(torch.empty(weight_shape[0], dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.quant_format = fmt
        """`fp8`, `int8` or `nf4`."""
        self.weight_shape = tuple(int(s) for s in weight_shape)
        """Shape of the full weight: (out, in) or (out, in, kh, kw)."""
        self.compute_dtype = compute_dtype
        """Dtype of the dequantized weight and of the layer's arithmetic."""

    @property
    def _spec(self) -> _Weight:
        return _Weight(self.quant_format, self.weight_shape, self.compute_dtype)

    @classmethod
    def from_module(cls, layer: nn.Linear | nn.Conv2d, fmt: str, compute_dtype: torch.dtype | None = None):
        """The quantized copy of `layer` (its weight packed, its bias Parameter reused), on its device;
        compute dtype = `compute_dtype` or the layer's weight dtype."""
        q = cls.like(layer, fmt, compute_dtype, device="meta")
        qweight, qscale = quantize(layer.weight.detach(), fmt)
        q.load_packed(qweight, qscale, layer.bias)
        return q

    def load_packed(self, qweight: torch.Tensor, qscale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Take `qweight` / `qscale` (from `quantize`) and `bias` (cast to the compute dtype) as they are."""
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.qscale = nn.Parameter(qscale, requires_grad=False)
        if bias is not None:
            if isinstance(bias, nn.Parameter) and bias.dtype == self.compute_dtype:
                self.bias = bias.requires_grad_(False)  # the base layer's own Parameter
            else:
                self.bias = nn.Parameter(bias.detach().to(self.compute_dtype), requires_grad=False)

    def dequantize(self, qweight: torch.Tensor | None = None, qscale: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight (`weight_shape`) in `dtype` (default the compute dtype), a new tensor;
        from `qweight` / `qscale` when given (a LoRA wrapper passes the tensors it holds)."""
        return self._spec(self.qweight if qweight is None else qweight, self.qscale if qscale is None else qscale,
                          dtype)

    def packed_nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.qscale.numel() * self.qscale.element_size()


class QuantLinear(_QuantLayer):
    """nn.Linear with a quantized frozen weight; x (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, *, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(fmt, (out_features, in_features), bias, compute_dtype, device)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def like(cls, layer: nn.Linear, fmt: str, compute_dtype: torch.dtype | None = None, device=None) -> QuantLinear:
        """An empty QuantLinear shaped like `layer` (on `device`, default the layer's)."""
        return cls(layer.in_features, layer.out_features, fmt, bias=layer.bias is not None,
                   compute_dtype=compute_dtype or layer.weight.dtype, device=device or layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.qweight, self.qscale, self.bias)

    def forward_with(self, x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, bias: torch.Tensor | None,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's op on the given packed tensors and bias; `weight`: W already dequantized
        (used in forward instead of dequantizing again; backward dequantizes anew)."""
        return _DequantLinear.apply(x, bias, weight, qweight, qscale, self._spec)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.quant_format}, compute_dtype={self.compute_dtype}")


class QuantConv2d(_QuantLayer):
    """nn.Conv2d (zero padding, groups 1) with a quantized frozen weight; (B, in, H, W) -> (B, out, H', W')."""

    padding_mode = "zeros"
    groups = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, fmt: str, *, stride=1, padding=0,
                 dilation=1, bias: bool = True, compute_dtype: torch.dtype = torch.float32, device=None) -> None:
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        self.kernel_size = pair(kernel_size)
        super().__init__(fmt, (out_channels, in_channels, *self.kernel_size), bias, compute_dtype, device)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)

    @classmethod
    def like(cls, layer: nn.Conv2d, fmt: str, compute_dtype: torch.dtype | None = None, device=None) -> QuantConv2d:
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"QuantConv2d: only groups=1 convolutions with numeric zero padding, not {layer}")
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, fmt, stride=layer.stride,
                   padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
                   compute_dtype=compute_dtype or layer.weight.dtype, device=device or layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.qweight, self.qscale, self.bias)

    def forward_with(self, x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, bias: torch.Tensor | None,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
        """See `QuantLinear.forward_with`."""
        return _DequantConv2d.apply(x, bias, weight, qweight, qscale, self._spec,
                                    (self.stride, self.padding, self.dilation, 1))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, format={self.quant_format}, "
                f"compute_dtype={self.compute_dtype}")
