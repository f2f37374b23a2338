"""The training recipes end to end on the tiny SDXL-shaped model: every new key trains, the EMA and
validation loss are written and logged (tensorboard and a stand-in wandb module), and a run that
dies without saving (as after kill -9) resumes from its last checkpoint to exactly the result of an
uninterrupted run, with Prodigy or schedule-free AdamW, EMA, masks, regularization images and
validation on."""
import math
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from training_runs import EXAMPLES, TINY_LORA

from trainer.config import load_config
from trainer.recipe import LoRATrainingRecipe

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

BASE = ["data.num_workers=0", "output.tensorboard=false", "train.log_every=1", "optim.warmup_steps=0",
        "train.batch_size=2", "train.save_every=0", "output.export_dtype=fp32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """train/: 6 quickstart images, half with a sidecar mask (left half white) and RGBA copies for
    alpha masks; reg/: 4 images without captions; val/: 2 other images."""
    root = tmp_path_factory.mktemp("recipes")
    images = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    out = {name: root / name for name in ("train", "reg", "val", "alpha")}
    for folder in out.values():
        folder.mkdir()
    for i, img in enumerate(images[:6]):
        shutil.copy(img, out["train"] / img.name)
        (out["train"] / f"{img.stem}.txt").write_text("a {red|green|blue} thing, " + img.stem.split("_", 1)[1])
        rgb = Image.open(img).convert("RGB")
        mask = Image.new("L", rgb.size, 0)
        mask.paste(255, (0, 0, rgb.width // 2, rgb.height))
        if i % 2 == 0:
            mask.save(out["train"] / f"{img.stem}-masklabel.png")
        Image.merge("RGBA", (*rgb.split(), mask)).save(out["alpha"] / f"{img.stem}.png")
    for img in images[6:10]:
        shutil.copy(img, out["reg"] / img.name)
    for img in images[10:12]:
        shutil.copy(img, out["val"] / img.name)
        shutil.copy(img.with_suffix(".txt"), out["val"] / f"{img.stem}.txt")
    return out


def _subsets(folders, train="train") -> str:
    return (f"data.subsets=[{{path: {folders[train]}}}, "
            f"{{path: {folders['reg']}, is_reg: true, default_caption: a shape}}]")


def _config(out: Path, *overrides):
    return load_config(TINY_LORA, [f"output.dir={out}", "data.path=null", *BASE, *overrides])


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _lora(path: Path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


class FakeWandb(types.ModuleType):
    """Stands in for the `wandb` package: records what a run logs (no network)."""

    def __init__(self):
        super().__init__("wandb")
        self.runs, self.logged = [], []
        self.util = types.SimpleNamespace(generate_id=lambda: "run-abc123")
        owner = self

        class Run:
            def log(self, data, step=None):
                owner.logged.append((step, dict(data)))

            def finish(self):
                owner.runs[-1]["finished"] = True

        self._run = Run

    def init(self, **kwargs):
        self.runs.append(dict(kwargs))
        return self._run()

    def Image(self, image):
        return ("image", image.size)


# ---- every key trains ---------------------------------------------------------------------------------
def test_regularization_masks_losses_noise_lora_plus_blocks_and_ema(tmp_path, folders):
    n_blocks = 6  # tiny-sdxl: input_blocks 0..5
    ranks = [4] * n_blocks + [0] + [8] * n_blocks
    cfg = _config(tmp_path, _subsets(folders), "train.max_steps=6", "data.cache_latents=true",
                  "data.cache_text=true", "data.flip=true", "data.caption_prefix='{sks|zwx}'",
                  "train.masked_loss=true", "train.unmasked_weight=0.1", "train.prior_loss_weight=0.5",
                  "train.loss=huber", "train.huber_schedule=snr", "train.huber_c=0.2",
                  "train.timestep_sampling=logit_normal", "train.logit_mean=0.3", "train.timestep_shift=1.5",
                  "train.multires_noise_iterations=4", "train.multires_noise_discount=0.5", "train.ip_noise_gamma=0.1",
                  "train.noise_offset=0.05", "train.min_snr_gamma=5",
                  "optim.lora_plus_ratio=4", "optim.down_lr_weight=0.5", "optim.mid_lr_weight=0",
                  f"lora.block_ranks={ranks}", "train.ema_decay=0.5", "train.ema_every=2", "train.ema_on_cpu=true",
                  "sample.prompts=[a red circle]", "sample.steps=2", "sample.use_ema=true",
                  "validation.split=0.2", "validation.every=3", "output.tensorboard=true", "train.export_every=3")
    recipe = LoRATrainingRecipe(cfg)
    summary = recipe.run()
    assert summary.completed and all(math.isfinite(v) for v in summary.losses)
    assert recipe.dataset.count_images(regularization=True) == 4 and recipe.dataset.held_out is not None
    assert set(recipe.group_names) == {"unet_lora", "unet_lora_up", "unet_lora_x0.5", "unet_lora_x0.5_up"}
    assert next(iter(recipe.weights.ema.shadow.values())).device.type == "cpu"
    run = tmp_path / "quickstart"
    lora, meta = _lora(run / "quickstart.safetensors")
    ema, ema_meta = _lora(run / "quickstart-ema.safetensors")
    assert (run / "quickstart-step00000003-ema.safetensors").is_file()
    assert lora.keys() == ema.keys() and meta["lorasmith.weights"] == "trained" and ema_meta["lorasmith.weights"] == "ema"
    assert meta["ss_num_reg_images"] == "4" and meta["ss_num_train_images"] == "5" and meta["ss_loss_type"] == "huber"
    assert any(not torch.equal(lora[k], ema[k]) for k in lora if k.endswith("lora_up.weight"))
    assert not any("middle_block" in k and k.endswith("lora_up.weight") and lora[k].dim() == 2 for k in lora)
    scalars = _scalars(run / "logs")
    assert [s for s, _ in scalars["val/loss"]] == [3, 6] and [s for s, _ in scalars["val/loss_ema"]] == [3, 6]
    assert "lr/unet_lora_x0.5_up" in scalars
    assert (run / "samples" / "step-00000006.png").is_file()


def test_alpha_masks_smooth_l1_debiased_schedule_free_validation_path_and_wandb(tmp_path, folders, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _config(tmp_path, f"data.path={folders['alpha']}", "train.max_steps=4", "train.masked_loss=true",
                  "data.cache_text=false", "data.cache_latents=false",
                  "data.alpha_mask=true", "train.loss=smooth_l1", "train.huber_schedule=exponential",
                  "train.debiased_estimation=true", "model.prediction_type=v_prediction",
                  "optim.name=adamw_schedulefree", "optim.scheduler=constant", "optim.lr=1e-3",
                  "optim.warmup_steps=2",
                  "train.train_text_encoders=true", f"validation.path={folders['val']}", "validation.every=2",
                  "output.wandb=lorasmith-tests", "output.wandb_name=alpha", "output.tensorboard=true",
                  "sample.prompts=[a red circle]", "sample.steps=2")
    summary = LoRATrainingRecipe(cfg).run()
    assert summary.completed and all(math.isfinite(v) for v in summary.losses)
    run = tmp_path / "quickstart"
    assert fake.runs[0]["project"] == "lorasmith-tests" and fake.runs[0]["name"] == "alpha"
    assert fake.runs[0]["id"] == "run-abc123" and fake.runs[0]["finished"]
    assert (run / "logs" / "wandb-run-id").read_text() == "run-abc123"
    wandb_scalars = {}
    for step, data in fake.logged:
        for key, value in data.items():
            wandb_scalars.setdefault(key, []).append((step, value))
    tensorboard = _scalars(run / "logs")
    for tag, values in tensorboard.items():  # the same scalars, at the same steps
        assert [s for s, _ in wandb_scalars[tag]] == [s for s, _ in values], tag
        assert [v for _, v in wandb_scalars[tag]] == pytest.approx([v for _, v in values], rel=1e-6), tag
    assert [s for s, _ in wandb_scalars["val/loss"]] == [2, 4]
    assert wandb_scalars["samples"] == [(4, ("image", (64, 64)))]


def test_prodigy_with_per_block_freezing_and_uniform_shift(tmp_path, folders):
    n_blocks = 6
    cfg = _config(tmp_path, _subsets(folders), "train.max_steps=4", "optim.name=prodigy", "optim.lr=1.0",
                  "optim.d_coef=0.5", "optim.growth_rate=1.5", "optim.safeguard_warmup=true",
                  "optim.use_bias_correction=true", "optim.beta3=0.99",
                  f"optim.block_lr_weight={[0.0] * n_blocks + [1.0] * (n_blocks + 1)}", "train.timestep_shift=2",
                  "train.ema_decay=0", "train.masked_loss=true")
    recipe = LoRATrainingRecipe(cfg)
    summary = recipe.run()
    assert summary.completed and all(math.isfinite(v) for v in summary.losses)
    inner = recipe.optimizer.optimizer
    assert type(inner).__name__ == "Prodigy" and inner.param_groups[0]["d_coef"] == 0.5
    assert inner.param_groups[0]["growth_rate"] == 1.5 and inner.param_groups[0]["beta3"] == 0.99
    lora, _ = _lora(tmp_path / "quickstart" / "quickstart.safetensors")
    frozen = [k for k in lora if k.startswith("lora_unet_input_blocks") and k.endswith("lora_up.weight")]
    trained = [k for k in lora if k.startswith("lora_unet_output_blocks") and k.endswith("lora_up.weight")]
    assert frozen and all(torch.count_nonzero(lora[k]) == 0 for k in frozen)  # multiplier 0: never trained
    assert any(torch.count_nonzero(lora[k]) for k in trained)
    ema, _ = _lora(tmp_path / "quickstart" / "quickstart-ema.safetensors")
    assert all(torch.equal(ema[k], lora[k]) for k in lora)  # decay 0: the EMA is the trained weights


# ---- exact resume after a crash -------------------------------------------------------------------------
RESUMABLE = {
    "prodigy+ema+validation": ["optim.name=prodigy", "optim.lr=1.0", "train.ema_decay=0.8",
                               "validation.split=0.2", "validation.every=2", "train.masked_loss=true",
                               "train.loss=huber", "train.multires_noise_iterations=3", "train.ip_noise_gamma=0.05",
                               "lora.dropout=0.1", "data.flip=true"],
    "schedulefree+validation": ["optim.name=adamw_schedulefree", "optim.scheduler=constant", "optim.lr=2e-3",
                                "optim.warmup_steps=2",
                                "validation.split=0.2", "validation.every=2", "train.timestep_sampling=logit_normal",
                                "data.caption_dropout=0.2", "lora.dropout=0.1"],
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_crash_then_resume_equals_an_uninterrupted_run(tmp_path, folders, name):
    extra = [_subsets(folders), "train.max_steps=8", "train.save_every=2", "output.tensorboard=true",
             *RESUMABLE[name]]
    full = LoRATrainingRecipe(_config(tmp_path / "full", *extra))
    full_summary = full.run()

    crashed = LoRATrainingRecipe(_config(tmp_path / "crash", *extra))
    crashed.setup()
    step_fn = crashed._train_step

    def dies_in_step_6(batches):
        if crashed.step == 5:  # step 6 is running: the process is killed, nothing is saved
            raise KeyboardInterrupt
        step_fn(batches)

    crashed._train_step = dies_in_step_6
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = LoRATrainingRecipe(_config(tmp_path / "crash", *extra, "train.resume=latest"))
    summary = resumed.run()
    assert summary.completed and summary.start_step == 4
    assert summary.losses == full_summary.losses[4:]  # bit for bit
    for file in ("quickstart.safetensors", *(("quickstart-ema.safetensors",) if "ema" in name else ())):
        want, got = _lora(tmp_path / "full" / "quickstart" / file)[0], _lora(tmp_path / "crash" / "quickstart" / file)[0]
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), file
    val_full = dict(_scalars(tmp_path / "full" / "quickstart" / "logs")["val/loss"])
    val_resumed = dict(_scalars(tmp_path / "crash" / "quickstart" / "logs")["val/loss"])
    assert val_full[6] == val_resumed[6] and val_full[8] == val_resumed[8]
    assert val_full[2] == val_resumed[2]  # written by the crashed run before it died


def test_the_loss_gets_prior_weights_and_mask_weights_from_the_batch(tmp_path, folders, monkeypatch):
    from trainer.objective import DiffusionObjective

    cfg = _config(tmp_path, _subsets(folders), "train.max_steps=1", "train.prior_loss_weight=0.25",
                  "train.masked_loss=true", "train.unmasked_weight=0.1", "train.batch_size=4")
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    try:
        seen = {}
        real = DiffusionObjective.loss

        def spy(self, pred, target, timesteps, **weights):
            seen.update(weights)
            return real(self, pred, target, timesteps, **weights)

        monkeypatch.setattr(DiffusionObjective, "loss", spy)
        batches = recipe._batches()
        batch = next(b for b in batches if b["is_reg"].any() and not b["is_reg"].all())
        recipe._loss(batch, 0)
        want = torch.where(batch["is_reg"], torch.tensor(0.25), torch.tensor(1.0))
        assert torch.equal(seen["sample_weights"], want)
        mask = batch["mask"]
        assert mask.shape[-2:] == seen["pixel_weights"].shape[-2:]  # cached: already on the latent grid
        torch.testing.assert_close(seen["pixel_weights"], 0.1 + 0.9 * mask)
        assert mask.min() == 0 and mask.max() == 1  # half-masked training images, unmasked ones whole
    finally:
        recipe._release_run_lock()


def test_validation_loss_is_the_same_whenever_and_wherever_it_is_measured(tmp_path, folders):
    """Fixed noise per image and timestep: the RNG state, the process and the step do not matter."""
    values = []
    for run in ("a", "b"):
        recipe = LoRATrainingRecipe(_config(tmp_path / run, f"data.path={folders['train']}", "train.max_steps=1",
                                            f"validation.path={folders['val']}", "train.seed=0"))
        recipe.setup()
        try:
            torch.manual_seed(len(run) * 123)
            first = recipe.validation.measure(recipe.weights, recipe.denoiser, recipe.accelerator)
            torch.rand(1000)  # whatever else used the RNG in between
            assert recipe.validation.measure(recipe.weights, recipe.denoiser, recipe.accelerator) == first
            values.append(first["val/loss"])
        finally:
            recipe._release_run_lock()
    assert values[0] == values[1]


def test_two_processes_equal_one_with_regularization_masks_ema_and_validation(tmp_path, folders):
    """2 gloo processes x batch 2 == 1 process accumulating 2 batches: the regularization draws, masks,
    EMA and the sharded validation loss (summed over processes) included."""
    import json
    import subprocess

    from safetensors.torch import load_file
    from training_runs import ROOT, trainer_env

    common = [_subsets(folders), "train.max_steps=3", "train.save_every=0", "train.device=cpu", "optim.warmup_steps=0",
              "train.batch_size=2", "data.num_workers=0", "output.tensorboard=true", "data.path=null",
              "train.masked_loss=true", "train.prior_loss_weight=0.5", "train.ema_decay=0.5",
              "validation.split=0.4", "train.log_every=1", "output.export_dtype=fp32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer", "--config", str(TINY_LORA), f"output.dir={tmp_path / 'ddp'}", *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = LoRATrainingRecipe(load_config(TINY_LORA, [f"output.dir={tmp_path / 'one'}", *common,
                                                         "train.grad_accum=2"]))
    summary = single.run()
    run = "quickstart/checkpoints/step-00000003"
    for name in ("adapter", "ema"):
        ddp, one = load_file(str(tmp_path / "ddp" / run / f"{name}.safetensors")), load_file(
            str(tmp_path / "one" / run / f"{name}.safetensors"))
        for key in one:
            err = (ddp[key] - one[key]).norm() / one[key].norm().clamp(min=1e-12)
            assert err <= 1e-5, (name, key, float(err))
    assert math.isclose(json.loads((tmp_path / "ddp" / run / "meta.json").read_text())["loss"], summary.losses[-1],
                        rel_tol=1e-5)
    val = [_scalars(tmp_path / d / "quickstart" / "logs")["val/loss"] for d in ("ddp", "one")]
    assert len(val[0]) == 1 and val[0][0][0] == 3
    assert math.isclose(val[0][0][1], val[1][0][1], rel_tol=1e-5)
