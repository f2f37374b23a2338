"""KL autoencoder (the Stable Diffusion "VAE") with the original ldm single-file parameter names.

Images are (B, 3, H, W) in [-1, 1]; latents are (B, z_channels, H/f, W/f) with f = 2**(len(ch_mult)-1)
(8 for every real model). `encode` returns a `DiagonalGaussian` over UNSCALED latents and `decode`
takes unscaled latents: the diffusion model works on `(z - shift_factor) * scaling_factor`
(`scale_latents` / `unscale_latents`).

The Flux.1 VAE (`flux` preset) is the same network with 16 latent channels, without the 1x1
`quant_conv` / `post_quant_conv` (`use_quant_conv=False`) and with a latent shift; BFL's
`ae.safetensors` uses these parameter names with no prefix.

Precision: the SDXL VAE overflows in fp16 inside the decoder (activations exceed 65504), so its
preset sets `force_upcast=True`, which makes `decode` (and `encode`) compute in fp32 whatever the
parameter dtype, returning the input dtype. Layers cast their weights to the activation dtype on
the fly, so upcasting copies one layer's weights at a time instead of the whole model.

Parameter names follow the ldm layout (`encoder.down.N.block.M.conv1`, `encoder.mid.attn_1.q`, ...),
so a `first_stage_model.*` state dict loads with the prefix stripped and nothing renamed. The
attention projections are 1x1 `Conv2d`s with 4-D weights, as stored in single-file checkpoints.
The decoder's `up` list is indexed by resolution level: `decoder.up.0` is the full-resolution
level, and it runs last.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["VAEConfig", "AutoencoderKL", "DiagonalGaussian"]


@dataclass(frozen=True)
class VAEConfig:
    """Shape and latent-space constants of an `AutoencoderKL`. Defaults are the SDXL VAE."""

    in_channels: int = 3
    """Image channels fed to the encoder."""
    out_channels: int = 3
    """Image channels produced by the decoder."""
    ch: int = 128
    """Base width; level i has `ch * ch_mult[i]` channels."""
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Width multiplier per resolution level; each level but the last halves H and W in the encoder."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (the decoder has one more per level, as in ldm)."""
    z_channels: int = 4
    """Latent channels."""
    double_z: bool = True
    """Encoder outputs mean and log-variance (2 * z_channels); must be True for a KL autoencoder."""
    norm_num_groups: int = 32
    """GroupNorm groups in every norm layer."""
    norm_eps: float = 1e-6
    """GroupNorm epsilon."""
    scaling_factor: float = 0.13025
    """Latents given to the diffusion model are `(z - shift_factor) * scaling_factor`."""
    shift_factor: float | None = None
    """Optional latent offset (None = 0 for SD1.5/SD2/SDXL)."""
    force_upcast: bool = True
    """Default of `upcast` in encode/decode: compute in fp32 whatever the parameter dtype."""
    use_quant_conv: bool = True
    """Whether the 1x1 `quant_conv` (after the encoder) and `post_quant_conv` (before the decoder)
    exist: True for SD1.5/SD2/SDXL, False for the Flux.1 VAE."""

    def __post_init__(self):
        def bad(name: str, why: str):
            raise ValueError(f"VAEConfig.{name}={getattr(self, name)!r}: {why}")

        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "z_channels", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                bad(name, "must be a positive integer")
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            bad("ch_mult", "must be a non-empty tuple of positive integers, e.g. (1, 2, 4, 4)")
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_num_groups:
                bad("norm_num_groups", f"must divide every level width; ch*{m}={self.ch * m} is not a multiple")
        if not self.double_z:
            bad("double_z", "a KL autoencoder encodes mean and log-variance; set double_z=True")
        if not self.scaling_factor > 0:
            bad("scaling_factor", "must be > 0 (0.13025 for SDXL, 0.18215 for SD1.5/SD2, 0.3611 for Flux.1)")
        if not isinstance(self.use_quant_conv, bool):
            bad("use_quant_conv", "must be True or False")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for every real model)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def preset(cls, name: str, **overrides) -> "VAEConfig":
        """Named configuration: "sdxl", "sd15", "sd2", "flux", "tiny", "toy" or "tiny-flux"; `overrides` replace fields."""
        if name not in _PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; valid names: {', '.join(sorted(_PRESETS))}")
        return replace(_PRESETS[name], **overrides)


