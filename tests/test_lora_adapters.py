"""LoRA adapters on tiny models: base names unchanged, merge/unmerge/remove, training only the
adapters, stacking, meta + to_empty, bf16 bases, DoRA and dropouts."""
from __future__ import annotations

import pytest
import torch

import models
from models.bundle import build_model
from models.lora.network import LoRAConv2d, LoRALinear


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def unet_inputs(bundle, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = bundle.unet.config
    x = torch.randn(batch, c.in_channels, 8, 8, generator=g)
    t = torch.rand(batch, generator=g) * 999
    ctx = torch.randn(batch, 7, c.context_dim, generator=g)
    y = None if c.adm_in_channels is None else torch.randn(batch, c.adm_in_channels, generator=g)
    return x, t, ctx, y


def run_all(bundle, inputs, ids):
    """UNet output and every text encoder's last hidden state, concatenated flat."""
    x, t, ctx, y = inputs
    dtype = bundle.unet.dtype
    outs = [bundle.unet(x.to(dtype), t, ctx.to(dtype), None if y is None else y.to(dtype)).flatten()]
    for te in bundle.text_encoders:
        outs.append(te(ids).last_hidden_state.flatten())
    return torch.cat([o.float() for o in outs])


def randomize(net, std=0.2, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in net.adapters().values():
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * std)
            a.lora_down.weight.copy_(torch.randn(a.lora_down.weight.shape, generator=g) * std)


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[:, 9:] = 49406, 49407
    return ids


@pytest.mark.parametrize("family", ["tiny-sd15", "tiny-sdxl"])
def test_injection_keeps_base_names_and_remove_restores_modules(family):
    bundle = build_model(family, seed=0)
    before = {k: v for k, v in bundle.unet.state_dict(keep_vars=True).items()}
    originals = {n: m for n, m in bundle.unet.named_modules()}
    net = models.inject_lora(bundle, unet="locon", text_encoders="te", rank=4)
    after = bundle.unet.state_dict(keep_vars=True)
    assert list(after) == list(before)  # adapters are saved by the network, not the model
    assert all(after[k] is before[k] for k in before)  # the very same Parameter objects
    assert bundle.unet.load_state_dict({k: v.detach() for k, v in before.items()}, strict=True)
    assert any(".lora_adapters." in n for n, _ in bundle.unet.named_parameters())  # .to()/.train() reach them
    assert any(isinstance(m, LoRAConv2d) for m in bundle.unet.modules())
    assert any(isinstance(m, LoRALinear) for m in bundle.text_encoders[0].modules())
    net.remove()
    assert set(bundle.unet.state_dict()) == set(before)
    assert all(m is originals[n] for n, m in bundle.unet.named_modules())


@pytest.mark.parametrize("family", ["tiny-sd15", "tiny-sdxl"])
def test_unmerged_merged_unmerged_outputs_agree(family, ids):
    bundle = build_model(family, seed=0)
    inputs = unet_inputs(bundle)
    with torch.no_grad():
        base = run_all(bundle, inputs, ids)
        net = models.inject_lora(bundle, unet="locon", text_encoders="te", rank=4, alpha=2, conv_rank=2, conv_alpha=3)
        randomize(net)
        live = run_all(bundle, inputs, ids)
        net.merge()
        merged = run_all(bundle, inputs, ids)
        net.unmerge()
        again = run_all(bundle, inputs, ids)
        net.multiplier = 0.0
        off = run_all(bundle, inputs, ids)
        net.multiplier = 1.0
        net.remove()
        removed = run_all(bundle, inputs, ids)
    assert rel(live, base) > 1e-2  # the LoRA does something
    assert rel(merged, live) <= 1e-5
    assert rel(again, live) <= 1e-5
    assert rel(off, base) <= 1e-6  # unmerge subtracted the update again (fp32 rounding)
    assert rel(removed, base) <= 1e-6


def test_merge_with_backup_restores_bit_exactly_and_refuses_non_finite():
    bundle = build_model("tiny-sd15", seed=0)
    snapshot = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    net = models.inject_lora(bundle, unet="kohya", rank=4)
    randomize(net)
    net.merge(keep_original=True)
    net.unmerge()
    assert all(torch.equal(snapshot[k], v) for k, v in bundle.unet.state_dict().items() if k in snapshot)
    name = max(net.adapters())
    with torch.no_grad():
        net.adapters()[name].lora_up.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=name):
        net.merge()
    assert not any(a.merged for a in net.adapters().values())
    assert all(torch.equal(snapshot[k], v) for k, v in bundle.unet.state_dict().items() if k in snapshot)


