"""One LoRA options object: the config's `lora` section, `inject_lora(bundle, options=...)` and the
keyword form build the same network, and the file metadata does not depend on the form."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import models
from models.bundle import build_model
from models.lora.files import build_metadata
from models.lora.options import LoRAOptions
from trainer.config import Config, load_config

_TIMELESS = ("modelspec.date",)


def _net_summary(net):
    """(kohya name -> (rank, alpha, dora)) and the initial weights of every adapter."""
    shape = {n: (a.rank, a.alpha, a.is_dora) for n, a in net.adapters().items()}
    return shape, {k: v.clone() for k, v in net.state_dict().items()}


def _metadata(net):
    return {k: v for k, v in build_metadata(net).items() if k not in _TIMELESS}


def _inject(**kw):
    bundle = build_model("tiny-sd15", seed=0)
    torch.manual_seed(3)
    net = models.inject_lora(bundle, **kw)
    try:
        return _net_summary(net), _metadata(net), net.config
    finally:
        net.remove()


KEYWORDS = dict(unet="locon", text_encoders="te", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0,
                text_encoder_rank=3, dropout=0.1, rank_dropout=0.2, module_dropout=0.05,
                include=[r"^(unet|te)\."], exclude=[r"\.out_layers\."])


def test_options_and_keywords_build_the_same_network_and_metadata():
    options = LoRAOptions(preset="locon", text_encoders="te", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0,
                          text_encoder_rank=3, dropout=0.1, rank_dropout=0.2, module_dropout=0.05,
                          include=[r"^(unet|te)\."], exclude=[r"\.out_layers\."])
    (shape_kw, weights_kw), meta_kw, config_kw = _inject(**KEYWORDS)
    (shape_opt, weights_opt), meta_opt, config_opt = _inject(options=options)
    assert shape_kw == shape_opt and any(k.startswith("lora_te_") for k in shape_kw)
    assert {r for r, _, _ in shape_kw.values()} == {2, 3, 4}  # conv, text-encoder and linear ranks all used
    assert all(torch.equal(weights_kw[k], weights_opt[k]) for k in weights_kw)
    assert meta_kw == meta_opt
    assert config_kw == config_opt == options and config_opt is not options


def test_keywords_override_options_without_changing_them():
    options = LoRAOptions(preset="attn", rank=8, text_encoders=None)
    (shape, _), _, config = _inject(options=options, rank=2, exclude=None)
    assert {r for r, _, _ in shape.values()} == {2} and config.rank == 2
    assert options.rank == 8
    (shape, _), _, _ = _inject(options=options, unet=[r"attn2\.to_k$"])
    assert shape and all(name.endswith("attn2_to_k") for name in shape)


def test_keyword_form_defaults_are_unchanged():
    (shape, _), _, config = _inject()
    assert config.preset == "kohya" and config.text_encoders is None and config.rank == 16
    assert shape and not any(k.startswith("lora_te") for k in shape)


def test_bad_options_name_the_field():
    bundle = build_model("tiny-sd15", device="meta")
    with pytest.raises(ValueError, match=r"^rank_dropout: must be in \[0, 1\)"):
        models.inject_lora(bundle, options=LoRAOptions(rank_dropout=1.0))
    with pytest.raises(TypeError, match="unknown argument.*rnak"):
        models.inject_lora(bundle, rnak=4)
    with pytest.raises(TypeError, match="options must be a LoRAOptions"):
        models.inject_lora(bundle, "kohya")


def test_config_lora_section_is_the_options_object():
    cfg = load_config(None, ["lora.rank=4", "lora.preset=attn", "lora.text_encoders=[layers\\.0\\.]"], check=False)
    assert isinstance(cfg.lora, LoRAOptions) and cfg.lora.text_encoders == [r"layers\.0\."]
    assert Config().lora == LoRAOptions()
    assert {f.name for f in dataclasses.fields(LoRAOptions)} == {
        "preset", "targets", "include", "exclude", "rank", "alpha", "conv_rank", "conv_alpha", "dropout",
        "rank_dropout", "module_dropout", "text_encoders", "text_encoder_rank", "text_encoder_alpha", "dora",
        "algo", "factor", "decompose_both", "use_tucker",
        "block_ranks", "block_alphas", "conv_block_ranks", "conv_block_alphas"}


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("train_text_encoders", [False, True])
def test_recipe_injects_the_config_lora_section(tmp_path, train_text_encoders):
    from training_runs import TINY_LORA, copy_quickstart_images

    from trainer.recipe import LoRATrainingRecipe

    data = copy_quickstart_images(tmp_path, 2)
    cfg = load_config(TINY_LORA, [f"output.dir={tmp_path / 'runs'}", f"data.path={data}", "data.num_workers=0",
                                   "data.cache_latents=false", "data.cache_text=false", "output.tensorboard=false",
                                   "lora.preset=attn", "lora.rank=3", "lora.text_encoder_rank=2", "lora.dropout=0.1",
                                   f"train.train_text_encoders={str(train_text_encoders).lower()}"])
    recipe = LoRATrainingRecipe(cfg)
    try:
        recipe.setup()
        want = cfg.lora if train_text_encoders else dataclasses.replace(cfg.lora, text_encoders=None)
        assert recipe.network.config == want
        ranks = {name.split("_")[1]: a.rank for name, a in recipe.network.adapters().items()}
        assert ranks == ({"unet": 3, "te1": 2, "te2": 2} if train_text_encoders else {"unet": 3})
    finally:
        recipe._release_run_lock()
