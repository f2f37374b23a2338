"""One run per run directory. Two real `python -m trainer` processes on one output directory: the
second stops at once (before scanning data or loading a model) with one line naming the first
(pid, host, start time), also with `train.resume=latest`; after `kill -9` of the first, a new run
takes the directory over with a notice and resumes. In-process tests cover the cases a second
machine or a file system without working flock would produce, simulated by writing the lock
file's body as such a holder would (the flock itself is then free).
"""
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_runs import TINY_LORA, ROOT, copy_quickstart_images, trainer_env

from trainer.runlock import LOCK_NAME, RunLock, RunLockHeld, _proc_start

STARTS_WITHIN = 60  # seconds for a refused start on a busy 2-core machine (it is interpreter start-up)


def _args(out: Path, data: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "trainer", "--config", str(TINY_LORA), f"output.dir={out}", f"data.path={data}",
            "data.num_workers=0", "output.tensorboard=false", "output.overwrite=false", "train.batch_size=2",
            "train.save_every=20", "train.log_every=1", *extra]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_second_run_stops_at_once_and_a_killed_runs_lock_is_taken_over(tmp_path):
    (tmp_path / "data").mkdir()
    data = copy_quickstart_images(tmp_path / "data", 4)
    out = tmp_path / "runs"
    run_dir = out / "quickstart"
    first = subprocess.Popen(_args(out, data, "train.max_steps=100000"), cwd=ROOT, env=trainer_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any((run_dir / "checkpoints").glob("step-*")), 240, "the first run's first checkpoint")
        body = json.loads((run_dir / LOCK_NAME).read_text())
        assert body["pid"] == first.pid and body["host"] == socket.gethostname()
        before = sorted(p.name for p in run_dir.iterdir())
        # The second run as a fresh start and as a resume, both while the first one trains.
        seconds = []
        for extra in ([], ["train.resume=latest"]):
            started = time.monotonic()
            second = subprocess.run(_args(out, data, "train.max_steps=200", *extra), cwd=ROOT, env=trainer_env(),
                                    capture_output=True, text=True, timeout=STARTS_WITHIN)
            seconds.append(time.monotonic() - started)
            assert second.returncode == 1, second.stderr
            lines = [line for line in second.stderr.splitlines() if line.strip()]
            assert lines == [
                f"error: run directory {run_dir} is in use by another run: pid {first.pid} on host "
                f"{socket.gethostname()}, started {body['started']}; wait for it to finish or stop it, or set "
                "output.name / output.dir to another folder"], second.stderr
        assert first.poll() is None, "the first run must keep training"
        assert sorted(p.name for p in run_dir.iterdir()) == before  # the refused runs wrote nothing
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
        assert (run_dir / LOCK_NAME).exists()  # a killed run cannot remove its lock file
        third = subprocess.run(_args(out, data, f"train.max_steps={steps[-1] + 2}", "train.resume=latest"), cwd=ROOT,
                               env=trainer_env(), capture_output=True, text=True, timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert third.returncode == 0, third.stderr
    assert (f"taking over the lock of {run_dir} from pid {first.pid} on host {socket.gethostname()}, started "
            f"{body['started']}, which no longer runs") in third.stderr, third.stderr
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{steps[-1]:08d}'}" in third.stderr
    assert not (run_dir / LOCK_NAME).exists()  # released at the end of the run
    print(f"refused starts took {seconds[0]:.1f} s and {seconds[1]:.1f} s")


# ---- in-process: holders the flock cannot show -----------------------------------------------------------
def _write_body(run_dir: Path, **body) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "started": "2024-01-02 03:04:05",
                                                 **body}))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_body(tmp_path, pid=gone.pid)
    notices = []
    with RunLock(tmp_path, notify=notices.append) as lock:
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert notices == [f"taking over the lock of {tmp_path} from pid {gone.pid} on host {socket.gethostname()}, "
                       "started 2024-01-02 03:04:05, which no longer runs (it was killed or its machine restarted)"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_holder_is_refused_even_when_flock_does_not_work(tmp_path, sleeper):
    """A file system whose flock is not shared (NFS without lock support): the flock is free, the
    body names a live process of this host, so the lock is still refused."""
    _wait_for(lambda: _proc_start(sleeper.pid) is not None, 10, "the sleeper")
    _write_body(tmp_path, pid=sleeper.pid, proc_start=_proc_start(sleeper.pid))
    with pytest.raises(RunLockHeld, match=rf"in use by another run: pid {sleeper.pid} on host .*, started 2024"):
        RunLock(tmp_path).acquire()
    # The same pid with another start time is a new process that reused the pid: stale.
    _write_body(tmp_path, pid=sleeper.pid, proc_start=_proc_start(sleeper.pid) - 1)
    notices = []
    RunLock(tmp_path, notify=notices.append).acquire().release()
    assert len(notices) == 1 and "which no longer runs" in notices[0]


def test_a_lock_from_another_host_needs_break_lock(tmp_path):
    _write_body(tmp_path, pid=4242, host="other-machine")
    with pytest.raises(RunLockHeld, match=r"pid 4242 on host other-machine, started .* \(another machine: .*set "
                                          r"output.break_lock=true\)"):
        RunLock(tmp_path).acquire()
    notices = []
    RunLock(tmp_path, break_lock=True, notify=notices.append).acquire().release()
    assert notices == [f"breaking the lock of {tmp_path} held by pid 4242 on host other-machine, started "
                       "2024-01-02 03:04:05 (output.break_lock=true)"]


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockHeld, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


def test_forked_children_do_not_release_and_garbage_collection_does(tmp_path):
    lock = RunLock(tmp_path).acquire()
    pid = os.fork()
    if pid == 0:  # a DataLoader-like worker: its exit (or an explicit release) must not free the lock
        lock.release()
        os._exit(0)
    os.waitpid(pid, 0)
    assert (tmp_path / LOCK_NAME).exists()
    with pytest.raises(RunLockHeld):
        RunLock(tmp_path).acquire()
    del lock
    gc.collect()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()


def test_a_process_that_exits_without_releasing_removes_its_lock(tmp_path):
    code = f"from trainer.runlock import RunLock; RUN = RunLock({str(tmp_path)!r}).acquire()"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=trainer_env(), check=True, timeout=60)
    assert not (tmp_path / LOCK_NAME).exists()
