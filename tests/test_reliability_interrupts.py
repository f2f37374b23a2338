"""Fault injection: a run killed with SIGKILL (at a random step, or between writing and renaming
a checkpoint or the LoRA), a full disk and a read-only output directory never lose saved work,
and `train.resume=latest` then finishes with the same LoRA as an uninterrupted run.

One uninterrupted in-process run is the reference. The killed runs are real `python -m trainer`
processes started together at module setup (they are mostly start-up time, so they overlap).
Crashes between write and rename are injected by `_KILL_RUNNER`, which wraps `os.replace` so
that the process SIGKILLs itself right before the rename of one named file: no hook in the code.
"""
import builtins
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_runs import TINY_LORA, ROOT, copy_quickstart_images, trainer_env

import trainer.__main__ as cli
import trainer.checkpoint as checkpoint_module
from trainer.checkpoint import CheckpointManager
from trainer.config import load_config
from trainer.recipe import LoRATrainingRecipe

STEPS = 10
# 8 images, batch 2: 4 batches per epoch, so 10 steps cross two epoch boundaries. LoRA dropout and
# noise offset make the result depend on the restored RNG state; fp32 export allows exact checks.
RUN = ["data.num_workers=0", "data.cache_latents=true", "data.cache_text=true", "output.tensorboard=false",
       "optim.warmup_steps=0", "train.batch_size=2", f"train.max_steps={STEPS}", "train.save_every=2",
       "train.keep_last=3", "train.export_every=4", "train.log_every=1", "output.export_dtype=fp32",
       "lora.dropout=0.1", "train.noise_offset=0.05"]
KILL_SEED = int(os.environ.get("LORASMITH_KILL_SEED", "1234"))
KILL_STEP = random.Random(KILL_SEED).randint(3, STEPS - 2)
TOL = 1e-6

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# `python -c _KILL_RUNNER NAME ARGS...`: the trainer CLI, SIGKILLed right before `os.replace`
# moves anything onto a path whose last component is NAME (after every byte of it was written).
_KILL_RUNNER = r"""
import os, signal, sys
from pathlib import Path
target, args = sys.argv[1], sys.argv[2:]
real_replace = os.replace
def replace(src, dst, *a, **k):
    if Path(dst).name == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
from trainer.__main__ import main
sys.exit(main(args))
"""


def _args(out: Path, data: Path, *extra) -> list[str]:
    return ["--config", str(TINY_LORA), f"output.dir={out}", f"data.path={data}", *RUN, *extra]


def _config(out: Path, data: Path, *extra):
    return load_config(TINY_LORA, _args(out, data, *extra)[2:])


def _run_dir(out: Path) -> Path:
    return out / "quickstart"


def _adapter(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "adapter.safetensors"))


def _lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _complete_steps(run: Path) -> list[int]:
    return [s for s, _ in CheckpointManager(run / "checkpoints").list()]


def _no_visible_partials(run: Path) -> None:
    """Every `step-*` directory is a complete checkpoint and every visible `.safetensors` file
    reads; unfinished writes may only exist under hidden temporary names."""
    ckpts = run / "checkpoints"
    visible = sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("."))
    assert visible == [p.name for _, p in CheckpointManager(ckpts).list()], visible
    for path in run.glob("*.safetensors"):
        _lora(path)


# ---- the reference run and the killed processes ------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 8)


