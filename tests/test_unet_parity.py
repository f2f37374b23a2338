"""Numerical parity of models.unet.UNet with diffusers' UNet2DConditionModel (test-only oracle).

Weights move from our ldm-named state dict to diffusers through diffusers' own
`convert_ldm_unet_checkpoint` (fed with the `model.diffusion_model.` prefix of a single-file
checkpoint), an independent definition of the ldm names; the result is loaded strictly. The
diffusers config is the one we write into diffusers folders (`unet_config_to_diffusers`).
"""
import pytest
import torch

from models.unet import UNet, UNetConfig, sdxl_vector, timestep_embedding
from reference_models import diffusers_unet_config, randomise, rel_err

CASES = {
    # SD1.5 layout: fixed head count, 1x1-conv proj_in/out, no adm.
    "tiny-sd15": UNetConfig.preset("tiny-sd15"),
    # SDXL layout: no attention at level 0, deeper transformers, linear proj, label_emb for y.
    "tiny-sdxl": UNetConfig.preset("tiny-sdxl"),
    # SD2 layout: fixed channels per head, linear proj; two ResBlocks per level for the block numbering.
    "sd2-style": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 0),
        transformer_depth_middle=1, num_heads=None, num_head_channels=16, context_dim=48,
        use_linear_in_transformer=True, adm_in_channels=None, norm_num_groups=16,
    ),
}

# (batch, height, width, context tokens): non-square latents, batch > 1, a different token count.
INPUTS = [(2, 16, 24, 77), (1, 16, 16, 77), (3, 12, 8, 20), (2, 13, 10, 9)]  # last: sides not multiples of 4



@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = CASES[request.param]
    ours = UNet(cfg).eval()
    randomise(ours, seed=1234)
    dcfg = diffusers_unet_config(cfg)
    ckpt = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ckpt, dcfg)
    ref = UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(converted, strict=True)
    return request.param, cfg, ours, ref


def test_norm_settings_match_diffusers(pair):
    """Every GroupNorm/LayerNorm has the reference's eps and groups (eps barely moves outputs on
    unit-variance activations, so the forward comparison alone would not notice it)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, cfg, ours, ref = pair
    params = dict(ours.named_parameters())
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in params.items()},
                                            diffusers_unet_config(cfg))
    ref_name = {v.data_ptr(): k for k, v in converted.items()}  # the converter moves tensors as they are
    ref_modules = dict(ref.named_modules())
    checked = 0
    for name, module in ours.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            other = ref_modules[ref_name[module.weight.data_ptr()].rsplit(".", 1)[0]]
            assert type(other) is type(module) and other.eps == module.eps, name
            if isinstance(module, torch.nn.GroupNorm):
                assert other.num_groups == module.num_groups, name
            checked += 1
    assert checked == sum(isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for m in ref.modules())


def make_inputs(cfg: UNetConfig, batch: int, height: int, width: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, height, width, generator=gen)
    t = torch.rand(batch, generator=gen) * 999
    context = torch.randn(batch, tokens, cfg.context_dim, generator=gen)
    pooled = time_ids = None
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(batch, cfg.adm_in_channels - 6 * 256, generator=gen)
        # (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels, different per sample.
        time_ids = torch.randint(0, 160, (batch, 6), generator=gen).float() * 8
    return x, t, context, pooled, time_ids


def run_both(cfg, ours, ref, x, t, context, pooled, time_ids):
    extra = {}
    y = None
    if cfg.adm_in_channels is not None:
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        y = sdxl_vector(pooled, time_ids)
    got = ours(x, t, context, y=y)
    want = ref(x, t, context, return_dict=False, **extra)[0]
    return got, want


@pytest.mark.parametrize("shape", INPUTS, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_diffusers(pair, shape):
    name, cfg, ours, ref = pair
    inputs = make_inputs(cfg, *shape, seed=sum(shape))
    with torch.no_grad():
        got, want = run_both(cfg, ours, ref, *inputs)
    assert got.shape == want.shape == inputs[0].shape
    assert want.std() > 0.1  # a live network, not a collapsed one
    assert rel_err(got, want) <= 1e-5, name


def test_integer_timesteps_match_diffusers(pair):
    _, cfg, ours, ref = pair
    x, _, context, pooled, time_ids = make_inputs(cfg, 2, 8, 12, 77, seed=7)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        got, want = run_both(cfg, ours, ref, x, t, context, pooled, time_ids)
    assert rel_err(got, want) <= 1e-5


def test_input_gradients_match_diffusers(pair):
    """Backward too: gradients reaching the latents and the text context."""
    _, cfg, ours, ref = pair
    x, t, context, pooled, time_ids = make_inputs(cfg, 2, 8, 12, 77, seed=11)
    grads = []
    for model in (ours, ref):
        xi, ci = x.clone().requires_grad_(), context.clone().requires_grad_()
        if model is ours:
            y = None if pooled is None else sdxl_vector(pooled, time_ids)
            out = ours(xi, t, ci, y=y)
        else:
            extra = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
            out = ref(xi, t, ci, return_dict=False, **extra)[0]
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss with a non-uniform gradient
        (out * weight).sum().backward()
        grads.append((xi.grad, ci.grad))
    assert rel_err(grads[0][0], grads[1][0]) <= 1e-5
    assert rel_err(grads[0][1], grads[1][1]) <= 1e-5


def test_sdxl_vector_matches_diffusers_add_embedding_input():
    """y = [pooled | 256-d cos/sin of each time id], as diffusers builds it before add_embedding."""
    from diffusers.models.embeddings import Timesteps

    gen = torch.Generator().manual_seed(3)
    pooled = torch.randn(3, 1280, generator=gen)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 8, 1024, 1024], [512, 512, 0, 0, 832, 1216]])
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    want = torch.cat([pooled, proj(time_ids.flatten()).reshape(3, -1)], dim=1)
    got = sdxl_vector(pooled, time_ids)
    assert got.shape == (3, 2816)
    assert rel_err(got, want) <= 1e-6
    assert sdxl_vector(pooled.bfloat16(), time_ids).dtype == torch.bfloat16


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.5, 500.0, 999.0])
    for dim in (32, 320, 33):
        want = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        got = timestep_embedding(t, dim)
        assert got.dtype == torch.float32 and got.shape == (5, dim)
        assert torch.allclose(got, want, atol=1e-6), dim
    # Float32 even for half-precision steps (phases of t ~ 1000 need the mantissa).
    assert timestep_embedding(t.bfloat16(), 8).dtype == torch.float32


def test_bench_builds_matching_reference():
    """trainer.bench.unet times the same network on both sides: its diffusers copy must agree."""
    from trainer.bench.unet import compare

    result = compare("tiny-sdxl", batch=1, res=8, steps=1, warmup=0)
    assert result["rel_err"] <= 1e-5
    assert result["ours_s"] > 0 and result["diffusers_s"] > 0 and result["params"] == 2_286_180
