"""FLUX.1 loading errors: one line each, naming the file and what to give (keyword and config key)."""
import json

import pytest
import torch
from flux_files_helpers import state, tiny_bundle, write_split

from models.bundle import build_model
from models.checkpoints.loading import ModelLoadError, load_model
from models.checkpoints.safetensors_io import save_file
from models.checkpoints.single_file import save_single_file


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tiny_bundle(seed=2), tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15") / "sd15.safetensors"
    save_single_file(build_model("tiny-sd15", seed=0), path)
    return path


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_transformer_only_file_says_which_files_to_add(split):
    with pytest.raises(ModelLoadError) as e:
        load_model(split["flux1"])
    assert one_line(e) == (
        f"{split['flux1']} holds only the FLUX.1 transformer: also give the VAE as vae=ae.safetensors (config "
        "model.vae) and the text encoders as text_encoders=[clip_l.safetensors, t5xxl_fp16.safetensors] (config "
        "model.text_encoders). Without a diffusers folder the T5 tokenizer comes from tokenizers=[null, <folder with "
        "tokenizer.json or spiece.model, e.g. FLUX.1-dev/tokenizer_2>] (config model.tokenizers)")
    with pytest.raises(ModelLoadError, match=r"lacks part of the model: also give the T5-XXL text encoder as "
                                             r"text_encoders=\[null, t5xxl_fp16.safetensors\] \(config model.text_encoders\)"):
        load_model(split["flux1"], vae=split["ae"], text_encoders=[split["clip_l"], None])


