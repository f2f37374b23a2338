"""Predict the GPU memory of a LoRA training step without a GPU, on the meta device.

    python -m trainer.bench.memory [--family sdxl [sd15 ...]] [--res 1024] [--batch 1 4] [--rank 16]
                                   [--quantize none fp8 int8 nf4] [--checkpointing ...] [--vae-encode]

The UNet (random weights never materialised), its LoRA and the optimizer state live on `meta`;
one steady-state training step (forward, fp32 MSE loss, backward) runs there while

- `LiveTensorBytes` counts the bytes of every live tensor storage (weights, adapters, AdamW
  moments, activations saved for backward, gradients, temporaries) and keeps the peak: what
  CUDA's `max_memory_allocated` reports, before the caching allocator's rounding and the
  cuBLAS/cuDNN workspaces;
- `CudaAutocast` applies CUDA autocast's casting rules (matmuls and convolutions in the low
  precision dtype, norms / softmax / losses in float32, leaf-weight casts cached for the forward),
  which `torch.autocast` cannot do on meta tensors;
- attention runs as a fused kernel (q, k, v, output and log-sum-exp kept; no N x N matrix), as
  SDPA does on an H100 (flash at head_dim 64, memory-efficient for the fp32 VAE), unless q, k or
  v has a strided last dimension: the fused CUDA kernels refuse those, and SDPA falls back to
  its math kernel, which holds the (B, heads, N, N) scores and probabilities.

Quantized frozen weights (`--quantize`, `model.quantize`): the UNet's layers are swapped for
`models.quant` layers on meta, so their packed bytes (fp8/int8 1 byte per weight, NF4 0.5 +
4/64 bytes) are the resident weights, and each layer's forward and backward dequantize its weight
as a transient tensor (NF4 counted as bitsandbytes' CUDA kernel: the output only; fp8/int8 as
the torch ops they run, fp32 intermediate included) that is freed before the next layer runs.

It prints one table per family, one row per quantization x gradient-checkpointing setting, with
the peak at each batch size (`--vae-encode`: the no-grad VAE encode of one batch of images
instead, as latent caching runs it). Run the same step on a GPU with
`python -m trainer bench --family sdxl --batch 1 --checkpointing layer` to compare.
"""
from __future__ import annotations

import argparse
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from models.unet import GRANULARITIES

from ..config import DTYPE_NAMES, torch_dtype

GIB = 1024**3
CHECKPOINTING = ("none", *GRANULARITIES)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by live tensor storages, counted at every op, and their peak.

    A storage is counted once however many views share it, from the op that creates it until
    Python frees it (weak references on the storage objects). `track()` registers tensors that
    exist before the mode starts (weights, optimizer state)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def track(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = n = storage.nbytes()
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*tree_flatten(out)[0])
        return out


def _cuda_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """SDPA with the memory behaviour of the kernel CUDA would pick (see module doc)."""
    if attn_mask is not None or kwargs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in (q, k, v)):
        # CUDA's math fallback: explicit scores and softmax (composite ops, so they run on meta).
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, dropout_p, is_causal, scale=scale)[0]
    # The CPU flash kernel has the same outputs and saved tensors as CUDA's, and a meta kernel.
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]


class CudaAttention(TorchFunctionMode):
    """SDPA calls run as `_cuda_attention` (for models that run outside autocast, like the VAE)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _cuda_attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's dtype rules for the ops a UNet training step uses, on any device."""

    LOW = {F.linear, F.conv1d, F.conv2d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul,
           torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, F.scaled_dot_product_attention}
    FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, F.mse_loss,
            torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.sum, torch.Tensor.sum, torch.norm}

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.dtype = dtype
        # Autocast casts each trainable leaf weight once per autocast region and keeps the copy
        # until the region ends (the forward pass, or one checkpointed recomputation).
        self.cache: dict[int, torch.Tensor] = {}

    def __exit__(self, *exc):
        self.cache.clear()
        return super().__exit__(*exc)

    def _cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype and x.dtype != torch.float64):
            return x
        if x.is_leaf and x.requires_grad:
            cached = self.cache.get(id(x))
            if cached is None:
                cached = self.cache[id(x)] = x.to(dtype)
            return cached
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOW:
            args, kwargs = tree_map(lambda x: self._cast(x, self.dtype), (args, kwargs))
        elif func in self.FP32:
            args, kwargs = tree_map(lambda x: self._cast(x, torch.float32), (args, kwargs))
        if func is F.scaled_dot_product_attention:
            return _cuda_attention(*args, **kwargs)
        return func(*args, **kwargs)


