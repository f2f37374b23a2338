"""Predict the GPU memory of a LoRA training step without a GPU, on the meta device.

    python -m trainer bench memory [--family sdxl [flux-dev ...]] [--res 1024] [--batch 1 4] [--rank 16]
                                   [--preset P] [--quantize none fp8 int8 nf4] [--checkpointing ...]
                                   [--vae-encode] [--measure cpu|cuda]

The family's bundle (random weights never materialised), its LoRA and the optimizer state live on
`meta`; one steady-state training step runs there as the recipe runs it: cached fp32 latents
(B, z_channels, res/f, res/f) and the family's cached text conditioning (made by its own encoders,
on meta), the family's `denoise` (a UNet, or the Flux transformer on packed 2x2 latent patches),
fp32 MSE loss, backward. Text encoders and VAE stay off the GPU (`train.offload_frozen`). Meanwhile

- `LiveTensorBytes` counts the bytes of every live tensor storage (weights, adapters, AdamW
  moments, activations saved for backward, gradients, temporaries) and keeps the peak: what
  CUDA's `max_memory_allocated` reports, before the caching allocator's rounding and the
  cuBLAS/cuDNN workspaces;
- `CudaAutocast` applies CUDA autocast's casting rules (matmuls and convolutions in the low
  precision dtype, norms / softmax / losses in float32, leaf-weight casts cached for the forward),
  which `torch.autocast` cannot do on meta tensors;
- attention runs as a fused kernel (q, k, v, output and log-sum-exp kept; no N x N matrix), as
  SDPA does on an H100 (flash at head_dim 64 and 128, memory-efficient for the fp32 VAE), unless
  q, k or v has a strided last dimension: the fused CUDA kernels refuse those, and SDPA falls back
  to its math kernel, which holds the (B, heads, N, N) scores and probabilities.

Gradient checkpointing (`--checkpointing`, the granularities of the family's denoiser) keeps only
each checkpointed block's inputs and recomputes one block at a time in backward.

Quantized frozen weights (`--quantize`, `model.quantize`): the denoiser's layers are swapped for
`models.quant` layers on meta, so their packed bytes (fp8/int8 1 byte per weight, NF4 0.5 +
4/64 bytes) are the resident weights, and each layer's forward and backward dequantize its weight
as a transient tensor (NF4 counted as bitsandbytes' CUDA kernel: the output only; fp8/int8 as
the torch ops they run, fp32 intermediate included) that is freed before the next layer runs.

It prints one table per family, one row per quantization x gradient-checkpointing setting, with
the peak at each batch size (GiB; MiB for the tiny test families). `--vae-encode`: the no-grad VAE
encode of one batch of images instead, as latent caching runs it. `--measure cpu` (tiny families)
also runs each step on the CPU and reports the peak that torch's CPU allocator saw, an
independent check of the counting; `--measure cuda` runs it on the GPU (CUDA autocast and
kernels) and reports `max_memory_allocated`. `python -m trainer bench quantization --what memory`
measures the whole recipe's steps on a GPU (docs/benchmarks.md).
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

from models.families import FAMILIES

from ..config import DTYPE_NAMES, torch_dtype

GIB = 1024**3
CHECKPOINTING = tuple(dict.fromkeys(("none", *(g for s in FAMILIES.values() for g in s.checkpointing_granularities))))
"""`--checkpointing` values: `none` and every granularity of a registered family's denoiser."""


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


KOHYA_TARGETS = ("kohya", "attn-mlp-mod")
"""kohya sd-scripts' default LoRA targets, per kind of denoiser: `kohya` on a UNet (Linear / 1x1
layers of the transformer blocks), `attn-mlp-mod` on the Flux transformer (every Linear of the
double and single blocks). The first of these that the family's denoiser has is the default."""


def default_preset(family: str) -> str:
    """The LoRA preset `estimate_step` uses for `family` when none is given (`KOHYA_TARGETS`)."""
    from models.families import family_spec
    from models.lora.names import denoiser_presets

    own = denoiser_presets(family_spec(family))
    return next(p for p in KOHYA_TARGETS if p in own)


