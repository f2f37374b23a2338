"""LyCORIS LoHa / LoKr adapters: the update equals its closed form, exported files applied with
ComfyUI's formulas reproduce the injected model, every file form imports, LyCORIS itself agrees
(when installed), merge / stack / remove, dropouts and the option checks.

ComfyUI's formulas below are written from its `comfy/weight_adapter/{lora,loha,lokr}.py`
`calculate_weight` (W += strength * scale * diff):
  LoRA:  diff = up.flatten(1) @ down'.flatten(1), down' = down with `lora_mid` folded in as
         (mm(down^T, mid^T(0,1)) reshaped (in, r, kh, kw))^T(0,1); scale = alpha / down.shape[0]
  LoHa:  diff = (w1a @ w1b) * (w2a @ w2b), or with cores einsum('ijkl,jr,ip->prkl', t, wb, wa)
         per half; scale = alpha / w1b.shape[0]
  LoKr:  w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2 or w2_a @ w2_b or
         einsum('ijkl,jr,ip->prkl', t2, w2_b, w2_a); w1 unsqueezed to 4-D when w2 is;
         diff = kron(w1, w2); scale = alpha / dim with dim = rows of the low-rank factor's _b
         (w2's when both are), 1 when both factors are full
  full:  W += strength * diff, bias += strength * diff_b
"""
from __future__ import annotations

import itertools
import math

import pytest
import safetensors.torch
import torch
from torch import nn

