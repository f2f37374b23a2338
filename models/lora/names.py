"""LoRA module names: our module paths <-> kohya / diffusers / PEFT spellings.

Our modules carry the original single-file names (ldm/sgm UNet paths, HF CLIP paths). LoRA files
name a module in one of these spellings:

- kohya (what ComfyUI, A1111/Forge read; our default export): `lora_unet_` / `lora_te_` /
  `lora_te1_` / `lora_te2_` + module path with '.' -> '_'. For SDXL the UNet path is the ldm path
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); for SD1.5/SD2 it is the DIFFUSERS
  path (`lora_unet_down_blocks_0_attentions_0_proj_in`), because kohya trains those on diffusers'
  UNet. Text encoders use the HF path (`lora_te1_text_model_encoder_layers_0_mlp_fc1`).
- diffusers-underscored SDXL (other trainers): `lora_unet_` + diffusers path with '_'. ComfyUI
  accepts both UNet spellings for every family, and so do we on import.
- PEFT / diffusers `save_lora_weights`: `unet.` + diffusers path, `text_encoder.` /
  `text_encoder_2.` + HF path, each followed by `.lora_A.weight` / `.lora_B.weight`.

The ldm -> diffusers UNet path map is the checkpoint converter's (`models.checkpoints.unet_names`),
computed from the block layout, so it holds for every SD1.5/SD2/SDXL-shaped UNet, full size or
tiny. Names are matched exactly through tables built from the model's own modules, never by
guessing where an underscore stood for a dot.
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
# encoder slot they fill: SD1.5/SD2 have one (`te`), SDXL two (`te1` CLIP-L, `te2` bigG).
KOHYA_PREFIX = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
PEFT_PREFIX = {"unet": "unet.", "te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2."}

def text_encoder_components(spec) -> tuple[str, ...]:
    """Component names of a family's text encoders, in bundle order (`FamilySpec.lora_text_components`:
    SDXL ("te1", "te2"), SD1.5/SD2 ("te",))."""
    return spec.lora_text_components


def kohya_spelling(path: str) -> str:
    """Module path -> the underscore form used after a kohya prefix."""
    return path.replace(".", "_")


@dataclass(frozen=True)
class ModuleRef:
    """One LoRA-able module of a model and every name a LoRA file may give it."""

    component: str
    """`unet`, `te` (SD1.5/SD2) or `te1` / `te2` (SDXL)."""
    path: str
    """Module path inside the component, our (ldm / HF) naming: `input_blocks.4.1.proj_in`."""
    kohya: str
    """Canonical kohya name written on export: `lora_unet_input_blocks_4_1_proj_in`."""
    peft: str | None
    """PEFT module path: `unet.down_blocks.1.attentions.0.proj_in` (None if diffusers has no such module)."""
    aliases: tuple[str, ...] = ()
    """Other kohya spellings accepted on import (e.g. the diffusers-underscored SDXL name)."""


class LoRANameTable:
    """Exact name lookups for the LoRA-able modules of one model.

    `modules` maps a component to the module paths (our naming) that may carry a LoRA: every
    Linear / Conv2d. `unet_names` is the family's kohya UNet spelling (`FamilySpec.lora_unet_names`):
    "ldm" (SDXL) or "diffusers" (SD1.5/SD2) paths are canonical; the other is accepted as an alias.
    """

    def __init__(self, unet_names: str, modules: dict[str, list[str]]):
        if unet_names not in ("ldm", "diffusers"):
            raise ValueError(f"unet_names must be 'ldm' or 'diffusers', got {unet_names!r}")
        self.unet_names = unet_names
        self.refs: dict[tuple[str, str], ModuleRef] = {}
        self._by_kohya: dict[str, ModuleRef] = {}
        self._by_peft: dict[str, ModuleRef] = {}
        unet_paths = modules.get("unet", [])
        n_layers = layers_per_block(unet_paths) if unet_paths else 0
        for component, paths in modules.items():
            prefix = KOHYA_PREFIX[component]
            for path in paths:
                ldm_name = prefix + kohya_spelling(path)
                if component == "unet":
                    diff = unet_diffusers_path(path, n_layers)
                    diff_name = None if diff is None else prefix + kohya_spelling(diff)
                    # SD1.5/SD2 kohya files use diffusers paths; modules diffusers lacks keep ldm ones.
                    canonical = ldm_name if unet_names == "ldm" or diff_name is None else diff_name
                    aliases = tuple(n for n in (ldm_name, diff_name) if n is not None and n != canonical)
                    peft = None if diff is None else PEFT_PREFIX[component] + diff
                else:
                    canonical, aliases, peft = ldm_name, (), PEFT_PREFIX[component] + path
                ref = ModuleRef(component, path, canonical, peft, aliases)
                self.refs[(component, path)] = ref
                for name in (canonical, *aliases):
                    other = self._by_kohya.get(name)
                    if other is not None and other != ref:
                        raise ValueError(f"LoRA name {name!r} is ambiguous: {other.path} and {path}")
                    self._by_kohya[name] = ref
                if peft is not None:
                    self._by_peft[peft] = ref

    def ref(self, component: str, path: str) -> ModuleRef:
        return self.refs[(component, path)]

    def from_kohya(self, name: str) -> ModuleRef | None:
        """The module a kohya-style name (either UNet spelling) denotes, or None."""
        return self._by_kohya.get(name)

    def from_peft(self, module_path: str) -> ModuleRef | None:
        """The module a PEFT path (`unet.down_blocks...`, `text_encoder_2.text_model...`) denotes."""
        return self._by_peft.get(module_path)


# ------------------------------------------------------------------------------------------------
# Which modules of a model a preset / regex selects
# ------------------------------------------------------------------------------------------------
UNET_PRESETS = ("attn", "kohya", "locon")
TEXT_ENCODER_PRESETS = ("te",)
_ATTN_LEAF = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


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


def _in_preset(preset: str, path: str, layer: nn.Module, ancestors: tuple[str, ...]) -> bool:
    """Kohya's module sets: `kohya` = every Linear / 1x1 conv inside a SpatialTransformer;
    `locon` adds every Linear / conv inside ResBlock, Downsample and Upsample; `attn` = q/k/v/out
    of every attention; `te` = q/k/v/out_proj and fc1/fc2 of every text-encoder layer."""
    if preset == "attn":
        return _ATTN_LEAF.search("." + path) is not None and "SpatialTransformer" in ancestors
    if preset in ("kohya", "locon") and "SpatialTransformer" in ancestors and not is_3x3(layer):
        return True
    if preset == "locon":
        return any(a in ancestors for a in ("ResBlock", "Downsample", "Upsample"))
    if preset == "te":
        return isinstance(base_of(layer), (nn.Linear, QuantLinear)) and ("CLIPAttention" in ancestors or "CLIPMLP" in ancestors)
    return False


def select_layers(root: nn.Module, spec: str | Sequence[str], presets: tuple[str, ...], what: str) -> list[tuple[str, nn.Module]]:
    layers = list(iter_layers(root))
    if isinstance(spec, str) and spec in presets:
        chosen = [(p, m) for p, m, anc in layers if _in_preset(spec, p, m, anc)]
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
        raise ValueError(
            f"LoRA {label} matched no Linear/Conv2d module in the {what}; presets are {', '.join(presets)}, "
            "or give regexes on module paths such as 'attn2\\.to_k'"
        )
    return chosen


def components_of(bundle) -> dict[str, nn.Module]:
    """LoRA components of a bundle: `unet` and `te` (SD1.5/SD2) or `te1`/`te2` (SDXL)."""
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
    return LoRANameTable(bundle.spec.lora_unet_names, {c: [p for p, _, _ in iter_layers(m)] for c, m in parts.items()})


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


