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
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import signal
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointManager, layout_mismatch
from .config import Config, save_config, torch_dtype
from .metadata import training_metadata
from .monitor import TrainingMonitor
from .objective import DiffusionObjective, sample_seed, to_device
from .optim import build_optimizer, build_scheduler
from .schedule import NoiseSchedule
from .samples import render_samples

log = logging.getLogger("trainer")

_LATENT_SEED_OFFSET = 0x1A7E  # separates latent-sampling seeds from noise/timestep seeds


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, impossible device setup); printed without traceback."""

    user_facing = True


@dataclass
class TrainSummary:
    """What a run did. `losses[i]` is the loss of optimizer step `start_step + i + 1`."""

    completed: bool
    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    lora_path: Path | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0
    samples_per_second: float = 0.0
    stopped: str | None = None
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        """0 when finished; 128 + signal number after a SIGINT/SIGTERM stop (shell convention)."""
        if self.completed:
            return 0
        return 128 + self.signal if self.signal else 1


class Denoiser(nn.Module):
    """The trained computation as one module, so DDP sees every adapter: optional text encoding
    (when the text encoders train), SDXL micro-conditioning, then the UNet.

    forward(noisy (B,4,h,w), timesteps (B,), context (B,77,D) | None, pooled (B,P) | None,
    token_ids list[(B,77)] | None, time_ids (B,6) | None) -> prediction (B,4,h,w).
    """

    def __init__(self, bundle, encode_text: bool) -> None:
        super().__init__()
        self.unet = bundle.unet
        self.text_encoders = nn.ModuleList(bundle.text_encoders if encode_text else [])
        object.__setattr__(self, "bundle", bundle)  # not a submodule: parts are registered above

    def forward(self, noisy, timesteps, context=None, pooled=None, token_ids=None, time_ids=None):
        if token_ids is not None:
            context, pooled = self.bundle.encode_tokens(token_ids)
        y = None
        if self.bundle.spec.is_sdxl:
            from models.unet import sdxl_vector

            y = sdxl_vector(pooled, time_ids.to(pooled.device))
        return self.unet(noisy.to(self.unet.dtype), timesteps, context, y)


class LoRATrainingRecipe:
    """Set up and run a LoRA training run described by `cfg` (see module docstring)."""

    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.run_dir = cfg.run_dir
        self.step = 0
        self.loss_history: list[float] = []
        self._stop_signal: int | None = None
        self._is_setup = False

    # ================================================================================ setup ==
    def setup(self) -> None:
        from data.dataset import build_dataset

        cfg = self.cfg
        self._setup_accelerator()
        self._prepare_run_dir()
        self._seed_everything(cfg.train.seed)
        with self.accelerator.main_process_first():  # unusable data fails before any model loads
            self.dataset = build_dataset(cfg.data, seed=cfg.train.seed, log_summary=self.is_main)
        self.bundle = self._build_bundle()
        self._inject_lora()
        self._setup_data()
        self._setup_objective()
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
        handlers = []
        if self.cfg.lora.module_dropout > 0:
            from accelerate.utils import DistributedDataParallelKwargs

            # Module dropout skips whole adapters in a step; DDP must not wait for their gradients.
            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        self.accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                                       cpu=cpu, kwargs_handlers=handlers)
        self.device = self.accelerator.device
        if t.cpu_threads is not None:
            torch.set_num_threads(t.cpu_threads)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index

    def _prepare_run_dir(self) -> None:
        cfg = self.cfg
        ckpt_dir = self.run_dir / "checkpoints"
        existing = CheckpointManager(ckpt_dir).list() if cfg.train.resume is None else []
        if existing and not cfg.output.overwrite:  # every process raises, so none waits for the others
            raise TrainingError(
                f"{self.run_dir} already has checkpoints (latest step {existing[-1][0]}); resume with "
                "train.resume=latest, start over with output.overwrite=true, or pick another output.name")
        if self.is_main:
            try:  # a full or read-only output directory fails here, before the model is loaded
                if existing:
                    shutil.rmtree(ckpt_dir)
                    shutil.rmtree(self.run_dir / "logs", ignore_errors=True)
                self.run_dir.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.run_dir).close()  # can we write there?
            except OSError as exc:
                raise TrainingError(f"cannot write to the run directory {self.run_dir} ({exc.strerror or exc}); make "
                                    "it writable or set output.dir to another folder") from None
        self.accelerator.wait_for_everyone()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_bundle(self):
        import models
        from models.bundle import FAMILIES

        m = self.cfg.model
        dtype = torch_dtype(m.dtype)
        if m.source in FAMILIES:
            if m.family is not None and m.family != m.source:
                raise TrainingError(f"model.family={m.family!r} contradicts model.source={m.source!r}")
            bundle = models.build_model(m.source, device="cpu", dtype=dtype, seed=m.seed)
            if m.prediction_type is not None:
                bundle.spec = dataclasses.replace(bundle.spec, prediction_type=m.prediction_type)
            if m.vae is not None:
                raise TrainingError("model.vae replaces the VAE of a loaded checkpoint; it cannot be used with a "
                                    "random-weight family source")
        else:
            bundle = models.load_model(m.source, family=m.family, dtype=dtype, vae=m.vae, variant=m.variant,
                                       allow_pickle=m.allow_pickle, prediction_type=m.prediction_type)
        vae_dtype = m.vae_dtype or ("fp32" if getattr(bundle.vae.config, "force_upcast", False) else m.dtype)
        bundle.vae.to(dtype=torch_dtype(vae_dtype))
        bundle.to(device=self.device)
        bundle.requires_grad_(False)
        for module in bundle.modules().values():
            module.eval()  # frozen base: no dropout; adapters switch to train mode below
        if granularity := self.cfg.train.gradient_checkpointing:
            bundle.unet.set_gradient_checkpointing(True, "block" if granularity is True else granularity)
        return bundle

    def _inject_lora(self) -> None:
        import models

        lora, t = self.cfg.lora, self.cfg.train
        torch.manual_seed(t.seed)  # identical adapter init on every process and on resume
        try:
            self.network = models.inject_lora(
                self.bundle, unet=lora.targets if lora.targets is not None else lora.preset,
                text_encoders=lora.text_encoders if t.train_text_encoders else None, rank=lora.rank,
                alpha=lora.alpha, conv_rank=lora.conv_rank, conv_alpha=lora.conv_alpha, dropout=lora.dropout,
                rank_dropout=lora.rank_dropout, module_dropout=lora.module_dropout, dora=lora.dora,
                include=lora.include, exclude=lora.exclude, text_encoder_rank=lora.text_encoder_rank,
                text_encoder_alpha=lora.text_encoder_alpha)
        except ValueError as exc:
            raise TrainingError(f"lora: {exc}") from None
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
        if d.cache_latents:
            cache = LatentCache(d.cache_dir, model_id + ":vae", dtype=d.cache_dtype)
            vae = self.bundle.vae
            encode = lambda px: vae.encode(px.to(self.device))  # runs in the VAE's own dtype
            if d.cache_dir is not None and self.world > 1:
                cache.build(self.dataset, encode, progress=self.is_main, rank=self.rank, world_size=self.world)
                acc.wait_for_everyone()
            cache.build(self.dataset, encode, progress=self.is_main)
        if d.cache_text:
            cache = TextCache(d.cache_dir, model_id + ":text", dtype=d.cache_dtype)
            with acc.main_process_first():
                cache.build(self.dataset, self._encode_captions, train_text_encoder=t.train_text_encoders,
                            progress=self.is_main)
        if not self.cfg.sample.prompts:
            # Cached parts are not needed on the accelerator any more (frees ~1.6 GB for SDXL).
            if d.cache_latents:
                self.bundle.vae.to("cpu")
            if d.cache_text and not t.train_text_encoders:
                for te in self.bundle.text_encoders:
                    te.to("cpu")
        self.loader = build_dataloader(self.dataset, t.batch_size, seed=t.seed, rank=self.rank, world_size=self.world,
                                       num_workers=d.num_workers, device=self.device)
        if len(self.loader) == 0:
            raise TrainingError("the data loader has no batches; add images or lower train.batch_size")

    def _model_id(self) -> str:
        m = self.cfg.model
        return f"{self.bundle.family}:{m.source}:{m.seed if m.source == self.bundle.family else ''}:{m.vae or ''}"

    @torch.no_grad()
    def _encode_captions(self, captions: list[str]):
        context, pooled = self.bundle.encode_prompt(list(captions))
        return context.float(), None if pooled is None else pooled.float()

    def _setup_objective(self) -> None:
        t = self.cfg.train
        self.prediction_type = self.cfg.model.prediction_type or self.bundle.spec.prediction_type
        self.schedule = NoiseSchedule(zero_terminal_snr=t.zero_terminal_snr)
        self.objective = DiffusionObjective(self.schedule, self.prediction_type, noise_offset=t.noise_offset,
                                            min_snr_gamma=t.min_snr_gamma, timestep_min=t.timestep_min,
                                            timestep_max=t.timestep_max)

    def _setup_optimizer(self) -> None:
        o = self.cfg.optim
        groups = self.network.param_groups(o.lr, o.te_lr)
        self.group_names = [g["name"] for g in groups]
        optimizer = build_optimizer(groups, o, allow_fused=self.cfg.train.mixed_precision != "fp16")
        self.scheduler = build_scheduler(optimizer, o, self.cfg.train.max_steps)
        self.denoiser = Denoiser(self.bundle, encode_text=self.cfg.train.train_text_encoders)
        self.model, self.optimizer = self.accelerator.prepare(self.denoiser, optimizer)
        self.trainable = [p for g in groups for p in g["params"]]

    def _resume(self) -> int:
        path = self.ckpt.resolve(self.cfg.train.resume)
        self.epoch = 0
        if path is None:
            return 0
        ck = self.ckpt.load(path)
        mismatch = layout_mismatch(self.network.state_dict(), ck.weights)
        if mismatch:
            raise TrainingError(f"checkpoint {path} does not match the LoRA layout of this config ({mismatch}); "
                                f"resume with the config it was trained with ({self.run_dir / 'config.yaml'})")
        self.network.load_state_dict(ck.weights)
        self.optimizer.load_state_dict(ck.optimizer)
        self.scheduler.load_state_dict(ck.scheduler)
        if ck.scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(ck.scaler)
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
        """setup() (if needed), then train(); always releases the progress bar and log files."""
        if not self._is_setup:
            self.setup()
        return self.train()

    def train(self) -> TrainSummary:
        cfg, t = self.cfg, self.cfg.train
        samples_per_step = t.batch_size * t.grad_accum * self.world
        self.monitor = TrainingMonitor(self.run_dir / "logs" if cfg.output.tensorboard else None, t.max_steps,
                                       self.start_step, samples_per_step, self.device, enabled=self.is_main)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._pending: list[torch.Tensor] = []
        self._last_grad_norm: torch.Tensor | None = None
        self._last_saved = self.start_step
        batches = self._batches()
        started = time.perf_counter()
        summary = TrainSummary(completed=False, step=self.step, start_step=self.start_step)
        restore = self._install_signal_handlers()
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
                if t.save_every and at % t.save_every == 0 and not last:
                    self._save_checkpoint()
                if self._should_stop(at % t.log_every == 0):
                    self._flush_logs()
                    summary.checkpoint = self._save_checkpoint()
                    name = signal.Signals(self._stop_signal).name
                    summary.signal = int(self._stop_signal)
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
        summary.step = self.step
        summary.losses = list(self.loss_history)
        summary.seconds = time.perf_counter() - started
        summary.samples_per_second = (self.step - self.start_step) * samples_per_step / max(summary.seconds, 1e-9)
        if summary.completed:
            self._print_summary(summary)
        return summary

    def _batches(self):
        """Endless stream of batches, epoch after epoch, starting at the resume position."""
        while True:
            self.loader.set_epoch(self.epoch)
            batches = iter(self.loader)
            # Starting a DataLoader iterator draws a base seed from the global torch RNG. Fork it so
            # the global stream (LoRA dropout) does not depend on where epochs or resumes fall.
            with torch.random.fork_rng(devices=[]):
                first = next(batches, None)
            if first is not None:
                yield first
                yield from batches
            self.epoch += 1

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
        noise, timesteps = self.objective.sample(latents.shape[1:], ids, t.seed, self.device)
        noisy, target = self.objective.noisy_and_target(latents, noise, timesteps)
        kwargs = {"time_ids": batch["add_time_ids"].to(self.device)}
        if "context" in batch and batch["context"] is not None:
            kwargs["context"] = batch["context"].to(self.device)
            kwargs["pooled"] = batch.get("pooled")
        elif t.train_text_encoders:
            kwargs["token_ids"] = self.bundle.tokenize(batch["caption"])
        else:
            with torch.no_grad():
                kwargs["context"], kwargs["pooled"] = self.bundle.encode_prompt(batch["caption"])
        pred = self.model(noisy, timesteps, **kwargs)
        return self.objective.loss(pred, target, timesteps)

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
        lrs = dict(zip(self.group_names, self.scheduler.get_last_lr()))
        self.monitor.log(self.step, values, lrs, grad_norm)

    def _check_finite(self) -> None:
        bad = self._first_bad
        if self.world > 1:
            bad = self.accelerator.reduce(bad.clone(), "max")
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
        path = self.ckpt.save(
            self.step, weights=self.network.state_dict(), optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.accelerator.scaler,
            trainer_state={"data": self.loader.state_dict(), "epoch": self.loader.epoch},
            meta={"loss": self.loss_history[-1] if self.loss_history else None, "epoch": self.loader.epoch})
        self._last_saved = self.step
        return path

    def _export(self, path: Path) -> Path:
        self._check_finite()
        if self.is_main:
            try:
                self.network.save(path, dtype=torch_dtype(self.cfg.output.export_dtype), metadata=self._export_metadata())
            except OSError as exc:
                raise TrainingError(f"could not write the LoRA {path} ({exc.strerror or exc}); training state up to "
                                    f"{self.ckpt.latest() or 'the start'} is saved: free disk space or make the "
                                    "directory writable, then rerun with train.resume=latest") from None
            self._log(f"exported LoRA to {path}")
        self.accelerator.wait_for_everyone()
        return path

    def _export_metadata(self) -> dict[str, str]:
        return training_metadata(
            self.cfg, step=self.step, epoch=self.loader.epoch, num_images=len(self.dataset.records),
            batches_per_epoch=len(self.loader), world=self.world, prediction_type=self.prediction_type,
            bucket_counts=self.dataset.bucket_counts(), family=self.bundle.family, losses=self.loss_history,
        )

    def _sample_images(self) -> None:
        """Render `sample.prompts` with the current LoRA (main process) into a PNG grid + tensorboard."""
        self._check_finite()
        if self.is_main:
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

    def _install_signal_handlers(self):
        """SIGINT/SIGTERM set a stop flag (checkpoint + clean exit); a second SIGINT aborts."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.is_main:
                self.monitor.write(f"received {signal.Signals(signum).name}: saving a checkpoint after this step "
                                   "(press Ctrl-C again to abort without saving)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)

        def restore():
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _should_stop(self, at_log_step: bool) -> bool:
        """Whether a stop signal arrived. With several processes the flag is agreed on (one
        collective) at log steps only, so that every process stops at the same step."""
        if self.world == 1:
            return self._stop_signal is not None
        if not at_log_step:
            return False
        flag = torch.tensor([1 if self._stop_signal is not None else 0], device=self.device)
        stop = int(self.accelerator.reduce(flag, "max")) > 0
        if stop and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return stop

    def _log(self, message: str) -> None:
        if self.is_main:
            monitor = getattr(self, "monitor", None)
            if monitor is not None and monitor.bar is not None:
                monitor.write(message)
            else:
                log.info(message)

    def _print_summary(self, summary: TrainSummary) -> None:
        if not self.is_main:
            return
        tail = summary.losses[-max(1, len(summary.losses) // 10):]
        mean_tail = sum(tail) / len(tail) if tail else math.nan
        lines = [
            (f"finished {summary.step} steps ({summary.step - summary.start_step} in this run) in "
             f"{summary.seconds:.1f} s ({summary.samples_per_second:.2f} samples/s)"),
            f"loss (mean of the last {len(tail)} steps): {mean_tail:.4f}",
            f"LoRA: {summary.lora_path}",
            f"checkpoint: {summary.checkpoint}",
        ]
        if self.cfg.output.tensorboard:
            lines.append(f"tensorboard: tensorboard --logdir {self.run_dir / 'logs'}")
        for line in lines:
            log.info(line)
