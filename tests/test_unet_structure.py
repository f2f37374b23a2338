"""UNet layout: ldm/sgm parameter names and shapes, presets, meta construction, input checks.

The full-size key lists in tests/fixtures are the UNet part of real single-file checkpoints
(`model.diffusion_model.` prefix), one `key<TAB>[shape]` per line.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.unet import UNet, UNetConfig, sdxl_vector
from models.unet_blocks import (
    GEGLU,
    BasicTransformerBlock,
    CrossAttention,
    Downsample,
    FeedForward,
    ResBlock,
    SpatialTransformer,
    Upsample,
)

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "model.diffusion_model."



def fixture_shapes(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (FIXTURES / name).read_text().splitlines():
        key, shape = line.split("\t")
        assert key.startswith(PREFIX)
        out[key[len(PREFIX):]] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


@pytest.mark.parametrize("preset,fixture", [("sdxl", "sdxl_ldm_unet_keys.txt"), ("sd15", "sd15_ldm_unet_keys.txt")])
def test_full_size_names_and_shapes_match_checkpoint(preset, fixture):
    unet = UNet(UNetConfig.preset(preset), device="meta")
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    want = fixture_shapes(fixture)
    assert sorted(set(want) - set(ours)) == []
    assert sorted(set(ours) - set(want)) == []
    assert {k: s for k, s in ours.items() if s != want[k]} == {}


def test_parameter_counts():
    from diffusers import UNet2DConditionModel

    assert sum(p.numel() for p in UNet(UNetConfig.preset("sdxl"), device="meta").parameters()) == 2_567_463_684
    # SD1.5 and SD2 against diffusers' own model of the released configs, built on meta.
    released = {
        "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False},
        "sd2": {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
    }
    for preset, extra in released.items():
        with torch.device("meta"):
            ref = UNet2DConditionModel(
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **extra,
            )
        ours = UNet(UNetConfig.preset(preset), device="meta")
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()), preset
    assert sum(p.numel() for p in ours.parameters()) == 865_910_724  # SD2.x


def test_meta_construction_allocates_nothing():
    unet = UNet(UNetConfig.preset("sdxl"), device="meta")
    assert all(p.is_meta for p in unet.parameters()) and len(list(unet.buffers())) == 0
    with torch.device("meta"):
        unet = UNet(UNetConfig.preset("sd15"))
    assert all(p.is_meta for p in unet.parameters())
    # Shapes propagate on meta, so callers can trace a full-size forward without memory.
    x = torch.empty(1, 4, 128, 128, device="meta")
    out = unet(x, torch.zeros(1, device="meta"), torch.empty(1, 77, 768, device="meta"))
    assert out.shape == x.shape and out.is_meta


def test_dtype_argument():
    unet = UNet(UNetConfig.preset("tiny-sd15"), dtype=torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert unet.dtype == torch.bfloat16


def test_tiny_presets_are_exact():
    sd15 = UNetConfig.preset("tiny-sd15")
    assert (sd15.model_channels, sd15.channel_mult, sd15.num_res_blocks) == (32, (1, 2, 2), 1)
    assert (sd15.transformer_depth, sd15.transformer_depth_middle) == ((1, 1, 0), 1)
    assert (sd15.num_heads, sd15.num_head_channels, sd15.context_dim) == (2, None, 32)
    assert not sd15.use_linear_in_transformer and sd15.adm_in_channels is None
    xl = UNetConfig.preset("tiny-sdxl")
    assert (xl.model_channels, xl.channel_mult, xl.num_res_blocks) == (32, (1, 2, 2), 1)
    assert (xl.transformer_depth, xl.transformer_depth_middle) == ((0, 1, 2), 2)
    assert (xl.num_heads, xl.num_head_channels, xl.context_dim) == (None, 16, 96)
    assert xl.use_linear_in_transformer and xl.adm_in_channels == 1600 == 64 + 6 * 256
    unet = UNet(sd15)
    assert isinstance(unet.input_blocks[1][1].proj_in, torch.nn.Conv2d)
    assert isinstance(UNet(xl).input_blocks[3][1].proj_in, torch.nn.Linear)


def test_released_presets():
    sd2, xl = UNetConfig.preset("sd2"), UNetConfig.preset("sdxl")
    assert (sd2.num_head_channels, sd2.context_dim, sd2.use_linear_in_transformer) == (64, 1024, True)
    assert (xl.channel_mult, xl.transformer_depth, xl.transformer_depth_middle) == ((1, 2, 4), (0, 2, 10), 10)
    assert (xl.num_head_channels, xl.context_dim, xl.adm_in_channels) == (64, 2048, 2816)
    assert xl.heads_at(1280) == (20, 64) and UNetConfig.preset("sd15").heads_at(640) == (8, 80)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        UNetConfig.preset("sd3")
    for name in ("sd15", "sd2", "sdxl", "tiny-sd15", "tiny-sdxl"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"transformer_depth": (1, 1)}, "transformer_depth"),
        ({"num_heads": 8, "num_head_channels": 64}, "num_heads"),
        ({"norm_num_groups": 7}, "norm_num_groups"),
        ({"num_head_channels": 48, "num_heads": None}, "num_head_channels"),
        ({"transformer_depth_middle": 0}, "transformer_depth_middle"),
        ({"channel_mult": ()}, "channel_mult"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"UNetConfig\.{field}"):
        UNetConfig.preset("sd15").replace(**changes)


def test_config_accepts_lists():
    cfg = UNetConfig(channel_mult=[1, 2], transformer_depth=[1, 0], model_channels=32, context_dim=32)
    assert cfg.channel_mult == (1, 2) and cfg.transformer_depth == (1, 0)


def test_module_classes_at_ldm_positions():
    unet = UNet(UNetConfig.preset("sdxl"), device="meta")
    mods = dict(unet.named_modules())
    assert isinstance(mods["input_blocks.1.0"], ResBlock)
    assert isinstance(mods["input_blocks.3.0"], Downsample)
    assert isinstance(mods["input_blocks.4.1"], SpatialTransformer)
    assert isinstance(mods["input_blocks.4.1.transformer_blocks.1"], BasicTransformerBlock)
    assert isinstance(mods["input_blocks.4.1.transformer_blocks.0.attn2"], CrossAttention)
    assert isinstance(mods["input_blocks.4.1.transformer_blocks.0.ff"], FeedForward)
    assert isinstance(mods["input_blocks.4.1.transformer_blocks.0.ff.net.0"], GEGLU)
    assert isinstance(mods["middle_block.1"], SpatialTransformer)
    # Last block of a level going up: ResBlock, SpatialTransformer, Upsample (.2.conv in the checkpoint).
    assert isinstance(mods["output_blocks.2.2"], Upsample) and isinstance(mods["output_blocks.5.2"], Upsample)
    assert isinstance(mods["output_blocks.8.0"], ResBlock) and "output_blocks.8.1" not in mods
    assert len(unet.middle_block[1].transformer_blocks) == 10


def test_upsample_equals_nearest_then_conv():
    """The folded transposed-conv path, the literal path it replaces, and its fallback agree."""
    up = Upsample(6, 5)
    x = torch.randn(2, 6, 5, 7)
    want = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = up(x)
    assert got.shape == (2, 5, 10, 14)
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    seen = []
    up.conv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    hooked = up(x)  # a hooked (or replaced) conv must see its real input
    assert seen == [(2, 6, 10, 14)] and torch.allclose(hooked, want, atol=1e-6)


def test_bf16_stays_bf16():
    cfg = UNetConfig.preset("tiny-sdxl")
    unet = UNet(cfg)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 96)
    y = sdxl_vector(torch.randn(2, 64), torch.full((2, 6), 512.0))
    ref = unet(x, torch.tensor([10.0, 900.0]), ctx, y=y)
    dtypes = set()
    unet = unet.to(torch.bfloat16)
    for m in unet.modules():
        if not list(m.children()):
            m.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    out = unet(x.bfloat16(), torch.tensor([10.0, 900.0]), ctx.bfloat16(), y=y.bfloat16())
    assert out.dtype == torch.bfloat16 and dtypes == {torch.bfloat16}
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


def test_scalar_timestep_broadcasts():
    unet = UNet(UNetConfig.preset("tiny-sd15")).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        a = unet(x, 250, ctx)
        b = unet(x, torch.tensor([250, 250]), ctx)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "case,match",
    [
        ("channels", r"x must be \(B, 4, H, W\)"),
        ("context", r"context must be \(2, T, 96\)"),
        ("no_y", r"y must be \(2, 1600\)"),
        ("timesteps", "timesteps must be"),
    ],
)
def test_bad_inputs_are_explained(case, match):
    unet = UNet(UNetConfig.preset("tiny-sdxl"))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 7, 96)
    y = torch.randn(2, 1600)
    args = {
        "channels": (torch.randn(2, 3, 8, 8), t, ctx, y),
        "context": (x, t, torch.randn(2, 7, 32), y),
        "no_y": (x, t, ctx, None),
        "timesteps": (x, torch.tensor([1.0, 2.0, 3.0]), ctx, y),
    }[case]
    with pytest.raises(ValueError, match=match):
        unet(*args)


def test_y_rejected_without_adm():
    unet = UNet(UNetConfig.preset("tiny-sd15"))
    with pytest.raises(ValueError, match="adm_in_channels=None"):
        unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 3, 32), y=torch.randn(1, 16))
