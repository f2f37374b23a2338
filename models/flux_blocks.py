"""Building blocks of the Flux.1 transformer (double-stream and single-stream DiT blocks).

Module and parameter names follow Black Forest Labs' reference checkpoints (`flux1-dev.safetensors`,
`flux1-schnell.safetensors`), so their tensors load without renaming and LoRA files address the
same modules. Every projection is an ``nn.Linear`` called as a module, so LoRA layers that wrap
or replace those modules take part in the forward.

Tensor conventions: token sequences are (B, L, hidden); per-head tensors are (B, heads, L, head_dim);
``vec`` is the (B, hidden) conditioning vector (timestep + pooled text [+ guidance]); ``pe`` is the
rotary table of `EmbedND`, (B or 1, 1, L, head_dim / 2, 2) float32 holding [cos, sin] of each
rotation angle. Blocks compute in the dtype of their input; RMSNorm and RoPE compute in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.unet_blocks import timestep_embedding

__all__ = [
    "TIME_EMBED_DIM",
    "DoubleStreamBlock",
    "EmbedND",
    "LastLayer",
    "MLPEmbedder",
    "Modulation",
    "QKNorm",
    "RMSNorm",
    "SelfAttention",
    "SingleStreamBlock",
    "apply_rope",
    "attention",
    "flux_timestep_embedding",
    "rope_angles",
    "split_heads",
]

TIME_EMBED_DIM = 256
"""Width of the sinusoidal embedding of the timestep and of the guidance scale."""
TIME_FACTOR = 1000.0
"""Flux takes t in [0, 1]; the sinusoidal embedding sees t * 1000 (as the UNet's step indices)."""


def flux_timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM) -> torch.Tensor:
    """Sinusoidal embedding of Flux times (or guidance scales): ``[cos | sin]`` of ``1000 * t``.

    t: (B,) in [0, 1] (guidance: the scale, e.g. 3.5). Returns (B, dim) float32, max period 10000.
    Computed in float32 whatever t's dtype: ``1000 * t`` in bf16 would round t to ~0.4 %.
    """
    return timestep_embedding(t.to(torch.float32) * TIME_FACTOR, dim, max_period=10000.0)


def rope_angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Rotation angles of one position axis: (..., L) positions -> (..., L, dim / 2) float64.

    Pair i (channels 2i, 2i+1) turns by ``pos * theta ** (-2i / dim)``; float64 because positions
    reach the hundreds and the highest frequency is 1 rad per step.
    """
    omega = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    return pos.to(torch.float64)[..., None] * omega


class EmbedND(nn.Module):
    """Rotary position table of multi-axis position ids (Flux: time, row, column).

    forward(ids (B, L, n_axes)) -> (B, 1, L, sum(axes_dim) / 2, 2) float32 [cos, sin]. The head
    dimension is split into per-axis chunks of ``axes_dim[i]`` channels, in axis order.
    """

    def __init__(self, axes_dim: tuple[int, ...], theta: float):
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"EmbedND: ids must have {len(self.axes_dim)} axes in the last dim, got {tuple(ids.shape)}")
        angles = torch.cat([rope_angles(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-1)
        return torch.stack([angles.cos(), angles.sin()], dim=-1).to(torch.float32).unsqueeze(1)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2i, 2i+1) of x (B, H, L, D) by the angles of pe
    (B or 1, 1, L, D/2, 2). Computed in float32, returned in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = pe[..., 0], pe[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k, then SDPA: q, k, v (B, H, L, D) -> (B, L, H * D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class MLPEmbedder(nn.Module):
    """Linear-SiLU-Linear: (B, in_dim) -> (B, hidden_dim). Names `in_layer`, `out_layer`."""

    def __init__(self, in_dim: int, hidden_dim: int, *, device=None, dtype=None):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, device=device, dtype=dtype)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim (eps 1e-6) computed in float32, then a learned `scale`."""

    def __init__(self, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)
        return (normed * self.scale).to(x.dtype)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries (`query_norm`) and keys (`key_norm`), over head_dim."""

    def __init__(self, head_dim: int, *, device=None, dtype=None):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, device=device, dtype=dtype)
        self.key_norm = RMSNorm(head_dim, device=device, dtype=dtype)


class SelfAttention(nn.Module):
    """Projections of one stream's attention: fused `qkv` (hidden -> 3 * hidden, rows [q | k | v],
    heads contiguous within each), `norm` (QKNorm) and the output `proj`. The attention itself runs
    in the blocks, over the joint text+image sequence."""

    def __init__(self, hidden: int, heads: int, qkv_bias: bool, *, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias, device=device, dtype=dtype)
        self.norm = QKNorm(hidden // heads, device=device, dtype=dtype)
        self.proj = nn.Linear(hidden, hidden, device=device, dtype=dtype)

    def heads_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, hidden) -> q, k, v (B, H, L, head_dim), q and k RMS-normed."""
        return split_heads(self.qkv(x), self.heads, self.norm)


