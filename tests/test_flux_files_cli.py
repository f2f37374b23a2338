"""FLUX.1 from the separate files ComfyUI users have, through the user-facing entry points: the
training config (`model.vae`, `model.text_encoders`, `model.tokenizers`) and `generate` flags
(`--vae`, `--text-encoders`, `--tokenizers`); and the up-front stop of a run whose T5 tokenizer is
missing. Files are written from a random tiny-flux bundle (flux_files_helpers)."""
import pytest
import torch
from flux_files_helpers import tiny_bundle, write_split
from training_runs import TINY_LORA, copy_quickstart_images

import trainer.__main__ as cli
from models.families.flux import FluxFamily, MissingT5Tokenizer
from trainer.config import load_config
from trainer.recipe import LoRATrainingRecipe
from trainer.run_control import TrainingError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    bundle = tiny_bundle(seed=5)
    return bundle, write_split(bundle, tmp_path_factory.mktemp("flux_files"), prefix="model.diffusion_model.")


def _overrides(paths, out, data):
    return [f"model.source={paths['flux1']}", f"model.vae={paths['ae']}",
            f"model.text_encoders=[{paths['clip_l']}, {paths['t5xxl']}]", f"model.tokenizers=[null, {paths['tokenizer']}]",
            "lora.preset=attn", f"data.path={data}", "data.resolution=64", "data.bucket_step=32",
            "data.num_workers=0", "train.max_steps=2", "optim.warmup_steps=0", "train.save_every=0", "train.batch_size=2",
            "output.tensorboard=false", f"output.dir={out}"]


def test_training_config_reads_the_separate_files(files, tmp_path):
    bundle, paths = files
    (tmp_path / "data").mkdir()
    data = copy_quickstart_images(tmp_path / "data", 4)
    cfg = load_config(TINY_LORA, _overrides(paths, tmp_path / "runs", data))
    recipe = LoRATrainingRecipe(cfg)
    summary = recipe.run()
    assert summary.completed and recipe.bundle.family == "tiny-flux"
    # the run trained on the weights of those files, not on a random tiny-flux
    for name, want in bundle.text_encoders[1].state_dict().items():
        assert torch.equal(recipe.bundle.text_encoders[1].state_dict()[name].float(), want.float()), name
    ids = recipe.bundle.tokenizers[1](["a red circle"])
    assert torch.equal(ids, bundle.tokenizers[1](["a red circle"]))


def test_generate_flags_read_the_separate_files(files, tmp_path, capsys):
    _, paths = files
    out = tmp_path / "images"
    code = cli.main(["generate", "--model", str(paths["flux1"]), "--vae", str(paths["ae"]),
                     "--text-encoders", str(paths["clip_l"]), str(paths["t5xxl"]),
                     "--tokenizers", "none", str(paths["tokenizer"]),
                     "--prompt", "a red circle", "--steps", "2", "--size", "32x32", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 1


def test_a_missing_t5_tokenizer_stops_the_run_before_anything_is_encoded(tmp_path, monkeypatch):
    monkeypatch.setattr(FluxFamily, "make_tokenizers", _with_missing_t5)  # as flux-dev without tokenizer_2
    cfg = load_config(TINY_LORA, ["model.source=tiny-flux", "lora.preset=attn", "data.resolution=64",
                                   "data.bucket_step=32", f"output.dir={tmp_path}",
                                   f"data.path={copy_quickstart_images(tmp_path, 2)}"])
    recipe = LoRATrainingRecipe(cfg)
    with pytest.raises(TrainingError, match=r"no T5 tokenizer loaded; .* model\.tokenizers: \[null, <folder>\]"):
        recipe.setup()
    assert not hasattr(recipe, "loader") and not hasattr(recipe, "network")  # stopped before caching/injection


_ORIGINAL = FluxFamily.make_tokenizers


def _with_missing_t5(spec):
    clip, _ = _ORIGINAL(spec)
    return [clip, MissingT5Tokenizer(spec.title, spec.t5_max_length)]
