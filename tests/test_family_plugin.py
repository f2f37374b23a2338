"""A model family is a plug-in: a family defined here, in the test only, trains, samples and exports
through the unchanged recipe, pipeline and LoRA files.

The made-up family has its own lineage, its own conditioning (CLIP-L's penultimate layer through
the final layer norm, scaled) and its own file metadata, so any code path that still branched on
the built-in family names would fail here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import models
from models.families import FamilySpec, register_family, unregister_family
from trainer.config import load_config
from trainer.recipe import LoRATrainingRecipe
from trainer.sampling.pipeline import Txt2ImgPipeline

from training_runs import TINY_LORA, copy_quickstart_images

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

NAME = "made-up-family"


@dataclass(frozen=True)
class MadeUpFamily(FamilySpec):
    """Conditioning: 0.5 * final_layer_norm(hidden_states[-2]) of its one text encoder."""

    def encode(self, bundle, token_ids):
        (te,) = bundle.text_encoders
        out = te(token_ids[0], output_layer=-2)
        self.calls.append(token_ids[0].shape[0])
        return {"context": 0.5 * te.text_model.final_layer_norm(out.hidden_states[-2])}

    def text_layers_used(self, index, num_layers):
        return num_layers - 1

    @property
    def calls(self) -> list:
        return _CALLS


_CALLS: list[int] = []


@pytest.fixture
def family():
    spec = register_family(MadeUpFamily(
        name=NAME, base=NAME, unet="tiny-sd15", vae="tiny", text_encoders=("tiny-clip-l",), pad_token_ids=(49407,),
        resolution=64, title="MadeUp", base_model_version="madeup_v1", architecture="made-up-arch",
        lora_text_components=("te",), lora_unet_names="ldm",
    ))
    _CALLS.clear()
    yield spec
    unregister_family(NAME)


def test_made_up_family_trains_samples_and_exports(tmp_path: Path, family):
    (tmp_path / "data").mkdir()
    data = copy_quickstart_images(tmp_path / "data", 4)
    cfg = load_config(TINY_LORA, [
        f"model.source={NAME}", f"output.dir={tmp_path}", f"data.path={data}", "data.num_workers=0",
        "output.tensorboard=false", "optim.warmup_steps=0", "train.batch_size=2", "train.max_steps=3",
        "train.save_every=0", "train.train_text_encoders=true", "data.cache_text=false",
        "sample.prompts=[a red circle]", "sample.steps=2", "sample.guidance_scale=1.0",
    ])
    summary = LoRATrainingRecipe(cfg).run()
    assert summary.completed and all(torch.isfinite(torch.tensor(summary.losses)))
    assert _CALLS, "the family's own conditioning was not used in training"

    lora = summary.lora_path
    with safe_open(str(lora), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["modelspec.architecture"] == "made-up-arch/lora"
    assert meta["ss_base_model_version"] == "madeup_v1"
    assert meta["lorasmith.family"] == NAME
    # ldm UNet names (as declared), and no adapter on the text layer the family never reads
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    last = models.build_model(NAME, device="meta").text_encoders[0].config.num_layers - 1
    assert not any(k.startswith(f"lora_te_text_model_encoder_layers_{last}_") for k in keys)
    assert (tmp_path / "quickstart" / "samples").is_dir()

    # the exported file loads on a fresh bundle of the family and changes its samples
    bundle = models.build_model(NAME, seed=cfg.model.seed)
    pipe = Txt2ImgPipeline(bundle)
    job = dict(steps=2, guidance_scale=1.0, seed=3, width=64, height=64)
    base = pipe.sample(pipe.prepare("a red circle", **job))
    network = models.load_lora(bundle, lora)
    adapted = pipe.sample(pipe.prepare("a red circle", **job))
    network.multiplier = 0.0
    again = pipe.sample(pipe.prepare("a red circle", **job))
    rel = lambda a, b: float((a - b).norm() / b.norm())
    # strength 0 gives the base back up to the LoRA layer's 2-D matmul rounding
    assert rel(adapted, base) > 1e-3 and rel(again, base) < 1e-5, (rel(adapted, base), rel(again, base))


def test_unknown_family_lists_the_registered_ones(family):
    with pytest.raises(ValueError, match=f"unknown model family 'nope'.*{NAME}"):
        models.build_model("nope", device="meta")
    with pytest.raises(ValueError, match="already registered"):
        register_family(MadeUpFamily(name=NAME, base=NAME, unet="tiny-sd15", vae="tiny",
                                     text_encoders=("tiny-clip-l",), pad_token_ids=(49407,)))
