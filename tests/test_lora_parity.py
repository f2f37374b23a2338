"""Exported LoRA files applied by the consumers' own rules reproduce the injected model.

- ComfyUI: W += strength * (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape), with
  its key map (kohya name = `lora_unet_` + ldm or diffusers module path with '_', `lora_te*_` + HF
  path). The diffusers spelling of our tiny UNets is taken from diffusers' own ldm converter
  (`convert_ldm_unet_checkpoint`), not from our name map.
- diffusers: `StableDiffusion(XL)Pipeline.lora_state_dict` + `load_lora_into_unet` /
  `load_lora_into_text_encoder` (what `load_lora_weights` runs) on a diffusers UNet and transformers
  text encoders holding the same base weights (UNet via `convert_ldm_unet_checkpoint`, CLIP by
  name: our CLIP keys are HF's).
"""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

import models
from reference_models import diffusers_unet, diffusers_unet_config, hf_text_encoder
from models.bundle import build_model


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def diffusers_names_of_ldm_keys(bundle) -> dict[str, str]:
    """ldm UNet key -> diffusers key, as diffusers' converter moves them (tensors tagged by value)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = list(bundle.unet.state_dict())
    tagged = {"model.diffusion_model." + k: torch.full(v.shape, float(i)) for i, (k, v) in
              enumerate(bundle.unet.state_dict().items())}
    converted = convert_ldm_unet_checkpoint(tagged, diffusers_unet_config(bundle.unet.config))
    return {keys[int(t.flatten()[0])]: d for d, t in converted.items()}


def trained(family, preset):
    bundle = build_model(family, seed=0)
    net = models.inject_lora(bundle, unet=preset, text_encoders="te", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for a in net.adapters().values():
            a.lora_down.weight.copy_(torch.randn(a.lora_down.weight.shape, generator=g) * 0.2)
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.2)
    return bundle, net


def inputs(bundle):
    g = torch.Generator().manual_seed(2)
    c = bundle.unet.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    t = torch.tensor([17.0, 640.0])
    ctx = torch.randn(2, 7, c.context_dim, generator=g)
    pooled = time_ids = None
    if c.adm_in_channels is not None:
        pooled = torch.randn(2, c.adm_in_channels - 6 * 256, generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 8.0, 0.0, 64.0, 64.0]])
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[0, 9:], ids[1, 14:] = 49406, 49407, 49407
    return x, t, ctx, pooled, time_ids, ids


def ours(bundle, x, t, ctx, pooled, time_ids, ids):
    y = None if pooled is None else bundle.sdxl_vector(pooled, time_ids)
    with torch.no_grad():
        return bundle.unet(x, t, ctx, y), [te(ids).last_hidden_state for te in bundle.text_encoders]


@pytest.mark.parametrize("family", ["tiny-sdxl", "tiny-sd15"])
def test_comfyui_formula_on_the_exported_file_reproduces_the_injected_model(family, tmp_path):
    bundle, net = trained(family, "locon")
    strength = 0.8
    net.multiplier = strength
    data = inputs(bundle)
    want_unet, want_te = ours(bundle, *data)
    path = tmp_path / "lora.safetensors"
    net.save(path, dtype=torch.float32)
    lora = safetensors.torch.load_file(path)

    base = build_model(family, seed=0)
    unet_sd = base.unet.state_dict()
    te_sds = [te.state_dict() for te in base.text_encoders]
    # ComfyUI's key map: ldm spelling, diffusers spelling (positions from diffusers' converter), CLIP by HF path
    key_map = {}
    for k in unet_sd:
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = (unet_sd, k)
    for k, d in diffusers_names_of_ldm_keys(base).items():
        if k.endswith(".weight"):
            key_map["lora_unet_" + d[: -len(".weight")].replace(".", "_")] = (unet_sd, k)
    prefixes = ["lora_te1_", "lora_te2_"] if len(te_sds) == 2 else ["lora_te_"]
    for prefix, sd in zip(prefixes, te_sds):
        for k in sd:
            if k.endswith(".weight"):
                key_map[prefix + k[: -len(".weight")].replace(".", "_")] = (sd, k)
    modules = {k.split(".")[0] for k in lora}
    assert modules and modules <= set(key_map), sorted(modules - set(key_map))[:5]  # ComfyUI would skip these
    for name in modules:
        sd, key = key_map[name]
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        alpha = lora[f"{name}.alpha"].item()
        w = sd[key]
        sd[key] = w + strength * (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    base.unet.load_state_dict(unet_sd)
    for te, sd in zip(base.text_encoders, te_sds):
        te.load_state_dict(sd)
    got_unet, got_te = ours(base, *data)
    assert rel(got_unet, want_unet) <= 1e-5
    for g, w in zip(got_te, want_te):
        assert rel(g, w) <= 1e-5
    # the LoRA is not a no-op
    net.remove()
    plain_unet, _ = ours(bundle, *data)
    assert rel(plain_unet, want_unet) > 1e-2


@pytest.mark.parametrize("family,preset", [("tiny-sdxl", "kohya"), ("tiny-sdxl", "locon"), ("tiny-sd15", "locon")])
def test_diffusers_lora_loader_reproduces_our_output(family, preset, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    bundle, net = trained(family, preset)
    du = diffusers_unet(bundle.unet)  # base weights, converted before the LoRA is applied
    tes = [hf_text_encoder(te) for te in bundle.text_encoders]
    data = inputs(bundle)
    x, t, ctx, pooled, time_ids, ids = data
    want_unet, want_te = ours(bundle, *data)

    path = tmp_path / "lora.safetensors"
    net.save(path, dtype=torch.float32)
    pipe = StableDiffusionXLPipeline if family == "tiny-sdxl" else StableDiffusionPipeline
    state, alphas = pipe.lora_state_dict(safetensors.torch.load_file(path), unet_config=du.config)
    pipe.load_lora_into_unet(state, alphas, du)
    for te, prefix in zip(tes, ["text_encoder", "text_encoder_2"]):
        pipe.load_lora_into_text_encoder(state, alphas, te, prefix=prefix)
    n_unet = sum(1 for r in net.refs().values() if r.component == "unet")
    assert sum(1 for n, _ in du.named_modules() if n.endswith(".lora_A.default_0")) == n_unet

    with torch.no_grad():
        kw = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        ref_unet = du(x, t, ctx, **kw).sample
        ref_te = [te(ids).last_hidden_state for te in tes]
    assert rel(want_unet, ref_unet) <= 1e-4
    for mine, ref in zip(want_te, ref_te):
        assert rel(mine, ref) <= 1e-4
