"""The mutants `run.py` applies: plausible bugs, each one exact snippet replaced in one file.

A mutant names the narrowest test files that should kill it (each run is a full pytest start, on a
shared 2-core machine). `original` must occur exactly once in `file`: give enough context. Mark a
mutant `equivalent="why"` when it cannot change behaviour; it is then reported but not counted.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    """Unique id (for --only)."""
    file: str
    """Path relative to the repository root."""
    original: str
    """Exact source text, found exactly once in `file`."""
    replacement: str
    """What it becomes."""
    tests: tuple[str, ...]
    """Test files (or node ids) that should fail."""
    description: str
    """The bug, in one line."""
    equivalent: str | None = None
    """Why this mutant cannot be detected (same behaviour), if so."""


LORA_T = ("tests/test_lora_adapters.py",)
LORA_FILES_T = ("tests/test_lora_files.py",)
IMAGES_T = ("tests/test_data_images.py",)
OBJ_T = ("tests/test_objective.py",)
SCHED_T = ("tests/test_schedule.py",)
SAMPLERS_T = ("tests/test_samplers.py",)
UNET_T = ("tests/test_unet_structure.py", "tests/test_unet_parity.py")
CKPT_T = ("tests/test_unet_checkpointing.py",)

LAYERS = "models/lora/layers.py"
NETWORK = "models/lora/network.py"
BLOCKS = "models/unet_blocks.py"
UNET = "models/unet.py"
OBJECTIVE = "trainer/objective.py"
SCHEDULE = "trainer/schedule.py"
SAMPLERS = "trainer/sampling/samplers.py"
TRANSFORMS = "data/transforms.py"
IMAGES = "data/images.py"

MUTANTS: list[Mutant] = [
    # ---- models/lora/layers.py ------------------------------------------------------------------
    Mutant("rank_dropout_no_rescale", LAYERS,
           "            scale = scale / (1.0 - self.rank_dropout)\n", "",
           LORA_T, "rank dropout zeroes channels without the 1/(1-p) rescale (biased training output)"),
    Mutant("rank_dropout_keeps_with_p", LAYERS,
           "keep = torch.rand(h.shape[0], self.rank, device=h.device) >= self.rank_dropout",
           "keep = torch.rand(h.shape[0], self.rank, device=h.device) < self.rank_dropout",
           LORA_T, "rank dropout keeps a channel with probability p instead of 1-p"),
    Mutant("rank_dropout_per_token", LAYERS,
           "not any(a.training and a.rank_dropout > 0 for a in active)", "True",
           LORA_T, "tokens flattened into the batch under rank dropout: one mask per token, not per sample"),
    Mutant("rank_dropout_in_eval", LAYERS,
           "if self.training and self.rank_dropout > 0:", "if self.rank_dropout > 0:",
           LORA_T, "rank dropout also active in eval mode"),
    Mutant("dropout_in_eval", LAYERS,
           "if self.training and self.dropout > 0:", "if self.dropout > 0:",
           LORA_T, "LoRA dropout also active in eval mode"),
    Mutant("scale_rank_over_alpha", LAYERS,
           "return self.alpha / self.rank", "return self.rank / self.alpha",
           LORA_T, "LoRA scale computed as rank/alpha instead of alpha/rank"),
    Mutant("branch_ignores_multiplier", LAYERS,
           "scale = self.scale * self.multiplier if use_multiplier else self.scale", "scale = self.scale",
           LORA_T, "unmerged forward ignores the network multiplier"),
    Mutant("merge_ignores_multiplier", LAYERS,
           "return w + self.multiplier * self.delta_weight()", "return w + self.delta_weight()",
           LORA_T, "merging a plain LoRA applies strength 1 whatever the multiplier"),
    Mutant("dora_row_norm", LAYERS,
           "dims = [0, *range(2, weight.dim())]", "dims = list(range(1, weight.dim()))",
           LORA_T, "DoRA magnitude normalises rows (per output) instead of columns (per input)"),
    Mutant("dora_merge_ignores_multiplier", LAYERS,
           "return w + self.multiplier * (full - w)", "return full",
           LORA_T, "merging a DoRA applies strength 1 whatever the multiplier"),
    Mutant("dora_forward_ignores_multiplier", LAYERS,
           "y = torch.lerp(self.base_forward(x), y_dora, d.multiplier)", "y = y_dora",
           LORA_T, "unmerged DoRA forward ignores the multiplier"),
    Mutant("merged_adapter_still_applied", LAYERS,
           "active = [a for a in self.lora_adapters.values() if not a.merged]",
           "active = list(self.lora_adapters.values())",
           LORA_T, "a merged adapter is applied a second time in forward"),
    # ---- models/lora/network.py -----------------------------------------------------------------
    Mutant("unmerge_ignores_multiplier", NETWORK,
           "w.copy_((w.float() - a.multiplier * a.delta_weight()).to(w.dtype))",
           "w.copy_((w.float() - a.delta_weight()).to(w.dtype))",
           LORA_T, "unmerge without backup subtracts the update at strength 1"),
    Mutant("dora_unmerge_without_backup", NETWORK,
           "if a.merged and a.is_dora and a._merge_backup is None:", "if False:",
           LORA_T, "DoRA merged with keep_original=False is 'unmerged' by subtracting the plain update"),
    Mutant("no_backup_for_bf16", NETWORK,
           "(a.is_dora or w.dtype != torch.float32)", "a.is_dora",
           LORA_T, "bf16/fp16 weights merged without a backup: unmerge is not bit-exact"),
    Mutant("nonfinite_check_in_fp32", NETWORK,
           "if not torch.isfinite(a.adapted_weight(w).to(w.dtype)).all():",
           "if not torch.isfinite(a.adapted_weight(w)).all():",
           LORA_T, "merge checks finiteness in fp32, so an fp16 overflow to inf is merged"),
    Mutant("remove_keeps_merged", NETWORK,
           "        if not keep_merged:\n            self.unmerge()\n", "",
           LORA_T, "remove() leaves merged weights in the model by default"),
    Mutant("te_lr_ignored", "models/lora/blocks.py",
           "base = unet_lr if unet or te_lr is None else te_lr", "base = unet_lr",
           LORA_T, "text-encoder adapters get the UNet learning rate"),
    Mutant("peft_export_without_scale", NETWORK,
           '"lora_B.weight": up * a.scale', '"lora_B.weight": up',
           LORA_FILES_T, "PEFT export forgets to fold alpha/rank into lora_B"),
    # ---- models/unet_blocks.py ------------------------------------------------------------------
    Mutant("timestep_embedding_sin_cos", BLOCKS,
           "torch.cat([torch.cos(args), torch.sin(args)], dim=-1)", "torch.cat([torch.sin(args), torch.cos(args)], dim=-1)",
           UNET_T, "timestep embedding halves in [sin|cos] order"),
    Mutant("geglu_gate_swapped", BLOCKS,
           "value, gate = self.proj(x).chunk(2, dim=-1)", "gate, value = self.proj(x).chunk(2, dim=-1)",
           UNET_T, "GEGLU takes the gate from the first half"),
    Mutant("ff_residual_dropped", BLOCKS,
           "return self.ff(self.norm3(x)) + x", "return self.ff(self.norm3(x))",
           UNET_T, "transformer block loses the MLP residual"),
    Mutant("spatial_norm_eps", BLOCKS,
           "self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, **fk)",
           "self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-5, **fk)",
           UNET_T, "SpatialTransformer GroupNorm eps 1e-5 instead of the checkpoints' 1e-6"),
    Mutant("upsample_taps_reversed", BLOCKS,
           "torch.stack([t2, t1 + t2, t0 + t1, t0], dim=dim)", "torch.stack([t0, t0 + t1, t1 + t2, t2], dim=dim)",
           UNET_T, "fused nearest-upsample+conv kernel folds the taps in the wrong order"),
    Mutant("upsample_fused_for_wrapped_conv", BLOCKS,
           "if doubled and type(conv) is nn.Conv2d and not", "if doubled and not",
           LORA_T, "fused upsample path used on a LoRA-wrapped conv (reads the base weight only)"),
    # ---- models/unet.py -------------------------------------------------------------------------
    Mutant("skip_concat_order", UNET,
           "h = block(torch.cat([h, skips.pop()], dim=1)", "h = block(torch.cat([skips.pop(), h], dim=1)",
           UNET_T, "decoder concatenates skip before h"),
    Mutant("label_emb_replaces_time", UNET,
           "emb = emb + self.label_emb(y.to(dtype))", "emb = self.label_emb(y.to(dtype))",
           UNET_T, "SDXL label embedding replaces the time embedding instead of adding to it"),
    Mutant("no_out_size_for_odd_sides", UNET,
           "emb, context, skips[-1].shape[-2:] if skips else None)", "emb, context, None)",
           UNET_T, "upsampling always doubles, so odd latent sides no longer meet the skip"),
    Mutant("heads_and_dim_swapped", UNET,
           "return channels // self.num_head_channels, self.num_head_channels",
           "return self.num_head_channels, channels // self.num_head_channels",
           UNET_T, "num_head_channels read as the head count"),
    Mutant("sdxl_vector_interleaved", UNET,
           "sizes = timestep_embedding(time_ids.reshape(-1), SDXL_SIZE_EMBED_DIM)",
           "sizes = timestep_embedding(time_ids.t().reshape(-1), SDXL_SIZE_EMBED_DIM)",
           UNET_T, "SDXL size embeddings built from a transposed time_ids (values of other samples)"),
    Mutant("checkpoint_resblocks_in_transformer_mode", UNET,
           'm.gradient_checkpointing = on and granularity == "layer"',
           'm.gradient_checkpointing = on and granularity in ("layer", "transformer")',
           CKPT_T, "'transformer' checkpointing granularity also recomputes ResBlocks"),
    # ---- trainer/objective.py -------------------------------------------------------------------
    Mutant("min_snr_eps_inverted", OBJECTIVE,
           "torch.where(snr < gamma, torch.ones_like(snr), gamma / snr.clamp(min=1e-20))",
           "torch.where(snr > gamma, torch.ones_like(snr), gamma / snr.clamp(min=1e-20))",
           OBJ_T, "Min-SNR epsilon weight clips the wrong side of gamma"),
    Mutant("min_snr_v_uses_eps_formula", OBJECTIVE,
           "return torch.minimum(snr, gamma) / (snr + 1.0)", "return torch.minimum(snr, gamma) / snr",
           OBJ_T, "Min-SNR for v-prediction divides by snr instead of snr + 1"),
    Mutant("noise_offset_per_pixel", OBJECTIVE,
           "self.noise_offset * torch.randn((c, 1, 1), generator=gen", "self.noise_offset * torch.randn((c, h, w), generator=gen",
           OBJ_T, "noise offset drawn per pixel instead of one constant per channel"),
    Mutant("timestep_max_inclusive", OBJECTIVE,
           "torch.randint(self.timestep_min, self.timestep_max, (1,)", "torch.randint(self.timestep_min, self.timestep_max + 1, (1,)",
           OBJ_T, "timesteps drawn from [min, max] instead of [min, max)"),
    Mutant("seed_ignores_index", OBJECTIVE,
           "+ index * 0xBF58476D1CE4E5B9)", "+ 0xBF58476D1CE4E5B9)",
           OBJ_T, "every sample of a run gets the same noise and timestep"),
    Mutant("loss_sum_not_mean", OBJECTIVE,
           "per_sample = elementwise.flatten(1).mean(dim=1)", "per_sample = elementwise.flatten(1).sum(dim=1)",
           OBJ_T, "per-sample loss sums instead of averaging over C, H, W"),
    Mutant("loss_pred_not_upcast", "trainer/losses.py",
           "diff = pred.float() - target.float()", "diff = pred - target.float()",
           OBJ_T, "prediction not upcast before the subtraction",
           equivalent="torch type promotion computes bf16/fp16 - fp32 in fp32 anyway: the result is the same"),
    # ---- trainer/schedule.py --------------------------------------------------------------------
    Mutant("add_noise_without_sqrt", SCHEDULE,
           "return ab.sqrt() * x0.float() + (1.0 - ab).sqrt() * noise.float()",
           "return ab.sqrt() * x0.float() + (1.0 - ab) * noise.float()",
           SCHED_T, "forward process scales noise by 1-alpha_bar instead of its square root"),
    Mutant("velocity_sign", SCHEDULE,
           "return ab.sqrt() * noise.float() - (1.0 - ab).sqrt() * x0.float()",
           "return ab.sqrt() * noise.float() + (1.0 - ab).sqrt() * x0.float()",
           SCHED_T, "v target with the wrong sign on x0"),
    Mutant("snr_inverted", SCHEDULE,
           "return ab / (1.0 - ab)", "return (1.0 - ab) / ab",
           SCHED_T, "snr returns the noise-to-signal ratio"),
    Mutant("timestep_range_off_by_one", SCHEDULE,
           "int(timesteps.max()) >= self.num_train_timesteps", "int(timesteps.max()) > self.num_train_timesteps",
           SCHED_T, "timestep T passes the range check (then fails with an IndexError)"),
    Mutant("zero_snr_sampling_unclamped", SCHEDULE,
           "sampling_ab[-1] = TERMINAL_ALPHA_BAR", "sampling_ab[-1] = sampling_ab[-1]",
           SAMPLERS_T, "zero-terminal-SNR sampling keeps sigma = inf at the last timestep"),
    Mutant("sigma_at_weights_swapped", SCHEDULE,
           "return (1 - w) * self.sigmas64[lo] + w * self.sigmas64[lo + 1]",
           "return w * self.sigmas64[lo] + (1 - w) * self.sigmas64[lo + 1]",
           SAMPLERS_T, "fractional-timestep sigma interpolation weights swapped"),
    # ---- trainer/sampling/samplers.py -----------------------------------------------------------
    Mutant("euler_a_sigma_up_no_sqrt", SAMPLERS,
           "return math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)",
           "return sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2",
           SAMPLERS_T, "Euler a noise std is the variance"),
    Mutant("dpmpp_2m_full_correction", SAMPLERS,
           "d = denoised + (denoised - old_denoised) * (0.5 / r)", "d = denoised + (denoised - old_denoised) * (1.0 / r)",
           SAMPLERS_T, "DPM++ 2M second-order correction doubled"),
    Mutant("leading_without_offset", SAMPLERS,
           "t = torch.arange(steps, dtype=torch.float64) * ratio + steps_offset",
           "t = torch.arange(steps, dtype=torch.float64) * ratio",
           SAMPLERS_T, "'leading' spacing ignores steps_offset"),
    Mutant("init_scale_always_sigma_max", SAMPLERS,
           "            return math.sqrt(sigma_max**2 + 1.0)\n        return sigma_max",
           "            return sigma_max\n        return sigma_max",
           SAMPLERS_T, "Euler with 'leading' spacing scales initial noise by sigma_max, not sqrt(sigma_max^2+1)"),
    Mutant("v_to_x0_wrong_scale", SAMPLERS,
           "return x / (sigma**2 + 1.0) - out", "return x / math.sqrt(sigma**2 + 1.0) - out",
           SAMPLERS_T, "v-prediction x0 uses x/sqrt(1+sigma^2) instead of x/(1+sigma^2)"),
    Mutant("model_input_unscaled", SAMPLERS,
           "model_in = x / math.sqrt(sigma**2 + 1.0)", "model_in = x",
           SAMPLERS_T, "the UNet receives the VE latent instead of x / sqrt(1 + sigma^2)"),
    Mutant("per_sample_generators_ignored", SAMPLERS,
           "parts = [_draws((1, *x.shape[1:]), g, x.device, count) for g in generator]",
           "parts = [_draws((1, *x.shape[1:]), generator[0], x.device, count) for g in generator]",
           SAMPLERS_T, "Euler a draws every sample's noise from the first generator"),
    Mutant("ddim_ends_at_zero", SAMPLERS,
           "final = self.schedule.sigmas64[:1]", "final = sigmas.new_zeros(1)",
           SAMPLERS_T, "DDIM's last step goes to sigma 0 instead of sigma(t=0)"),
    Mutant("final_not_rescaled", SAMPLERS,
           "return x / math.sqrt(sigmas[-1] ** 2 + 1.0)", "return x",
           SAMPLERS_T, "DDIM result not divided by sqrt(1 + sigma(t=0)^2)"),
    # ---- data/transforms.py ---------------------------------------------------------------------
    Mutant("flip_crop_left_unmirrored", TRANSFORMS,
           "left = self.resized[0] - self.left - self.bucket[0] if self.flip else self.left", "left = self.left",
           IMAGES_T, "crop_top_left not mirrored for flipped crops"),
    Mutant("cover_size_fits_inside", TRANSFORMS,
           "scale = max(bw / w, bh / h)", "scale = min(bw / w, bh / h)",
           IMAGES_T, "resize to fit inside the bucket instead of covering it"),
    Mutant("random_crop_misses_last_left", TRANSFORMS,
           "left = int(rng.integers(0, rw - bw + 1))", "left = int(rng.integers(0, rw - bw))",
           IMAGES_T, "random crop never reaches the rightmost position"),
    Mutant("render_scale_from_probed_size", TRANSFORMS,
           "fx, fy = img.width / rw, img.height / rh", "fx, fy = plan.size[0] / rw, plan.size[1] / rh",
           IMAGES_T, "render maps the crop box with the probed size, wrong for draft-decoded (smaller) images"),
    Mutant("flip_vertical", TRANSFORMS,
           "out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)", "out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)",
           IMAGES_T, "flip mirrors vertically"),
    # ---- data/images.py -------------------------------------------------------------------------
    Mutant("exif_5_7_not_swapped", IMAGES,
           "_SWAPS_AXES = {5, 6, 7, 8}", "_SWAPS_AXES = {6, 8}",
           IMAGES_T, "EXIF orientations 5 and 7 (transpose/transverse) not treated as axis-swapping"),
    Mutant("draft_want_not_swapped", IMAGES,
           "want = want[::-1]", "want = want",
           IMAGES_T, "JPEG draft size not swapped for rotated images: decodes too small"),
    Mutant("png_not_decoded_in_probe", IMAGES,
           'if verify or fmt == "PNG" or not _looks_complete', "if verify or not _looks_complete",
           IMAGES_T, "probe skips decoding PNGs: a corrupt PNG with an intact end passes"),
    Mutant("max_pixels_inclusive", IMAGES,
           "if w * h > max_pixels:", "if w * h >= max_pixels:",
           IMAGES_T, "an image of exactly max_pixels is refused"),
    Mutant("sixteen_bit_truncates", IMAGES,
           "arr8 = (np.clip(arr, 0, 65535) + 128) // 257", "arr8 = np.clip(arr, 0, 65535) // 257",
           IMAGES_T, "16-bit to 8-bit conversion truncates instead of rounding"),
]
