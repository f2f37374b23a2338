"""One training run per run directory: `RunLock` on `<run>/.lock`, held for the run's whole life.

    lock = RunLock(run_dir, break_lock=cfg.output.break_lock).acquire()   # raises RunLockHeld
    try:
        ...train...
    finally:
        lock.release()

Two mechanisms, because neither is enough alone:

- `fcntl.flock` on the lock file. The kernel drops it when the holder exits in any way (SIGKILL
  included), so on a local file system a second run is refused exactly while the first lives.
- The file's body, JSON `{pid, host, started, boot_id, proc_start}`, written once the flock is
  held. On file systems where flock is not shared between machines (some NFS mounts, FUSE/SMB
  file systems) a second run gets the flock anyway; the body then still names a holder, and the
  run is refused if that holder may be alive: a process on this host that still exists (same pid,
  same process start time, same boot), or any process on another host, whose liveness cannot be
  checked from here. A body naming a process of this host that no longer exists is stale (the run
  was killed, or the machine rebooted): the lock is taken over with a notice. A lock of another
  host is taken over only with `output.break_lock: true`.

Release (end of training, errors, SIGINT/SIGTERM after the recipe's graceful stop) removes the
file and drops the flock; a garbage-collected or exiting holder releases it too (`weakref.finalize`,
which runs at interpreter exit). Forked children (DataLoader workers) never release it.
Remaining gap: on a file system without shared flock, two runs started on two hosts within the
same few milliseconds can both read an empty body; every later start is refused.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import weakref
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockHeld(RuntimeError):
    """The run directory is in use by another run; the message names the holder and what to do."""

    user_facing = True


def _proc_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    if fields[0] in ("Z", "X"):  # a zombie has exited; only its exit status is left
        return None
    return int(fields[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder_alive(body: dict) -> bool:
    """Whether the process a lock body of *this host* names may still be running."""
    pid = body.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    boot = _boot_id()
    if boot is not None and body.get("boot_id") not in (None, boot):
        return False  # rebooted since: every pid of that boot is gone
    if not _pid_exists(pid):
        return False
    start = _proc_start(pid)
    recorded = body.get("proc_start")
    if Path("/proc").is_dir() and start is None:
        return False  # a zombie, or gone between the two checks
    return recorded is None or start is None or start == recorded  # a new process under a reused pid is not the holder


def describe(body: dict) -> str:
    """`pid 123 on host box, started 2024-05-01 10:00:00` from a lock body."""
    text = f"pid {body.get('pid', '?')} on host {body.get('host', '?')}"
    return text + (f", started {body['started']}" if body.get("started") else "")


class _Held:
    """What release needs, kept outside RunLock so the finalizer does not keep the lock alive."""

    def __init__(self, fd: int, path: Path, owner_pid: int):
        self.fd, self.path, self.owner_pid = fd, path, owner_pid

    def release(self) -> None:
        if self.fd < 0 or os.getpid() != self.owner_pid:  # a forked child shares the flock; never release it there
            return
        fd, self.fd = self.fd, -1
        try:
            st, here = os.fstat(fd), os.stat(self.path)
            if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
                os.unlink(self.path)  # unlinked while still flocked: a racing opener sees a new inode and retries
        except OSError:
            pass  # already gone, or the directory was removed: nothing left to release
        finally:
            os.close(fd)  # drops the flock


class RunLock:
    """Exclusive lock on a run directory (see the module docstring). Also a context manager."""

    def __init__(self, run_dir: str | os.PathLike, *, break_lock: bool = False,
                 notify: Callable[[str], None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.break_lock = break_lock
        self.notify = notify or (lambda message: None)
        self._held: _Held | None = None
        self._finalizer = None

    @property
    def held(self) -> bool:
        return self._held is not None and self._held.fd >= 0

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockHeld naming the holder; OSError if the file cannot be
        created (read-only directory, full disk). The run directory must exist."""
        if self.held:
            return self
        for _ in range(10):  # a release racing with us unlinks the file we opened: open it again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                body = self._read(fd)
                os.close(fd)
                raise RunLockHeld(self._held_message(body, "")) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                st, here = os.fstat(fd), os.stat(self.path)
                same = (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise RunLockHeld(f"could not lock {self.path}: it keeps being replaced by another run")
        try:
            self._check_body(self._read(fd))
            self._write(fd)
        except BaseException:
            os.close(fd)
            raise
        self._held = _Held(fd, self.path, os.getpid())
        # Backstop for holders that are never released explicitly: runs at garbage collection and at exit.
        self._finalizer = weakref.finalize(self, self._held.release)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the flock (idempotent; a no-op in forked children)."""
        if self._held is not None:
            self._held.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- body -------------------------------------------------------------------------------
    @staticmethod
    def _read(fd: int) -> dict:
        try:
            raw = os.pread(fd, 65536, 0)
            body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (OSError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    def _check_body(self, body: dict) -> None:
        """We hold the flock; refuse anyway if the body names a holder that may be alive."""
        if not body or body.get("pid") is None:
            return
        if body.get("host") != socket.gethostname():
            if not self.break_lock:
                raise RunLockHeld(self._held_message(body, " (another machine: whether that run still lives cannot "
                                                           "be checked from here; if it does not, set "
                                                           "output.break_lock=true)"))
            self.notify(f"breaking the lock of {self.run_dir} held by {describe(body)} (output.break_lock=true)")
            return
        if _holder_alive(body):
            # Alive but not flocking: this file system's flock is not shared (or is per process). The body decides.
            mine = " (this same process: release the first run's lock first)" if body["pid"] == os.getpid() else ""
            raise RunLockHeld(self._held_message(body, mine))
        self.notify(f"taking over the lock of {self.run_dir} from {describe(body)}, which no longer runs "
                    "(it was killed or its machine restarted)")

    def _write(self, fd: int) -> None:
        me = os.getpid()
        body = {"pid": me, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "boot_id": _boot_id(), "proc_start": _proc_start(me)}
        data = json.dumps(body).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _held_message(self, body: dict, extra: str) -> str:
        holder = describe(body) if body.get("pid") is not None else "another process (it is just starting)"
        return (f"run directory {self.run_dir} is in use by another run: {holder}{extra}; wait for it to finish or "
                f"stop it, or set output.name / output.dir to another folder")
