"""The model a training run works on: opened from `model.*`, checked, prepared for training."""
from __future__ import annotations

import torch

from .config import Config, torch_dtype
from .run_control import TrainingError


def open_training_bundle(cfg: Config, device: torch.device):
    """The frozen `ModelBundle` of `cfg.model` on `device`, with gradient checkpointing as
    `train.gradient_checkpointing` asks. A tokenizer that cannot tokenize (FLUX.1's T5 without its
    vocabulary) stops the run here, before any image or caption is encoded."""
    from models.checkpoints.open import open_model

    m = cfg.model
    bundle = open_model(m.source, family=m.family, dtype=torch_dtype(m.dtype), device=device, vae=m.vae,
                        vae_dtype=torch_dtype(m.vae_dtype) if m.vae_dtype else None, variant=m.variant,
                        allow_pickle=m.allow_pickle, prediction_type=m.prediction_type, seed=m.seed,
                        random_weights=m.random_weights,
                        quantize=m.quantize, quantize_text_encoders=m.quantize_text_encoders,
                        text_encoders=m.text_encoders, tokenizers=m.tokenizers)
    for tok in bundle.tokenizers:
        if (reason := getattr(tok, "unavailable", None)) is not None:
            raise TrainingError(reason)
    if granularity := cfg.train.gradient_checkpointing:
        bundle.denoiser.set_gradient_checkpointing(True, "block" if granularity is True else granularity)
    return bundle
