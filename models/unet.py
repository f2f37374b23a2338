"""Latent-diffusion UNet for SD1.5, SD2.x and SDXL, with the original ldm/sgm parameter names.

    cfg = UNetConfig.preset("sdxl")
    unet = UNet(cfg, device="meta")            # allocates nothing; load real weights later
    eps = unet(x, timesteps, context, y=y)     # x (B,4,H/8,W/8) -> same shape

Blocks live in ``models/unet_blocks.py``. ``state_dict()`` keys equal the ``model.diffusion_model.``
part of a single-file checkpoint with that prefix removed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from models.unet_blocks import (
    BasicTransformerBlock,
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    Upsample,
    timestep_embedding,
)

__all__ = ["PRESETS", "SDXL_SIZE_EMBED_DIM", "UNet", "UNetConfig", "sdxl_vector", "timestep_embedding"]

SDXL_SIZE_EMBED_DIM = 256
"""Width of the sinusoidal embedding of each SDXL size/crop conditioning value."""


@dataclass
class UNetConfig:
    """Architecture of the UNet. Presets: ``UNetConfig.preset(name)``, names in ``PRESETS``."""

    in_channels: int = 4
    """Latent channels in (4 for the SD VAEs)."""
    out_channels: int = 4
    """Channels predicted (eps or v), same layout as the input latents."""
    model_channels: int = 320
    """Channel width of level 0; level i has ``model_channels * channel_mult[i]``."""
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Width multiplier per resolution level; len(channel_mult) - 1 downsamplings by 2."""
    num_res_blocks: int = 2
    """ResBlocks per level on the way down (the way up has one more per level)."""
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    """SpatialTransformer depth per level (BasicTransformerBlocks each); 0 = no attention there."""
    transformer_depth_middle: int = 1
    """Depth of the middle block's SpatialTransformer (>= 1)."""
    num_heads: int | None = 8
    """Fixed head count at every level (SD1.5). Exactly one of num_heads / num_head_channels is set."""
    num_head_channels: int | None = None
    """Fixed channels per head (SD2, SDXL); heads at a level = level channels // this."""
    context_dim: int = 768
    """Width of the text-encoder sequence fed to cross-attention."""
    use_linear_in_transformer: bool = False
    """proj_in/proj_out as Linear on tokens (SD2, SDXL) instead of 1x1 Conv on the map (SD1.5)."""
    adm_in_channels: int | None = None
    """Width of the extra vector ``y`` added to the time embedding through ``label_emb``
    (SDXL: 2816 = 1280 pooled text + 6 * 256 size/crop embeddings); None = no ``y``."""
    norm_num_groups: int = 32
    """GroupNorm groups in ResBlocks, SpatialTransformers and the output norm."""
    dropout: float = 0.0
    """Dropout probability in ResBlocks and transformer blocks (0 in all released models)."""

    def __post_init__(self):
        # YAML/JSON give lists; the config is compared and hashed as tuples.
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if isinstance(self.transformer_depth, int):
            self.transformer_depth = (self.transformer_depth,) * len(self.channel_mult)
        self.transformer_depth = tuple(int(d) for d in self.transformer_depth)
        self.validate()

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding MLP output (4 * model_channels)."""
        return 4 * self.model_channels

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of the attention layers working on ``channels`` channels."""
        if self.num_head_channels is not None:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    def validate(self) -> None:
        """Raise ValueError naming the offending UNetConfig field."""

        def bad(name: str, why: str):
            raise ValueError(f"UNetConfig.{name} = {getattr(self, name)!r}: {why}")

        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be a positive integer")
        if not self.channel_mult or min(self.channel_mult) < 1:
            bad("channel_mult", "give one positive multiplier per level, e.g. (1, 2, 4)")
        if len(self.transformer_depth) != len(self.channel_mult):
            bad("transformer_depth", f"give one depth per level ({len(self.channel_mult)} levels in channel_mult)")
        if min(self.transformer_depth) < 0:
            bad("transformer_depth", "depths must be >= 0")
        if self.transformer_depth_middle < 1:
            bad("transformer_depth_middle", "the middle block always has a SpatialTransformer; use >= 1")
        if (self.num_heads is None) == (self.num_head_channels is None):
            bad("num_heads", "set exactly one of num_heads / num_head_channels (the other None)")
        if self.adm_in_channels is not None and self.adm_in_channels < 1:
            bad("adm_in_channels", "must be None (no y input) or a positive width")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        widths = {self.model_channels * m for m in self.channel_mult}
        for ch in sorted(widths):
            if ch % self.norm_num_groups:
                bad("norm_num_groups", f"must divide every level width; {ch} is not divisible")
            if self.num_head_channels is not None and ch % self.num_head_channels:
                bad("num_head_channels", f"must divide every level width; {ch} is not divisible")
            if self.num_heads is not None and ch % self.num_heads:
                bad("num_heads", f"must divide every level width; {ch} is not divisible")

    @classmethod
    def preset(cls, name: str) -> UNetConfig:
        """The config of a released model ("sd15", "sd2", "sdxl") or a test-size one ("tiny-*")."""
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    def replace(self, **changes) -> UNetConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


