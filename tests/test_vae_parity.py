"""Numerical parity of models.vae.AutoencoderKL with diffusers' AutoencoderKL (test-only oracle).

Weights move from our ldm-named state dict to diffusers through diffusers' own
`convert_ldm_vae_checkpoint` (fed with the `first_stage_model.` prefix of a single-file checkpoint),
which is an independent definition of the ldm names; the result is loaded strictly.
"""
import pytest
import torch

from models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from reference_models import diffusers_vae_config, randomise, rel_err

# (our config, input image shape): non-square, batch > 1, nin_shortcut in encoder and decoder.
CASES = {
    "tiny": (VAEConfig.preset("tiny"), (2, 3, 48, 32)),
    "three-level": (
        VAEConfig(ch=16, ch_mult=(1, 2, 3), num_res_blocks=2, z_channels=3, norm_num_groups=4, force_upcast=False),
        (3, 3, 24, 40),
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg, shape = CASES[request.param]
    ours = AutoencoderKL(cfg).eval()
    randomise(ours, seed=1234)
    dcfg = diffusers_vae_config(cfg)
    ref = DiffusersVAE(**dcfg).eval()
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, dcfg)
    assert len(converted) == len(checkpoint)
    ref.load_state_dict(converted, strict=True)
    return ours, ref, shape


def test_encode_matches_diffusers(pair):
    ours, ref, shape = pair
    images = torch.rand(shape, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        post = ours.encode(images)
        ref_post = ref.encode(images).latent_dist
    f = ours.config.downsample_factor
    assert post.mean.shape == (shape[0], ours.config.z_channels, shape[2] // f, shape[3] // f)
    assert rel_err(post.mean, ref_post.mean) <= 1e-5
    assert rel_err(post.logvar, ref_post.logvar) <= 1e-5
    assert rel_err(post.std, ref_post.std) <= 1e-5
    assert rel_err(post.var, ref_post.var) <= 1e-5
    assert rel_err(post.kl(), ref_post.kl()) <= 1e-5
    assert torch.equal(post.mode(), post.mean)
    # Same generator seed -> same reparameterised sample.
    ours_z = post.sample(torch.Generator().manual_seed(3))
    ref_z = ref_post.sample(torch.Generator().manual_seed(3))
    assert rel_err(ours_z, ref_z) <= 1e-5
    assert not torch.allclose(ours_z, post.sample(torch.Generator().manual_seed(4)))


def test_decode_matches_diffusers(pair):
    ours, ref, shape = pair
    f = ours.config.downsample_factor
    latents = torch.randn(shape[0], ours.config.z_channels, shape[2] // f, shape[3] // f)
    with torch.no_grad():
        out = ours.decode(latents)
        expected = ref.decode(latents).sample
    assert out.shape == shape
    assert rel_err(out, expected) <= 1e-5


def test_logvar_clamped_like_reference():
    moments = torch.randn(2, 8, 3, 5) * 40
    post = DiagonalGaussian(moments)
    assert post.logvar.min() >= -30 and post.logvar.max() <= 20
    assert torch.equal(post.mean, moments[:, :4])
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))


def test_sample_draws_fp32_noise_then_casts():
    moments = torch.randn(2, 8, 4, 4)
    z32 = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(5))
    z16 = DiagonalGaussian(moments.to(torch.bfloat16)).sample(torch.Generator().manual_seed(5))
    assert z16.dtype == torch.bfloat16
    torch.testing.assert_close(z16.float(), z32, atol=0.1, rtol=0.05)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=4, force_upcast=False)
    plain, ckpt = AutoencoderKL(cfg), AutoencoderKL(cfg)
    randomise(plain, seed=9)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_gradient_checkpointing(True)
    images = torch.rand(2, 3, 16, 8) * 2 - 1
    for model in (plain, ckpt):
        model(images, generator=torch.Generator().manual_seed(1)).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
