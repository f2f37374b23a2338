"""LyCORIS (`pip install lycoris-lora`, a test-only oracle; skipped when missing) against our
LoHa / LoKr / DoRA adapters: the same tensors and alpha for the same options, the same outputs
for the same weights, its per-output DoRA files loaded as it runs them, and its own file reader
building our exported modules."""
from __future__ import annotations

import copy

import pytest
import torch
from test_lycoris import rel
from torch import nn

from models.lora.layers import LoRAAdapter, LoRAConv2d, LoRALinear
from models.lora.lycoris import LoHaAdapter, LoKrAdapter

pytest.importorskip("lycoris", reason="lycoris-lora is a test-only oracle")


# ------------------------------------------------------------------------------------------------
# LyCORIS itself as the oracle
# ------------------------------------------------------------------------------------------------
def _oracle_pair(algo, base, rank, alpha, **kw):
    """(LyCORIS module applied to a copy of `base`, our wrapper around `base` with the same weights)."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    ref_base = copy.deepcopy(base)
    if algo == "loha":
        theirs = LohaModule("m", ref_base, 1.0, rank, alpha, use_tucker=kw.get("tucker", False))
        ours = LoHaAdapter(base, rank, alpha, **kw)
    else:
        theirs = LokrModule("m", ref_base, 1.0, rank, alpha, use_tucker=kw.get("tucker", False),
                            decompose_both=kw.get("decompose_both", False), factor=kw.get("factor", -1))
        ours = LoKrAdapter(base, rank, alpha, **kw)
    return ref_base, theirs, ours


LAYERS = {"linear": lambda: nn.Linear(24, 40), "conv3": lambda: nn.Conv2d(16, 12, 3, padding=1),
          "conv1": lambda: nn.Conv2d(16, 8, 1)}
ORACLE_CASES = [(algo, layer, rank, kw) for layer in LAYERS for rank in (1, 3, 16)
                for algo, kw in [("loha", {}), ("loha", {"tucker": True}), ("lokr", {}),
                                 ("lokr", {"factor": 4, "decompose_both": True}),
                                 ("lokr", {"factor": 2, "tucker": True}), ("lokr", {"decompose_both": True, "tucker": True})]]


@pytest.mark.parametrize("algo,layer,rank,kw", ORACLE_CASES)
def test_lycoris_agrees_on_tensors_alpha_and_output(algo, layer, rank, kw):
    torch.manual_seed(0)
    base = LAYERS[layer]()
    ref_base, theirs, ours = _oracle_pair(algo, base, rank, 2.0, **kw)
    want = {k: tuple(v.shape) for k, v in theirs.custom_state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.export_tensors().items()} == want
    assert float(theirs.custom_state_dict()["alpha"]) == ours.alpha
    theirs.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.startswith(("hada", "lokr")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ours.load_file_tensors(theirs.custom_state_dict())
    wrapper = (LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear)(base)
    wrapper.lora_adapters["n"] = ours
    for module, m in ((theirs, 0.7), (ours, 0.7)):
        module.multiplier = m
    theirs.eval()
    x = torch.randn(2, 5, 24) if layer == "linear" else torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        expected, got = ref_base(x), wrapper(x)
    assert rel(expected, base(x)) > 1e-3
    assert rel(got, expected) <= 1e-5


@pytest.mark.parametrize("algo", ["locon", "loha"])
@pytest.mark.parametrize("layer", ["linear", "conv3"])
def test_lycoris_output_axis_dora_files_load_as_lycoris_runs_them(algo, layer):
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule

    torch.manual_seed(0)
    base = LAYERS[layer]()
    ref_base = copy.deepcopy(base)
    cls = LoConModule if algo == "locon" else LohaModule
    theirs = cls("m", ref_base, 1.0, 3, 2.0, weight_decompose=True)
    theirs.apply_to()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) * p if name == "dora_scale"
                    else torch.randn(p.shape, generator=g) * 0.3)
    sd = theirs.custom_state_dict()
    assert sd["dora_scale"].shape[0] == base.weight.shape[0]  # LyCORIS's default: one magnitude per output
    ours = (LoRAAdapter if algo == "locon" else LoHaAdapter)(base, 3, 2.0, dora="out")
    ours.load_file_tensors(sd)
    wrapper = (LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear)(base)
    wrapper.lora_adapters["n"] = ours
    theirs.eval()
    x = torch.randn(2, 5, 24) if layer == "linear" else torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        expected, got = ref_base(x), wrapper(x)
        assert rel(expected, base(x)) > 1e-3
        assert rel(got, expected) <= 1e-5
        merged = ours.adapted_weight(base.weight)
        assert rel(_op(base, merged)(x), expected) <= 1e-5


def _op(base, w):
    if isinstance(base, nn.Linear):
        return lambda x: nn.functional.linear(x, w, base.bias)
    return lambda x: nn.functional.conv2d(x, w, base.bias, base.stride, base.padding)


@pytest.mark.parametrize("algo,kw", [("loha", {}), ("loha", {"tucker": True}), ("lokr", {}),
                                     ("lokr", {"factor": 4, "decompose_both": True, "tucker": True})])
def test_lycoris_builds_the_same_module_from_our_exported_tensors(algo, kw):
    """LyCORIS's own file reader (`make_module_from_state_dict`) on our export computes our output."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    torch.manual_seed(0)
    base = LAYERS["conv3"]()
    ours = (LoHaAdapter if algo == "loha" else LoKrAdapter)(base, 2, 3.0, **kw)
    for p in ours.file_tensors().values():
        nn.init.normal_(p, std=0.4)
    t = ours.export_tensors()
    ref_base = copy.deepcopy(base)
    with torch.no_grad():
        if algo == "loha":
            theirs = LohaModule.make_module_from_state_dict(
                "m", ref_base, t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"),
                t.get("hada_t2"), t["alpha"], None)
        else:
            theirs = LokrModule.make_module_from_state_dict(
                "m", ref_base, *(t.get(n) for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                    "lokr_w2_b", "lokr_t1", "lokr_t2")), t["alpha"], None)
    theirs.apply_to()
    theirs.eval()
    wrapper = LoRAConv2d(base)
    wrapper.lora_adapters["n"] = ours
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        assert rel(wrapper(x), ref_base(x)) <= 1e-5
