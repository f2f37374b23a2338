"""Progress, scalars and end-of-run summary of a training run.

`TrainingMonitor` owns the tqdm bar, the tensorboard writer and, optionally, a Weights & Biases
run (main process only), and turns the per-step loss tensors into numbers only at log intervals:
the training loop hands it 0-dim device tensors every step and nothing is synchronised with the
device in between. Both loggers get the same scalars (`train/...`, `lr/...`, `val/...`) and images.
"""
from __future__ import annotations

import logging
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("trainer")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated CUDA memory since the last `reset_peak_memory` on GPUs, the
    process's max RSS otherwise (which cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak-memory window (nothing to do elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class WandbUnavailable(RuntimeError):
    """`output.wandb` is set but the wandb package is missing; printed as one line."""

    user_facing = True


def import_wandb():
    """The wandb module, or WandbUnavailable with the pip command."""
    import importlib

    try:
        return importlib.import_module("wandb")
    except ImportError as exc:
        raise WandbUnavailable(f"output.wandb needs the `wandb` package ({exc}); install it with "
                               "`pip install 'lorasmith[wandb]'` (or `pip install wandb`), or set output.wandb: null") from exc


class WandbRun:
    """One Weights & Biases run for a run directory. Its id is kept in `<log_dir>/wandb-run-id`, so
    a resumed training run continues the same wandb run."""

    def __init__(self, project: str, name: str, log_dir: Path, config: dict) -> None:
        self.wandb = import_wandb()
        log_dir.mkdir(parents=True, exist_ok=True)
        id_file = log_dir / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else self.wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = self.wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(log_dir),
                                   config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def image(self, tag: str, image, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrainingMonitor:
    """tqdm + tensorboard (+ wandb) for the main process; other processes only count steps.

    Args:
        log_dir: tensorboard directory, or None for no event files.
        total_steps, start_step: for the progress bar.
        samples_per_step: global samples per optimizer step (batch * accumulation * processes).
        device: training device (for peak memory).
        enabled: False on non-main processes.
        wandb: a `WandbRun` to log to as well, or None.

    `train/peak_memory_mb` is the peak of the training steps since the previous log: the window
    restarts when the monitor is created (after model setup and latent/text caching), at every
    log and after sample images are rendered (`add_image`), so those do not count.
    """

    def __init__(self, log_dir: Path | None, total_steps: int, start_step: int, samples_per_step: int,
                 device: torch.device, enabled: bool = True, wandb: WandbRun | None = None) -> None:
        self.enabled = enabled
        self.wandb = wandb if enabled else None
        self.device = device
        self.samples_per_step = samples_per_step
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self._last_time = time.perf_counter()
        self._last_step = start_step
        reset_peak_memory(device)

    def step(self) -> None:
        """One optimizer step finished (no device synchronisation)."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, losses: list[float], lrs: dict[str, float], grad_norm: float | None) -> dict:
        """Write the scalars of the interval ending at `step`; `losses` are its per-step losses."""
        now = time.perf_counter()
        steps = max(1, step - self._last_step)
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        finite = [v for v in losses if math.isfinite(v)]
        scalars = {
            "loss": float(np.mean(finite)) if finite else float("nan"),
            "samples_per_sec": steps * self.samples_per_step / elapsed,
            "steps_per_sec": steps / elapsed,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        reset_peak_memory(self.device)
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        for name, lr in lrs.items():
            scalars[f"lr/{name}"] = lr
        self.log_scalars({key if "/" in key else f"train/{key}": value for key, value in scalars.items()}, step)
        if self.bar is not None:
            first_lr = next(iter(lrs.values())) if lrs else 0.0
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{first_lr:.2e}",
                                 it_s=f"{scalars['steps_per_sec']:.2f}", refresh=False)
        return scalars

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Write named scalars (`train/loss`, `val/loss`, ...) to every logger."""
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step)

    def add_image(self, tag: str, image, step: int) -> None:
        """Log sample images; called right after rendering them, so the memory peak restarts."""
        reset_peak_memory(self.device)
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.image(tag, image, step)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None
