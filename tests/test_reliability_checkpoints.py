"""Resuming loads nothing unsafe and fails clearly on damaged or foreign checkpoints.

Checkpoints hold safetensors, JSON and `torch.load(weights_only=True)` pickles only. A checkpoint
file replaced by a pickle that would run code when unpickled is refused with one error naming the
file, and the code never runs; a truncated or mismatched checkpoint gets one clear error and the
files on disk are left as they were.
"""
import ast
import os
import shutil
from pathlib import Path

import pytest
import torch
from training_runs import TINY_LORA, ROOT, copy_quickstart_images

import trainer.__main__ as cli
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.optim import build_scheduler

RUNTIME_PACKAGES = ("models", "trainer", "data")
RUN = ["data.num_workers=0", "data.cache_latents=true", "data.cache_text=true", "output.tensorboard=false",
       "optim.warmup_steps=0", "train.batch_size=2", "train.max_steps=2", "train.save_every=1"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class _Payload:
    """Unpickling this creates the directory `marker` (what an attacker's code could do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_pickle(path: Path, marker: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, path)


# ---- static: every unpickling call in runtime code is weights-only ------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_runtime_code_only_unpickles_weights():
    offenders, torch_loads = [], set()
    for package in RUNTIME_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names]
                    module = getattr(node, "module", None) or ""
                    if {"dill", "cloudpickle", "joblib"} & {module, *names} or (
                            module in ("torch", "pickle") and {"load", "loads", "Unpickler"} & set(names)):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module or names}")
            for call in _calls(tree):
                name = _dotted(call.func)
                where = f"{path.relative_to(ROOT)}:{call.lineno}"
                keywords = {k.arg: k.value for k in call.keywords}
                if name in ("torch.load", "torch.serialization.load"):
                    torch_loads.add(str(path.relative_to(ROOT)))
                    value = keywords.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        offenders.append(f"{where} calls {name} without weights_only=True")
                elif name.endswith(("np.load", "numpy.load")):
                    value = keywords.get("allow_pickle")
                    if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                        offenders.append(f"{where} calls {name} with allow_pickle")
                elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                    offenders.append(f"{where} calls {name}")
    # the scan sees the code that unpickles: resume (checkpoints) and opt-in .ckpt model loading
    assert {"trainer/checkpoint.py", "models/checkpoints/components.py"} <= torch_loads, torch_loads
    assert not offenders, offenders


# ---- tampered / damaged checkpoint files ------------------------------------------------------------------
@pytest.fixture
def small_checkpoint(tmp_path) -> CheckpointManager:
    """Checkpoints of steps 1 and 2 of a tiny Linear model (written by the real CheckpointManager)."""

    class Cfg:
        scheduler, warmup_steps, num_cycles, min_lr_ratio = "cosine", 1, 1, 0.0

    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    sched = build_scheduler(opt, Cfg, max_steps=4)
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    for step in (1, 2):
        layer(torch.randn(2, 4)).square().mean().backward()
        opt.step()
        sched.step()
        mgr.save(step, weights=dict(layer.state_dict()), optimizer=opt, scheduler=sched,
                 scaler=torch.amp.GradScaler("cpu"), trainer_state={"data": {"epoch": 0, "batch_index": step}})
    return mgr


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.pt", "rng-0.pt"])
def test_a_code_running_pickle_in_a_checkpoint_is_refused(small_checkpoint, tmp_path, name):
    ckpt = small_checkpoint.latest()
    marker = tmp_path / "payload-ran"
    _evil_pickle(ckpt / name, marker)
    with pytest.raises(CheckpointError) as info:
        small_checkpoint.load(ckpt)
    message = str(info.value)
    assert name in message and str(ckpt) in message and "\n" not in message, message
    assert not marker.exists(), "the checkpoint's pickle ran code"
    # the same file would have run code through a plain torch.load: the test can fail
    torch.load(ckpt / name, weights_only=False)
    assert marker.exists()


def test_a_truncated_latest_checkpoint_names_the_file_and_the_previous_one(small_checkpoint):
    ckpt = small_checkpoint.latest()
    data = (ckpt / "adapter.safetensors").read_bytes()
    (ckpt / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        small_checkpoint.load(ckpt)
    message = str(info.value)
    assert "adapter.safetensors" in message and str(ckpt) in message
    assert "step-00000001" in message and "train.resume=" in message, message  # what to do instead


# ---- the same through a real resume -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(output dir, data dir) of a finished 2-step run (checkpoints step-1 and step-2) on 4 images."""
    from accelerate.state import AcceleratorState, GradientState

    data = copy_quickstart_images(tmp_path_factory.mktemp("data"), 4, captions=False)
    out = tmp_path_factory.mktemp("out")
    AcceleratorState._reset_state()
    GradientState._reset_state()
    assert cli.main(_args(out, data)) == 0
    return out, data


def _args(out: Path, data: Path, *extra) -> list[str]:
    return ["--config", str(TINY_LORA), f"output.dir={out}", f"data.path={data}", *RUN, *extra]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_resume_from_a_tampered_checkpoint_fails_cleanly(trained, tmp_path, capsys):
    out, data = tmp_path / "out", trained[1]
    shutil.copytree(trained[0] / "quickstart", out / "quickstart")
    marker = tmp_path / "payload-ran"
    _evil_pickle(out / "quickstart" / "checkpoints" / "step-00000002" / "optimizer.pt", marker)
    before = _snapshot(out / "quickstart")
    capsys.readouterr()
    rc = cli.main(_args(out, data, "train.resume=latest", "train.max_steps=3"))
    line = _one_error_line(capsys.readouterr().err)
    assert rc != 0 and "optimizer.pt" in line and "step-00000002" in line, line
    assert not marker.exists()
    assert _snapshot(out / "quickstart") == before


def test_resume_with_another_lora_layout_fails_cleanly(trained, tmp_path, capsys):
    """A failed resume leaves the run as it was, its config.yaml included (users resume with
    `--config <run>/config.yaml train.resume=latest`, so it must keep describing the checkpoints)."""
    out, data = tmp_path / "out", trained[1]
    shutil.copytree(trained[0] / "quickstart", out / "quickstart")
    before = _snapshot(out / "quickstart")
    capsys.readouterr()
    rc = cli.main(_args(out, data, "train.resume=latest", "train.max_steps=3", "lora.rank=4"))
    line = _one_error_line(capsys.readouterr().err)
    assert rc != 0 and "does not match the LoRA layout" in line and "step-00000002" in line, line
    assert _snapshot(out / "quickstart") == before
