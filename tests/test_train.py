"""End-to-end training on the tiny SDXL-shaped model: a CLI run, convergence, exact resume,
data-parallel equivalence and the non-finite-loss stop. CPU only, 64 px, a few dozen steps."""
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_runs import (
    TINY_LORA,
    ROOT,
    copy_quickstart_images,
    trainer_env,
)

import trainer.__main__ as cli
from trainer.config import load_config
from trainer.objective import DiffusionObjective
from trainer.recipe import Denoiser, LoRATrainingRecipe
from trainer.schedule import NoiseSchedule

# Fast in-process runs: in-memory caches, no workers, per-step loss logging.
FAST = ["data.num_workers=0", "data.cache_latents=true", "data.cache_text=true", "output.tensorboard=false",
        "train.log_every=1", "optim.warmup_steps=0", "train.batch_size=2"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """8 of the quickstart images (4 batches of 2 per epoch)."""
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 8)


def _config(out: Path, data: Path, *overrides):
    return load_config(TINY_LORA, [f"output.dir={out}", f"data.path={data}", *FAST, *overrides])


# ---- a run, as a user starts it ----------------------------------------------------------------
def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_cli_run_end_to_end(tmp_path, monkeypatch, capsys):
    """`python -m trainer --config <LoRA run>` as a user runs it, on the random-weight tiny model (one
    test, so that parallel test workers do not each train it): outputs, convergence, the LoRA itself."""
    monkeypatch.chdir(ROOT)  # the config's data path is relative to the repository root
    cmd = [sys.executable, "-m", "trainer", "--config", str(TINY_LORA), f"output.dir={tmp_path}", "train.log_every=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "quickstart"
    cfg = load_config(TINY_LORA)
    steps = cfg.train.max_steps
    lora = run / "quickstart.safetensors"

    # files: LoRA, resolved config, checkpoints (newest keep_last), tensorboard scalars every step
    assert lora.is_file() and (run / "config.yaml").is_file()
    assert "Traceback" not in proc.stderr and str(lora) in proc.stderr  # the summary names the file
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    saves = list(range(cfg.train.save_every, steps + 1, cfg.train.save_every))
    assert checkpoints == [f"step-{s:08d}" for s in saves[-cfg.train.keep_last:]]
    scalars = _scalars(run / "logs")
    for tag in ("train/loss", "train/grad_norm", "train/samples_per_sec", "train/peak_memory_mb", "lr/unet_lora"):
        assert tag in scalars, f"tensorboard lacks {tag}: {sorted(scalars)}"
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, steps + 1))
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_steps"] == str(steps) and meta["ss_optimizer"] == "adamw" and meta["ss_num_train_images"] == "12"
    assert meta["lorasmith.family"] == "tiny-sdxl" and meta["ss_seed"] == str(cfg.train.seed)
    assert json.loads(meta["lorasmith.config"])["train"]["max_steps"] == steps
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)

    # convergence: mean loss of the last 10% of steps < 0.8 x the first 10%
    losses = [v for _, v in scalars["train/loss"]]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.8 * first, f"loss did not fall enough: first {first:.4f}, last {last:.4f}"

    # `python -m trainer lora inspect` reads it and every key matches the model
    capsys.readouterr()
    assert cli.main(["lora", "inspect", str(lora), "--family", "tiny-sdxl"]) == 0
    assert "key check against tiny-sdxl: all" in capsys.readouterr().out

    losses = _denoising_losses(cfg, lora)
    assert losses[1.0] < 0.8 * losses[0.0], losses


