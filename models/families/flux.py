"""FLUX.1 (dev, schnell): a rectified-flow transformer over 2x2-patched 16-channel latents,
conditioned on T5 v1.1 XXL token states and the pooled CLIP-L vector.

- context = T5 last hidden state (B, T, 4096), T = 512 (dev) or 256 (schnell), T5 run without an
  attention mask (padding tokens are attended to, as the reference and diffusers do);
- pooled = CLIP-L final-layer-norm state at the first EOS (B, 768), no projection; CLIP-L pads with EOS;
- the transformer sees packed latents with (0, row, col) position ids, text ids of zeros, t in
  [0, 1], `y` = pooled and, for dev, the embedded guidance value.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import FamilySpec
from .registry import register_family

# Special ids every T5 v1.1 vocabulary starts with.
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")


@dataclass(frozen=True)
class FluxFamily(FamilySpec):
    """FLUX.1 parts and conditioning (module docstring)."""

    flux: str = "flux-dev"
    """`FluxConfig.preset` of the transformer."""
    t5: str = "t5-xxl"
    """`T5Config.preset` of the second text encoder."""
    t5_max_length: int = 512
    """T5 token row length, EOS and padding included (dev 512, schnell 256)."""

    # ---- parts -----------------------------------------------------------------------------
    def denoiser_config(self):
        from ..flux import FluxConfig

        return FluxConfig.preset(self.flux)

    def text_encoder_configs(self) -> list:
        from ..clip import CLIPTextConfig
        from ..t5 import T5Config

        return [CLIPTextConfig.preset(self.text_encoders[0]), T5Config.preset(self.t5)]

    def make_tokenizers(self) -> list:
        """CLIP-L's BPE (it ships with us) and T5's: a generated vocabulary for the tiny family; for
        the released models a stand-in that says where to give the real one (no T5 vocabulary
        ships: loading a diffusers folder reads `tokenizer_2/`, else `model.tokenizers`)."""
        from ..tokenizer import CLIPTokenizer

        clip = CLIPTokenizer(pad_token_id=self.pad_token_ids[0])
        if self.name.startswith("tiny-"):
            return [clip, tiny_t5_tokenizer(self.t5_max_length)]
        return [clip, MissingT5Tokenizer(self.title, self.t5_max_length)]

    # ---- conditioning ----------------------------------------------------------------------
    def encode(self, bundle, token_ids):
        clip, t5 = bundle.text_encoders
        pooled = clip(token_ids[0]).pooled
        context = t5(token_ids[1])
        return {"context": context, "pooled": pooled}

    def conditioning_shapes(self, bundle):
        clip, t5 = bundle.text_encoders
        return {"context": (bundle.tokenizers[1].max_length, t5.config.d_model), "pooled": (clip.config.hidden_size,)}

    def denoise(self, bundle, noisy, timesteps, cond, time_ids=None, guidance=None):
        import torch

        from ..flux import image_ids, pack_latents, text_ids, unpack_latents

        model = bundle.denoiser
        b, _, h, w = noisy.shape
        context = cond["context"]
        img = pack_latents(noisy.to(model.dtype))
        ids = image_ids(b, h, w, device=noisy.device)
        txt_ids = text_ids(b, context.shape[1], device=noisy.device)
        if model.config.guidance_embed:
            if guidance is None:
                guidance = self.distilled_guidance if self.distilled_guidance is not None else self.train_guidance
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=noisy.device)
        else:
            guidance = None
        out = model(img, ids, context, txt_ids, timesteps.to(torch.float32), cond["pooled"], guidance)
        return unpack_latents(out, h, w)


class MissingT5Tokenizer:
    """Stands in for the T5 tokenizer of a FLUX.1 model until the real one is loaded: no T5
    vocabulary ships with lorasmith, so tokenizing says where to give it."""

    def __init__(self, title: str, max_length: int):
        self.title, self.max_length = title, max_length
        self.pad_token_id, self.eos_token_id = 0, 1

    @property
    def unavailable(self) -> str:
        """Why this tokenizer cannot tokenize, and how to give the real one."""
        return (f"{self.title}: no T5 tokenizer loaded; give the folder holding tokenizer.json or spiece.model "
                "(a diffusers FLUX.1 folder has it in tokenizer_2/) as model.tokenizers: [null, <folder>] "
                "(generate/convert: --tokenizers none <folder>)")

    def __call__(self, texts):
        raise RuntimeError(self.unavailable)

    def __repr__(self) -> str:
        return f"MissingT5Tokenizer({self.title!r})"


def tiny_t5_tokenizer(max_length: int):
    """A T5-style tokenizer for the random-weight tiny family: <pad> 0, </s> 1, <unk> 2, then "▁"
    and every printable ASCII character alone and with the "▁" word prefix (unigram, all pieces of
    one score), so any ASCII prompt tokenizes, offline, deterministically, into ids < 200."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ..t5_tokenizer import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    pieces = [*_T5_SPECIALS, "▁", *chars, *("▁" + c for c in chars)]
    vocab = [(p, 0.0 if i < len(_T5_SPECIALS) else -1.0) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    return T5Tokenizer(tok, max_length=max_length, source="tiny T5 vocabulary")


_COMMON = dict(
    base="flux", vae="flux", pad_token_ids=(49407, 0), objective="flow", latent_multiple=2,
    checkpointing_granularities=("block",), default_sampler="euler", noise_schedule="flow",
    prediction_type="flow", diffusers_pipeline="FluxPipeline", lora_text_components=("te1", "te3"),
    lora_unet_names="bfl", lora_presets=("attn", "attn-mlp", "attn-mlp-mod"), lineage_title="FLUX.1",
    single_file_text_prefixes=("text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer."),
    single_file_vae_prefix="vae.",
    implementation="https://github.com/black-forest-labs/flux",
)
FLUX_DEV = register_family(FluxFamily(
    name="flux-dev", unet="flux-dev", flux="flux-dev", text_encoders=("clip-l", "t5-xxl"), resolution=1024,
    title="FLUX.1-dev", distilled_guidance=3.5, train_guidance=1.0, flow_shift=(0.5, 1.15), default_steps=28,
    t5_max_length=512, architecture="flux-1-dev", base_model_version="flux1", **_COMMON))
FLUX_SCHNELL = register_family(FluxFamily(
    name="flux-schnell", unet="flux-schnell", flux="flux-schnell", text_encoders=("clip-l", "t5-xxl"),
    resolution=1024, title="FLUX.1-schnell", flow_shift=None, default_steps=4, t5_max_length=256,
    architecture="flux-1-schnell", base_model_version="flux1", **_COMMON))
TINY_FLUX = register_family(FluxFamily(
    name="tiny-flux", unet="tiny-flux", flux="tiny-flux", t5="tiny-t5", text_encoders=("tiny-clip-l", "tiny-t5"),
    resolution=64, title="FLUX.1 (tiny)", distilled_guidance=3.5, train_guidance=1.0, flow_shift=(0.5, 1.15),
    default_steps=8, t5_max_length=32, architecture="flux-1-dev", base_model_version="flux1",
    **{**_COMMON, "vae": "tiny-flux"}))
