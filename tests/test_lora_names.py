"""LoRA names on full-size SDXL / SD1.5 built on meta: exported keys, shapes and ComfyUI targets
equal the reference tables in tests/fixtures (kohya's files, ComfyUI's key map, diffusers names)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import models
from models.bundle import build_model
from models.lora.names import layers_per_block, unet_diffusers_path

FIXTURES = Path(__file__).parent / "fixtures"


def _table(name: str) -> dict[str, str]:
    rows = {}
    for line in (FIXTURES / name).read_text().splitlines():
        key, value = line.split("\t")
        rows[key] = value
    return rows


@pytest.fixture(scope="module")
def sdxl():
    return build_model("sdxl", device="meta")


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15", device="meta")


def _exported(bundle, preset, shapes=False):
    net = models.inject_lora(bundle, unet=preset, text_encoders="te", rank=4, conv_rank=4)
    try:
        sd = net.state_dict_for_export()
        return {k: (v.shape if shapes else str(list(v.shape))) for k, v in sd.items()}, net.refs()
    finally:
        net.remove()


def _unread(family: str, name: str) -> bool:
    """Names of adapters on text-encoder layers the family's conditioning never reads."""
    return family == "sdxl" and name.startswith("lora_te1_text_model_encoder_layers_11_")


@pytest.mark.parametrize("family,preset,fixture", [
    ("sdxl", "kohya", "sdxl_lora_keys.txt"),
    ("sdxl", "locon", "sdxl_locon_keys.txt"),
    ("sd15", "kohya", "sd15_lora_keys.txt"),
    ("sd15", "locon", "sd15_locon_keys.txt"),
])
def test_export_keys_and_shapes_equal_kohya_tables(family, preset, fixture, request):
    bundle = request.getfixturevalue(family)
    before = {k: v.shape for k, v in bundle.unet.state_dict().items()}
    got, _ = _exported(bundle, preset)
    want = _table(fixture)
    assert sorted(set(got) - set(want)) == []
    # kohya also adapts the last CLIP-L layer of SDXL, which SDXL never reads: we leave it out.
    assert sorted(set(want) - set(got)) == sorted(k for k in want if _unread(family, k))
    want = {k: v for k, v in want.items() if not _unread(family, k)}
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    # removal gives the model back its original modules and keys
    assert {k: v.shape for k, v in bundle.unet.state_dict().items()} == before
    assert not any("lora" in type(m).__name__.lower() for m in bundle.unet.modules())


@pytest.mark.parametrize("family,fixture", [("sdxl", "sdxl_kohya_to_comfy_targets.tsv"),
                                            ("sd15", "sd15_kohya_to_comfy_targets.tsv")])
def test_every_exported_name_hits_the_comfyui_target(family, fixture, request):
    bundle = request.getfixturevalue(family)
    shapes, refs = _exported(bundle, "locon", shapes=True)
    targets = _table(fixture)
    assert set(refs) == {name for name in targets if not _unread(family, name)}
    clip_prefix = {"te": "clip_l.transformer.", "te1": "clip_l.transformer.", "te2": "clip_g.transformer."}
    parts = {"unet": bundle.unet, **dict(zip(("te1", "te2") if family == "sdxl" else ("te",), bundle.text_encoders))}
    for name, ref in refs.items():
        target = targets[name]
        prefix = "diffusion_model." if ref.component == "unet" else clip_prefix[ref.component]
        assert target == f"{prefix}{ref.path}.weight", name
        # the target weight exists in our model with the shape ComfyUI reshapes up @ down to
        weight = parts[ref.component].get_submodule(ref.path).weight
        up, down = shapes[f"{name}.lora_up.weight"], shapes[f"{name}.lora_down.weight"]
        assert (up[0], *down[1:]) == tuple(weight.shape), name


def test_sdxl_diffusers_spelling_and_peft_paths_match_table(sdxl):
    rows = list(csv.reader((FIXTURES / "sdxl_ldm_vs_diffusers_lora_names.tsv").open(), delimiter="\t"))[1:]
    table = models.lora.network.name_table(sdxl)
    for ldm_name, diff_name, peft_path, *_ in rows:
        ref = table.from_kohya(ldm_name)
        assert ref is not None and ref.kohya == ldm_name, ldm_name
        assert table.from_kohya(diff_name) is ref, diff_name
        assert ref.peft == peft_path
        assert table.from_peft(peft_path) is ref


def test_sd15_ldm_to_diffusers_map_matches_comfy_table(sd15):
    """SD1.5 kohya names use diffusers paths; our modules carry ldm ones. The comfy table pairs them."""
    paths = [n for n, _ in sd15.unet.named_modules()]
    n_layers = layers_per_block(paths)
    assert n_layers == 2
    pairs = {k: v for k, v in _table("sd15_kohya_to_comfy_targets.tsv").items() if k.startswith("lora_unet_")}
    for kohya, target in pairs.items():
        ldm = target[len("diffusion_model."):-len(".weight")]
        assert "lora_unet_" + unet_diffusers_path(ldm, n_layers).replace(".", "_") == kohya
    # ldm spelling of an SD1.5 module is accepted on import too (ComfyUI does)
    table = models.lora.network.name_table(sd15)
    assert table.from_kohya("lora_unet_input_blocks_1_1_proj_in").kohya == "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_attn_preset_and_regex_selection(sd15):
    net = models.inject_lora(sd15, unet="attn", rank=2)
    try:
        names = set(net.adapters())
        assert len(names) == 16 * 8  # 16 transformer blocks x (attn1, attn2) x (q, k, v, out)
        assert all(n.rsplit("_", 2)[-2:] in (["to", "q"], ["to", "k"], ["to", "v"], ["out", "0"]) for n in names)
    finally:
        net.remove()
    net = models.inject_lora(sd15, unet=[r"attn2\.to_k$"], text_encoders=[r"layers\.11\.mlp\.fc2$"], rank=2,
                             exclude=[r"^unet\.output_blocks"])
    try:
        comps = [r.component for r in net.refs().values()]
        assert comps.count("unet") == 7 and comps.count("te") == 1  # 6 down + 1 mid attn2.to_k; one fc2
    finally:
        net.remove()


def test_selection_errors_name_the_preset_or_regex(sd15):
    with pytest.raises(ValueError, match="left no module of te"):
        models.inject_lora(sd15, unet=None, text_encoders="te", rank=2, include=[r"^unet\."])
    with pytest.raises(ValueError, match=r"regex\(es\) \['no_such_layer'\]"):
        models.inject_lora(sd15, unet=[r"no_such_layer"], rank=2)
    with pytest.raises(ValueError, match="left no module"):
        models.inject_lora(sd15, unet="kohya", exclude=[r"^unet\."], rank=2)
    assert not any("LoRA" in type(m).__name__ for m in sd15.unet.modules())


def test_conv_rank_applies_to_3x3_convs_only(sdxl):
    net = models.inject_lora(sdxl, unet="locon", rank=8, alpha=4, conv_rank=2, conv_alpha=1)
    try:
        a = net.adapters()
        assert a["lora_unet_input_blocks_1_0_in_layers_2"].lora_down.weight.shape == torch.Size([2, 320, 3, 3])
        assert a["lora_unet_input_blocks_1_0_in_layers_2"].alpha == 1.0
        assert a["lora_unet_input_blocks_4_0_skip_connection"].rank == 8  # 1x1 conv: linear rank
        assert a["lora_unet_input_blocks_1_0_emb_layers_1"].rank == 8
        assert a["lora_unet_input_blocks_4_1_proj_in"].alpha == 4.0
    finally:
        net.remove()
