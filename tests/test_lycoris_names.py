"""Full-size SDXL on meta: every algorithm exports exactly the modules of kohya's LoCon table
(tests/fixtures/sdxl_locon_keys.txt, less the CLIP-L layer SDXL never reads), each with exactly
the keys of its kind, and every module's tensors go through ComfyUI's formulas to the shape of
the weight they patch (meta tensors: shapes only)."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_lycoris import comfy_diff

import models
from models.bundle import build_model
from models.lora.names import components_of

TABLE = Path(__file__).parent / "fixtures" / "sdxl_locon_keys.txt"


def _kohya_modules() -> set[str]:
    names = {line.split("\t")[0].split(".")[0] for line in TABLE.read_text().splitlines()}
    return {n for n in names if not n.startswith("lora_te1_text_model_encoder_layers_11_")}  # never read by SDXL


@pytest.fixture(scope="module")
def sdxl():
    return build_model("sdxl", device="meta")


ALGOS = {  # inject_lora arguments -> the key suffixes each module may have, per kind of layer
    "loha": {"algo": "loha", "rank": 8},
    "loha_tucker": {"algo": "loha", "rank": 8, "use_tucker": True},
    "lokr": {"algo": "lokr", "rank": 16},
    "lokr_factor8_both_tucker": {"algo": "lokr", "rank": 2, "factor": 8, "decompose_both": True, "use_tucker": True},
    "locon_tucker": {"algo": "lora", "rank": 8, "use_tucker": True},
}
LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}


def _allowed(which: str, is_3x3: bool) -> list[set[str]]:
    """The complete key sets a module of this configuration may have."""
    kw = ALGOS[which]
    tucker = kw.get("use_tucker", False) and is_3x3
    if kw["algo"] == "loha":
        return [LOHA | ({"hada_t1", "hada_t2"} if tucker else set())]
    if kw["algo"] == "lora":
        return [{"lora_down.weight", "lora_up.weight", "alpha"} | ({"lora_mid.weight"} if tucker else set())]
    w1 = [{"lokr_w1"}] + ([{"lokr_w1_a", "lokr_w1_b"}] if kw.get("decompose_both") else [])
    w2 = [{"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"} | ({"lokr_t2"} if tucker else set())]
    return [a | b | {"alpha"} for a in w1 for b in w2]


@pytest.mark.parametrize("which", list(ALGOS))
def test_export_keys_are_exactly_the_locon_modules_with_their_kind_keys(sdxl, which):
    net = models.inject_lora(sdxl, unet="locon", text_encoders="te", **ALGOS[which])
    try:
        tensors = net.state_dict_for_export()
        refs = net.refs()
        modules: dict[str, set[str]] = {}
        for key in tensors:
            name, suffix = key.split(".", 1)
            modules.setdefault(name, set()).add(suffix)
        want = _kohya_modules()
        assert sorted(set(modules) - want) == [] and sorted(want - set(modules)) == []
        parts = components_of(sdxl)
        no_alpha = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}  # meta: no values to read
        kinds = set()
        for name, suffixes in modules.items():
            weight = parts[refs[name].component].get_submodule(refs[name].path).weight
            is_3x3 = weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)
            assert suffixes in _allowed(which, is_3x3), (name, sorted(suffixes))
            kinds.add(frozenset(suffixes))
            diff, _ = comfy_diff(no_alpha, name, weight.shape)  # raises if the shapes do not fit
            assert diff.shape == weight.shape
        if which == "lokr":  # rank 16: full w2 where its side is <= 32, low rank on the wide layers
            assert {frozenset({"lokr_w1", "lokr_w2", "alpha"}),
                    frozenset({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"})} <= kinds
        if which == "lokr_factor8_both_tucker":
            assert any("lokr_t2" in k for k in kinds) and any("lokr_w1_a" in k for k in kinds)
    finally:
        net.remove()
    assert not any("LoRA" in type(m).__name__ for m in sdxl.unet.modules())
