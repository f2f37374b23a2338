"""The one way files are written (atomically, with one durability policy) and JSON is read back.

Every file the project writes (LoRA files, model checkpoints, training checkpoints, caches, JSON,
configs) goes through `atomic_file`: the data is written to a temporary file in the destination
folder, then renamed over the destination, so a reader (or a crash) sees the old file or the new
one, never a torn one; on any error the temporary file is removed and the destination untouched.

Durability policy (`durable`): files a user keeps or resumes from (LoRA files, checkpoints,
models, configs) are fsynced, and so is the folder entry of the rename, so they survive a power
loss once the call returns. Caches (`durable=False`) are only renamed into place: they can be
recomputed, and an fsync per cached image would slow caching for no safety a user needs.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_file", "fsync_dir", "read_json", "write_bytes", "write_json", "write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` (a rename into it) durable; a no-op where folders cannot be
    opened for fsync."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, durable: bool = True,
                encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on a clean exit move it over `path`.

    mode: "wb" or "w" (text, `encoding` default utf-8). The file gets the usual mode (0666 less
    the umask) rather than mkstemp's 0600. See the module docstring for `durable`.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        text = mode == "w"
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if text else None) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Atomically write `data` to `path` (see `atomic_file`)."""
    with atomic_file(path, "wb", durable=durable) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Atomically write `text` (utf-8) to `path` (see `atomic_file`)."""
    with atomic_file(path, "w", durable=durable) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data, *, durable: bool = True, indent: int | None = 2,
               sort_keys: bool = True) -> Path:
    """Atomically write `data` as JSON (with a final newline) to `path`."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n", durable=durable)


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError, *, what: str = "",
              expect: type = dict):
    """The JSON value in `path`, which must be an `expect` (a JSON object by default). Any problem
    (missing, unreadable, not JSON, wrong type) raises `error` with one line naming the file;
    `what` adds what to do about it ("the diffusers folder is incomplete (re-download it)")."""
    path = Path(path)
    hint = f"; {what}" if what else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing{hint}") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot read JSON ({exc}){hint}") from None
    if not isinstance(data, expect):
        raise error(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, got "
                    f"{type(data).__name__}{hint}")
    return data