@dataclass
class MemoryEstimate:
    """Bytes of one steady-state step. `peak` is the predicted max_memory_allocated."""

    checkpointing: str
    weights: int
    lora: int
    optimizer: int
    peak: int

    @property
    def activations(self) -> int:
        """Peak above the resident tensors: saved activations, gradients and temporaries."""
        return self.peak - self.weights - self.lora - self.optimizer


def estimate_step(family: str = "sdxl", res: int | None = None, batch: int = 1, rank: int = 16,
                  preset: str = "kohya", checkpointing: str = "none", dtype: torch.dtype = torch.bfloat16,
                  autocast: bool = True, device: str = "meta", quantize: str = "none") -> MemoryEstimate:
    """Predicted memory of one training step of `family`'s UNet + LoRA at `res` pixels (see module doc).

    Weights in `dtype` (or packed in `quantize` format: `fp8` | `int8` | `nf4`, computing in
    `dtype`), LoRA fp32, AdamW moments fp32, latents (B,4,res/8,res/8) and cached text embeddings
    as inputs, loss in fp32. `autocast` applies CUDA autocast rules in `dtype`.
    `device="cpu"` runs the same step on real tensors (for small models; tests compare the two).
    """
    import models
    from models.bundle import FAMILIES
    from models.quant.model import quantize_model
    from models.unet import sdxl_vector

    bundle = models.build_model(family, device=device, dtype=dtype)
    unet = bundle.unet
    quantize_model(unet, quantize)
    res = res or FAMILIES[family].resolution
    if checkpointing != "none":
        # Recomputations run inside backward, where function modes are not active: re-enter the
        # autocast rules there (real autocast is restored the same way by torch's checkpoint).
        recompute = (lambda: (nullcontext(), CudaAutocast(dtype))) if autocast else None
        unet.set_gradient_checkpointing(True, checkpointing, context_fn=recompute)
    network = models.inject_lora(bundle, unet=preset, rank=rank, alpha=rank)
    unet.requires_grad_(False)
    lora = list(network.parameters())
    for p in lora:
        p.requires_grad_(True)
    moments = [torch.zeros_like(p) for p in lora for _ in range(2)]
    c = unet.config
    h = res // 8
    x = torch.randn(batch, c.in_channels, h, h, device=device)
    timesteps = torch.zeros(batch, dtype=torch.long, device=device)
    context = torch.randn(batch, 77, c.context_dim, device=device)
    y = None
    if c.adm_in_channels is not None:
        y = sdxl_vector(torch.randn(batch, c.adm_in_channels - 6 * 256, device=device),
                        torch.randn(batch, 6, device=device))
    target = torch.randn_like(x)

    mem = LiveTensorBytes()
    weights = list(unet.parameters()) + list(unet.buffers())
    lora_ids = {id(p) for p in lora}
    base = [t for t in weights if id(t) not in lora_ids]
    with mem:
        mem.track(*base, *lora, *moments, x, timesteps, context, target, *([y] if y is not None else []))
        # As the training Denoiser calls it: latents in the weight dtype, cached fp32 text
        # embeddings left to autocast.
        if not autocast:
            context, y = context.to(dtype), None if y is None else y.to(dtype)
        with CudaAutocast(dtype) if autocast else nullcontext():
            pred = unet(x.to(dtype), timesteps, context, y)
        loss = (pred.float() - target).pow(2).mean()
        del pred
        loss.backward()
        del loss
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return MemoryEstimate(checkpointing, nbytes(base), nbytes(lora), nbytes(moments), mem.peak)


