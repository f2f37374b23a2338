"""UNet blocks of LoRA modules, per-block learning-rate multipliers and ranks, and the optimizer
parameter groups they give (with LoRA+).

Block numbering follows the UNet's own (ldm) module paths, for every family:

    IN00 .. IN{n-1}    input_blocks.0 .. input_blocks.{n-1}  (IN00 is the input conv)
    MID                middle_block
    OUT00 .. OUT{n-1}  output_blocks.0 .. output_blocks.{n-1}

n = 12 for SD1.5/SD2 (25 blocks: exactly kohya's 25-value `block_dims` / block-weight order) and
9 for SDXL (19 blocks; kohya's 23-value SDXL form adds an unused first and last entry and splits MID
into middle_block.0/1/2). Modules outside these (time embedding, output head) belong to no block:
they keep the plain rank and learning rate. This module imports no torch.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)(\.|$)|^middle_block(\.|$)")
_UP_PARAM = "lora_up.weight"  # LoRA's B matrix: the one LoRA+ speeds up


def unet_block(path: str) -> str | None:
    """Block name (IN04, MID, OUT11) of a UNet module path, or None outside the blocks."""
    m = _BLOCK.match(path)
    if m is None:
        return None
    if m.group(1) is None:
        return "MID"
    return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"


def block_names(num_blocks: int) -> list[str]:
    """The 2n + 1 block names in order: IN00.., MID, OUT00.. for a UNet with n input blocks."""
    return [f"IN{i:02d}" for i in range(num_blocks)] + ["MID"] + [f"OUT{i:02d}" for i in range(num_blocks)]


def _per_block(key: str, values: Sequence, num_blocks: int) -> dict[str, object]:
    names = block_names(num_blocks)
    if len(values) != len(names):
        raise ValueError(f"{key}: needs {len(names)} values for this UNet ({names[0]}..{names[num_blocks - 1]}, MID, "
                         f"OUT00..{names[-1]}), got {len(values)}")
    return dict(zip(names, values))


def block_lr_weights(num_blocks: int, *, down=None, mid=None, up=None, per_block=None) -> dict[str, float] | None:
    """Multiplier of every block from the optim keys (`down_lr_weight`, `mid_lr_weight`,
    `up_lr_weight`: a number or one value per block; `block_lr_weight`: all 2n + 1), or None when
    none is set. Unset parts are 1. Raises ValueError naming the key when a list has the wrong length."""
    if per_block is not None:
        return {k: float(v) for k, v in _per_block("optim.block_lr_weight", per_block, num_blocks).items()}
    if down is None and mid is None and up is None:
        return None
    out = {}
    for key, prefix, value in (("optim.down_lr_weight", "IN", down), ("optim.up_lr_weight", "OUT", up)):
        if isinstance(value, (list, tuple)):
            if len(value) != num_blocks:
                raise ValueError(f"{key}: needs {num_blocks} values for this UNet ({prefix}00..{prefix}{num_blocks - 1:02d}),"
                                 f" got {len(value)}")
            out.update({f"{prefix}{i:02d}": float(v) for i, v in enumerate(value)})
        else:
            out.update({f"{prefix}{i:02d}": 1.0 if value is None else float(value) for i in range(num_blocks)})
    out["MID"] = 1.0 if mid is None else float(mid)
    return out


def block_ranks(num_blocks: int, key: str, ranks: Sequence[int] | None, alphas: Sequence[float] | None,
                alpha_key: str) -> dict[str, tuple[int, float | None]] | None:
    """(rank, alpha or None = the default alpha) per block from `lora.block_ranks`-style lists
    (2n + 1 values, 0 = no adapter in that block), or None when `ranks` is None."""
    if ranks is None:
        if alphas is not None:
            raise ValueError(f"{alpha_key}: needs {key} too")
        return None
    per_rank = _per_block(key, ranks, num_blocks)
    per_alpha = _per_block(alpha_key, alphas, num_blocks) if alphas is not None else {}
    return {b: (int(r), per_alpha.get(b)) for b, r in per_rank.items()}


def group_parameters(adapters: Iterable[tuple[str, object, object]], unet_lr: float, te_lr: float | None = None, *,
                     lora_plus_ratio: float | None = None,
                     unet_block_lr: dict[str, float] | None = None) -> list[dict]:
    """Optimizer groups of adapters given as (kohya name, ModuleRef, adapter module).

    UNet adapters learn at `unet_lr` x their block's multiplier (`unet_block_lr`, see
    `block_lr_weights`), text-encoder adapters at `te_lr` (default unet_lr); with `lora_plus_ratio`
    the up (B) matrices learn ratio x faster. Parameters of blocks with multiplier 0 are frozen
    (requires_grad=False) and left out. Groups are named `unet_lora` / `text_encoder_lora`, plus
    `_x<multiplier>` for other multipliers and `_up` for LoRA+ up matrices; empty groups are left out.
    """
    groups: dict[tuple[str, float, bool], dict] = {}
    for _, ref, adapter in adapters:
        unet = ref.component == "unet"
        multiplier = 1.0
        if unet and unet_block_lr is not None:
            block = unet_block(ref.path)
            multiplier = unet_block_lr.get(block, 1.0) if block is not None else 1.0
        for pname, p in adapter.named_parameters():
            if multiplier == 0:
                p.requires_grad_(False)
                continue
            up = lora_plus_ratio is not None and pname.endswith(_UP_PARAM)
            key = ("unet_lora" if unet else "text_encoder_lora", multiplier, up)
            if key not in groups:
                base = unet_lr if unet or te_lr is None else te_lr
                name = key[0] + (f"_x{multiplier:g}" if multiplier != 1 else "") + ("_up" if up else "")
                groups[key] = {"params": [], "lr": base * multiplier * (lora_plus_ratio if up else 1.0), "name": name}
            groups[key]["params"].append(p)
    if lora_plus_ratio is not None and not any(up for _, _, up in groups):
        raise ValueError("optim.lora_plus_ratio: this network has no LoRA up matrices (lora_up) to speed up; "
                         "set optim.lora_plus_ratio: null")
    order = sorted(groups, key=lambda k: (k[0] != "unet_lora", k[1] != 1.0, k[1], k[2]))
    return [groups[k] for k in order]


def unet_block_tables(unet, options) -> tuple[dict | None, dict | None]:
    """Per-block (rank, alpha) tables of `options` (`lora.block_ranks`/`block_alphas` for Linear and
    1x1-conv adapters, `conv_block_ranks`/`conv_block_alphas` for 3x3 convs) for `unet`; None = unset."""
    n = len(getattr(unet, "input_blocks", ()))
    linear = block_ranks(n, "block_ranks", options.block_ranks, options.block_alphas, "block_alphas")
    conv = block_ranks(n, "conv_block_ranks", options.conv_block_ranks, options.conv_block_alphas, "conv_block_alphas")
    return linear, conv


def shape_in_block(table: dict | None, path: str, default: tuple[int, float],
                   alpha_option: float | None) -> tuple[int, float]:
    """(rank, alpha) of the UNet adapter at `path`: its block's entry of `table`, else `default`.
    A block rank without a block alpha takes `alpha_option` (the lora alpha), or the block rank
    (scale 1) when that is null. Rank 0 means: no adapter."""
    block = unet_block(path) if table is not None else None
    if block is None or block not in table:
        return default
    rank, alpha = table[block]
    if alpha is None:
        alpha = alpha_option if alpha_option is not None else rank
    return int(rank), float(alpha)
