"""LoRA networks for our UNet and CLIP text encoders, with kohya/ComfyUI-compatible naming.

    net = models.inject_lora(bundle, unet="kohya", text_encoders="te", rank=16, alpha=8)
    optimizer = torch.optim.AdamW(net.param_groups(unet_lr=1e-4, te_lr=5e-5))
    ...
    net.save("out.safetensors")          # kohya names: loads in ComfyUI, A1111/Forge, diffusers

`inject_lora` picks target layers (presets / regexes, `models.lora.names`), wraps each in a
`LoRALinear` / `LoRAConv2d` (`models.lora.layers`; base parameter names unchanged) and returns the
`LoRANetwork` that owns the adapters: its state dict is exactly the kohya file layout; it merges,
unmerges, removes itself (the original module objects come back) and saves. Several networks can be
stacked on one model, each with its own multiplier (= ComfyUI strength).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import LoRAAdapter, LoRAConv2d, LoRALinear, _LoRAWrapper
from .names import (
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    ModuleRef,
    base_of,
    components_of,
    filter_layers,
    is_3x3,
    name_table,
    select_layers,
)

__all__ = [
    "UNET_PRESETS",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRAConv2d",
    "LoRALinear",
    "LoRANetwork",
    "LoRATarget",
    "inject_lora",
]

_TAGS = itertools.count()


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """How a network was built; written to the file metadata (ss_network_dim/alpha/args)."""

    rank: int = 16
    """Rank of Linear and 1x1-conv adapters."""
    alpha: float | None = None
    """Scale numerator for those (scale = alpha / rank); None = rank (scale 1)."""
    conv_rank: int | None = None
    """Rank of 3x3-conv adapters (LoCon); None = rank."""
    conv_alpha: float | None = None
    """Alpha of 3x3-conv adapters; None = conv_rank."""
    text_encoder_rank: int | None = None
    """Rank of text-encoder adapters; None = rank."""
    text_encoder_alpha: float | None = None
    """Alpha of text-encoder adapters; None = alpha (or the text-encoder rank when alpha is None)."""
    dropout: float = 0.0
    """Dropout on the rank-r activations (training only)."""
    rank_dropout: float = 0.0
    """Probability of zeroing each rank channel per sample (training only)."""
    module_dropout: float = 0.0
    """Probability of skipping a whole adapter per forward (training only)."""
    dora: bool = False
    """Weight-decomposed LoRA (trainable per-input-column magnitude `dora_scale`)."""
    unet: str | list[str] | None = "kohya"
    """UNet preset (`attn`, `kohya`, `locon`), regexes on UNet module paths, or None."""
    text_encoders: str | list[str] | None = None
    """Text-encoder preset `te`, regexes on encoder module paths, or None."""
    include: list[str] = field(default_factory=list)
    """Keep only modules whose `<component>.<path>` matches one of these regexes (re.search)."""
    exclude: list[str] = field(default_factory=list)
    """Drop modules whose `<component>.<path>` matches one of these regexes."""


@dataclass(frozen=True)
class LoRATarget:
    """One module to adapt and how (what `inject_lora` and `load_lora` hand to LoRANetwork)."""

    ref: ModuleRef
    """The module and its names."""
    rank: int
    """Rank r of its adapter."""
    alpha: float
    """Scale numerator (scale = alpha / r)."""
    dora: bool = False
    """Give it a DoRA magnitude."""


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------
class LoRANetwork(nn.Module):
    """All adapters of one LoRA on one model. Children are the adapters, named by their kohya
    module name, so `state_dict()` holds exactly the kohya file keys
    (`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`, `<name>.dora_scale`).

    Build with `inject_lora` (new training) or `models.load_lora` (from a file). Several networks
    may be stacked on one model, each with its own `multiplier`.
    """

    def __init__(self, bundle, targets: Sequence[LoRATarget], config: LoRAConfig, *, dropout=0.0, rank_dropout=0.0,
                 module_dropout=0.0):
        super().__init__()
        object.__setattr__(self, "_bundle", bundle)  # not a submodule: the model is not ours to save
        self.family, self.base = bundle.family, bundle.spec.base
        self.config = config
        self.tag = f"n{next(_TAGS)}"
        self.file_metadata: dict[str, str] = {}
        self._refs: dict[str, ModuleRef] = {}
        self._wrappers: dict[str, _LoRAWrapper] = {}
        self._attached = False
        parts = components_of(bundle)
        for t in targets:
            ref = t.ref
            if ref.kohya in self._refs:
                raise ValueError(f"LoRA module {ref.kohya} listed twice")
            layer = parts[ref.component].get_submodule(ref.path)
            adapter = LoRAAdapter(base_of(layer), t.rank, t.alpha, dropout=dropout, rank_dropout=rank_dropout,
                                  module_dropout=module_dropout, dora=t.dora)
            self.add_module(ref.kohya, adapter)
            self._refs[ref.kohya] = ref
        self._attach()

    # -- wiring into the model --------------------------------------------------------------------
    def _attach(self) -> None:
        parts = components_of(self._bundle)
        for name, ref in self._refs.items():
            root = parts[ref.component]
            parent_path, _, leaf = ref.path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            layer = parent._modules[leaf]
            if not isinstance(layer, _LoRAWrapper):
                layer = (LoRAConv2d if isinstance(layer, nn.Conv2d) else LoRALinear)(layer)
                parent._modules[leaf] = layer
            layer.lora_adapters[self.tag] = self._modules[name]
            self._wrappers[name] = layer
        self._attached = True

    def remove(self, keep_merged: bool = False) -> None:
        """Detach from the model. Merged adapters are unmerged first unless `keep_merged` (then the
        model keeps the merged weights). A layer left with no adapter gets its original module back."""
        if not self._attached:
            return
        if not keep_merged:
            self.unmerge()
        parts = components_of(self._bundle)
        for name, ref in self._refs.items():
            wrapper = self._wrappers[name]
            self._modules[name].merged = False
            self._modules[name]._merge_backup = None
            del wrapper.lora_adapters[self.tag]
            if len(wrapper.lora_adapters) == 0:
                parent_path, _, leaf = ref.path.rpartition(".")
                root = parts[ref.component]
                parent = root.get_submodule(parent_path) if parent_path else root
                parent._modules[leaf] = wrapper.restore()
        self._wrappers.clear()
        self._attached = False

    # -- properties -------------------------------------------------------------------------------
    @property
    def bundle(self):
        return self._bundle

    @property
    def multiplier(self) -> float:
        """Strength of the whole network (ComfyUI's strength); settable."""
        values = {a.multiplier for a in self.adapters().values()}
        return values.pop() if len(values) == 1 else float("nan")

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        if any(a.merged for a in self.adapters().values()):
            raise RuntimeError("unmerge the LoRA before changing its multiplier")
        for a in self.adapters().values():
            a.multiplier = float(value)

    def adapters(self) -> dict[str, LoRAAdapter]:
        """kohya name -> adapter."""
        return dict(self._modules)  # type: ignore[arg-type]

    def refs(self) -> dict[str, ModuleRef]:
        """kohya name -> the module it adapts (component, path, other spellings)."""
        return dict(self._refs)

    def param_groups(self, unet_lr: float, te_lr: float | None = None) -> list[dict]:
        """Optimizer groups: UNet adapters at `unet_lr`, text-encoder adapters at `te_lr`
        (default unet_lr); empty groups are left out."""
        groups = []
        unet = [p for n, a in self.adapters().items() if self._refs[n].component == "unet" for p in a.parameters()]
        te = [p for n, a in self.adapters().items() if self._refs[n].component != "unet" for p in a.parameters()]
        if unet:
            groups.append({"params": unet, "lr": unet_lr, "name": "unet_lora"})
        if te:
            groups.append({"params": te, "lr": unet_lr if te_lr is None else te_lr, "name": "text_encoder_lora"})
        return groups

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every adapter (e.g. after `to_empty` of a model injected on meta)."""
        for name, a in self.adapters().items():
            a.reset_parameters(self._wrappers[name].weight if self._attached else None)

    # -- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, keep_original: bool | None = None) -> None:
        """Fold every adapter into its base weight at the current multiplier (inference speed).

        All merged weights are computed and checked first: if any is non-finite (in the base dtype)
        a ValueError names the module and no weight is changed. `keep_original` (default: for DoRA
        or non-fp32 weights) stores a copy of the old weight so `unmerge` restores it bit-exactly;
        otherwise unmerge subtracts the update again (float rounding only).
        """
        todo = [(n, a) for n, a in self.adapters().items() if not a.merged]
        for name, a in todo:
            w = self._wrappers[name].weight
            if w.is_meta:
                raise RuntimeError(f"cannot merge LoRA {name}: the base weight is on the meta device")
            if not torch.isfinite(a.adapted_weight(w).to(w.dtype)).all():
                raise ValueError(f"merging LoRA {name} gives non-finite weights in {w.dtype}; nothing was merged")
        for name, a in todo:
            w = self._wrappers[name].weight
            keep = keep_original if keep_original is not None else (a.is_dora or w.dtype != torch.float32)
            a._merge_backup = w.detach().clone() if keep else None
            w.copy_(a.adapted_weight(w).to(w.dtype))
            a.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (no-op for adapters that are not merged)."""
        for name, a in self.adapters().items():
            if not a.merged:
                continue
            w = self._wrappers[name].weight
            if a._merge_backup is not None:
                w.copy_(a._merge_backup)
            else:
                w.copy_((w.float() - a.multiplier * a.delta_weight()).to(w.dtype))
            a._merge_backup = None
            a.merged = False

    # -- export -----------------------------------------------------------------------------------
    def state_dict_for_export(self, dtype: torch.dtype | None = None, format: str = "kohya") -> dict[str, torch.Tensor]:
        """File tensors (works on meta: shapes only).

        format="kohya": `<kohya name>.lora_down.weight` / `.lora_up.weight` / 0-dim `.alpha` /
        `.dora_scale` (ComfyUI, A1111/Forge, kohya, diffusers' kohya loader).
        format="peft": diffusers/PEFT names `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`,
        `text_encoder[_2].<HF path>...`, with alpha/rank folded into lora_B (PEFT's default scale is
        1); NOT read by ComfyUI for attention layers, DoRA not supported.
        """
        out: dict[str, torch.Tensor] = {}
        for name, a in self.adapters().items():
            down, up = a.lora_down.weight.detach(), a.lora_up.weight.detach()
            if format == "kohya":
                tensors = {"lora_down.weight": down, "lora_up.weight": up,
                           "alpha": torch.tensor(a.alpha, dtype=torch.float32, device=down.device)}
                if a.is_dora:
                    tensors["dora_scale"] = a.dora_scale.detach()
                prefix = name
            elif format == "peft":
                ref = self._refs[name]
                if a.is_dora:
                    raise ValueError("format='peft' cannot carry DoRA (dora_scale); save in the kohya format")
                if ref.peft is None:
                    raise ValueError(f"format='peft': module {ref.path} has no diffusers name; save in the kohya format")
                tensors = {"lora_A.weight": down, "lora_B.weight": up * a.scale}
                prefix = ref.peft
            else:
                raise ValueError(f"unknown LoRA file format {format!r}; use 'kohya' or 'peft'")
            for suffix, t in tensors.items():
                t = t if dtype is None else t.to(dtype)
                out[f"{prefix}.{suffix}"] = t.contiguous()
        return out

    def save(self, path, dtype: torch.dtype | None = torch.float16, metadata: dict | None = None,
             format: str = "kohya") -> dict[str, str]:
        """Write the LoRA atomically as .safetensors; returns the metadata written.

        `metadata` adds training facts (ss_* keys, modelspec.title, ...); see
        `models.lora.files.build_metadata`.
        """
        from .files import save_network

        return save_network(self, path, dtype=dtype, metadata=metadata, format=format)

    def extra_repr(self) -> str:
        return f"family={self.family}, modules={len(self._refs)}, tag={self.tag}"


# ------------------------------------------------------------------------------------------------
# inject_lora
# ------------------------------------------------------------------------------------------------
def inject_lora(
    bundle,
    unet: str | Sequence[str] | None = "kohya",
    text_encoders: str | Sequence[str] | None = None,
    rank: int = 16,
    alpha: float | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    dora: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    text_encoder_rank: int | None = None,
    text_encoder_alpha: float | None = None,
    freeze_base: bool = True,
) -> LoRANetwork:
    """Add fresh LoRA adapters to `bundle` (a `ModelBundle`) and return their `LoRANetwork`.

    unet: `attn` | `kohya` | `locon` | regex list on UNet module paths | None.
    text_encoders: `te` (q/k/v/out_proj, fc1, fc2 of every layer of every encoder) | regexes | None.
    Linear and 1x1-conv adapters get `rank`/`alpha` (text encoders: `text_encoder_rank`/
    `text_encoder_alpha`), 3x3 convs `conv_rank`/`conv_alpha`. alpha None = rank (scale 1).
    include / exclude: regexes searched in `<component>.<path>` (components `unet`, `te` or
    `te1`/`te2`), e.g. exclude=[r"^unet\\.output_blocks\\.[0-2]\\."].
    Base weights should be loaded (DoRA reads them) and the model in its final dtype; a model on
    meta can be injected for shape work (then `to_empty` + `net.reset_parameters()`).
    freeze_base: set requires_grad=False on every model parameter first, so that only the
    adapters train.
    """
    if unet is None and text_encoders is None:
        raise ValueError("inject_lora: nothing to adapt; set unet and/or text_encoders")
    config = LoRAConfig(
        rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, text_encoder_rank=text_encoder_rank,
        text_encoder_alpha=text_encoder_alpha, dropout=dropout, rank_dropout=rank_dropout,
        module_dropout=module_dropout, dora=dora, unet=unet if isinstance(unet, str) or unet is None else list(unet),
        text_encoders=text_encoders if isinstance(text_encoders, str) or text_encoders is None else list(text_encoders),
        include=list(include or []), exclude=list(exclude or []),
    )
    lin_alpha = float(rank if alpha is None else alpha)
    c_rank = rank if conv_rank is None else conv_rank
    c_alpha = float(c_rank if conv_alpha is None else conv_alpha)
    te_rank = rank if text_encoder_rank is None else text_encoder_rank
    te_alpha = float(text_encoder_alpha if text_encoder_alpha is not None else (alpha if alpha is not None else te_rank))
    table = name_table(bundle)
    parts = components_of(bundle)
    if freeze_base:
        bundle.requires_grad_(False)
    targets: list[LoRATarget] = []
    for component, root in parts.items():
        if component == "unet":
            if unet is None:
                continue
            chosen = select_layers(root, unet, UNET_PRESETS, f"UNet of {bundle.family}")
        else:
            if text_encoders is None:
                continue
            chosen = select_layers(root, text_encoders, TEXT_ENCODER_PRESETS, f"text encoder {component} of {bundle.family}")
        kept = list(filter_layers(chosen, component, config.include, config.exclude))
        if not kept:
            raise ValueError(
                f"LoRA include={config.include!r} / exclude={config.exclude!r} left no module of {component} "
                f"({len(chosen)} selected before filtering)"
            )
        for path, layer in kept:
            if component != "unet":
                r, a = te_rank, te_alpha
            elif is_3x3(layer):
                r, a = c_rank, c_alpha
            else:
                r, a = rank, lin_alpha
            targets.append(LoRATarget(table.ref(component, path), r, a, dora))
    return LoRANetwork(bundle, targets, config, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
