"""VAE training (`python -m trainer vae`): the loss falls, resume is exact, the export reloads
bit for bit through `model.vae` with its latent scale, config errors are one line.

Runs use the `tiny` preset on examples/quickstart_data at 32 px (4x4 latents) so that each step is
a few milliseconds; the module-scoped runs are shared by the tests that only read them.
"""
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import trainer.__main__ as cli
from models import build_model
from models.checkpoints.loading import load_model
from models.checkpoints.single_file import save_single_file
from models.vae import AutoencoderKL, VAEConfig
from trainer.checkpoint import CheckpointManager
from trainer.vae.config import VAE_PRESETS, ConfigError, load_vae_config
from trainer.vae.export import (
    exported_config,
    fold_latent_normalization,
    latent_stats,
    read_vae,
    write_vae,
)
from trainer.vae.losses import edge_loss, psnr, reconstruction_loss
from trainer.vae.train import VAETrainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "quickstart_data"
BASE = {
    "model": {"preset": "tiny"},
    "data": {"path": str(DATA), "resolution": 32, "enable_buckets": False, "flip": True, "num_workers": 0},
    "train": {"batch_size": 5, "log_every": 1, "save_every": 3, "keep_last": 5},
    "optim": {"lr": 5e-4, "betas": [0.5, 0.9], "warmup_steps": 2, "scheduler": "constant"},
    "eval": {"holdout": 0.2, "images": 4, "every": 0, "grid_images": 3},
    "output": {"stats_images": 12},
}


def _write_config(tmp_path: Path, name: str, **sections) -> Path:
    raw = {key: dict(value) for key, value in BASE.items()}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    raw.setdefault("output", {}).update(dir=str(tmp_path), name=name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """12 steps through the command line on 6 images, all of them in every batch (so the losses of
    different steps are comparable); returns (exit code, run directory)."""
    tmp = tmp_path_factory.mktemp("vae-cli")
    images = tmp / "images"
    images.mkdir()
    for path in sorted(DATA.glob("*.png"))[:6]:
        shutil.copy(path, images / path.name)
    config = _write_config(tmp, "cli", data={"path": str(images), "flip": False}, train={"max_steps": 12,
                           "batch_size": 6}, eval={"holdout": 0.0, "images": 6})
    code = cli.main(["vae", "--config", str(config)])
    return code, tmp / "cli"


def test_the_subcommand_trains_and_exports(cli_run):
    code, run = cli_run
    assert code == 0
    for name in ("cli.safetensors", "cli.json", "config.yaml", "samples/reconstructions.png", "logs/metrics.jsonl",
                 "checkpoints/step-00000012/meta.json"):
        assert (run / name).is_file(), name
    info = json.loads((run / "cli.json").read_text())
    assert info["steps"] == 12 and info["config"]["scaling_factor"] == pytest.approx(0.13025)
    evals = [m for m in _metrics(run) if "eval_psnr" in m]
    assert evals[-1]["step"] == 12 and evals[-1]["eval_psnr"] == pytest.approx(info["eval_psnr"])
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["reconstructions.png", "step-00000000.png",
                                                                    "step-00000012.png"]


def test_a_few_steps_lower_the_loss(cli_run):
    metrics = _metrics(cli_run[1])
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0] and max(losses[-3:]) < min(losses[:3])
    evals = {m["step"]: m["eval_psnr"] for m in metrics if "eval_psnr" in m}
    assert sorted(evals) == [0, 12] and evals[12] > evals[0] + 2.0  # dB, on the same fixed images


def test_exported_latents_are_unit_variance_and_reload_bit_identical(cli_run, tmp_path):
    run = cli_run[1]
    path = run / "cli.safetensors"
    stored = load_file(path)
    with safe_open(str(path), "pt") as f:
        recorded = json.loads(f.metadata()["lorasmith.vae_config"])
    assert not any(k.startswith("first_stage_model.") for k in stored)  # bare ldm VAE layout
    stats = json.loads((run / "cli.json").read_text())["latent_stats"]
    assert stats["scaled_mean"] == pytest.approx(0.0, abs=1e-3)
    assert stats["scaled_std"] == pytest.approx(1.0, rel=1e-3)
    assert stats["before_export"]["std"] != pytest.approx(1 / 0.13025, rel=0.05)  # the fold did something

    base = tmp_path / "tiny-sdxl.safetensors"
    save_single_file(build_model("tiny-sdxl", seed=1), base)
    bundle = load_model(base, vae=path)
    assert bundle.family == "tiny-sdxl" and bundle.vae.config.scaling_factor == recorded["scaling_factor"]
    loaded = bundle.vae.state_dict()
    assert loaded.keys() == stored.keys()
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)
    again = read_vae(path)
    assert all(torch.equal(again.state_dict()[k], stored[k]) for k in stored)

    # Only the two 1x1 convolutions around the latent differ from the trained weights.
    trained = CheckpointManager(run / "checkpoints").load(run / "checkpoints" / "step-00000012").weights
    changed = sorted(k for k in stored if not torch.equal(stored[k], trained[k]))
    assert changed == ["post_quant_conv.bias", "post_quant_conv.weight", "quant_conv.bias", "quant_conv.weight"]


