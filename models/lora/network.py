"""LoRA networks for our denoisers (UNet, Flux transformer) and text encoders (CLIP, T5), with
kohya/ComfyUI-compatible naming.

    net = models.inject_lora(bundle, unet="kohya", text_encoders="te", rank=16, alpha=8)   # Flux: unet="attn-mlp"
    optimizer = torch.optim.AdamW(net.param_groups(unet_lr=1e-4, te_lr=5e-5))
    ...
    net.save("out.safetensors")          # kohya names: loads in ComfyUI, A1111/Forge, diffusers

`inject_lora` picks target layers (presets / regexes, `models.lora.names`), wraps each in a
`LoRALinear` / `LoRAConv2d` (`models.lora.layers`; base parameter names unchanged) and returns the
`LoRANetwork` that owns the adapters (`algo`: LoRA, or LyCORIS LoHa / LoKr from
`models.lora.lycoris`): its state dict is exactly the kohya file layout; it merges,
unmerges, removes itself (the original module objects come back) and saves. Several networks can be
stacked on one model, each with its own multiplier (= ComfyUI strength).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import shape_in_block, unet_block_tables
from .layers import Adapter, LoRAAdapter, LoRAConv2d, LoRALinear, _LoRAWrapper, draw_module_dropout, is_conv
from .lycoris import FullAdapter, LoHaAdapter, LoKrAdapter, LoKrLayout
from .options import LoRAOptions
from .names import (
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    ModuleRef,
    base_of,
    check_denoiser_preset,
    components_of,
    denoiser_kind,
    denoiser_presets,
    drop_unread_text_layers,
    filter_layers,
    is_3x3,
    name_table,
    select_layers,
)

__all__ = [
    "ALGOS",
    "UNET_PRESETS",
    "LoRAAdapter",
    "LoRAOptions",
    "LoRAConv2d",
    "LoRALinear",
    "LoRANetwork",
    "LoRATarget",
    "inject_lora",
]

_TAGS = itertools.count()
ALGOS = ("lora", "loha", "lokr")
"""Algorithms `inject_lora` trains (`LoRAOptions.algo`); files may also hold `full` differences."""


@dataclass(frozen=True)
class LoRATarget:
    """One module to adapt and how (what `inject_lora` and `load_lora` hand to LoRANetwork)."""

    ref: ModuleRef
    """The module and its names."""
    rank: int
    """Rank r of its adapter."""
    alpha: float
    """Scale numerator (scale = alpha / r)."""
    dora: bool | str = False
    """Give it a DoRA magnitude: True / `in` per input channel, `out` per output channel."""
    algo: str = "lora"
    """`lora`, `loha`, `lokr` or `full` (a stored full-size difference, from files only)."""
    tucker: bool = False
    """3x3 convs get a Tucker core (LoRA `lora_mid`, LoHa `hada_t1/t2`, LoKr `lokr_t2`)."""
    factor: int = -1
    """LoKr factorization factor (`LoRAOptions.factor`)."""
    decompose_both: bool = False
    """LoKr: w1 low rank too when small enough (`LoRAOptions.decompose_both`)."""
    layout: LoKrLayout | None = None
    """LoKr tensors as read from a file (overrides factor / decompose_both / tucker)."""
    bias: bool = False
    """Full difference with a bias update (`diff_b`)."""

    def make_adapter(self, base: nn.Module, dropout: float, rank_dropout: float, module_dropout: float) -> Adapter:
        """The adapter this target describes, for base layer `base`."""
        drops = {"rank_dropout": rank_dropout, "module_dropout": module_dropout}
        if self.algo == "lora":
            return LoRAAdapter(base, self.rank, self.alpha, dropout=dropout, dora=self.dora, tucker=self.tucker,
                               **drops)
        if self.algo == "loha":
            return LoHaAdapter(base, self.rank, self.alpha, dora=self.dora, tucker=self.tucker, **drops)
        if self.algo == "lokr":
            return LoKrAdapter(base, self.rank, self.alpha, dora=self.dora, factor=self.factor,
                               decompose_both=self.decompose_both, tucker=self.tucker, layout=self.layout, **drops)
        if self.algo == "full":
            return FullAdapter(base, bias=self.bias, **drops)
        raise ValueError(f"unknown adapter algorithm {self.algo!r}; use one of {', '.join(ALGOS)}")


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------
class LoRANetwork(nn.Module):
    """All adapters of one LoRA on one model. Children are the adapters, named by their kohya
    module name, so `state_dict()` holds exactly the kohya file keys
    (`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`, `<name>.dora_scale`;
    LoHa `<name>.hada_w1_a` ...; LoKr `<name>.lokr_w1` ...).

    Build with `inject_lora` (new training) or `models.load_lora` (from a file). Several networks
    may be stacked on one model, each with its own `multiplier`.
    """

    def __init__(self, bundle, targets: Sequence[LoRATarget], config: LoRAOptions, *, dropout=0.0, rank_dropout=0.0,
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
            adapter = t.make_adapter(base_of(layer), dropout, rank_dropout, module_dropout)
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
                layer = (LoRAConv2d if is_conv(layer) else LoRALinear)(layer)
                parent._modules[leaf] = layer
            layer.lora_adapters[self.tag] = self._modules[name]
            self._wrappers[name] = layer
        # Module dropout: each model part draws its adapters' decisions before its forward pass.
        self._dropout_hooks = []
        for component in sorted({ref.component for ref in self._refs.values()}):
            adapters = [self._modules[n] for n, ref in self._refs.items() if ref.component == component]
            if any(a.module_dropout > 0 for a in adapters):
                hook = lambda module, args, adapters=adapters: draw_module_dropout(adapters)
                self._dropout_hooks.append(parts[component].register_forward_pre_hook(hook))
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
            self._modules[name]._merge_backup = self._modules[name]._bias_backup = None
            del wrapper.lora_adapters[self.tag]
            if len(wrapper.lora_adapters) == 0:
                parent_path, _, leaf = ref.path.rpartition(".")
                root = parts[ref.component]
                parent = root.get_submodule(parent_path) if parent_path else root
                parent._modules[leaf] = wrapper.restore()
        self._wrappers.clear()
        for hook in self._dropout_hooks:
            hook.remove()
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

    def adapters(self) -> dict[str, Adapter]:
        """kohya name -> adapter."""
        return dict(self._modules)  # type: ignore[arg-type]

    def refs(self) -> dict[str, ModuleRef]:
        """kohya name -> the module it adapts (component, path, other spellings)."""
        return dict(self._refs)

    def param_groups(self, unet_lr: float, te_lr: float | None = None, *, lora_plus_ratio: float | None = None,
                     unet_block_lr: dict[str, float] | None = None) -> list[dict]:
        """Optimizer groups: UNet adapters at `unet_lr` (x their block's multiplier in
        `unet_block_lr`), text-encoder adapters at `te_lr` (default unet_lr), up matrices x
        `lora_plus_ratio` (LoRA+); empty groups are left out (see `models.lora.blocks.group_parameters`)."""
        from .blocks import group_parameters

        return group_parameters(((n, self._refs[n], a) for n, a in self.adapters().items()), unet_lr, te_lr,
                                lora_plus_ratio=lora_plus_ratio, unet_block_lr=unet_block_lr)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every adapter (e.g. after `to_empty` of a model injected on meta)."""
        for name, a in self.adapters().items():
            a.reset_parameters(self._wrappers[name].base_weight() if self._attached and a.is_dora else None)

    # -- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, keep_original: bool | None = None) -> None:
        """Fold every adapter into its base weight (and bias, for `diff_b`) at the current
        multiplier (inference speed).

        All merged weights are computed and checked first: if any is non-finite (in the base dtype)
        a ValueError names the module and no weight is changed. `keep_original` (default: for DoRA
        or non-fp32 weights) stores a copy of the old weight so `unmerge` restores it bit-exactly;
        otherwise unmerge subtracts the update again (float rounding only). A DoRA merge cannot be
        undone from the merged weight (the norm of W + s*up@down is lost), so after
        `keep_original=False` a DoRA network can only be removed with `keep_merged=True`.
        """
        todo = [(n, a) for n, a in self.adapters().items() if not a.merged]
        for name, _ in todo:
            if (fmt := self._wrappers[name].quantization) is not None:
                raise RuntimeError(f"cannot merge LoRA {name} into its {fmt}-quantized base layer (model.quantize): "
                                   "export the LoRA and merge it into a full-precision checkpoint with "
                                   "`python -m trainer lora merge`, or load the base unquantized")
        for name, a in todo:
            w = self._wrappers[name].weight
            if w.is_meta:
                raise RuntimeError(f"cannot merge LoRA {name}: the base weight is on the meta device")
            if not torch.isfinite(a.adapted_weight(w).to(w.dtype)).all():
                raise ValueError(f"merging LoRA {name} gives non-finite weights in {w.dtype}; nothing was merged")
            if (db := a.delta_bias()) is not None:
                b = self._wrappers[name].bias
                if not torch.isfinite((b.float() + a.multiplier * db).to(b.dtype)).all():
                    raise ValueError(f"merging LoRA {name} gives a non-finite bias in {b.dtype}; nothing was merged")
        for name, a in todo:
            w = self._wrappers[name].weight
            keep = keep_original if keep_original is not None else (a.is_dora or w.dtype != torch.float32)
            a._merge_backup = w.detach().clone() if keep else None
            w.copy_(a.adapted_weight(w).to(w.dtype))
            if (db := a.delta_bias()) is not None:
                b = self._wrappers[name].bias
                a._bias_backup = b.detach().clone() if keep else None
                b.copy_((b.float() + a.multiplier * db).to(b.dtype))
            a.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (no-op for adapters that are not merged)."""
        for name, a in self.adapters().items():
            if a.merged and a.is_dora and a._merge_backup is None:
                raise RuntimeError(
                    f"cannot unmerge DoRA LoRA {name}: it was merged with keep_original=False and a DoRA merge "
                    "cannot be undone from the merged weight; merge with keep_original=True (the DoRA default) "
                    "to unmerge later, or reload the base weights"
                )
        for name, a in self.adapters().items():
            if not a.merged:
                continue
            w = self._wrappers[name].weight
            if a._merge_backup is not None:
                w.copy_(a._merge_backup)
            else:
                w.copy_((w.float() - a.multiplier * a.delta_weight()).to(w.dtype))
            if (db := a.delta_bias()) is not None:
                b = self._wrappers[name].bias
                b.copy_(a._bias_backup if a._bias_backup is not None else (b.float() - a.multiplier * db).to(b.dtype))
            a._merge_backup = a._bias_backup = None
            a.merged = False

    # -- export -----------------------------------------------------------------------------------
    def state_dict_for_export(self, dtype: torch.dtype | None = None, format: str = "kohya") -> dict[str, torch.Tensor]:
        """File tensors (works on meta: shapes only).

        format="kohya": `<kohya name>.lora_down.weight` / `.lora_up.weight` / 0-dim `.alpha` /
        `.dora_scale` (ComfyUI, A1111/Forge, kohya, diffusers' kohya loader); LyCORIS names for
        the other kinds (`.lora_mid.weight`, `.hada_w1_a` ... `.hada_t2`, `.lokr_w1[_a/_b]`,
        `.lokr_w2[_a/_b]`, `.lokr_t2`).
        format="peft": diffusers/PEFT names `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`
        (Flux: `transformer.<diffusers path>`, fused layers split into their diffusers pieces),
        `text_encoder[_2].<HF path>...`, with alpha/rank folded into lora_B (PEFT's default scale is
        1); NOT read by ComfyUI for SD attention layers (it reads Flux's), DoRA not supported.
        """
        out: dict[str, torch.Tensor] = {}
        for name, a in self.adapters().items():
            if format == "kohya":
                modules = {name: a.export_tensors()}
            elif format == "peft":
                modules = self._peft_tensors(self._refs[name], a)
            else:
                raise ValueError(f"unknown LoRA file format {format!r}; use 'kohya' or 'peft'")
            for prefix, tensors in modules.items():
                for suffix, t in tensors.items():
                    t = t if dtype is None else t.to(dtype)
                    out[f"{prefix}.{suffix}"] = t.contiguous()
        return out

    @staticmethod
    def _peft_tensors(ref: ModuleRef, a: Adapter) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT module name -> lora_A / lora_B of one adapter (scale folded into lora_B); a Flux layer
        diffusers splits gives one entry per diffusers piece (`models.lora.pieces.peft_pieces`)."""
        if a.algo != "lora" or a.lora_mid is not None:
            raise ValueError(f"format='peft' holds plain LoRA only, not {a.algo}"
                             f"{' with a Tucker core' if a.algo == 'lora' else ''}; save in the kohya format")
        if a.is_dora:
            raise ValueError("format='peft' cannot carry DoRA (dora_scale); save in the kohya format")
        down, up = a.lora_down.weight.detach(), a.lora_up.weight.detach() * a.scale
        if ref.peft is not None:
            return {ref.peft: {"lora_A.weight": down, "lora_B.weight": up}}
        if ref.pieces:
            from .pieces import peft_pieces

            return peft_pieces(ref.pieces, down, up)
        raise ValueError(f"format='peft': module {ref.path} has no diffusers name; save in the kohya format")

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
_UNSET = object()  # marks keyword arguments of `inject_lora` that were not given


def inject_lora(
    bundle,
    options: LoRAOptions | None = None,
    *,
    unet=_UNSET,
    text_encoders=_UNSET,
    freeze_base: bool = True,
    **fields,
) -> LoRANetwork:
    """Add fresh LoRA adapters to `bundle` (a `ModelBundle`) and return their `LoRANetwork`.

    options: a `LoRAOptions` (the `lora` section of a training config); keyword arguments named
    after its fields (algo, rank, alpha, conv_rank, conv_alpha, text_encoder_rank,
    text_encoder_alpha, dropout, rank_dropout, module_dropout, dora, factor, decompose_both,
    use_tucker, include, exclude) override it, e.g. `algo="lokr", factor=8`. Without `options`
    the defaults are those of `LoRAOptions` except that text encoders get no adapters.
    unet: the denoiser's targets: UNet `attn` | `kohya` | `locon`, Flux transformer `attn` |
    `attn-mlp` | `attn-mlp-mod` (see `models.lora.flux_names`) | regex list on module paths | None (no
    denoiser adapters); sets `options.preset` / `options.targets`. A preset of the other kind of
    denoiser is a ValueError.
    text_encoders: `te` (CLIP q/k/v/out_proj, fc1, fc2; T5 q/k/v/o, wi_0, wi_1, wo of every layer of
    every encoder) | regexes | None.
    Linear and 1x1-conv adapters get `rank`/`alpha` (text encoders: `text_encoder_rank`/
    `text_encoder_alpha`), 3x3 convs `conv_rank`/`conv_alpha`. alpha None = rank (scale 1).
    include / exclude: regexes searched in `<component>.<path>` (components `unet`, `te`, `te1`/`te2`
    (SDXL) or `te1`/`te3` (Flux)), e.g. exclude=[r"^unet\\.output_blocks\\.[0-2]\\."].
    Base weights should be loaded (DoRA reads them) and the model in its final dtype; a model on
    meta can be injected for shape work (then `to_empty` + `net.reset_parameters()`).
    freeze_base: set requires_grad=False on every model parameter first, so that only the
    adapters train.
    """
    config = _resolve_options(options, unet, text_encoders, fields)
    unet, text_encoders = config.unet_targets, config.text_encoders
    if unet is None and text_encoders is None:
        raise ValueError("inject_lora: nothing to adapt; set unet and/or text_encoders")
    config.check()
    rank, lin_alpha = config.linear_shape()
    c_rank, c_alpha = config.conv_shape()
    te_rank, te_alpha = config.text_encoder_shape()
    kind = denoiser_kind(bundle.spec)
    check_denoiser_preset(bundle.spec, unet)
    if kind != "unet":
        for name in ("block_ranks", "block_alphas", "conv_block_ranks", "conv_block_alphas"):
            if getattr(config, name) is not None:
                raise ValueError(f"{name}: per-block ranks follow the UNet's IN/MID/OUT blocks and {bundle.family} "
                                 "has no UNet; set it to null and pick layers with include / exclude")
    table = name_table(bundle)
    parts = components_of(bundle)
    if freeze_base:
        bundle.requires_grad_(False)
    targets: list[LoRATarget] = []
    selected, filtered, misses = {}, {}, []
    for component, root in parts.items():
        if component == "unet":
            if unet is None:
                continue
            what = f"{'Flux transformer' if kind == 'flux' else 'UNet'} of {bundle.family}"
            chosen = select_layers(root, unet, denoiser_presets(bundle.spec), what, kind)
        else:
            if text_encoders is None:
                continue
            try:
                chosen = select_layers(root, text_encoders, TEXT_ENCODER_PRESETS,
                                       f"text encoder {component} of {bundle.family}")
            except ValueError as exc:  # regexes may name layers of one encoder only (Flux: T5's q/k/v/o)
                misses.append(exc)
                continue
            chosen = drop_unread_text_layers(chosen, bundle, component)
        selected[component] = len(chosen)
        filtered[component] = list(filter_layers(chosen, component, config.include, config.exclude))
    if text_encoders is not None and misses and len(misses) == len(parts) - 1:
        raise misses[0]
    if not any(filtered.values()):
        raise ValueError(
            f"LoRA include={config.include!r} / exclude={config.exclude!r} left no module of "
            f"{', '.join(selected)} ({sum(selected.values())} selected before filtering)"
        )
    for component, kept in filtered.items():
        root = parts[component]
        blocks = unet_block_tables(root, config) if component == "unet" else (None, None)
        for path, layer in kept:
            if component != "unet":
                r, a = te_rank, te_alpha
            elif is_3x3(layer):
                r, a = shape_in_block(blocks[1], path, (c_rank, c_alpha), config.conv_alpha)
            else:
                r, a = shape_in_block(blocks[0], path, (rank, lin_alpha), config.alpha)
            if r == 0:  # a per-block rank of 0: no adapter in that block
                continue
            targets.append(LoRATarget(table.ref(component, path), r, a, config.dora, algo=config.algo,
                                      tucker=config.use_tucker, factor=config.factor,
                                      decompose_both=config.decompose_both))
    return LoRANetwork(bundle, targets, config, dropout=config.dropout, rank_dropout=config.rank_dropout,
                       module_dropout=config.module_dropout)


def _resolve_options(options: LoRAOptions | None, unet, text_encoders, fields: dict) -> LoRAOptions:
    """`options` (copied) with the keyword overrides of `inject_lora` applied."""
    if options is not None and not isinstance(options, LoRAOptions):
        raise TypeError(f"inject_lora: options must be a LoRAOptions, got {type(options).__name__}")
    allowed = {f.name for f in dataclasses.fields(LoRAOptions)} - {"preset", "targets", "text_encoders"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise TypeError(f"inject_lora: unknown argument(s) {', '.join(unknown)}; LoRA options are "
                        f"unet, text_encoders, {', '.join(sorted(allowed))}")
    base = options if options is not None else LoRAOptions(text_encoders=None)
    # include / exclude: any sequence, None = no filter.
    changes = {k: list(v or []) if k in ("include", "exclude") else v for k, v in fields.items()}
    if unet is not _UNSET:
        if unet is None or (isinstance(unet, str) and unet in UNET_PRESETS):
            changes.update(preset=unet, targets=None)
        else:
            changes.update(preset=None, targets=[unet] if isinstance(unet, str) else list(unet))
    if text_encoders is not _UNSET:
        changes["text_encoders"] = (text_encoders if text_encoders is None or isinstance(text_encoders, str)
                                    else list(text_encoders))
    return dataclasses.replace(base, **changes)