def test_only_lora_params_train_and_base_is_bit_identical_after_a_step(ids):
    bundle = build_model("tiny-sdxl", seed=0)
    snapshot = {k: v.clone() for m in (bundle.unet, *bundle.text_encoders) for k, v in m.state_dict().items()}
    net = models.inject_lora(bundle, unet="locon", text_encoders="te", rank=4)
    lora_ids = {id(p) for p in net.parameters()}
    trainable = [p for m in (bundle.unet, bundle.vae, *bundle.text_encoders) for p in m.parameters() if p.requires_grad]
    assert trainable and all(id(p) in lora_ids for p in trainable)
    groups = net.param_groups(unet_lr=1e-2, te_lr=5e-3)
    assert [g["lr"] for g in groups] == [1e-2, 5e-3]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    bundle.unet.train()
    x, t, _, _ = unet_inputs(bundle)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    for _ in range(2):  # the first step only moves lora_up (it starts at zero)
        context, pooled = bundle.encode_tokens([ids, ids])
        loss = bundle.unet(x, t, context, bundle.sdxl_vector(pooled, time_ids)).square().mean()
        # SDXL conditioning skips CLIP-L's last layer; train it through its own output too
        loss = loss + bundle.text_encoders[0](ids).last_hidden_state.square().mean()
        opt.zero_grad()
        loss.backward()
        for m in (bundle.unet, *bundle.text_encoders):
            for p in m.parameters():
                if id(p) not in lora_ids:
                    assert p.grad is None
        assert all(p.grad is not None for p in net.parameters())
        opt.step()
    moved = [a for a in net.adapters().values() if a.lora_up.weight.abs().sum() > 0 and a.lora_down.weight.grad.abs().sum() > 0]
    assert len(moved) == len(net.adapters())
    now = {k: v for m in (bundle.unet, *bundle.text_encoders) for k, v in m.state_dict().items()}
    assert all(torch.equal(snapshot[k], now[k]) for k in snapshot)


def test_stacked_networks_apply_their_own_strengths_and_remove_in_any_order():
    bundle = build_model("tiny-sd15", seed=0)
    inputs = unet_inputs(bundle)
    originals = {n: m for n, m in bundle.unet.named_modules()}
    weights0 = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    a = models.inject_lora(bundle, unet="kohya", rank=4, alpha=2)
    b = models.inject_lora(bundle, unet="locon", rank=2, conv_rank=3)
    randomize(a, seed=1)
    randomize(b, seed=2)
    a.multiplier, b.multiplier = 0.5, -0.7
    with torch.no_grad():
        stacked = bundle.unet(*inputs)
    # the same function with both updates folded into plain weights (ComfyUI's formula per LoRA)
    ref = build_model("tiny-sd15", seed=0)
    sd = dict(weights0)
    for net in (a, b):
        for name, ref_mod in net.refs().items():
            ad = net.adapters()[name]
            key = ref_mod.path + ".weight"
            delta = (ad.lora_up.weight.flatten(1) @ ad.lora_down.weight.flatten(1)).reshape(sd[key].shape)
            sd[key] = sd[key] + net.multiplier * ad.alpha / ad.rank * delta
    ref.unet.load_state_dict(sd)
    with torch.no_grad():
        expected = ref.unet(*inputs)
    assert rel(stacked, expected) <= 1e-5
    a.remove()
    with torch.no_grad():
        only_b = bundle.unet(*inputs)
    assert rel(only_b, stacked) > 1e-3
    b.remove()
    assert all(m is originals[n] for n, m in bundle.unet.named_modules())
    assert all(torch.equal(weights0[k], v) for k, v in bundle.unet.state_dict().items())


