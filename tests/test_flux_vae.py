"""The 16-channel Flux.1 VAE: parity with diffusers' AutoencoderKL (test-only oracle) on a tiny random
model, the full-size key layout of BFL's `ae.safetensors` on meta, latent scaling and configs.

Weights reach diffusers two ways, each loaded strictly: through our own key converter
(`vae_state_dict_to_diffusers`) and through diffusers' single-file converter
(`convert_ldm_vae_checkpoint`, the path `AutoencoderKL.from_single_file` takes for `ae.safetensors`).
"""
from pathlib import Path

import pytest
import torch

from models.checkpoints.diffusers_keys import (
    UnsupportedConfigError,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_state_dict_to_diffusers,
)
from models.vae import AutoencoderKL, VAEConfig
from reference_models import randomise, rel_err

FIXTURES = Path(__file__).parent / "fixtures"
LEVEL_TYPES = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

# vae/config.json of black-forest-labs/FLUX.1-dev (and -schnell), as published.
FLUX_DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}


def fixture_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (FIXTURES / "flux_vae_ae_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        shapes[key] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return shapes


def diffusers_tiny_flux():
    """diffusers' AutoencoderKL with the tiny-flux shapes, spelled out here (not from our converter)."""
    from diffusers import AutoencoderKL as DiffusersVAE

    return DiffusersVAE(
        **LEVEL_TYPES, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16,
        norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
        shift_factor=0.1159, force_upcast=False,
    ).eval()


@pytest.fixture(scope="module", params=["ours", "diffusers_single_file"])
def pair(request):
    ours = AutoencoderKL(VAEConfig.preset("tiny-flux")).eval()
    randomise(ours, seed=99)
    ref = diffusers_tiny_flux()
    if request.param == "ours":
        converted = vae_state_dict_to_diffusers(ours.state_dict(), ours.config)
    else:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        # ae.safetensors has no prefix, so the converter sees our names as they are.
        converted = convert_ldm_vae_checkpoint(dict(ours.state_dict()), dict(ref.config))
    assert len(converted) == len(ours.state_dict())
    ref.load_state_dict(converted, strict=True)
    return ours, ref


def test_encode_matches_diffusers(pair):
    ours, ref = pair
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        post = ours.encode(images)
        ref_post = ref.encode(images).latent_dist
    assert post.mean.shape == (2, 16, 6, 5)
    assert rel_err(post.mean, ref_post.mean) <= 1e-5
    assert rel_err(post.logvar, ref_post.logvar) <= 1e-5
    # What the Flux pipeline feeds its transformer: (z - shift) * scale.
    expected = (ref_post.mode() - ref.config.shift_factor) * ref.config.scaling_factor
    assert rel_err(ours.scale_latents(post.mode()), expected) <= 1e-5


def test_decode_matches_diffusers(pair):
    ours, ref = pair
    latents = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = ours.decode(latents)
        expected = ref.decode(latents).sample
        # From transformer-space latents, as the Flux pipeline decodes them.
        scaled = ours.decode(ours.unscale_latents(latents))
        expected_scaled = ref.decode(latents / ref.config.scaling_factor + ref.config.shift_factor).sample
    assert out.shape == (2, 3, 40, 56)
    assert rel_err(out, expected) <= 1e-5
    assert rel_err(scaled, expected_scaled) <= 1e-5


def test_scale_latents_shift_then_scale():
    vae = AutoencoderKL(VAEConfig.preset("tiny-flux"), device="meta")
    z = torch.randn(2, 16, 3, 4)
    torch.testing.assert_close(vae.scale_latents(z), (z - 0.1159) * 0.3611, rtol=0, atol=0)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)
    # BFL's AutoEncoder.encode/decode spelling of the same maps.
    torch.testing.assert_close(vae.unscale_latents(z), z / 0.3611 + 0.1159, rtol=0, atol=0)


def test_no_quant_convs():
    vae = AutoencoderKL(VAEConfig.preset("tiny-flux"))
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert not any("quant_conv" in k for k in vae.state_dict())
    assert vae.dtype == torch.float32 and vae.device.type == "cpu"
    low = vae.to(torch.bfloat16)
    with torch.no_grad():
        z = low.encode(torch.rand(1, 3, 16, 24, dtype=torch.bfloat16) * 2 - 1).sample(torch.Generator().manual_seed(0))
        out = low.decode(z)
    assert z.shape == (1, 16, 2, 3) and z.dtype == torch.bfloat16
    assert out.shape == (1, 3, 16, 24) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_full_size_names_and_shapes_match_ae_safetensors():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.preset("flux"))
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    expected = fixture_shapes()
    assert len(expected) == 244
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert ours == expected
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683


def test_ae_fixture_matches_diffusers_flux_vae():
    """The hand-written ae.safetensors list, renamed by diffusers' single-file converter, is exactly
    the state dict of diffusers' Flux VAE (names and shapes): the fixture is independently right."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    kwargs = {k: v for k, v in FLUX_DIFFUSERS_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = DiffusersVAE(**kwargs)
    fake = {k: torch.empty(shape, device="meta") for k, shape in fixture_shapes().items()}
    converted = convert_ldm_vae_checkpoint(fake, dict(ref.config))
    assert len(converted) == len(fake)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_published_diffusers_config_is_the_flux_preset():
    assert vae_config_from_diffusers(FLUX_DIFFUSERS_CONFIG) == VAEConfig.preset("flux")
    for preset in ("flux", "tiny-flux"):
        cfg = VAEConfig.preset(preset)
        written = vae_config_to_diffusers(cfg)
        assert written["use_quant_conv"] is False and written["use_post_quant_conv"] is False
        assert vae_config_from_diffusers(written) == cfg
    # SD/SDXL configs are written as before (no quant-conv keys) and still read back.
    assert "use_quant_conv" not in vae_config_to_diffusers(VAEConfig.preset("sdxl"))
    assert vae_config_from_diffusers(dict(FLUX_DIFFUSERS_CONFIG, use_quant_conv=True, use_post_quant_conv=True))\
        .use_quant_conv is True


@pytest.mark.parametrize("quant, post", [(True, False), (False, True), (0, 0)])
def test_mixed_quant_conv_flags_are_refused(quant, post):
    with pytest.raises(UnsupportedConfigError, match="vae/config.json: use_quant_conv"):
        vae_config_from_diffusers(dict(FLUX_DIFFUSERS_CONFIG, use_quant_conv=quant, use_post_quant_conv=post))


def test_flux_presets():
    flux = VAEConfig.preset("flux")
    assert (flux.ch, flux.ch_mult, flux.num_res_blocks, flux.z_channels) == (128, (1, 2, 4, 4), 2, 16)
    assert (flux.scaling_factor, flux.shift_factor, flux.use_quant_conv) == (0.3611, 0.1159, False)
    tiny = VAEConfig.preset("tiny-flux")
    assert tiny.z_channels == 16 and tiny.downsample_factor == 8 and not tiny.use_quant_conv
    assert VAEConfig.preset("sdxl").use_quant_conv is True
    with pytest.raises(ValueError, match="VAEConfig.use_quant_conv"):
        VAEConfig(use_quant_conv="no")
