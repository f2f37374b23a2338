"""LoRA module names: our module paths <-> kohya / diffusers / PEFT spellings.

Our modules carry the original single-file names (ldm/sgm UNet paths, BFL Flux paths, HF CLIP and
T5 paths). LoRA files name a module in one of these spellings:

- kohya (what ComfyUI, A1111/Forge read; our default export): `lora_unet_` / `lora_te_` /
  `lora_te1_` / `lora_te2_` / `lora_te3_` + module path with '.' -> '_'. For SDXL the UNet path is
  the ldm path (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); for SD1.5/SD2 it is
  the DIFFUSERS path (`lora_unet_down_blocks_0_attentions_0_proj_in`), because kohya trains those on
  diffusers' UNet; for Flux it is the BFL path (`lora_unet_double_blocks_0_img_attn_qkv`, see
  `models.lora.flux_names`). Text encoders use the HF path (`lora_te1_text_model_encoder_layers_0_mlp_fc1`;
  Flux's T5: `lora_te3_encoder_block_0_layer_0_SelfAttention_q`).
- diffusers-underscored SDXL (other trainers): `lora_unet_` + diffusers path with '_'. ComfyUI
  accepts both UNet spellings for every family, and so do we on import.
- PEFT / diffusers `save_lora_weights`: `unet.` (Flux: `transformer.`) + diffusers path,
  `text_encoder.` / `text_encoder_2.` + HF path, each followed by `.lora_A.weight` / `.lora_B.weight`.
  Flux layers that diffusers splits (qkv, linear1, the final adaLN) are read as row pieces.

The ldm -> diffusers UNet path map is the checkpoint converter's (`models.checkpoints.unet_names`),
computed from the block layout, so it holds for every SD1.5/SD2/SDXL-shaped UNet, full size or
tiny; the Flux map is `models.checkpoints.flux_keys`'. Names are matched exactly through tables
built from the model's own modules, never by guessing where an underscore stood for a dot.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from ..checkpoints.unet_names import layers_per_block, unet_diffusers_path
from ..quant.layers import QuantLinear
from .layers import ADAPTABLE, is_conv

# Kohya prefix and diffusers/PEFT prefix per component. Components are named after the text
# encoder slot they fill: SD1.5/SD2 have one (`te`), SDXL two (`te1` CLIP-L, `te2` bigG), Flux
# `te1` (CLIP-L) and `te3` (T5-XXL), as kohya sd-scripts and ComfyUI number them.
KOHYA_PREFIX = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}
PEFT_PREFIX = {"unet": "unet.", "te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2.",
               "te3": "text_encoder_2."}
UNET_SPELLINGS = ("ldm", "diffusers", "bfl")
"""`FamilySpec.lora_unet_names` values: which module paths follow `lora_unet_` in kohya files."""


def text_encoder_components(spec) -> tuple[str, ...]:
    """Component names of a family's text encoders, in bundle order (`FamilySpec.lora_text_components`:
    SDXL ("te1", "te2"), Flux ("te1", "te3"), SD1.5/SD2 ("te",))."""
    return spec.lora_text_components


def kohya_spelling(path: str) -> str:
    """Module path -> the underscore form used after a kohya prefix."""
    return path.replace(".", "_")


@dataclass(frozen=True)
class ModuleRef:
    """One LoRA-able module of a model and every name a LoRA file may give it."""

    component: str
    """`unet` (the denoiser), `te` (SD1.5/SD2) or `te1` / `te2` (SDXL) / `te1` / `te3` (Flux)."""
    path: str
    """Module path inside the component, our (ldm / BFL / HF) naming: `input_blocks.4.1.proj_in`."""
    kohya: str
    """Canonical kohya name written on export: `lora_unet_input_blocks_4_1_proj_in`."""
    peft: str | None
    """PEFT module path: `unet.down_blocks.1.attentions.0.proj_in` (None if no single diffusers module is this one)."""
    aliases: tuple[str, ...] = ()
    """Other kohya-style (underscore) spellings accepted on import (e.g. the diffusers-underscored SDXL name)."""
    dotted: tuple[str, ...] = ()
    """Other dotted spellings accepted on import (Flux: ComfyUI's `diffusion_model.` + BFL path)."""
    pieces: tuple = ()
    """Flux layers diffusers splits or reorders: the `flux_names.RowPiece`s of diffusers modules
    that make up this layer (empty when `peft` names it whole)."""


class LoRANameTable:
    """Exact name lookups for the LoRA-able modules of one model.

    `modules` maps a component to the module paths (our naming) that may carry a LoRA: every
    Linear / Conv2d. `unet_names` is the family's kohya UNet spelling (`FamilySpec.lora_unet_names`):
    "ldm" (SDXL) or "diffusers" (SD1.5/SD2) paths are canonical and the other is accepted as an alias;
    "bfl" (Flux) takes `flux_pieces` (`flux_names.diffusers_pieces` of the transformer's config) for
    the diffusers spellings.
    """

    def __init__(self, unet_names: str, modules: dict[str, list[str]], flux_pieces: dict | None = None):
        if unet_names not in UNET_SPELLINGS:
            raise ValueError(f"unet_names must be one of {', '.join(UNET_SPELLINGS)}, got {unet_names!r}")
        if (unet_names == "bfl") != (flux_pieces is not None):
            raise ValueError("LoRANameTable: flux_pieces goes with unet_names='bfl' and only with it")
        self.unet_names = unet_names
        self.refs: dict[tuple[str, str], ModuleRef] = {}
        self._by_kohya: dict[str, ModuleRef] = {}
        self._by_peft: dict[str, ModuleRef] = {}
        self._pieces: dict[str, tuple[ModuleRef, tuple]] = {}
        unet_paths = modules.get("unet", [])
        n_layers = layers_per_block(unet_paths) if unet_paths and unet_names != "bfl" else 0
        for component, paths in modules.items():
            for path in paths:
                if component == "unet" and unet_names == "bfl":
                    ref = self._flux_ref(path, flux_pieces.get(path, ()))
                elif component == "unet":
                    ref = self._unet_ref(path, unet_names, n_layers)
                else:
                    ref = self._text_ref(component, path, modules)
                self.refs[(component, path)] = ref
                for name in (ref.kohya, *ref.aliases):
                    self._claim(self._by_kohya, name, ref)
                for name in ((ref.peft,) if ref.peft else ()) + ref.dotted:
                    self._claim(self._by_peft, name, ref)

    @staticmethod
    def _claim(table: dict, name: str, ref: ModuleRef) -> None:
        other = table.get(name)
        if other is not None and other != ref:
            raise ValueError(f"LoRA name {name!r} is ambiguous: {other.path} and {ref.path}")
        table[name] = ref

    @staticmethod
    def _unet_ref(path: str, unet_names: str, n_layers: int) -> ModuleRef:
        prefix = KOHYA_PREFIX["unet"]
        ldm_name = prefix + kohya_spelling(path)
        diff = unet_diffusers_path(path, n_layers)
        diff_name = None if diff is None else prefix + kohya_spelling(diff)
        # SD1.5/SD2 kohya files use diffusers paths; modules diffusers lacks keep ldm ones.
        canonical = ldm_name if unet_names == "ldm" or diff_name is None else diff_name
        aliases = tuple(n for n in (ldm_name, diff_name) if n is not None and n != canonical)
        peft = None if diff is None else PEFT_PREFIX["unet"] + diff
        return ModuleRef("unet", path, canonical, peft, aliases)

    @staticmethod
    def _text_ref(component: str, path: str, modules: dict) -> ModuleRef:
        aliases = ()
        if component == "te3" and "te2" not in modules:
            # Flux's T5 as OneTrainer numbers it (after CLIP-L); ComfyUI reads both.
            aliases = (KOHYA_PREFIX["te2"] + kohya_spelling(path),)
        return ModuleRef(component, path, KOHYA_PREFIX[component] + kohya_spelling(path),
                         PEFT_PREFIX[component] + path, aliases)

    def _flux_ref(self, path: str, pieces: tuple) -> ModuleRef:
        from .flux_names import DIFFUSERS_PREFIX, DOTTED_PREFIX, UNDERSCORE_PREFIXES, is_whole

        kohya, dotted = KOHYA_PREFIX["unet"] + kohya_spelling(path), (DOTTED_PREFIX + path,)
        if pieces and is_whole(pieces):
            module = pieces[0].module
            aliases = tuple(p + kohya_spelling(module) for p in UNDERSCORE_PREFIXES)
            return ModuleRef("unet", path, kohya, DIFFUSERS_PREFIX + module, aliases, dotted)
        ref = ModuleRef("unet", path, kohya, None, (), dotted, tuple(pieces))
        for module in dict.fromkeys(p.module for p in pieces):
            mine = tuple(p for p in pieces if p.module == module)
            for name in (DIFFUSERS_PREFIX + module, *(p + kohya_spelling(module) for p in UNDERSCORE_PREFIXES)):
                self._pieces[name] = (ref, mine)
        return ref

    def ref(self, component: str, path: str) -> ModuleRef:
        return self.refs[(component, path)]

    def from_kohya(self, name: str) -> ModuleRef | None:
        """The module a kohya-style name (any accepted underscore spelling) denotes, or None."""
        return self._by_kohya.get(name)

    def from_peft(self, module_path: str) -> ModuleRef | None:
        """The module a dotted path (`unet.down_blocks...`, `text_encoder_2.text_model...`,
        `transformer.x_embedder`, `diffusion_model.img_in`) denotes whole, or None."""
        return self._by_peft.get(module_path)

    def lookup(self, name: str) -> ModuleRef | None:
        """The module a file's module name denotes whole, in any spelling, or None."""
        return self._by_kohya.get(name) or self._by_peft.get(name)

    def piece(self, name: str) -> tuple[ModuleRef, tuple] | None:
        """(our layer, its `RowPiece`s) for a Flux diffusers module that is part of one of our layers
        (`transformer.transformer_blocks.0.attn.to_q` -> double_blocks.0.img_attn.qkv rows [0, h)), or None."""
        return self._pieces.get(name)


# ------------------------------------------------------------------------------------------------
# Which modules of a model a preset / regex selects
# ------------------------------------------------------------------------------------------------
PRESET_KINDS = {
    "attn": ("unet", "flux"),
    "kohya": ("unet",),
    "locon": ("unet",),
    "attn-mlp": ("flux",),
    "attn-mlp-mod": ("flux",),
}
"""Denoiser preset -> the denoiser kinds it applies to: `unet` (SD1.5/SD2/SDXL) or `flux`
(see `flux_names` for the Flux sets)."""
UNET_PRESETS = tuple(PRESET_KINDS)
"""Every denoiser preset (the `lora.preset` choices); `denoiser_presets` gives a family's."""
TEXT_ENCODER_PRESETS = ("te",)
_ATTN_LEAF = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TEXT_BLOCKS = ("CLIPAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense")


def denoiser_kind(spec) -> str:
    """`flux` for families whose denoiser is the Flux transformer (kohya names in BFL paths), else `unet`."""
    return "flux" if spec.lora_unet_names == "bfl" else "unet"


def denoiser_presets(spec) -> tuple[str, ...]:
    """The presets that select layers of the family's denoiser."""
    kind = denoiser_kind(spec)
    return tuple(p for p, kinds in PRESET_KINDS.items() if kind in kinds)


def check_denoiser_preset(spec, preset) -> None:
    """ValueError (one line) when `preset` is a preset of another kind of denoiser than `spec`'s."""
    if not isinstance(preset, str) or preset not in PRESET_KINDS or preset in denoiser_presets(spec):
        return
    own = denoiser_presets(spec)
    if denoiser_kind(spec) == "flux":
        what = (f"the Flux transformer of {spec.name} has no UNet blocks; its presets are {', '.join(own)} "
                "(attn-mlp-mod = every Linear of the double and single blocks, kohya sd-scripts' Flux default)")
    else:
        what = f"it selects Flux transformer layers, not UNet ones; the presets of {spec.name} are {', '.join(own)}"
    raise ValueError(f"LoRA preset {preset!r} does not apply to {spec.name}: {what}; or give regexes on module paths")


def is_lora_wrapper(module) -> bool:
    """True for the LoRALinear / LoRAConv2d stand-ins (they carry `lora_adapters`)."""
    return getattr(module, "is_lora_wrapper", False) is True


def iter_layers(root: nn.Module) -> Iterable[tuple[str, nn.Module, tuple[str, ...]]]:
    """(path, layer, ancestor class names) for every Linear / Conv2d / LoRA wrapper under `root`,
    not descending into wrappers (their adapters are not targets)."""

    def walk(module: nn.Module, prefix: str, ancestors: tuple[str, ...]):
        for name, child in module._modules.items():
            if child is None:
                continue
            path = f"{prefix}{name}"
            if isinstance(child, ADAPTABLE) or is_lora_wrapper(child):
                yield path, child, ancestors
            else:
                yield from walk(child, path + ".", ancestors + (type(child).__name__,))

    yield from walk(root, "", (type(root).__name__,))


def base_of(layer: nn.Module) -> nn.Module:
    return layer.base_layer if is_lora_wrapper(layer) else layer


def is_3x3(layer: nn.Module) -> bool:
    base = base_of(layer)
    return is_conv(base) and tuple(base.kernel_size) != (1, 1)


def _in_preset(preset: str, path: str, layer: nn.Module, ancestors: tuple[str, ...], kind: str = "unet") -> bool:
    """Kohya's module sets: `kohya` = every Linear / 1x1 conv inside a SpatialTransformer;
    `locon` adds every Linear / conv inside ResBlock, Downsample and Upsample; `attn` = q/k/v/out
    of every attention; `te` = q/k/v/out_proj and fc1/fc2 of every CLIP layer, q/k/v/o and
    wi_0/wi_1/wo of every T5 block. On the Flux transformer (`kind` "flux") the presets of
    `flux_names.FLUX_PRESETS`."""
    if preset == "te":
        return isinstance(base_of(layer), (nn.Linear, QuantLinear)) and any(a in ancestors for a in _TEXT_BLOCKS)
    if kind == "flux":
        from .flux_names import FLUX_PRESETS, in_flux_preset

        return preset in FLUX_PRESETS and in_flux_preset(preset, path)
    if preset == "attn":
        return _ATTN_LEAF.search("." + path) is not None and "SpatialTransformer" in ancestors
    if preset in ("kohya", "locon") and "SpatialTransformer" in ancestors and not is_3x3(layer):
        return True
    if preset == "locon":
        return any(a in ancestors for a in ("ResBlock", "Downsample", "Upsample"))
    return False


def select_layers(root: nn.Module, spec: str | Sequence[str], presets: tuple[str, ...], what: str,
                  kind: str = "unet") -> list[tuple[str, nn.Module]]:
    """(path, layer) of the Linear / Conv2d layers under `root` that preset `spec` (one of `presets`,
    for a denoiser of `kind`) or regexes `spec` (searched in module paths) select."""
    layers = list(iter_layers(root))
    if isinstance(spec, str) and spec in presets:
        chosen = [(p, m) for p, m, anc in layers if _in_preset(spec, p, m, anc, kind)]
        label = f"preset {spec!r}"
    else:
        patterns = [spec] if isinstance(spec, str) else list(spec)
        try:
            regexes = [re.compile(p) for p in patterns]
        except re.error as e:
            raise ValueError(f"{what} LoRA target {patterns!r}: bad regex ({e}); presets are {presets}") from None
        chosen = [(p, m) for p, m, _ in layers if any(r.search(p) for r in regexes)]
        label = f"regex(es) {patterns!r}"
    if not chosen:
        example = "'img_attn\\.qkv'" if kind == "flux" else "'attn2\\.to_k'"
        raise ValueError(
            f"LoRA {label} matched no Linear/Conv2d module in the {what}; presets are {', '.join(presets)}, "
            f"or give regexes on module paths such as {example}"
        )
    return chosen


def components_of(bundle) -> dict[str, nn.Module]:
    """LoRA components of a bundle: `unet` (the denoiser) and `te` (SD1.5/SD2), `te1`/`te2` (SDXL) or
    `te1`/`te3` (Flux)."""
    names = text_encoder_components(bundle.spec)
    if len(names) != len(bundle.text_encoders):
        raise ValueError(f"family {bundle.family!r}: expected {len(names)} text encoders, got {len(bundle.text_encoders)}")
    return {"unet": bundle.unet, **dict(zip(names, bundle.text_encoders))}


_TEXT_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def drop_unread_text_layers(pairs, bundle, component: str) -> list[tuple[str, nn.Module]]:
    """`pairs` without the text-encoder layers the family's conditioning never reads (SDXL's CLIP-L
    and SD2 are read at the penultimate layer): adapters there would never receive a gradient,
    and under data parallelism their missing gradients stop the run. Raises when nothing is left."""
    index = text_encoder_components(bundle.spec).index(component)
    encoder = bundle.text_encoders[index]
    used = bundle.spec.text_layers_used(index, encoder.config.num_layers)
    kept = [(p, m) for p, m in pairs if (match := _TEXT_LAYER.search(p)) is None or int(match.group(1)) < used]
    if pairs and not kept:
        raise ValueError(f"the LoRA targets of text encoder {component} of {bundle.family} are all in layers "
                         f">= {used}, which {bundle.family} never reads; target layers 0..{used - 1}")
    return kept


def name_table(bundle) -> LoRANameTable:
    """Exact name table (kohya / diffusers / PEFT spellings) for every Linear/Conv2d of the bundle."""
    parts = components_of(bundle)
    pieces = None
    if bundle.spec.lora_unet_names == "bfl":
        from .flux_names import diffusers_pieces

        pieces = diffusers_pieces(bundle.unet.config)
    return LoRANameTable(bundle.spec.lora_unet_names, {c: [p for p, _, _ in iter_layers(m)] for c, m in parts.items()},
                         pieces)


def filter_layers(pairs, component: str, include: Sequence[str], exclude: Sequence[str]):
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    for path, layer in pairs:
        q = f"{component}.{path}"
        if inc and not any(r.search(q) for r in inc):
            continue
        if any(r.search(q) for r in exc):
            continue
        yield path, layer