def checkpointing_choices(family: str) -> tuple[str, ...]:
    """`none` and the gradient checkpointing granularities of `family`'s denoiser."""
    from models.families import family_spec

    return ("none", *family_spec(family).checkpointing_granularities)


@dataclass
class _Step:
    """One training step set up for `_run`: the bundle (denoiser quantized, checkpointed, LoRA
    injected), the tensors resident before it starts, and its inputs."""

    bundle: object
    base: list[torch.Tensor]
    lora: list[torch.Tensor]
    moments: list[torch.Tensor]
    latents: torch.Tensor
    timesteps: torch.Tensor
    cond: dict[str, torch.Tensor]
    target: torch.Tensor
    dtype: torch.dtype
    autocast: bool

    def resident(self) -> list[torch.Tensor]:
        return [*self.base, *self.lora, *self.moments, self.latents, self.timesteps, *self.cond.values(), self.target]


def _setup(family: str, res: int | None, batch: int, rank: int, preset: str | None, checkpointing: str,
           dtype: torch.dtype, autocast: bool, device: str, quantize: str) -> _Step:
    """Build `family` and prepare one step on `device` as training runs it (see `estimate_step`).

    The bundle is built on meta; on another device only the denoiser is materialised there (random
    values: memory does not depend on them), and the cached inputs are random tensors of the shapes
    the family's own encoders give on meta."""
    import models
    from models.quant.model import quantize_model

    device = torch.device(device)
    bundle = models.build_model(family, device="meta", dtype=dtype)
    spec = bundle.spec
    # Cached text, as the text cache stores it (fp32); the encoders and the VAE stay off the device.
    ids = [torch.zeros(batch, tok.max_length, dtype=torch.long, device="meta") for tok in bundle.tokenizers]
    with torch.no_grad():
        shapes = {k: v.shape for k, v in bundle.conditioning(ids).items()}
    cond = {k: torch.randn(shape, device=device) for k, shape in shapes.items()}
    den = bundle.denoiser
    if device.type != "meta":
        den.to_empty(device=device)
        with torch.no_grad():
            for t in [*den.parameters(), *den.buffers()]:
                if t.is_floating_point():
                    t.normal_(0.0, 0.02)
                else:
                    t.zero_()
    quantize_model(den, quantize)
    if checkpointing != "none":
        # Recomputations run inside backward, where function modes are not active: re-enter the
        # autocast rules there (real CUDA autocast is restored the same way by torch's checkpoint).
        stand_in = autocast and device.type != "cuda"
        recompute = (lambda: (nullcontext(), CudaAutocast(dtype))) if stand_in else None
        den.set_gradient_checkpointing(True, checkpointing, context_fn=recompute)
    network = models.inject_lora(bundle, unet=preset or default_preset(family), rank=rank, alpha=rank)
    den.requires_grad_(False)
    lora = list(network.parameters())
    for p in lora:
        p.requires_grad_(True)
    moments = [torch.zeros_like(p) for p in lora for _ in range(2)]
    vae = bundle.vae.config
    h = (res or spec.resolution) // vae.downsample_factor
    latents = torch.randn(batch, vae.z_channels, h, h, device=device)
    if spec.objective == "flow":  # t in [0, 1]
        timesteps = torch.rand(batch, device=device)
    else:
        timesteps = torch.zeros(batch, dtype=torch.long, device=device)
    lora_ids = {id(p) for p in lora}
    base = [t for t in [*den.parameters(), *den.buffers()] if id(t) not in lora_ids]
    return _Step(bundle, base, lora, moments, latents, timesteps, cond, torch.randn_like(latents), dtype, autocast)


