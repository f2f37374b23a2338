"""Config loading: shipped configs validate; typos, wrong types, missing paths and impossible
combinations are rejected with the key named, before any model is loaded."""
import dataclasses
import itertools
import typing
from pathlib import Path

import pytest
import yaml

import trainer.__main__ as cli
from data.config import DataConfig, SubsetConfig
from models.lora.options import LoRAOptions
from trainer.config import (
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    SampleConfig,
    TrainConfig,
    ValidationConfig,
    load_config,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DATA = ROOT / "examples" / "quickstart_data"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs use repo-relative paths


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to build or load a model."""
    import models.bundle
    import models.checkpoints.loading

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    # The package-level names first: `models` resolves them lazily from the submodules and caches
    # them, so patching the submodules first would make the package cache (and later restore) `boom`.
    monkeypatch.setattr("models.load_model", boom)
    monkeypatch.setattr("models.build_model", boom)
    monkeypatch.setattr(models.checkpoints.loading, "load_model", boom)
    monkeypatch.setattr(models.bundle, "build_model", boom)


def _load(*overrides, path=None):
    return load_config(path, [f"data.path={DATA}", *overrides])


# ---- shipped configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    assert CONFIGS, "configs/ has no YAML files"
    # Placeholder data paths elsewhere: point the (first) source at the example images.
    subsets = bool((yaml.safe_load(path.read_text()).get("data") or {}).get("subsets"))
    overrides = [] if path.name == "quickstart.yaml" else [f"data.{'subsets.0.' if subsets else ''}path={DATA}"]
    cfg = load_config(path, overrides)
    assert isinstance(cfg, Config)
    head = path.read_text().splitlines()[:12]
    assert any(f"python -m trainer --config configs/{path.name}" in line for line in head), "header lacks the command"


def test_quickstart_is_offline_toy_and_small():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert cfg.model.source == "toy-sdxl" and cfg.data.resolution == 64
    assert (ROOT / cfg.data.path).is_dir()


def test_toy_model_recipe_trains_the_architecture_from_scratch():
    path = ROOT / "configs" / "toy" / "toy_sdxl.yaml"
    vae = ROOT / "models" / "assets" / "toy-sdxl.safetensors"  # any existing file stands in for the trained VAE
    cfg = load_config(path, [f"data.path={DATA}", f"model.vae={vae}"])
    assert cfg.model.source == "toy-sdxl" and cfg.model.random_weights and cfg.train.mode == "full"
    assert cfg.train.train_text_encoders and cfg.train.ema_decay and cfg.data.caption_dropout > 0
    head = path.read_text().splitlines()[:14]
    for step in ("examples/shapes_world.py", "trainer vae --config configs/toy/vae.yaml",
                 "trainer --config configs/toy/toy_sdxl.yaml", "models/assets/toy-sdxl.safetensors"):
        assert any(step in line for line in head), step


def test_sdxl_config_matches_the_recipe():
    cfg = _load(path=ROOT / "configs" / "sdxl_lora.yaml")
    assert cfg.model.source == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.model.dtype == "bf16"
    assert cfg.data.resolution == 1024 and cfg.data.cache_latents and cfg.lora.rank == 16
    assert cfg.optim.name == "adamw8bit" and cfg.train.mixed_precision == "bf16"


def test_readme_documents_every_key():
    text = (ROOT / "configs" / "README.md").read_text()
    sections = {"model": ModelConfig, "lora": LoRAOptions, "data": DataConfig, "data.subsets[]": SubsetConfig,
                "train": TrainConfig, "optim": OptimConfig, "output": OutputConfig, "sample": SampleConfig,
                "validation": ValidationConfig}
    missing = [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)
               if f"`{s}.{f.name}`" not in text]
    assert not missing, f"configs/README.md does not document {missing}"


def test_every_section_field_has_a_docstring():
    import ast
    import inspect
    import textwrap

    import trainer.config as module

    for cls in (ModelConfig, LoRAOptions, TrainConfig, OptimConfig, OutputConfig, SampleConfig, ValidationConfig):
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        documented = {node.target.id for node, nxt in itertools.pairwise(body)
                      if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)}
        assert documented == {f.name for f in dataclasses.fields(cls)}, cls.__name__
    assert module.Config.__doc__


# ---- overrides and round trip ----------------------------------------------------------------------
def test_overrides_parse_as_yaml(tmp_path):
    cfg = _load("train.max_steps=7", "optim.lr=1e-4", "optim.betas=[0.8, 0.9]", "lora.alpha=null",
                "sample.prompts=[a cat, a dog]", "train.resume=latest", "output.overwrite=true")
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.lora.alpha is None and cfg.sample.prompts == ["a cat", "a dog"] and cfg.train.resume == "latest"
    sub = load_config(None, [f"data.subsets=[{{path: {DATA}}}, {{path: {DATA}, repeats: 2}}]",
                             "data.subsets.1.repeats=3"])
    assert [s.repeats for s in sub.data.subsets] == [None, 3]


def test_resolved_config_round_trips(tmp_path):
    cfg = _load("train.max_steps=9", "lora.targets=[attn2]", "data.background=[1, 2, 3]")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_old_guidance_key_is_read_with_one_warning(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text(f"data:\n  path: {DATA}\nsample:\n  cfg: 4.5\n")
    with caplog.at_level("WARNING", logger="trainer"):
        cfg = load_config(old)
    assert cfg.sample.guidance_scale == 4.5
    (record,) = [r for r in caplog.records if "sample.cfg" in r.getMessage()]
    assert "sample.guidance_scale" in record.getMessage() and "\n" not in record.getMessage()
    assert _load("sample.cfg=2").sample.guidance_scale == 2  # overrides too
    with pytest.raises(ConfigError, match=r"sample\.cfg: renamed to sample\.guidance_scale; give only"):
        _load("sample.cfg=2", "sample.guidance_scale=3")


# ---- rejected configs -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["train.max_step=5"], r"train\.max_step: unknown key; did you mean 'max_steps'"),
        (["trian.max_steps=5"], r"trian: unknown key; did you mean 'train'"),
        (["data.resolutoin=512"], r"data\.resolutoin: unknown key; did you mean 'resolution'"),
        (["train.batch_size=four"], r"train\.batch_size: expected an integer, got 'four'"),
        (["train.gradient_checkpointing=1"], r"train\.gradient_checkpointing: expected true \| false \| 'block' \| 'layer' \| 'transformer', got"),
        (["train.mixed_precision=bf61"], r"train\.mixed_precision: must be one of .*did you mean 'bf16'"),
        (["optim.name=adamw8bti"], r"optim\.name: .*did you mean 'adamw8bit'"),
        (["optim.scheduler=cosin"], r"optim\.scheduler: .*did you mean 'cosine'"),
        (["optim.betas=[0.9]"], r"optim\.betas: expected a list of 2 values"),
        (["sample.prompts=a cat"], r"sample\.prompts: expected a list"),
        (["lora.rank=0"], r"lora\.rank: must be >= 1"),
        (["lora.dropout=1.5"], r"lora\.dropout: must be in \[0, 1\)"),
        (["lora.targets=['(']"], r"lora\.targets\[0\]: invalid regex"),
        (["train.timestep_min=900", "train.timestep_max=100"], r"train\.timestep_min: need 0 <= timestep_min"),
        (["train.min_snr_gamma=0"], r"train\.min_snr_gamma: must be > 0"),
        (["optim.warmup_steps=50", "train.max_steps=10"], r"optim\.warmup_steps: 50 is more than"),
        (["data.subsets=[{path: x, repeats: 0}]", "data.path=null"], r"data\.subsets\[0\]\.repeats: must be >= 1"),
        (["sample.every=10"], r"sample\.every: is set but sample\.prompts is empty"),
        (["sample.sampler=eulr"], r"sample\.sampler: .*did you mean 'euler'"),
        (["output.name=a/b"], r"output\.name: .*plain file name"),
        (["train.resume=/no/such/checkpoint"], r"train\.resume: checkpoint directory '/no/such/checkpoint' does not exist"),
    ],
)
def test_bad_values_name_the_key(overrides, pattern, no_model_loading):
    with pytest.raises(ConfigError, match=pattern):
        _load(*overrides)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["data.path=/no/such/images"], r"data\.path: '/no/such/images' does not exist"),
        (["data.path=null"], r"data\.path: no training images given"),
        (["model.source=/no/such/model.safetensors"], r"model\.source: '/no/such/model\.safetensors' does not exist"),
        (["model.vae=./missing_vae.safetensors"], r"model\.vae: .*does not exist"),
    ],
)
def test_missing_paths(overrides, pattern, no_model_loading):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [f"data.path={DATA}", *overrides])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["train.train_text_encoders=true", "data.cache_text=true"],
         r"data\.cache_text: cannot be combined with train\.train_text_encoders"),
        (["data.cache_text=true", "data.shuffle_tags=true"], r"data\.shuffle_tags: cannot be combined with cache_text"),
        (["data.cache_text=true", "data.tag_dropout=0.1"], r"data\.tag_dropout: cannot be combined with cache_text"),
        (["data.cache_latents=true", "data.random_crop=true"], r"data\.random_crop: cannot be combined with cache_latents"),
        (["model.dtype=bf16", "train.mixed_precision=fp16"], r"train\.mixed_precision: 'fp16' does not match model\.dtype"),
        (["model.dtype=fp16"], r"train\.mixed_precision: 'no' does not match model\.dtype='fp16'"),
        (["model.source=sdxl", "data.resolution=256"], r"data\.resolution: 256 is too small for SDXL"),
        (["model.source=sd15", "data.resolution=540"], r"data\.resolution: must be a multiple of 8, got 540"),
        (["model.source=tiny-sdxl", "data.resolution=84"], r"data\.resolution: must be a multiple of 8, got 84"),
        (["model.source=sd15", "data.resolution=512", "data.bucket_step=20", "data.bucket_min_side=256",
          "data.bucket_max_side=1024"], r"data\.bucket_step: must be a multiple of 8 .*got 20"),
        (["model.family=sdxxl"], r"model\.family: .*did you mean 'sdxl'"),
    ],
)
def test_impossible_combinations(overrides, pattern, no_model_loading):
    with pytest.raises(ConfigError, match=pattern):
        _load(*overrides)


def test_file_errors(tmp_path, no_model_loading):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(bad)
    bad.write_text(f"data:\n  path: {DATA}\ntrain:\n  batch_size: 2\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.max_stepz: unknown key; did you mean 'max_steps'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.max_steps"])


# ---- command line ----------------------------------------------------------------------------------
def test_cli_reports_config_errors_in_one_line(tmp_path, capsys, no_model_loading):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data:\n  path: {DATA}\ntrain:\n  max_step: 3\n")
    assert cli.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.max_step: unknown key; did you mean 'max_steps'?" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError):
        cli.main(["--config", str(bad), "--debug"])


def test_cli_check_prints_resolved_config(capsys, no_model_loading):
    assert cli.main(["--config", "configs/quickstart.yaml", "train.max_steps=11", "--check"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["train"]["max_steps"] == 11


def test_cli_dispatch_errors(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out


def test_type_hints_resolve():
    for cls in (Config, ModelConfig, LoRAOptions, TrainConfig, OptimConfig, OutputConfig, SampleConfig):
        typing.get_type_hints(cls)
