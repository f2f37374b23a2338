"""`LoRATrainingRecipe`: one LoRA training run from a `Config`, single process or data parallel.

    recipe = LoRATrainingRecipe(load_config("configs/quickstart.yaml"))
    summary = recipe.run()          # setup() + train(); summary.lora_path is the exported file

Precision policy: frozen base weights in `model.dtype`, LoRA adapters always fp32, the SDXL VAE
in fp32 (it overflows in fp16), noise / targets / loss in fp32; `train.mixed_precision` autocasts
the forward pass. Under `accelerate launch` the denoiser is wrapped in DDP; every process sees its
own share of the batches (rank r takes global batches r, r + W, ...), draws the same per-sample
noise it would in a single process, and only the main process writes files.

Device syncs: per-step losses stay on the device and are read at log intervals; non-finite
losses/gradients are recorded on the device and checked at log, checkpoint and export points,
so a checkpoint is written only when every step before it was finite.

Recipe options beyond plain LoRA training live in their own modules: loss variants and noise in
`objective`/`losses`, regularization images and masks in `data`, EMA in `ema`, the weights that
samples/exports/checkpoints read (schedule-free, EMA) in `weights`, the validation loss in
`validation_loss`, the run directory and stop signals in `run_control`.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from models.checkpoints.open import gives_random_weights

from .checkpoint import CheckpointManager, layout_mismatch
from .config import Config, save_config, torch_dtype
from .denoiser import Denoiser
from .metadata import training_metadata
from .monitor import TrainingMonitor
from .objective import sample_seed, to_device
from .optim import build_optimizer, build_scheduler
from .run_control import (  # TrainSummary and TrainingError are part of this module's API
    TrainSummary,
    StopSignals,
    TrainingError,
    endless_batches,
    lost_peer,
    prepare_run_dir,
    summary_lines,
)
from .samples import render_samples
from .weights import TrainingWeights

log = logging.getLogger("trainer")

_LATENT_SEED_OFFSET = 0x1A7E  # separates latent-sampling seeds from noise/timestep seeds
_TEXT_CACHE_KEYS = ("context", "pooled")  # conditioning tensors the text cache stores per caption


class LoRATrainingRecipe:
    """Set up and run a LoRA training run described by `cfg` (see module docstring)."""

    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.run_dir = cfg.run_dir
        self.step = 0
        self.loss_history: list[float] = []
        self._is_setup = False

    # ================================================================================ setup ==
    def setup(self) -> None:
        from data.dataset import build_dataset
        from data.masks import MaskSettings

        from .monitor import import_wandb
        from .optim import require_optimizer

        cfg, t = self.cfg, self.cfg.train
        require_optimizer(cfg.optim.name)  # a missing optional package fails before anything loads
        if cfg.output.wandb:
            import_wandb()
        self._setup_accelerator()
        self.run_lock = prepare_run_dir(cfg, self.run_dir, is_main=self.is_main, world=self.world)
        self._seed_everything(t.seed)
        self.masks = (MaskSettings("alpha" if cfg.data.alpha_mask else "sidecar", allow_empty=t.unmasked_weight > 0)
                      if t.masked_loss else None)
        with self.accelerator.main_process_first():  # unusable data fails before any model loads
            self.dataset = build_dataset(cfg.data, seed=t.seed, log_summary=self.is_main, masks=self.masks,
                                         holdout=cfg.validation.split)
        self.bundle = self._build_bundle()
        self._inject_lora()
        self._setup_objective()
        self._setup_data()
        self._setup_optimizer()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last, is_main=self.is_main,
                                      rank=self.accelerator.process_index, barrier=self.accelerator.wait_for_everyone)
        self.start_step = self._resume()
        if self.is_main:  # written only now, so a failed resume leaves config.yaml matching the checkpoints
            save_config(cfg, self.run_dir / "config.yaml")
        self.step = self.start_step
        self._is_setup = True

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        t = self.cfg.train
        cpu = t.device == "cpu" or not torch.cuda.is_available()
        if t.mixed_precision == "fp16" and cpu:
            raise TrainingError("train.mixed_precision=fp16 needs a CUDA GPU; on CPU use bf16 or no")
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        # Other processes wait at barriers while the main one builds the dataset and text cache.
        handlers = [InitProcessGroupKwargs(timeout=timedelta(minutes=t.distributed_timeout_minutes))]
        self.accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                                       cpu=cpu, kwargs_handlers=handlers)
        self.device = self.accelerator.device
        if t.cpu_threads is not None:
            torch.set_num_threads(t.cpu_threads)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index

    def _release_run_lock(self) -> None:
        """Let the next run use the run directory (idempotent)."""
        lock = getattr(self, "run_lock", None)
        if lock is not None:
            lock.release()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_bundle(self):
        from .model_setup import open_training_bundle

        return open_training_bundle(self.cfg, self.device)

    def _inject_lora(self) -> None:
        """`self.network`: the trained weights, LoRA adapters or (`train.mode: full`) the model's own
        (`trainer.full.FullWeights`, with the same interface)."""
        import models

        from .full import FullWeights

        lora, t = self.cfg.lora, self.cfg.train
        torch.manual_seed(t.seed)  # identical adapter init on every process and on resume
        try:
            if t.mode == "full":
                self.network = FullWeights(self.bundle, t, export_diffusers=self.cfg.output.export_diffusers)
            else:
                self.network = models.inject_lora(
                    self.bundle, options=lora, text_encoders=lora.text_encoders if t.train_text_encoders else None)
        except ValueError as exc:
            raise TrainingError(f"{'train' if t.mode == 'full' else 'lora'}: {exc}") from None
        self.network.to(self.device)
        self.network.train()
        if t.channels_last:  # after injection, so LoCon adapter convs follow too
            self.bundle.unet.to(memory_format=torch.channels_last)
        if t.compile:  # after injection: the traced graphs include the adapters
            self.bundle.unet.compile_blocks()

    def _setup_data(self) -> None:
        from data.cache import LatentCache, TextCache
        from data.loader import build_dataloader

        d, t = self.cfg.data, self.cfg.train
        acc = self.accelerator
        model_id = self._model_id()
        if d.cache_dir is None and (d.cache_latents or d.cache_text):
            from .data_setup import check_memory_cache

            check_memory_cache(self.dataset, self.bundle, d, is_main=self.is_main, world=self.world, log=self._log)
        if d.cache_latents:
            cache = LatentCache(d.cache_dir, model_id + ":vae", dtype=d.cache_dtype)
            vae = self.bundle.vae
            encode = lambda px: vae.encode(px.to(self.device))  # runs in the VAE's own dtype
            if d.cache_dir is not None and self.world > 1:
                cache.build(self.dataset, encode, progress=self.is_main, rank=self.rank, world_size=self.world)
                acc.wait_for_everyone()
            cache.build(self.dataset, encode, progress=self.is_main)
        if d.cache_text:
            quant = self.cfg.model.quantize_text_encoders  # embeddings of quantized encoders differ
            cache = TextCache(d.cache_dir, model_id + ":text" + (f":{quant}" if quant != "none" else ""),
                              dtype=d.cache_dtype)
            with acc.main_process_first():
                cache.build(self.dataset, self._encode_captions, train_text_encoder=t.train_text_encoders,
                            progress=self.is_main)
        from .validation_loss import build_validation

        self.validation = build_validation(self.cfg, self.dataset.held_out, self.bundle, self.objective, self.masks,
                                           device=self.device, rank=self.rank, world=self.world, log=self._log,
                                           guidance=self.guidance)
        if t.offload_frozen:
            # Cached parts are not needed on the accelerator any more (frees ~1.6 GB for SDXL);
            # sample rendering brings them back for its duration.
            if d.cache_latents:
                self.bundle.vae.to("cpu")
            if d.cache_text and not t.train_text_encoders:
                for te in self.bundle.text_encoders:
                    te.to("cpu")
        from data.loader import TokenizeCaptions

        # Uncached text: token ids are made at collate time and reach the device pinned and prefetched.
        self.loader = build_dataloader(self.dataset, t.batch_size, seed=t.seed, rank=self.rank, world_size=self.world,
                                       num_workers=d.num_workers, device=self.device,
                                       tokenize=None if d.cache_text else TokenizeCaptions(self.bundle.tokenizers))
        if len(self.loader) == 0:
            raise TrainingError("the data loader has no batches; add images or lower train.batch_size")

    def _model_id(self) -> str:
        m = self.cfg.model
        # The seed names the weights only when they are random (not a family's shipped ones).
        random = gives_random_weights(m.source, m.random_weights)
        return f"{self.bundle.family}:{m.source}:{m.seed if random else ''}:{m.vae or ''}"

    @torch.no_grad()
    def _encode_captions(self, captions: list[str]):
        context, pooled = self.bundle.encode_prompt(list(captions))
        return context.float(), None if pooled is None else pooled.float()

    def _setup_objective(self) -> None:
        from .objective import build_objective

        t, spec = self.cfg.train, self.bundle.spec
        self.prediction_type = self.cfg.model.prediction_type or spec.prediction_type
        self.guidance = None  # the value a guidance-distilled denoiser embeds while training
        if spec.distilled_guidance is not None:
            self.guidance = float(t.guidance if t.guidance is not None else spec.train_guidance)
        try:
            self.objective = build_objective(t, spec, self.prediction_type)
        except ValueError as exc:
            raise TrainingError(f"train: {exc}") from None
        self.schedule = getattr(self.objective, "schedule", None)

    def _setup_optimizer(self) -> None:
        from models.lora.blocks import block_lr_weights

        from .ema import AdapterEMA

        o, t = self.cfg.optim, self.cfg.train
        try:
            blocks = len(getattr(self.bundle.denoiser, "input_blocks", ()))
            block_lr = block_lr_weights(blocks, down=o.down_lr_weight, mid=o.mid_lr_weight, up=o.up_lr_weight,
                                        per_block=o.block_lr_weight)
            groups = self.network.param_groups(o.lr, o.te_lr, lora_plus_ratio=o.lora_plus_ratio, unet_block_lr=block_lr)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        self.group_names = [g["name"] for g in groups]
        make = self.network.build_optimizer if t.mode == "full" else build_optimizer  # full: bf16 weights' own
        try:
            optimizer = make(groups, o, allow_fused=t.mixed_precision != "fp16")
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        self.scheduler = build_scheduler(optimizer, o, t.max_steps)
        self.denoiser = Denoiser(self.bundle, encode_text=t.train_text_encoders)
        self.model, self.optimizer = self.accelerator.prepare(self.denoiser, optimizer)
        self.trainable = [p for g in groups for p in g["params"]]
        ema = None
        if t.ema_decay is not None:
            ema = AdapterEMA(self.network.named_parameters(), t.ema_decay, t.ema_every,
                             device="cpu" if t.ema_on_cpu else None)
        self.weights = TrainingWeights(self.network, self.optimizer, ema)

    def _resume(self) -> int:
        path = self.ckpt.resolve(self.cfg.train.resume)
        self.epoch = 0
        if path is None:
            return 0
        ck = self.ckpt.load(path)
        mismatch = layout_mismatch(self.network.state_dict(), ck.weights)
        if mismatch:
            raise TrainingError(f"checkpoint {path} does not match the {self._what} layout of this config "
                                f"({mismatch}); resume with the config it was trained with "
                                f"({self.run_dir / 'config.yaml'})")
        self.network.load_state_dict(ck.weights)
        self.optimizer.load_state_dict(ck.optimizer)
        self.scheduler.load_state_dict(ck.scheduler)
        if ck.scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(ck.scaler)
        notice = self.weights.restore(ck.extra)
        if notice:
            self._log(notice)
        if ck.rng is not None:
            from .checkpoint import restore_rng

            restore_rng(ck.rng)
        state = ck.trainer_state
        self.loader.load_state_dict(state["data"])
        self.epoch = self.loader.epoch
        self._log(f"resumed from {path} at step {ck.step}")
        return ck.step

    # ================================================================================ train ==
    def run(self) -> TrainSummary:
        """setup() (if needed), then train(); always releases the progress bar, log files and the
        run directory's lock."""
        try:
            if not self._is_setup:
                self.setup()
            return self.train()
        except RuntimeError as exc:
            reason = lost_peer(exc) if getattr(self, "world", 1) > 1 else None
            if reason is None:
                raise
            ckpt = getattr(self, "ckpt", None)
            last = ckpt.latest() if ckpt is not None else None
            keep = f"the last complete checkpoint is {last}" if last else "no checkpoint was written"
            raise TrainingError(f"another process of this {self.world}-process run stopped or lost its connection "
                                f"({reason}); {keep}. Look for the cause in the other processes' output, then "
                                "continue with train.resume=latest") from exc
        finally:
            self._release_run_lock()

    def train(self) -> TrainSummary:
        cfg, t = self.cfg, self.cfg.train
        samples_per_step = t.batch_size * t.grad_accum * self.world
        wandb = None
        if cfg.output.wandb and self.is_main:
            from .config import config_to_dict
            from .monitor import WandbRun

            wandb = WandbRun(cfg.output.wandb, cfg.output.wandb_name or cfg.output.name, self.run_dir / "logs",
                             config_to_dict(cfg))
        self.monitor = TrainingMonitor(self.run_dir / "logs" if cfg.output.tensorboard else None, t.max_steps,
                                       self.start_step, samples_per_step, self.device, enabled=self.is_main,
                                       wandb=wandb)
        self.stop = StopSignals(self.monitor.write, self.is_main, self.world, self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._pending: list[torch.Tensor] = []
        self._last_grad_norm: torch.Tensor | None = None
        self._last_saved = self.start_step
        if cfg.sample.prompts and cfg.sample.at_start and self.start_step == 0:
            self._sample_images()  # the base model: the "before" of a before/after pair
        batches = self._batches()
        started = time.perf_counter()
        summary = TrainSummary(completed=False, step=self.step, start_step=self.start_step)
        restore = self.stop.install()
        try:
            while self.step < t.max_steps:
                self._train_step(batches)
                self.step += 1
                self.monitor.step()
                at = self.step
                last = at == t.max_steps
                if at % t.log_every == 0 or last:
                    self._flush_logs()
                # Exports and images before the step's checkpoint: a kill while writing them is redone on resume.
                if t.export_every and at % t.export_every == 0 and not last:
                    self._export(self.run_dir / f"{cfg.output.name}-step{at:08d}.safetensors")
                if cfg.sample.prompts and cfg.sample.every and at % cfg.sample.every == 0 and not last:
                    self._sample_images()
                if self.validation is not None and (last or cfg.validation.every and at % cfg.validation.every == 0):
                    self._validate()
                if t.save_every and at % t.save_every == 0 and not last:
                    self._save_checkpoint()
                if self.stop.should_stop(at % t.log_every == 0):
                    self._flush_logs()
                    summary.checkpoint = self._save_checkpoint()
                    name = signal.Signals(self.stop.signal).name
                    summary.signal = int(self.stop.signal)
                    summary.stopped = f"interrupted by {name} at step {self.step}"
                    self._log(f"{summary.stopped}; checkpoint saved to {summary.checkpoint}; continue with "
                              "train.resume=latest")
                    break
            else:
                self._flush_logs()
                summary.checkpoint = self._save_checkpoint()
                summary.lora_path = self._export(self.run_dir / f"{cfg.output.name}.safetensors")
                if cfg.sample.prompts:
                    self._sample_images()
                summary.completed = True
        finally:
            restore()
            self.monitor.close()
            self._release_run_lock()
        summary.step = self.step
        summary.losses = list(self.loss_history)
        summary.seconds = time.perf_counter() - started
        summary.samples_per_second = (self.step - self.start_step) * samples_per_step / max(summary.seconds, 1e-9)
        if summary.completed:
            self._print_summary(summary)
        return summary

    def _batches(self):
        """Endless stream of batches, epoch after epoch, starting at the resume position."""
        return endless_batches(self)

    def _train_step(self, batches) -> None:
        """One optimizer step: `grad_accum` micro-batches, clip, step, schedule (no host sync)."""
        t = self.cfg.train
        acc = self.accelerator
        losses = []
        for micro in range(t.grad_accum):
            batch = next(batches)
            # Global micro-batch index: rank r's k-th batch is global batch k * world + r, the
            # same numbering a single process accumulating world * grad_accum batches uses.
            index = (self.step * t.grad_accum + micro) * self.world + self.rank
            sync = micro == t.grad_accum - 1
            with nullcontext() if sync else acc.no_sync(self.model):
                loss = self._loss(batch, index)
                acc.backward(loss)
            losses.append(loss.detach())
        # Every step, clipping or not: a non-finite gradient must be caught before a checkpoint saves its result.
        grad_norm = acc.clip_grad_norm_(self.trainable, t.max_grad_norm or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.weights.ema is not None:
            self.weights.ema.update(self.step + 1)
        step_loss = torch.stack(losses).mean() if len(losses) > 1 else losses[0]
        bad = ~torch.isfinite(step_loss)
        self._last_grad_norm = grad_norm.detach()
        if acc.scaler is None:  # with fp16 the loss scaler skips overflowing steps itself
            bad = bad | ~torch.isfinite(grad_norm)
        self._first_bad = torch.where((self._first_bad < 0) & bad, torch.full_like(self._first_bad, self.step + 1),
                                      self._first_bad)
        self._pending.append(step_loss.float())

    def _loss(self, batch: dict, index: int) -> torch.Tensor:
        """fp32 loss of one micro-batch with global micro-batch index `index`."""
        t = self.cfg.train
        latents = self._latents(batch, index)
        b = latents.shape[0]
        ids = [index * t.batch_size + i for i in range(b)]
        noise, timesteps, input_noise = self.objective.draw(latents.shape[1:], ids, t.seed, self.device)
        noisy, target = self.objective.noisy_and_target(latents, noise, timesteps, input_noise)
        if t.channels_last:  # as the weights (`_inject_lora`), or the first conv converts it every step
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        kwargs = {"time_ids": batch["add_time_ids"].to(self.device)}
        if self.guidance is not None:  # the guidance value a guidance-distilled denoiser embeds
            kwargs["guidance"] = torch.full((b,), self.guidance, device=self.device)
        if batch.get("context") is not None:  # cached text conditioning
            kwargs["cond"] = {k: batch[k].to(self.device) for k in _TEXT_CACHE_KEYS if batch.get(k) is not None}
        else:
            token_ids = batch["token_ids"]  # tokenized by the data loader (`_setup_data`)
            if t.train_text_encoders:
                kwargs["token_ids"] = token_ids
            else:
                with torch.no_grad():
                    kwargs["cond"] = self.bundle.conditioning(token_ids)
        pred = self.model(noisy, timesteps, **kwargs)
        weights = {}
        if "mask" in batch:  # (B, 1, H, W) from pixels or (B, 1, h, w) from the latent cache
            from data.masks import to_latent_grid

            mask = to_latent_grid(batch["mask"].to(self.device, torch.float32), tuple(latents.shape[-2:]))
            weights["pixel_weights"] = t.unmasked_weight + (1.0 - t.unmasked_weight) * mask
        if self.dataset.regularization is not None:  # no host sync: a where on the device
            prior = torch.full((b,), float(t.prior_loss_weight), device=self.device)
            weights["sample_weights"] = torch.where(batch["is_reg"].to(self.device), prior, torch.ones_like(prior))
        return self.objective.loss(pred, target, timesteps, **weights)

    @torch.no_grad()
    def _latents(self, batch: dict, index: int) -> torch.Tensor:
        """Scaled fp32 latents (B,4,h,w): sampled from the cached posterior or encoded now."""
        seed = sample_seed(self.cfg.train.seed + _LATENT_SEED_OFFSET, index)
        gen = torch.Generator().manual_seed(seed)
        if "latent_mean" in batch:
            mean = batch["latent_mean"].float()
            std = batch["latent_std"].float()
            eps = to_device(torch.randn(mean.shape, generator=gen), mean.device)
            z = mean + std * eps
        else:
            # The VAE runs in its own dtype (the SDXL VAE upcasts itself to fp32).
            posterior = self.bundle.vae.encode(batch["pixels"].to(self.device))
            eps = to_device(torch.randn(posterior.mean.shape, generator=gen), self.device)
            z = posterior.mean.float() + posterior.std.float() * eps
        return self.bundle.vae.scale_latents(z)

    # ============================================================= logging / stopping / IO ==
    def _flush_logs(self) -> None:
        """Read the pending per-step losses (one device sync), log them and check finiteness."""
        if not self._pending:
            return
        losses = torch.stack(self._pending)
        self._pending = []
        losses = self.accelerator.reduce(losses, "mean") if self.world > 1 else losses
        values = losses.tolist()
        self.loss_history.extend(values)
        self._check_finite()
        grad_norm = None if self._last_grad_norm is None else float(self._last_grad_norm)
        groups = getattr(self.optimizer, "optimizer", self.optimizer).param_groups  # Prodigy steps by d x lr
        lrs = {n: lr * g.get("d", 1.0) for n, lr, g in zip(self.group_names, self.scheduler.get_last_lr(), groups)}
        self.monitor.log(self.step, values, lrs, grad_norm)

    def _check_finite(self) -> None:
        bad = self._first_bad
        if self.world > 1:  # torch's all-reduce: only recent accelerate releases have reduce(..., "max")
            bad = bad.clone()
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        first = int(bad)
        if first >= 0:
            last = self.ckpt.latest()
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise TrainingError(
                f"non-finite loss or gradients at step {first}; stopped without saving ({keep}). Lower "
                "optim.lr, enable train.max_grad_norm, or use train.mixed_precision=bf16 instead of fp16")

    def _save_checkpoint(self) -> Path | None:
        if self.step == self._last_saved and self.ckpt.latest() is not None:
            return self.ckpt.latest()
        self._check_finite()
        from functools import partial

        path = self.weights.save_checkpoint(partial(
            self.ckpt.save, self.step, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.accelerator.scaler,
            trainer_state={"data": self.loader.state_dict(), "epoch": self.loader.epoch},
            meta={"loss": self.loss_history[-1] if self.loss_history else None, "epoch": self.loader.epoch}))
        self._last_saved = self.step
        return path

    def _export(self, path: Path) -> Path:
        """Write the LoRA (the weights to use) to `path` and, with EMA, `<stem>-ema.safetensors` beside it."""
        self._check_finite()
        if self.is_main:
            try:
                dtype = torch_dtype(self.cfg.output.export_dtype)
                with self.weights.for_use():
                    self.network.save(path, dtype=dtype, metadata=self._export_metadata())
                if self.weights.ema is not None:
                    with self.weights.ema.swapped():
                        self.network.save(path.with_name(f"{path.stem}-ema{path.suffix}"), dtype=dtype,
                                          metadata=self._export_metadata(weights="ema"))
            except OSError as exc:
                raise TrainingError(f"could not write the {self._what} {path} ({exc.strerror or exc}); training "
                                    f"state up to {self.ckpt.latest() or 'the start'} is saved: free disk space or "
                                    "make the directory writable, then rerun with train.resume=latest") from None
            self._log(f"exported {self._what} to {path}")
        self.accelerator.wait_for_everyone()
        return path

    @property
    def _what(self) -> str:
        """What a run trains and exports, for messages."""
        return "model" if self.cfg.train.mode == "full" else "LoRA"

    def _export_metadata(self, weights: str = "trained") -> dict[str, str]:
        return training_metadata(
            self.cfg, step=self.step, epoch=self.loader.epoch, num_images=self.dataset.count_images(),
            num_reg_images=self.dataset.count_images(regularization=True), batches_per_epoch=len(self.loader),
            world=self.world, prediction_type=self.prediction_type, bucket_counts=self.dataset.bucket_counts(),
            family=self.bundle.family, losses=self.loss_history, weights=weights,
        )

    def _sample_images(self) -> None:
        """Render `sample.prompts` with the current LoRA (main process) into a PNG grid + tensorboard."""
        self._check_finite()
        if self.is_main:
            with self.weights.averaged(self.cfg.sample.use_ema):
                grid = render_samples(self.bundle, self.network, self.cfg.sample,
                                      size=self.cfg.sample.size or self.cfg.data.resolution, device=self.device,
                                      prediction_type=self.prediction_type,
                                      zero_terminal_snr=self.cfg.train.zero_terminal_snr,
                                      model_name=self.cfg.model.source, autocast=self.accelerator.autocast())
            out = self.run_dir / "samples" / f"step-{self.step:08d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            grid.save(out)
            self.monitor.add_image("samples", grid, self.step)
        self.accelerator.wait_for_everyone()

    def _validate(self) -> None:
        """Validation loss of the weights to use (and of the EMA): logged as `val/loss`
        (`val/loss_ema`) and printed with the step."""
        scalars = self.validation.measure(self.weights, self.denoiser, self.accelerator)
        self.monitor.log_scalars(scalars, self.step)
        self._log(f"step {self.step}: " + ", ".join(f"{k} {v:.5f}" for k, v in scalars.items()))

    def _log(self, message: str) -> None:
        if self.is_main:
            monitor = getattr(self, "monitor", None)
            if monitor is not None and monitor.bar is not None:
                monitor.write(message)
            else:
                log.info(message)

    def _print_summary(self, summary: TrainSummary) -> None:
        if self.is_main:
            for line in summary_lines(summary, self.run_dir / "logs" if self.cfg.output.tensorboard else None,
                                      self._what):
                log.info(line)