def _run(step: _Step) -> None:
    """Forward (the family's `denoise`, as the training Denoiser calls it), fp32 MSE loss, backward.
    Autocast: CUDA's own on a CUDA device, its rules (`CudaAutocast`) elsewhere."""
    cond, region = step.cond, nullcontext()
    if not step.autocast:  # no autocast: the cached fp32 text has to match the weights
        cond = {k: v.to(step.dtype) for k, v in cond.items()}
    elif step.latents.is_cuda:
        region = torch.autocast("cuda", step.dtype)
    else:
        region = CudaAutocast(step.dtype)
    with region:
        pred = step.bundle.denoise(step.latents, step.timesteps, cond)
    loss = (pred.float() - step.target).pow(2).mean()
    del pred
    loss.backward()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_step(family: str = "sdxl", res: int | None = None, batch: int = 1, rank: int = 16,
                  preset: str | None = None, checkpointing: str = "none", dtype: torch.dtype = torch.bfloat16,
                  autocast: bool = True, device: str = "meta", quantize: str = "none") -> MemoryEstimate:
    """Predicted memory of one training step of `family`'s denoiser + LoRA at `res` pixels (see module doc).

    Denoiser weights in `dtype` (or packed in `quantize` format: `fp8` | `int8` | `nf4`, computing
    in `dtype`), LoRA (`preset`, default `default_preset(family)`; alpha = rank) fp32, AdamW moments
    fp32, cached latents (B, z_channels, res/f, res/f) fp32 and the family's cached text conditioning
    (fp32) as inputs, timesteps as the family's objective draws them, loss in fp32. Text encoders
    and VAE are not resident (`train.offload_frozen`). `autocast` applies CUDA autocast rules in
    `dtype`. `device="cpu"` runs the same step on real tensors (for small models; tests compare the two).
    """
    step = _setup(family, res, batch, rank, preset, checkpointing, dtype, autocast, device, quantize)
    mem = LiveTensorBytes()
    with mem:
        mem.track(*step.resident())
        _run(step)
    return MemoryEstimate(checkpointing, _nbytes(step.base), _nbytes(step.lora), _nbytes(step.moments), mem.peak)