@torch.no_grad()
def _denoising_losses(cfg, lora: Path) -> dict[float, float]:
    """Loss on the training images at fixed noise/timesteps, with the exported (fp16) LoRA loaded
    into a fresh base model at strength 0 (the base) and 1."""
    import models
    from data.dataset import build_dataset
    from data.loader import build_dataloader

    bundle = models.build_model(cfg.model.source, seed=cfg.model.seed)
    network = models.load_lora(bundle, lora)
    dataset = build_dataset(cfg.data, seed=0, log_summary=False)
    batch = next(iter(build_dataloader(dataset, len(dataset), shuffle=False)))
    latents = bundle.vae.encode(batch["pixels"]).mean * bundle.vae.config.scaling_factor
    context, pooled = bundle.encode_prompt(batch["caption"])
    objective = DiffusionObjective(NoiseSchedule())
    denoiser = Denoiser(bundle, encode_text=False)
    losses = {}
    for multiplier in (0.0, 1.0):
        network.multiplier = multiplier
        total = 0.0
        for seed in range(4):
            noise, t = objective.sample(latents.shape[1:], range(len(latents)), seed=1000 + seed)
            noisy, target = objective.noisy_and_target(latents, noise, t)
            pred = denoiser(noisy, t, cond={"context": context, "pooled": pooled}, time_ids=batch["add_time_ids"])
            total += objective.loss(pred, target, t).item()
        losses[multiplier] = total / 4
    return losses


# ---- precision policy, text-encoder training, validation images -------------------------------------------
def test_bf16_text_encoder_training_with_validation_images(tmp_path, small_data):
    cfg = _config(tmp_path, small_data, "train.max_steps=2", "train.save_every=0", "model.dtype=bf16",
                  "train.mixed_precision=bf16", "train.train_text_encoders=true", "data.cache_text=false",
                  "train.gradient_checkpointing=true", "train.grad_accum=2", "optim.te_lr=1e-3",
                  "sample.prompts=[a red circle, a blue square]", "sample.every=1", "sample.steps=2",
                  "output.tensorboard=true")
    recipe = LoRATrainingRecipe(cfg)
    summary = recipe.run()
    assert summary.completed and all(math.isfinite(v) for v in summary.losses)
    assert {p.dtype for p in recipe.network.parameters()} == {torch.float32}  # adapters train in fp32
    assert recipe.bundle.unet.dtype == torch.bfloat16 and recipe.group_names == ["unet_lora", "text_encoder_lora"]
    run = tmp_path / "quickstart"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000001.png", "step-00000002.png"]
    from PIL import Image

    assert Image.open(run / "samples" / "step-00000002.png").size == (128, 64)  # 2 prompts side by side
    with safe_open(str(run / "quickstart.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)


def test_samples_at_start_are_the_base_model_and_rows_hold_one_prompt(tmp_path, small_data):
    """sample.at_start renders step 0 (the base: a new LoRA is a no-op) and images_per_prompt puts
    each prompt's images (seeds seed, seed + 1, ...) in one row."""
    from PIL import Image

    from models.checkpoints.open import open_model
    from trainer.samples import image_grid
    from trainer.sampling.pipeline import Txt2ImgPipeline

    prompts = ["a red circle", "a blue square"]
    cfg = _config(tmp_path, small_data, "train.max_steps=2", "train.save_every=0", "optim.lr=5e-2",
                  f"sample.prompts=[{', '.join(prompts)}]", "sample.at_start=true", "sample.images_per_prompt=3",
                  "sample.steps=3", "sample.seed=5")
    assert LoRATrainingRecipe(cfg).run().completed
    samples = tmp_path / "quickstart" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-00000000.png", "step-00000002.png"]
    before, after = (Image.open(samples / f"step-{s:08d}.png").convert("RGB") for s in (0, 2))
    assert before.size == (3 * 64, 2 * 64)
    base = open_model(cfg.model.source, seed=cfg.model.seed)
    images = Txt2ImgPipeline(base)(prompts, steps=3, guidance_scale=cfg.sample.guidance_scale, seed=5, width=64,
                                   height=64, n=3, progress=False)
    # The base model's pictures (up to the last 8-bit level: the wrapped layers may round differently)
    base_grid = np.asarray(image_grid(images, columns=3), dtype=np.int16)
    assert np.abs(np.asarray(before, dtype=np.int16) - base_grid).max() <= 2
    assert np.abs(np.asarray(after, dtype=np.int16) - base_grid).mean() > 2  # the trained LoRA changed them


# ---- exact resume ---------------------------------------------------------------------------------------
def test_interrupt_and_resume_equal_uninterrupted_run(tmp_path, small_data):
    extra = ["train.max_steps=6", "train.save_every=0", "lora.dropout=0.1", "lora.module_dropout=0.2",
             "data.caption_dropout=0.3", "train.noise_offset=0.05", "optim.scheduler=cosine"]
    full = LoRATrainingRecipe(_config(tmp_path / "a", small_data, *extra))
    full_summary = full.run()
    assert full_summary.completed and len(full_summary.losses) == 6

    part = LoRATrainingRecipe(_config(tmp_path / "b", small_data, *extra))
    part.setup()
    step_fn = part._train_step

    def interrupted_step(batches):
        step_fn(batches)
        if part.step == 2:  # the third step is running: Ctrl-C arrives now
            signal.raise_signal(signal.SIGINT)

    part._train_step = interrupted_step
    part_summary = part.train()
    assert not part_summary.completed and "SIGINT at step 3" in part_summary.stopped
    assert part_summary.exit_code == 128 + signal.SIGINT
    assert part_summary.checkpoint.name == "step-00000003"
    assert not (tmp_path / "b" / "quickstart" / "quickstart.safetensors").exists()

    resumed = LoRATrainingRecipe(_config(tmp_path / "b", small_data, *extra, "train.resume=latest"))
    resumed_summary = resumed.run()
    assert resumed_summary.completed and resumed_summary.start_step == 3
    assert part_summary.losses + resumed_summary.losses == full_summary.losses
    want, got = full.network.state_dict(), resumed.network.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), key


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, small_data):
    cfg = _config(tmp_path, small_data, "train.max_steps=1", "output.overwrite=false")
    LoRATrainingRecipe(cfg).run()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    with pytest.raises(RuntimeError, match="already has checkpoints.*train.resume=latest"):
        LoRATrainingRecipe(cfg).setup()