_SD_BASE = {
    "model_channels": 320, "channel_mult": (1, 2, 4, 4), "num_res_blocks": 2, "transformer_depth": (1, 1, 1, 0),
    "transformer_depth_middle": 1, "adm_in_channels": None,
}
_TINY_BASE = {"model_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1}
# adm 1600 = 64 pooled text + 6 * 256 size/crop embeddings.
_TINY_SDXL = {**_TINY_BASE, "transformer_depth": (0, 1, 2), "transformer_depth_middle": 2, "num_heads": None,
              "num_head_channels": 16, "context_dim": 96, "use_linear_in_transformer": True, "adm_in_channels": 1600}

PRESETS = MappingProxyType({
    "sd15": {**_SD_BASE, "num_heads": 8, "num_head_channels": None, "context_dim": 768,
             "use_linear_in_transformer": False},
    "sd2": {**_SD_BASE, "num_heads": None, "num_head_channels": 64, "context_dim": 1024,
            "use_linear_in_transformer": True},
    "sdxl": {
        "model_channels": 320, "channel_mult": (1, 2, 4), "num_res_blocks": 2, "transformer_depth": (0, 2, 10),
        "transformer_depth_middle": 10, "num_heads": None, "num_head_channels": 64, "context_dim": 2048,
        "use_linear_in_transformer": True, "adm_in_channels": 2816,
    },
    "tiny-sd15": {**_TINY_BASE, "transformer_depth": (1, 1, 0), "transformer_depth_middle": 1, "num_heads": 2,
                  "num_head_channels": None, "context_dim": 32, "use_linear_in_transformer": False,
                  "adm_in_channels": None},
    "tiny-sdxl": _TINY_SDXL,
    # The shipped toy model's UNet (the `toy-sdxl` family): tiny-sdxl's, 2.3 M params, on 16x16 latents.
    "toy-sdxl": _TINY_SDXL,
})
"""UNetConfig field values of each preset name."""


def sdxl_vector(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's ``y``: pooled text embedding followed by the 256-d [cos|sin] embedding of each size value.

    pooled: (B, P) (1280 for SDXL base); time_ids: (B, 6) = (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w) in pixels. Returns (B, P + 6*256) in pooled's dtype (embeddings computed in fp32).
    """
    if pooled.ndim != 2 or time_ids.ndim != 2 or pooled.shape[0] != time_ids.shape[0]:
        raise ValueError(
            f"sdxl_vector: expected pooled (B, P) and time_ids (B, n), got {tuple(pooled.shape)} and "
            f"{tuple(time_ids.shape)}"
        )
    b, n = time_ids.shape
    sizes = timestep_embedding(time_ids.reshape(-1), SDXL_SIZE_EMBED_DIM).reshape(b, n * SDXL_SIZE_EMBED_DIM)
    return torch.cat([pooled, sizes.to(pooled.dtype)], dim=1)


GRANULARITIES = ("block", "layer", "transformer")


class UNet(nn.Module):
    """Noise-prediction UNet.

    forward(x (B,in,H,W), timesteps (B,) or scalar in [0,1000), context (B,T,context_dim),
    y (B,adm_in_channels) for SDXL) -> (B,out,H,W) in x's dtype. Any H and W work: where a side
    is not a multiple of 2 ** (levels - 1), upsampling meets the skip's size, as in diffusers.

    Parameters get PyTorch's default initialisation; real use loads a checkpoint.
    Pass ``device="meta"`` (or build under ``torch.device("meta")``) to allocate nothing.
    """

    def __init__(self, config: UNetConfig, *, device=None, dtype=None):
        super().__init__()
        config.validate()
        self.config = config
        fk = {"device": device, "dtype": dtype}
        c = config
        mc, ted, groups = c.model_channels, c.time_embed_dim, c.norm_num_groups

        self.time_embed = nn.Sequential(nn.Linear(mc, ted, **fk), nn.SiLU(), nn.Linear(ted, ted, **fk))
        if c.adm_in_channels is not None:
            # Sequential(Sequential(...)): the sgm layout that gives label_emb.0.0 / label_emb.0.2.
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, ted, **fk), nn.SiLU(), nn.Linear(ted, ted, **fk))
            )

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, ted, cout, norm_groups=groups, dropout=c.dropout, **fk)

        def attn(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = c.heads_at(ch)
            return SpatialTransformer(
                ch, heads, dim_head, depth=depth, context_dim=c.context_dim,
                use_linear=c.use_linear_in_transformer, norm_groups=groups, dropout=c.dropout, **fk,
            )

        blocks = [TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1, **fk))]
        skip_chans = [mc]
        ch = mc
        last = len(c.channel_mult) - 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, mc * mult)]
                ch = mc * mult
                if c.transformer_depth[level]:
                    layers.append(attn(ch, c.transformer_depth[level]))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != last:
                blocks.append(TimestepEmbedSequential(Downsample(ch, **fk)))
                skip_chans.append(ch)
        self.input_blocks = nn.ModuleList(blocks)

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, c.transformer_depth_middle), res(ch, ch))

        blocks = []
        for level in reversed(range(len(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mc * c.channel_mult[level])]
                ch = mc * c.channel_mult[level]
                if c.transformer_depth[level]:
                    layers.append(attn(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch, **fk))
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch, eps=1e-5, **fk), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1, **fk)
        )
        self._checkpointing = None

    # -- properties -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (of the first layer: a UNet is kept in one dtype, or quantized
        with that compute dtype, see `models.quant`)."""
        from .quant.model import compute_dtype

        return compute_dtype(self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def gradient_checkpointing(self) -> str | None:
        """Active checkpointing granularity, or None when off."""
        return self._checkpointing

    def set_gradient_checkpointing(self, enabled: bool = True, granularity: str = "block", context_fn=None) -> None:
        """Recompute activations in backward instead of storing them.

        Applies whenever autograd records the forward, in train or eval mode (LoRA training keeps
        the frozen UNet in eval mode); inference under ``torch.no_grad()`` is unaffected.

        granularity: "block" - each input/middle/output block as a whole (fewest saved inputs, but
        a whole block is recomputed at once: for SDXL at 1024x1024 "layer" peaks lower);
        "layer" - each ResBlock and each BasicTransformerBlock separately;
        "transformer" - only BasicTransformerBlocks (the attention-heavy part; least recompute).
        ``enabled=False`` turns every level off.

        context_fn: passed to ``torch.utils.checkpoint.checkpoint`` for every checkpointed module,
        e.g. ``functools.partial(create_selective_checkpoint_contexts, policy)`` to keep chosen
        ops' outputs (matmuls, attention) and recompute only the rest.
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"set_gradient_checkpointing: granularity {granularity!r} not in {GRANULARITIES}")
        on = bool(enabled)
        for m in self.modules():
            if hasattr(m, "checkpoint_context_fn"):
                m.checkpoint_context_fn = context_fn if on else None
            if isinstance(m, TimestepEmbedSequential):
                m.gradient_checkpointing = on and granularity == "block" and m is not self.input_blocks[0]
            elif isinstance(m, ResBlock):
                m.gradient_checkpointing = on and granularity == "layer"
            elif isinstance(m, BasicTransformerBlock):
                m.gradient_checkpointing = on and granularity in ("layer", "transformer")
        self._checkpointing = granularity if on else None

    def compile_blocks(self, **compile_kwargs) -> int:
        """`torch.compile` every BasicTransformerBlock in place; returns how many.

        In place (`nn.Module.compile`), so parameter names, state dicts and LoRA export are
        unchanged. Call it after injecting LoRA: the graphs are traced at the first forward and
        then include the adapters. Works with every checkpointing granularity. The first steps
        are slow while the graphs compile (tens of seconds on CPU, a few minutes for SDXL on GPU).
        """
        blocks = [m for m in self.modules() if isinstance(m, BasicTransformerBlock)]
        for block in blocks:
            block.compile(**compile_kwargs)
        return len(blocks)

    # -- forward ----------------------------------------------------------------------------------
    def _check_inputs(self, x, timesteps, context, y) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"UNet: x must be (B, {c.in_channels}, H, W) latents, got {tuple(x.shape)}")
        b, _, hgt, wid = x.shape
        if context is None or context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"UNet: context must be ({b}, T, {c.context_dim}), got {got}")
        if c.adm_in_channels is None:
            if y is not None:
                raise ValueError("UNet: this config has adm_in_channels=None, so y must not be given")
        elif y is None or y.shape != (b, c.adm_in_channels):
            got = None if y is None else tuple(y.shape)
            raise ValueError(f"UNet: y must be ({b}, {c.adm_in_channels}) (see sdxl_vector), got {got}")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0 or timesteps.shape == (1,):
            timesteps = timesteps.reshape(1).expand(b)
        if timesteps.shape != (b,):
            raise ValueError(f"UNet: timesteps must be a scalar or shape ({b},), got {tuple(timesteps.shape)}")
        return timesteps

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        timesteps = self._check_inputs(x, timesteps, context, y)
        # The network computes in x's dtype (the parameters' dtype, or autocast's); only the
        # sinusoidal embedding is built in float32 first.
        dtype = x.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)

        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
