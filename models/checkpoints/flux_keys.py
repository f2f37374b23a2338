"""Flux transformer checkpoints: Black Forest Labs names (ours) <-> diffusers names, detection, configs.

Our `FluxTransformer` uses the reference names (`flux1-dev.safetensors`; files saved by ComfyUI
prefix them with `model.diffusion_model.`). Diffusers' `FluxTransformer2DModel`
(`transformer/diffusion_pytorch_model*.safetensors`) renames every module and splits fused tensors:

    img_in / txt_in                         x_embedder / context_embedder
    time_in / vector_in / guidance_in       time_text_embed.{timestep,text,guidance}_embedder
        .in_layer / .out_layer                  .linear_1 / .linear_2
    double_blocks.i.img_mod.lin             transformer_blocks.i.norm1.linear       (txt_: norm1_context)
    double_blocks.i.img_attn.qkv            transformer_blocks.i.attn.to_q | to_k | to_v   (rows, in order)
    double_blocks.i.txt_attn.qkv            transformer_blocks.i.attn.add_q_proj | add_k_proj | add_v_proj
    double_blocks.i.img_attn.norm.{query,key}_norm.scale   ...attn.norm_q / norm_k .weight (txt: norm_added_q/k)
    double_blocks.i.img_attn.proj           transformer_blocks.i.attn.to_out.0      (txt: attn.to_add_out)
    double_blocks.i.img_mlp.0 / .2          transformer_blocks.i.ff.net.0.proj / ff.net.2   (txt: ff_context)
    single_blocks.i.linear1                 single_transformer_blocks.i.attn.to_q | to_k | to_v | proj_mlp
    single_blocks.i.linear2                 single_transformer_blocks.i.proj_out
    single_blocks.i.norm.{query,key}_norm.scale            ...attn.norm_q / norm_k .weight
    single_blocks.i.modulation.lin          single_transformer_blocks.i.norm.linear
    final_layer.linear                      proj_out
    final_layer.adaLN_modulation.1          norm_out.linear, with its halves swapped
                                            (reference rows [shift | scale], diffusers [scale | shift])

A fused tensor is the row-wise concatenation of its diffusers pieces; converting one way
concatenates, the other way takes row views.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from ..flux import FluxConfig

__all__ = [
    "BFL_PREFIXES",
    "DIFFUSERS_PREFIXES",
    "STANDARD_AXES_DIM",
    "DiffusersPiece",
    "FluxDiffusersView",
    "flux_config_from_diffusers",
    "flux_config_from_shapes",
    "flux_config_to_diffusers",
    "flux_diffusers_layout",
    "flux_state_dict_from_diffusers",
    "flux_state_dict_to_diffusers",
    "flux_transformer_layout",
    "is_flux_transformer",
]

BFL_PREFIXES = ("", "model.diffusion_model.")
"""Prefixes of the reference names in single files: none (BFL releases) or ComfyUI's."""
DIFFUSERS_PREFIXES = ("", "transformer.")
"""Prefixes of diffusers names: none (a `transformer/` folder) or a pipeline-level state dict's."""

# Names every Flux.1 transformer has in each layout. `img_mod` tells Flux.1 from relatives that
# share the block names but not per-block modulation (Chroma, Flux.2).
_BFL_SIGNATURE = ("img_in.weight", "double_blocks.0.img_mod.lin.weight", "double_blocks.0.img_attn.qkv.weight",
                  "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.weight")
_DIFFUSERS_SIGNATURE = ("x_embedder.weight", "transformer_blocks.0.norm1.linear.weight",
                        "transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.proj_mlp.weight",
                        "norm_out.linear.weight")
STANDARD_AXES_DIM = (16, 56, 56)
"""RoPE split of the released models' 128-channel heads (not visible in checkpoint shapes)."""


class DiffusersPiece(NamedTuple):
    """Rows [start, stop) of the diffusers tensor `key`, one piece of a reference tensor."""

    key: str
    start: int
    stop: int