# ---- data parallel ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_encoders", [False, True], ids=["unet", "unet+text-encoders"])
def test_two_process_data_parallel_equals_single_process(tmp_path, small_data, text_encoders):
    """2 gloo processes x batch 2 == 1 process accumulating the same 2 batches per step, also when
    the text encoders train (every adapter must get a gradient in every step, or DDP stops)."""
    common = [f"data.path={small_data}", "train.max_steps=3", "train.save_every=0", "train.device=cpu",
              "optim.warmup_steps=0", "train.batch_size=2", "data.num_workers=0", "output.tensorboard=false"]
    if text_encoders:
        common += ["train.train_text_encoders=true", "data.cache_text=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer", "--config", str(TINY_LORA), f"output.dir={tmp_path / 'ddp'}", *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = LoRATrainingRecipe(load_config(TINY_LORA, [f"output.dir={tmp_path / 'one'}", *common,
                                                         "train.grad_accum=2"]))
    summary = single.run()
    ckpt = "quickstart/checkpoints/step-00000003"
    ddp = load_file(str(tmp_path / "ddp" / ckpt / "adapter.safetensors"))
    one = load_file(str(tmp_path / "one" / ckpt / "adapter.safetensors"))
    assert ddp.keys() == one.keys()
    assert any(".te1." in k or "te1" in k for k in one) == text_encoders, sorted(one)[:3]
    for key in one:
        err = (ddp[key] - one[key]).norm() / one[key].norm().clamp(min=1e-12)
        assert err <= 1e-5, (key, float(err))
    ddp_loss = json.loads((tmp_path / "ddp" / ckpt / "meta.json").read_text())["loss"]
    assert math.isclose(ddp_loss, summary.losses[-1], rel_tol=1e-5)


# ---- non-finite loss ------------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step(tmp_path, small_data, monkeypatch, capsys):
    real_loss = DiffusionObjective.loss
    calls = {"n": 0}

    def poisoned(self, pred, target, timesteps, **weights):
        calls["n"] += 1
        loss = real_loss(self, pred, target, timesteps, **weights)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(DiffusionObjective, "loss", poisoned)
    args = ["--config", str(TINY_LORA), f"output.dir={tmp_path}", f"data.path={small_data}", *FAST,
            "train.max_steps=8", "train.save_every=2", "train.log_every=5"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradients at step 3" in err and "Traceback" not in err
    run = tmp_path / "quickstart"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    assert "step-00000002" in err  # names the last good checkpoint
    assert not (run / "quickstart.safetensors").exists()
