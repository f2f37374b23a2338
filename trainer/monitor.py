"""Progress, scalars and end-of-run summary of a training run.

`TrainingMonitor` owns the tqdm bar and the tensorboard writer (main process only) and turns the
per-step loss tensors into numbers only at log intervals: the training loop hands it 0-dim device
tensors every step and nothing is synchronised with the device in between.
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
    """Peak memory in MiB: allocated CUDA memory on GPUs, the process's max RSS otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class TrainingMonitor:
    """tqdm + tensorboard for the main process; other processes only count steps.

    Args:
        log_dir: tensorboard directory, or None for no event files.
        total_steps, start_step: for the progress bar.
        samples_per_step: global samples per optimizer step (batch * accumulation * processes).
        device: training device (for peak memory).
        enabled: False on non-main processes.
    """

    def __init__(self, log_dir: Path | None, total_steps: int, start_step: int, samples_per_step: int,
                 device: torch.device, enabled: bool = True) -> None:
        self.enabled = enabled
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
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        for name, lr in lrs.items():
            scalars[f"lr/{name}"] = lr
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self.bar is not None:
            first_lr = next(iter(lrs.values())) if lrs else 0.0
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{first_lr:.2e}",
                                 it_s=f"{scalars['steps_per_sec']:.2f}", refresh=False)
        return scalars

    def add_image(self, tag: str, image, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

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
