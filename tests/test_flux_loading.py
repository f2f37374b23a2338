"""FLUX.1 checkpoints through `load_model` / `open_model`: each layout users have (BFL / ComfyUI
split files, ComfyUI all-in-one file, diffusers folder written by diffusers and transformers
themselves, hub ids), family detection, and the one-line errors. Tiny models written here, CPU, fp32."""
import fnmatch
import json
import shutil

import pytest
import torch
from flux_files_helpers import (
    assert_same_weights,
    state,
    tiny_bundle,
    write_split,
    write_t5_tokenizer,
)

from models.checkpoints.loading import ModelLoadError, load_model
from models.checkpoints.open import open_model
from models.checkpoints.safetensors_io import save_file
from models.checkpoints.single_file import save_single_file, single_file_state_dict


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def split(bundle, tmp_path_factory):
    return write_split(bundle, tmp_path_factory.mktemp("split"))


def load_split(paths, **kwargs):
    return load_model(paths["flux1"], vae=paths["ae"], text_encoders=[paths["clip_l"], paths["t5xxl"]],
                      tokenizers=[None, paths["tokenizer"]], **kwargs)


# ---- layouts ------------------------------------------------------------------------------------
def test_split_files_load_bit_identical(bundle, split):
    got = load_split(split)
    assert got.family == "tiny-flux" and type(got.denoiser).__name__ == "FluxTransformer"
    assert_same_weights(got, bundle)
    # the family's T5 length wins over the tokenizer folder's model_max_length (77)
    assert got.tokenizers[1].max_length == 32 and got.tokenizers[1]("a cat").shape == (1, 32)
    t5 = got.text_encoders[1]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # one tied Parameter
    ids = got.tokenize("a red cat")
    cond = got.conditioning(ids)
    assert cond["context"].shape == (1, 32, 32) and cond["pooled"].shape == (1, 32)
    out = got.denoise(torch.randn(1, 16, 4, 6), torch.tensor([0.5]), cond)
    assert out.shape == (1, 16, 4, 6) and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["comfy-prefix", "clip-without-text_model", "t5-alias-only", "t5-both-names"])
def test_split_file_variants(bundle, tmp_path, variant):
    kwargs = {"comfy-prefix": {"prefix": "model.diffusion_model."}, "clip-without-text_model": {"clip_prefix": "drop"},
              "t5-alias-only": {"t5_keys": ("encoder.embed_tokens.weight",)},
              "t5-both-names": {"t5_keys": ("shared.weight", "encoder.embed_tokens.weight")}}[variant]
    assert_same_weights(load_split(write_split(bundle, tmp_path, **kwargs)), bundle)


def test_t5_embedding_names_that_differ_are_refused(bundle, tmp_path):
    paths = write_split(bundle, tmp_path)
    t5 = state(bundle.text_encoders[1], drop=("encoder.embed_tokens.weight",))
    t5["encoder.embed_tokens.weight"] = t5["shared.weight"] + 1
    save_file(t5, paths["t5xxl"])
    with pytest.raises(ModelLoadError, match="shared.weight and encoder.embed_tokens.weight differ"):
        load_split(paths)


