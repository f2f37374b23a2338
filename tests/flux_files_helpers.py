"""Tiny FLUX.1 models written in the layouts users have (test helpers, no network).

`tiny_bundle` is the tiny-flux family with every parameter random (so a wrong mapping cannot hide
behind ones and zeros); `write_split` writes it as BFL / ComfyUI separate files, the way
`flux1-dev.safetensors`, `ae.safetensors`, `clip_l.safetensors` and `t5xxl_fp16.safetensors` ship.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.bundle import build_model
from models.checkpoints.safetensors_io import save_file


def tiny_bundle(seed: int = 3, family: str = "tiny-flux", guidance: bool = True, t5_width: int | None = None):
    """guidance False: a transformer without guidance_in (schnell's layout). t5_width: a wider T5
    (and transformer text input) whose layers are large enough to be quantized."""
    from models.flux import FluxTransformer
    from models.t5 import T5Config, T5Encoder

    bundle = build_model(family, seed=seed)
    cfg = bundle.denoiser.config.replace(guidance_embed=guidance)
    if t5_width is not None:
        cfg = cfg.replace(context_in_dim=t5_width)
        t5 = T5Config.preset("tiny-t5", d_model=t5_width, d_kv=t5_width // 4, d_ff=2 * t5_width)
        bundle.text_encoders[1] = T5Encoder(t5).eval()
    if cfg != bundle.denoiser.config:
        bundle.denoiser = FluxTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in bundle.modules().values():
            for p in module.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return bundle


def state(module, drop=()) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if k not in drop}


def write_split(bundle, folder: Path, *, prefix: str = "", clip_prefix: str = "", t5_keys=("shared.weight",),
                t5_dtype=None) -> dict[str, Path]:
    """The transformer, VAE, CLIP-L and T5 as four files plus a T5 tokenizer folder.

    prefix: of the transformer names ("" as BFL ships it, `model.diffusion_model.` as ComfyUI saves it).
    clip_prefix: "" keeps `text_model.` (transformers 4), "drop" removes it (transformers 5).
    t5_keys: which names of the tied T5 embedding the file holds."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.safetensors" for name in ("flux1", "ae", "clip_l", "t5xxl")}
    save_file({prefix + k: v for k, v in state(bundle.denoiser).items()}, paths["flux1"])
    save_file(state(bundle.vae), paths["ae"])
    clip = state(bundle.text_encoders[0])
    if clip_prefix == "drop":
        clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    save_file(clip, paths["clip_l"])
    t5 = state(bundle.text_encoders[1])
    embedding = t5["shared.weight"]
    t5 = {k: v for k, v in t5.items() if k not in ("shared.weight", "encoder.embed_tokens.weight")}
    t5.update({k: embedding for k in t5_keys})
    save_file(t5, paths["t5xxl"], dtype=t5_dtype)
    paths["tokenizer"] = write_t5_tokenizer(bundle, folder / "t5_tokenizer")
    return paths


def write_t5_tokenizer(bundle, folder: Path, model_max_length: int = 77) -> Path:
    """The bundle's T5 tokenizer as a `tokenizer.json` folder, with a tokenizer_config.json whose
    length differs from the family's (the family's must win)."""
    from models.families.flux import tiny_t5_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = bundle.tokenizers[1] if hasattr(bundle.tokenizers[1], "_tok") else tiny_t5_tokenizer(32)
    tok._tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(f'{{"model_max_length": {model_max_length}}}')
    return folder


def assert_same_weights(got, want, parts=("unet", "vae", "text_encoder", "text_encoder_2")) -> None:
    """Bit-identical tensors, same names and dtypes, in every part."""
    for part in parts:
        a, b = got.modules()[part].state_dict(), want.modules()[part].state_dict()
        assert a.keys() == b.keys(), part
        bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        assert bad == [], (part, bad[:3])