def test_fold_keeps_the_decoder_output_and_normalises_each_channel():
    torch.manual_seed(3)
    vae = AutoencoderKL(VAEConfig.preset("tiny")).eval()
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(images).mean)
        stats = latent_stats(vae, images.split(3), torch.Generator().manual_seed(0))
        fold_latent_normalization(vae, stats["channel_mean"], stats["channel_std"], 2.0)
        after = vae.decode(vae.encode(images).mean)
        folded = latent_stats(vae, images.split(3), torch.Generator().manual_seed(0))
    assert (after - before).abs().max() < 1e-4
    assert folded["channel_mean"] == pytest.approx([0.0] * 4, abs=1e-4)
    assert folded["channel_std"] == pytest.approx([2.0] * 4, rel=1e-4)


def test_config_mode_sets_the_scaling_factor_from_the_latent_std():
    stats = {"mean": 0.5, "std": 4.0}
    config = VAEConfig.preset("tiny")
    assert exported_config(config, stats, "config", shift=False).scaling_factor == 0.25
    shifted = exported_config(config, stats, "config", shift=True)
    assert (shifted.scaling_factor, shifted.shift_factor) == (0.25, 0.5)
    assert exported_config(config, stats, "fold", shift=False) == config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_vae_round_trips_through_model_vae(tmp_path, dtype):
    torch.manual_seed(4)
    vae = AutoencoderKL(VAEConfig.preset("tiny"))
    config = exported_config(vae.config, {"mean": 0.0, "std": 2.0}, "config", shift=False)
    path = write_vae(vae, tmp_path / "v.safetensors", config, None, dtype=dtype)
    base = tmp_path / "tiny-sdxl.safetensors"
    save_single_file(build_model("tiny-sdxl", seed=1), base)
    loaded = load_model(base, vae=path, dtype=dtype).vae.state_dict()
    assert all(torch.equal(loaded[k], v.to(dtype)) for k, v in vae.state_dict().items())
    mine = read_vae(path, dtype=None)
    assert mine.config == config and mine.dtype == dtype  # the recorded scaling_factor 0.5 comes back
    assert all(torch.equal(mine.state_dict()[k], v.to(dtype)) for k, v in vae.state_dict().items())


def test_resume_after_sigterm_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    sections = {"train": {"max_steps": 6}, "loss": {"edge_weight": 0.5}}
    whole = VAETrainer(load_vae_config(_write_config(tmp_path, "whole", **sections))).run()
    assert whole.completed and whole.step == 6

    original = VAETrainer._train_step

    def step_then_sigterm(self, batch):
        terms = original(self, batch)
        if self.step == 4:  # mid-epoch (4 batches of 5 images per epoch), not at a save step
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    config = _write_config(tmp_path, "split", **sections)
    monkeypatch.setattr(VAETrainer, "_train_step", step_then_sigterm)
    stopped = VAETrainer(load_vae_config(config)).run()
    assert (stopped.completed, stopped.step, stopped.exit_code) == (False, 4, 128 + signal.SIGTERM)
    assert (tmp_path / "split" / "checkpoints" / "step-00000004").is_dir()
    assert not (tmp_path / "split" / "split.safetensors").exists()
    monkeypatch.setattr(VAETrainer, "_train_step", original)
    resumed = VAETrainer(load_vae_config(config, ["train.resume=latest"])).run()
    assert resumed.completed and resumed.start_step == 4
    assert resumed.losses == whole.losses[4:]

    def final(name):
        return CheckpointManager(tmp_path / name / "checkpoints").load(tmp_path / name / "checkpoints" / "step-00000006")

    a, b = final("whole"), final("split")
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert a.trainer_state["data"] == b.trainer_state["data"]
    assert load_file(tmp_path / "whole" / "whole.safetensors").keys() == load_file(
        tmp_path / "split" / "split.safetensors").keys()
    exported = load_file(tmp_path / "whole" / "whole.safetensors"), load_file(tmp_path / "split" / "split.safetensors")
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    steps = [m["step"] for m in _metrics(tmp_path / "split") if "loss" in m]
    assert steps == list(range(1, 7))  # the resumed log continues the interrupted one


