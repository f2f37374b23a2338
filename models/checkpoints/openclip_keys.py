"""OpenCLIP text-tower state dicts <-> the HF names used by `models.clip.CLIPTextEncoder`.

OpenCLIP (SDXL `conditioner.embedders.1.model.`, SD2 `cond_stage_model.model.`) stores attention as
one fused `in_proj_weight` (3D, D) in q, k, v order and the projection as `x @ P` with P (D, proj);
HF stores separate q/k/v Linears and `text_projection.weight` = P.T (proj, D).

| OpenCLIP (after prefix)                           | HF                                                        |
|---------------------------------------------------|-----------------------------------------------------------|
| token_embedding.weight                            | text_model.embeddings.token_embedding.weight              |
| positional_embedding                              | text_model.embeddings.position_embedding.weight           |
| transformer.resblocks.N.ln_1.{weight,bias}        | text_model.encoder.layers.N.layer_norm1.*                 |
| transformer.resblocks.N.attn.in_proj_{weight,bias}| ...layers.N.self_attn.{q,k,v}_proj.* (split in 3 on dim 0) |
| transformer.resblocks.N.attn.out_proj.*           | ...layers.N.self_attn.out_proj.*                          |
| transformer.resblocks.N.ln_2.*                    | ...layers.N.layer_norm2.*                                 |
| transformer.resblocks.N.mlp.c_fc.*                | ...layers.N.mlp.fc1.*                                     |
| transformer.resblocks.N.mlp.c_proj.*              | ...layers.N.mlp.fc2.*                                     |
| ln_final.*                                        | text_model.final_layer_norm.*                             |
| text_projection                                   | text_projection.weight (transposed)                       |

`openclip_to_hf` returns views of the input tensors (chunks / transposes), never copies, so it can
run over memory-mapped or lazily loaded checkpoints; `load_state_dict` copies them into the model.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

OPENCLIP_IGNORED_KEYS: frozenset[str] = frozenset({"logit_scale", "logit_bias", "attn_mask"})
"""OpenCLIP entries (after the prefix) that carry nothing the text encoder needs: the contrastive
temperature/bias and the causal mask buffer some exports include."""

OPENCLIP_IGNORED_PREFIXES: tuple[str, ...] = ("visual.",)
"""Sub-trees of a full OpenCLIP model that belong to the image tower."""

HF_IGNORED_KEYS: frozenset[str] = frozenset({"text_model.embeddings.position_ids", "logit_scale"})
"""HF entries to drop when loading: `position_ids` is a constant arange buffer that older exports
(and SD1.5/SDXL single files) contain; our encoder slices positions from the embedding instead."""

_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")

_GLOBAL_TO_HF = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_BLOCK_TO_HF = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_GLOBAL_TO_OPENCLIP = {v: k for k, v in _GLOBAL_TO_HF.items()}
_BLOCK_TO_OPENCLIP = {v: k for k, v in _BLOCK_TO_HF.items()}
_QKV = ("q_proj", "k_proj", "v_proj")


def openclip_name_to_hf(name: str) -> tuple[str, ...] | None:
    """HF name(s) for one OpenCLIP text-tower name (without prefix).

    Returns 1 name, 3 names (q, k, v) for a fused `in_proj_*`, or None for an ignorable entry.
    Raises KeyError for a name that is not part of an OpenCLIP text tower.
    """
    if name in OPENCLIP_IGNORED_KEYS or name.startswith(OPENCLIP_IGNORED_PREFIXES):
        return None
    if name in _GLOBAL_TO_HF:
        return (_GLOBAL_TO_HF[name],)
    if name == "text_projection":
        return ("text_projection.weight",)
    m = _RESBLOCK.fullmatch(name)
    if m:
        layer, rest = m.groups()
        base = f"text_model.encoder.layers.{layer}."
        if rest in _BLOCK_TO_HF:
            return (base + _BLOCK_TO_HF[rest],)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            return tuple(f"{base}self_attn.{p}.{kind}" for p in _QKV)
    raise KeyError(name)


def openclip_to_hf(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert the OpenCLIP text tower found under `prefix` in `sd` to HF names.

    sd: any mapping of name -> tensor (a loaded checkpoint, possibly memory-mapped); only keys
        starting with `prefix` are read (others belong to other model parts and are skipped).
    prefix: e.g. "conditioner.embedders.1.model." (SDXL) or "cond_stage_model.model." (SD2).
    Returns {hf_name: tensor}; tensors are views of the inputs (`in_proj` split with `chunk`,
    `text_projection` transposed, so possibly non-contiguous). Ignorable extras (logit_scale,
    attn_mask, visual tower) are dropped. Raises KeyError naming any unknown key and ValueError
    when nothing is found under the prefix.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    found = False
    for key in sd:
        if not key.startswith(prefix):
            continue
        found = True
        name = key[len(prefix):]
        try:
            targets = openclip_name_to_hf(name)
        except KeyError:
            unknown.append(key)
            continue
        if targets is None:
            continue
        tensor = sd[key]
        if len(targets) == 3:
            if tensor.shape[0] % 3:
                raise ValueError(f"{key}: fused q/k/v tensor has first dim {tensor.shape[0]}, not a multiple of 3")
            out.update(zip(targets, tensor.chunk(3, dim=0)))
        elif name == "text_projection":
            if tensor.ndim != 2:
                raise ValueError(f"{key}: expected a 2-D (width, proj) projection, got shape {tuple(tensor.shape)}")
            out[targets[0]] = tensor.t()
        else:
            out[targets[0]] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise KeyError(
            f"{len(unknown)} key(s) under {prefix!r} are not part of an OpenCLIP text tower: {shown}. "
            "Check the prefix, or whether this checkpoint uses a different text encoder layout."
        )
    if not found:
        raise ValueError(f"no OpenCLIP text-tower keys found under prefix {prefix!r}")
    return out


def hf_name_to_openclip(name: str) -> tuple[str, int | None] | None:
    """OpenCLIP name for one HF name: (name, part) where part is 0/1/2 for q/k/v slices of the fused
    `in_proj_*` and None otherwise; None for ignorable HF entries. KeyError for unknown names."""
    if name in HF_IGNORED_KEYS:
        return None
    if name in _GLOBAL_TO_OPENCLIP:
        return _GLOBAL_TO_OPENCLIP[name], None
    if name == "text_projection.weight":
        return "text_projection", None
    m = _LAYER.fullmatch(name)
    if m:
        layer, rest = m.groups()
        base = f"transformer.resblocks.{layer}."
        if rest in _BLOCK_TO_OPENCLIP:
            return base + _BLOCK_TO_OPENCLIP[rest], None
        parts = rest.split(".")
        if len(parts) == 3 and parts[0] == "self_attn" and parts[1] in _QKV and parts[2] in ("weight", "bias"):
            return f"{base}attn.in_proj_{parts[2]}", _QKV.index(parts[1])
    raise KeyError(name)


def hf_to_openclip(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Exact inverse of `openclip_to_hf`: HF-named text encoder state dict -> OpenCLIP names.

    sd: e.g. `CLIPTextEncoder.state_dict()`; `text_model.embeddings.position_ids` is dropped.
    prefix: prepended to every output key.
    Returns contiguous tensors (ready for safetensors): q/k/v are concatenated into `in_proj_*`
    and `text_projection` = weight.T. Raises KeyError naming unknown keys or a missing q/k/v part.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    unknown: list[str] = []
    for key in sd:
        try:
            target = hf_name_to_openclip(key)
        except KeyError:
            unknown.append(key)
            continue
        if target is None:
            continue
        name, part = target
        if part is not None:
            fused.setdefault(name, [None, None, None])[part] = sd[key]
        elif name == "text_projection":
            out[prefix + name] = sd[key].t().contiguous()
        else:
            out[prefix + name] = sd[key]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise KeyError(f"{len(unknown)} key(s) are not CLIP text encoder parameters: {shown}")
    for name, parts in fused.items():
        missing = [_QKV[i] for i, t in enumerate(parts) if t is None]
        if missing:
            raise KeyError(f"cannot build {name}: missing {', '.join(missing)} (q, k and v are all needed)")
        out[prefix + name] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out
