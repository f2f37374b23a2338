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


# ------------------------------------------------------------------------------------------------
# Rank dropout: exact mask arithmetic and unbiasedness
# ------------------------------------------------------------------------------------------------
def _adapted_layer(kind, rank=8, alpha=4.0, p=0.25, multiplier=0.7, seed=11):
    """A LoRALinear (6 -> 5) or LoRAConv2d (3 -> 5, 3x3) with one randomised adapter."""
    from models.lora.layers import LoRAAdapter

    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(6, 5) if kind == "linear" else torch.nn.Conv2d(3, 5, 3, padding=1)
    wrapper = (LoRALinear if kind == "linear" else LoRAConv2d)(base)
    adapter = LoRAAdapter(base, rank, alpha, rank_dropout=p)
    with torch.no_grad():
        adapter.lora_down.weight.copy_(torch.randn(adapter.lora_down.weight.shape, generator=g))
        adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g))
    adapter.multiplier = multiplier
    wrapper.lora_adapters["n"] = adapter
    return base, wrapper, adapter


def _inputs(kind, batch, seed=12):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 6) if kind == "linear" else (batch, 3, 4, 4)  # (B, T, in) tokens / (B, C, H, W) maps
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rank_dropout_is_the_seeded_mask_rescaled_by_one_over_keep(kind):
    p = 0.25
    base, wrapper, a = _adapted_layer(kind, p=p)
    x = _inputs(kind, batch=4)
    wrapper.train()
    torch.manual_seed(7)
    with torch.no_grad():
        got = wrapper(x) - base(x)
    # The mask the adapter draws: one keep/drop per (sample, rank channel), shared by every token or pixel.
    torch.manual_seed(7)
    keep = (torch.rand(x.shape[0], a.rank) >= p).float()
    keep = keep[:, None, :] if kind == "linear" else keep[:, :, None, None]
    assert 0 < keep.mean() < 1  # the seed drops some channels and keeps others
    with torch.no_grad():
        want = a.lora_up(keep * a.lora_down(x)) * (a.multiplier * a.scale / (1 - p))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rank_dropout_is_unbiased_over_many_masks(kind):
    """E[train output] = eval output. One input repeated n times gets n independent masks.

    Per output element y_j = c * sum_k U_jk h_k m_k with m_k ~ Bernoulli(q = 1 - p) and c the scale
    over q, so Var y_j = c^2 q (1 - q) sum_k (U_jk h_k)^2 and the batch mean has std sigma_j / sqrt(n).
    The seed is fixed, so the check is deterministic; 5 sigma per element leaves a Gaussian tail of
    ~6e-7 per element (a few hundred elements) were the seed changed. Without the 1/q rescale the
    mean is q times the eval output, dozens of sigmas away.
    """
    p, n = 0.25, 4096
    base, wrapper, a = _adapted_layer(kind, p=p)
    x1 = _inputs(kind, batch=1)
    x = x1.expand(n, *x1.shape[1:]).contiguous()
    torch.manual_seed(3)
    with torch.no_grad():
        wrapper.eval()
        want = wrapper(x[:1])[0] - base(x[:1])[0]
        wrapper.train()
        mean = (wrapper(x) - base(x)).mean(dim=0)
        h = a.lora_down(x[:1])[0]  # (T, r) or (r, H, W)
        up = a.lora_up.weight.flatten(1)  # (out, r)
        contrib = h[:, None, :] * up if kind == "linear" else up[:, :, None, None] * h[None]  # (.., out, r ..)
        q = 1 - p
        c = a.multiplier * a.scale / q
        var = c**2 * q * (1 - q) * contrib.square().sum(dim=-1 if kind == "linear" else 1)
    sigma_mean = var.sqrt() / n**0.5
    assert sigma_mean.shape == want.shape
    assert ((mean - want).abs() <= 5 * sigma_mean + 1e-5).all()
    assert ((want * p).abs() > 5 * sigma_mean).float().mean() > 0.5  # the test can see a missing rescale


