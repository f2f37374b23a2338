"""The training facts recorded in an exported LoRA: kohya's `ss_*` keys plus our own.

ComfyUI / A1111 / civitai tools read the `ss_*` keys; `lorasmith.family` lets our own tools know
the exact family (tiny test families included) and `lorasmith.config` the whole resolved config.
"""
from __future__ import annotations

import json
import time

from .config import Config, config_to_dict


def training_metadata(cfg: Config, *, step: int, epoch: int, num_images: int, batches_per_epoch: int,
                      world: int, prediction_type: str, bucket_counts: dict, family: str,
                      losses: list[float], num_reg_images: int = 0, weights: str = "trained") -> dict[str, str]:
    """String metadata for `LoRANetwork.save` describing a run at `step` (all values are text).
    `weights`: which weights the file holds, "trained" or "ema" (`lorasmith.weights`)."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    subsets = d.resolved_subsets()
    return {
        "ss_steps": str(step), "ss_max_train_steps": str(t.max_steps), "ss_epoch": str(epoch),
        "ss_num_train_images": str(num_images), "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_batch_size_per_device": str(t.batch_size), "ss_gradient_accumulation_steps": str(t.grad_accum),
        "ss_num_processes": str(world), "ss_learning_rate": f"{o.lr:g}",
        "ss_unet_lr": f"{o.lr:g}", "ss_text_encoder_lr": f"{(o.te_lr if o.te_lr is not None else o.lr):g}",
        "ss_optimizer": o.name, "ss_lr_scheduler": o.scheduler, "ss_lr_warmup_steps": str(o.warmup_steps),
        "ss_mixed_precision": t.mixed_precision, "ss_seed": str(t.seed),
        "ss_resolution": f"({d.resolution}, {d.resolution})", "ss_noise_offset": f"{t.noise_offset:g}",
        "ss_min_snr_gamma": "" if t.min_snr_gamma is None else f"{t.min_snr_gamma:g}",
        "ss_zero_terminal_snr": str(t.zero_terminal_snr), "ss_prediction_type": prediction_type,
        "ss_cache_latents": str(d.cache_latents), "ss_gradient_checkpointing": str(bool(t.gradient_checkpointing)),
        "ss_caption_dropout_rate": f"{max(s.caption_dropout for s in subsets):g}",
        "ss_flip_aug": str(any(s.flip for s in subsets)), "ss_shuffle_caption": str(any(s.shuffle_tags for s in subsets)),
        "ss_keep_tokens": str(d.keep_tokens), "ss_sd_model_name": cfg.model.source,
        "ss_bucket_info": json.dumps({f"{w}x{h}": n for (w, h), n in bucket_counts.items()}),
        "ss_training_finished_at": str(int(time.time())),
        "ss_num_reg_images": str(num_reg_images), "ss_prior_loss_weight": f"{t.prior_loss_weight:g}",
        "ss_masked_loss": str(t.masked_loss), "ss_loss_type": "l2" if t.loss == "mse" else t.loss,
        "ss_huber_schedule": t.huber_schedule, "ss_huber_c": f"{t.huber_c:g}",
        "ss_debiased_estimation": str(t.debiased_estimation), "ss_ip_noise_gamma": f"{t.ip_noise_gamma:g}",
        "ss_multires_noise_iterations": str(t.multires_noise_iterations),
        "ss_multires_noise_discount": f"{t.multires_noise_discount:g}",
        "lorasmith.weights": weights,
        "lorasmith.family": family,
        "lorasmith.final_loss": f"{losses[-1]:.6g}" if losses else "",
        "lorasmith.config": json.dumps(config_to_dict(cfg)),
    }
