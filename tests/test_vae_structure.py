"""Structure, configuration, precision and tiling behaviour of models.vae.

Full-size VAEs are built on the meta device only. The key lists in tests/fixtures are the
`first_stage_model.*` tensors of SDXL and SD1.5 single-file checkpoints (key<TAB>shape).
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, _tiled

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_shapes(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (FIXTURES / name).read_text().splitlines():
        key, shape = line.split("\t")
        dims = shape.strip().strip("[]")
        shapes[key.removeprefix("first_stage_model.")] = tuple(int(d) for d in dims.split(",") if d.strip())
    return shapes


@pytest.mark.parametrize("preset, fixture", [("sdxl", "vae_keys_sdxl.txt"), ("sd15", "vae_keys_sd15.txt")])
def test_full_size_names_and_shapes_match_single_file(preset, fixture):
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.preset(preset))
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    expected = fixture_shapes(fixture)
    assert len(expected) == 248
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert ours == expected
    assert all(t.is_meta for t in vae.state_dict().values())


def test_meta_model_infers_shapes():
    vae = AutoencoderKL(VAEConfig.preset("sdxl"), device="meta", dtype=torch.float16)
    assert vae.dtype == torch.float16
    out = vae.decode(torch.empty(1, 4, 128, 96, device="meta", dtype=torch.float16))
    assert out.shape == (1, 3, 1024, 768) and out.dtype == torch.float16 and out.is_meta
    assert vae.encode(torch.empty(2, 3, 64, 80, device="meta")).mean.shape == (2, 4, 8, 10)


def test_parameter_count_matches_diffusers():
    from diffusers import AutoencoderKL as DiffusersVAE

    with torch.device("meta"):
        # diffusers' defaults plus the SD/SDXL VAE widths (its SDXL and SD1.5 VAE configs).
        ref = DiffusersVAE(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        )
    ref_count = sum(p.numel() for p in ref.parameters())
    assert ref_count == 83_653_863
    for preset in ("sdxl", "sd15", "sd2"):
        vae = AutoencoderKL(VAEConfig.preset(preset), device="meta")
        assert sum(p.numel() for p in vae.parameters()) == ref_count
        assert vae.device.type == "meta"


def test_presets():
    assert VAEConfig.preset("sdxl").scaling_factor == 0.13025
    assert VAEConfig.preset("sdxl").force_upcast is True
    assert VAEConfig.preset("sd15").scaling_factor == 0.18215
    assert VAEConfig.preset("sd2").scaling_factor == 0.18215
    tiny = VAEConfig.preset("tiny")
    assert (tiny.ch, tiny.ch_mult, tiny.num_res_blocks, tiny.z_channels) == (32, (1, 1, 2, 2), 1, 4)
    assert tiny.downsample_factor == 8 and tiny.scaling_factor == 0.13025
    assert VAEConfig.preset("sdxl", shift_factor=0.1).shift_factor == 0.1
    with pytest.raises(ValueError, match="sd15, sd2, sdxl, tiny"):
        VAEConfig.preset("sd3")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(ch_mult=()), "ch_mult"),
        (dict(ch=30), "norm_num_groups"),
        (dict(z_channels=0), "z_channels"),
        (dict(double_z=False), "double_z"),
        (dict(scaling_factor=0.0), "scaling_factor"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"VAEConfig.{field}"):
        VAEConfig(**kwargs)


def test_bad_inputs_are_reported():
    vae = AutoencoderKL(VAEConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"encode: expected \(B, 3, H, W\)"):
        vae.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"decode: expected \(B, 4, H, W\)"):
        vae.decode(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="tile_size"):
        vae.decode(torch.randn(1, 4, 2, 2), tile_size=12)


def test_scale_latents_roundtrip():
    vae = AutoencoderKL(VAEConfig.preset("tiny", shift_factor=0.25), device="meta")
    z = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(vae.scale_latents(z), (z - 0.25) * 0.13025)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)


def _bf16_pair():
    """A bf16 tiny VAE and an fp32 copy holding exactly the same (bf16-rounded) weights."""
    low = AutoencoderKL(VAEConfig.preset("tiny")).to(torch.bfloat16)
    high = AutoencoderKL(VAEConfig.preset("tiny"))
    high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    return low, high


def test_upcast_decode_computes_in_fp32_and_returns_input_dtype():
    low, high = _bf16_pair()
    z = torch.randn(2, 4, 4, 3).to(torch.bfloat16)
    with torch.no_grad():
        up = low.decode(z, upcast=True)
        ref = high.decode(z.float())
        down = low.decode(z, upcast=False)
    assert up.dtype == down.dtype == torch.bfloat16
    torch.testing.assert_close(up, ref.to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(down, up)  # without upcast it really ran in bf16
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())  # weights untouched

    # config.force_upcast is the default; fp32 latents come back fp32.
    forced = AutoencoderKL(VAEConfig.preset("tiny", force_upcast=True)).to(torch.bfloat16)
    forced.load_state_dict(low.state_dict())
    with torch.no_grad():
        out = forced.decode(z.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # An enclosing autocast does not pull the upcast decode back to bf16.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(forced.decode(z.float()), ref, rtol=0, atol=0)


def test_upcast_keeps_gradients_and_encode_upcasts():
    low, high = _bf16_pair()
    images = torch.rand(1, 3, 16, 24) * 2 - 1
    low.decode(torch.randn(1, 4, 2, 3), upcast=True).float().square().mean().backward()
    assert low.decoder.conv_out.weight.grad.dtype == torch.bfloat16
    with torch.no_grad():
        post = low.encode(images, upcast=True)
        ref = high.encode(images)
    assert post.mean.dtype == torch.float32
    torch.testing.assert_close(post.mean, ref.mean, rtol=0, atol=0)


def test_tiling_is_exact_within_one_tile():
    vae = AutoencoderKL(VAEConfig.preset("tiny")).eval()
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    z = torch.randn(2, 4, 4, 6)
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tile_size=48), vae.decode(z))
        assert torch.equal(vae.encode(images, tile_size=48).mean, vae.encode(images).mean)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tile_blending_reconstructs_local_operators(overlap):
    """Blend weights sum to one everywhere, so a per-pixel operator comes out as if untiled."""
    x = torch.randn(2, 3, 13, 22)  # latent-sized input; the last tiles overlap more than the others
    up = lambda t: F.interpolate(t, scale_factor=8.0, mode="nearest") * 2 + 1  # noqa: E731
    torch.testing.assert_close(_tiled(up, 6, overlap, 1, 8)(x), up(x))
    images = torch.randn(1, 3, 104, 176)
    down = lambda t: F.avg_pool2d(t, 8)  # noqa: E731
    torch.testing.assert_close(_tiled(down, 48, overlap, 8, 1 / 8)(images), down(images))


def test_tiled_model_shapes():
    vae = AutoencoderKL(VAEConfig.preset("tiny")).eval()
    with torch.no_grad():
        post = vae.encode(torch.rand(1, 3, 48, 72) * 2 - 1, tile_size=32)
        out = vae.decode(post.mode(), tile_size=32)
    assert isinstance(post, DiagonalGaussian)
    assert post.mean.shape == (1, 4, 6, 9) and out.shape == (1, 3, 48, 72)
    assert torch.isfinite(out).all()
