"""`models.load_model` against independent reference implementations (test-only oracles).

Tiny random models, CPU float32. The UNet/VAE ldm layout is defined by diffusers' own
`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`: random ldm tensors are written to a
single file AND converted by diffusers into the reference modules. CLIP-L is a transformers
`CLIPTextModel` (its state dict under the single-file prefix), the bigG / ViT-H towers are an
open_clip `TextTransformer` recorded with its outputs (`open_clip_oracle`; its own state dict under
`conditioner.embedders.1.model.` / `cond_stage_model.model.`). Diffusers folders are written with
`save_pretrained` (sharded UNet, fp16-variant-only text encoder). Outputs must agree to rel <= 1e-5.
"""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file as oracle_save

import models
import open_clip_oracle
from models.unet import UNet, UNetConfig, sdxl_vector
from models.vae import AutoencoderKL, VAEConfig

TOL = 1e-5

# Diffusers configs written out by hand (not derived by our mapper) for the tiny presets.
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64], layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4], cross_attention_dim=96,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1600, norm_num_groups=32,
)
SD15_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=2, cross_attention_dim=32, use_linear_projection=False, norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4,
    norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.13025,
)



def rel(ours, ref) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def random_ldm(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for every parameter name/shape of an ldm-named module (norm scales ~1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        t = torch.randn(p.shape, generator=gen)
        if "norm" in name and name.endswith("weight"):
            t = 1 + 0.2 * t
        else:
            t = t * (0.2 if p.ndim == 1 else 1 / max(1, p[0].numel()) ** 0.5)
        out[name] = t
    return out


def hf_clip(hidden, layers, heads, inter, act, proj=None, seed=0):
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = HFConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                   hidden_act=act, projection_dim=proj or hidden, bos_token_id=49406, eos_token_id=49407)
    model = (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def reference_unet_vae(unet_cfg_name, diff_unet_cfg, seed):
    from diffusers import AutoencoderKL as DVAE
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    unet_ldm = random_ldm(UNet(UNetConfig.preset(unet_cfg_name), device="meta"), seed)
    vae_ldm = random_ldm(AutoencoderKL(VAEConfig.preset("tiny"), device="meta"), seed + 1)
    d_unet = UNet2DConditionModel(**diff_unet_cfg).eval()
    d_unet.load_state_dict(convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in unet_ldm.items()},
                                                       diff_unet_cfg), strict=True)
    d_vae = DVAE(**TINY_VAE).eval()
    d_vae.load_state_dict(convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in vae_ldm.items()},
                                                     TINY_VAE), strict=True)
    return unet_ldm, vae_ldm, d_unet, d_vae


def token_ids(batch=2):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49406, (batch, 77), generator=gen)
    ids[:, 0] = 49406
    ids[0, 9:] = 49407  # EOS then EOS padding
    ids[1, 40] = 49407
    ids[1, 41:] = 0  # OpenCLIP-style "!" padding after EOS
    return ids


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Reference SDXL parts, a single file (oracle writer) and a diffusers folder (save_pretrained)."""
    root = tmp_path_factory.mktemp("sdxl")
    unet_ldm, vae_ldm, d_unet, d_vae = reference_unet_vae("tiny-sdxl", SDXL_UNET, seed=10)
    te1 = hf_clip(32, 3, 2, 64, "quick_gelu", seed=11)
    sd = {"model.diffusion_model." + k: v for k, v in unet_ldm.items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_ldm.items()})
    sd.update({"conditioner.embedders.0.transformer." + k: v.contiguous() for k, v in te1.state_dict().items()})
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update({"conditioner.embedders.1.model." + k: v for k, v in open_clip_oracle.tower_state_dict().items()})
    sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    sd["alphas_cumprod"] = torch.rand(1000)  # a harmless extra real files carry
    single = root / "tiny_sdxl.safetensors"
    oracle_save(sd, str(single))

    folder = root / "folder"
    te2 = hf_clip(64, 3, 2, 128, "gelu", proj=64, seed=13)
    d_unet.save_pretrained(folder / "unet", max_shard_size="300KB")
    d_vae.save_pretrained(folder / "vae")
    copy.deepcopy(d_vae).half().save_pretrained(folder / "vae", variant="fp16")
    te1.save_pretrained(folder / "text_encoder")
    copy.deepcopy(te2).half().save_pretrained(folder / "text_encoder_2", variant="fp16")  # only the variant exists
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    return dict(single=single, folder=folder, unet=d_unet, vae=d_vae, te1=te1, te2=te2)


def check_unet_sdxl(ours, ref):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 12, generator=gen)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 7, 96, generator=gen)
    pooled = torch.randn(2, 64, generator=gen)
    time_ids = torch.tensor([[64.0, 96, 0, 0, 64, 96], [80, 40, 8, 4, 64, 64]])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, t, ctx, y=sdxl_vector(pooled, time_ids))
    assert rel(got, want) <= TOL


def check_vae(ours, ref):
    img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        assert rel(ours.encode(img).mean, ref.encode(img).latent_dist.mean) <= TOL
        z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(7))
        assert rel(ours.decode(z), ref.decode(z).sample) <= TOL


def check_hf_clip(ours, ref, ids):
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        got = ours(ids)
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert rel(a, b) <= TOL
    if hasattr(want, "text_embeds"):
        assert rel(got.pooled, want.text_embeds) <= TOL


def check_openclip(ours, heads, penultimate_only=False):
    """`ours` against open_clip's recorded outputs for the `loading` ids with `heads` heads."""
    layers = open_clip_oracle.tower_config()["layers"]
    ref = open_clip_oracle.outputs(heads, "loading")
    with torch.no_grad():
        got = ours(open_clip_oracle.token_ids("loading"))
    assert rel(got.hidden_states[layers - 1], ref[f"hidden.{layers - 1}"]) <= TOL
    if not penultimate_only:
        assert rel(got.hidden_states[layers], ref[f"hidden.{layers}"]) <= TOL
        assert rel(got.pooled, ref["pooled"]) <= TOL