# ------------------------------------------------------------------------------------------------
# Merge -> unmerge without a backup copy, at strengths other than 1
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strength", [0.5, -1.0])
def test_merge_unmerge_round_trip_without_backup(strength, dtype):
    """Linear (attention, 1x1 proj) and 3x3-conv (LoCon) adapters, merged with keep_original=False.

    unmerge recomputes W'' = round(W' - m * delta) from the merged W' = round(W + m * delta), all in
    float32 then rounded to the weight dtype: each of the two roundings is at most half an ulp of its
    result, so |W'' - W| <= u * (|W'| + |W|) + (float32 slack), u = 2^-8 for bf16 (8 mantissa bits,
    one ulp at most 2^-7 relative, half of it per rounding, two roundings), 2^-23 for fp32. W is
    already bf16 for a bf16 model, so the bf16 rounding of the original is the model's own weight.
    """
    bundle = build_model("tiny-sd15", seed=0, dtype=dtype)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    net = models.inject_lora(bundle, unet="locon", rank=4, alpha=2, conv_rank=2, conv_alpha=3)
    randomize(net, std=0.3)
    net.multiplier = strength
    assert any(isinstance(w, LoRAConv2d) and w.kernel_size == (3, 3) for w in net._wrappers.values())
    assert any(isinstance(w, LoRALinear) for w in net._wrappers.values())
    net.merge(keep_original=False)
    assert all(a._merge_backup is None for a in net.adapters().values())
    merged = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    net.unmerge()
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
    checked = 0
    for name, ref in net.refs().items():
        key = ref.path + ".weight"
        w0, w1, w2 = before[key].float(), merged[key].float(), bundle.unet.state_dict()[key].float()
        assert (w1 - w0).abs().max() > 1e-2  # the merge changed the weight noticeably
        bound = u * (w1.abs() + w0.abs()) + 1e-7
        assert ((w2 - w0).abs() <= bound).all(), (name, (w2 - w0).abs().max().item())
        checked += 1
    assert checked == len(net.adapters())


@pytest.mark.parametrize("strength", [0.5, -1.0])
def test_dora_merge_unmerge_round_trip(strength):
    """DoRA's merge is not invertible from W' alone (the column norm of W + s*up@down is lost): the
    default keeps a backup and restores bit-exactly; keep_original=False refuses to unmerge rather
    than silently corrupt the weights."""
    bundle = build_model("tiny-sd15", seed=0)
    inputs = unet_inputs(bundle)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    net = models.inject_lora(bundle, unet="locon", rank=4, alpha=2, conv_rank=2, dora=True)
    randomize(net, std=0.2)
    net.multiplier = strength
    with torch.no_grad():
        live = bundle.unet(*inputs)
        net.merge()
        merged = bundle.unet(*inputs)
    net.unmerge()
    assert rel(merged, live) <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in bundle.unet.state_dict().items())
    net.merge(keep_original=False)
    merged_weights = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    with pytest.raises(RuntimeError, match="keep_original=False"):
        net.unmerge()
    assert all(torch.equal(merged_weights[k], v) for k, v in bundle.unet.state_dict().items())
    net.remove(keep_merged=True)


def test_merge_refuses_weights_that_overflow_the_base_dtype():
    """Finite in float32 but beyond fp16's 65504: the merge check runs in the weight's dtype."""
    bundle = build_model("tiny-sd15", seed=0, dtype=torch.float16)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    net = models.inject_lora(bundle, unet="attn", rank=4)
    name = max(net.adapters())
    a = net.adapters()[name]
    with torch.no_grad():
        a.lora_down.weight.fill_(10.0)
        a.lora_up.weight.fill_(10.0)
        a.lora_up.weight[0] = 1e4  # row 0 of the update: 4 * 10 * 1e4 = 4e5, above fp16's max
    assert torch.isfinite(a.adapted_weight(net._wrappers[name].weight)).all()
    with pytest.raises(ValueError, match=name):
        net.merge()
    assert not any(a.merged for a in net.adapters().values())
    assert all(torch.equal(before[k], v) for k, v in bundle.unet.state_dict().items())


@pytest.mark.parametrize("algo,side", [("lora", 16), ("loha", 16), ("lokr", 16), ("lora", 8)])
def test_adapters_at_strength_zero_leave_the_unet_bit_identical(algo, side):
    """Every wrapped layer (the upsampling convs' fused path included) computes the base output as
    the unwrapped model does, so a LoCon-preset adapter at multiplier 0 changes no bit, at the
    toy model's 16x16 latents and at 8x8."""
    import models

    torch.manual_seed(0)
    bundle = models.build_model("toy-sdxl", seed=0)  # the shipped toy model's shapes: 16x16 latents
    x, t = torch.randn(2, 4, side, side), torch.tensor([900, 10])
    ctx, y = torch.randn(2, 77, 96), torch.randn(2, 1600)
    with torch.no_grad():
        base = bundle.unet(x, t, ctx, y)
        net = models.inject_lora(bundle, options=models.LoRAOptions(preset="locon", algo=algo, rank=4))
        for p in net.parameters():
            p.normal_()  # non-zero updates everywhere
        net.multiplier = 0.0
        assert torch.equal(bundle.unet(x, t, ctx, y), base)
        net.multiplier = 1.0
        assert not torch.equal(bundle.unet(x, t, ctx, y), base)
