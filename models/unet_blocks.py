"""Building blocks of the latent-diffusion UNet (SD1.5, SD2.x, SDXL).

Module and parameter names follow the original ldm/sgm single-file checkpoints, so a checkpoint's
``model.diffusion_model.*`` tensors load without renaming, and LoRA files address the same modules.

Tensor conventions: feature maps are (B, C, H, W); token sequences are (B, N, C) with N = H*W;
``emb`` is the (B, time_embed_dim) timestep(+label) embedding; ``context`` is the (B, T, context_dim)
text-encoder sequence. Every block computes in the dtype of its input and parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "GEGLU",
    "BasicTransformerBlock",
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "ResBlock",
    "SpatialTransformer",
    "TimestepEmbedSequential",
    "Upsample",
    "timestep_embedding",
]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of scalar values, ``[cos | sin]`` halves, always float32.

    timesteps: (B,) any real dtype (diffusion steps in [0, 1000), or SDXL size/crop values in pixels).
    Returns (B, dim) float32; frequency i is ``max_period ** (-i / (dim // 2))``. An odd ``dim``
    gets a trailing zero column.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding: expected a 1-D tensor of values, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    # float32 whatever the model dtype: in bf16, t*freq for t ~ 1000 would lose the phase entirely.
    # Same operation order as the reference implementations: at t ~ 1000 a one-ulp difference in a
    # frequency moves the phase by ~1e-4, so the order is part of the definition.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    args = timesteps.to(torch.float32)[:, None] * torch.exp(exponent / half)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _checkpointed(module: nn.Module, fn, *args):
    """Run ``fn(*args)`` keeping only its inputs; activations are recomputed in backward.
    ``module.checkpoint_context_fn`` (see UNet.set_gradient_checkpointing) goes to torch's checkpoint."""
    if module.checkpoint_context_fn is None:  # torch.compile traces only checkpoints without one
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=module.checkpoint_context_fn)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv residual block with an additive timestep embedding.

    in_layers: [GroupNorm, SiLU, Conv3x3 in->out]; emb_layers: [SiLU, Linear emb_dim->out];
    out_layers: [GroupNorm, SiLU, Dropout, Conv3x3 out->out]; skip_connection: 1x1 Conv when the
    channel count changes, else Identity. forward(x (B,in,H,W), emb (B,emb_dim)) -> (B,out,H,W).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        *,
        norm_groups: int = 32,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, channels, eps=1e-5, **fk),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1, **fk),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels, **fk))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels, eps=1e-5, **fk),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, **fk),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1, **fk)
        self.gradient_checkpointing = False
        self.checkpoint_context_fn = None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _checkpointed(self, self._forward, x, emb)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention over tokens; self-attention when ``context`` is None.

    to_q: Linear query_dim->inner, to_k/to_v: Linear context_dim->inner (no bias),
    to_out: [Linear inner->query_dim (bias), Dropout], inner = heads * dim_head.
    forward(x (B,N,query_dim), context (B,T,context_dim) | None) -> (B,N,query_dim).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        *,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False, **fk)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **fk)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **fk)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, **fk), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        # (B, N, h*d) -> (B, h, N, d) as strided views: SDPA takes them without a copy.
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)
        k = self.to_k(ctx).view(b, -1, h, d).transpose(1, 2)
        v = self.to_v(ctx).view(b, -1, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        proj, drop = self.to_out
        return drop(proj(out))


class GEGLU(nn.Module):
    """Gated GELU: proj Linear dim->2*inner, split into (value, gate), returns value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int, *, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: net = [GEGLU dim->inner, Dropout, Linear inner->dim], inner = 4*dim."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            GEGLU(dim, inner, device=device, dtype=dtype),
            nn.Dropout(dropout),
            nn.Linear(inner, dim, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on ``context``, GEGLU MLP, each residual.

    forward(x (B,N,dim), context (B,T,context_dim)) -> (B,N,dim).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        *,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.attn1 = CrossAttention(dim, None, heads=heads, dim_head=dim_head, dropout=dropout, **fk)
        self.ff = FeedForward(dim, dropout=dropout, **fk)
        self.attn2 = CrossAttention(dim, context_dim, heads=heads, dim_head=dim_head, dropout=dropout, **fk)
        self.norm1 = nn.LayerNorm(dim, **fk)
        self.norm2 = nn.LayerNorm(dim, **fk)
        self.norm3 = nn.LayerNorm(dim, **fk)
        self.gradient_checkpointing = False
        self.checkpoint_context_fn = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _checkpointed(self, self._forward, x, context)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with a residual around it.

    norm: GroupNorm(eps 1e-6); proj_in/proj_out: Linear on tokens (SD2/SDXL, ``use_linear``) or
    1x1 Conv on the map (SD1.5); transformer_blocks: ``depth`` BasicTransformerBlocks.
    forward(x (B,C,H,W), context (B,T,context_dim)) -> (B,C,H,W).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        *,
        depth: int,
        context_dim: int,
        use_linear: bool,
        norm_groups: int = 32,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, **fk)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner, **fk)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1, **fk)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout=dropout, **fk) for _ in range(depth)
        )
        if use_linear:
            self.proj_out = nn.Linear(inner, channels, **fk)
        else:
            self.proj_out = nn.Conv2d(inner, channels, 1, **fk)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, hgt, wid = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        inner = h.shape[1]
        # NCHW -> (B, HW, C); a free view when the map is channels-last in memory.
        h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, inner)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(b, hgt, wid, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            h = self.proj_out(h)
        # x first: the sum takes the first operand's memory layout, and the rest of the network
        # should stay NCHW (h is a channels-last view here); this also fuses the layout copy.
        return x + h


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 conv ``op``. (B,C,H,W) -> (B,out,ceil(H/2),ceil(W/2))."""

    def __init__(self, channels: int, out_channels: int | None = None, *, device=None, dtype=None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Doubles H and W (nearest) then applies a 3x3 ``conv``. (B,C,H,W) -> (B,out,2H,2W).

    The two steps are computed as one stride-2 transposed conv whose 4x4 kernel sums the 3x3 taps
    that land on the same low-resolution pixel: same result, 16 instead of 36 multiply-adds per
    input pixel and channel pair, and no 4x-sized intermediate. A LoRA wrapper's updates are added
    to that output; when ``conv`` carries hooks, another module or a DoRA adapter, the literal
    interpolate-then-conv path runs instead.
    """

    def __init__(self, channels: int, out_channels: int | None = None, *, device=None, dtype=None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B,C,H,W) -> (B,C',2H,2W), or (B,C',*size) when the skip it meets is not 2x (odd sides)."""
        conv = self.conv
        doubled = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
        plain = type(conv) is nn.Conv2d
        # An adapter wrapper (LoRA) whose output is base + updates keeps the fused base kernel and
        # adds its updates of the upsampled input, so that at strength 0 the output is the base's.
        fused = plain or getattr(conv, "additive", False)
        if doubled and fused and not (conv._forward_hooks or conv._forward_pre_hooks):
            y = F.conv_transpose2d(x, _upsample_kernel(conv.weight), conv.bias, stride=2, padding=1)
            return y if plain else conv.add_updates(F.interpolate(x, scale_factor=2.0, mode="nearest"), y)
        if doubled:
            return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return conv(F.interpolate(x, size=tuple(size), mode="nearest"))


def _fold_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Map 3 taps (t0, t1, t2) along ``dim`` to the 4 transposed-conv taps (t2, t1+t2, t0+t1, t0).

    Output row 2i reads upsampled rows 2i-1..2i+1 = input rows (i-1, i, i): taps t0 on i-1, t1+t2 on
    i; row 2i+1 reads (i, i, i+1): t0+t1 on i, t2 on i+1. With stride 2 and padding 1 a transposed
    conv sends input row j to output row 2j + k - 1, which gives the order above.
    """
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t2, t1 + t2, t0 + t1, t0], dim=dim)


def _upsample_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) conv weight -> (in, out, 4, 4) conv_transpose2d weight, see ``_fold_taps``."""
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    w = _fold_taps(_fold_taps(w, 2), 3)
    return w.transpose(0, 1).to(weight.dtype)


class TimestepEmbedSequential(nn.ModuleList):
    """One ``input_blocks.N`` / ``middle_block`` / ``output_blocks.N`` entry: layers applied in order,
    ResBlocks receiving ``emb`` and SpatialTransformers receiving ``context``.

    forward(x (B,C,H,W), emb (B,E), context (B,T,D)) -> (B,C',H',W'). With ``gradient_checkpointing``
    set, the whole entry is recomputed in backward instead of keeping its activations.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__(layers)
        self.gradient_checkpointing = False
        self.checkpoint_context_fn = None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """`out_size` (H, W): what an Upsample in this entry must produce (the next skip's size),
        so latents whose sides are not multiples of the total downsampling still line up."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _checkpointed(self, self._forward, x, emb, context, out_size)
        return self._forward(x, emb, context, out_size)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                 out_size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x
