"""LoRA on the Flux.1 family: target presets, kohya/BFL export names, and the exported file applied
by ComfyUI's own rules reproducing the injected model (tiny-flux, fp32, CPU).

ComfyUI's rules are written out below, not taken from our name tables: `model_lora_keys_unet` for
Flux (`lora_unet_` + BFL weight path with '_', `diffusion_model.` + BFL path, and `transformer.` +
diffusers path mapped onto row slices of the fused BFL weights by `flux_to_diffusers`, the final
adaLN through `swap_scale_shift`), `model_lora_keys_clip` (`lora_te1_` + HF CLIP-L path, `lora_te3_`
+ T5 path) and the LoRA patch W += strength * (alpha / rank) * (up.flatten(1) @ down.flatten(1)).
"""
from __future__ import annotations

import re

import pytest
import safetensors.torch
import torch
from torch import nn

import models
from models.bundle import build_model
from models.lora.files import build_metadata
from test_flux_parity import make_inputs

STRENGTH = 0.8


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def randomise_adapters(net, seed=11, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def trained(unet="attn-mlp-mod", text_encoders="te", **kw):
    bundle = build_model("tiny-flux", seed=0)
    kw = {"rank": 4, "alpha": 2.0, **kw}
    net = models.inject_lora(bundle, unet=unet, text_encoders=text_encoders, **kw)
    randomise_adapters(net)
    return bundle, net


def text_inputs():
    g = torch.Generator().manual_seed(3)
    clip_ids = torch.randint(0, 49406, (2, 77), generator=g)
    clip_ids[:, 0], clip_ids[0, 9:], clip_ids[1, 14:] = 49406, 49407, 49407
    return clip_ids, torch.randint(3, 200, (2, 12), generator=g)


def outputs(bundle):
    """Transformer, CLIP-L and T5 outputs on fixed inputs."""
    clip_ids, t5_ids = text_inputs()
    clip, t5 = bundle.text_encoders
    with torch.no_grad():
        return (bundle.unet(*make_inputs(bundle.unet.config, 2, 4, 6, 5, seed=1)),
                clip(clip_ids).last_hidden_state, t5(t5_ids))


# ------------------------------------------------------------------------------------------------
# ComfyUI's key map and patch for Flux, written out
# ------------------------------------------------------------------------------------------------
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def flux_to_diffusers(cfg) -> dict[str, tuple[str, int | None, int | None, bool]]:
    """comfy.utils.flux_to_diffusers for weights: diffusers module -> (BFL weight, row offset, rows, swap halves)."""
    h = cfg.hidden_size
    out = {}
    for i in range(cfg.depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, n in enumerate(("to_q", "to_k", "to_v")):
            out[f"{d}.attn.{n}"] = (f"{b}.img_attn.qkv.weight", j * h, h, False)
        for j, n in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{d}.attn.{n}"] = (f"{b}.txt_attn.qkv.weight", j * h, h, False)
        for theirs, ours in {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                             "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                             "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                             "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}.items():
            out[f"{d}.{theirs}"] = (f"{b}.{ours}.weight", None, None, False)
    for i in range(cfg.depth_single_blocks):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, n in enumerate(("to_q", "to_k", "to_v")):
            out[f"{d}.attn.{n}"] = (f"{b}.linear1.weight", j * h, h, False)
        out[f"{d}.proj_mlp"] = (f"{b}.linear1.weight", 3 * h, 4 * h, False)
        out[f"{d}.norm.linear"] = (f"{b}.modulation.lin.weight", None, None, False)
        out[f"{d}.proj_out"] = (f"{b}.linear2.weight", None, None, False)
    basic = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    for theirs, ours in basic.items():
        out[theirs] = (f"{ours}.weight", None, None, False)
    out["norm_out.linear"] = ("final_layer.adaLN_modulation.1.weight", None, None, True)
    return out


def comfy_key_map(bundle) -> dict[str, tuple[str, str, int | None, int | None, bool]]:
    """LoRA module name -> (part, weight key, row offset, rows, swap halves), as ComfyUI builds it for Flux."""
    key_map = {}
    for k in bundle.unet.state_dict():
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = ("unet", k, None, None, False)
            key_map["diffusion_model." + k[: -len(".weight")]] = ("unet", k, None, None, False)
    for theirs, target in flux_to_diffusers(bundle.unet.config).items():
        key_map["transformer." + theirs] = ("unet", *target)
    clip, t5 = bundle.text_encoders
    for b in range(32):
        for c, spelt in LORA_CLIP_MAP.items():
            k = f"text_model.encoder.layers.{b}.{c}.weight"
            if k in clip.state_dict():
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{spelt}"] = ("te1", k, None, None, False)
    for k in t5.state_dict():
        if k.endswith(".weight"):
            key_map["lora_te3_" + k[: -len(".weight")].replace(".", "_")] = ("te3", k, None, None, False)
    return key_map


def comfy_apply(bundle, lora: dict[str, torch.Tensor], strength: float) -> dict[str, dict[str, torch.Tensor]]:
    """Base state dicts of each part patched by ComfyUI's formula; every file key must be used."""
    parts = {"unet": bundle.unet, "te1": bundle.text_encoders[0], "te3": bundle.text_encoders[1]}
    states = {p: {k: v.detach().clone() for k, v in m.state_dict().items()} for p, m in parts.items()}
    used = set()
    for name, (part, key, offset, rows, swap) in comfy_key_map(bundle).items():
        for up_key, down_key in ((f"{name}.lora_up.weight", f"{name}.lora_down.weight"),
                                 (f"{name}.lora_B.weight", f"{name}.lora_A.weight")):
            if up_key in lora:
                break
        else:
            continue
        up, down = lora[up_key].float(), lora[down_key].float()
        alpha = lora.get(f"{name}.alpha")
        scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
        diff = up.flatten(1) @ down.flatten(1)
        if swap:
            shift, sc = diff.chunk(2, dim=0)
            diff = torch.cat([sc, shift], dim=0)
        weight = states[part][key]
        target = weight if offset is None else weight.narrow(0, offset, rows)
        target += strength * scale * diff.reshape(target.shape)
        used |= {up_key, down_key, f"{name}.alpha"}
    assert set(lora) <= used, sorted(set(lora) - used)[:5]
    return states


def patched_outputs(lora, strength):
    fresh = build_model("tiny-flux", seed=0)
    for part, state in comfy_apply(fresh, lora, strength).items():
        module = fresh.unet if part == "unet" else fresh.text_encoders[0 if part == "te1" else 1]
        module.load_state_dict(state)
    return outputs(fresh)


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------
def kohya_flux_default(transformer) -> set[str]:
    """kohya sd-scripts' Flux targets: every Linear inside a DoubleStreamBlock or SingleStreamBlock."""
    out = set()
    for name, module in transformer.named_modules():
        if type(module).__name__ in ("DoubleStreamBlock", "SingleStreamBlock"):
            out |= {f"{name}.{c}" for c, m in module.named_modules() if isinstance(m, nn.Linear)}
    return out


def kohya_text_targets(encoder, classes) -> set[str]:
    out = set()
    for name, module in encoder.named_modules():
        if type(module).__name__ in classes:
            out |= {f"{name}.{c}" for c, m in module.named_modules() if isinstance(m, nn.Linear)}
    return out


def adapted(net, component="unet") -> set[str]:
    return {r.path for r in net.refs().values() if r.component == component}


def test_presets_select_the_documented_layers():
    bundle = build_model("tiny-flux", seed=0)
    t = bundle.unet
    kohya = kohya_flux_default(t)
    assert len(kohya) == t.config.depth * 10 + t.config.depth_single_blocks * 3
    clip, t5 = bundle.text_encoders
    clip_targets = kohya_text_targets(clip, ("CLIPAttention", "CLIPMLP"))
    t5_targets = kohya_text_targets(t5, ("T5Attention", "T5DenseGatedActDense"))
    assert {p.rsplit(".", 1)[-1] for p in t5_targets} == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    expected = {
        "attn": {p for p in kohya if re.search(r"_attn\.(qkv|proj)$|linear[12]$", p)},
        "attn-mlp": {p for p in kohya if not re.search(r"mod(ulation)?\.lin$", p)},
        "attn-mlp-mod": kohya,
    }
    for preset, want in expected.items():
        net = models.inject_lora(bundle, unet=preset, text_encoders="te", rank=2)
        assert adapted(net) == want, preset
        assert adapted(net, "te1") == clip_targets and adapted(net, "te3") == t5_targets
        net.remove()
    assert len(expected["attn"]) < len(expected["attn-mlp"]) < len(kohya)


def test_regex_targets_include_and_exclude_work_on_bfl_paths():
    bundle = build_model("tiny-flux", seed=0)
    net = models.inject_lora(bundle, unet=[r"img_attn\.qkv$", r"^final_layer\.adaLN_modulation\.1$"],
                             exclude=[r"^unet\.double_blocks\.1\."], rank=2)
    assert adapted(net) == {"double_blocks.0.img_attn.qkv", "final_layer.adaLN_modulation.1"}
    net.remove()
    net = models.inject_lora(bundle, unet="attn-mlp-mod", include=[r"^unet\.single_blocks\.1\."], rank=2)
    assert adapted(net) == {"single_blocks.1.linear1", "single_blocks.1.linear2", "single_blocks.1.modulation.lin"}
    net.remove()
    # a text-encoder regex may name layers of one encoder only, and a filter may drop a whole part:
    # T5 attention alone, or kohya's Flux default of CLIP-L without T5
    net = models.inject_lora(bundle, unet=None, text_encoders=[r"SelfAttention\.q$"], rank=2)
    assert adapted(net, "te3") == {f"encoder.block.{i}.layer.0.SelfAttention.q" for i in range(3)}
    assert adapted(net, "te1") == set() and adapted(net) == set()
    net.remove()
    net = models.inject_lora(bundle, unet="attn", text_encoders="te", exclude=[r"^te3\."], rank=2)
    assert adapted(net, "te3") == set() and len(adapted(net, "te1")) == 18 and adapted(net)
    net.remove()
    with pytest.raises(ValueError, match=r"regex\(es\) \['no_such_layer'\] matched no Linear/Conv2d module in th"):
        models.inject_lora(bundle, unet=None, text_encoders=["no_such_layer"], rank=2)
    with pytest.raises(ValueError, match=r"left no module of unet, te1, te3 \(\d+ selected before filtering\)"):
        models.inject_lora(bundle, unet="attn", text_encoders="te", include=["nothing"], rank=2)


@pytest.mark.parametrize("family, preset, words", [
    ("tiny-flux", "kohya", "Flux transformer of tiny-flux has no UNet blocks; its presets are attn, attn-mlp, "
                           "attn-mlp-mod"),
    ("tiny-flux", "locon", "no UNet blocks"),
    ("tiny-sdxl", "attn-mlp", "selects Flux transformer layers, not UNet ones; the presets of tiny-sdxl are attn, "
                              "kohya, locon"),
    ("tiny-sdxl", "attn-mlp-mod", "selects Flux transformer layers"),
])
def test_a_preset_of_the_other_denoiser_is_one_clear_error(family, preset, words):
    bundle = build_model(family, device="meta")
    with pytest.raises(ValueError) as err:
        models.inject_lora(bundle, unet=preset)
    msg = str(err.value)
    assert words in msg and "\n" not in msg and f"LoRA preset {preset!r} does not apply to {family}" in msg


def test_block_ranks_are_refused_on_flux():
    bundle = build_model("tiny-flux", device="meta")
    with pytest.raises(ValueError, match=r"^block_ranks: per-block ranks follow the UNet's IN/MID/OUT blocks"):
        models.inject_lora(bundle, unet="attn", block_ranks=[4])


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def test_exported_keys_map_one_to_one_onto_bfl_modules(tmp_path):
    bundle, net = trained()
    path = tmp_path / "flux.safetensors"
    meta = net.save(path, dtype=torch.float32)
    lora = safetensors.torch.load_file(path)
    key_map = comfy_key_map(bundle)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    # one module per adapted layer, named lora_unet_ / lora_te1_ / lora_te3_ + path with '_'
    prefix = {"unet": "lora_unet_", "te1": "lora_te1_", "te3": "lora_te3_"}
    assert modules == {prefix[r.component] + r.path.replace(".", "_") for r in net.refs().values()}
    assert len(modules) == len(net.refs())
    weights = {}
    for m in modules:
        suffixes = {k[len(m) + 1:] for k in lora if k.startswith(m + ".")}
        assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
        part, key, offset, _, _ = key_map[m]  # ComfyUI finds every module ...
        assert offset is None
        weights.setdefault((part, key), []).append(m)  # ... each on its own weight
        module = {"unet": bundle.unet, "te1": bundle.text_encoders[0], "te3": bundle.text_encoders[1]}[part]
        shape = module.state_dict()[key].shape
        assert (lora[f"{m}.lora_up.weight"] @ lora[f"{m}.lora_down.weight"]).shape == shape
    assert all(len(v) == 1 for v in weights.values())
    assert "lora_unet_double_blocks_0_img_attn_qkv" in modules and "lora_unet_single_blocks_1_linear1" in modules
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0" in modules
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["ss_network_module"] == "networks.lora_flux"
    schnell = models.inject_lora(build_model("flux-schnell", device="meta"), unet="attn", rank=2)
    assert build_metadata(schnell)["modelspec.architecture"] == "flux-1-schnell/lora"
    assert len(models.inject_lora(build_model("flux-dev", device="meta"), unet="attn-mlp-mod").refs()) == 19 * 10 + 38 * 3


def test_comfyui_formula_on_the_kohya_file_reproduces_the_injected_model(tmp_path):
    # every Linear of the transformer (in and out of the blocks), CLIP-L and T5 attention + MLP
    bundle, net = trained(unet=["."])
    assert len(adapted(net)) == len(bundle.unet.state_dict()) - len(
        [k for k in bundle.unet.state_dict() if not k.endswith(".weight") or "norm" in k])
    net.multiplier = STRENGTH
    want = outputs(bundle)
    net.save(tmp_path / "k.safetensors", dtype=torch.float32)
    got = patched_outputs(safetensors.torch.load_file(tmp_path / "k.safetensors"), STRENGTH)
    base = outputs(build_model("tiny-flux", seed=0))
    for name, g, w, b in zip(("transformer", "clip-l", "t5"), got, want, base):
        assert rel(b, w) > 1e-2, name  # the LoRA changes every part
        assert rel(g, w) <= 1e-5, name


def test_comfyui_formula_on_the_diffusers_names_reproduces_the_injected_model(tmp_path):
    """format="peft" writes `transformer.` + diffusers names, fused layers split into their pieces;
    ComfyUI maps those onto row slices (and the swapped adaLN halves) of the BFL weights."""
    bundle, net = trained(unet=["."], text_encoders=None)
    net.multiplier = STRENGTH
    want = outputs(bundle)[0]
    net.save(tmp_path / "p.safetensors", dtype=torch.float32, format="peft")
    lora = safetensors.torch.load_file(tmp_path / "p.safetensors")
    assert "transformer.transformer_blocks.0.attn.to_k.lora_B.weight" in lora
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight" in lora
    assert "transformer.norm_out.linear.lora_B.weight" in lora
    assert not any(k.endswith(".alpha") or "qkv" in k or "linear1" in k for k in lora)
    assert rel(patched_outputs(lora, STRENGTH)[0], want) <= 1e-5


def test_import_of_our_kohya_file_and_comfyui_spellings_reproduces_the_model(tmp_path):
    bundle, net = trained(unet="attn-mlp-mod")
    net.multiplier = STRENGTH
    want = outputs(bundle)
    net.save(tmp_path / "k.safetensors", dtype=torch.float32)
    lora = safetensors.torch.load_file(tmp_path / "k.safetensors")
    # ComfyUI's generic spelling of the transformer (diffusion_model. + BFL path), OneTrainer's lora_te2_ for T5
    respelt = {}
    for k, v in lora.items():
        if k.startswith("lora_unet_"):
            module, suffix = k.split(".", 1)
            ref = next(r for r in net.refs().values() if r.kohya == module)
            k = f"diffusion_model.{ref.path}.{suffix}"
        respelt[k.replace("lora_te3_", "lora_te2_")] = v
    for tensors in (lora, respelt):
        fresh = build_model("tiny-flux", seed=0)
        loaded = models.load_lora(fresh, _write(tmp_path / "x.safetensors", tensors), strength=STRENGTH)
        assert set(loaded.adapters()) == set(net.adapters())
        for g, w in zip(outputs(fresh), want):
            assert rel(g, w) <= 1e-6


def _write(path, tensors):
    safetensors.torch.save_file(tensors, str(path))
    return path
