"""Atomic training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory `<run>/checkpoints/step-00000120/` holding

    adapter.safetensors   trainable (LoRA) tensors in their training dtype (fp32), internal names
    <extra>.safetensors   further named tensor sets: `ema` (EMA of the adapters), `train_weights`
                          (schedule-free: the training point y, while adapter holds the average x)
    optimizer.pt          optimizer.state_dict()
    scheduler.pt          lr scheduler state_dict()
    scaler.pt             fp16 grad scaler state_dict() (only with mixed_precision=fp16)
    rng-<rank>.pt         python / numpy / torch / cuda RNG states of each process
    trainer_state.pt      step, epoch, data sampler position and other loop state
    meta.json             human-readable summary; written last, marks the checkpoint complete

It is written into a hidden `.tmp-step-...` directory first, flushed to disk and renamed into
place, so a crash (or power loss) mid-save never leaves a directory that `latest` could pick; a
failed write (disk full, read-only) removes the hidden directory and raises CheckpointWriteError.
Only the newest `keep_last` complete checkpoints are kept. Loading reads safetensors, JSON and
weights-only pickles: a file holding anything else is refused, never unpickled; LoRA weights or
optimizer state holding NaN/inf are refused too (a resumed run would only produce NaN).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from models.checkpoints.fileio import atomic_file, fsync_dir
from models.checkpoints.safetensors_io import SafetensorsError, read_tensors

_NAME = re.compile(r"^step-(\d+)$")
_META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing or unusable."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, read-only directory, ...); earlier checkpoints are
    intact. Printed without traceback."""

    user_facing = True


# ---- RNG state ------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and every CUDA device, in torch.load-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`. CUDA states are restored only when the device count matches."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_tuple(value):
    # random.setstate needs tuples all the way down; serialisers may hand back lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


# ---- checkpoint contents --------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded checkpoint. `rng` is this process's RNG state (rank-matched when available)."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict | None
    trainer_state: dict
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Tensor sets saved with `save(tensors=...)`, by name (e.g. "ema")."""


def layout_mismatch(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    """None when `saved` has exactly the keys and shapes of `own`, else a one-line summary."""
    missing, unexpected = [k for k in own if k not in saved], [k for k in saved if k not in own]
    reshaped = [k for k in own if k in saved and saved[k].shape != own[k].shape]
    if not (missing or unexpected or reshaped):
        return None
    return (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} reshaped tensors, "
            f"e.g. {(missing or unexpected or reshaped)[0]}")


def _tensors_in(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts/lists (an optimizer state_dict), by dotted path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(_tensors_in(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk. A checkpoint is committed by
    renaming its whole folder, so its files are written in place and flushed one by one."""
    fsync_dir(path)  # os.fsync works on a file's descriptor as on a folder's