def test_t5_tokenizer_problems(split, tmp_path):
    schnell = write_split(tiny_bundle(seed=2, guidance=False), tmp_path / "schnell")
    files = dict(vae=schnell["ae"], text_encoders=[schnell["clip_l"], schnell["t5xxl"]])
    bundle = load_model(schnell["flux1"], **files)  # loads: the T5 tokenizer is needed only to tokenize
    with pytest.raises(RuntimeError, match=r"no T5 tokenizer loaded; give the folder holding tokenizer.json or "
                                           r"spiece.model .*model.tokenizers: \[null, <folder>\]"):
        bundle.tokenize("a cat")
    with pytest.raises(ModelLoadError, match=r"tokenizers\[1\]=.*nowhere does not exist: give the T5 tokenizer folder"):
        load_model(schnell["flux1"], **files, tokenizers=[None, str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"tokenizers\[1\]=.*empty: cannot load the T5 tokenizer \(.*no "
                                             r"tokenizer.json or spiece.model"):
        load_model(schnell["flux1"], **files, tokenizers=[None, tmp_path / "empty"])
    with pytest.raises(ModelLoadError, match=r"tokenizers\[0\]=.*empty: no vocab.json \+ merges.txt there"):
        load_model(schnell["flux1"], **files, tokenizers=[tmp_path / "empty", None])
    with pytest.raises(ModelLoadError, match=r"tokenizers: give one entry per text encoder, \[CLIP-L, T5-XXL\]"):
        load_model(schnell["flux1"], **files, tokenizers=[schnell["tokenizer"]])


def test_text_encoder_slots(split, tmp_path):
    base = dict(vae=split["ae"], tokenizers=[None, split["tokenizer"]])
    with pytest.raises(ModelLoadError, match=r"text_encoders\[0\]=.*t5xxl.safetensors is a T5-XXL text encoder, but "
                                             r"slot 0 takes CLIP-L \(order: text_encoders=\[CLIP-L, T5-XXL\]\)"):
        load_model(split["flux1"], text_encoders=[split["t5xxl"], split["clip_l"]], **base)
    with pytest.raises(ModelLoadError, match=r"text_encoders\[1\]=.*ae.safetensors holds no T5-XXL text encoder: it is "
                                             r"a VAE"):
        load_model(split["flux1"], text_encoders=[split["clip_l"], split["ae"]], **base)
    with pytest.raises(ModelLoadError, match=r"text_encoders: give one entry per text encoder"):
        load_model(split["flux1"], text_encoders=str(split["clip_l"]), **base)
    folder = tmp_path / "text_encoder_2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelLoadError, match=r"config.json describes T5-XXL, but slot 0 takes CLIP-L"):
        load_model(split["flux1"], text_encoders=[folder, split["t5xxl"]], **base)


def test_parts_that_do_not_fit(split, sd15, tmp_path):
    files = dict(text_encoders=[split["clip_l"], split["t5xxl"]], tokenizers=[None, split["tokenizer"]])
    with pytest.raises(ModelLoadError, match=r"vae=.*sd15.safetensors is a VAE with 4 latent channels but the "
                                             r"transformer .* reads 16-channel latents; FLUX.1 needs its own VAE"):
        load_model(split["flux1"], vae=sd15, **files)
    with pytest.raises(ModelLoadError, match=r"vae=.*t5xxl.safetensors holds no VAE .*: it is a T5 text encoder"):
        load_model(split["flux1"], vae=split["t5xxl"], **files)
    wide = write_split(tiny_bundle(seed=2, t5_width=64), tmp_path / "wide")
    with pytest.raises(ModelLoadError, match=r"text_encoders\[1\]=.*t5xxl.safetensors is a T5 of width 64 but the "
                                             r"transformer .* reads 32-wide text states"):
        load_model(split["flux1"], vae=split["ae"], text_encoders=[split["clip_l"], wide["t5xxl"]],
                   tokenizers=[None, split["tokenizer"]])


def test_wrong_family_files_say_what_they_are(split, sd15, tmp_path):
    with pytest.raises(ModelLoadError, match=r"t5xxl.safetensors is a T5 text encoder .*FLUX.1 takes it as "
                                             r"text_encoders=\[<CLIP-L file>, <this file>\].*not a FLUX.1 checkpoint"):
        load_model(split["t5xxl"])
    with pytest.raises(ModelLoadError, match=r"ae.safetensors is a VAE .*give it as vae=..., not a FLUX.1 checkpoint; "
                                             r"family='flux-dev' was requested"):
        load_model(split["ae"], family="flux-dev")
    with pytest.raises(ModelLoadError, match=r"sd15.safetensors is an SD1.5 checkpoint, not a FLUX.1 checkpoint; "
                                             r"family='tiny-flux' was requested"):
        load_model(sd15, family="tiny-flux")
    with pytest.raises(ModelLoadError, match=r"text_encoders= names separate text-encoder files / tokenizers of a "
                                             r"FLUX.1 model; .*sd15.safetensors is not one"):
        load_model(sd15, text_encoders=[None, split["t5xxl"]])
    with pytest.raises(ModelLoadError, match=r"prediction_type='v_prediction' does not apply to FLUX.1"):
        load_model(split["flux1"], prediction_type="v_prediction")
    relative = {k: v for k, v in state(tiny_bundle(seed=2).denoiser).items() if ".img_mod." not in k}
    save_file(relative, tmp_path / "chroma.safetensors")  # Flux-like blocks without per-block modulation
    with pytest.raises(ModelLoadError, match=r"a Flux-style transformer that is not FLUX.1 .*Chroma, FLUX.2"):
        load_model(tmp_path / "chroma.safetensors", family="flux-dev")
    pipe = tmp_path / "fill"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxFillPipeline"}))
    with pytest.raises(ModelLoadError, match=r"fill is a FluxFillPipeline pipeline, not a FLUX.1 text-to-image one"):
        load_model(pipe, family="flux-dev")


def test_damaged_transformer_lists_what_is_off(split, tmp_path):
    sd = state(tiny_bundle(seed=2).denoiser)
    sd.pop("double_blocks.1.img_mlp.0.weight")
    sd["double_blocks.0.txt_in_extra.weight"] = torch.zeros(2)
    path = tmp_path / "flux1.safetensors"
    save_file(sd, path)
    with pytest.raises(ModelLoadError, match=r"does not match the .* model \(1 missing: double_blocks.1.img_mlp.0.weight "
                                             r"\| 1 unexpected: double_blocks.0.txt_in_extra.weight\)"):
        load_model(path, vae=split["ae"], text_encoders=[split["clip_l"], split["t5xxl"]])


def test_diffusers_named_transformer_problems(split, tmp_path):
    from models.checkpoints.flux_keys import flux_state_dict_to_diffusers

    dev = tiny_bundle(seed=2).denoiser
    sd = {k: v.contiguous() for k, v in flux_state_dict_to_diffusers(dev.state_dict(), dev.config).items()}
    sd.pop("transformer_blocks.0.attn.to_k.weight")
    sd["single_transformer_blocks.1.proj_mlp.weight"] = torch.zeros(5, 64)
    path = tmp_path / "diffusers_named.safetensors"
    save_file(sd, path)
    files = dict(vae=split["ae"], text_encoders=[split["clip_l"], split["t5xxl"]])
    with pytest.raises(ModelLoadError, match=r"\(1 missing: transformer_blocks.0.attn.to_k.weight \| 1 wrong shape: "
                                             r"single_transformer_blocks.1.proj_mlp.weight \[5, 64\] vs model \[448, 64\]\)"):
        load_model(path, **files)


def test_component_files_as_the_source(split):
    for key, what in (("ae", "a VAE"), ("clip_l", "a CLIP text encoder")):
        with pytest.raises(ModelLoadError, match=rf"{key}.safetensors is {what} .*not a full model: a VAE goes in "
                                                 r"vae=..., a UNet in unet=..., FLUX.1's CLIP-L and T5 files in "
                                                 r"text_encoders=\[clip_l, t5xxl\]"):
            load_model(split[key])
