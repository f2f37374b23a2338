"""The `toy-sdxl` family: its name opens the weights shipped under `models/assets/` (offline),
`random_weights` builds it from a seed instead, and single files of it are told apart from
`tiny-sdxl` ones by their UNet shapes."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
from models.checkpoints.open import open_model
from models.checkpoints.single_file import save_single_file, single_file_state_dict
from models.families import FAMILIES
from models.unet import UNetConfig
from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "quickstart_data"


@pytest.fixture(scope="module")
def shipped() -> dict[str, torch.Tensor]:
    """The tensors of the shipped file, by single-file name."""
    return load_file(FAMILIES["toy-sdxl"].pretrained_path())


def _same_weights(bundle, tensors: dict[str, torch.Tensor]) -> bool:
    ours = single_file_state_dict(bundle)
    return ours.keys() == tensors.keys() and all(torch.equal(ours[k].float(), tensors[k].float()) for k in ours)


def _state(bundle) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part, module in bundle.modules().items() for k, v in module.state_dict().items()}


def test_the_asset_is_package_data():
    path = FAMILIES["toy-sdxl"].pretrained_path()
    assert path.parent == ROOT / "models" / "assets" and path.name == "toy-sdxl.safetensors"
    assert 'models = ["assets/*"]' in (ROOT / "pyproject.toml").read_text()


def test_load_model_by_name_opens_the_shipped_file(shipped):
    bundle = models.load_model("toy-sdxl")
    assert bundle.family == "toy-sdxl" and bundle.spec is FAMILIES["toy-sdxl"]
    assert bundle.denoiser.config == UNetConfig.preset("toy-sdxl")
    assert bundle.denoiser.dtype == shipped["model.diffusion_model.input_blocks.0.0.weight"].dtype  # kept as stored
    assert _same_weights(bundle, shipped)
    assert models.load_model("toy-sdxl", dtype=torch.float32).denoiser.dtype == torch.float32


def test_open_model_by_name_loads_the_shipped_weights():
    opened, loaded = open_model("toy-sdxl"), models.load_model("toy-sdxl", dtype=torch.float32)
    assert opened.family == "toy-sdxl"
    a, b = _state(opened), _state(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_weights_builds_the_architecture_from_the_seed(shipped):
    # Seed 1: a stand-in asset may itself be the seed-0 init.
    bundle = open_model("toy-sdxl", random_weights=True, seed=1)
    a, b = _state(bundle), _state(models.build_model("toy-sdxl", seed=1))
    assert bundle.family == "toy-sdxl" and all(torch.equal(a[k], b[k]) for k in a)
    ours = single_file_state_dict(bundle)
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.allclose(ours[conv], shipped[conv].float(), atol=1e-2)


def test_random_weights_with_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(models.ModelLoadError, match=r"random_weights .*model\.source=.*is a checkpoint"):
        open_model(str(path), random_weights=True)


def test_single_files_are_told_apart_by_their_shapes(tmp_path):
    for family in ("tiny-sdxl", "toy-sdxl"):
        path = save_single_file(models.build_model(family, seed=2), tmp_path / f"{family}.safetensors")
        assert models.load_model(path).family == family


@pytest.mark.parametrize("call, pattern", [
    (lambda: models.load_model("toy-sdxl", family="tiny-sdxl"), r"family='tiny-sdxl' contradicts source='toy-sdxl'"),
    (lambda: models.load_model("tiny-sdxl"), r"'tiny-sdxl' is a model family that ships no weights; build_model"),
])
def test_name_errors(call, pattern):
    with pytest.raises(models.ModelLoadError, match=pattern):
        call()


def test_a_missing_asset_says_the_install_is_incomplete(tmp_path, monkeypatch):
    monkeypatch.setattr("models.families.base.ASSETS", tmp_path)
    with pytest.raises(models.ModelLoadError) as info:
        open_model("toy-sdxl")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "toy-sdxl.safetensors") in message
    assert "package is incomplete" in message and "pip install --force-reinstall lorasmith" in message


def test_config_random_weights_needs_a_family_source(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data.path={DATA}", f"model.source={path}", "model.random_weights=true"])
    assert str(info.value).startswith("model.random_weights: ") and "\n" not in str(info.value)
    cfg = load_config(None, [f"data.path={DATA}", "model.source=toy-sdxl", "model.random_weights=true"])
    assert cfg.model.random_weights


def test_cache_ids_tell_shipped_from_random_weights():
    from types import SimpleNamespace

    from trainer.config import Config
    from trainer.recipe import LoRATrainingRecipe

    def model_id(source, random_weights=False):
        cfg = Config()
        cfg.model.source, cfg.model.random_weights = source, random_weights
        recipe = SimpleNamespace(cfg=cfg, bundle=SimpleNamespace(family=source, spec=FAMILIES[source]))
        return LoRATrainingRecipe._model_id(recipe)

    assert model_id("toy-sdxl") != model_id("toy-sdxl", random_weights=True)
    assert model_id("tiny-sdxl") == model_id("tiny-sdxl", random_weights=True) == "tiny-sdxl:tiny-sdxl:0:"