_PRESETS = {
    "sdxl": VAEConfig(scaling_factor=0.13025, force_upcast=True),
    "sd15": VAEConfig(scaling_factor=0.18215, force_upcast=False),
    "sd2": VAEConfig(scaling_factor=0.18215, force_upcast=False),
    # Test-size model that keeps the real 8x downsampling and 4 latent channels.
    "tiny": VAEConfig(
        ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_num_groups=8, scaling_factor=0.13025, force_upcast=False
    ),
    # The shipped toy model's VAE (`toy-sdxl`): 4x downsampling, so 64 px images give 16x16 latents
    # (an 8x8 grid cannot hold a star's points), 4 latent channels like SDXL's.
    "toy": VAEConfig(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=8, scaling_factor=0.13025, force_upcast=False
    ),
    # Flux.1 dev/schnell `ae.safetensors`; force_upcast as in its published diffusers config.
    "flux": VAEConfig(
        z_channels=16, use_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True
    ),
    # Test-size Flux VAE: 16 latent channels, no quant convs, the real latent constants.
    "tiny-flux": VAEConfig(
        ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_num_groups=8, z_channels=16, use_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159, force_upcast=False,
    ),
}


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` whose weights are cast to the input dtype (a no-op unless upcasting)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` whose affine parameters are cast to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class ResnetBlock(nn.Module):
    """norm1-SiLU-conv1-norm2-SiLU-conv2 plus a skip (1x1 `nin_shortcut` when widths differ).

    (B, in_ch, H, W) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = GroupNorm(cfg.norm_num_groups, in_ch, eps=cfg.norm_eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(cfg.norm_num_groups, out_ch, eps=cfg.norm_eps)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual. (B, C, H, W) -> same."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm = GroupNorm(cfg.norm_num_groups, channels, eps=cfg.norm_eps)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        # Token-major (B, H*W, C) projections: every fused CUDA attention kernel (flash,
        # memory-efficient, cuDNN) needs q/k/v with a contiguous last dimension; channel-major
        # views would send SDPA to its math kernel, which holds (H*W)^2 scores (1 GiB fp32 for
        # the SDXL VAE at 1024 px).
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (_pointwise(conv, tokens).unsqueeze(1) for conv in (self.q, self.k, self.v))  # (B, 1, N, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = _pointwise(self.proj_out, out).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + out


def _pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to (B, N, C_in) tokens -> (B, N, C_out), contiguous."""
    weight = conv.weight.to(tokens.dtype).flatten(1)
    return F.linear(tokens, weight, None if conv.bias is None else conv.bias.to(tokens.dtype))


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one (ldm's asymmetric padding), then 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks) and an optional `downsample` / `upsample`."""

    def __init__(self, blocks: list[nn.Module], resample_name: str | None = None, resample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample_name is not None:
            self.add_module(resample_name, resample)


class _MidBlock(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg)


def _run(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f) before `quant_conv` (if any)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
        self.down = nn.ModuleList()
        for level in range(len(cfg.ch_mult)):
            c_in, c_out = widths[level], widths[level + 1]
            blocks = [ResnetBlock(c_in if i == 0 else c_out, c_out, cfg) for i in range(cfg.num_res_blocks)]
            last = level == len(cfg.ch_mult) - 1
            self.down.append(_Level(blocks, None if last else "downsample", None if last else Downsample(c_out)))
        self.mid = _MidBlock(widths[-1], cfg)
        self.norm_out = GroupNorm(cfg.norm_num_groups, widths[-1], eps=cfg.norm_eps)
        self.conv_out = Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = _run(block, h, ckpt)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = _run(block, h, ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) after `post_quant_conv` (if any) -> images (B, out_channels, f*h, f*w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = _MidBlock(top, cfg)
        levels: list[_Level] = []
        c_in = top
        # Built from the lowest resolution up, then stored so that up[0] is full resolution.
        for level in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[level]
            blocks = [ResnetBlock(c_in if i == 0 else c_out, c_out, cfg) for i in range(cfg.num_res_blocks + 1)]
            c_in = c_out
            first = level == 0
            levels.append(_Level(blocks, None if first else "upsample", None if first else Upsample(c_out)))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = GroupNorm(cfg.norm_num_groups, c_in, eps=cfg.norm_eps)
        self.conv_out = Conv2d(c_in, cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = self.conv_in(z)
        for block in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = _run(block, h, ckpt)
        for level in reversed(self.up):
            for block in level.block:
                h = _run(block, h, ckpt)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) over unscaled latents.

    `moments` is (B, 2*C, h, w): mean then log-variance along dim 1. `mean`, `logvar`, `std`, `var`
    are (B, C, h, w); `logvar` is clamped to [-30, 20] as in the reference implementation.
    """

    def __init__(self, moments: torch.Tensor):
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise ValueError(f"DiagonalGaussian: moments must be (B, 2*C, h, w), got {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """`mean + std * eps`, eps ~ N(0, 1) drawn in fp32 (then cast) so fp16/bf16 latents match fp32 draws.

        The noise is drawn on the generator's device when one is given (so a CPU generator gives the
        same latents on every device), otherwise on the tensor's device.
        """
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The mean (the most likely latent), (B, C, h, w)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over C, h, w: shape (B,), in nats."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """The SD/SDXL/Flux VAE. Construct under `torch.device("meta")` (or `device="meta"`) to allocate nothing.

    `quant_conv` / `post_quant_conv` are None when `config.use_quant_conv` is False (Flux.1).
    """

    def __init__(self, config: VAEConfig | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config if config is not None else VAEConfig()
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        with ctx:
            self.encoder = Encoder(self.config)
            z = self.config.z_channels
            self.quant_conv = Conv2d(2 * z, 2 * z, 1) if self.config.use_quant_conv else None
            self.post_quant_conv = Conv2d(z, z, 1) if self.config.use_quant_conv else None
            self.decoder = Decoder(self.config)
        if dtype is not None:
            self.to(dtype=dtype)

    # ----------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResNet/attention block in backward instead of storing its activations."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE latents -> diffusion-model latents: `(z - shift) * scaling_factor`."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-model latents -> unscaled VAE latents (inverse of `scale_latents`)."""
        return z / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def _compute(self, fn, x: torch.Tensor, upcast: bool | None) -> torch.Tensor:
        """Run `fn` in fp32 (upcast) or in the parameter dtype; return the input dtype."""
        upcast = self.config.force_upcast if upcast is None else upcast
        if upcast:
            # An enclosing autocast would push the convolutions back to half precision.
            no_autocast = (
                torch.autocast(x.device.type, enabled=False)
                if x.device.type in ("cpu", "cuda", "xpu", "mps")
                else contextlib.nullcontext()
            )
            with no_autocast:
                out = fn(x.float())
        else:
            out = fn(x.to(self.dtype))
        return out.to(x.dtype)

    def _check(self, x: torch.Tensor, what: str, channels: int, multiple: int) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected (B, {channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"AutoencoderKL.{what}: height and width must be multiples of {multiple}, got "
                f"{tuple(x.shape[-2:])}; resize or crop the input"
            )
        if not x.is_floating_point():
            raise ValueError(f"AutoencoderKL.{what}: expected a floating-point tensor, got {x.dtype}")

    # ----------------------------------------------------------------- public
    def encode(
        self, images: torch.Tensor, upcast: bool | None = None, tile_size: int | None = None, tile_overlap: float = 0.25
    ) -> DiagonalGaussian:
        """Images (B, in_channels, H, W) in [-1, 1] -> posterior over unscaled latents (B, z, H/f, W/f).

        H and W must be multiples of f = `config.downsample_factor`. `upcast` (default
        `config.force_upcast`) computes in fp32; the moments come back in the images' dtype.
        `tile_size` (image pixels, multiple of f) encodes overlapping tiles and blends them, bounding
        memory for large images; images that fit in one tile are encoded exactly as untiled.
        """
        f = self.config.downsample_factor
        self._check(images, "encode", self.config.in_channels, f)

        def run(x: torch.Tensor) -> torch.Tensor:
            moments = self.encoder(x)
            return moments if self.quant_conv is None else self.quant_conv(moments)

        fn = run
        if tile_size is not None:
            _check_tiling("encode", tile_size, tile_overlap, f)
            fn = _tiled(run, tile_size, tile_overlap, f, 1 / f)
        return DiagonalGaussian(self._compute(fn, images, upcast))

    def decode(
        self, latents: torch.Tensor, upcast: bool | None = None, tile_size: int | None = None, tile_overlap: float = 0.25
    ) -> torch.Tensor:
        """Unscaled latents (B, z_channels, h, w) -> images (B, out_channels, f*h, f*w), roughly in [-1, 1].

        The SDXL VAE must decode in fp32 (fp16 overflows): `upcast` (default `config.force_upcast`,
        True for SDXL) computes in fp32 whatever the parameter dtype and returns the latents' dtype.
        `tile_size` (image pixels, multiple of f) decodes overlapping tiles blended linearly across
        the overlap; outputs within one tile equal the untiled decode.
        """
        f = self.config.downsample_factor
        self._check(latents, "decode", self.config.z_channels, 1)

        def run(z: torch.Tensor) -> torch.Tensor:
            return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

        fn = run
        if tile_size is not None:
            _check_tiling("decode", tile_size, tile_overlap, f)
            fn = _tiled(run, tile_size // f, tile_overlap, 1, f)
        return self._compute(fn, latents, upcast)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction: decode(encode(images).sample(generator)), (B, C, H, W) -> same."""
        return self.decode(self.encode(images).sample(generator))


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, length) with full tiles; the last one is flush with the end."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def _axis_weights(starts: list[int], tile: int, size: int, scale: float, device) -> list[torch.Tensor]:
    """Per-tile 1-D blend weights along one axis (output units): a linear ramp across each overlap
    with a neighbouring tile, 1 elsewhere, so that neighbouring ramps sum to one."""
    weights = []
    n = round(min(tile, size) * scale)
    for i, start in enumerate(starts):
        w = torch.ones(n, device=device, dtype=torch.float32)
        if i > 0:
            ov = round((starts[i - 1] + tile - start) * scale)
            w[:ov] = torch.minimum(w[:ov], torch.arange(1, ov + 1, device=device) / (ov + 1))
        if i < len(starts) - 1:
            ov = round((start + tile - starts[i + 1]) * scale)
            w[n - ov :] = torch.minimum(w[n - ov :], torch.arange(ov, 0, -1, device=device) / (ov + 1))
        weights.append(w)
    return weights


def _tiled(fn, tile: int, overlap_frac: float, multiple: int, scale: float):
    """Wrap `fn` ((B, C, t, t) -> (B, C', t*scale, t*scale)) to run on overlapping tiles of side `tile`.

    `tile` and the overlap are in input units and multiples of `multiple`, so that tile origins map
    to whole output pixels. Tiles are averaged with the `_axis_weights` ramps, which hides seams.
    Inputs no larger than one tile go through `fn` unchanged.
    """
    overlap = int(tile * overlap_frac) // multiple * multiple
    stride = tile - overlap

    def run(x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height <= tile and width <= tile:
            return fn(x)
        rows, cols = _tile_starts(height, tile, stride), _tile_starts(width, tile, stride)
        wys = _axis_weights(rows, tile, height, scale, x.device)
        wxs = _axis_weights(cols, tile, width, scale, x.device)
        out = weight = None
        for r, wy in zip(rows, wys):
            for c, wx in zip(cols, wxs):
                piece = fn(x[..., r : r + tile, c : c + tile])
                w2 = (wy[:, None] * wx[None, :]).to(piece.dtype)
                if out is None:
                    size = (round(height * scale), round(width * scale))
                    out, weight = piece.new_zeros((*piece.shape[:2], *size)), piece.new_zeros(size)
                oy, ox = round(r * scale), round(c * scale)
                th, tw = piece.shape[-2:]
                out[..., oy : oy + th, ox : ox + tw] += piece * w2
                weight[oy : oy + th, ox : ox + tw] += w2
        return out / weight

    return run


def _check_tiling(what: str, tile_size: int, tile_overlap: float, f: int) -> None:
    if not isinstance(tile_size, int) or tile_size < f or tile_size % f:
        raise ValueError(f"AutoencoderKL.{what}: tile_size={tile_size!r} must be a positive multiple of {f} pixels")
    if not 0.0 <= tile_overlap < 1.0:
        raise ValueError(f"AutoencoderKL.{what}: tile_overlap={tile_overlap!r} must be in [0, 1)")