import models
from models.bundle import build_model
from models.lora.files import load_lora
from models.lora.layers import LoRAConv2d, LoRALinear
from models.lora.lycoris import LoHaAdapter, LoKrAdapter, LoKrLayout, factorization
from models.lora.options import LoRAOptions


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------------
# ComfyUI's reading of a file (see the module docstring)
# ------------------------------------------------------------------------------------------------
def comfy_diff(lora: dict, name: str, shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale * diff reshaped to `shape`, diff_b or None) of module `name`, float32."""
    g = lambda s: None if f"{name}.{s}" not in lora else lora[f"{name}.{s}"].float()
    alpha = None if g("alpha") is None else g("alpha").item()
    if g("lora_up.weight") is not None:
        mat1, mat2, mid = g("lora_up.weight"), g("lora_down.weight"), g("lora_mid.weight")
        scale = 1.0 if alpha is None else alpha / mat2.shape[0]
        if mid is not None:
            final = [mat2.shape[1], mat2.shape[0], mid.shape[2], mid.shape[3]]
            mat2 = torch.mm(mat2.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
            mat2 = mat2.reshape(final).transpose(0, 1)
        return scale * torch.mm(mat1.flatten(1), mat2.flatten(1)).reshape(shape), None
    if g("hada_w1_a") is not None:
        w1a, w1b, w2a, w2b = (g(f"hada_w{i}_{s}") for i in (1, 2) for s in "ab")
        scale = 1.0 if alpha is None else alpha / w1b.shape[0]
        if g("hada_t1") is not None:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", g("hada_t1"), w1b, w1a)
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", g("hada_t2"), w2b, w2a)
        else:
            m1, m2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
        return scale * (m1 * m2).reshape(shape), None
    if g("diff") is not None:
        return g("diff").reshape(shape), g("diff_b")
    dim, w1, w2 = None, g("lokr_w1"), g("lokr_w2")
    if w1 is None:
        dim = g("lokr_w1_b").shape[0]
        w1 = torch.mm(g("lokr_w1_a"), g("lokr_w1_b"))
    if w2 is None:
        dim = g("lokr_w2_b").shape[0]
        if g("lokr_t2") is None:
            w2 = torch.mm(g("lokr_w2_a"), g("lokr_w2_b"))
        else:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", g("lokr_t2"), g("lokr_w2_b"), g("lokr_w2_a"))
            w2 = w2.contiguous()  # torch.kron refuses this einsum's strided result; same values
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(shape), None


def comfy_patched(bundle, lora: dict, refs: dict, strength: float) -> None:
    """Apply `lora` to `bundle`'s weights in place with ComfyUI's formulas (kohya name -> module via refs)."""
    parts = {"unet": bundle.unet, **dict(zip(bundle.spec.lora_text_components, bundle.text_encoders))}
    with torch.no_grad():
        for name, ref in refs.items():
            layer = parts[ref.component].get_submodule(ref.path)
            diff, diff_b = comfy_diff(lora, name, layer.weight.shape)
            layer.weight += strength * diff
            if diff_b is not None:
                layer.bias += strength * diff_b


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def randomize(net, std=0.3, seed=3):
    """Random values in every adapter tensor (the zero-initialised ones included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in net.adapters().values():
            for p in a.file_tensors().values():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def sdxl_or_sd_inputs(bundle, seed=2):
    g = torch.Generator().manual_seed(seed)
    c = bundle.unet.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    t = torch.tensor([17.0, 640.0])
    ctx = torch.randn(2, 7, c.context_dim, generator=g)
    y = None if c.adm_in_channels is None else torch.randn(2, c.adm_in_channels, generator=g)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[0, 9:], ids[1, 14:] = 49406, 49407, 49407
    return x, t, ctx, y, ids


def outputs(bundle, x, t, ctx, y, ids) -> torch.Tensor:
    """UNet output and every text encoder's last hidden state, flat."""
    with torch.no_grad():
        outs = [bundle.unet(x, t, ctx, y).flatten()]
        outs += [te(ids).last_hidden_state.flatten() for te in bundle.text_encoders]
    return torch.cat(outs)


NETS = {  # name -> inject_lora arguments (preset locon: Linear, 1x1 and 3x3 convs; text encoders)
    "loha": {"algo": "loha", "rank": 3, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.5},
    "loha_tucker": {"algo": "loha", "rank": 2, "alpha": 1.0, "use_tucker": True},
    "lokr": {"algo": "lokr", "rank": 4, "alpha": 3.0, "factor": 4},
    "lokr_lowrank": {"algo": "lokr", "rank": 1, "alpha": 2.0, "decompose_both": True, "use_tucker": True},
    "locon_tucker": {"algo": "lora", "rank": 3, "alpha": 2.0, "use_tucker": True},
}


# ------------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------------
def test_factorization_follows_lycoris_table():
    """LyCORIS's `factorization` docstring table (dimension x factor -> (smaller, larger)); its
    360 row is the code's (18, 20) and (15, 24): the largest divisor <= sqrt(360) (and <= 16)."""
    table = {127: [(1, 127)] * 5, 128: [(8, 16), (2, 64), (4, 32), (8, 16), (8, 16)],
             250: [(10, 25), (2, 125), (2, 125), (5, 50), (10, 25)],
             360: [(18, 20), (2, 180), (4, 90), (8, 45), (15, 24)],
             512: [(16, 32), (2, 256), (4, 128), (8, 64), (16, 32)],
             1024: [(32, 32), (2, 512), (4, 256), (8, 128), (16, 64)]}
    for dim, row in table.items():
        assert [factorization(dim, f) for f in (-1, 2, 4, 8, 16)] == row, dim


def _kron_by_loops(w1: torch.Tensor, w2: torch.Tensor, shape) -> torch.Tensor:
    """D[i*b + p, j*D2 + q] = w1[i, j] * w2[p, q] over the flattened (out, in*k) layout."""
    w2 = w2.reshape(w2.shape[0], -1)
    (a, c), (b, q2) = w1.shape, w2.shape
    d = torch.zeros(a * b, c * q2)
    for i, j, p, q in itertools.product(range(a), range(c), range(b), range(q2)):
        d[i * b + p, j * q2 + q] = w1[i, j] * w2[p, q]
    return d.reshape(shape)


def _tucker_by_loops(t, wa, wb):
    """W[p, q, h, w] = sum_ij t[i, j, h, w] * wa[i, p] * wb[j, q]."""
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:])
    for i, j in itertools.product(range(t.shape[0]), range(t.shape[1])):
        out += t[i, j][None, None] * wa[i][:, None, None, None] * wb[j][None, :, None, None]
    return out


def _layer(kind):
    return nn.Linear(6, 8) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1, stride=2)