class _Killed:
    """A `python -m trainer` process; `kill_at_step` SIGKILLs it once its progress bar shows that step."""

    def __init__(self, out: Path, data: Path, kill_before_rename: str | None = None, kill_at_step: int | None = None):
        self.out, self.kill_at_step, self.stderr, self.seen_step = out, kill_at_step, "", 0
        prefix = ["-c", _KILL_RUNNER, kill_before_rename] if kill_before_rename else ["-m", "trainer"]
        self.proc = subprocess.Popen([sys.executable, *prefix, *_args(out, data)], cwd=ROOT, env=trainer_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        progress = re.compile(r"training:\s*\d+%\|[^|]*\|\s*(\d+)/\d+")
        while chunk := self.proc.stderr.read(64):
            self.stderr += chunk
            steps = [int(s) for s in progress.findall(self.stderr[-400:])]
            self.seen_step = max([self.seen_step, *steps])
            if self.kill_at_step is not None and self.seen_step >= self.kill_at_step and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)

    def wait(self) -> "_Killed":
        self.proc.wait(timeout=300)
        self.reader.join(timeout=30)
        return self


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Start the three killed processes, then train the reference in-process while they run."""
    base = tmp_path_factory.mktemp("runs")
    killed = {
        "random": _Killed(base / "random", data, kill_at_step=KILL_STEP),
        "checkpoint": _Killed(base / "checkpoint", data, kill_before_rename="step-00000004"),
        "lora": _Killed(base / "lora", data, kill_before_rename="quickstart-step00000008.safetensors"),
    }
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    recipe = LoRATrainingRecipe(_config(base / "reference", data))
    recipe.setup()
    saved: dict[int, dict[str, torch.Tensor]] = {}
    real_save = recipe.ckpt.save

    def save(step, **kwargs):  # remember every checkpoint, keep_last prunes the files
        saved[step] = {k: v.detach().clone() for k, v in kwargs["weights"].items()}
        return real_save(step, **kwargs)

    recipe.ckpt.save = save
    summary = recipe.train()
    assert summary.completed
    run = _run_dir(base / "reference")
    reference = {"summary": summary, "adapters": saved, "run": run, "epoch": recipe.loader.epoch,
                 "lora": _lora(run / "quickstart.safetensors")}
    for k in killed.values():
        k.wait()
    return reference, killed


def _resume(out: Path, data: Path, *extra) -> tuple[LoRATrainingRecipe, object]:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    recipe = LoRATrainingRecipe(_config(out, data, "train.resume=latest", *extra))
    return recipe, recipe.run()


def _assert_matches_reference(reference: dict, out: Path, resumed_summary, start: int) -> None:
    """The resumed run continued at `start` and ended exactly where the reference ended."""
    run = _run_dir(out)
    ref = reference["summary"]
    assert resumed_summary.completed and resumed_summary.start_step == start and resumed_summary.step == STEPS
    got_losses, want_losses = resumed_summary.losses, ref.losses[start:]
    assert len(got_losses) == len(want_losses)
    assert max((abs(a - b) for a, b in zip(got_losses, want_losses)), default=0.0) <= TOL, (got_losses, want_losses)
    assert _max_diff(_adapter(run, STEPS), reference["adapters"][STEPS]) <= TOL
    tensors, meta = _lora(run / "quickstart.safetensors")
    want_tensors, want_meta = reference["lora"]
    assert _max_diff(tensors, want_tensors) <= TOL
    assert meta["ss_steps"] == want_meta["ss_steps"] == str(STEPS)
    assert meta["ss_epoch"] == want_meta["ss_epoch"] == str(reference["epoch"])
    state = torch.load(run / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.pt", weights_only=True)
    assert state["step"] == STEPS and state["epoch"] == reference["epoch"]
    meta_json = json.loads((run / "checkpoints" / f"step-{STEPS:08d}" / "meta.json").read_text())
    assert meta_json["step"] == STEPS and meta_json["epoch"] == reference["epoch"] and meta_json["complete"]
    assert _complete_steps(run) == [STEPS - 4, STEPS - 2, STEPS]  # keep_last=3 after the resume too
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no debris left


# ---- kill -9 -----------------------------------------------------------------------------------------------
def test_kill9_at_a_random_step_then_resume_equals_uninterrupted_run(runs, data):
    reference, killed = runs
    k = killed["random"]
    assert k.proc.returncode == -signal.SIGKILL, f"not killed (exit {k.proc.returncode}):\n{k.stderr[-2000:]}"
    assert KILL_STEP <= k.seen_step < STEPS
    run = _run_dir(k.out)
    assert not (run / "quickstart.safetensors").exists()
    steps = _complete_steps(run)
    # the checkpoint of every even step before the one seen in the progress bar was written
    assert steps and steps[-1] >= 2 * ((k.seen_step - 1) // 2) and all(s % 2 == 0 for s in steps), steps
    _no_visible_partials(run)
    for step in steps:  # each surviving checkpoint equals the reference's at that step
        assert _max_diff(_adapter(run, step), reference["adapters"][step]) == 0.0, step

    _, summary = _resume(k.out, data)
    _assert_matches_reference(reference, k.out, summary, start=steps[-1])


def test_kill9_between_checkpoint_write_and_rename(runs, data):
    """Killed after writing every file of the step-4 checkpoint, before its rename: the
    hidden half-done directory is never `latest`; step 2 stays intact; resume redoes step 4."""
    reference, killed = runs
    k = killed["checkpoint"]
    assert k.proc.returncode == -signal.SIGKILL, k.stderr[-2000:]
    run = _run_dir(k.out)
    ckpts = run / "checkpoints"
    assert (ckpts / ".tmp-step-00000004" / "meta.json").is_file()  # fully written, never renamed
    assert _complete_steps(run) == [2] and CheckpointManager(ckpts).latest() == ckpts / "step-00000002"
    _no_visible_partials(run)
    loaded = CheckpointManager(ckpts).load(ckpts / "step-00000002")
    assert loaded.step == 2 and _max_diff(loaded.weights, reference["adapters"][2]) == 0.0
    _same_export(run, reference, 4)  # exports are written before the checkpoint of their step

    _, summary = _resume(k.out, data)
    _assert_matches_reference(reference, k.out, summary, start=2)
    _same_export(run, reference, 4)


def _same_export(run: Path, reference: dict, step: int) -> None:
    name = f"quickstart-step{step:08d}.safetensors"
    tensors, meta = _lora(run / name)
    assert meta["ss_steps"] == str(step) and _max_diff(tensors, _lora(reference["run"] / name)[0]) == 0.0


def test_kill9_between_lora_write_and_rename(runs, data):
    """Killed while exporting the step-8 LoRA: the step-4 export is intact and loadable, no file
    carries the step-8 name, and the resumed run writes it (the step-8 checkpoint, written after
    the export, does not exist, so the resume starts at step 6)."""
    import models

    reference, killed = runs
    k = killed["lora"]
    assert k.proc.returncode == -signal.SIGKILL, k.stderr[-2000:]
    run = _run_dir(k.out)
    assert not (run / "quickstart-step00000008.safetensors").exists()
    assert [p.name for p in run.glob(".quickstart-step00000008.safetensors.*")], "the unrenamed temporary file"
    _no_visible_partials(run)
    assert _complete_steps(run) == [2, 4, 6]
    _same_export(run, reference, 4)
    models.load_lora(models.build_model("tiny-sdxl"), run / "quickstart-step00000004.safetensors")

    _, summary = _resume(k.out, data)
    _assert_matches_reference(reference, k.out, summary, start=6)
    _same_export(run, reference, 8)


# ---- full disk, read-only output directory -------------------------------------------------------------
class _FailingDisk:
    """Every attempt to create, write or rename a file under `root` fails with OSError(`code`)
    (root can write anywhere, so chmod cannot make a read-only directory in these tests)."""

    def __init__(self, monkeypatch, root: Path, code: int, dirs: bool = True):
        self.root, self.code, self.hits = str(root.resolve()), code, []
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
        real_replace, real_save_file = os.replace, checkpoint_module.save_file

        def guard(path) -> None:
            full = os.path.abspath(os.fspath(path))
            if full == self.root or full.startswith(self.root + os.sep):
                self.hits.append(full)
                raise OSError(self.code, os.strerror(self.code), full)

        def open_(file, mode="r", *a, **k):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                guard(file)
            return real_open(file, mode, *a, **k)

        def os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                guard(path)
            return real_os_open(path, flags, *a, **k)

        def mkdir(path, *a, **k):
            if dirs:  # a full disk still has room for a directory entry; a read-only one has not
                guard(path)
            return real_mkdir(path, *a, **k)

        def replace(src, dst, *a, **k):
            guard(dst)
            return real_replace(src, dst, *a, **k)

        def save_file(tensors, filename, *a, **k):  # safetensors writes from Rust: guard it here
            guard(filename)
            return real_save_file(tensors, filename, *a, **k)

        for target, name, fn in ((builtins, "open", open_), (io, "open", open_), (os, "open", os_open),
                                 (os, "mkdir", mkdir), (os, "replace", replace),
                                 (checkpoint_module, "save_file", save_file)):
            monkeypatch.setattr(target, name, fn)


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_write_failure_at_a_checkpoint_keeps_earlier_work_and_resumes(runs, data, tmp_path, monkeypatch, capsys,
                                                                     code):
    """The disk fills up (or turns read-only) while the step-4 checkpoint is written."""
    reference, _ = runs
    out = tmp_path / "out"
    run = _run_dir(out)
    real_save = CheckpointManager.save
    disk = []

    def save(self, step, **kwargs):
        if step == 4 and not disk:
            disk.append(_FailingDisk(monkeypatch, run, code, dirs=code != errno.ENOSPC))
        return real_save(self, step, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", save)
    rc = cli.main(_args(out, data))
    line = _one_error_line(capsys.readouterr().err)
    assert rc != 0 and disk and disk[0].hits
    assert os.strerror(code) in line and "step-00000004" in line and "train.resume=latest" in line, line
    monkeypatch.undo()

    assert _complete_steps(run) == [2] and not (run / "quickstart.safetensors").exists()
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # cleaned up
    assert _max_diff(_adapter(run, 2), reference["adapters"][2]) == 0.0
    if code == errno.ENOSPC:
        _, summary = _resume(out, data)
        _assert_matches_reference(reference, out, summary, start=2)


def test_disk_full_while_exporting_the_lora(runs, data, tmp_path, monkeypatch, capsys):
    """ENOSPC while the final LoRA is written: a clear message, the final checkpoint is complete,
    no partial LoRA is left, and resuming only exports."""
    reference, _ = runs
    out = tmp_path / "out"
    run = _run_dir(out)
    real_fsync = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if os.path.basename(target).startswith(".quickstart.safetensors."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc = cli.main(_args(out, data))
    line = _one_error_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert rc != 0
    assert "No space left on device" in line and "quickstart.safetensors" in line and "train.resume=latest" in line
    assert _complete_steps(run)[-1] == STEPS
    assert not (run / "quickstart.safetensors").exists() and not list(run.glob(".quickstart*"))
    _no_visible_partials(run)

    _, summary = _resume(out, data)
    _assert_matches_reference(reference, out, summary, start=STEPS)


def test_read_only_output_directory_fails_before_loading_the_model(runs, data, tmp_path, monkeypatch, capsys):
    """Resuming (or extending) a finished run whose directory has become read-only: one clear
    error before any model is built, and nothing already saved changes."""
    import models
    import models.bundle

    reference, _ = runs
    out = tmp_path / "out"
    shutil.copytree(reference["run"], _run_dir(out))
    before = _snapshot(_run_dir(out))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built although the run directory is not writable")

    monkeypatch.setattr("models.build_model", no_model)
    monkeypatch.setattr(models.bundle, "build_model", no_model)
    disk = _FailingDisk(monkeypatch, _run_dir(out), errno.EACCES)
    rc = cli.main(_args(out, data, "train.resume=latest", f"train.max_steps={STEPS + 2}"))
    line = _one_error_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert rc != 0 and disk.hits
    assert "Permission denied" in line and str(_run_dir(out)) in line and "output.dir" in line, line
    assert _snapshot(_run_dir(out)) == before
    assert models.build_model is not no_model
