"""A data-parallel run (`torchrun --nproc_per_node 2`, gloo on the CPU) whose non-main process is
killed with SIGKILL mid-run: the launch ends within bounded time (torchrun stops the survivor,
whose next collective fails at once: gloo sees the closed socket), the main process prints one
`error:` line naming the lost process and the last complete checkpoint, every complete checkpoint
equals the uninterrupted run's, and `train.resume=latest` finishes with the same LoRA.

No timeout had to be set: on one machine the dead worker's sockets close with it, and torchrun
SIGTERMs (then, after 30 s, SIGKILLs) the other workers as soon as one fails. The uninterrupted
reference and the killed launch run side by side.
"""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from training_runs import TINY_LORA, ROOT, copy_quickstart_images, trainer_env

from trainer.checkpoint import CheckpointManager

STEPS = 16
KILL_AFTER = 4  # the non-main process is killed once the step-4 checkpoint is complete
ENDS_WITHIN = 60  # seconds from the kill to the end of the launch (torchrun's grace period is 30 s)
TOL = 1e-6
COMMON = ["train.device=cpu", f"train.max_steps={STEPS}", "train.save_every=2", "train.keep_last=20",
          "train.batch_size=2", "optim.warmup_steps=0", "data.num_workers=0", "output.tensorboard=false",
          "output.export_dtype=fp32", "train.log_every=1", "lora.dropout=0.1", "train.cpu_threads=1"]

pytestmark = pytest.mark.slow


def _launch(out: Path, data: Path, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer",
           "--config", str(TINY_LORA), f"output.dir={out}", f"data.path={data}", *COMMON, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _worker(launcher: int, rank: int) -> int | None:
    """pid of the worker with RANK=rank among the launcher's children (None until it exists)."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _steps(run: Path) -> list[int]:
    return [s for s, _ in CheckpointManager(run / "checkpoints").list()]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_killing_one_process_ends_the_launch_and_resume_finishes_the_same(tmp_path):
    (tmp_path / "data").mkdir()
    data = copy_quickstart_images(tmp_path / "data", 8)
    reference = _launch(tmp_path / "ref", data)
    killed = _launch(tmp_path / "killed", data)
    run = tmp_path / "killed" / "quickstart"
    try:
        deadline = time.monotonic() + 300
        while not any(s >= KILL_AFTER for s in _steps(run)):
            assert killed.poll() is None and time.monotonic() < deadline, "the launch ended before the kill"
            time.sleep(0.05)
        victim = _worker(killed.pid, 1)
        assert victim is not None
        subprocess.run(["kill", "-9", str(victim)], check=True)
        t0 = time.monotonic()
        _, err = killed.communicate(timeout=ENDS_WITHIN)
        took = time.monotonic() - t0
    finally:
        for proc in (killed,):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ref_err = reference.communicate(timeout=600)[1]
    assert reference.returncode == 0, ref_err[-3000:]
    assert killed.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    kept = _steps(run)
    assert kept and kept[-1] < STEPS
    last = run / "checkpoints" / f"step-{kept[-1]:08d}"
    assert len(errors) == 1 and re.fullmatch(
        r"error: another process of this 2-process run stopped or lost its connection \([^)]*(closed|reset) "
        rf"by peer[^)]*\); the last complete checkpoint is {re.escape(str(last))}\. Look for the cause in the "
        r"other processes' output, then continue with train.resume=latest", errors[0]), err[-3000:]
    assert "recipe.py" not in err and "site-packages/accelerate" not in err  # no worker traceback (torchrun prints its own)
    assert not (run / ".lock").exists()  # the main process released it on its way out
    ref_run = tmp_path / "ref" / "quickstart"
    for step in kept:  # every checkpoint left behind is complete and is the uninterrupted run's
        name = f"checkpoints/step-{step:08d}/adapter.safetensors"
        assert _max_diff(load_file(str(run / name)), load_file(str(ref_run / name))) == 0.0, step

    resumed = _launch(tmp_path / "killed", data, "train.resume=latest")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step-{kept[-1]:08d}'} at step {kept[-1]}" in err
    final = load_file(str(run / "quickstart.safetensors"))
    want = load_file(str(ref_run / "quickstart.safetensors"))
    assert _max_diff(final, want) <= TOL
    print(f"launch ended {took:.1f} s after the kill at checkpoint {kept[-1]}")