def test_sdxl_single_file_matches_references(sdxl):
    bundle = models.load_model(sdxl["single"])
    assert bundle.family == "tiny-sdxl" and bundle.spec.prediction_type == "epsilon"
    assert bundle.unet.dtype == torch.float32
    check_unet_sdxl(bundle.unet, sdxl["unet"])
    check_vae(bundle.vae, sdxl["vae"])
    ids = token_ids()
    check_hf_clip(bundle.text_encoders[0], sdxl["te1"], ids)
    check_openclip(bundle.text_encoders[1], heads=2)


def test_sdxl_diffusers_folder_matches_references(sdxl):
    folder = sdxl["folder"]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()  # really sharded
    bundle = models.load_model(folder, dtype=torch.float32)
    assert bundle.family == "tiny-sdxl" and bundle.spec.prediction_type == "v_prediction"
    check_unet_sdxl(bundle.unet, sdxl["unet"])
    check_vae(bundle.vae, sdxl["vae"])  # plain weights chosen over the fp16 variant
    ids = token_ids()
    check_hf_clip(bundle.text_encoders[0], sdxl["te1"], ids)
    te2_half = sdxl["te2"].to(torch.float16).float()  # only the fp16 variant exists: auto-fallback
    check_hf_clip(bundle.text_encoders[1], te2_half, ids)


def test_fp16_variant_and_dtype(sdxl):
    bundle = models.load_model(sdxl["folder"], variant="fp16")
    # dtype=None keeps what each file stores: the fp16 variant of the VAE, fp32 UNet (no variant).
    assert bundle.vae.dtype == torch.float16 and bundle.unet.dtype == torch.float32
    ref = sdxl["vae"].state_dict()
    assert all(p.dtype == torch.float16 for p in bundle.vae.state_dict().values())
    assert torch.equal(bundle.vae.state_dict()["encoder.conv_in.weight"], ref["encoder.conv_in.weight"].half())
    # VAE attention: diffusers Linear (C, C) -> our 1x1 conv (C, C, 1, 1)
    q = bundle.vae.state_dict()["encoder.mid.attn_1.q.weight"]
    assert q.shape[2:] == (1, 1)
    assert torch.equal(q[:, :, 0, 0], ref["encoder.mid_block.attentions.0.to_q.weight"].half())
    bf = models.load_model(sdxl["single"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in bf.modules().values() for p in m.parameters())


def test_sd15_single_file_matches_references(tmp_path):
    unet_ldm, vae_ldm, d_unet, d_vae = reference_unet_vae("tiny-sd15", SD15_UNET, seed=20)
    te = hf_clip(32, 3, 2, 64, "quick_gelu", seed=21)
    sd = {"model.diffusion_model." + k: v for k, v in unet_ldm.items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_ldm.items()})
    # early SD1.x files were saved by a transformers version without the `text_model.` level
    sd.update({"cond_stage_model.transformer." + k.removeprefix("text_model."): v.contiguous()
               for k, v in te.state_dict().items()})
    sd.update({f"model_ema.{k.replace('.', '')}": torch.zeros(1) for k in list(unet_ldm)[:5]})  # EMA leftovers
    path = tmp_path / "sd15.safetensors"
    oracle_save(sd, str(path))
    bundle = models.load_model(path, family="tiny-sd15")
    assert bundle.family == "tiny-sd15"
    gen = torch.Generator().manual_seed(8)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)
    t = torch.tensor([3.0, 999.0])
    with torch.no_grad():
        assert rel(bundle.unet(x, t, ctx), d_unet(x, t, encoder_hidden_states=ctx).sample) <= TOL
    check_vae(bundle.vae, d_vae)
    check_hf_clip(bundle.text_encoders[0], te, token_ids())


