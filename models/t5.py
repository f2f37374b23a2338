"""T5 v1.1 text encoder (the encoder half of T5, as used by Flux.1: google/t5-v1_1-xxl).

Parameter names follow the Hugging Face `T5EncoderModel` layout, which is also how Flux text
encoder files (diffusers `text_encoder_2/`, ComfyUI `t5xxl_*.safetensors`) store it:

    shared.weight                                             (vocab, d_model) token embedding
    encoder.embed_tokens.weight                               the same tensor (tied; either name loads)
    encoder.block.N.layer.0.layer_norm.weight                 (d_model,) RMS norm before attention
    encoder.block.N.layer.0.SelfAttention.{q,k,v}.weight      (heads*d_kv, d_model), no bias
    encoder.block.N.layer.0.SelfAttention.o.weight            (d_model, heads*d_kv)
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   (buckets, heads), block 0 only
    encoder.block.N.layer.1.layer_norm.weight                 (d_model,) RMS norm before the feed-forward
    encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1}.weight (d_ff, d_model) gate / linear branch
    encoder.block.N.layer.1.DenseReluDense.wo.weight          (d_model, d_ff)
    encoder.final_layer_norm.weight                           (d_model,)

    enc = T5Encoder(T5Config.preset("t5-xxl"))
    hidden = enc(input_ids, attention_mask)   # (B, T) int64 [, (B, T) 0/1] -> (B, T, 4096)

T5 specifics: pre-norm blocks with an RMS norm (no mean, no bias) computed in fp32; attention
scores are NOT scaled by 1/sqrt(d_kv); positions enter only through a learned bias per head and
relative-distance bucket, computed once from block 0's table and added in every block. In fp16 the
residual stream is clamped below the fp16 maximum after each sub-layer, as transformers does; the
feed-forward output projection `wo` may be kept in fp32 in an fp16 model (transformers loads T5 that
way in fp16), in which case its input is cast to fp32 and the residual stream continues in fp32.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .quant.model import compute_dtype

__all__ = [
    "T5_EMBEDDING_KEYS",
    "T5Config",
    "T5Encoder",
    "fill_tied_embedding",
    "relative_position_buckets",
    "t5_config_from_transformers",
    "t5_config_to_transformers",
]

T5_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
"""The two names of the (tied) token embedding; a checkpoint may hold either or both."""


@dataclass
class T5Config:
    """Shape of a T5 v1.1 encoder (gated-GELU feed-forward, no biases, relative position bias)."""

    d_model: int = 4096
    """Width of the residual stream."""
    d_kv: int = 64
    """Width of one attention head; the attention inner width is `num_heads * d_kv`."""
    d_ff: int = 10240
    """Hidden width of the gated feed-forward (`wi_0` / `wi_1` outputs)."""
    num_layers: int = 24
    """Number of encoder blocks."""
    num_heads: int = 64
    """Attention heads."""
    vocab_size: int = 32128
    """Token embedding rows (32000 SentencePiece pieces + 100 sentinels, padded to 32128)."""
    relative_attention_num_buckets: int = 32
    """Buckets of the relative position bias (half per direction: the encoder is bidirectional)."""
    relative_attention_max_distance: int = 128
    """Distances (tokens) at or beyond which relative positions share the last bucket."""
    layer_norm_epsilon: float = 1e-6
    """Epsilon of the RMS norms."""
    pad_token_id: int = 0
    """`<pad>` id (what the tokenizer pads with)."""
    eos_token_id: int = 1
    """`</s>` id (the tokenizer appends it to every prompt)."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise ValueError(
                f"T5Config.relative_attention_num_buckets must be an even int >= 4 (half per direction, "
                f"half of those exact), got {self.relative_attention_num_buckets}"
            )
        # Distances below num_buckets/4 get exact buckets; the log-spaced ones need a larger maximum.
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(
                f"T5Config.relative_attention_max_distance ({self.relative_attention_max_distance}) must exceed "
                f"relative_attention_num_buckets / 4 ({self.relative_attention_num_buckets // 4})"
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"T5Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        for name in ("pad_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"T5Config.{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"
                )

    @property
    def inner_dim(self) -> int:
        """Width of q/k/v: `num_heads * d_kv`."""
        return self.num_heads * self.d_kv

    @classmethod
    def preset(cls, name: str, **overrides) -> T5Config:
        """Named configurations: `t5-xxl` (Flux.1, 4.76 B parameters), `tiny-t5` (tests)."""
        try:
            kwargs = _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown T5 preset {name!r}; known presets: {', '.join(_PRESETS)}") from None
        return cls(**{**kwargs, **overrides})


