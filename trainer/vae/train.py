"""The VAE training loop: `VAETrainer(cfg).run()` (command line: `python -m trainer vae --config ...`).

Per step: a batch of pixels (B, 3, H, W) in [-1, 1] from the data pipeline, the posterior q(z|x),
a sample z drawn with a generator seeded by (train.seed, step), the decoded reconstruction, and
the loss of `trainer.vae.losses` (fp32, optionally under bf16 autocast); AdamW with linear warmup
then constant / linear / cosine decay; gradient clipping.

Run directory `<output.dir>/<output.name>/`:

    <name>.safetensors, <name>.json     the exported VAE (trainer/vae/export.py)
    <name>-diffusers/                   with output.diffusers_folder
    checkpoints/step-NNNNNNNN/          resumable: weights, AdamW state, LR schedule, RNG, data position
    logs/metrics.jsonl                  one JSON object per log / eval step (loss, psnr, lr, seconds of
                                        training: wall clock and process CPU time)
    samples/step-NNNNNNNN.png           evaluation images above their reconstructions, per evaluation
    samples/reconstructions.png         the same after the last step
    config.yaml                         the resolved config

Resuming (`train.resume`) restores weights, optimizer, schedule, RNG and the sampler position, and
posterior noise depends only on (seed, step), so an interrupted run that resumes ends with the same
weights, bit for bit, as an uninterrupted one (same device and thread count). SIGINT / SIGTERM finish
the step, write a checkpoint and exit with 130 / 143. A non-finite loss stops the run naming the step
(the last checkpoint is kept).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from data import build_dataloader, build_dataset
from models.checkpoints.materialize import ModelLoadError
from models.vae import AutoencoderKL, VAEConfig

from ..checkpoint import (
    CheckpointError,
    CheckpointManager,
    layout_mismatch,
    restore_rng,
)
from ..config import save_config
from ..objective import sample_seed
from ..optim import lr_factor
from ..run_control import StopSignals, TrainingError, endless_batches, exit_code, prepare_run_dir
from .config import ConfigError, VAERunConfig
from .export import (
    exported_config,
    fold_latent_normalization,
    latent_stats,
    read_vae,
    save_grid,
    write_diffusers_folder,
    write_vae,
)
from .losses import edge_loss, kl_per_pixel, psnr, reconstruction_loss

log = logging.getLogger("trainer")

_NOISE_STREAM = 0x5EED_0FAE  # keeps posterior noise apart from other streams seeded by train.seed
_STATS_STREAM = 0x57A7


@dataclass
class VAESummary:
    """What a run did. `losses[i]` is the loss of step `start_step + i + 1`."""

    completed: bool
    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    eval_psnr: float | None = None
    vae_path: Path | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0
    latent_stats: dict | None = None
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        """0 when finished; 128 + signal number after a SIGINT/SIGTERM stop."""
        return exit_code(self.completed, self.signal)


class VAETrainer:
    """Trains `cfg.model.preset`'s AutoencoderKL on `cfg.data` and exports it (module docstring)."""

    def __init__(self, cfg: VAERunConfig, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        want_gpu = cfg.train.device == "auto" and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")

    # ---- setup ------------------------------------------------------------------------------
    def _build_vae(self) -> AutoencoderKL:
        cfg = self.cfg
        config = VAEConfig.preset(cfg.model.preset)
        with torch.random.fork_rng(devices=[]):  # the init does not move the global stream
            torch.manual_seed(cfg.train.seed)
            vae = AutoencoderKL(config)
        if cfg.model.init is None and cfg.model.init_logvar is not None:
            with torch.no_grad():  # the layer writing the moments: mean rows, then log-variance rows
                moments = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
                moments.weight[config.z_channels:] = 0.0
                moments.bias[config.z_channels:] = cfg.model.init_logvar
        if cfg.model.init is not None:
            try:
                source = read_vae(cfg.model.init, like=config)
            except ModelLoadError as exc:
                raise ConfigError(f"model.init: {exc}") from None
            mismatch = layout_mismatch(vae.state_dict(), source.state_dict())
            if mismatch:
                raise ConfigError(f"model.init: {cfg.model.init} does not have the shapes of preset "
                                  f"{cfg.model.preset!r} ({mismatch}); pick the matching model.preset")
            vae.load_state_dict(source.state_dict())
        vae.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
        vae.to(self.device)
        if cfg.train.channels_last:
            vae.to(memory_format=torch.channels_last)
        return vae.train()

    def _fixed_images(self, source, limit: int) -> torch.Tensor:
        """The first `limit` images of `source` (a dataset) rendered without randomness, all of the
        first image's size: (N, 3, H, W) in [-1, 1]."""
        images = []
        for record in range(len(source.records)):
            pixels = source.load_pixels(record, source.cache_plan(record))
            if images and pixels.shape != images[0].shape:
                continue  # another bucket
            images.append(pixels)
            if len(images) == limit:
                break
        return torch.stack(images)

    def _autocast(self):
        if self.cfg.train.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- run --------------------------------------------------------------------------------
    def run(self) -> VAESummary:
        """Train (or resume), export, and return the summary; the run directory is locked meanwhile."""
        cfg = self.cfg
        if cfg.train.cpu_threads is not None:
            torch.set_num_threads(cfg.train.cpu_threads)
        lock = prepare_run_dir(cfg, cfg.run_dir, is_main=True, world=1)
        try:
            return self._run(cfg.run_dir)
        finally:
            lock.release()

    def _run(self, run_dir: Path) -> VAESummary:
        cfg, t, o = self.cfg, self.cfg.train, self.cfg.optim
        save_config(cfg, run_dir / "config.yaml")
        self.dataset = build_dataset(cfg.data, seed=t.seed, holdout=cfg.eval.holdout)
        self.loader = build_dataloader(self.dataset, t.batch_size, seed=t.seed)
        self.eval_images = self._fixed_images(self.dataset.held_out or self.dataset, cfg.eval.images)
        self.vae = self._build_vae()
        log.info("VAE %s: %.2f M parameters; %d training images, %d evaluation images %s", cfg.model.preset,
                 sum(p.numel() for p in self.vae.parameters()) / 1e6, len(self.dataset.records),
                 len(self.eval_images), "(held out)" if self.dataset.held_out is not None else "(training images)")
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, lambda s: lr_factor(
            s, scheduler=o.scheduler, warmup_steps=o.warmup_steps, max_steps=t.max_steps, min_lr_ratio=o.min_lr_ratio))
        self.checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=t.keep_last)
        self.step, self.epoch, self.seconds, self.cpu_seconds = 0, 0, 0.0, 0.0
        resume = self.checkpoints.resolve(t.resume)
        if resume is not None:
            self._restore(resume)
        self.start_step = self.step
        self.metrics = _Metrics(run_dir / "logs" / "metrics.jsonl", self.start_step)
        summary = VAESummary(completed=False, step=self.step, start_step=self.start_step)
        if self.step == 0:
            self._evaluate(run_dir)  # the starting point of the PSNR curve
        signals = StopSignals(log.info, is_main=True, world=1, device=self.device)
        restore_handlers = signals.install()
        try:
            self._loop(summary, signals)
        finally:
            restore_handlers()
        summary.step, summary.seconds = self.step, self.seconds
        if not summary.completed:
            summary.checkpoint = self._save()
            summary.signal = signals.signal
            log.info("stopped at step %d; checkpoint %s (continue with train.resume=latest)", self.step,
                     summary.checkpoint)
            return summary
        last = self.checkpoints.latest()
        summary.checkpoint = last if last is not None and last.name == f"step-{self.step:08d}" else self._save()
        summary.eval_psnr = self._evaluate(run_dir, final=True)
        summary.vae_path, summary.latent_stats = self._export(run_dir, summary.eval_psnr)
        log.info("finished %d steps in %.0f s of training; eval PSNR %.2f dB; VAE: %s", self.step, self.seconds,
                 summary.eval_psnr, summary.vae_path)
        return summary

    def _loop(self, summary: VAESummary, signals: StopSignals) -> None:
        t, ev = self.cfg.train, self.cfg.eval
        batches = self._batches()
        window: list[dict] = []
        tick, cpu_tick = time.perf_counter(), time.process_time()
        while self.step < t.max_steps:
            terms = self._train_step(next(batches))
            window.append(terms)
            summary.losses.append(terms["loss"])
            self.seconds += time.perf_counter() - tick
            self.cpu_seconds += time.process_time() - cpu_tick
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self._log(window)
                window = []
            if ev.every and self.step % ev.every == 0 and self.step < t.max_steps:
                self._evaluate(self.cfg.run_dir)
            if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                self._save()
            if signals.should_stop(True):
                return
            tick, cpu_tick = time.perf_counter(), time.process_time()  # evaluations and saves are not training
        summary.completed = True

    def _batches(self):
        """Endless stream of batches, epoch after epoch, from the resume position."""
        return endless_batches(self)

    def _train_step(self, batch: dict) -> dict:
        """One optimizer step; returns the loss terms as floats."""
        cfg, lo = self.cfg, self.cfg.loss
        images = batch["pixels"].to(self.device, torch.float32)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(sample_seed(cfg.train.seed + _NOISE_STREAM, self.step))
        with self._autocast():
            posterior = self.vae.encode(images, upcast=False)
            recon = self.vae.decode(posterior.sample(generator), upcast=False)
        rec = reconstruction_loss(images, recon, lo.reconstruction)
        kl = kl_per_pixel(posterior, images[0].numel())
        loss = rec + lo.kl_weight * kl
        if lo.edge_weight > 0:
            loss = loss + lo.edge_weight * edge_loss(images, recon, lo.edge_scales)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) at step {self.step + 1}; lower optim.lr or raise "
                                "optim.warmup_steps. Checkpoints written so far are intact")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.train.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        with torch.no_grad():
            quality = psnr(images, recon.detach())
        return {"loss": loss.item(), "rec": rec.item(), "kl": kl.item(), "psnr": quality.item(), "lr": lr,
                "images": images.shape[0]}

    # ---- reporting --------------------------------------------------------------------------
    def _log(self, window: list[dict]) -> None:
        mean = {k: sum(w[k] for w in window) / len(window) for k in ("loss", "rec", "kl", "psnr")}
        record = {"step": self.step, **mean, "lr": window[-1]["lr"], "seconds": round(self.seconds, 3),
                  "cpu_seconds": round(self.cpu_seconds, 3), "epoch": self.epoch}
        self.metrics.write(record)
        log.info("step %d/%d  loss %.5f  rec %.5f  kl %.3g  psnr %.2f dB  lr %.2e  %.0f s (cpu %.0f s)", self.step,
                 self.cfg.train.max_steps, mean["loss"], mean["rec"], mean["kl"], mean["psnr"], record["lr"],
                 self.seconds, self.cpu_seconds)

    @torch.no_grad()
    def _reconstruct(self, images: torch.Tensor, vae: AutoencoderKL | None = None) -> torch.Tensor:
        """Reconstructions from the posterior mean, (N, 3, H, W), in batches of train.batch_size."""
        vae = vae or self.vae
        out = []
        for chunk in images.split(self.cfg.train.batch_size):
            chunk = chunk.to(self.device)
            with self._autocast():
                out.append(vae.decode(vae.encode(chunk, upcast=False).mean, upcast=False).float().cpu())
        return torch.cat(out)

    def _evaluate(self, run_dir: Path, final: bool = False) -> float:
        """PSNR (dB) of the evaluation images; logs it and writes the reconstruction grid."""
        self.vae.eval()
        recon = self._reconstruct(self.eval_images)
        self.vae.train()
        value = float(psnr(self.eval_images, recon))
        self.metrics.write({"step": self.step, "eval_psnr": value, "seconds": round(self.seconds, 3),
                            "cpu_seconds": round(self.cpu_seconds, 3)})
        log.info("step %d: eval PSNR %.2f dB on %d images", self.step, value, len(self.eval_images))
        n = self.cfg.eval.grid_images
        rows = [self.eval_images[:n], recon[:n]]
        save_grid(rows, run_dir / "samples" / f"step-{self.step:08d}.png")
        if final:
            save_grid(rows, run_dir / "samples" / "reconstructions.png")
        return value

    # ---- checkpoints ------------------------------------------------------------------------
    def _save(self) -> Path:
        return self.checkpoints.save(
            self.step, weights=self.vae.state_dict(), optimizer=self.optimizer, scheduler=self.scheduler,
            trainer_state={"data": self.loader.state_dict(), "epoch": self.epoch, "seconds": self.seconds,
                           "cpu_seconds": self.cpu_seconds},
            meta={"kind": "vae", "preset": self.cfg.model.preset, "epoch": self.epoch})

    def _restore(self, path: Path) -> None:
        ck = self.checkpoints.load(path, map_location=self.device)
        mismatch = layout_mismatch(self.vae.state_dict(), ck.weights)
        if mismatch:
            raise CheckpointError(f"train.resume: {path} holds a different VAE than model.preset="
                                  f"{self.cfg.model.preset!r} ({mismatch})")
        self.vae.load_state_dict(ck.weights)
        self.optimizer.load_state_dict(ck.optimizer)
        self.scheduler.load_state_dict(ck.scheduler)
        if ck.rng is not None:
            restore_rng(ck.rng)
        self.loader.load_state_dict(ck.trainer_state["data"])
        self.epoch = self.loader.epoch
        self.step, self.seconds = ck.step, float(ck.trainer_state.get("seconds", 0.0))
        self.cpu_seconds = float(ck.trainer_state.get("cpu_seconds", 0.0))
        log.info("resumed from %s (step %d)", path, ck.step)

    # ---- export -----------------------------------------------------------------------------
    def _export(self, run_dir: Path, eval_psnr: float) -> tuple[Path, dict]:
        """Measure the latents, fix their scale (`output.latent_scale`) and write the VAE files."""
        out = self.cfg.output
        images = self._fixed_images(self.dataset, out.stats_images)
        vae = copy.deepcopy(self.vae).eval()  # folding must not touch the checkpointed weights
        generator = torch.Generator().manual_seed(sample_seed(self.cfg.train.seed + _STATS_STREAM, 0))
        raw = latent_stats(vae, images.split(self.cfg.train.batch_size), generator)
        log.info("latents of %d images: mean %.4f std %.4f; per channel mean %s std %s", len(images), raw["mean"],
                 raw["std"], _fmt(raw["channel_mean"]), _fmt(raw["channel_std"]))
        if out.latent_scale == "fold":
            fold_latent_normalization(vae, raw["channel_mean"], raw["channel_std"], 1.0 / vae.config.scaling_factor)
        config = exported_config(vae.config, raw, out.latent_scale, out.latent_shift)
        vae.config = config
        generator = torch.Generator().manual_seed(sample_seed(self.cfg.train.seed + _STATS_STREAM, 0))
        stats = latent_stats(vae, images.split(self.cfg.train.batch_size), generator)
        stats["before_export"] = {k: raw[k] for k in ("mean", "std", "channel_mean", "channel_std")}
        log.info("exported latents (%s): scaling_factor %.5f shift %s -> scaled mean %.4f std %.4f", out.latent_scale,
                 config.scaling_factor, config.shift_factor, stats["scaled_mean"], stats["scaled_std"])
        dtype = torch.float16 if out.export_dtype == "fp16" else torch.float32
        resolution = self.cfg.data.resolution
        path = write_vae(vae, run_dir / f"{out.name}.safetensors", config, stats, dtype=dtype, resolution=resolution,
                         extra={"steps": self.step, "eval_psnr": eval_psnr, "train_seconds": round(self.seconds, 1),
                                "train_cpu_seconds": round(self.cpu_seconds, 1)})
        if out.diffusers_folder:
            write_diffusers_folder(vae, run_dir / f"{out.name}-diffusers", config, dtype=dtype, resolution=resolution)
        return path, stats


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


class _Metrics:
    """`logs/metrics.jsonl`: one JSON object per line. A resumed run first drops the lines of steps
    after its checkpoint (written by the interrupted run after it saved)."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except ValueError:
                    continue  # a line cut short by a crash
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
