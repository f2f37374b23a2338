"""CLIP text encoders: OpenAI CLIP ViT-L/14 (SD1.5, SDXL te1), OpenCLIP ViT-H/14 (SD2) and
OpenCLIP ViT-bigG/14 (SDXL te2).

Parameter names follow the Hugging Face `CLIPTextModel` layout (`text_model.encoder.layers.N...`),
which is also how SD1.5/SDXL single-file checkpoints store CLIP-L. OpenCLIP checkpoints (bigG, ViT-H)
are converted by `models.checkpoints.openclip_keys.openclip_to_hf`.

    enc = CLIPTextEncoder(CLIPTextConfig.preset("bigg"))
    out = enc(input_ids)                      # input_ids: (B, 77) int64
    out.hidden_states[-2]                     # (B, 77, 1280) penultimate layer, no final LN
    out.pooled                                # (B, 1280) projected first-EOS feature
    enc(input_ids, output_layer=-2)           # skips the last layer; hidden_states[-1] is None
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class CLIPTextConfig:
    """Shape and vocabulary of a CLIP text transformer (pre-LN, causal attention)."""

    hidden_size: int = 768
    """Width D of the residual stream."""
    num_layers: int = 12
    """Number of transformer layers."""
    num_heads: int = 12
    """Attention heads; `hidden_size` must be divisible by it."""
    intermediate_size: int = 3072
    """Hidden width of the MLP (fc1 output)."""
    activation: str = "quick_gelu"
    """MLP activation: `quick_gelu` (OpenAI CLIP, x*sigmoid(1.702x)) or `gelu` (exact erf GELU, OpenCLIP)."""
    projection_dim: int | None = None
    """Output width of `text_projection` (bias-free Linear) for the pooled vector; None = no projection."""
    vocab_size: int = 49408
    """Token embedding rows (CLIP BPE: 49408)."""
    max_position: int = 77
    """Number of learned positions; input sequences may be at most this long."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    bos_token_id: int = 49406
    """`<|startoftext|>` id."""
    eos_token_id: int = 49407
    """`<|endoftext|>` id; the pooled vector is taken at its FIRST occurrence in each row."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPTextConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"CLIPTextConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig.activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int) or self.projection_dim <= 0):
            raise ValueError(
                f"CLIPTextConfig.projection_dim must be None or a positive int, got {self.projection_dim!r}"
            )
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"CLIPTextConfig.{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str) -> CLIPTextConfig:
        """Named configurations: `clip-l`, `bigg`, `clip-h`, `tiny-clip-l`, `tiny-bigg`."""
        try:
            kwargs = _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown CLIP text preset {name!r}; known presets: {', '.join(_PRESETS)}") from None
        return cls(**kwargs)


_PRESETS: dict[str, dict] = {
    # OpenAI CLIP ViT-L/14 text tower (SD1.5, SDXL text_encoder).
    "clip-l": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, activation="quick_gelu"),
    # OpenCLIP ViT-bigG/14 text tower (SDXL text_encoder_2), with its projection for the pooled vector.
    "bigg": dict(
        hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, activation="gelu", projection_dim=1280
    ),
    # OpenCLIP ViT-H/14 text tower (SD2.x). SD2 uses only the penultimate layer, so no projection.
    "clip-h": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, activation="gelu"),
    # Tiny variants for tests; the vocabulary stays full-size so the real tokenizer works.
    "tiny-clip-l": dict(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, activation="quick_gelu"),
    "tiny-bigg": dict(
        hidden_size=64, num_layers=3, num_heads=2, intermediate_size=128, activation="gelu", projection_dim=64
    ),
}


@dataclass
class CLIPTextOutput:
    """Result of `CLIPTextEncoder.forward`.

    hidden_states: num_layers + 1 entries, each (B, T, D): the embeddings, then the output of every
        layer (no final LayerNorm). With `output_layer` set, entries after it are None.
    last_hidden_state: final_layer_norm(hidden_states[-1]), (B, T, D); None when stopped early.
    pooled: (B, D), or (B, projection_dim) through `text_projection`: last_hidden_state at the first
        EOS token of each row; None when stopped early.
    """

    hidden_states: tuple[torch.Tensor | None, ...]
    last_hidden_state: torch.Tensor | None
    pooled: torch.Tensor | None


class CLIPTextEmbeddings(nn.Module):
    """Token + learned absolute position embeddings."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        # Weights are passed in so nn.Embedding skips its own normal_ init: on the meta device that
        # call pulls in torch's decomposition machinery (seconds) for values that never exist.
        self.token_embedding = nn.Embedding(config.vocab_size, d, _weight=torch.empty(config.vocab_size, d))
        self.position_embedding = nn.Embedding(config.max_position, d, _weight=torch.empty(config.max_position, d))
        if not self.token_embedding.weight.is_meta:
            # OpenCLIP's initialisation scales.
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, D)."""
        # The position rows are sliced from the weight rather than kept as a `position_ids` buffer,
        # so checkpoints with or without that buffer load the same way.
        positions = self.position_embedding.weight[: input_ids.shape[1]]
        return self.token_embedding(input_ids) + positions


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (all with bias)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); token t attends to tokens 0..t."""
        b, t, _ = x.shape
        q, k, v = (
            proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = config.activation
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.activation == "quick_gelu":
            h = h * torch.sigmoid(1.702 * h)
        else:
            h = F.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """Holds the layer stack (`encoder.layers.N`); iteration happens in `CLIPTextEncoder.forward`."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_layers))


class CLIPTextTransformer(nn.Module):
    """The `text_model.` part: embeddings, encoder layers, final LayerNorm."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer with HF parameter names; see the module docstring.

    Builds on any device, including `meta` (use `with torch.device("meta"):`).
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = (
            nn.Linear(config.hidden_size, config.projection_dim, bias=False) if config.projection_dim else None
        )
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in backward instead of storing its activations (only when grads are on)."""
        self.gradient_checkpointing = bool(enabled)

    def _resolve_output_layer(self, output_layer: int | None) -> int:
        n = self.config.num_layers
        if output_layer is None:
            return n
        if not isinstance(output_layer, int) or not -(n + 1) <= output_layer <= n:
            raise ValueError(
                f"output_layer={output_layer!r} must index hidden_states (length {n + 1}): "
                f"an int in [{-(n + 1)}, {n}], e.g. -2 for the penultimate layer"
            )
        return output_layer % (n + 1)

    def forward(self, input_ids: torch.Tensor, output_layer: int | None = None) -> CLIPTextOutput:
        """Encode token ids.

        input_ids: (B, T) integer ids, T <= config.max_position (77); each row should contain the
            EOS id (the tokenizer guarantees it) since `pooled` is read at its first occurrence.
        output_layer: index into `hidden_states` (0 = embeddings, -1 = last layer, -2 = penultimate).
            Layers after it are not computed: their hidden_states entries, `last_hidden_state` and
            `pooled` are None. The computed entries are identical to a full forward.
        """
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(
                f"input_ids must be a (batch, tokens) integer tensor, got shape {tuple(input_ids.shape)} "
                f"and dtype {input_ids.dtype}"
            )
        if input_ids.shape[1] > self.config.max_position:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens but the text encoder has only "
                f"{self.config.max_position} positions; tokenize with max_length={self.config.max_position}"
            )
        stop = self._resolve_output_layer(output_layer)
        tm = self.text_model
        x = tm.embeddings(input_ids)
        hidden: list[torch.Tensor | None] = [x]
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in tm.encoder.layers[:stop]:
            x = checkpoint(layer, x, use_reentrant=False) if use_ckpt else layer(x)
            hidden.append(x)
        if stop < self.config.num_layers:
            hidden.extend([None] * (self.config.num_layers - stop))
            return CLIPTextOutput(hidden_states=tuple(hidden), last_hidden_state=None, pooled=None)

        last = tm.final_layer_norm(x)
        # argmax returns the first maximal index: the first EOS even when padding also uses EOS.
        eos_pos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_pos.to(last.device)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(hidden_states=tuple(hidden), last_hidden_state=last, pooled=pooled)
