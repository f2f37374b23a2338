"""Run-level control of a training run: the run directory (lock and checks), stop signals, lost
peers in multi-process runs and the end-of-run summary. Used by `trainer.recipe`."""
from __future__ import annotations

import logging
import math
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointManager

log = logging.getLogger("trainer")


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, impossible device setup); printed without traceback."""

    user_facing = True


_PEER_LOST = re.compile(r"closed by peer|reset by peer|broken pipe|timed out|timeout|NCCL (error|communicator)",
                        re.IGNORECASE)


def lost_peer(exc: RuntimeError) -> str | None:
    """The first sentence of a collective's error when another process died or hung, else None."""
    import torch.distributed as dist

    if getattr(exc, "user_facing", False):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    if isinstance(exc, dist.DistError) or _PEER_LOST.search(text):
        return text.split(". ")[0].rstrip(".")
    return None


def agreed(problem: str | None, world: int) -> str | None:
    """The main process's verdict (a problem message or None), on every process."""
    if world == 1:
        return problem
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([problem], from_process=0)[0]


def prepare_run_dir(cfg, run_dir: Path, *, is_main: bool, world: int):
    """Lock the run directory (main process, for the whole run: see trainer/runlock.py), then check
    and prepare it; returns the lock (None on other processes). Every process raises the main
    process's error as TrainingError, so none waits at a barrier for a process that has stopped."""
    from .runlock import RunLock, RunLockHeld

    ckpt_dir = run_dir / "checkpoints"

    def unwritable(exc: OSError) -> str:
        return (f"cannot write to the run directory {run_dir} ({exc.strerror or exc}); make it writable or "
                "set output.dir to another folder")

    problem, lock = None, None
    if is_main:  # before anything is written: a second run must not touch this directory
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir, break_lock=cfg.output.break_lock, notify=log.warning).acquire()
        except RunLockHeld as exc:
            problem = str(exc)
        except OSError as exc:
            problem = unwritable(exc)
    problem = agreed(problem, world)
    if problem is None:
        existing = CheckpointManager(ckpt_dir).list() if cfg.train.resume is None else []
        if existing and not cfg.output.overwrite:
            problem = (f"{run_dir} already has checkpoints (latest step {existing[-1][0]}); resume with "
                       "train.resume=latest, start over with output.overwrite=true, or pick another output.name")
        elif is_main:
            try:  # a full or read-only output directory fails here, before the model is loaded
                if existing:
                    shutil.rmtree(ckpt_dir)
                    shutil.rmtree(run_dir / "logs", ignore_errors=True)
                tempfile.TemporaryFile(dir=run_dir).close()  # can we write there?
            except OSError as exc:
                problem = unwritable(exc)
        problem = agreed(problem, world)
    if problem is not None:
        if lock is not None:
            lock.release()
        raise TrainingError(problem)
    return lock


class StopSignals:
    """SIGINT/SIGTERM set a stop flag (the loop then checkpoints and exits); a second SIGINT aborts.

    `write` prints a line (the monitor's, so the progress bar survives).
    """

    def __init__(self, write, is_main: bool, world: int, device) -> None:
        self.write, self.is_main, self.world, self.device = write, is_main, world, device
        self.signal: int | None = None

    def install(self):
        """Install the handlers (main thread only); returns a function restoring the old ones."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, frame):
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum
            if self.is_main:
                self.write(f"received {signal.Signals(signum).name}: saving a checkpoint after this step "
                           "(press Ctrl-C again to abort without saving)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)

        def restore():
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def should_stop(self, at_log_step: bool) -> bool:
        """Whether a stop signal arrived. With several processes the flag is agreed on (one
        collective) at log steps only, so that every process stops at the same step."""
        if self.world == 1:
            return self.signal is not None
        if not at_log_step:
            return False
        flag = torch.tensor([1 if self.signal is not None else 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = int(flag) > 0
        if stop and self.signal is None:
            self.signal = signal.SIGTERM
        return stop


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
        return exit_code(self.completed, self.signal)


def summary_lines(summary, tensorboard_dir: Path | None, what: str = "LoRA") -> list[str]:
    """The lines printed at the end of a finished run; `what` names the export ("LoRA" or "model")."""
    tail = summary.losses[-max(1, len(summary.losses) // 10):]
    mean_tail = sum(tail) / len(tail) if tail else math.nan
    lines = [
        (f"finished {summary.step} steps ({summary.step - summary.start_step} in this run) in "
         f"{summary.seconds:.1f} s ({summary.samples_per_second:.2f} samples/s)"),
        f"loss (mean of the last {len(tail)} steps): {mean_tail:.4f}",
        f"{what}: {summary.lora_path}",
        f"checkpoint: {summary.checkpoint}",
    ]
    if tensorboard_dir is not None:
        lines.append(f"tensorboard: tensorboard --logdir {tensorboard_dir}")
    return lines


def exit_code(completed: bool, signal: int | None) -> int:
    """0 when a run finished; 128 + signal number after a SIGINT/SIGTERM stop (shell convention); 1 otherwise."""
    if completed:
        return 0
    return 128 + signal if signal else 1


def endless_batches(trainer):
    """Batches of `trainer.loader`, epoch after epoch from `trainer.epoch` (the resume position),
    advancing `trainer.epoch` as epochs end."""
    import torch

    while True:
        trainer.loader.set_epoch(trainer.epoch)
        batches = iter(trainer.loader)
        # Starting a DataLoader iterator draws a base seed from the global torch RNG. Fork it so the
        # global stream (dropout, noise) does not depend on where epochs or resumes fall.
        with torch.random.fork_rng(devices=[]):
            first = next(batches, None)
        if first is not None:
            yield first
            yield from batches
        trainer.epoch += 1
