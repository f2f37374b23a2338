"""Quantize while loading: each chosen weight is packed as soon as it is read from the file, so
the full-precision model never exists in memory (peak: the packed model, the unquantized rest,
and the fp32 temporaries of packing at most `formats.CHUNK` weights; the C heap's freed pages go
back to the OS as it proceeds).

`models.checkpoints.materialize` hands a `LoadQuantizer` every tensor of a module built on the
meta device; the quantizer keeps the packed form of the weights it claims, and `install` swaps
the chosen layers for QuantLinear / QuantConv2d and puts their packed tensors into the state dict
that is then assigned to the module.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch
from torch import nn

from .formats import empty_packed, quantize
from .model import check_mode, quant_class, replace_layer, select_layers

__all__ = ["LoadQuantizer"]

TRIM_EVERY = 256 * 1024**2
"""Bytes of weights packed between two returns of the C heap's free pages to the OS."""


class LoadQuantizer:
    """Packs the weights of `module`'s quantizable layers (the default rule of `models.quant.model`)
    in format `fmt` as they arrive. `module` is the meta-device module being loaded; the packing
    runs on `device`; `compute_dtype` is the dtype the rest of the module is loaded in."""

    def __init__(self, module: nn.Module, fmt: str, compute_dtype: torch.dtype, device: torch.device) -> None:
        check_mode(fmt)
        self.fmt, self.compute_dtype, self.device = fmt, compute_dtype, torch.device(device)
        self.layers = dict(select_layers(module)) if fmt != "none" else {}
        # Every packed tensor is allocated before any temporary of the packing.
        self.packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
            path: empty_packed(tuple(layer.weight.shape), fmt, self.device) for path, layer in self.layers.items()}
        self.taken: set[str] = set()
        self._since_trim = 0

    def claims(self, name: str) -> bool:
        """Whether state-dict entry `name` is a weight this quantizer packs."""
        path, _, leaf = name.rpartition(".")
        return leaf == "weight" and path in self.layers

    @torch.no_grad()
    def take(self, name: str, tensor: torch.Tensor) -> None:
        """Pack the full-precision weight `name` (any float dtype, any device: a file view is fine)."""
        path = name.rpartition(".")[0]
        quantize(tensor.to(self.device), self.fmt, out=self.packed[path])
        self.taken.add(path)
        # The packing's freed temporaries stay resident as holes in the C heap between tensors
        # allocated meanwhile (0.5 GiB for SDXL's UNet in fp8, docs/benchmarks.md): hand them back.
        self._since_trim += tensor.numel() * 4
        if self.device.type == "cpu" and self._since_trim >= TRIM_EVERY:
            trim_c_heap()
            self._since_trim = 0

    @torch.no_grad()
    def take_fp8(self, name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Keep the weight `name` stored in float8_e4m3fn (times `scale`: a scalar or one per output
        row; None for 1) as it is, in format `fp8`: its bytes become `qweight`, the scale `qscale`.
        Exact: no full-precision copy and no second rounding."""
        path = name.rpartition(".")[0]
        qweight, qscale = self.packed[path]
        qweight.copy_(weight.view(torch.uint8).reshape(qweight.shape))
        qscale.copy_((scale.float() if scale is not None else torch.ones(1)).reshape(-1).expand(qscale.shape))
        self.taken.add(path)

    def install(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Swap each chosen layer of `module` for its quantized class (on meta, to be assigned) and
        add its packed tensors to `state` under `<path>.qweight` / `<path>.qscale`."""
        missing = sorted(set(self.layers) - self.taken)
        if missing:
            raise RuntimeError(f"quantize while loading: no weight was read for {', '.join(missing[:4])}")
        for path, layer in self.layers.items():
            replace_layer(module, path, quant_class(layer).like(layer, self.fmt, self.compute_dtype, device="meta"))
            state[f"{path}.qweight"], state[f"{path}.qscale"] = self.packed.pop(path)
        if self.device.type == "cpu":
            trim_c_heap()


def trim_c_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's `malloc_trim`; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None
