"""The one ldm -> diffusers name map of SD1.5 / SD2 / SDXL UNets.

Our UNet carries the original single-file (ldm/sgm) names; diffusers' UNet2DConditionModel renames
the blocks. Both build their blocks level by level in the same order, so the map depends only on
R = `layers_per_block` (ResBlocks per encoder level) and holds for every SD-shaped UNet, full size
or tiny. It serves the checkpoint converter (`diffusers_keys.unet_to_diffusers_key`, parameter
names) and the LoRA name table (`models.lora.names`, module paths) alike.

    input_blocks.0.0                 conv_in
    input_blocks.i.0 / .i.1          down_blocks.l.resnets.r / .attentions.r   (i = 1 + l*(R+1) + r)
    input_blocks.i.0.op              down_blocks.l.downsamplers.0.conv         (r = R, l < L-1)
    middle_block.0 / .1 / .2         mid_block.resnets.0 / .attentions.0 / .resnets.1
    output_blocks.i.0 / .i.1         up_blocks.u.resnets.r / .attentions.r     (i = u*(R+1) + r, u = L-1-l)
    output_blocks.i.{1|2}.conv       up_blocks.u.upsamplers.0.conv             (r = R, l > 0)
    time_embed.{0,2} / label_emb.0.{0,2} / out.{0,2}
                                     time_embedding.linear_{1,2} / add_embedding.linear_{1,2} /
                                     conv_norm_out, conv_out
    inside ResBlocks: in_layers.0 norm1, in_layers.2 conv1, out_layers.0 norm2, out_layers.3 conv2,
    emb_layers.1 time_emb_proj, skip_connection conv_shortcut; SpatialTransformer insides are
    named identically in both.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["layers_per_block", "unet_diffusers_path"]

_RESBLOCK_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL_TO_DIFFUSERS = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def layers_per_block(unet_module_paths: Iterable[str]) -> int:
    """ResBlocks per encoder level, read from the module paths of an ldm-layout UNet.

    The first Downsample sits at `input_blocks.{L+1}.0.op`; a UNet without one has all its encoder
    blocks in one level (`input_blocks.1 .. L`).
    """
    paths = list(unet_module_paths)
    indices = {int(m.group(1)) for p in paths if (m := re.match(r"input_blocks\.(\d+)\.0\.op$", p))}
    if indices:
        return min(indices) - 1
    blocks = {int(m.group(1)) for p in paths if (m := re.match(r"input_blocks\.(\d+)\.", p))}
    if not blocks:
        raise ValueError("not an ldm-layout UNet: no `input_blocks.N` modules found")
    return max(blocks)


def _resblock_inner(rest: list[str]) -> list[str] | None:
    """ResBlock child path (ldm) -> diffusers resnet child path."""
    for ldm, diff in _RESBLOCK_TO_DIFFUSERS.items():
        n = ldm.count(".") + 1
        if rest[:n] == ldm.split("."):
            return diff.split(".") + rest[n:]
    return None


def unet_diffusers_path(path: str, n_layers: int) -> str | None:
    """diffusers UNet2DConditionModel path for an ldm UNet module or parameter path (None if it has none).

    `n_layers` is `layers_per_block` (a UNetConfig's `num_res_blocks`). Examples with n_layers=2:
    `input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in`,
    `input_blocks.3.0.op.weight` -> `down_blocks.0.downsamplers.0.conv.weight`,
    `output_blocks.2.1.conv` -> `up_blocks.0.upsamplers.0.conv`,
    `middle_block.2.emb_layers.1.bias` -> `mid_block.resnets.1.time_emb_proj.bias`.
    """
    for ldm, diff in _TOP_LEVEL_TO_DIFFUSERS.items():
        if path == ldm or path.startswith(ldm + "."):
            return diff + path[len(ldm):]
    parts = path.split(".")
    if parts[0] == "middle_block" and len(parts) >= 3 and parts[1] in ("0", "1", "2"):
        # middle_block = (ResBlock, SpatialTransformer, ResBlock), with no inner child index.
        index, inner = int(parts[1]), parts[2:]
        if index == 1:
            return ".".join(["mid_block.attentions.0", *inner])
        mapped = _resblock_inner(inner)
        return None if mapped is None else ".".join([f"mid_block.resnets.{index // 2}", *mapped])
    if len(parts) < 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    group, index, child, inner = parts[0], int(parts[1]), parts[2], parts[3:]
    if group == "input_blocks" and index > 0:
        level, j = divmod(index - 1, n_layers + 1)
        if j == n_layers:  # the level's Downsample: input_blocks.i.0.op
            return ".".join([f"down_blocks.{level}.downsamplers.0.conv", *inner[1:]]) if inner[:1] == ["op"] else None
        head, resnet, attention = f"down_blocks.{level}", f"resnets.{j}", f"attentions.{j}"
    elif group == "output_blocks":
        level, j = divmod(index, n_layers + 1)
        head, resnet, attention = f"up_blocks.{level}", f"resnets.{j}", f"attentions.{j}"
        # The Upsample is the block's last child (.1 without attention, .2 with); it is the only
        # child with a `conv` member, which tells it apart from a SpatialTransformer at .1.
        if child in ("1", "2") and inner[:1] == ["conv"]:
            return ".".join([f"{head}.upsamplers.0.conv", *inner[1:]])
    else:
        return None
    if child == "0":
        mapped = _resblock_inner(inner)
        return None if mapped is None else ".".join([head, resnet, *mapped])
    if child == "1":  # SpatialTransformer: children keep their names
        return ".".join([head, attention, *inner])
    return None