def _run(base, adapter, multiplier, x):
    wrapper = (LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear)(base)
    wrapper.lora_adapters["n"] = adapter
    adapter.multiplier = multiplier
    with torch.no_grad():
        return wrapper(x)


def _x(base):
    if isinstance(base, nn.Linear):
        return torch.randn(2, 3, base.in_features)
    return torch.randn(2, base.in_channels, 7, 7)


def _op(base, w):
    return (lambda x: nn.functional.linear(x, w, base.bias)) if isinstance(base, nn.Linear) else (
        lambda x: nn.functional.conv2d(x, w, base.bias, base.stride, base.padding))


@pytest.mark.parametrize("kind,tucker", [("linear", False), ("conv", False), ("conv", True)])
def test_loha_update_equals_its_closed_form(kind, tucker):
    torch.manual_seed(0)
    base = _layer(kind)
    a = LoHaAdapter(base, 2, 3.0, tucker=tucker)
    assert torch.count_nonzero(a.delta_weight()) == 0  # LyCORIS init: w2a = 0, so D starts at 0
    for p in a.file_tensors().values():
        nn.init.normal_(p)
    f = {k: v.detach() for k, v in a.file_tensors().items()}
    shape = base.weight.shape
    if tucker:
        m1 = _tucker_by_loops(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
        m2 = _tucker_by_loops(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
    else:
        m1 = torch.stack([sum(f["hada_w1_a"][o, r] * f["hada_w1_b"][r] for r in range(2)) for o in range(shape[0])])
        m2 = torch.stack([sum(f["hada_w2_a"][o, r] * f["hada_w2_b"][r] for r in range(2)) for o in range(shape[0])])
    want = (m1 * m2).reshape(shape) * (3.0 / 2)
    torch.testing.assert_close(a.delta_weight().detach(), want, rtol=1e-5, atol=1e-6)
    x = _x(base)
    torch.testing.assert_close(_run(base, a, 0.6, x), _op(base, base.weight + 0.6 * want)(x), rtol=1e-5, atol=1e-5)


LOKR_CASES = {  # name -> (layer kind, rank, factor, decompose_both, tucker, expected tensor names)
    # Linear 24 -> 16: factor 4 splits out (4, 4), in (4, 6); -1: (4, 4), (4, 6) as well
    "linear_full": ("linear", 8, -1, False, False, {"lokr_w1", "lokr_w2"}),
    "linear_lowrank_w2": ("linear", 2, 4, False, False, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "linear_both_lowrank": ("linear", 1, 4, True, False, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    # Conv 8 -> 12, 3x3: factor 2 splits out (2, 6), in (2, 4); -1: (3, 4), (2, 4)
    "conv_full": ("conv", 8, -1, False, False, {"lokr_w1", "lokr_w2"}),
    "conv_flat_lowrank": ("conv", 1, 2, False, False, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "conv_tucker": ("conv", 1, 2, False, True, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
}


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr_update_equals_its_closed_form(case):
    kind, rank, factor, both, tucker, names = LOKR_CASES[case]
    torch.manual_seed(0)
    base = nn.Linear(24, 16) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1)
    a = LoKrAdapter(base, rank, 3.0, factor=factor, decompose_both=both, tucker=tucker)
    assert set(a.file_tensors()) == names
    assert torch.count_nonzero(a.delta_weight()) == 0
    for p in a.file_tensors().values():
        nn.init.normal_(p)
    f = {k: v.detach() for k, v in a.file_tensors().items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif tucker:
        w2 = _tucker_by_loops(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    # full w1 and w2: scale 1 whatever alpha; else alpha / rank of the low-rank factor
    scale = 1.0 if names == {"lokr_w1", "lokr_w2"} else 3.0 / rank
    want = _kron_by_loops(w1, w2, base.weight.shape) * scale
    torch.testing.assert_close(a.delta_weight().detach(), want, rtol=1e-5, atol=1e-6)
    x = _x(base)
    torch.testing.assert_close(_run(base, a, -0.8, x), _op(base, base.weight - 0.8 * want)(x), rtol=1e-5, atol=1e-5)


def test_lokr_layout_follows_lycoris_rules():
    # 640 -> (20, 32); w2 is full when rank >= 32 / 2, w1 low rank only with decompose_both and rank < 20 / 2
    assert LoKrLayout.choose((640, 640), 16) == LoKrLayout((20, 32), (20, 32), None, None)
    assert LoKrLayout.choose((640, 640), 15) == LoKrLayout((20, 32), (20, 32), None, 15)
    assert LoKrLayout.choose((640, 640), 9, decompose_both=True) == LoKrLayout((20, 32), (20, 32), 9, 9)
    assert LoKrLayout.choose((640, 640), 10, decompose_both=True) == LoKrLayout((20, 32), (20, 32), None, 10)
    assert LoKrLayout.choose((1280, 640), 4, factor=8) == LoKrLayout((8, 160), (8, 80), None, 4)
    assert LoKrLayout.choose((320, 640, 3, 3), 4, tucker=True) == LoKrLayout((16, 20), (20, 32), None, 4, True)
    assert LoKrLayout.choose((320, 640, 1, 1), 4, tucker=True).tucker is False  # 1x1: no core


def test_fresh_adapters_start_at_zero_and_every_factor_gets_a_gradient():
    bundle = build_model("tiny-sd15", seed=0)
    x, t, ctx, _, _ = sdxl_or_sd_inputs(bundle)
    with torch.no_grad():
        base = bundle.unet(x, t, ctx)
    for kw in NETS.values():
        net = models.inject_lora(bundle, unet="locon", **kw)
        out = bundle.unet(x, t, ctx)
        assert rel(out.detach(), base) <= 1e-6  # (a wrapped upsampling conv skips the fused kernel: rounding)
        out.square().mean().backward()
        # the zero factor (LoHa w2a, LoKr w2 / w2_b, LoRA up) moves on the first step
        zero = [p for a in net.adapters().values() for p in a.file_tensors().values() if not p.any()]
        assert zero and all(p.grad is not None and p.grad.abs().sum() > 0 for p in zero), kw
        net.remove()


# ------------------------------------------------------------------------------------------------
# the exported file in ComfyUI
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny-sdxl", "tiny-sd15"])
@pytest.mark.parametrize("which", list(NETS))
def test_comfyui_formulas_on_the_exported_file_reproduce_the_injected_model(family, which, tmp_path):
    bundle = build_model(family, seed=0)
    net = models.inject_lora(bundle, unet="locon", text_encoders="te", **NETS[which])
    randomize(net, std=0.2)
    net.multiplier = 0.8
    data = sdxl_or_sd_inputs(bundle)
    want = outputs(bundle, *data)
    path = tmp_path / "lycoris.safetensors"
    net.save(path, dtype=torch.float32)
    lora = safetensors.torch.load_file(path)
    ref = build_model(family, seed=0)
    assert rel(outputs(ref, *data), want) > 1e-2  # the adapters matter
    comfy_patched(ref, lora, net.refs(), strength=0.8)
    assert rel(outputs(ref, *data), want) <= 1e-5
    # ... and our own loader reads it back to the same function
    fresh = build_model(family, seed=0)
    load_lora(fresh, path, strength=0.8)
    assert rel(outputs(fresh, *data), want) <= 1e-5


def test_metadata_names_the_lycoris_module_and_args(tmp_path):
    bundle = build_model("tiny-sd15", seed=0)
    for kw, args in [(NETS["lokr"], {"algo": "lokr", "factor": "4", "decompose_both": "False", "use_tucker": "False"}),
                     (NETS["loha_tucker"], {"algo": "loha", "use_tucker": "True"}),
                     (NETS["locon_tucker"], {"algo": "locon", "use_tucker": "True"})]:
        net = models.inject_lora(bundle, unet="locon", **kw)
        meta = net.save(tmp_path / "x.safetensors")
        import json

        got = json.loads(meta["ss_network_args"])
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert {k: got[k] for k in args} == args and "conv_dim" in got
        assert meta["ss_network_dim"] == str(kw["rank"])
        net.remove()
    net = models.inject_lora(bundle, unet="locon", rank=2)
    assert net.save(tmp_path / "x.safetensors")["ss_network_module"] == "networks.lora"


# ------------------------------------------------------------------------------------------------
# merge, unmerge, stacking, removal
# ------------------------------------------------------------------------------------------------
def test_lycoris_networks_merge_unmerge_stack_and_remove_like_lora():
    bundle = build_model("tiny-sd15", seed=0)
    data = sdxl_or_sd_inputs(bundle)
    weights0 = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    base = outputs(bundle, *data)
    nets = [models.inject_lora(bundle, unet="locon", text_encoders="te", **NETS[w]) for w in ("loha", "lokr")]
    nets.append(models.inject_lora(bundle, unet="kohya", rank=2))
    for i, (net, m) in enumerate(zip(nets, (0.7, -0.5, 1.2))):
        randomize(net, std=0.2, seed=i)
        net.multiplier = m
    stacked = outputs(bundle, *data)
    ref = build_model("tiny-sd15", seed=0)
    for net in nets:
        comfy_patched(ref, net.state_dict_for_export(), net.refs(), net.multiplier)
    assert rel(stacked, outputs(ref, *data)) <= 1e-5
    nets[0].merge(keep_original=False)
    nets[1].merge()
    assert rel(outputs(bundle, *data), stacked) <= 1e-5
    nets[0].unmerge()
    assert rel(outputs(bundle, *data), stacked) <= 1e-5
    nets[1].remove()  # unmerges first
    nets[0].remove()
    only_lora = outputs(bundle, *data)
    assert rel(only_lora, stacked) > 1e-3 and rel(only_lora, base) > 1e-3
    nets[2].remove()
    assert rel(outputs(bundle, *data), base) <= 1e-6
    assert all(torch.allclose(weights0[k], v, atol=1e-6) for k, v in bundle.unet.state_dict().items())
    assert not any("LoRA" in type(m).__name__ for m in bundle.unet.modules())


def test_meta_injection_materialises_and_resets_to_zero_update():
    meta = build_model("tiny-sdxl", device="meta")
    net = models.inject_lora(meta, unet="locon", **NETS["lokr_lowrank"])
    assert all(p.is_meta for p in net.parameters())
    shapes = {k: tuple(v.shape) for k, v in net.state_dict_for_export().items()}
    meta.unet.to_empty(device="cpu")
    real = build_model("tiny-sdxl", seed=0)
    meta.unet.load_state_dict(real.unet.state_dict(), strict=False)
    net.reset_parameters()
    assert all(torch.count_nonzero(a.delta_weight()) == 0 for a in net.adapters().values())
    assert {k: tuple(v.shape) for k, v in net.state_dict_for_export().items()} == shapes


# ------------------------------------------------------------------------------------------------
# dropouts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_rank_dropout_zeroes_whole_output_rows_without_rescale(algo):
    torch.manual_seed(0)
    base = nn.Linear(6, 8)
    a = (LoHaAdapter if algo == "loha" else LoKrAdapter)(base, 2, 2.0, rank_dropout=0.5)
    for p in a.file_tensors().values():
        nn.init.normal_(p)
    wrapper = LoRALinear(base)
    wrapper.lora_adapters["n"] = a
    x = torch.randn(3, 6)
    wrapper.train()
    torch.manual_seed(4)
    with torch.no_grad():
        got = wrapper(x) - base(x)
    torch.manual_seed(4)
    keep = (torch.rand(8) >= 0.5).float()
    assert 0 < keep.mean() < 1
    with torch.no_grad():
        want = nn.functional.linear(x, a.delta_weight() * keep[:, None])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    wrapper.eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x) - base(x), nn.functional.linear(x, a.delta_weight()), rtol=1e-5, atol=1e-6)


def test_module_dropout_skips_whole_lycoris_adapters_per_step():
    bundle = build_model("tiny-sd15", seed=0)
    x, t, ctx, _, _ = sdxl_or_sd_inputs(bundle)
    with torch.no_grad():
        base = bundle.unet(x, t, ctx)
    net = models.inject_lora(bundle, unet="kohya", algo="loha", rank=2, module_dropout=0.5)
    randomize(net)
    bundle.unet.train()
    net.train()
    torch.manual_seed(1)
    with torch.no_grad():
        dropped = bundle.unet(x, t, ctx)
    keeps = [float(a._keep) for a in net.adapters().values()]
    assert 0 < sum(keeps) < len(keeps)  # this draw drops some adapters and keeps others
    bundle.unet.eval()
    for a, k in zip(net.adapters().values(), keeps):
        a.multiplier = k  # the same function: dropped adapters off, kept ones on
    with torch.no_grad():
        assert rel(dropped, bundle.unet(x, t, ctx)) <= 1e-5
        assert rel(dropped, base) > 1e-3


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------
def test_option_combinations_are_checked_with_a_clear_message():
    bundle = build_model("tiny-sd15", device="meta")
    for kw, message in [({"algo": "loha", "dora": True}, r"^dora: DoRA is available with algo lora only"),
                        ({"algo": "lokr", "dropout": 0.1}, r"^dropout: lokr has no dropout"),
                        ({"algo": "loha", "factor": 4}, r"^factor: shapes LoKr adapters only"),
                        ({"decompose_both": True}, r"^decompose_both: shapes LoKr adapters only"),
                        ({"algo": "lokr", "factor": 0}, r"^factor: must be -1"),
                        ({"algo": "boft"}, r"^algo: must be one of lora, loha, lokr")]:
        with pytest.raises(ValueError, match=message):
            models.inject_lora(bundle, unet="attn", **kw)
    LoRAOptions(algo="lokr", factor=8, decompose_both=True, use_tucker=True, rank_dropout=0.1).check()


def test_config_reads_and_checks_the_algo_keys():
    from trainer.config import ConfigError, load_config

    cfg = load_config(None, ["lora.algo=lokr", "lora.factor=8", "lora.decompose_both=true", "lora.use_tucker=true"],
                      check=False)
    assert (cfg.lora.algo, cfg.lora.factor, cfg.lora.decompose_both, cfg.lora.use_tucker) == ("lokr", 8, True, True)
    with pytest.raises(ConfigError, match=r"lora\.algo: must be one of 'lora', 'loha', 'lokr', got 'lokx'"):
        load_config(None, ["lora.algo=lokx"], check=False)
    with pytest.raises(ConfigError, match=r"lora\.dora: DoRA is available with algo lora only"):
        load_config(None, ["lora.algo=loha", "lora.dora=true", "data.path=."])


def test_algo_literal_equals_the_trainable_algorithms():
    import typing

    from models.lora.network import ALGOS
    from models.lora.options import Algo

    assert set(typing.get_args(Algo)) == set(ALGOS)


def test_peft_export_refuses_lycoris_adapters():
    bundle = build_model("tiny-sd15", device="meta")
    net = models.inject_lora(bundle, unet="kohya", algo="loha", rank=2)
    with pytest.raises(ValueError, match="format='peft' holds plain LoRA only, not loha"):
        net.state_dict_for_export(format="peft")


def test_lycoris_adapter_sizes_match_their_formulas():
    """Parameter counts per layer: LoHa 2r(out + in*k), LoKr a*c + b*d*k (full) or a*c + r(b + d*k)."""
    lin = nn.Linear(640, 1280)
    assert sum(p.numel() for p in LoHaAdapter(lin, 4, 4.0).parameters()) == 2 * 4 * (1280 + 640)
    k = LoKrAdapter(lin, 4, 4.0)  # 1280 -> (32, 40), 640 -> (20, 32); r < 40 / 2: low-rank w2
    assert sum(p.numel() for p in k.parameters()) == 32 * 20 + 4 * (40 + 32)
    conv = nn.Conv2d(320, 320, 3, padding=1)
    k = LoKrAdapter(conv, 64, 4.0)  # 320 -> (16, 20): full w2 (20, 20, 3, 3), scale 1
    assert sum(p.numel() for p in k.parameters()) == 16 * 16 + 20 * 20 * 9 and k.scale == 1.0
    assert math.isclose(LoKrAdapter(conv, 4, 2.0).scale, 0.5)