def comfy_all_in_one(bundle, path):
    """single_file_state_dict plus what ComfyUI's text-encoder wrappers add to its files."""
    sd = dict(single_file_state_dict(bundle))
    sd["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6055)
    sd["text_encoders.t5xxl.logit_scale"] = torch.tensor(4.6055)
    sd["text_encoders.clip_l.transformer.text_projection.weight"] = torch.eye(32)
    save_single_file(sd, path)
    return path


def test_comfyui_all_in_one_loads_bit_identical(bundle, tmp_path):
    sd = single_file_state_dict(bundle)
    assert {k.split(".")[0] for k in sd} == {"model", "vae", "text_encoders"}
    assert "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight" not in sd  # tied: written once
    path = comfy_all_in_one(bundle, tmp_path / "flux_aio.safetensors")
    got = load_model(path)
    assert got.family == "tiny-flux" and got.text_encoders[0].config.projection_dim is None
    assert_same_weights(got, bundle)
    assert got.tokenizers[1].max_length == 32  # the tiny family's own vocabulary: no tokenizers= needed
    # `save_single_file` of a loaded bundle gives the same file back
    save_single_file(got, tmp_path / "again.safetensors")
    assert_same_weights(load_model(tmp_path / "again.safetensors"), bundle)


def test_all_in_one_with_parts_replaced(bundle, split, tmp_path):
    path = comfy_all_in_one(bundle, tmp_path / "aio.safetensors")
    other = tiny_bundle(seed=9)
    paths = write_split(other, tmp_path / "other")
    got = load_model(path, vae=paths["ae"], unet=paths["flux1"], text_encoders=[None, paths["t5xxl"]])
    assert_same_weights(got, other, parts=("unet", "vae", "text_encoder_2"))
    assert_same_weights(got, bundle, parts=("text_encoder",))
    # a full checkpoint given for one part: only that part's tensors are read
    got = load_model(split["flux1"], vae=path, text_encoders=[path, path])
    assert_same_weights(got, bundle)


def test_diffusers_named_transformer_file_loads(bundle, tmp_path):
    from models.checkpoints.flux_keys import flux_state_dict_to_diffusers

    sd = flux_state_dict_to_diffusers(bundle.denoiser.state_dict(), bundle.denoiser.config)
    paths = write_split(bundle, tmp_path)
    save_file({"transformer." + k: v.contiguous() for k, v in sd.items()}, paths["flux1"])
    assert_same_weights(load_split(paths), bundle)


# ---- diffusers folder written by diffusers / transformers ----------------------------------------
@pytest.fixture(scope="module")
def oracle_folder(bundle, tmp_path_factory):
    """A FluxPipeline folder written by diffusers' and transformers' own save_pretrained, sharded."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from models.checkpoints.diffusers_keys import vae_config_to_diffusers
    from models.checkpoints.flux_keys import flux_config_to_diffusers

    root = tmp_path_factory.mktemp("flux_pipe")
    gen = torch.Generator().manual_seed(11)

    def randomise(model):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        return model.eval()

    cfg = bundle.denoiser.config
    transformer = randomise(FluxTransformer2DModel(**{k: v for k, v in flux_config_to_diffusers(cfg).items()
                                                      if not k.startswith("_")}))
    transformer.save_pretrained(root / "transformer", max_shard_size="50KB")
    vae = randomise(AutoencoderKL(**{k: v for k, v in vae_config_to_diffusers(bundle.vae.config, 64).items()
                                     if not k.startswith("_")}))
    vae.save_pretrained(root / "vae")
    c = bundle.text_encoders[0].config
    clip = randomise(CLIPTextModel(CLIPTextConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                                                  num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                                                  hidden_act="quick_gelu", vocab_size=c.vocab_size,
                                                  max_position_embeddings=c.max_position)))
    clip.save_pretrained(root / "text_encoder")
    t = bundle.text_encoders[1].config
    t5 = randomise(T5EncoderModel(T5Config(d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
                                           num_heads=t.num_heads, vocab_size=t.vocab_size,
                                           relative_attention_max_distance=t.relative_attention_max_distance,
                                           feed_forward_proj="gated-gelu", is_encoder_decoder=False)))
    t5.save_pretrained(root / "text_encoder_2", max_shard_size="20KB")
    write_t5_tokenizer(bundle, root / "tokenizer_2", model_max_length=512)
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root, {"transformer": transformer, "vae": vae, "clip": clip, "t5": t5}


def test_diffusers_folder_equals_the_oracles(oracle_folder):
    from models.checkpoints.diffusers_keys import vae_state_dict_to_diffusers
    from models.checkpoints.flux_keys import flux_state_dict_from_diffusers
    from models.flux import image_ids, text_ids

    root, ref = oracle_folder
    assert len(list((root / "transformer").glob("*.safetensors"))) > 1  # really sharded
    assert len(list((root / "text_encoder_2").glob("*.safetensors"))) > 1
    got = load_model(root)
    assert got.family == "tiny-flux" and got.tokenizers[1].max_length == 32
    cfg = got.denoiser.config
    want = flux_state_dict_from_diffusers(ref["transformer"].state_dict(), cfg)
    assert all(torch.equal(got.denoiser.state_dict()[k], want[k]) for k in want)
    ref_vae = ref["vae"].state_dict()
    for k, v in vae_state_dict_to_diffusers(got.vae.state_dict(), got.vae.config).items():
        assert torch.equal(v.reshape(ref_vae[k].shape), ref_vae[k]), k
    for ours, theirs in ((got.text_encoders[0], ref["clip"]), (got.text_encoders[1], ref["t5"])):
        sd = theirs.state_dict()
        for k, v in ours.state_dict().items():
            assert torch.equal(v, sd[k] if k in sd else sd[k.removeprefix("text_model.")]), k
    gen = torch.Generator().manual_seed(1)
    img, txt = torch.randn(2, 12, 64, generator=gen), torch.randn(2, 5, 32, generator=gen)
    y, t, g = torch.randn(2, 32, generator=gen), torch.rand(2, generator=gen), torch.tensor([1.0, 4.0])
    iid, tid = image_ids(2, 6, 8), text_ids(2, 5)
    with torch.no_grad():
        ours = got.denoiser(img, iid, txt, tid, t, y, g)
        theirs = ref["transformer"](img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=iid[0],
                                    txt_ids=tid[0], guidance=g, return_dict=False)[0]
        assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5
        ids = torch.randint(0, 200, (2, 9), generator=gen)
        assert torch.allclose(got.text_encoders[1](ids), ref["t5"](ids).last_hidden_state, atol=1e-5, rtol=1e-4)


def test_diffusers_folder_parts_replaced_and_tokenizer_given(oracle_folder, bundle, split, tmp_path):
    root, _ = oracle_folder
    got = load_model(root, text_encoders=[None, split["t5xxl"]], vae=split["ae"],
                     tokenizers=[None, split["tokenizer"]])
    assert_same_weights(got, bundle, parts=("vae", "text_encoder_2"))
    # a transformer-only pipeline folder (fine-tunes ship these) takes the rest from files
    lean = tmp_path / "lean"
    shutil.copytree(root / "transformer", lean / "transformer")
    shutil.copy(root / "model_index.json", lean)
    with pytest.raises(ModelLoadError, match=r"lean holds only the FLUX.1 transformer: also give the VAE as vae=.*"
                                             r"model.vae.* and the text encoders as text_encoders=\[clip_l.safetensors, "
                                             r"t5xxl_fp16.safetensors\] \(config model.text_encoders\)"):
        load_model(lean)
    got = load_model(lean, vae=split["ae"], text_encoders=[split["clip_l"], root],
                     tokenizers=[None, split["tokenizer"]])
    assert_same_weights(got, bundle, parts=("vae", "text_encoder"))


def test_open_model_passes_text_encoders_and_tokenizers(split, bundle):
    got = open_model(str(split["flux1"]), vae=str(split["ae"]), text_encoders=[str(split["clip_l"]), str(split["t5xxl"])],
                     tokenizers=[None, str(split["tokenizer"])], dtype=torch.bfloat16)
    assert got.family == "tiny-flux" and got.denoiser.dtype == torch.bfloat16
    assert not any(p.requires_grad for m in got.modules().values() for p in m.parameters())
    with pytest.raises(ModelLoadError, match="text_encoders.*random-weight family source"):
        open_model("tiny-flux", text_encoders=[None, str(split["t5xxl"])])


# ---- hub -----------------------------------------------------------------------------------------
def test_hub_repo_and_files(oracle_folder, split, bundle, tmp_path, monkeypatch):
    import huggingface_hub
    from test_loading_hub import StandIn

    root, _ = oracle_folder
    repo = tmp_path / "repo"
    shutil.copytree(root, repo)
    shutil.copy(split["t5xxl"], repo / "t5xxl_fp16.safetensors")  # a root file the snapshot must not fetch
    stand_in = StandIn(repo, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", stand_in.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", stand_in.hf_hub_download)
    got = load_model("bfl/tiny-flux", text_encoders=[None, "bfl/tiny-flux/t5xxl_fp16.safetensors"],
                     tokenizers=[None, "bfl/tiny-flux"])
    assert got.family == "tiny-flux"
    assert_same_weights(got, bundle, parts=("text_encoder_2",))
    fetched = {p.relative_to(tmp_path / "cache" / "bfl--tiny-flux").as_posix()
               for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert "transformer/config.json" in fetched and "tokenizer_2/tokenizer.json" in fetched
    assert any(f.startswith("transformer/diffusion_pytorch_model-") for f in fetched)
    assert any(f.startswith("text_encoder_2/model-") for f in fetched)
    snapshots = [pattern for call in stand_in.calls if call[0] == "snapshot" for pattern in call[2]]
    assert not any(fnmatch.fnmatch("t5xxl_fp16.safetensors", p) for p in snapshots)  # fetched once, as a file
    assert [c for c in stand_in.calls if c[0] == "file"] == [("file", "bfl/tiny-flux", "t5xxl_fp16.safetensors", None)]


# ---- detection -----------------------------------------------------------------------------------
def test_family_from_guidance_and_shapes(tmp_path):
    schnell = tiny_bundle(seed=4, guidance=False)
    paths = write_split(schnell, tmp_path)
    got = load_split(paths)
    # no guidance_in: schnell's layout; a test-size one loads as flux-schnell of that size
    assert got.family == "flux-schnell" and not got.denoiser.config.guidance_embed
    assert got.tokenizers[1].max_length == 256  # schnell's T5 length, whatever the folder says
    assert_same_weights(got, schnell)
    with pytest.raises(ModelLoadError, match=r"is a FLUX.1-schnell transformer \(without guidance_in.*family='tiny-flux' "
                                             r"was requested; pass family='flux-schnell'"):
        load_split(paths, family="tiny-flux")
    with pytest.raises(ModelLoadError, match="is a FLUX.1-schnell transformer .* but family='sdxl' was requested; pass "
                                             "family='flux-schnell'"):
        load_split(paths, family="sdxl")


def test_full_size_layouts_on_meta():
    """The released transformer's names (fixture from diffusers' model) read as flux-dev, without
    guidance_in as flux-schnell; the full-size CLIP-L and T5-XXL in ComfyUI's all-in-one names
    match transformers' own models key for key and parse to their presets."""
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from models.bundle import build_model
    from models.checkpoints.flux_components import clip_part, t5_part, transformer_part
    from models.checkpoints.flux_files import _family_of
    from models.checkpoints.materialize import validate_parts
    from models.checkpoints.safetensors_io import TensorStore
    from models.checkpoints.single_file import meta_module

    lines = (Path(__file__).parent / "fixtures" / "flux_dev_keys.txt").read_text().splitlines()
    shapes = {k: json.loads(s) for k, s in (line.split("\t") for line in lines)}
    presets = [build_model(f, device="meta").denoiser.config for f in ("flux-dev", "flux-schnell", "tiny-flux")]
    for drop, family in (("", "flux-dev"), ("guidance_in.", "flux-schnell")):
        store = TensorStore(tensors={"model.diffusion_model." + k: torch.empty(s, device="meta")
                                     for k, s in shapes.items() if not (drop and k.startswith(drop))})
        part, _ = transformer_part(store, "model.diffusion_model.", "bfl", presets, "flux1.safetensors")
        assert _family_of(part.config, None, "x") == family
    dev = build_model("flux-dev", device="meta")
    sd = single_file_state_dict(dev)
    store = TensorStore(tensors=sd)
    clip, _ = clip_part(store, "text_encoders.clip_l.transformer.", dev.spec.text_encoder_configs()[0], "aio")
    t5, _ = t5_part(store, "text_encoders.t5xxl.transformer.", dev.spec.text_encoder_configs()[1], "aio")
    assert clip.config == dev.text_encoders[0].config and t5.config == dev.text_encoders[1].config
    parts = {"text_encoder": clip, "text_encoder_2": t5}
    validate_parts(parts, {s: meta_module(p.config) for s, p in parts.items()}, "flux", None)
    with torch.device("meta"):
        hf_t5 = T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                        feed_forward_proj="gated-gelu", is_encoder_decoder=False))
        hf_clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                               intermediate_size=3072, hidden_act="quick_gelu"))
    for prefix, model in (("text_encoders.t5xxl.transformer.", hf_t5), ("text_encoders.clip_l.transformer.", hf_clip)):
        ours = {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}
        theirs = {("text_model." + k if model is hf_clip and not k.startswith("text_model.") else k): tuple(v.shape)
                  for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
        ours.pop("text_model.embeddings.position_ids", None)
        theirs.pop("text_model.embeddings.position_ids", None)
        assert ours == theirs, prefix


# ---- writing -------------------------------------------------------------------------------------
def test_diffusers_folder_written_by_us_reads_back_and_in_the_oracles(bundle, tmp_path):
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    from models.checkpoints.diffusers_folder import save_diffusers
    from models.flux import image_ids, text_ids

    folder = save_diffusers(bundle, tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    got = load_model(folder)
    assert got.family == "tiny-flux"
    assert_same_weights(got, bundle)
    assert torch.equal(got.tokenizers[1]("a red cat"), bundle.tokenizers[1]("a red cat"))
    ref = FluxTransformer2DModel.from_pretrained(folder / "transformer").eval()
    gen = torch.Generator().manual_seed(2)
    img, txt, y = torch.randn(1, 6, 64, generator=gen), torch.randn(1, 4, 32, generator=gen), torch.randn(1, 32, generator=gen)
    t, g = torch.tensor([0.4]), torch.tensor([3.5])
    with torch.no_grad():
        ours = bundle.denoiser(img, image_ids(1, 4, 6), txt, text_ids(1, 4), t, y, g)
        theirs = ref(img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=image_ids(1, 4, 6)[0],
                     txt_ids=text_ids(1, 4)[0], guidance=g, return_dict=False)[0]
        assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5
        t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval()
        ids = torch.randint(0, 200, (1, 7), generator=gen)
        assert torch.allclose(t5(ids).last_hidden_state, bundle.text_encoders[1](ids), atol=1e-5, rtol=1e-4)