def measure_cpu_step(family: str, res: int | None = None, batch: int = 1, rank: int = 16, preset: str | None = None,
                     checkpointing: str = "none", dtype: torch.dtype = torch.bfloat16, autocast: bool = True,
                     quantize: str = "none") -> int:
    """Peak bytes of the same step run on the CPU, measured independently of `LiveTensorBytes`: the
    resident tensors plus the highest total that torch's CPU allocator reported while the step ran
    (profiler allocation events). For small models: it allocates everything for real.

    It counts what the predictor leaves out on purpose: the CPU kernels' own buffers (CPU
    attention and matmul scratch, NF4's index temporaries)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    step = _setup(family, res, batch, rank, preset, checkpointing, dtype, autocast, "cpu", quantize)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _run(step)
    events = []  # (time, bytes allocated (< 0: freed), the allocator's running total after it)

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return _nbytes(step.resident())
    events.sort()
    # The running total counts what the process held before the step (earlier models not yet
    # collected, ...): measure from the total just before the first event.
    before = events[0][2] - events[0][1]
    totals = [total - before for _, _, total in events]
    return _nbytes(step.resident()) + max(0, *totals)


def measure_cuda_step(family: str, res: int | None = None, batch: int = 1, rank: int = 16, preset: str | None = None,
                      checkpointing: str = "none", dtype: torch.dtype = torch.bfloat16, autocast: bool = True,
                      quantize: str = "none", device: str = "cuda") -> int:
    """`torch.cuda.max_memory_allocated` of the same step on a CUDA device, with CUDA's own autocast,
    attention kernels and (NF4) bitsandbytes' dequantization: the figure `estimate_step` predicts.
    One step first (cuBLAS handles and workspaces), gradients dropped as `zero_grad` does, then the
    measured one. Raises torch.cuda.OutOfMemoryError when it does not fit."""
    if not torch.cuda.is_available():
        raise SystemExit("error: measuring CUDA memory needs a CUDA device; `estimate_step` predicts it without one")
    step = _setup(family, res, batch, rank, preset, checkpointing, dtype, autocast, device, quantize)
    _run(step)
    for p in step.lora:
        p.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    _run(step)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


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
    return EncodeEstimate(_nbytes(weights), _nbytes([images]), mem.peak)


def _print_header(batches: list[int], unit: str, measure: str | None) -> None:
    cols = [f"batch {b}: activations + grads {unit} | batch {b}: peak {unit}" for b in batches]
    if measure:
        cols += [f"batch {b}: {measure.upper()} measured {unit} (peak error)" for b in batches]
    print(f"| quantize | checkpointing | weights {unit} | LoRA + AdamW {unit} | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|---|" * len(batches) + "---|" * len(batches) * bool(measure))


def _measured(measure: str, family: str, batch: int, kw: dict) -> int | None:
    """The measured peak of one step (`--measure`), None when CUDA runs out of memory."""
    import gc

    if measure == "cpu":
        return measure_cpu_step(family, batch=batch, **kw)
    try:
        return measure_cuda_step(family, batch=batch, **kw)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        gc.collect()  # free this step's model before the next one is built
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    from models.quant.formats import MODES

    p = argparse.ArgumentParser(prog="python -m trainer bench memory", description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", default=["sdxl"], choices=list(FAMILIES), metavar="FAMILY",
                   help=f"one table per family (default sdxl): {', '.join(FAMILIES)}")
    p.add_argument("--res", type=int, default=None, help="pixels (default: the family's native size)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes, one column each (default 1 4)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--preset", default=None,
                   help="LoRA targets: a preset of the family's denoiser or a regex on its module paths "
                        "(default: kohya sd-scripts' targets, `kohya` on a UNet, `attn-mlp-mod` on Flux)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, nargs="+", default=None,
                   help="rows of the table (default: none and every granularity the family's denoiser has)")
    p.add_argument("--quantize", choices=MODES, nargs="+", default=list(MODES),
                   help="frozen denoiser weight formats, rows of the table (default: all)")
    p.add_argument("--vae-encode", action="store_true", help="predict the VAE encode of latent caching instead")
    p.add_argument("--measure", choices=("cpu", "cuda"), default=None,
                   help="also run each step for real and report its peak next to the prediction: `cpu` the "
                        "peak torch's CPU allocator saw (tiny families), `cuda` max_memory_allocated on the GPU")
    args = p.parse_args(argv)
    dtype = torch_dtype(args.dtype)
    if args.measure == "cuda" and not torch.cuda.is_available():
        p.error("--measure cuda needs a CUDA device (the prediction itself needs none)")
    for family in args.family:
        own = checkpointing_choices(family)
        bad = [c for c in args.checkpointing or () if c not in own]
        if bad:
            p.error(f"--checkpointing {' '.join(bad)}: {family} supports {', '.join(own)}")
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
        preset = args.preset or default_preset(family)
        print(f"predicted GPU memory of one training step: {family}, {args.res or 'native'} px, LoRA rank {args.rank} "
              f"{preset}, {args.dtype}{' autocast' if dtype != torch.float32 else ''}, cached latents and text "
              "(text encoders and VAE off the GPU)")
        unit = None
        for mode in args.quantize:
            for ckpt in args.checkpointing or checkpointing_choices(family):
                kw = {"res": args.res, "rank": args.rank, "preset": preset, "checkpointing": ckpt, "dtype": dtype,
                      "autocast": dtype != torch.float32, "quantize": mode}
                runs = [estimate_step(family, batch=b, **kw) for b in args.batch]
                measured = [_measured(args.measure, family, b, kw) for b in args.batch] if args.measure else []
                if unit is None:  # GiB for real models, MiB for the tiny test families
                    unit = ("GiB", GIB) if runs[-1].peak >= GIB else ("MiB", 1024**2)
                    _print_header(args.batch, unit[0], args.measure)
                e, scale = runs[0], unit[1]
                cells = " | ".join(f"{r.activations / scale:.2f} | **{r.peak / scale:.2f}**" for r in runs)
                cells += "".join(" | out of memory" if m is None else f" | {m / scale:.2f} ({(r.peak - m) / m:+.1%})"
                                 for m, r in zip(measured, runs))
                print(f"| {mode} | {ckpt} | {e.weights / scale:.2f} | {(e.lora + e.optimizer) / scale:.3f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