class CheckpointManager:
    """Saves, lists, prunes and loads the checkpoints of one run directory.

    In multi-process runs every process constructs one; `barrier` must synchronise all processes
    (e.g. `accelerator.wait_for_everyone`). Only the main process writes shared files; each
    process writes its own RNG file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        keep_last: int = 3,
        *,
        is_main: bool = True,
        rank: int = 0,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main
        self.rank = rank
        self._barrier = barrier or (lambda: None)

    # ---- discovery ------------------------------------------------------------------------
    def list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first. Partial/hidden dirs are ignored."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _NAME.match(child.name)
            if match and child.is_dir() and self._is_complete(child):
                found.append((int(match.group(1)), child))
        return sorted(found)

    @staticmethod
    def _is_complete(path: Path) -> bool:
        try:
            meta = json.loads((path / _META).read_text())
        except (OSError, ValueError):
            return False
        return bool(meta.get("complete"))

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.list()
        return found[-1][1] if found else None

    def resolve(self, resume: str | None) -> Path | None:
        """Checkpoint to resume from for `train.resume`: None, "latest" (None when there is none
        yet, so a fresh run can use the same config) or an explicit checkpoint directory."""
        if resume is None:
            return None
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"train.resume: checkpoint directory {str(path)!r} does not exist")
        if not self._is_complete(path):
            raise CheckpointError(
                f"train.resume: {str(path)!r} is not a complete checkpoint (no {_META} marking it complete); "
                "pick another one or use train.resume=latest"
            )
        return path

    # ---- save -----------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        weights: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any = None,
        trainer_state: dict | None = None,
        meta: dict | None = None,
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Write the checkpoint for `step` atomically; call on every process. Returns its path.
        `tensors`: further named tensor sets, each written as `<name>.safetensors`."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        try:
            if self.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                if not final.exists():
                    tmp.mkdir()
            self._barrier()
            if tmp.is_dir():
                _atomic_torch_save(capture_rng(), tmp / f"rng-{self.rank}.pt")
            self._barrier()
            if self.is_main and tmp.is_dir():
                self._write(tmp, step, weights, optimizer, scheduler, scaler, trainer_state, meta, tensors or {})
                os.replace(tmp, final)
                _fsync(self.root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest()
            raise CheckpointWriteError(
                f"could not write checkpoint {final} ({exc.strerror or exc}: {exc.filename or tmp}); "
                f"{f'the last complete checkpoint is {last}' if last else 'no checkpoint was written yet'}. Free "
                "disk space or make the directory writable, then continue with train.resume=latest") from exc
        self.prune()
        self._barrier()
        return final

    @staticmethod
    def _write(tmp: Path, step, weights, optimizer, scheduler, scaler, trainer_state, meta, extra) -> None:
        """Write every file of a checkpoint into `tmp` and flush them to the disk; meta.json last."""
        for name, sets in {"adapter": weights, **extra}.items():
            if name == "adapter" and sets is not weights or not re.fullmatch(r"[a-z_]+", name):
                raise ValueError(f"checkpoint tensor set name {name!r} is reserved or not [a-z_]+")
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sets.items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        state = dict(trainer_state or {})
        state["step"] = step
        torch.save(state, tmp / "trainer_state.pt")
        info = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {}), "complete": True}
        (tmp / _META).write_text(json.dumps(info, indent=2, default=str))
        # Data before the rename: after a power loss a complete-looking checkpoint has its bytes.
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)

    def prune(self) -> None:
        """Delete all but the newest `keep_last` complete checkpoints (main process only)."""
        if not self.is_main:
            return
        found = self.list()
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            # Rename first so a crash during rmtree leaves a hidden dir, not a broken step-* one.
            trash = path.with_name(".trash-" + path.name)
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        for stale in self.root.glob(".trash-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------
    def load(self, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Read a checkpoint directory written by `save`. Raises CheckpointError naming the file
        when one is damaged or holds anything but tensors and plain data (never unpickled)."""
        path = Path(path)
        if not self._is_complete(path):
            raise CheckpointError(f"{str(path)!r} is not a complete checkpoint")
        rng_file = path / f"rng-{self.rank}.pt"
        if not rng_file.exists():
            rng_file = path / "rng-0.pt"  # world size changed: fall back to the main process's state

        def read(name: str, optional: bool = False, location=map_location):
            file = path / name
            if optional and not file.exists():
                return None
            try:
                if name.endswith(".safetensors"):
                    return read_tensors(file)[0]
                return torch.load(file, map_location=location, weights_only=True)
            except pickle.UnpicklingError:
                reason = "it holds objects other than tensors and plain data, so it was not unpickled"
            except (OSError, RuntimeError, ValueError, EOFError, SafetensorsError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"checkpoint {path} is unusable: {name}: {reason}. {self._instead(path)}")

        weights = read("adapter.safetensors")
        self._require_finite(path, "adapter.safetensors", weights)
        extra = {}
        for file in sorted(path.glob("*.safetensors")):
            if file.name != "adapter.safetensors":
                extra[file.stem] = read(file.name)
                self._require_finite(path, file.name, extra[file.stem])
        optimizer = read("optimizer.pt")
        self._require_finite(path, "optimizer.pt", _tensors_in(optimizer))
        scheduler = read("scheduler.pt", location="cpu")
        scaler = read("scaler.pt", optional=True, location="cpu")
        state = read("trainer_state.pt", location="cpu")
        rng = read(rng_file.name, optional=True, location="cpu")
        return Checkpoint(path, int(state["step"]), weights, optimizer, scheduler, scaler, rng, state, extra)

    def _require_finite(self, path: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """CheckpointError naming the file and its first NaN/inf tensor (one fused reduction per tensor)."""
        from models.checkpoints.safetensors_io import all_finite

        bad = sorted(k for k, t in tensors.items() if not all_finite(t))
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise CheckpointError(f"checkpoint {path} is unusable: {name}: non-finite values (NaN/inf) in {bad[0]}"
                                  f"{more}. {self._instead(path)}")

    @staticmethod
    def _instead(path: Path) -> str:
        """What to do about the unusable checkpoint `path`: resume from the newest older one."""
        match = _NAME.match(path.name)
        step = int(match.group(1)) if match else float("inf")
        older = [p for s, p in CheckpointManager(path.parent).list() if s < step]
        if older:
            return f"Resume from the previous one with train.resume={older[-1]} (or delete {path.name})"
        return "Delete it to start over, or restore it from a backup"