def flux_diffusers_layout(cfg: FluxConfig) -> dict[str, tuple[DiffusersPiece, ...]]:
    """Every parameter of `FluxTransformer(cfg)` -> the diffusers pieces whose row-wise
    concatenation (in order) it is. Works for any config (tiny test models included)."""
    h, mlp = cfg.hidden_size, cfg.mlp_hidden
    out: dict[str, tuple[DiffusersPiece, ...]] = {}

    def same(ours: str, theirs: str, rows: int, bias: bool = True) -> None:
        for kind in ("weight", "bias") if bias else ("weight",):
            out[f"{ours}.{kind}"] = (DiffusersPiece(f"{theirs}.{kind}", 0, rows),)

    def fused(ours: str, parts: Sequence[tuple[str, int]], bias: bool = True) -> None:
        for kind in ("weight", "bias") if bias else ("weight",):
            out[f"{ours}.{kind}"] = tuple(DiffusersPiece(f"{name}.{kind}", 0, rows) for name, rows in parts)

    def norms(ours: str, q: str, k: str, head_dim: int) -> None:
        out[f"{ours}.query_norm.scale"] = (DiffusersPiece(f"{q}.weight", 0, head_dim),)
        out[f"{ours}.key_norm.scale"] = (DiffusersPiece(f"{k}.weight", 0, head_dim),)

    same("img_in", "x_embedder", h)
    same("txt_in", "context_embedder", h)
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if cfg.guidance_embed:
        embedders["guidance_in"] = "guidance_embedder"
    for ours, theirs in embedders.items():
        same(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1", h)
        same(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2", h)

    for i in range(cfg.depth):
        src, dst = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, mod, qkv, qk, proj, ff in (
            ("img", "norm1", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff"),
            ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"),
             "to_add_out", "ff_context"),
        ):
            same(f"{src}.{stream}_mod.lin", f"{dst}.{mod}.linear", 6 * h)
            fused(f"{src}.{stream}_attn.qkv", [(f"{dst}.attn.{n}", h) for n in qkv], bias=cfg.qkv_bias)
            norms(f"{src}.{stream}_attn.norm", f"{dst}.attn.{qk[0]}", f"{dst}.attn.{qk[1]}", cfg.head_dim)
            same(f"{src}.{stream}_attn.proj", f"{dst}.attn.{proj}", h)
            same(f"{src}.{stream}_mlp.0", f"{dst}.{ff}.net.0.proj", mlp)
            same(f"{src}.{stream}_mlp.2", f"{dst}.{ff}.net.2", h)

    for i in range(cfg.depth_single_blocks):
        src, dst = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        fused(f"{src}.linear1", [(f"{dst}.attn.to_q", h), (f"{dst}.attn.to_k", h), (f"{dst}.attn.to_v", h),
                                 (f"{dst}.proj_mlp", mlp)])
        same(f"{src}.linear2", f"{dst}.proj_out", h)
        norms(f"{src}.norm", f"{dst}.attn.norm_q", f"{dst}.attn.norm_k", cfg.head_dim)
        same(f"{src}.modulation.lin", f"{dst}.norm.linear", 3 * h)

    same("final_layer.linear", "proj_out", cfg.out_channels)
    for kind in ("weight", "bias"):  # reference [shift | scale] = diffusers rows [h:2h] then [0:h]
        key = f"norm_out.linear.{kind}"
        out[f"final_layer.adaLN_modulation.1.{kind}"] = (DiffusersPiece(key, h, 2 * h), DiffusersPiece(key, 0, h))
    return out


def _diffusers_rows(layout: Mapping[str, tuple[DiffusersPiece, ...]]) -> dict[str, int]:
    """Row count of every diffusers tensor of `layout` (the end of its last piece)."""
    rows: dict[str, int] = {}
    for pieces in layout.values():
        for key, _, stop in pieces:
            rows[key] = max(rows.get(key, 0), stop)
    return rows


class FluxDiffusersView(Mapping):
    """Our (reference) parameter names over a diffusers `FluxTransformer2DModel` state dict or
    tensor store, each tensor built when it is read: unfused ones are the stored tensors as they
    are, fused ones (qkv, linear1, the final adaLN) the concatenation of row views. Reading one
    parameter at a time keeps a loader's peak at one fused tensor, not the whole model.

    `prefix` is prepended to every diffusers name. Reading a parameter raises ValueError naming
    `where` and the missing or wrongly shaped diffusers tensor; `check()` does so for all of them
    without concatenating anything.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], cfg: FluxConfig, prefix: str = "",
                 where: str = "the diffusers transformer"):
        self.state, self.cfg, self.prefix, self.where = state, cfg, prefix, where
        self.layout = flux_diffusers_layout(cfg)
        self._rows = _diffusers_rows(self.layout)

    def __iter__(self):
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)

    def sources(self, name: str) -> list[torch.Tensor]:
        """The stored tensors (or row views of them) that make up parameter `name`, in row order."""
        parts = []
        for key, start, stop in self.layout[name]:
            full = self.prefix + key
            tensor = self.state[full] if full in self.state else None
            if tensor is None:
                raise ValueError(f"{self.where}: missing {full} (needed for {name}); is it a Flux.1 transformer "
                                 f"with {self.cfg.depth} double and {self.cfg.depth_single_blocks} single blocks?")
            if tensor.ndim == 0 or tensor.shape[0] != self._rows[key]:
                raise ValueError(f"{self.where}: {full} has shape {list(tensor.shape)}, expected {self._rows[key]} "
                                 f"rows for {name}; the file does not match the config")
            parts.append(tensor if (start, stop) == (0, self._rows[key]) else tensor[start:stop])
        return parts

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = self.sources(name)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def check(self) -> None:
        """Raise the error reading any parameter would raise, for the first such parameter."""
        for name in self.layout:
            self.sources(name)

    def unused(self) -> list[str]:
        """Keys under `prefix` that no parameter reads (extra tensors in the file)."""
        used = {self.prefix + key for pieces in self.layout.values() for key, _, _ in pieces}
        return sorted(k for k in self.state if k.startswith(self.prefix) and k not in used)


def flux_state_dict_from_diffusers(state: Mapping[str, torch.Tensor], cfg: FluxConfig, prefix: str = "",
                                   where: str = "the diffusers transformer") -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict under our (reference) names, all at once
    (see `FluxDiffusersView` to build one parameter at a time). Raises ValueError naming `where`
    and the first missing or wrongly shaped diffusers tensor."""
    view = FluxDiffusersView(state, cfg, prefix, where)
    view.check()
    return dict(view)


def flux_state_dict_to_diffusers(state: Mapping[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """Our state dict under diffusers names: unfused tensors as they are, split ones as row views
    (no copy), the final adaLN with its halves swapped (a copy). Raises ValueError naming the first
    missing parameter."""
    collected: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, pieces in flux_diffusers_layout(cfg).items():
        tensor = state.get(name)
        if tensor is None:
            raise ValueError(f"Flux state dict: missing {name}; expected a FluxTransformer with {cfg.depth} "
                             f"double and {cfg.depth_single_blocks} single blocks")
        row = 0
        for key, start, stop in pieces:
            rows = stop - start
            view = tensor if len(pieces) == 1 else tensor[row:row + rows]
            collected.setdefault(key, []).append((start, view))
            row += rows
    out = {}
    for key, parts in collected.items():
        parts.sort(key=lambda p: p[0])
        out[key] = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts])
    return out


def flux_transformer_layout(keys: Iterable[str]) -> tuple[str, str] | None:
    """("bfl" | "diffusers", prefix) when `keys` hold a Flux.1 transformer, else None.

    Reference names with prefix "" or "model.diffusion_model."; diffusers names with "" or
    "transformer.". Other keys (VAE, text encoders) may be present.
    """
    keys = set(keys)
    for layout, prefixes, signature in (("bfl", BFL_PREFIXES, _BFL_SIGNATURE),
                                        ("diffusers", DIFFUSERS_PREFIXES, _DIFFUSERS_SIGNATURE)):
        for prefix in prefixes:
            if all(prefix + k in keys for k in signature):
                return layout, prefix
    return None


def is_flux_transformer(keys: Iterable[str]) -> bool:
    """Whether `keys` hold a Flux.1 transformer, in reference or diffusers names (any known prefix)."""
    return flux_transformer_layout(keys) is not None


def _block_count(shapes: Mapping, prefix: str) -> int:
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    if found != set(range(len(found))):
        raise ValueError(f"Flux checkpoint: {prefix}N blocks are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def flux_config_from_shapes(shapes: Mapping[str, Sequence[int]], prefix: str = "",
                            axes_dim: tuple[int, ...] | None = None, where: str = "checkpoint") -> FluxConfig:
    """The FluxConfig of reference-named tensor shapes (key -> shape; `prefix` is stripped).

    Head count comes from the QK-norm width; dev vs schnell from `guidance_in`. The RoPE split is
    not in the shapes: `axes_dim` defaults to the released (16, 56, 56) for 128-channel heads and
    must be given otherwise. Raises ValueError naming `where` and what is missing.
    """
    shapes = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"{where}: no {prefix + key}; not a Flux.1 transformer in reference names")
        return shapes[key]

    hidden, in_channels = shape("img_in.weight")
    depth = _block_count(shapes, "double_blocks.")
    single = _block_count(shapes, "single_blocks.")
    first = "double_blocks.0.img_attn.norm" if depth else "single_blocks.0.norm"
    head_dim = shape(f"{first}.query_norm.scale")[0]
    if axes_dim is None:
        if head_dim != sum(STANDARD_AXES_DIM):
            raise ValueError(f"{where}: heads of {head_dim} channels; give axes_dim (RoPE channels per axis, "
                             f"summing to {head_dim}), it is not stored in the file")
        axes_dim = STANDARD_AXES_DIM
    mlp_from = "double_blocks.0.img_mlp.0.weight" if depth else None
    mlp_hidden = shape(mlp_from)[0] if mlp_from else shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
    cfg = FluxConfig(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=single,
        axes_dim=tuple(axes_dim),
        qkv_bias=not depth or "double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )
    if cfg.mlp_hidden != mlp_hidden:  # int(hidden * ratio) must give the stored width back
        raise ValueError(f"{where}: MLP width {mlp_hidden} is not int(hidden_size * mlp_ratio) for any ratio")
    return cfg


def flux_config_from_diffusers(d: dict, where: str = "transformer/config.json") -> FluxConfig:
    """FluxConfig of a diffusers `FluxTransformer2DModel` config.json (diffusers fixes mlp_ratio 4,
    theta 10000 and qkv biases). Raises ValueError naming `where` and the unsupported field."""
    if d.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
        raise ValueError(f"{where}: _class_name {d.get('_class_name')!r} is not FluxTransformer2DModel")
    if d.get("patch_size", 1) != 1:
        raise ValueError(f"{where}: patch_size {d['patch_size']} is not supported (Flux.1 uses 1 on packed tokens)")
    try:
        heads, head_dim = int(d.get("num_attention_heads", 24)), int(d.get("attention_head_dim", 128))
        in_channels = int(d.get("in_channels", 64))
        return FluxConfig(
            in_channels=in_channels,
            out_channels=int(d.get("out_channels") or in_channels),
            vec_in_dim=int(d.get("pooled_projection_dim", 768)),
            context_in_dim=int(d.get("joint_attention_dim", 4096)),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=int(d.get("num_layers", 19)),
            depth_single_blocks=int(d.get("num_single_layers", 38)),
            axes_dim=tuple(d.get("axes_dims_rope", STANDARD_AXES_DIM)),
            guidance_embed=bool(d.get("guidance_embeds", False)),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def flux_config_to_diffusers(cfg: FluxConfig) -> dict:
    """The diffusers `FluxTransformer2DModel` config.json fields of `cfg`. Raises ValueError when
    `cfg` uses what diffusers' model cannot represent (mlp_ratio != 4, theta != 10000, no qkv bias)."""
    if (cfg.mlp_ratio, cfg.theta, cfg.qkv_bias) != (4.0, 10000, True):
        raise ValueError(f"FluxConfig mlp_ratio={cfg.mlp_ratio}, theta={cfg.theta}, qkv_bias={cfg.qkv_bias}: "
                         "diffusers' FluxTransformer2DModel supports only 4.0, 10000 and True")
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": list(cfg.axes_dim),
    }
