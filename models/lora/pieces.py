"""LoRAs on the diffusers pieces of a fused Flux layer <-> one LoRA on that layer, exactly.

Diffusers splits some of our Flux layers into row pieces (`flux_names.RowPiece`: `qkv` = to_q | to_k |
to_v, a single block's `linear1` = to_q | to_k | to_v | proj_mlp, the final adaLN = diffusers'
`norm_out.linear` with its halves swapped). A file LoRA on diffusers module i (down_i (r_i, in),
up_i (rows_i, r_i), scale s_i = alpha_i / r_i, alpha absent = scale 1) adds s_i * up_i[theirs] @ down_i
to rows `ours` of our weight W (N, in), for each of its pieces. The sum over the file's modules is one
LoRA of rank R = sum r_i:

    down = [down_1; down_2; ...]                   (R, in)
    up[ours, cols_i] = s_i * up_i[theirs]          (N, R), zero elsewhere (block-diagonal)

with alpha = R (scale 1); when every s_i is the same s, the ups stay unscaled and alpha = s * R.
up @ down is then the sum of the piece updates: rows no file module covers stay zero, nothing is
approximated. Only plain LoRA pieces combine like this: LoHa / LoKr pieces, Tucker cores and DoRA
magnitudes (normalised over the whole fused weight) have no exact single-adapter form and are
refused by name (`ModuleMismatch`).

Export to diffusers names (`peft_pieces`) is the reverse: every piece gets the whole down as its
lora_A and its rows of up as lora_B, which is exact too (rank R per piece).
"""
from __future__ import annotations

import torch

from .entries import LoRAModuleWeights, ModuleMismatch
from .flux_names import DIFFUSERS_PREFIX, RowPiece

__all__ = ["fuse_pieces", "peft_pieces"]


def fuse_pieces(weight_shape: tuple[int, ...], layer: str,
                parts: list[tuple[str, tuple[RowPiece, ...], LoRAModuleWeights]]) -> LoRAModuleWeights:
    """One plain LoRA (`lora_down.weight`, `lora_up.weight`, `alpha`) on our layer `layer` with weight
    `weight_shape` (out, in) from the file's LoRAs on its diffusers pieces: `parts` holds (file module
    name, its pieces, its tensors). Raises ModuleMismatch naming the file module that cannot be
    combined exactly or does not fit."""
    out, inn = weight_shape[0], weight_shape[1]
    for name, pieces, w in parts:
        if w.algo != "lora" or w.tucker or "dora_scale" in w:
            raise ModuleMismatch(f"{w.label()} on the diffusers piece {pieces[0].module} of our fused {layer}: only "
                                 "plain LoRA pieces combine exactly into one adapter; use a file with kohya names "
                                 "on the fused layer or plain LoRA pieces")
        down, up = w["lora_down.weight"], w["lora_up.weight"]
        rows = pieces[0].rows
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != inn or up.shape != (rows, down.shape[0]):
            raise ModuleMismatch(f"{name}: shapes down {list(down.shape)} up {list(up.shape)}, the piece of {layer} "
                                 f"needs down [r, {inn}] and up [{rows}, r]")
    scales = [w.scale for _, _, w in parts]
    same = all(s == scales[0] for s in scales)
    rank = sum(w["lora_down.weight"].shape[0] for _, _, w in parts)
    downs, up = [], torch.zeros(out, rank, dtype=torch.float32)
    col = 0
    for (_, pieces, w), s in zip(parts, scales):
        d, u = w["lora_down.weight"].float(), w["lora_up.weight"].float()
        u = u if same else u * s
        for p in pieces:
            up[p.ours[0]:p.ours[1], col:col + d.shape[0]] = u[p.theirs[0]:p.theirs[1]]
        downs.append(d)
        col += d.shape[0]
    return LoRAModuleWeights({"lora_down.weight": torch.cat(downs), "lora_up.weight": up,
                              "alpha": float(scales[0] * rank if same else rank)})


def peft_pieces(pieces: tuple[RowPiece, ...], down: torch.Tensor,
                up: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Diffusers module name (`transformer.` + path) -> {"lora_A.weight", "lora_B.weight"} of our
    layer's LoRA `up @ down` (scale already in `up`) split into its diffusers `pieces`."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module in dict.fromkeys(p.module for p in pieces):
        mine = [p for p in pieces if p.module == module]
        b = up.new_zeros(mine[0].rows, up.shape[1])
        for p in mine:
            b[p.theirs[0]:p.theirs[1]] = up[p.ours[0]:p.ours[1]]
        out[DIFFUSERS_PREFIX + module] = {"lora_A.weight": down.clone(), "lora_B.weight": b}  # own storage per key
    return out
