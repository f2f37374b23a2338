"""Checking and materialising a loaded checkpoint: every tensor accounted for (missing,
unexpected and mis-shaped ones reported in one message with the likely cause), then each
parameter given memory of the wanted dtype and device, zero-copy where the memory map allows,
with a finiteness check on the data as it is touched."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..families import lineages
from .openclip_keys import hf_name_to_openclip
from .safetensors_io import TensorStore, all_finite, count_nonfinite
from .single_file import describe_foreign, is_openclip_prefix, looks_like_lora

__all__ = ["ModelLoadError", "Part", "materialize", "title", "validate_parts"]


def title(base: str) -> str:
    """Human name of a lineage (\"SDXL\", \"SD1.5\") for messages."""
    return lineages()[base].title

class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


@dataclass
class Part:
    """One module to build: its config and, per parameter, where its tensor comes from."""

    slot: str  # unet, vae, text_encoder, text_encoder_2
    config: object
    store: TensorStore
    sources: dict[str, str | torch.Tensor] = field(default_factory=dict)  # param -> store key or view
    unexpected: list[str] = field(default_factory=list)  # store keys nothing uses
    label: dict[str, str] = field(default_factory=dict)  # param -> name in the file, for messages
    prefix: str = ""  # file-name prefix of parameters the file lacks, for messages
    origin: dict[str, str] = field(default_factory=dict)  # param given as a view -> store key it views


# ---- validation and materialisation ---------------------------------------------------------
def validate_parts(parts: dict[str, Part], modules: dict[str, nn.Module], base: str, family: str | None) -> None:
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
    """Widest floating dtype among the part's tensors (dtype=None keeps what the file has)."""
    best = None
    for src in part.sources.values():
        dt = part.store.dtype(src) if isinstance(src, str) else src.dtype
        if dt.is_floating_point and (best is None or dt.itemsize > best.itemsize):
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

    quantize: `fp8` | `int8` | `nf4` packs the weights of the module's quantizable layers as they
    are read (`models.quant.loading`) and swaps those layers for quantized ones; None / `none`
    loads everything in the target dtype."""
    target = dtype or _stored_dtype(part)
    zero_copy = zero_copy and materialize_mode == "auto" and device.type == "cpu"
    quantizer = None
    if quantize not in (None, "none"):
        from ..quant.loading import LoadQuantizer

        quantizer = LoadQuantizer(module, quantize, target, device)

    def source(name: str, shape) -> torch.Tensor:
        src = part.sources[name]
        tensor = part.store[src] if isinstance(src, str) else src
        return tensor if tuple(tensor.shape) == tuple(shape) else tensor.reshape(shape)

    def done(name: str) -> None:
        key = part.sources[name] if isinstance(part.sources[name], str) else part.origin.get(name)
        if key is not None:
            part.store.release(key)  # drop the file pages just copied

    def require_finite(name: str, loaded: torch.Tensor) -> None:
        if all_finite(loaded):
            return
        src = part.sources[name]
        key = src if isinstance(src, str) else part.origin.get(name)
        where = part.store.source_of(key) if key is not None else part.store.name
        label = part.label.get(name) or _file_name(part, name)
        stored = source(name, loaded.shape)
        if all_finite(stored):
            raise ModelLoadError(
                f"{where}: tensor {label!r} has values beyond the range of {loaded.dtype} (inf after conversion); "
                "load the model in bf16 or fp32 (model.dtype)")
        nan, inf = count_nonfinite(stored)
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
    for name, ref in module.state_dict().items():
        tensor = source(name, ref.shape)
        if quantizer is not None and quantizer.claims(name):
            require_finite(name, tensor)
            quantizer.take(name, tensor)  # only the packed weight is kept
            done(name)
            continue
        wanted = target if tensor.is_floating_point() else tensor.dtype
        if zero_copy and tensor.dtype == wanted:
            if not _owns_storage(tensor) and tensor.is_contiguous() and name in part.origin:
                # A row block of a fused tensor (OpenCLIP q/k/v): view just those bytes.
                part_view = part.store.view_part(part.origin[name], tensor.storage_offset(), tuple(ref.shape))
                tensor = tensor if part_view is None else part_view
            if _owns_storage(tensor):
                require_finite(name, tensor)
                state[name] = tensor  # a copy-on-write view of the file: no copy at all
                continue
        out = torch.empty(ref.shape, dtype=wanted, device=device)
        out.copy_(tensor)
        require_finite(name, out)
        state[name] = out
        done(name)
    if quantizer is not None:
        quantizer.install(module, state)
    module.load_state_dict(state, strict=True, assign=True)