_PRESETS: dict[str, dict] = {
    # google/t5-v1_1-xxl encoder: the Flux.1 dev/schnell `text_encoder_2`.
    "t5-xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    # Test size; the vocabulary stays full-size so real tokenizer ids are valid, and the relative
    # distance limit is short so test sequences reach the shared last bucket.
    "tiny-t5": dict(d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_max_distance=20),
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bidirectional T5 bucket of every (query i, key j) pair: (length, length) int64 in [0, num_buckets).

    Half of the buckets are for keys after the query (j > i). Within each half, distances below a
    quarter of `num_buckets` have a bucket each; larger ones are log-spaced up to `max_distance`,
    beyond which they share the last bucket.
    """
    positions = torch.arange(length, dtype=torch.long, device=device)
    relative = positions[None, :] - positions[:, None]  # key - query
    half = num_buckets // 2
    buckets = (relative > 0).to(torch.long) * half
    distance = relative.abs()
    exact = half // 2
    # Same float operations as the reference (log, divide, truncate), so boundary distances agree.
    far = exact + (
        torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.long)
    far = torch.clamp(far, max=half - 1)
    return buckets + torch.where(distance < exact, distance, far)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 only: clamp to just below the fp16 maximum (further below once an inf appeared), so the
    next norm sees finite values."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class T5LayerNorm(nn.Module):
    """RMS norm (no mean subtraction, no bias), statistics in fp32. (..., D) -> (..., D)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)  # promoted to fp32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head self-attention without score scaling; the position bias (and mask) comes in as
    an additive (1 or B, H, T, T) tensor. Block 0 also owns `relative_attention_bias`."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        inner = config.inner_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            n = config.relative_attention_num_buckets
            self.relative_attention_bias = nn.Embedding(n, config.num_heads, _weight=torch.empty(n, config.num_heads))
            if not self.relative_attention_bias.weight.is_meta:
                nn.init.normal_(self.relative_attention_bias.weight, std=config.d_model**-0.5)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model), bias (1 or B, H, T, T) in x's dtype -> (B, T, d_model)."""
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.num_heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class T5LayerSelfAttention(nn.Module):
    """`layer.0`: x + SelfAttention(layer_norm(x))."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """Gated-GELU feed-forward: wo(gelu_tanh(wi_0(x)) * wi_1(x)). (B, T, d_model) -> same."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # `wo` may be kept in fp32 inside an fp16 model (the fp16 product overflows there). Its
        # compute dtype, seen through quantized layers and LoRA wrappers, which have no `.weight`.
        return self.wo(h.to(compute_dtype(self.wo)))


