"""A whole text-to-image model: UNet, VAE, text encoders and tokenizers, plus its conditioning.

`build_model(family)` makes one with random weights (`device="meta"` allocates nothing);
`models.load_model(source)` fills one from a checkpoint. `ModelBundle.encode_prompt` implements
each family's text conditioning exactly:

- SD1.5: CLIP-L final-layer-norm output, (B, 77, 768); no pooled vector.
- SD2.x: OpenCLIP ViT-H penultimate hidden state passed through the final layer norm, (B, 77, 1024).
- SDXL: concat(CLIP-L hidden_states[-2], bigG hidden_states[-2]) without final layer norm,
  (B, 77, 2048); pooled = bigG text_projection(final_layer_norm(last)[first EOS]), (B, 1280).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .clip import CLIPTextConfig, CLIPTextEncoder
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig


@dataclass(frozen=True)
class FamilySpec:
    """What makes a model family: presets of its parts and how it is conditioned."""

    name: str
    """Family name as users write it (`sdxl`, `sd15`, `sd2`, `tiny-sdxl`, `tiny-sd15`)."""
    base: str
    """Conditioning scheme: `sd15`, `sd2` or `sdxl` (tiny families share their parent's)."""
    unet: str
    """`UNetConfig.preset` name."""
    vae: str
    """`VAEConfig.preset` name."""
    text_encoders: tuple[str, ...]
    """`CLIPTextConfig.preset` names, in checkpoint order (SDXL: CLIP-L, then bigG)."""
    pad_token_ids: tuple[int, ...]
    """Pad id per tokenizer: CLIP-L pads with EOS (49407), OpenCLIP towers with 0."""
    prediction_type: str = "epsilon"
    """`epsilon` or `v_prediction` (SD2 768-v checkpoints)."""
    resolution: int = 512
    """Native training/sampling resolution in pixels (side of the square)."""

    @property
    def is_sdxl(self) -> bool:
        return self.base == "sdxl"


FAMILIES: dict[str, FamilySpec] = {
    "sd15": FamilySpec("sd15", "sd15", "sd15", "sd15", ("clip-l",), (49407,), resolution=512),
    "sd2": FamilySpec("sd2", "sd2", "sd2", "sd2", ("clip-h",), (0,), resolution=768),
    "sdxl": FamilySpec("sdxl", "sdxl", "sdxl", "sdxl", ("clip-l", "bigg"), (49407, 0), resolution=1024),
    "tiny-sd15": FamilySpec("tiny-sd15", "sd15", "tiny-sd15", "tiny", ("tiny-clip-l",), (49407,), resolution=64),
    "tiny-sdxl": FamilySpec(
        "tiny-sdxl", "sdxl", "tiny-sdxl", "tiny", ("tiny-clip-l", "tiny-bigg"), (49407, 0), resolution=64
    ),
}


def family_spec(name: str) -> FamilySpec:
    """The `FamilySpec` for `name`; a clear error lists the known families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}") from None


@dataclass
class ModelBundle:
    """UNet + VAE + text encoders + tokenizers of one family. Modules are plain `nn.Module`s."""

    family: str
    unet: UNet
    vae: AutoencoderKL
    text_encoders: list[CLIPTextEncoder]
    tokenizers: list[CLIPTokenizer]
    spec: FamilySpec = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = family_spec(self.family)
        if len(self.text_encoders) != len(self.spec.text_encoders):
            raise ValueError(
                f"family {self.family!r} needs {len(self.spec.text_encoders)} text encoder(s), "
                f"got {len(self.text_encoders)}"
            )
        if len(self.tokenizers) != len(self.text_encoders):
            raise ValueError(f"got {len(self.tokenizers)} tokenizer(s) for {len(self.text_encoders)} text encoder(s)")

    # ---- conditioning -------------------------------------------------------------------
    def tokenize(self, prompts: str | list[str]) -> list[torch.Tensor]:
        """Token ids for each text encoder: a list of (B, 77) int64 tensors on the encoders' devices."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = []
        for tok, te in zip(self.tokenizers, self.text_encoders):
            out.append(tok(list(prompts)).to(_module_device(te)))
        return out

    def encode_tokens(self, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditioning from token ids (one (B, 77) tensor per encoder). See `encode_prompt`."""
        base = self.spec.base
        if base == "sdxl":
            te1, te2 = self.text_encoders
            # Only the penultimate layer of CLIP-L is used; bigG also needs the last for pooling.
            out1 = te1(token_ids[0], output_layer=-2)
            out2 = te2(token_ids[1])
            h2 = out2.hidden_states[-2]
            context = torch.cat([out1.hidden_states[-2], h2.to(out1.hidden_states[-2].dtype)], dim=-1)
            return context, out2.pooled
        (te,) = self.text_encoders
        if base == "sd2":
            # SD2 conditions on the penultimate of OpenCLIP ViT-H's 24 layers; diffusers folders
            # ship the encoder cut to those 23 layers, whose last output is then the one to take.
            layer = -1 if te.config.num_layers == 23 else -2
            out = te(token_ids[0], output_layer=layer)
            return te.text_model.final_layer_norm(out.hidden_states[layer]), None
        return te(token_ids[0]).last_hidden_state, None

    def encode_prompt(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning for `prompts`.

        Returns (context, pooled): context (B, 77, D) with D = 768 (SD1.5), 1024 (SD2) or 2048
        (SDXL); pooled (B, 1280) for SDXL, None otherwise. Gradients flow when the encoders
        require them (text-encoder training); wrap in `torch.no_grad()` otherwise.
        """
        return self.encode_tokens(self.tokenize(prompts))

    def sdxl_vector(self, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SDXL `y` (B, pooled_dim + 1536) from pooled (B, P) and time ids (B, 6) in pixels:
        [orig_h, orig_w, crop_top, crop_left, target_h, target_w]."""
        from .unet import sdxl_vector

        return sdxl_vector(pooled, time_ids)

    # ---- device / dtype -----------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        """Named parts: `unet`, `vae`, `text_encoder`, `text_encoder_2` (SDXL)."""
        parts: dict[str, nn.Module] = {"unet": self.unet, "vae": self.vae}
        for i, te in enumerate(self.text_encoders):
            parts["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te
        return parts

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModelBundle":
        """Move every part in place; returns self."""
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    def requires_grad_(self, flag: bool = False) -> "ModelBundle":
        for module in self.modules().values():
            module.requires_grad_(flag)
        return self


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def build_model(
    family: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int | None = None
) -> ModelBundle:
    """A `ModelBundle` of `family` with random weights.

    `device="meta"` builds shapes only and allocates no memory (materialise with `to_empty`).
    `seed` makes the random init reproducible (it seeds a local generator state, restoring the
    global RNG afterwards).
    """
    spec = family_spec(family)
    device = torch.device(device)
    configs = [UNetConfig.preset(spec.unet), VAEConfig.preset(spec.vae)]
    configs += [CLIPTextConfig.preset(name) for name in spec.text_encoders]
    if device.type == "meta":
        from .checkpoints.single_file import meta_module  # imports this module: resolve at call time

        # Shapes only: skipping init avoids running initialisers on meta tensors for nothing.
        unet, vae, *encoders = [meta_module(c) for c in configs]
    else:
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng, torch.device(device):
            if seed is not None:
                torch.manual_seed(seed)
            unet, vae = UNet(configs[0]), AutoencoderKL(configs[1])
            encoders = [CLIPTextEncoder(c) for c in configs[2:]]
    parts = [unet, vae, *encoders]
    if dtype != torch.float32:
        for module in parts:
            module.to(dtype=dtype)
    tokenizers = [CLIPTokenizer(pad_token_id=pad) for pad in spec.pad_token_ids]
    for module in parts:
        module.eval()
    return ModelBundle(family=spec.name, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers, spec=spec)