def test_sd2_single_file_openclip_vit_h(tmp_path):
    """SD2 layout: OpenCLIP tower under cond_stage_model.model. (its text_projection is unused)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0),
                     num_heads=None, num_head_channels=64, context_dim=64, use_linear_in_transformer=True)
    d_cfg = dict(sample_size=8, block_out_channels=[64, 128], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 attention_head_dim=[1, 2], cross_attention_dim=64, use_linear_projection=True)
    unet_ldm = random_ldm(UNet(cfg, device="meta"), 30)
    d_unet = UNet2DConditionModel(**d_cfg).eval()
    d_unet.load_state_dict(convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in unet_ldm.items()},
                                                       d_cfg), strict=True)
    vae_cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=32)
    sd = {"model.diffusion_model." + k: v for k, v in unet_ldm.items()}
    sd.update({"first_stage_model." + k: v for k, v in random_ldm(AutoencoderKL(vae_cfg, device="meta"), 32).items()})
    sd.update({"cond_stage_model.model." + k: v for k, v in open_clip_oracle.tower_state_dict().items()})
    path = tmp_path / "sd2.safetensors"
    oracle_save(sd, str(path), metadata={"modelspec.prediction_type": "v"})
    bundle = models.load_model(path)
    assert bundle.family == "sd2" and bundle.spec.prediction_type == "v_prediction"
    assert bundle.text_encoders[0].text_projection is None
    assert bundle.vae.config.scaling_factor == 0.18215
    gen = torch.Generator().manual_seed(9)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 64, generator=gen)
    with torch.no_grad():
        assert rel(bundle.unet(x, torch.tensor([500.0]), ctx), d_unet(x, 500.0, encoder_hidden_states=ctx).sample) <= TOL
    check_openclip(bundle.text_encoders[0], heads=1, penultimate_only=True)


def test_vae_override_fp16_fix_style(sdxl, tmp_path):
    """A separate VAE (ldm layout, no prefix) replaces the checkpoint's, keeping its latent scaling."""
    other = random_ldm(AutoencoderKL(VAEConfig.preset("tiny"), device="meta"), 40)
    path = tmp_path / "vae.safetensors"
    oracle_save(other, str(path))
    bundle = models.load_model(sdxl["single"], vae=path)
    for name, p in bundle.vae.state_dict().items():
        assert torch.equal(p, other[name])
    assert bundle.vae.config.scaling_factor == 0.13025
    # a diffusers-layout VAE folder works as an override too
    bundle = models.load_model(sdxl["single"], vae=sdxl["folder"] / "vae")
    check_vae(bundle.vae, sdxl["vae"])


def test_unet_override_file(sdxl, tmp_path):
    unet_ldm = random_ldm(UNet(UNetConfig.preset("tiny-sdxl"), device="meta"), 50)
    path = tmp_path / "unet.safetensors"
    oracle_save({"model.diffusion_model." + k: v for k, v in unet_ldm.items()}, str(path))
    bundle = models.load_model(sdxl["folder"], unet=path)
    for name, p in bundle.unet.state_dict().items():
        assert torch.equal(p, unet_ldm[name])


def test_tokenizer_files_in_folder_are_honoured(sdxl, tmp_path):
    import shutil

    from transformers import CLIPTokenizer as HFTokenizer

    from models.tokenizer import default_vocab

    folder = tmp_path / "pipe"
    shutil.copytree(sdxl["folder"], folder)
    vocab, merges = default_vocab()
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        (folder / sub).mkdir()
        (folder / sub / "vocab.json").write_text(json.dumps(vocab))
        (folder / sub / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        (folder / sub / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
        (folder / sub / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    bundle = models.load_model(folder)
    assert [t.pad_token_id for t in bundle.tokenizers] == [49407, 0]
    ref = HFTokenizer(str(folder / "tokenizer_2" / "vocab.json"), str(folder / "tokenizer_2" / "merges.txt"),
                      pad_token="!")
    prompt = "a photo of an astronaut riding a horse, 4k"
    want = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert bundle.tokenizers[1]([prompt])[0].tolist() == want
