"""Flux transformer layout: reference parameter names and shapes at full size (on meta), presets,
config inference and detection, latent packing, input checks.

tests/fixtures/flux_dev_keys.txt lists the tensors of `flux1-dev.safetensors` (`name<TAB>[shape]`),
derived from diffusers' model by tests/fixtures/make_flux_fixtures.py; flux1-schnell holds the same
minus `guidance_in.*`.
"""
from pathlib import Path

import pytest
import torch

from models.checkpoints.flux_keys import (
    flux_config_from_diffusers,
    flux_config_from_shapes,
    flux_state_dict_from_diffusers,
    flux_transformer_layout,
    is_flux_transformer,
)
from models.flux import FluxConfig, FluxTransformer, image_ids, pack_latents, text_ids, unpack_latents

FIXTURES = Path(__file__).parent / "fixtures"


def dev_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (FIXTURES / "flux_dev_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


def meta_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    model = FluxTransformer(FluxConfig.preset(preset), device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", ["flux-dev", "flux-schnell"])
def test_full_size_names_and_shapes_match_released_files(preset):
    want = dev_shapes()
    if preset == "flux-schnell":
        want = {k: v for k, v in want.items() if not k.startswith("guidance_in.")}
    ours = meta_shapes(preset)
    assert sorted(set(want) - set(ours)) == []
    assert sorted(set(ours) - set(want)) == []
    assert {k: s for k, s in ours.items() if s != want[k]} == {}


def test_tensor_and_parameter_counts():
    from diffusers import FluxTransformer2DModel

    dev, schnell = meta_shapes("flux-dev"), meta_shapes("flux-schnell")
    assert (len(dev), len(schnell)) == (780, 776)

    def count(shapes):
        return sum(torch.Size(s).numel() for s in shapes.values())

    assert count(dev) == 11_901_408_320
    assert count(schnell) == 11_891_178_560
    for guidance, shapes in ((True, dev), (False, schnell)):
        with torch.device("meta"):
            ref = FluxTransformer2DModel(guidance_embeds=guidance)
        assert sum(p.numel() for p in ref.parameters()) == count(shapes)


def test_spot_shapes_of_the_published_layout():
    """A few shapes as listed in the header of flux1-dev.safetensors."""
    ours = meta_shapes("flux-dev")
    assert ours["img_in.weight"] == (3072, 64)
    assert ours["txt_in.weight"] == (3072, 4096)
    assert ours["time_in.in_layer.weight"] == (3072, 256)
    assert ours["vector_in.in_layer.weight"] == (3072, 768)
    assert ours["guidance_in.out_layer.weight"] == (3072, 3072)
    assert ours["double_blocks.18.img_mod.lin.weight"] == (18432, 3072)
    assert ours["double_blocks.0.txt_attn.qkv.weight"] == (9216, 3072)
    assert ours["double_blocks.0.img_mlp.0.weight"] == (12288, 3072)
    assert ours["double_blocks.0.img_attn.norm.key_norm.scale"] == (128,)
    assert ours["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert ours["single_blocks.0.linear2.weight"] == (3072, 15360)
    assert ours["single_blocks.0.modulation.lin.weight"] == (9216, 3072)
    assert ours["final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    assert ours["final_layer.linear.weight"] == (64, 3072)


def test_meta_construction_allocates_nothing():
    model = FluxTransformer(FluxConfig.preset("flux-dev"), device="meta")
    assert model.device.type == "meta" and model.dtype == torch.float32
    assert FluxTransformer(FluxConfig.preset("tiny-flux"), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_full_size_diffusers_state_dict_maps_to_our_shapes():
    from diffusers import FluxTransformer2DModel

    for preset, guidance in (("flux-dev", True), ("flux-schnell", False)):
        with torch.device("meta"):
            ref = FluxTransformer2DModel(guidance_embeds=guidance)
        mapped = flux_state_dict_from_diffusers(ref.state_dict(), FluxConfig.preset(preset))
        assert {k: tuple(v.shape) for k, v in mapped.items()} == meta_shapes(preset)
        config = flux_config_from_diffusers({"_class_name": "FluxTransformer2DModel", **ref.config})
        assert config == FluxConfig.preset(preset)


@pytest.mark.parametrize("preset", ["flux-dev", "flux-schnell"])
def test_config_from_shapes_recovers_presets(preset):
    shapes = meta_shapes(preset)
    assert flux_config_from_shapes(shapes) == FluxConfig.preset(preset)
    prefixed = {"model.diffusion_model." + k: v for k, v in shapes.items()} | {"first_stage_model.x": (1,)}
    assert flux_config_from_shapes(prefixed, prefix="model.diffusion_model.") == FluxConfig.preset(preset)


def test_config_from_shapes_of_other_widths():
    tiny = FluxConfig.preset("tiny-flux")
    shapes = {k: tuple(v.shape) for k, v in FluxTransformer(tiny, device="meta").state_dict().items()}
    with pytest.raises(ValueError, match=r"^ckpt: heads of 32 channels; give axes_dim"):
        flux_config_from_shapes(shapes, where="ckpt")
    assert flux_config_from_shapes(shapes, axes_dim=(8, 12, 12)) == tiny
    no_bias = tiny.replace(qkv_bias=False)
    shapes_nb = {k: tuple(v.shape) for k, v in FluxTransformer(no_bias, device="meta").state_dict().items()}
    assert "double_blocks.0.img_attn.qkv.bias" not in shapes_nb
    assert flux_config_from_shapes(shapes_nb, axes_dim=(8, 12, 12)) == no_bias
    odd = tiny.replace(mlp_ratio=3.0, depth=0, guidance_embed=False, in_channels=128, out_channels=32)
    shapes = {k: tuple(v.shape) for k, v in FluxTransformer(odd, device="meta").state_dict().items()}
    assert flux_config_from_shapes(shapes, axes_dim=(8, 12, 12)) == odd
    with pytest.raises(ValueError, match=r"^f.safetensors: no img_in.weight; not a Flux.1 transformer"):
        flux_config_from_shapes({"x": (1,)}, where="f.safetensors")
    del shapes["single_blocks.0.linear1.weight"], shapes["single_blocks.0.linear1.bias"]
    renumbered = {k: v for k, v in shapes.items() if not k.startswith("single_blocks.0.")}
    with pytest.raises(ValueError, match=r"single_blocks.N blocks are not numbered 0..0: \[1\]"):
        flux_config_from_shapes(renumbered, axes_dim=(8, 12, 12))


def test_layout_detection():
    from diffusers import FluxTransformer2DModel

    from models.unet import UNet, UNetConfig

    bfl = list(meta_shapes("flux-schnell"))
    assert flux_transformer_layout(bfl) == ("bfl", "")
    comfy = ["model.diffusion_model." + k for k in bfl] + ["vae.decoder.conv_in.weight"]
    assert flux_transformer_layout(comfy) == ("bfl", "model.diffusion_model.")
    with torch.device("meta"):
        diff = list(FluxTransformer2DModel(num_layers=1, num_single_layers=1).state_dict())
    assert flux_transformer_layout(diff) == ("diffusers", "")
    assert flux_transformer_layout(["transformer." + k for k in diff]) == ("diffusers", "transformer.")
    unet = ["model.diffusion_model." + k for k in UNet(UNetConfig.preset("tiny-sdxl"), device="meta").state_dict()]
    assert not is_flux_transformer(unet)
    # no per-block modulation: a relative with the same block names (Chroma-like), not Flux.1
    assert not is_flux_transformer([k for k in bfl if "_mod." not in k])
    assert is_flux_transformer(bfl)


def test_presets_and_validation():
    assert FluxConfig.preset("flux-dev").guidance_embed and not FluxConfig.preset("flux-schnell").guidance_embed
    tiny = FluxConfig.preset("tiny-flux")
    assert (tiny.head_dim, tiny.mlp_hidden, sum(tiny.axes_dim)) == (32, 256, 32)
    with pytest.raises(ValueError, match=r"unknown Flux preset 'flux-pro'; valid presets: flux-dev, flux-schnell"):
        FluxConfig.preset("flux-pro")
    cases = [
        ({"num_heads": 5}, r"^FluxConfig.num_heads = 5: must divide hidden_size \(3072\)"),
        ({"axes_dim": (16, 56, 54)}, r"^FluxConfig.axes_dim = \(16, 56, 54\): must sum to head_dim .* = 128"),
        ({"axes_dim": (17, 55, 56)}, r"^FluxConfig.axes_dim = .*positive even channel count"),
        ({"depth": -1}, r"^FluxConfig.depth = -1: must be >= 0"),
        ({"hidden_size": 0}, r"^FluxConfig.hidden_size = 0: must be a positive integer"),
        ({"mlp_ratio": 0}, r"^FluxConfig.mlp_ratio = 0: must be > 0"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            FluxConfig(**change)
    assert FluxConfig(axes_dim=[16, 56, 56]).axes_dim == (16, 56, 56)  # YAML lists become tuples


def test_packing_matches_diffusers_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    z = torch.randn(2, 16, 6, 10)
    packed = pack_latents(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), z)
    # diffusers' unpack takes image pixels (8x VAE): 48 x 80 px = 6 x 10 latents
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), z)
    ids = image_ids(2, 6, 10)
    assert ids.shape == (2, 15, 3)
    assert torch.equal(ids[1], FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    assert torch.equal(text_ids(2, 7), torch.zeros(2, 7, 3))
    with pytest.raises(ValueError, match=r"^pack_latents: expected latents \(B, C, H, W\) with even H and W"):
        pack_latents(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ValueError, match=r"^unpack_latents: expected \(B, 6, 4 \* C\) tokens for 4x6 latents"):
        unpack_latents(packed, 4, 6)


def test_input_errors_name_the_argument():
    cfg = FluxConfig.preset("tiny-flux")
    model = FluxTransformer(cfg)
    img, iid = torch.zeros(2, 6, 64), image_ids(2, 4, 6)
    txt, tid, t, y, g = torch.zeros(2, 3, 32), text_ids(2, 3), torch.zeros(2), torch.zeros(2, 32), torch.ones(2)
    cases = [
        ((torch.zeros(2, 6, 16), iid, txt, tid, t, y, g), r"img must be \(B, L, 64\) packed latents"),
        ((img, iid[:, :5], txt, tid, t, y, g), r"img_ids must be \(2, 6, 3\) position ids"),
        ((img, iid, torch.zeros(2, 3, 8), tid, t, y, g), r"txt must be \(2, T, 32\)"),
        ((img, iid, txt, tid[:, :2], t, y, g), r"txt_ids must be \(2, 3, 3\)"),
        ((img, iid, txt, tid, torch.zeros(3), y, g), r"timesteps must be a scalar or shape \(2,\)"),
        ((img, iid, txt, tid, t, torch.zeros(2, 8), g), r"y must be \(2, 32\) pooled text"),
        ((img, iid, txt, tid, t, y, None), r"this model is guidance-distilled .* pass guidance"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match="^FluxTransformer: " + message):
            model(*args)
    # schnell ignores a guidance value, as the reference sampler passes one to every model
    schnell = FluxTransformer(cfg.replace(guidance_embed=False)).eval()
    with torch.no_grad():
        assert torch.equal(schnell(img, iid, txt, tid, t, y, g), schnell(img, iid, txt, tid, t, y))


def test_computes_in_input_dtype():
    model = FluxTransformer(FluxConfig.preset("tiny-flux"), dtype=torch.bfloat16).eval()
    img, iid = torch.randn(1, 6, 64, dtype=torch.bfloat16), image_ids(1, 4, 6)
    with torch.no_grad():
        out = model(img, iid, torch.randn(1, 3, 32), text_ids(1, 3), 0.5, torch.randn(1, 32), 3.5)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