def split_heads(qkv: torch.Tensor, heads: int, norm: QKNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3 * H * D) with rows [q | k | v] -> q, k, v (B, H, L, D); q and k through `norm`."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return norm.query_norm(q), norm.key_norm(k), v


class Modulation(nn.Module):
    """adaLN parameters from ``vec``: `lin` (hidden -> n * hidden) on silu(vec), split into n chunks.

    forward(vec (B, hidden)) -> n tensors (B, 1, hidden): (shift, scale, gate) once (single blocks,
    n = 3) or twice (double blocks, n = 6: attention, then MLP).
    """

    def __init__(self, hidden: int, double: bool, *, device=None, dtype=None):
        super().__init__()
        self.count = 6 if double else 3
        self.lin = nn.Linear(hidden, self.count * hidden, device=device, dtype=dtype)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.count, dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Affine-free LayerNorm (eps 1e-6), then ``(1 + scale) * x + shift``."""
    return (1 + scale) * F.layer_norm(x, (x.shape[-1],), eps=1e-6) + shift


def _mlp(hidden: int, mlp_hidden: int, device, dtype) -> nn.Sequential:
    # Sequential so the names are `*_mlp.0` / `*_mlp.2` as in the reference files.
    return nn.Sequential(
        nn.Linear(hidden, mlp_hidden, device=device, dtype=dtype),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden, hidden, device=device, dtype=dtype),
    )


class _Checkpointable(nn.Module):
    """A block whose forward can recompute its activations in backward (see
    FluxTransformer.set_gradient_checkpointing); subclasses implement `_forward`."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False
        self.checkpoint_context_fn = None

    def forward(self, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self.checkpoint_context_fn is None:  # torch.compile traces only checkpoints without one
                return checkpoint(self._forward, *args, use_reentrant=False)
            return checkpoint(self._forward, *args, use_reentrant=False, context_fn=self.checkpoint_context_fn)
        return self._forward(*args)


class DoubleStreamBlock(_Checkpointable):
    """MMDiT block: image and text keep their own weights and attend jointly over [txt | img].

    forward(img (B, L, hidden), txt (B, T, hidden), vec (B, hidden), pe (B|1, 1, T+L, D/2, 2))
    -> (img, txt) of the same shapes. Parameters: `img_mod`, `img_attn`, `img_mlp` and the same
    with `txt_`.
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool, *, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        mlp_hidden = int(hidden * mlp_ratio)
        self.img_mod = Modulation(hidden, double=True, **fk)
        self.img_attn = SelfAttention(hidden, heads, qkv_bias, **fk)
        self.img_mlp = _mlp(hidden, mlp_hidden, **fk)
        self.txt_mod = Modulation(hidden, double=True, **fk)
        self.txt_attn = SelfAttention(hidden, heads, qkv_bias, **fk)
        self.txt_mlp = _mlp(hidden, mlp_hidden, **fk)

    def _forward(self, img, txt, vec, pe):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.heads_qkv(_modulate(img, i_shift1, i_scale1))
        tq, tk, tv = self.txt_attn.heads_qkv(_modulate(txt, t_shift1, t_scale1))
        # Text first: the joint sequence is [txt | img], matching the rotary table's order.
        out = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1]:]

        img = img + i_gate1 * self.img_attn.proj(img_out)
        img = img + i_gate2 * self.img_mlp(_modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + t_gate2 * self.txt_mlp(_modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(_Checkpointable):
    """Parallel attention + MLP block over the joint [txt | img] sequence.

    `linear1`: hidden -> 3 * hidden + mlp_hidden, rows [q | k | v | mlp in]; `linear2`:
    hidden + mlp_hidden -> hidden on [attention out | gelu(mlp in)]; `norm` (QKNorm);
    `modulation` (shift, scale, gate). forward(x (B, N, hidden), vec (B, hidden),
    pe (B|1, 1, N, D/2, 2)) -> (B, N, hidden).
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, *, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.heads = heads
        self.hidden = hidden
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden, **fk)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden, **fk)
        self.norm = QKNorm(hidden // heads, **fk)
        self.modulation = Modulation(hidden, double=False, **fk)

    def _forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(_modulate(x, shift, scale)).split([3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads, self.norm)
        out = torch.cat((attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")), dim=2)
        return x + gate * self.linear2(out)


class LastLayer(nn.Module):
    """Output head: adaLN (`adaLN_modulation.1`, rows [shift | scale]) then `linear` to the
    patch channels. forward(x (B, L, hidden), vec (B, hidden)) -> (B, L, out_channels)."""

    def __init__(self, hidden: int, out_channels: int, *, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels, device=device, dtype=dtype)
        # Sequential(SiLU, Linear) for the reference name `adaLN_modulation.1`.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale))
