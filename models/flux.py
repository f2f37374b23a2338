"""Flux.1 rectified-flow transformer (dev, schnell), with Black Forest Labs' parameter names.

    cfg = FluxConfig.preset("flux-dev")
    model = FluxTransformer(cfg, device="meta")          # allocates nothing; load real weights later
    img, ids = pack_latents(z), image_ids(b, h, w)       # z (B, 16, h, w) VAE latents
    v = model(img, ids, txt, text_ids(b, T), t, y, guidance)   # (B, h*w/4, 64)
    z_pred = unpack_latents(v, h, w)

Blocks live in ``models/flux_blocks.py``. ``state_dict()`` keys equal those of the reference
single files (`flux1-dev.safetensors`: no prefix; files saved by ComfyUI: `model.diffusion_model.`
prefix to strip). Diffusers folders use other names and split fused tensors:
``models/checkpoints/flux_keys.py`` maps them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from models.flux_blocks import (
    TIME_EMBED_DIM,
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    flux_timestep_embedding,
)

__all__ = [
    "FLUX_GRANULARITIES",
    "PRESETS",
    "FluxConfig",
    "FluxTransformer",
    "image_ids",
    "pack_latents",
    "text_ids",
    "unpack_latents",
]

PATCH = 2
"""Side of the latent patch that becomes one token (2x2 latent pixels x 16 channels = 64)."""


@dataclass
class FluxConfig:
    """Architecture of the Flux transformer. Presets: ``FluxConfig.preset(name)``, names in ``PRESETS``."""

    in_channels: int = 64
    """Channels of one image token: latent channels * 2 * 2 (16-channel VAE -> 64)."""
    out_channels: int = 64
    """Channels predicted per image token (the velocity of the packed latents)."""
    vec_in_dim: int = 768
    """Width of the pooled text vector ``y`` (CLIP-L pooled output)."""
    context_in_dim: int = 4096
    """Width of the text sequence ``txt`` (T5-XXL hidden states)."""
    hidden_size: int = 3072
    """Transformer width."""
    mlp_ratio: float = 4.0
    """MLP hidden width = int(hidden_size * mlp_ratio)."""
    num_heads: int = 24
    """Attention heads; head_dim = hidden_size / num_heads."""
    depth: int = 19
    """Double-stream blocks (separate image and text weights, joint attention)."""
    depth_single_blocks: int = 38
    """Single-stream blocks over the joint [text | image] sequence."""
    axes_dim: tuple[int, ...] = (16, 56, 56)
    """RoPE channels per position axis (time, row, column); they sum to head_dim."""
    theta: int = 10000
    """RoPE base period."""
    qkv_bias: bool = True
    """Bias on the double blocks' fused qkv projections."""
    guidance_embed: bool = True
    """Guidance-distilled (dev): the guidance scale is embedded through `guidance_in` and required."""

    def __post_init__(self):
        # YAML/JSON give lists; the config is compared and hashed with tuples.
        self.axes_dim = tuple(int(d) for d in self.axes_dim)
        self.validate()

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLPs (and of the single blocks' MLP branch)."""
        return int(self.hidden_size * self.mlp_ratio)

    def validate(self) -> None:
        """Raise ValueError naming the offending FluxConfig field."""

        def bad(name: str, why: str):
            raise ValueError(f"FluxConfig.{name} = {getattr(self, name)!r}: {why}")

        for name in ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be a positive integer")
        for name in ("depth", "depth_single_blocks"):
            if int(getattr(self, name)) < 0:
                bad(name, "must be >= 0")
        if not self.mlp_ratio > 0:
            bad("mlp_ratio", "must be > 0")
        if not self.theta > 0:
            bad("theta", "must be > 0")
        if self.hidden_size % self.num_heads:
            bad("num_heads", f"must divide hidden_size ({self.hidden_size})")
        if not self.axes_dim or any(d < 2 or d % 2 for d in self.axes_dim):
            bad("axes_dim", "give one positive even channel count per position axis, e.g. (16, 56, 56)")
        if sum(self.axes_dim) != self.head_dim:
            bad("axes_dim", f"must sum to head_dim = hidden_size / num_heads = {self.head_dim}")

    @classmethod
    def preset(cls, name: str) -> FluxConfig:
        """The config of a released model ("flux-dev", "flux-schnell") or the test-size "tiny-flux"."""
        if name not in PRESETS:
            raise ValueError(f"unknown Flux preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    def replace(self, **changes) -> FluxConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


PRESETS = MappingProxyType({
    "flux-dev": {"guidance_embed": True},
    "flux-schnell": {"guidance_embed": False},
    # head_dim 32 = 8 + 12 + 12; the released models' 64-channel tokens, so the 16-channel VAE fits.
    "tiny-flux": {"hidden_size": 64, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
                  "axes_dim": (8, 12, 12), "context_in_dim": 32, "vec_in_dim": 32, "guidance_embed": True},
})
"""FluxConfig field values of each preset name (fields not given keep the defaults, i.e. Flux.1)."""

FLUX_GRANULARITIES = ("block",)
"""Gradient checkpointing granularities of FluxTransformer: each double and single block."""


# ---- latents <-> tokens ------------------------------------------------------------------------
def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, H, W) -> tokens (B, H/2 * W/2, C * 4): each 2x2 patch one token, tokens in
    row-major order, channels ordered (c, patch row, patch col). H and W must be even."""
    if z.ndim != 4 or z.shape[-2] % PATCH or z.shape[-1] % PATCH:
        raise ValueError(f"pack_latents: expected latents (B, C, H, W) with even H and W, got {tuple(z.shape)}")
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return z.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: tokens (B, H/2 * W/2, C * 4) -> latents (B, C, H, W), with
    height/width the latent H and W (even)."""
    if height % PATCH or width % PATCH:
        raise ValueError(f"unpack_latents: latent height/width must be even, got {height}x{width}")
    gh, gw = height // PATCH, width // PATCH
    if x.ndim != 3 or x.shape[1] != gh * gw or x.shape[2] % (PATCH * PATCH):
        raise ValueError(f"unpack_latents: expected (B, {gh * gw}, 4 * C) tokens for {height}x{width} latents, "
                         f"got {tuple(x.shape)}")
    b, _, ch = x.shape
    c = ch // (PATCH * PATCH)
    x = x.reshape(b, gh, gw, c, PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(batch: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids of the packed tokens of (height, width) latents: (batch, H/2 * W/2, 3) with
    rows (0, patch row, patch column), in `pack_latents` order."""
    if height % PATCH or width % PATCH:
        raise ValueError(f"image_ids: latent height/width must be even, got {height}x{width}")
    gh, gw = height // PATCH, width // PATCH
    ids = torch.zeros(gh, gw, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(gh, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(gw, device=device, dtype=dtype)[None, :]
    return ids.reshape(1, gh * gw, 3).expand(batch, -1, -1)


def text_ids(batch: int, tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids of the text tokens: all zero (batch, tokens, 3); text gets no rotary offset."""
    return torch.zeros(batch, tokens, 3, device=device, dtype=dtype)


# ---- the model ---------------------------------------------------------------------------------
class FluxTransformer(nn.Module):
    """Flux.1 denoiser: predicts the flow velocity (noise - data) of packed latent tokens.

    forward(img (B, L, in_channels), img_ids (B, L, 3), txt (B, T, context_in_dim), txt_ids (B, T, 3),
    timesteps (B,) or scalar in [0, 1] (1 = pure noise), y (B, vec_in_dim), guidance (B,) or scalar
    | None) -> (B, L, out_channels) in img's dtype. Ids may also be given once for the batch,
    (1, L, 3) or (L, 3). `guidance` is required when config.guidance_embed (dev) and ignored
    otherwise (schnell), as in the reference sampler.

    Parameters get PyTorch's default initialisation; real use loads a checkpoint.
    Pass ``device="meta"`` (or build under ``torch.device("meta")``) to allocate nothing.
    """

    def __init__(self, config: FluxConfig, *, device=None, dtype=None):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        fk = {"device": device, "dtype": dtype}
        hidden = c.hidden_size
        self.pe_embedder = EmbedND(c.axes_dim, c.theta)
        self.img_in = nn.Linear(c.in_channels, hidden, **fk)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, hidden, **fk)
        self.vector_in = MLPEmbedder(c.vec_in_dim, hidden, **fk)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, hidden, **fk)
        self.txt_in = nn.Linear(c.context_in_dim, hidden, **fk)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, c.num_heads, c.mlp_ratio, c.qkv_bias, **fk) for _ in range(c.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, c.num_heads, c.mlp_ratio, **fk) for _ in range(c.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, c.out_channels, **fk)
        self._checkpointing = None

    # -- properties -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (of the first layer: the model is kept in one dtype, or quantized
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

    def blocks(self) -> list[nn.Module]:
        """The double blocks then the single blocks, in forward order."""
        return [*self.double_blocks, *self.single_blocks]

    def set_gradient_checkpointing(self, enabled: bool = True, granularity: str = "block", context_fn=None) -> None:
        """Recompute each double and single block's activations in backward instead of storing them.

        Applies whenever autograd records the forward, in train or eval mode; inference under
        ``torch.no_grad()`` is unaffected. granularity: "block" (the only one, see
        FLUX_GRANULARITIES). context_fn: passed to ``torch.utils.checkpoint.checkpoint`` for every
        block, e.g. a selective-checkpointing policy. ``enabled=False`` turns it off.
        """
        if granularity not in FLUX_GRANULARITIES:
            raise ValueError(f"FluxTransformer.set_gradient_checkpointing: granularity {granularity!r} "
                             f"not in {FLUX_GRANULARITIES}")
        on = bool(enabled)
        for block in self.blocks():
            block.gradient_checkpointing = on
            block.checkpoint_context_fn = context_fn if on else None
        self._checkpointing = granularity if on else None

    def compile_blocks(self, **compile_kwargs) -> int:
        """`torch.compile` every double and single block in place; returns how many.

        In place (`nn.Module.compile`), so parameter names, state dicts and LoRA export are
        unchanged; call it after injecting LoRA (graphs are traced at the first forward).
        """
        blocks = self.blocks()
        for block in blocks:
            block.compile(**compile_kwargs)
        return len(blocks)

    # -- forward ----------------------------------------------------------------------------------
    def _ids(self, ids: torch.Tensor, b: int, n: int, name: str) -> torch.Tensor:
        axes = len(self.config.axes_dim)
        if ids is not None and ids.ndim == 2:
            ids = ids[None]
        if ids is None or ids.ndim != 3 or ids.shape[0] not in (1, b) or ids.shape[1:] != (n, axes):
            got = None if ids is None else tuple(ids.shape)
            raise ValueError(f"FluxTransformer: {name} must be ({b}, {n}, {axes}) position ids "
                             f"(see image_ids / text_ids), got {got}")
        return ids

    def _scalar_per_sample(self, value, b: int, device, name: str) -> torch.Tensor:
        value = torch.as_tensor(value, device=device)
        if value.ndim == 0 or value.shape == (1,):
            value = value.reshape(1).expand(b)
        if value.shape != (b,):
            raise ValueError(f"FluxTransformer: {name} must be a scalar or shape ({b},), got {tuple(value.shape)}")
        return value

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor | float,
        y: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        c = self.config
        if img.ndim != 3 or img.shape[2] != c.in_channels:
            raise ValueError(f"FluxTransformer: img must be (B, L, {c.in_channels}) packed latents "
                             f"(see pack_latents), got {tuple(img.shape)}")
        b, n_img = img.shape[:2]
        if txt is None or txt.ndim != 3 or txt.shape[0] != b or txt.shape[2] != c.context_in_dim:
            raise ValueError(f"FluxTransformer: txt must be ({b}, T, {c.context_in_dim}), "
                             f"got {None if txt is None else tuple(txt.shape)}")
        if y is None or y.shape != (b, c.vec_in_dim):
            raise ValueError(f"FluxTransformer: y must be ({b}, {c.vec_in_dim}) pooled text, "
                             f"got {None if y is None else tuple(y.shape)}")
        img_ids = self._ids(img_ids, b, n_img, "img_ids")
        txt_ids = self._ids(txt_ids, b, txt.shape[1], "txt_ids")
        timesteps = self._scalar_per_sample(timesteps, b, img.device, "timesteps")

        # The network computes in img's dtype (the parameters' or autocast's); the sinusoidal
        # embeddings, RMSNorm and RoPE in float32.
        dtype = img.dtype
        vec = self.time_in(flux_timestep_embedding(timesteps).to(dtype))
        if c.guidance_embed:
            if guidance is None:
                raise ValueError("FluxTransformer: this model is guidance-distilled (guidance_embed=True); "
                                 "pass guidance, the guidance scale per sample (e.g. 3.5)")
            guidance = self._scalar_per_sample(guidance, b, img.device, "guidance")
            vec = vec + self.guidance_in(flux_timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))

        img = self.img_in(img)
        txt = self.txt_in(txt.to(dtype))
        if img_ids.shape[0] != txt_ids.shape[0]:
            img_ids, txt_ids = img_ids.expand(b, -1, -1), txt_ids.expand(b, -1, -1)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, n_txt:], vec)
