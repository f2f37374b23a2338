"""Checking and materialising a loaded checkpoint: every tensor accounted for (missing,
unexpected and mis-shaped ones reported in one message with the likely cause), then each
parameter given memory of the wanted dtype and device, zero-copy where the memory map allows,
with a finiteness check on the data as it is touched."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..families import lineages
from .openclip_keys import hf_name_to_openclip
from .safetensors_io import TensorStore, all_finite, count_nonfinite
from .single_file import (
    describe_foreign,
    is_openclip_prefix,
    looks_like_lora,
    meta_module,
)

__all__ = ["Lazy", "ModelLoadError", "Part", "load_part", "materialize", "title", "validate_parts"]


def title(base: str) -> str:
    """Human name of a lineage (\"SDXL\", \"SD1.5\") for messages."""
    spec = lineages()[base]
    return spec.lineage_title or spec.title

class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


@dataclass(frozen=True)
class Lazy:
    """A parameter's tensor that is built only when it is read (e.g. the row-wise concatenation
    of several stored tensors), so that a loader holds one such tensor at a time. `shape` and
    `dtype` are known without reading; `keys` are the store keys `build` reads (their pages are
    released once the result is copied)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    build: Callable[[], torch.Tensor]
    keys: tuple[str, ...] = ()


@dataclass
class Part:
    """One module to build: its config and, per parameter, where its tensor comes from."""

    slot: str  # unet, vae, text_encoder, text_encoder_2
    config: object
    store: TensorStore
    sources: dict[str, str | torch.Tensor | Lazy] = field(default_factory=dict)  # param -> store key, view or Lazy
    unexpected: list[str] = field(default_factory=list)  # store keys nothing uses
    label: dict[str, str] = field(default_factory=dict)  # param -> name in the file, for messages
    prefix: str = ""  # file-name prefix of parameters the file lacks, for messages
    origin: dict[str, str] = field(default_factory=dict)  # param given as a view -> store key it views
    # Scaled-fp8 weights (ComfyUI `scale_weight` / `weight_scale`): param -> store key of its fp32
    # scale (a scalar or one per output row); the weight is the stored fp8 tensor times it.
    scales: dict[str, str] = field(default_factory=dict)


# ---- validation and materialisation ---------------------------------------------------------
def validate_parts(parts: dict[str, Part], modules: dict[str, nn.Module], base: str, family: str | None) -> None:
    """Every parameter of every module found with its shape and every stored tensor used, else one
    ModelLoadError listing the first few of each problem."""
    missing, unexpected, mismatched = [], [], []
    where = sorted({p.store.name for p in parts.values()})
    for slot, part in parts.items():
        expected = modules[slot].state_dict()
        for name, ref in expected.items():
            src = part.sources.get(name)
            label = part.label.get(name) or _file_name(part, name)
            if src is None:
                missing.append(label)
                continue
            shape = part.store.shape(src) if isinstance(src, str) else tuple(src.shape)
            if tuple(shape) != tuple(ref.shape) and not _reshapeable(shape, tuple(ref.shape)):
                mismatched.append(f"{label} {list(shape)} vs model {list(ref.shape)}")
        extra = [part.label.get(n, n) for n in part.sources if n not in expected]
        unexpected += part.unexpected + extra
    if not (missing or unexpected or mismatched):
        return
    lines = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            shown = "; ".join(items[:4]) + (f"; ... (+{len(items) - 4} more)" if len(items) > 4 else "")
            lines.append(f"{len(items)} {what}: {shown}")
    raise ModelLoadError(
        f"{', '.join(where)} does not match the {title(base)} model ({' | '.join(lines)}). "
        f"Likely cause: {_likely_cause(missing, unexpected, mismatched, family)}"
    )


def _file_name(part: Part, name: str) -> str:
    """How the file would spell our parameter `name` (for listing missing tensors)."""
    if is_openclip_prefix(part.prefix):
        try:
            target = hf_name_to_openclip(name)
        except KeyError:
            target = None
        if target is not None:
            return part.prefix + target[0]
    return part.prefix + name


def _reshapeable(shape, target) -> bool:
    """VAE attention: (C, C) Linear in diffusers files <-> (C, C, 1, 1) conv in ours."""
    return len(shape) == 2 and tuple(target) == (*shape, 1, 1)


def _likely_cause(missing, unexpected, mismatched, family) -> str:
    if looks_like_lora(unexpected):
        return describe_foreign(unexpected)
    if mismatched:
        return ("the checkpoint is a different architecture or size than the requested/detected family "
                f"({family or 'auto'}): wrong family, or a modified model")
    if missing and any("model_ema" in k for k in unexpected):
        return "an EMA-only training checkpoint; export its EMA weights to the normal names first"
    if missing:
        return ("a pruned or partial file (for a UNet-only or VAE-only file, load a full base model and pass it "
                "as unet=... / vae=...), or an interrupted conversion")
    return "tensors this loader does not know (a newer or modified architecture, or a merged extra network)"


def _stored_dtype(part: Part) -> torch.dtype:
    """Widest floating dtype among the part's tensors (dtype=None keeps what the file has).
    fp8 is a storage format, never a compute dtype: fp8-stored weights are upcast to the widest
    other dtype (float32 when everything is fp8)."""
    best = None
    for src in part.sources.values():
        dt = part.store.dtype(src) if isinstance(src, str) else src.dtype
        if dt.is_floating_point and dt.itemsize > 1 and (best is None or dt.itemsize > best.itemsize):
            best = dt
    return best or torch.float32


materialize_mode = "auto"
"""How parameters get their memory, for the benchmark (`python -m trainer.bench.load --mode`):
"auto" (zero-copy views where load_model's `mmap` allows, else a new tensor per parameter and
`load_state_dict(assign=True)`), "assign" (always a new tensor) or "to_empty"
(`module.to_empty()`, then copy in place)."""


def _owns_storage(tensor: torch.Tensor) -> bool:
    """A contiguous tensor spanning exactly its own storage (not a slice of a bigger one)."""
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def materialize(module: nn.Module, part: Part, dtype: torch.dtype | None, device: torch.device,
                 zero_copy: bool, quantize: str | None = None) -> None:
    """Give every parameter its tensor in the target dtype/device: the file view itself when
    allowed (CPU, same dtype, own storage), else one copy, after which the file pages are dropped.
    A parameter stored as scaled fp8 is the stored tensor times its scale (`Part.scales`), in fp32,
    then converted. Parameters read from the same stored tensor (a tied embedding under two names)
    share one tensor.

    quantize: `fp8` | `int8` | `nf4` packs the weights of the module's quantizable layers as they
    are read (`models.quant.loading`) and swaps those layers for quantized ones; a weight stored in
    float8_e4m3fn keeps its stored bytes and scale in `fp8` (exact, no full-precision copy). None /
    `none` loads everything in the target dtype."""
    target = dtype or _stored_dtype(part)
    zero_copy = zero_copy and materialize_mode == "auto" and device.type == "cpu"
    quantizer = None
    if quantize not in (None, "none"):
        from ..quant.loading import LoadQuantizer

        quantizer = LoadQuantizer(module, quantize, target, device)

    def stored(name: str, shape) -> torch.Tensor:
        """The tensor as the file has it (a view, or a Lazy's result), in `shape`."""
        src = part.sources[name]
        if isinstance(src, Lazy):
            tensor = src.build()
        else:
            tensor = part.store[src] if isinstance(src, str) else src
        return tensor if tuple(tensor.shape) == tuple(shape) else tensor.reshape(shape)

    def scale_of(name: str, ndim: int) -> torch.Tensor:
        """The fp32 scale of a scaled-fp8 weight, shaped to broadcast over it (scalar or per row)."""
        scale = part.store[part.scales[name]].float()
        return scale.reshape(-1, *([1] * (ndim - 1))) if scale.numel() > 1 else scale.reshape(())

    def source(name: str, shape) -> torch.Tensor:
        tensor = stored(name, shape)
        if name in part.scales:  # scaled fp8: the weight is stored * scale (computed in fp32)
            tensor = tensor.float() * scale_of(name, tensor.ndim)
        return tensor

    def _key(name: str) -> str | None:
        src = part.sources[name]
        return src if isinstance(src, str) else part.origin.get(name)

    def done(name: str) -> None:
        src = part.sources[name]
        for key in (src.keys if isinstance(src, Lazy) else (_key(name),)):
            if key is not None:
                part.store.release(key)  # drop the file pages just copied

    def require_finite(name: str, loaded: torch.Tensor) -> None:
        if all_finite(loaded):
            return
        key = _key(name)
        where = part.store.source_of(key) if key is not None else part.store.name
        label = part.label.get(name) or _file_name(part, name)
        original = stored(name, loaded.shape)
        if all_finite(original) and (name not in part.scales or all_finite(part.store[part.scales[name]])):
            raise ModelLoadError(
                f"{where}: tensor {label!r} has values beyond the range of {loaded.dtype} (inf after conversion); "
                "load the model in bf16 or fp32 (model.dtype)")
        nan, inf = count_nonfinite(original)
        raise ModelLoadError(
            f"{where}: tensor {label!r} holds non-finite values ({nan} NaN, {inf} inf); the checkpoint is damaged "
            "(a failed download, conversion or merge) and would give black images - re-download or re-convert it")

    if materialize_mode == "to_empty":
        module.to(dtype=target).to_empty(device=device)
        with torch.no_grad():
            for name, param in module.state_dict(keep_vars=True).items():
                param.copy_(source(name, param.shape))
                require_finite(name, param)
                done(name)
        if quantizer is not None:  # (benchmark mode: the full model exists first)
            from ..quant.model import quantize_model

            quantize_model(module, quantize, compute_dtype=target)
        return
    state = {}
    shared: dict[str, torch.Tensor] = {}  # store key -> the tensor made from it (tied parameters)
    for name, ref in module.state_dict().items():
        src = part.sources.get(name)
        if isinstance(src, str) and src in shared and name not in part.scales:
            state[name] = shared[src]
            continue
        if quantizer is not None and quantizer.claims(name):
            raw = stored(name, ref.shape)
            if quantize == "fp8" and raw.dtype == torch.float8_e4m3fn:
                require_finite(name, raw)
                quantizer.take_fp8(name, raw, scale_of(name, 1) if name in part.scales else None)
            else:
                tensor = source(name, ref.shape)
                require_finite(name, tensor)
                quantizer.take(name, tensor)  # only the packed weight is kept
            done(name)
            continue
        tensor = source(name, ref.shape)
        wanted = target if tensor.is_floating_point() else tensor.dtype
        if zero_copy and tensor.dtype == wanted and name not in part.scales and not isinstance(src, Lazy):
            if not _owns_storage(tensor) and tensor.is_contiguous() and name in part.origin:
                # A row block of a fused tensor (OpenCLIP q/k/v): view just those bytes.
                part_view = part.store.view_part(part.origin[name], tensor.storage_offset(), tuple(ref.shape))
                tensor = tensor if part_view is None else part_view
            if _owns_storage(tensor):
                require_finite(name, tensor)
                state[name] = tensor  # a copy-on-write view of the file: no copy at all
                if isinstance(src, str):
                    shared[src] = tensor
                continue
        out = torch.empty(ref.shape, dtype=wanted, device=device)
        out.copy_(tensor)
        del tensor
        require_finite(name, out)
        state[name] = out
        if isinstance(src, str):
            shared[src] = out
        done(name)
    if quantizer is not None:
        quantizer.install(module, state)
    module.load_state_dict(state, strict=True, assign=True)


def load_part(part: Part, base: str, family: str | None, dtype: torch.dtype | None,
              device: str | torch.device = "cpu") -> nn.Module:
    """The module of one part given alone (a separate VAE file, say): built on meta, checked like a
    checkpoint's parts (`validate_parts`), materialised (a copy on `device`), its file released."""
    module = meta_module(part.config)
    validate_parts({part.slot: part}, {part.slot: module}, base, family)
    materialize(module, part, dtype, torch.device(device), zero_copy=False)
    part.sources.clear()
    part.store.close()
    return module
