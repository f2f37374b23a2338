"""Full-size text encoders built on the meta device match the checkpoint layouts.

Fixtures list the text-encoder entries of SDXL / SD1.5 single-file checkpoints (`key<TAB>shape`):
SDXL `conditioner.embedders.0.transformer.` (CLIP-L, HF names) and `conditioner.embedders.1.model.`
(bigG, OpenCLIP names); SD1.5 `cond_stage_model.transformer.` (CLIP-L).
"""
from pathlib import Path

import pytest
import torch

from models.clip import CLIPTextConfig, CLIPTextEncoder
from models.checkpoints.openclip_keys import (
    HF_IGNORED_KEYS,
    OPENCLIP_IGNORED_KEYS,
    hf_to_openclip,
    openclip_name_to_hf,
    openclip_to_hf,
)

FIXTURES = Path(__file__).parent / "fixtures"
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
SD15_TE = "cond_stage_model.transformer."


def read_keys(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """{key without prefix: shape} for the fixture lines under prefix."""
    out = {}
    for line in (FIXTURES / name).read_text().splitlines():
        key, shape = line.split("\t")
        if key.startswith(prefix):
            dims = shape.strip("[]").strip()
            out[key[len(prefix):]] = tuple(int(d) for d in dims.split(",")) if dims else ()
    assert out, f"no {prefix} keys in {name}"
    return out


def meta_encoder(preset: str) -> CLIPTextEncoder:
    with torch.device("meta"):
        return CLIPTextEncoder(CLIPTextConfig.preset(preset))


def shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize(
    "fixture,prefix", [("clip_keys_sdxl.txt", SDXL_TE1), ("clip_keys_sd15.txt", SD15_TE)], ids=["sdxl-te1", "sd15"]
)
def test_clip_l_matches_single_file_layout(fixture, prefix):
    expected = read_keys(fixture, prefix)
    extras = {k for k in expected if k in HF_IGNORED_KEYS}
    assert extras == {"text_model.embeddings.position_ids"}  # stored by SD files, ignored by us
    expected = {k: v for k, v in expected.items() if k not in extras}
    model = meta_encoder("clip-l")
    assert all(p.is_meta for p in model.parameters())
    assert shapes(model.state_dict()) == expected
    assert sum(p.numel() for p in model.parameters()) == 123_060_480  # CLIP ViT-L/14 text tower


def test_bigg_matches_sdxl_openclip_layout():
    expected = read_keys("clip_keys_sdxl.txt", SDXL_TE2)
    assert len([k for k in expected if k.endswith("attn.in_proj_weight")]) == 32
    assert {k for k in expected if k in OPENCLIP_IGNORED_KEYS} == {"logit_scale"}
    checkpoint = {SDXL_TE2 + k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    model = meta_encoder("bigg")
    converted = openclip_to_hf(checkpoint, SDXL_TE2)
    assert shapes(converted) == shapes(model.state_dict())
    model.load_state_dict(converted, strict=True, assign=True)  # loads on meta too
    # And back: the model's state dict written in OpenCLIP layout is the file layout.
    back = hf_to_openclip(model.state_dict(), prefix=SDXL_TE2)
    assert shapes(back) == {SDXL_TE2 + k: v for k, v in expected.items() if k != "logit_scale"}
    assert back[SDXL_TE2 + "text_projection"].shape == (1280, 1280)


def test_every_openclip_fixture_key_is_understood():
    for key in read_keys("clip_keys_sdxl.txt", SDXL_TE2):
        openclip_name_to_hf(key)  # raises KeyError otherwise


def test_presets_match_transformers_layouts():
    """Names and shapes equal transformers' models built from the same sizes (on meta)."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    for preset in ("clip-h", "bigg", "clip-l"):
        cfg = CLIPTextConfig.preset(preset)
        hf_cfg = HFConfig(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            projection_dim=cfg.projection_dim or cfg.hidden_size,
            hidden_act=cfg.activation,
        )
        cls = CLIPTextModelWithProjection if cfg.projection_dim else CLIPTextModel
        with torch.device("meta"):
            hf = cls(hf_cfg)
        ref = {}
        for k, v in hf.state_dict().items():
            if not k.startswith(("text_model.", "text_projection.")):
                k = "text_model." + k  # transformers 5 lists CLIPTextModel entries without it
            if k not in HF_IGNORED_KEYS:
                ref[k] = tuple(v.shape)
        assert shapes(meta_encoder(preset).state_dict()) == ref, preset


def test_preset_errors_and_values():
    with pytest.raises(ValueError, match="clip-l, bigg, clip-h, tiny-clip-l, tiny-bigg"):
        CLIPTextConfig.preset("clip-xl")
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="activation"):
        CLIPTextConfig(activation="relu")
    tiny_l, tiny_g = CLIPTextConfig.preset("tiny-clip-l"), CLIPTextConfig.preset("tiny-bigg")
    assert (tiny_l.hidden_size, tiny_l.num_layers, tiny_l.num_heads, tiny_l.intermediate_size) == (32, 3, 2, 64)
    assert tiny_l.activation == "quick_gelu" and tiny_l.projection_dim is None and tiny_l.vocab_size == 49408
    assert (tiny_g.hidden_size, tiny_g.num_layers, tiny_g.intermediate_size) == (64, 3, 128)
    assert (tiny_g.activation, tiny_g.projection_dim) == ("gelu", 64)
    clip_h = CLIPTextConfig.preset("clip-h")
    assert (clip_h.hidden_size, clip_h.num_layers, clip_h.num_heads, clip_h.projection_dim) == (1024, 24, 16, None)
