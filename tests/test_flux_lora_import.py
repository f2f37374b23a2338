"""Flux LoRA files from other trainers import exactly (tiny-flux, fp32, CPU), LoHa / LoKr train, merge
and export on the transformer, and files that cannot be used are refused in one line.

- diffusers / PEFT / ai-toolkit layout (`transformer.<diffusers path>.lora_A/lora_B.weight`), with
  LoRAs on the pieces of our fused layers (to_q | to_k | to_v, + proj_mlp in single blocks, the
  swapped halves of norm_out.linear): checked against diffusers' own `FluxPipeline.lora_state_dict` +
  `load_lora_into_transformer` (peft) on a `FluxTransformer2DModel` holding our weights through
  `flux_state_dict_to_diffusers`, and against ComfyUI's formula (`test_flux_lora.comfy_apply`) when
  pieces carry different ranks and alphas;
- kohya `split_qkv` files (block-diagonal up on the fused layer) equal the same pieces.
"""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

import models
from models.bundle import build_model
from models.checkpoints.flux_keys import flux_state_dict_to_diffusers
from models.lora.files import LoRAFileError, guess_family, network_from_tensors, parse_lora_tensors
from test_flux_lora import STRENGTH, comfy_apply, outputs, randomise_adapters, rel
from test_flux_parity import diffusers_kwargs, make_inputs, run_ref


def diffusers_pair(seed=0):
    from diffusers import FluxTransformer2DModel

    bundle = build_model("tiny-flux", seed=seed)
    cfg = bundle.unet.config
    ref = FluxTransformer2DModel(**diffusers_kwargs(cfg)).eval()
    ref.load_state_dict(flux_state_dict_to_diffusers(bundle.unet.state_dict(), cfg), strict=True)
    return bundle, ref