class T5LayerFF(nn.Module):
    """`layer.1`: x + DenseReluDense(layer_norm(x)) (the historical name; the activation is GELU)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Self-attention then feed-forward sub-layer (`layer.0`, `layer.1`), fp16-clamped after each."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    """The `encoder.` part: `embed_tokens` (the model's `shared` module), blocks, final norm."""

    def __init__(self, config: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(
            T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder with HF `T5EncoderModel` parameter names; see the module docstring.

    Builds on any device, including `meta` (use `with torch.device("meta"):`). `state_dict()` lists
    the embedding under both of its names (as transformers does); `load_state_dict` accepts a dict
    holding either or both (they must then be equal).
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        # Passed-in weight: nn.Embedding's own normal_ init is slow on the meta device.
        rows, width = config.vocab_size, config.d_model
        self.shared = nn.Embedding(rows, width, _weight=torch.empty(rows, width))
        if not self.shared.weight.is_meta:
            nn.init.normal_(self.shared.weight, std=1.0)
        self.encoder = T5Stack(config, self.shared)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations (only when grads are on)."""
        self.gradient_checkpointing = bool(enabled)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Runs before the children load from the same dict: give the tied embedding both names.
        present = {key: state_dict[prefix + key] for key in T5_EMBEDDING_KEYS if prefix + key in state_dict}
        for key, value in fill_tied_embedding(present, where="T5Encoder.load_state_dict").items():
            state_dict[prefix + key] = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def position_bias(self, length: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        """Relative position bias shared by every block: (1, H, length, length) in `dtype`."""
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        buckets = relative_position_buckets(
            length, self.config.relative_attention_num_buckets, self.config.relative_attention_max_distance,
            device=device or table.weight.device,
        )
        return table(buckets).permute(2, 0, 1).unsqueeze(0).to(dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token ids.

        input_ids: (B, T) integer ids (any T: positions are relative).
        attention_mask: optional (B, T), 1/True for tokens to attend to, 0/False for padding. Flux
            runs T5 without a mask (padding tokens are attended to); a masked forward changes the
            outputs of every position, not just the padded ones.
        Returns last_hidden_state (B, T, d_model) after the final norm, in the dtype of that norm's
        weight (the residual stream before it turns fp32 after the first fp32 `wo`, if any).
        """
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(
                f"T5Encoder: input_ids must be a (batch, tokens) integer tensor, got shape {tuple(input_ids.shape)} "
                f"and dtype {input_ids.dtype}"
            )
        x = self.encoder.embed_tokens(input_ids)
        bias = self.position_bias(input_ids.shape[1], x.dtype, x.device)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"T5Encoder: attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                    f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids"
                )
            # Padded keys get the most negative finite value (as transformers), not -inf: a row
            # whose keys are all masked then averages instead of turning NaN.
            keep = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
            bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)  # (B, H, T, T)
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.encoder.block:
            x = checkpoint(block, x, bias, use_reentrant=False) if use_ckpt else block(x, bias)
        return self.encoder.final_layer_norm(x)


def fill_tied_embedding(state: Mapping[str, torch.Tensor], where: str = "T5 state dict") -> dict[str, torch.Tensor]:
    """`state` with the token embedding under both `shared.weight` and `encoder.embed_tokens.weight`
    (other keys untouched). Raises ValueError when both are present with different values."""
    out = dict(state)
    a, b = (out.get(k) for k in T5_EMBEDDING_KEYS)
    if a is None and b is None:
        return out
    if a is not None and b is not None:
        comparable = not (a.is_meta or b.is_meta) and a.device == b.device and a.shape == b.shape
        if a.shape != b.shape or (comparable and a.data_ptr() != b.data_ptr() and not torch.equal(a, b.to(a.dtype))):
            raise ValueError(
                f"{where}: {T5_EMBEDDING_KEYS[0]} and {T5_EMBEDDING_KEYS[1]} differ; T5 uses one tied token "
                "embedding - the file is damaged or mixes two models"
            )
        return out
    tensor = a if a is not None else b
    out[T5_EMBEDDING_KEYS[0]] = out[T5_EMBEDDING_KEYS[1]] = tensor
    return out


# ---- transformers config.json <-> T5Config ---------------------------------------------------
_CONFIG_FIELDS = {f.name for f in fields(T5Config)}


def t5_config_from_transformers(d: dict, where: str = "text_encoder_2/config.json") -> T5Config:
    """T5Config for a transformers T5 (`T5EncoderModel` / `T5ForConditionalGeneration`) config.json dict.

    Raises ValueError naming `where` for anything but a gated-GELU (v1.1) T5."""
    model_type = d.get("model_type", "t5")
    if model_type != "t5":
        raise ValueError(f"{where}: model_type={model_type!r} is not a T5 model (expected 't5')")
    proj = d.get("feed_forward_proj", "relu")
    act = d.get("dense_act_fn", "gelu_new")
    if proj not in ("gated-gelu",) or act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"{where}: feed_forward_proj={proj!r} / dense_act_fn={act!r} is not supported; only T5 v1.1 "
            "(feed_forward_proj 'gated-gelu', tanh-approximated GELU) loads"
        )
    values = {k: d[k] for k in _CONFIG_FIELDS if k in d}
    try:
        return T5Config(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def t5_config_to_transformers(cfg: T5Config, dtype_name: str = "float32") -> dict:
    """A transformers config.json dict (`T5EncoderModel`) equivalent to `cfg`."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_ff": cfg.d_ff,
        "d_kv": cfg.d_kv,
        "d_model": cfg.d_model,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": cfg.eos_token_id,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "num_decoder_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "pad_token_id": cfg.pad_token_id,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
        "vocab_size": cfg.vocab_size,
    }
