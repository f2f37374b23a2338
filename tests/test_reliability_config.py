"""Bad configs are rejected before anything is loaded or written: typos, wrong types, impossible
combinations and missing paths each give exit code 2 and one `error:` line naming the key, while
building or loading a model, setting up the recipe or creating the output directory would fail
the test."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainer.__main__ as cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "tests" / "fixtures" / "tiny_lora.yaml"
DATA = ROOT / "examples" / "quickstart_data"

CASES = {
    # typos
    "typo-key": (["train.max_step=5"], r"train\.max_step: unknown key; did you mean 'max_steps'"),
    "typo-section": (["trian.max_steps=5"], r"trian: unknown key; did you mean 'train'"),
    "typo-choice": (["optim.name=adamww"], r"optim\.name: .*did you mean 'adamw'"),
    # wrong types
    "int-as-word": (["train.batch_size=two"], r"train\.batch_size: expected an integer, got 'two'"),
    "float-for-int": (["lora.rank=1.5"], r"lora\.rank: expected an integer, got 1\.5"),
    "bool-as-word": (["train.gradient_checkpointing=maybe"], r"train\.gradient_checkpointing: expected true \| false \| 'block' \| 'layer' \| 'transformer', got"),
    "short-list": (["optim.betas=[0.9]"], r"optim\.betas: expected a list of 2 values"),
    "negative-lr": (["optim.lr=-1"], r"optim\.lr: must be > 0"),
    # impossible combinations
    "te-training-cached-text": (["train.train_text_encoders=true", "data.cache_text=true"],
                                r"data\.cache_text: cannot"),
    "random-crop-cached-latents": (["data.random_crop=true", "data.cache_latents=true"], r"data.*random_crop: cannot"),
    # (`no` unquoted is a YAML boolean: it must still mean the string 'no')
    "half-weights-no-autocast": (["model.dtype=fp16", "train.mixed_precision=no"], r"train\.mixed_precision: 'no'"),
    "warmup-longer-than-run": (["optim.warmup_steps=500", "train.max_steps=10"], r"optim\.warmup_steps: 500 is more"),
    "samples-without-prompts": (["sample.every=5"], r"sample\.every: is set but sample\.prompts is empty"),
    "resolution-not-multiple": (["data.resolution=68", "data.bucket_step=8"],
                                r"data\.resolution: must be a multiple of 8, got 68"),
    "timesteps-reversed": (["train.timestep_min=900", "train.timestep_max=100"], r"train\.timestep_min: need"),
    "family-contradicts-source": (["model.source=tiny-sdxl", "model.family=sd15"],
                                  r"model\.family: 'sd15' contradicts model\.source='tiny-sdxl'"),
    # missing paths
    "missing-data": (["data.path=/nonexistent/images"], r"data\.path: '/nonexistent/images' does not exist"),
    "missing-model": (["model.source=/nonexistent/model.safetensors"], r"model\.source: .* does not exist"),
    "missing-vae": (["model.vae=/nonexistent/vae.safetensors"], r"model\.vae: .* does not exist"),
    "missing-resume": (["train.resume=/nonexistent/step-00000010"], r"train\.resume: checkpoint directory"),
}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail loudly if a model is built or loaded, or the recipe is even set up."""
    import models.bundle
    import models.checkpoints.loading
    import trainer.recipe

    def boom(*args, **kwargs):
        raise AssertionError("work started although the config is invalid")

    monkeypatch.setattr("models.load_model", boom)
    monkeypatch.setattr("models.build_model", boom)
    monkeypatch.setattr(models.checkpoints.loading, "load_model", boom)
    monkeypatch.setattr(models.bundle, "build_model", boom)
    monkeypatch.setattr(trainer.recipe.LoRATrainingRecipe, "setup", boom)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "AssertionError" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_rejected_before_any_work(case, tmp_path, capsys, nothing_loads):
    import re

    overrides, pattern = CASES[case]
    out = tmp_path / "out"
    rc = cli.main(["--config", str(QUICKSTART), f"output.dir={out}", f"data.path={DATA}", *overrides])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2, line
    assert line.startswith(f"error: {QUICKSTART}: ") and re.search(pattern, line), line
    assert not out.exists()


def test_unreadable_config_files(tmp_path, capsys, nothing_loads):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  max_steps: [1, 2\n")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    for path, phrase in ((tmp_path / "missing.yaml", "does not exist"), (bad_yaml, "invalid YAML"),
                         (not_mapping, "expected a mapping of sections")):
        assert cli.main(["--config", str(path)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(path) in line and phrase in line, line


def test_fp16_on_cpu_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A combination only the machine can rule out is still refused before any model or file."""
    import models.bundle

    def boom(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr("models.build_model", boom)
    monkeypatch.setattr(models.bundle, "build_model", boom)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "out"
    rc = cli.main(["--config", str(QUICKSTART), f"output.dir={out}", f"data.path={DATA}",
                   "train.mixed_precision=fp16", "model.dtype=fp16"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 1 and "fp16 needs a CUDA GPU" in line and not out.exists(), line


def test_a_real_process_prints_only_the_error(tmp_path):
    """The whole stderr of `python -m trainer` with a typo is the one error line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(QUICKSTART),
                           f"output.dir={tmp_path / 'out'}", "train.max_step=5"],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {QUICKSTART}: train.max_step: unknown key; did you mean 'max_steps'?"], proc.stderr
    assert not (tmp_path / "out").exists()
