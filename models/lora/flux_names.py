"""LoRA names and target presets of the Flux.1 transformer.

Our `FluxTransformer` carries Black Forest Labs' module paths (`double_blocks.0.img_attn.qkv`),
which is what kohya sd-scripts trains and ComfyUI keys on:

- kohya (our export): `lora_unet_` + BFL path with '.' -> '_'
  (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_3_linear1`);
- ComfyUI's generic spelling: `diffusion_model.` + BFL path (read on import);
- diffusers / PEFT / ai-toolkit: `transformer.` + diffusers path (`transformer.transformer_blocks.0.attn.to_q`),
  and the same diffusers path with '_' after `lora_transformer_` (OneTrainer) or `lycoris_`
  (SimpleTuner LyCORIS); ComfyUI reads all three (read on import; `transformer.` also on PEFT export).

Diffusers splits some of our layers (`models.checkpoints.flux_keys`): a double block's `qkv` is
`to_q | to_k | to_v` (text stream: `add_q_proj | add_k_proj | add_v_proj`), a single block's `linear1`
is `to_q | to_k | to_v | proj_mlp`, and the final `adaLN_modulation.1` is diffusers' `norm_out.linear`
with its two halves swapped. `RowPiece`s say which rows of which diffusers module make up such a
layer; `models.lora.pieces` fuses LoRAs on the pieces into one adapter on our layer, exactly.

Presets (`FLUX_PRESETS`; regexes on BFL paths, matched in full):

    attn          double blocks: img_attn.qkv, img_attn.proj, txt_attn.qkv, txt_attn.proj;
                  single blocks: linear1 and linear2. A single block's attention projections are
                  fused with its MLP (linear1 = q|k|v|mlp-in, linear2 reads attention-out|mlp-out),
                  so there `attn` adapts the MLP too: no attention-only layer exists.
    attn-mlp      attn + double blocks' img_mlp.0, img_mlp.2, txt_mlp.0, txt_mlp.2: every Linear of
                  the blocks except the modulation layers.
    attn-mlp-mod  attn-mlp + img_mod.lin, txt_mod.lin and single blocks' modulation.lin: every Linear
                  of the double and single blocks, kohya sd-scripts' Flux default (`train_blocks=all`).

Layers outside the blocks (img_in, txt_in, time_in, vector_in, guidance_in, final_layer) are left to
regex `targets`. This module imports no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DIFFUSERS_PREFIX", "DOTTED_PREFIX", "FLUX_PRESETS", "UNDERSCORE_PREFIXES", "RowPiece", "diffusers_pieces",
           "in_flux_preset", "is_whole"]

DIFFUSERS_PREFIX = "transformer."
"""Prefix of the transformer's diffusers module paths in diffusers / PEFT / ai-toolkit LoRA files."""
UNDERSCORE_PREFIXES = ("lora_transformer_", "lycoris_")
"""Prefixes of diffusers paths spelt with '_' (OneTrainer, SimpleTuner LyCORIS)."""
DOTTED_PREFIX = "diffusion_model."
"""Prefix of BFL paths in ComfyUI's generic LoRA spelling."""

_ATTN = r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12]"
_MLP = r"double_blocks\.\d+\.(img|txt)_mlp\.[02]"
_MOD = r"double_blocks\.\d+\.(img|txt)_mod\.lin|single_blocks\.\d+\.modulation\.lin"
FLUX_PRESETS = {
    "attn": re.compile(_ATTN),
    "attn-mlp": re.compile(f"{_ATTN}|{_MLP}"),
    "attn-mlp-mod": re.compile(f"{_ATTN}|{_MLP}|{_MOD}"),
}
"""Flux transformer presets: name -> regex matched in full against BFL module paths."""


def in_flux_preset(preset: str, path: str) -> bool:
    """Whether the transformer module at BFL `path` belongs to `preset` (see the module docstring)."""
    return FLUX_PRESETS[preset].fullmatch(path) is not None


@dataclass(frozen=True)
class RowPiece:
    """Rows of one diffusers module inside one of our (BFL) layers."""

    module: str
    """Diffusers module path, without prefix: `transformer_blocks.0.attn.to_k`."""
    ours: tuple[int, int]
    """Rows [start, stop) of our layer's weight."""
    theirs: tuple[int, int]
    """The same rows in the diffusers module's weight."""
    rows: int
    """Rows (out features) of the whole diffusers weight."""


def diffusers_pieces(cfg) -> dict[str, tuple[RowPiece, ...]]:
    """BFL path of every Linear of `FluxTransformer(cfg)` -> the diffusers rows its weight is made
    of, in our row order (one piece covering all rows of one diffusers module when it maps 1:1)."""
    from ..checkpoints.flux_keys import flux_diffusers_layout  # torch: imported when a Flux model exists

    layout = flux_diffusers_layout(cfg)
    rows: dict[str, int] = {}
    for pieces in layout.values():
        for key, _, stop in pieces:
            rows[key] = max(rows.get(key, 0), stop)
    out: dict[str, tuple[RowPiece, ...]] = {}
    for name, pieces in layout.items():
        if not name.endswith(".weight"):
            continue
        at, found = 0, []
        for key, start, stop in pieces:
            found.append(RowPiece(key[: -len(".weight")], (at, at + stop - start), (start, stop), rows[key]))
            at += stop - start
        out[name[: -len(".weight")]] = tuple(found)
    return out


def is_whole(pieces: tuple[RowPiece, ...]) -> bool:
    """True when `pieces` is one diffusers module equal to our layer, row for row."""
    return len(pieces) == 1 and pieces[0].ours == pieces[0].theirs == (0, pieces[0].rows)


def underscored(module: str) -> str:
    return module.replace(".", "_")