def test_meta_model_materialised_with_to_empty():
    real = build_model("tiny-sdxl", seed=0)
    inputs = unet_inputs(real)
    with torch.no_grad():
        want = real.unet(*inputs)
    # inject on meta, then materialise and load
    meta = build_model("tiny-sdxl", device="meta")
    net = models.inject_lora(meta, unet="locon", rank=4)
    assert all(p.is_meta for p in net.parameters())
    assert {k: tuple(v.shape) for k, v in net.state_dict_for_export().items()}  # shapes without data
    meta.unet.to_empty(device="cpu")
    meta.unet.load_state_dict(real.unet.state_dict(), strict=False)
    net.reset_parameters()
    with torch.no_grad():
        # lora_up starts at zero; the wrapped Upsample conv takes the unfused path, so equal up to rounding
        got = meta.unet(*inputs)
        assert ((got - want).norm() / want.norm()).item() <= 1e-6
        randomize(net)
        live = meta.unet(*inputs)
        net.merge()
        assert rel(meta.unet(*inputs), live) <= 1e-5
    net.remove()  # hands the materialised Parameters back to the original modules
    with torch.no_grad():
        assert rel(meta.unet(*inputs), want) <= 1e-5
    assert all(not p.is_meta for p in meta.unet.parameters())


def test_bf16_base_keeps_fp32_adapters():
    bundle = build_model("tiny-sd15", seed=0, dtype=torch.bfloat16)
    snapshot = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    net = models.inject_lora(bundle, unet="locon", rank=4)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    randomize(net, std=0.05)
    x, t, ctx, _ = unet_inputs(bundle)
    out = bundle.unet(x.bfloat16(), t, ctx.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    with torch.no_grad():
        net.merge()  # bf16 weights: a backup is kept by default
        merged = bundle.unet(x.bfloat16(), t, ctx.bfloat16())
        net.unmerge()
    assert rel(merged, out.detach()) < 2e-2  # bf16 rounding of the merged weights
    assert all(torch.equal(snapshot[k], v) for k, v in bundle.unet.state_dict().items() if k in snapshot)


def _comfy_dora(weight, up, down, alpha, dora_scale, strength):
    """ComfyUI's weight_decompose: W' = m * (W + s*d) / ||W + s*d|| (norm per input column)."""
    rank = down.shape[0]
    diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / rank)
    calc = weight + diff
    norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora_scale / norm)
    return weight + strength * (calc - weight)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora_matches_comfyui_weight_decompose(strength):
    bundle = build_model("tiny-sd15", seed=0)
    inputs = unet_inputs(bundle)
    weights0 = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    with torch.no_grad():
        base = bundle.unet(*inputs)
    net = models.inject_lora(bundle, unet="locon", rank=4, alpha=2, dora=True)
    with torch.no_grad():
        assert rel(bundle.unet(*inputs), base) <= 1e-6  # starts as the identity update
        randomize(net, std=0.1)
        for a in net.adapters().values():
            a.dora_scale.mul_(1 + 0.1 * torch.randn_like(a.dora_scale))
        net.multiplier = strength
        live = bundle.unet(*inputs)
    sd = dict(weights0)
    for name, ref_mod in net.refs().items():
        a = net.adapters()[name]
        key = ref_mod.path + ".weight"
        assert a.dora_scale.shape == (1, sd[key].shape[1], *([1] * (sd[key].dim() - 2)))
        sd[key] = _comfy_dora(sd[key], a.lora_up.weight, a.lora_down.weight, a.alpha, a.dora_scale, strength)
    ref = build_model("tiny-sd15", seed=0)
    ref.unet.load_state_dict(sd)
    with torch.no_grad():
        want = ref.unet(*inputs)
        net.merge()
        merged = bundle.unet(*inputs)
        net.unmerge()
    assert rel(live, want) <= 1e-5
    assert rel(merged, want) <= 1e-5
    assert all(torch.equal(weights0[k], v) for k, v in bundle.unet.state_dict().items() if k in weights0)


def test_dropouts_act_only_in_training():
    bundle = build_model("tiny-sd15", seed=0)
    inputs = unet_inputs(bundle)
    net = models.inject_lora(bundle, unet="kohya", rank=4, dropout=0.3, rank_dropout=0.3, module_dropout=0.3)
    randomize(net)
    with torch.no_grad():
        bundle.unet.eval()
        net.eval()
        e1, e2 = bundle.unet(*inputs), bundle.unet(*inputs)
        bundle.unet.train()
        t1, t2 = bundle.unet(*inputs), bundle.unet(*inputs)
    assert torch.equal(e1, e2)
    assert rel(t1, t2) > 1e-4
    with pytest.raises(ValueError, match="rank_dropout"):
        models.inject_lora(bundle, unet="attn", rank=4, rank_dropout=1.0)
