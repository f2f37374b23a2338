"""`LoRAOptions`: which layers get low-rank adapters and their shape.

One object serves as the `lora` section of a training config (its fields are the YAML keys), as
the `options` of `models.inject_lora`, and as the record a `LoRANetwork` keeps of how it was built
(written to the file metadata). This module imports no torch, so configs are read and checked
without it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

UNetPreset = Literal["attn", "kohya", "locon", "attn-mlp", "attn-mlp-mod"]
"""Denoiser target presets (`models.lora.names.UNET_PRESETS` selects their layers): `attn`, `kohya`,
`locon` for UNets; `attn`, `attn-mlp`, `attn-mlp-mod` for the Flux transformer."""
TextEncoderPreset = Literal["te"]
"""Text-encoder target presets (`models.lora.names.TEXT_ENCODER_PRESETS`)."""
Algo = Literal["lora", "loha", "lokr"]
"""Adapter algorithms (`models.lora.network.ALGOS`): low-rank pair, Hadamard product of two
low-rank pairs (LyCORIS LoHa), Kronecker product (LyCORIS LoKr)."""


@dataclass
class LoRAOptions:
    """Which layers get low-rank adapters and their shape (see `models.inject_lora`)."""

    algo: Algo = "lora"
    """Adapter algorithm: `lora` (up @ down; LoCon on 3x3 convs), `loha` (LyCORIS LoHa:
    (w1a @ w1b) * (w2a @ w2b) * alpha/rank), `lokr` (LyCORIS LoKr: kron(w1, w2) * scale). LoHa/LoKr
    files are written in LyCORIS's kohya-style names, which ComfyUI and A1111/Forge read."""
    preset: UNetPreset | None = "kohya"
    """Denoiser targets. UNet (SD1.5/SD2/SDXL): `attn` (q/k/v/out of every attention), `kohya` (every
    Linear / 1x1 conv in the transformer blocks), `locon` (kohya + ResBlocks and up/downsampling
    convs). Flux transformer: `attn` (double blocks' img/txt attention qkv and proj, single blocks'
    linear1/linear2, which fuse attention with the MLP), `attn-mlp` (+ double blocks' MLPs),
    `attn-mlp-mod` (+ the modulation layers: every Linear of the blocks, kohya sd-scripts' Flux
    default). null = no denoiser adapters (text encoders only)."""
    targets: list[str] | None = None
    """Regexes on denoiser module paths (e.g. `attn2\\.to_k`, Flux `img_attn\\.qkv`); replaces `preset` when set."""
    include: list[str] = field(default_factory=list)
    """Keep only modules whose `<component>.<path>` matches one of these regexes (components
    `unet` (the denoiser), `te` or `te1`/`te2` (SDXL) or `te1`/`te3` (Flux: CLIP-L, T5))."""
    exclude: list[str] = field(default_factory=list)
    """Drop modules whose `<component>.<path>` matches one of these regexes."""
    rank: int = 16
    """Rank r of Linear and 1x1-conv adapters."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank. null = rank (scale 1)."""
    conv_rank: int | None = None
    """Rank of 3x3-conv adapters (preset `locon`); null = rank."""
    conv_alpha: float | None = None
    """Alpha of 3x3-conv adapters; null = conv_rank."""
    dropout: float = 0.0
    """Dropout on the rank-r activations during training (algo `lora` only)."""
    rank_dropout: float = 0.0
    """Probability of zeroing whole rank channels per sample during training (rescaled by 1/(1-p));
    LoHa/LoKr: of zeroing whole output rows of the update per step (LyCORIS, not rescaled)."""
    module_dropout: float = 0.0
    """Probability of skipping a whole adapter per step during training."""
    text_encoders: str | list[str] | None = "te"
    """Text-encoder targets (`te` = attention and MLP Linears: CLIP q/k/v/out_proj, fc1, fc2; T5 q/k/v/o,
    wi_0, wi_1, wo; or regexes), used when
    `train.train_text_encoders` is true; null = no text-encoder adapters."""
    text_encoder_rank: int | None = None
    """Rank of text-encoder adapters; null = rank."""
    text_encoder_alpha: float | None = None
    """Alpha of text-encoder adapters; null = alpha (or their rank)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): also learn a per-input-channel magnitude (algo `lora` only)."""
    factor: int = -1
    """LoKr: how each dimension n splits into n = f1 * f2 (f1 <= f2, LyCORIS `factorization`):
    (factor, n / factor) when `factor` divides n, else the most square split with f1 <= factor;
    -1 = the most square split. w1 is (out f1, in f1), w2 (out f2, in f2)."""
    decompose_both: bool = False
    """LoKr: also make w1 low rank (w1_a @ w1_b) when rank < max(w1 dims) / 2."""
    use_tucker: bool = False
    """3x3 convs get a Tucker/CP core: LoRA `lora_mid`, LoHa `hada_t1`/`hada_t2`, LoKr `lokr_t2`
    (when its w2 is low rank) instead of flattening the kernel into the input dimension."""
    block_ranks: list[int] | None = None
    """Per-block rank of UNet Linear and 1x1-conv adapters: one value per block IN00.., MID, OUT00..
    (25 for SD1.5/SD2, 19 for SDXL; see configs/README.md "UNet blocks"); 0 = no adapter in that
    block; null = `rank` everywhere."""
    block_alphas: list[float] | None = None
    """Per-block alpha to go with `block_ranks`; null = `alpha` (or each block's rank)."""
    conv_block_ranks: list[int] | None = None
    """Per-block rank of 3x3-conv adapters (as `block_ranks`); null = `conv_rank` everywhere."""
    conv_block_alphas: list[float] | None = None
    """Per-block alpha to go with `conv_block_ranks`; null = `conv_alpha` (or each block's rank)."""

    # ---- resolved values -------------------------------------------------------------------------
    @property
    def unet_targets(self) -> str | list[str] | None:
        """What selects UNet layers: `targets` when set, else `preset` (None = no UNet adapters)."""
        return self.targets if self.targets is not None else self.preset

    def linear_shape(self) -> tuple[int, float]:
        """(rank, alpha) of UNet Linear and 1x1-conv adapters."""
        return self.rank, float(self.rank if self.alpha is None else self.alpha)

    def conv_shape(self) -> tuple[int, float]:
        """(rank, alpha) of 3x3-conv adapters."""
        rank = self.rank if self.conv_rank is None else self.conv_rank
        return rank, float(rank if self.conv_alpha is None else self.conv_alpha)

    def text_encoder_shape(self) -> tuple[int, float]:
        """(rank, alpha) of text-encoder adapters."""
        rank = self.rank if self.text_encoder_rank is None else self.text_encoder_rank
        if self.text_encoder_alpha is not None:
            return rank, float(self.text_encoder_alpha)
        return rank, float(self.alpha if self.alpha is not None else rank)

    # ---- validation --------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ValueError `<field>: <problem>` for an out-of-range value or an invalid regex."""
        for name in ("rank", "conv_rank", "text_encoder_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        for name in ("alpha", "conv_alpha", "text_encoder_alpha"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be > 0 (or null), got {value}")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {value}")
        self._check_algo()
        for name in ("block_ranks", "block_alphas", "conv_block_ranks", "conv_block_alphas"):
            values = getattr(self, name)
            low = 0 if name.endswith("ranks") else 1e-30  # rank 0 = no adapter; alphas must be > 0
            if values is not None and (not values or min(values) < low):
                raise ValueError(f"{name}: needs one value per UNet block, each {'>= 0' if low == 0 else '> 0'}, "
                                 f"got {values}")
        if self.targets is not None and not self.targets:
            raise ValueError("targets: is an empty list; give regexes or null to use preset")
        text = self.text_encoders
        if isinstance(text, str) and text not in get_args(TextEncoderPreset):
            presets = ", ".join(get_args(TextEncoderPreset))
            _check_regex("text_encoders", text, f"{text!r} is neither a preset ({presets}) nor a valid regex")
        for name in ("targets", "include", "exclude", "text_encoders"):
            items = getattr(self, name)
            for i, pattern in enumerate(items if isinstance(items, list) else []):
                _check_regex(f"{name}[{i}]", pattern, f"invalid regex {pattern!r}")

    def _check_algo(self) -> None:
        """The combinations of `algo` with dora / dropout / factor / decompose_both that exist."""
        algos = get_args(Algo)
        if self.algo not in algos:
            raise ValueError(f"algo: must be one of {', '.join(algos)}, got {self.algo!r}")
        if self.factor == 0 or self.factor < -1:
            raise ValueError(f"factor: must be -1 (most square split) or >= 1, got {self.factor}")
        if self.algo != "lokr" and (self.factor != -1 or self.decompose_both):
            name = "factor" if self.factor != -1 else "decompose_both"
            raise ValueError(f"{name}: shapes LoKr adapters only, but algo is {self.algo}; remove it or set algo: lokr")
        if self.algo == "lora":
            return
        if self.dora:
            raise ValueError(f"dora: DoRA is available with algo lora only, not {self.algo}; "
                             "set dora: false or algo: lora")
        if self.dropout:
            raise ValueError(f"dropout: {self.algo} has no dropout on hidden activations (LyCORIS defines none); "
                             "set dropout: 0 and use rank_dropout or module_dropout")


def _check_regex(where: str, pattern: str, problem: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: {problem}: {exc}") from None