@dataclass
class EncodeEstimate:
    """Bytes of one no-grad VAE encode. `peak` is the predicted max_memory_allocated."""

    weights: int
    images: int
    peak: int

    @property
    def activations(self) -> int:
        """Peak above the VAE weights and the input images."""
        return self.peak - self.weights - self.images


def estimate_vae_encode(family: str = "sdxl", res: int | None = None, batch: int = 1,
                        dtype: torch.dtype = torch.bfloat16, device: str = "meta") -> EncodeEstimate:
    """Predicted memory of encoding fp32 images (B, 3, res, res) with `family`'s VAE, as latent
    caching does: no grad, no autocast, the VAE in fp32 when its config forces upcasting (SDXL),
    else in `dtype`. Attention as in `_cuda_attention`."""
    import models
    from models.bundle import FAMILIES

    bundle = models.build_model(family, device=device, dtype=dtype)
    vae = bundle.vae
    if vae.config.force_upcast:
        vae.to(dtype=torch.float32)
    res = res or FAMILIES[family].resolution
    images = torch.zeros(batch, vae.config.in_channels, res, res, device=device)
    weights = list(vae.parameters()) + list(vae.buffers())
    mem = LiveTensorBytes()
    with torch.no_grad(), mem, CudaAttention():
        mem.track(*weights, images)
        posterior = vae.encode(images)
        del posterior
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    return EncodeEstimate(nbytes(weights), nbytes([images]), mem.peak)


def main(argv: list[str] | None = None) -> int:
    from models.quant.formats import MODES

    p = argparse.ArgumentParser(prog="python -m trainer.bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", default=["sdxl"], help="one table per family (default sdxl)")
    p.add_argument("--res", type=int, default=None, help="pixels (default: the family's native size)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes, one column each (default 1 4)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--preset", default="kohya")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, nargs="+", default=list(CHECKPOINTING))
    p.add_argument("--quantize", choices=MODES, nargs="+", default=list(MODES),
                   help="frozen UNet weight formats, rows of the table (default: all)")
    p.add_argument("--vae-encode", action="store_true", help="predict the VAE encode of latent caching instead")
    args = p.parse_args(argv)
    dtype = torch_dtype(args.dtype)
    for family in args.family:
        if args.vae_encode:
            for batch in args.batch:
                e = estimate_vae_encode(family, args.res, batch, dtype)
                print(f"predicted GPU memory of one VAE encode (no grad): {family}, {args.res or 'native'} px, "
                      f"batch {batch}")
                print("| weights GiB | images GiB | activations GiB | peak GiB |")
                print("|---|---|---|---|")
                print(f"| {e.weights / GIB:.3f} | {e.images / GIB:.3f} | {e.activations / GIB:.2f} | "
                      f"**{e.peak / GIB:.2f}** |")
            continue
        print(f"predicted GPU memory of one training step: {family}, {args.res or 'native'} px, LoRA rank {args.rank} "
              f"{args.preset}, {args.dtype}{' autocast' if dtype != torch.float32 else ''}, cached latents and text")
        print("| quantize | checkpointing | weights GiB | LoRA + AdamW GiB | "
              + " | ".join(f"batch {b}: activations + grads GiB | batch {b}: peak GiB" for b in args.batch) + " |")
        print("|---|---|---|---|" + "---|---|" * len(args.batch))
        for mode in args.quantize:
            for ckpt in args.checkpointing:
                runs = [estimate_step(family, args.res, b, args.rank, args.preset, ckpt, dtype,
                                      autocast=dtype != torch.float32, quantize=mode) for b in args.batch]
                e = runs[0]
                cells = " | ".join(f"{r.activations / GIB:.2f} | **{r.peak / GIB:.2f}**" for r in runs)
                print(f"| {mode} | {ckpt} | {e.weights / GIB:.2f} | {(e.lora + e.optimizer) / GIB:.3f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
