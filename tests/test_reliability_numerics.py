"""Numerical faults: a NaN in the loss or in the gradients stops the run naming the step and keeps
the last good checkpoint (never saving weights the bad step produced); with fp16 loss scaling an
overflowing step is skipped and training goes on.

fp16 autocast needs CUDA (accelerate gives no scaler on the CPU and the recipe refuses fp16
there), so on the CPU the loss-scaling path runs with a `torch.amp.GradScaler("cpu")` put in
place of accelerate's: the same `AcceleratedOptimizer` / `Accelerator.backward` code, just no
fp16 autocast. The `gpu` test does the same with real fp16 mixed precision.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_runs import TINY_LORA, copy_quickstart_images

import trainer.__main__ as cli
from trainer.config import load_config
from trainer.objective import DiffusionObjective
from trainer.recipe import LoRATrainingRecipe

RUN = ["data.num_workers=0", "data.cache_latents=true", "data.cache_text=true", "output.tensorboard=false",
       "optim.warmup_steps=0", "train.batch_size=2", "train.max_steps=6", "train.save_every=2",
       "train.log_every=5", "train.keep_last=5"]
BAD_STEP = 4  # a checkpoint step that is not a log step: the hardest place to catch it

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 4, captions=False)


def _poison_gradients(monkeypatch, step: int, value: float) -> None:
    """Multiply every LoRA gradient by `value` in optimizer step `step` (1-based)."""
    real = LoRATrainingRecipe._inject_lora

    def inject(self):
        real(self)
        for p in self.network.parameters():
            p.register_hook(lambda g: g * value if self.step + 1 == step else g)

    monkeypatch.setattr(LoRATrainingRecipe, "_inject_lora", inject)


def _poison_loss(monkeypatch, step: int) -> None:
    real = DiffusionObjective.loss
    calls = {"n": 0}

    def loss(self, pred, target, timesteps, **weights):
        calls["n"] += 1
        value = real(self, pred, target, timesteps, **weights)
        return value * float("nan") if calls["n"] == step else value

    monkeypatch.setattr(DiffusionObjective, "loss", loss)


@pytest.mark.parametrize("where,clip", [("loss", "1.0"), ("gradients", "1.0"), ("gradients", "null")],
                         ids=["nan-loss", "nan-grad-clipped", "nan-grad-unclipped"])
def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys,
                                                                          where, clip):
    if where == "loss":
        _poison_loss(monkeypatch, BAD_STEP)
    else:
        _poison_gradients(monkeypatch, BAD_STEP, float("nan"))
    rc = cli.main(["--config", str(TINY_LORA), f"output.dir={tmp_path}", f"data.path={data}", *RUN,
                   f"train.max_grad_norm={clip}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    run = tmp_path / "quickstart"
    assert f"non-finite loss or gradients at step {BAD_STEP}" in errors[0], errors[0]
    assert "step-00000002" in errors[0]  # names the last good checkpoint
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    weights = load_file(str(run / "checkpoints" / "step-00000002" / "adapter.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not list(run.glob("*.safetensors"))  # nothing exported from the poisoned weights


def _use_cpu_loss_scaler(recipe: LoRATrainingRecipe, init_scale: float):
    """Give the set-up recipe the loss scaler accelerate would create for fp16 on a GPU."""
    from accelerate.optimizer import AcceleratedOptimizer

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    recipe.accelerator.scaler = scaler
    inner = recipe.optimizer.optimizer  # fp16 runs build the unfused optimizer (allow_fused=False)
    for group in inner.param_groups:
        group["fused"] = False
    inner._step_supports_amp_scaling = False
    recipe.optimizer = AcceleratedOptimizer(recipe.optimizer.optimizer, device_placement=False, scaler=scaler)
    return scaler


def _track_steps(recipe: LoRATrainingRecipe) -> list[dict]:
    """Per optimizer step: whether it was skipped and whether the adapter weights changed."""
    record, real = [], recipe._train_step

    def step(batches):
        before = [p.detach().clone() for p in recipe.trainable]
        real(batches)
        changed = any(not torch.equal(a, p) for a, p in zip(before, recipe.trainable))
        record.append({"skipped": recipe.optimizer.step_was_skipped, "changed": changed,
                       "scale": recipe.accelerator.scaler.get_scale()})

    recipe._train_step = step
    return record


def test_loss_scaling_skips_an_overflowing_step_and_training_continues(data, tmp_path, monkeypatch):
    _poison_gradients(monkeypatch, 3, float("inf"))
    cfg = load_config(TINY_LORA, [f"output.dir={tmp_path}", f"data.path={data}", *RUN, "train.max_grad_norm=null"])
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    scaler = _use_cpu_loss_scaler(recipe, init_scale=2.0**8)
    steps = _track_steps(recipe)
    summary = recipe.train()

    assert summary.completed and all(torch.isfinite(torch.tensor(summary.losses)))
    assert [s["skipped"] for s in steps] == [False, False, True, False, False, False]
    assert [s["changed"] for s in steps] == [True, True, False, True, True, True]
    assert [s["scale"] for s in steps] == [256.0] * 2 + [128.0] * 4  # halved once, at the overflow
    inner = recipe.optimizer.optimizer
    assert {int(inner.state[p]["step"]) for p in recipe.trainable} == {5}  # 6 steps, one skipped
    saved = torch.load(tmp_path / "quickstart" / "checkpoints" / "step-00000006" / "scaler.pt", weights_only=True)
    assert saved["scale"] == scaler.get_scale() == 128.0  # a resume continues with the reduced scale
    assert all(torch.isfinite(p).all() for p in recipe.trainable)


@pytest.mark.gpu
def test_fp16_mixed_precision_skips_an_overflowing_step_on_gpu(data, tmp_path, monkeypatch):
    _poison_gradients(monkeypatch, 3, float("inf"))
    cfg = load_config(TINY_LORA, [f"output.dir={tmp_path}", f"data.path={data}", *RUN,
                                   "train.mixed_precision=fp16", "train.device=auto"])
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    assert recipe.accelerator.scaler is not None
    steps = _track_steps(recipe)
    summary = recipe.train()
    assert summary.completed
    assert steps[2]["skipped"] and not steps[2]["changed"]
    assert not any(s["skipped"] for i, s in enumerate(steps) if i != 2)
    assert steps[2]["scale"] == steps[1]["scale"] / 2
