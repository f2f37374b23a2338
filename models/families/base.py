"""The contract a model family fulfils: `FamilySpec`.

A family is one module under `models/families/` that builds a `FamilySpec` (or a subclass that
overrides the conditioning hooks) and registers it. Everything the rest of the code needs to know
about a family is read from here, so nothing outside a family's module branches on its name:

- parts: presets of the denoiser, the VAE (latent scaling and shift live in its `VAEConfig`) and the
  text encoders, with the tokenizers' pad ids;
- conditioning: `encode` (token ids -> dict of conditioning tensors) and `denoise` (noisy latents +
  that dict -> prediction);
- objective and sampling defaults: prediction type, noise schedule, native resolution, sampler;
- checkpoint layouts: single-file text-encoder prefixes, diffusers pipeline class, UNet head rule;
- LoRA naming and metadata: kohya text components, UNet spelling, `ss_base_model_version`,
  `modelspec.architecture`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the registry is read by config checks, which must not import torch
    import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
"""`models/assets/`: the files installed with the package (tokenizer vocabulary, shipped weights)."""


@dataclass(frozen=True)
class FamilySpec:
    """What makes a model family: presets of its parts, conditioning, defaults and file layouts."""

    name: str
    """Family name as users write it (`sdxl`, `sd15`, `sd2`, `tiny-sdxl`, `tiny-sd15`, `toy-sdxl`)."""
    base: str
    """Lineage the family belongs to (`sd15`, `sd2`, `sdxl`): files of one lineage share a layout, so
    checkpoints and LoRA files are detected per lineage (tiny families share their parent's)."""
    unet: str
    """`UNetConfig.preset` name of the denoiser."""
    vae: str
    """`VAEConfig.preset` name (its config holds the latent scaling and shift)."""
    text_encoders: tuple[str, ...]
    """`CLIPTextConfig.preset` names, in checkpoint order (SDXL: CLIP-L, then bigG)."""
    pad_token_ids: tuple[int, ...]
    """Pad id per tokenizer: CLIP-L pads with EOS (49407), OpenCLIP towers with 0."""
    prediction_type: str = "epsilon"
    """`epsilon` or `v_prediction` (SD2 768-v checkpoints)."""
    resolution: int = 512
    """Native training/sampling resolution in pixels (side of the square)."""
    noise_schedule: str = "scaled_linear"
    """`NoiseSchedule.beta_schedule` the family was trained with."""
    default_sampler: str = "euler"
    """Sampler `generate` uses when none is given."""
    title: str = ""
    """Human name used in messages ("SDXL", "SD1.5")."""
    lineage_title: str = ""
    """Human name of the lineage when it differs from `title` ("FLUX.1" for flux-dev's "FLUX.1-dev")."""
    objective: Literal["ddpm", "flow"] = "ddpm"
    """Training objective and sampler kind: `ddpm` (noise schedule over 1000 integer timesteps,
    `prediction_type` target) or `flow` (rectified flow: x_t = (1 - t) x0 + t noise, t in [0, 1],
    the denoiser predicts the velocity noise - x0; FLUX.1)."""
    distilled_guidance: float | None = None
    """Guidance value a guidance-distilled denoiser embeds when sampling (FLUX.1-dev: 3.5): such a
    model runs without classifier-free guidance. None: the denoiser embeds no guidance."""
    train_guidance: float = 1.0
    """Guidance value embedded while training a guidance-distilled denoiser (`train.guidance`)."""
    flow_shift: tuple[float, float] | None = None
    """(base_shift, max_shift) of the resolution-dependent time shift of flow families: mu grows
    linearly with the image token count from base_shift at 256 tokens to max_shift at 4096 and
    t -> e^mu / (e^mu + 1/t - 1). None: no shift (FLUX.1-schnell)."""
    default_steps: int | None = None
    """Sampler steps when none are given (None: the sampler's default; FLUX.1-schnell: 4)."""
    latent_multiple: int = 1
    """The denoiser needs latent height and width divisible by this (Flux packs 2x2 patches: 2)."""
    checkpointing_granularities: tuple[str, ...] = ("block", "layer", "transformer")
    """`train.checkpointing` values the denoiser supports (`UNet.GRANULARITIES`, `FLUX_GRANULARITIES`)."""
    pretrained: str | None = None
    """File name under `models/assets/` of the family's released weights (a single-file checkpoint
    in the family's layout, e.g. `toy-sdxl.safetensors`): a family-name source of such a family
    opens them. None: the family ships no weights and its name gives random weights from a seed."""

    # ---- checkpoint layouts ----------------------------------------------------------------
    single_file_text_prefixes: tuple[str, ...] = ()
    """Key prefix of each text encoder in a single-file checkpoint, in bundle order. A single file
    belongs to the lineage all of whose prefixes it has (the lineage with the most prefixes wins)."""
    openclip_text_prefixes: frozenset[str] = frozenset()
    """The prefixes above whose tensors use OpenCLIP names (converted to HF names on load)."""
    single_file_vae_prefix: str = "first_stage_model."
    """Key prefix of the VAE in a single-file checkpoint (ComfyUI's FLUX.1 files: `vae.`)."""
    diffusers_pipeline: str = ""
    """diffusers pipeline class of the family's folders (`model_index.json` `_class_name`)."""
    diffusers_index_extras: tuple[tuple[str, object], ...] = ()
    """Extra `model_index.json` entries written with the family's folders."""
    unet_num_heads: int | None = None
    """UNet head rule (not visible in checkpoint shapes): a fixed head count (SD1.5: 8) ..."""
    unet_head_channels: int | None = 64
    """... or a fixed head width (SD2/SDXL: 64 channels per head)."""

    # ---- LoRA files --------------------------------------------------------------------------
    lora_text_components: tuple[str, ...] = ("te",)
    """kohya component name of each text encoder (`te`, or `te1`/`te2` for two towers)."""
    lora_presets: tuple[str, ...] = ("attn", "kohya", "locon")
    """`lora.preset` values that apply to the denoiser (`models.lora.names.UNET_PRESETS` selects them)."""
    lora_unet_names: Literal["ldm", "diffusers", "bfl"] = "diffusers"
    """Spelling of denoiser module paths in kohya files: kohya trains SD1.5/SD2 on diffusers' UNet
    (diffusers paths), SDXL on sgm's (ldm paths) and Flux on BFL's transformer (`bfl`: BFL paths;
    the Flux presets and the diffusers `transformer.` names with their fused pieces go with it)."""
    base_model_version: str = ""
    """kohya `ss_base_model_version` (`sd_v1`, `sd_v2`, `sdxl_base_v1-0`)."""
    architecture: str = ""
    """`modelspec.architecture` of the base model (`stable-diffusion-xl-v1-base`)."""
    architecture_v: str | None = None
    """`modelspec.architecture` when the model predicts v (SD2 768-v), else None (same as above)."""
    implementation: str = "diffusers"
    """`modelspec.implementation`."""
    kohya_v2: bool = False
    """kohya `ss_v2` (an SD2-lineage model)."""

    # ---- parts -------------------------------------------------------------------------------
    def denoiser_config(self):
        """Config of the denoiser (a UNet preset here; a DiT family returns its transformer's)."""
        from ..unet import UNetConfig

        return UNetConfig.preset(self.unet)

    def vae_config(self):
        from ..vae import VAEConfig

        return VAEConfig.preset(self.vae)

    def text_encoder_configs(self) -> list:
        from ..clip import CLIPTextConfig

        return [CLIPTextConfig.preset(name) for name in self.text_encoders]

    def make_tokenizers(self) -> list:
        """One tokenizer per text encoder (CLIP BPE with the family's pad ids here)."""
        from ..tokenizer import CLIPTokenizer

        return [CLIPTokenizer(pad_token_id=pad) for pad in self.pad_token_ids]

    # ---- conditioning ------------------------------------------------------------------------
    def encode(self, bundle, token_ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Conditioning tensors from token ids (one (B, 77) int64 tensor per text encoder).

        Returns at least {"context": (B, 77, D)}; families with a pooled vector add "pooled" (B, P).
        """
        raise NotImplementedError(f"family {self.name!r} does not define its text conditioning")

    def denoise(self, bundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                time_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Denoiser prediction for noisy latents (B, C, h, w) at `timesteps` (B,) under `cond` (from
        `encode`). Timesteps are integers in [0, 1000) for `ddpm` families, floats in [0, 1] for
        `flow` ones. `time_ids` (B, 6): [orig_h, orig_w, crop_top, crop_left, target_h, target_w] in
        pixels, read by families with size conditioning. `guidance` (B,): the value a
        guidance-distilled denoiser embeds (ignored by others). The latents are cast to the
        denoiser's dtype."""
        unet = bundle.denoiser
        return unet(noisy.to(unet.dtype), timesteps, cond["context"])

    def conditioning_shapes(self, bundle) -> dict[str, tuple[int, ...]]:
        """Shape of each `encode` tensor for one prompt (no batch dimension), without running the
        encoders (cache size estimates): context = tokenizer length x the UNet's cross-attention
        width; pooled = the summed widths of the encoders with a projection (SDXL: bigG's)."""
        shapes = {"context": (bundle.tokenizers[0].max_length, bundle.denoiser.config.context_dim)}
        pooled = sum(getattr(te.config, "projection_dim", None) or 0 for te in bundle.text_encoders)
        if pooled:
            shapes["pooled"] = (pooled,)
        return shapes

    def text_layers_used(self, index: int, num_layers: int) -> int:
        """How many leading transformer layers of text encoder `index` (of `num_layers`) `encode`
        reads. Adapters on later layers would never receive a gradient."""
        return num_layers

    # ---- derived -----------------------------------------------------------------------------
    def pretrained_path(self) -> Path:
        """Path of the shipped weights (`pretrained` under `models/assets/`). Raises ValueError when
        the family ships none, FileNotFoundError (one line) when the install lacks the file."""
        if self.pretrained is None:
            raise ValueError(f"model family {self.name!r} ships no weights (its name builds random weights)")
        path = ASSETS / self.pretrained
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the lorasmith package is incomplete (family {self.name!r} ships its weights "
                "there); reinstall it with `pip install --force-reinstall lorasmith` (from a source checkout: "
                "restore models/assets/ with git, then `pip install -e .`)")
        return path

    @property
    def is_v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    def lora_metadata(self) -> dict[str, str]:
        """kohya / modelspec entries that say which base model a LoRA file is for."""
        v = self.is_v_prediction
        return {
            "ss_base_model_version": self.base_model_version,
            "ss_v2": str(self.kohya_v2),
            "modelspec.architecture": (self.architecture_v if v and self.architecture_v else self.architecture) + "/lora",
            "modelspec.implementation": self.implementation,
            "modelspec.resolution": f"{self.resolution}x{self.resolution}",
        } | ({} if self.objective == "flow" else {"modelspec.prediction_type": "v" if v else "epsilon"})
