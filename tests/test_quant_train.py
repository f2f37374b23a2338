"""Training on a quantized frozen base (model.quantize / quantize_text_encoders, train.offload_frozen):
the loss stays close to the unquantized run, resume is exact, the export records the base, and
sample images render with the frozen parts offloaded."""
import json
import statistics

import pytest
import torch
from safetensors import safe_open
from training_runs import TINY_LORA, copy_quickstart_images

from trainer.config import ConfigError, load_config
from trainer.recipe import LoRATrainingRecipe

FAST = ["data.num_workers=0", "data.cache_latents=true", "data.cache_text=true", "output.tensorboard=false",
        "train.log_every=1", "optim.warmup_steps=0", "train.batch_size=2", "train.save_every=0"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 8)


def _config(out, data, *overrides):
    return load_config(TINY_LORA, [f"output.dir={out}", f"data.path={data}", *FAST, *overrides])


# Mean loss of the last 10 of 40 steps (batch 2, lr 5e-3 cosine) relative to the unquantized run. The
# 100-step quickstart figures are in docs/benchmarks.md (`python -m trainer bench quantization --what loss`).
LOSS_TOLERANCE = {"fp8": 0.02, "nf4": 0.05}


@pytest.fixture(scope="module")
def unquantized_losses(tmp_path_factory, small_data):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return LoRATrainingRecipe(_config(tmp_path_factory.mktemp("none"), small_data, "train.max_steps=40")).run().losses


@pytest.mark.parametrize("fmt", list(LOSS_TOLERANCE))
def test_loss_stays_close_to_the_unquantized_run(tmp_path, small_data, unquantized_losses, fmt):
    losses = LoRATrainingRecipe(_config(tmp_path, small_data, "train.max_steps=40", f"model.quantize={fmt}")).run().losses
    ref = unquantized_losses
    assert statistics.mean(ref[-10:]) < 0.7 * statistics.mean(ref[:10])  # the run learns something to compare
    assert losses != ref  # the base really is different
    assert abs(statistics.mean(losses[-10:]) / statistics.mean(ref[-10:]) - 1) < LOSS_TOLERANCE[fmt]


def test_resume_on_a_quantized_base_is_exact(tmp_path, small_data):
    extra = ["train.max_steps=6", "train.save_every=3", "model.quantize=nf4", "model.quantize_text_encoders=fp8",
             "lora.dora=true"]
    full = LoRATrainingRecipe(_config(tmp_path / "a", small_data, *extra))
    full_losses = full.run().losses
    checkpoint = tmp_path / "a" / "quickstart" / "checkpoints" / "step-00000003"
    assert checkpoint.is_dir()
    resumed = LoRATrainingRecipe(_config(tmp_path / "b", small_data, *extra, f"train.resume={checkpoint}"))
    summary = resumed.run()
    assert summary.start_step == 3 and summary.losses == full_losses[3:]
    want, got = full.network.state_dict(), resumed.network.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    lora = tmp_path / "b" / "quickstart" / "quickstart.safetensors"
    with safe_open(lora, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["lorasmith.base_quantization"]) == {"unet": "nf4", "text_encoder_2": "fp8"}
    assert json.loads(meta["lorasmith.config"])["model"]["quantize"] == "nf4"


class _MoveRecorder(LoRATrainingRecipe):
    """The recipe, recording every `.to(...)` call on the VAE and the text encoders."""

    def _build_bundle(self):
        bundle = super()._build_bundle()
        self.moves = []
        for name, part in [("vae", bundle.vae), *((f"text_encoder_{i}", te) for i, te in enumerate(bundle.text_encoders))]:
            def to(*args, _name=name, _to=part.to, **kwargs):
                self.moves.append((_name, str(args[0] if args else kwargs.get("device"))))
                return _to(*args, **kwargs)

            part.to = to  # an instance attribute: the recording happens for this bundle only
        return bundle


@pytest.mark.parametrize("offload", [True, False])
def test_offload_frozen_moves_cached_parts_to_the_cpu_and_samples_bring_them_back(tmp_path, small_data, offload):
    recipe = _MoveRecorder(_config(tmp_path, small_data, "train.max_steps=2", "model.quantize=fp8",
                                   "sample.prompts=[a cat]", "sample.every=1", "sample.steps=2",
                                   f"train.offload_frozen={str(offload).lower()}"))
    recipe.setup()
    parts = {"vae", "text_encoder_0", "text_encoder_1"}
    assert {name for name, device in recipe.moves if device == "cpu"} == (parts if offload else set())
    recipe.moves.clear()
    assert recipe.train().completed
    assert len(list((tmp_path / "quickstart" / "samples").glob("step-*.png"))) >= 1
    assert {name for name, _ in recipe.moves} == parts  # sampling: to the device and back home


def test_quantized_text_encoders_only_when_they_do_not_train(tmp_path, small_data):
    with pytest.raises(ConfigError, match=r"tiny_lora.yaml: model.quantize_text_encoders: .nf4. is only for frozen text encoders, "
                                          r"but train.train_text_encoders is true"):
        _config(tmp_path, small_data, "model.quantize_text_encoders=nf4", "train.train_text_encoders=true",
                "data.cache_text=false", "lora.text_encoders=te")
    cfg = _config(tmp_path, small_data, "model.quantize=nf4", "train.train_text_encoders=true",
                  "data.cache_text=false", "lora.text_encoders=te")
    assert cfg.model.quantize == "nf4"  # the denoiser may be quantized while text encoders train
    with pytest.raises(ConfigError, match=r"model.quantize: must be one of"):
        _config(tmp_path, small_data, "model.quantize=int4")