def peft_lora(ref, ranks=(2, 3, 4), alphas=None, seed=5, only=None) -> dict[str, torch.Tensor]:
    """A LoRA on diffusers Linear modules of `ref` as diffusers / ai-toolkit save it: random A/B,
    ranks cycling through `ranks`, `.alpha` entries cycling through `alphas` when given."""
    g = torch.Generator().manual_seed(seed)
    out, i = {}, 0
    for name, m in ref.named_modules():
        if not isinstance(m, torch.nn.Linear) or (only is not None and not any(o in name for o in only)):
            continue
        r = ranks[i % len(ranks)]
        out[f"transformer.{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * 0.3
        out[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * 0.3
        if alphas:
            out[f"transformer.{name}.alpha"] = torch.tensor(float(alphas[i % len(alphas)]))
        i += 1
    return out


def transformer_out(bundle):
    with torch.no_grad():
        return bundle.unet(*make_inputs(bundle.unet.config, 2, 4, 6, 5, seed=1))


def diffusers_out(ref, cfg):
    with torch.no_grad():
        return run_ref(ref, *make_inputs(cfg, 2, 4, 6, 5, seed=1))


def test_diffusers_layout_lora_imports_as_diffusers_applies_it(tmp_path):
    from diffusers import FluxPipeline

    bundle, ref = diffusers_pair()
    lora = peft_lora(ref)  # every Linear of the transformer, ranks 2/3/4 mixed within fused layers
    assert "transformer.norm_out.linear.lora_A.weight" in lora
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in lora
    safetensors.torch.save_file(lora, str(tmp_path / "pytorch_lora_weights.safetensors"))
    state, alphas = FluxPipeline.lora_state_dict(str(tmp_path / "pytorch_lora_weights.safetensors"), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, alphas, ref, adapter_name="oracle")
    want = diffusers_out(ref, bundle.unet.config)
    base = transformer_out(bundle)
    net = models.load_lora(bundle, tmp_path)  # a diffusers folder: its pytorch_lora_weights.safetensors
    got = transformer_out(bundle)
    assert rel(base, want) > 0.1
    assert rel(got, want) <= 1e-5
    # fused layers got one adapter each, of the summed rank
    qkv = net.adapters()["lora_unet_double_blocks_0_img_attn_qkv"]
    assert qkv.rank == sum(lora[f"transformer.transformer_blocks.0.attn.{n}.lora_A.weight"].shape[0]
                           for n in ("to_q", "to_k", "to_v"))
    assert len(net.adapters()) == len(list(n for n, m in bundle.unet.named_modules() if n and "lora" not in n
                                            and type(m).__name__ == "LoRALinear"))


def test_our_diffusers_layout_export_loads_in_diffusers(tmp_path):
    from diffusers import FluxPipeline

    bundle, ref = diffusers_pair()
    net = models.inject_lora(bundle, unet=["."], rank=3, alpha=1.5)
    randomise_adapters(net)
    want = transformer_out(bundle)
    net.save(tmp_path / "p.safetensors", dtype=torch.float32, format="peft")
    state, alphas = FluxPipeline.lora_state_dict(str(tmp_path / "p.safetensors"), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, alphas, ref, adapter_name="ours")
    assert rel(diffusers_out(ref, bundle.unet.config), want) <= 1e-5


def test_pieces_with_different_ranks_and_alphas_fuse_exactly_by_comfyuis_formula(tmp_path):
    bundle, ref = diffusers_pair()
    # only some pieces (no to_v, no add_k_proj): the rows of the missing ones stay untouched
    lora = peft_lora(ref, ranks=(1, 2, 5), alphas=(0.5, 3.0, 4.0, 7.0),
                     only=("to_q", "to_k", "add_q_proj", "add_v_proj", "proj_mlp", "norm_out", "ff.net.2"))
    assert not any(".to_v." in k or "add_k_proj" in k for k in lora)
    fresh = build_model("tiny-flux", seed=0)
    fresh.unet.load_state_dict(comfy_apply(fresh, lora, STRENGTH)["unet"])
    want = outputs(fresh)[0]
    net = network_from_tensors(bundle, lora, strength=STRENGTH)
    assert rel(outputs(bundle)[0], want) <= 1e-5
    # a single-block linear1 with q, k and proj_mlp pieces: rows of v are exactly zero in the update
    a = net.adapters()["lora_unet_single_blocks_0_linear1"]
    h = bundle.unet.config.hidden_size
    delta = a.delta_weight()
    assert torch.count_nonzero(delta[2 * h:3 * h]) == 0 and torch.count_nonzero(delta[3 * h:]) > 0
    # merge and re-export in kohya names: ComfyUI's formula on that file gives the same model again
    net.save(tmp_path / "k.safetensors", dtype=torch.float32)
    again = safetensors.torch.load_file(tmp_path / "k.safetensors")
    fresh = build_model("tiny-flux", seed=0)
    fresh.unet.load_state_dict(comfy_apply(fresh, again, STRENGTH)["unet"])
    assert rel(outputs(fresh)[0], want) <= 1e-5


def test_kohya_split_qkv_file_equals_its_pieces():
    """kohya's split_qkv saves q/k/v LoRAs as one fused module (downs stacked, ups block-diagonal)."""
    bundle = build_model("tiny-flux", seed=0)
    h = bundle.unet.config.hidden_size
    g = torch.Generator().manual_seed(1)
    downs = [torch.randn(3, h, generator=g) for _ in range(3)]
    ups = [torch.randn(h, 3, generator=g) for _ in range(3)]
    fused_up = torch.block_diag(*ups)
    kohya = {"lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": torch.cat(downs),
             "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": fused_up,
             "lora_unet_double_blocks_1_img_attn_qkv.alpha": torch.tensor(4.5)}  # alpha / 9
    pieces = {}
    for n, d, u in zip(("to_q", "to_k", "to_v"), downs, ups):
        pieces[f"transformer.transformer_blocks.1.attn.{n}.lora_A.weight"] = d
        pieces[f"transformer.transformer_blocks.1.attn.{n}.lora_B.weight"] = u
        pieces[f"transformer.transformer_blocks.1.attn.{n}.alpha"] = torch.tensor(1.5)  # same scale: 1.5 / 3
    results = []
    for tensors in (kohya, pieces):
        net = network_from_tensors(bundle, tensors)
        results.append(transformer_out(bundle))
        net.remove()
    assert rel(results[0], results[1]) <= 1e-6
    assert rel(results[0], transformer_out(bundle)) > 1e-3


def test_underscored_diffusers_names_of_onetrainer_and_simpletuner_import():
    bundle, ref = diffusers_pair()
    lora = peft_lora(ref, only=("transformer_blocks.0.", "x_embedder"))
    want_net = network_from_tensors(bundle, lora)
    want = transformer_out(bundle)
    want_net.remove()
    for prefix in ("lora_transformer_", "lycoris_"):
        respelt = {}
        for k, v in lora.items():
            module, suffix = k.removeprefix("transformer.").split(".lora_")
            respelt[prefix + module.replace(".", "_") + ".lora_" + suffix] = v
        net = network_from_tensors(bundle, respelt)
        assert rel(transformer_out(bundle), want) <= 1e-6, prefix
        net.remove()


# ------------------------------------------------------------------------------------------------
# LoHa / LoKr on the transformer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo, extra", [("loha", {}), ("lokr", {"factor": 4})])
def test_loha_and_lokr_train_merge_and_export(algo, extra, tmp_path):
    bundle = build_model("tiny-flux", seed=0)
    net = models.inject_lora(bundle, unet="attn-mlp", text_encoders="te", algo=algo, rank=4, alpha=2.0, **extra)
    inputs = make_inputs(bundle.unet.config, 2, 4, 6, 5, seed=1)
    target = torch.randn_like(bundle.unet(*inputs))
    opt = torch.optim.AdamW(net.param_groups(unet_lr=1e-2), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(bundle.unet(*inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    net.multiplier = STRENGTH
    want = outputs(bundle)
    net.save(tmp_path / "l.safetensors", dtype=torch.float32)
    keys = safetensors.torch.load_file(tmp_path / "l.safetensors")
    first = "hada_w1_a" if algo == "loha" else "lokr_w1"
    assert f"lora_unet_double_blocks_0_img_attn_qkv.{first}" in keys
    assert f"lora_unet_single_blocks_1_linear1.{first}" in keys
    assert f"lora_te3_encoder_block_2_layer_1_DenseReluDense_wo.{first}" in keys
    net.merge()
    for g, w in zip(outputs(bundle), want):
        assert rel(g, w) <= 1e-5
    net.remove()
    fresh = build_model("tiny-flux", seed=0)
    loaded = models.load_lora(fresh, tmp_path / "l.safetensors", strength=STRENGTH)
    assert {a.algo for a in loaded.adapters().values()} == {algo}
    for g, w in zip(outputs(fresh), want):
        assert rel(g, w) <= 1e-6


def test_lycoris_file_on_whole_diffusers_modules_imports(tmp_path):
    bundle = build_model("tiny-flux", seed=0)
    net = models.inject_lora(bundle, unet=[r"img_mlp\.0$", r"^txt_in$"], algo="loha", rank=2)
    randomise_adapters(net)
    want = transformer_out(bundle)
    tensors = net.state_dict_for_export(dtype=None)
    net.remove()
    to_diffusers = {"lora_unet_double_blocks_0_img_mlp_0": "lycoris_transformer_blocks_0_ff_net_0_proj",
                    "lora_unet_double_blocks_1_img_mlp_0": "lycoris_transformer_blocks_1_ff_net_0_proj",
                    "lora_unet_txt_in": "lycoris_context_embedder"}
    respelt = {to_diffusers[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in tensors.items()}
    network_from_tensors(bundle, respelt)
    assert rel(transformer_out(bundle), want) <= 1e-6


# ------------------------------------------------------------------------------------------------
# refusals and family detection
# ------------------------------------------------------------------------------------------------
def _one_error(bundle, tensors, *words):
    with pytest.raises(LoRAFileError) as err:
        network_from_tensors(bundle, tensors)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_updates_a_fused_layer_cannot_hold_exactly_are_refused():
    bundle, ref = diffusers_pair()
    h = bundle.unet.config.hidden_size
    g = torch.Generator().manual_seed(0)
    loha = {f"transformer.transformer_blocks.0.attn.to_q.{n}": torch.randn(*s, generator=g)
            for n, s in (("hada_w1_a", (h, 2)), ("hada_w1_b", (2, h)), ("hada_w2_a", (h, 2)), ("hada_w2_b", (2, h)))}
    _one_error(bundle, loha, "transformer.transformer_blocks.0.attn.to_q", "loha on the diffusers piece",
               "fused double_blocks.0.img_attn.qkv", "only plain LoRA pieces combine exactly")
    dora = peft_lora(ref, only=("single_transformer_blocks.0.attn.to_k",))
    dora["transformer.single_transformer_blocks.0.attn.to_k.dora_scale"] = torch.ones(1, h)
    _one_error(bundle, dora, "lora+dora on the diffusers piece", "fused single_blocks.0.linear1")
    assert not any(type(m).__name__ == "LoRALinear" for m in bundle.unet.modules())


def test_unknown_misfit_and_doubly_named_modules_are_one_line_each():
    bundle, ref = diffusers_pair()
    h = bundle.unet.config.hidden_size
    lora = peft_lora(ref, only=("transformer_blocks.0.attn.to_q", "x_embedder"))
    _one_error(bundle, {**lora, "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(2, h),
                        "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.zeros(3 * h, 2)},
               "lora_unet_double_blocks_7_img_attn_qkv (no such module)", "do not match the tiny-flux model")
    bad = dict(lora)
    bad["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.zeros(h + 1, 2)
    _one_error(bundle, bad, "the piece of double_blocks.0.img_attn.qkv needs down [r, 64] and up [64, r]")
    both = {**lora, **{k.replace("transformer.x_embedder", "diffusion_model.img_in"): v for k, v in lora.items()
                       if "x_embedder" in k}}
    _one_error(bundle, both, "names img_in like")
    whole_and_piece = {**lora, "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, h),
                       "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * h, 2)}
    _one_error(bundle, whole_and_piece, "pieces of double_blocks.0.img_attn.qkv, which "
               "lora_unet_double_blocks_0_img_attn_qkv names whole")
    underscored = "lycoris_transformer_blocks_0_attn_to_q"
    twice = {**lora, **{k.replace("transformer.transformer_blocks.0.attn.to_q", underscored)
                        .replace("lora_A.weight", "lora_down.weight").replace("lora_B.weight", "lora_up.weight"): v
                        for k, v in lora.items() if "to_q" in k}}
    _one_error(bundle, twice, "names the diffusers module transformer_blocks.0.attn.to_q like")


def test_flux_files_are_recognised_and_refused_on_other_families(tmp_path):
    bundle, ref = diffusers_pair()
    peft = peft_lora(ref, only=("single_transformer_blocks.1",))
    net = models.inject_lora(bundle, unet="attn", text_encoders="te", rank=2)
    kohya = {k: v for k, v in net.state_dict_for_export(dtype=None).items()}
    net.remove()
    t5_only = {k: v for k, v in kohya.items() if k.startswith("lora_te3_")}
    onetrainer_t5 = {k.replace("lora_te3_", "lora_te2_"): v for k, v in t5_only.items()}
    comfy = {"diffusion_model.img_in.lora_A.weight": torch.zeros(2, 64),
             "diffusion_model.img_in.lora_B.weight": torch.zeros(64, 2)}
    for tensors in (peft, kohya, t5_only, onetrainer_t5, comfy):
        family, why = guess_family(parse_lora_tensors(tensors)[0])
        assert family == "flux", why
    sdxl = build_model("tiny-sdxl", device="meta")
    with pytest.raises(LoRAFileError, match=r"is a FLUX\.1 LoRA \(its keys name Flux transformer layers"):
        network_from_tensors(sdxl, kohya)
    with pytest.raises(LoRAFileError, match=r"is a FLUX\.1 LoRA \(it has a T5 text encoder"):
        network_from_tensors(sdxl, onetrainer_t5)
    sdxl_lora = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 2048),
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 2)}
    with pytest.raises(LoRAFileError, match=r"is an SDXL LoRA \(its cross-attention .* but the model is 'tiny-flux'"):
        network_from_tensors(bundle, sdxl_lora)