@pytest.mark.parametrize("override, key", [
    ("train.max_stepz=3", "train.max_stepz: unknown key; did you mean 'max_steps'?"),
    ("loss.reconstruction=l2", "loss.reconstruction: must be one of 'mse', 'l1'"),
    ("model.preset=tinny", "model.preset: unknown VAE preset 'tinny'; did you mean 'tiny'?"),
    ("model.init=/no/such/vae.safetensors", "model.init: '/no/such/vae.safetensors' does not exist"),
    ("data.resolution=60", "data.resolution: must be a multiple of 8"),
    ("data.cache_latents=true", "data.cache_latents: caches serve diffusion training"),
    ("data.path=/no/such/folder", "data.path: '/no/such/folder' does not exist"),
    ("eval.holdout=1.5", "eval.holdout: must be in [0, 1)"),
    ("loss.kl_weight=-1", "loss.kl_weight: must be >= 0.0"),
    ("output.latent_shift=true", "output.latent_shift: applies to latent_scale: config only"),
    ("model.preset=tiny-flux", "output.latent_scale: fold rewrites quant_conv"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys, override, key):
    config = _write_config(tmp_path, "bad", train={"max_steps": 1})
    assert cli.main(["vae", "--config", str(config), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {config}: {key}"), err
    assert not (tmp_path / "bad").exists()


def test_model_init_must_have_the_preset_shapes(tmp_path, capsys):
    other = AutoencoderKL(VAEConfig.preset("tiny", ch=16))
    path = write_vae(other, tmp_path / "other.safetensors", other.config, None)
    config = _write_config(tmp_path, "init", model={"init": str(path)}, train={"max_steps": 1})
    assert cli.main(["vae", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: model.init:") and "shapes of preset 'tiny'" in err
    not_a_vae = tmp_path / "not-a-vae.safetensors"
    save_file({"weight": torch.zeros(2)}, not_a_vae)
    config = _write_config(tmp_path, "init2", model={"init": str(not_a_vae)}, train={"max_steps": 1})
    assert cli.main(["vae", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: model.init:") and "not-a-vae.safetensors holds no VAE" in err


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    torch.manual_seed(5)
    start = AutoencoderKL(VAEConfig.preset("tiny"))
    path = write_vae(start, tmp_path / "start.safetensors", start.config, None)
    cfg = load_vae_config(_write_config(tmp_path, "ft", model={"init": str(path)}, train={"max_steps": 1}))
    vae = VAETrainer(cfg)._build_vae()
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in start.state_dict().items())


def test_losses_and_psnr():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full_like(x, 0.2)
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(0.2)
    assert reconstruction_loss(x, y, "mse").item() == pytest.approx(0.04)
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-4)  # error 0.1 on the [0, 1] scale
    assert edge_loss(x, y, 2).item() == 0.0  # a constant offset has no edges
    step = x.clone()
    step[..., 4:] = 1.0
    assert edge_loss(x, step, 1).item() > 0 and edge_loss(step, step, 3).item() == 0.0


def test_preset_names_match_models_vae():
    from models.vae import _PRESETS

    assert set(VAE_PRESETS) == set(_PRESETS)


def test_the_shipped_toy_config_validates():
    path = ROOT / "configs" / "toy" / "vae.yaml"
    sources = [f"data.subsets.{i}.path={DATA}" for i in range(2)]  # the shapes world and its any-hue set
    cfg = load_vae_config(path, sources)
    assert cfg.model.preset == "toy" and cfg.data.resolution == 64 and cfg.output.latent_scale == "fold"
    head = path.read_text().splitlines()[:12]
    assert any("python -m trainer vae --config configs/toy/vae.yaml" in line for line in head)
    with pytest.raises(ConfigError, match=r"data.subsets\[1\].path"):
        load_vae_config(path, [sources[0], "data.subsets.1.path=./no/such/shapes"])


def test_readme_documents_every_vae_key():
    import dataclasses
    import typing

    from trainer.vae.config import VAERunConfig

    text = (ROOT / "configs" / "README.md").read_text()
    assert "\n## VAE training\n" in text
    part = text.split("\n## VAE training\n", 1)[1].split("\n## ", 1)[0]  # the VAE section only
    sections = typing.get_type_hints(VAERunConfig)
    missing = [f"{name}.{f.name}" for name, cls in sections.items() if name != "data"
               for f in dataclasses.fields(cls) if f"`{name}.{f.name}`" not in part]
    assert not missing, f"configs/README.md (VAE training) does not document {missing}"
