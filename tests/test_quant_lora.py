"""LoRA, LoCon, DoRA, LoHa and LoKr adapters on quantized bases: the same function and gradients
as the same adapters on a full-precision model holding the dequantized weights, merge refused,
and the export an ordinary LoRA file that applies to the unquantized model."""
import json

import pytest
import safetensors
import torch
from torch import nn

import models
from models.bundle import build_model
from models.lora.files import load_lora
from models.quant import is_quantized, quantize_model
from trainer.__main__ import main

KINDS = {
    "lora": {"algo": "lora"},
    "lora_tucker": {"algo": "lora", "use_tucker": True},
    "dora_in": {"algo": "lora", "dora": True},
    "dora_out": {"algo": "lora", "dora": "out"},
    "loha": {"algo": "loha"},
    "loha_tucker": {"algo": "loha", "use_tucker": True},
    "lokr": {"algo": "lokr", "factor": 4},
}


def _inputs(bundle, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = bundle.unet.config
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 900]), torch.randn(2, 77, c.context_dim, generator=g),
            torch.randn(2, c.adm_in_channels, generator=g))


def _dequantized_twin(quantized) -> object:
    """The tiny-sdxl model whose quantized layers are full-precision layers holding the
    dequantized weights: the function a quantized base computes, without quantized code."""
    twin = build_model("tiny-sdxl", seed=0)
    layers = dict(twin.unet.named_modules())
    for path, q in quantized.unet.named_modules():
        if is_quantized(q):
            with torch.no_grad():
                layers[path].weight.copy_(q.dequantize())
    return twin


def _perturb(net, seed=3):
    """Non-zero updates everywhere (fresh adapters start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.endswith("dora_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_adapters_on_a_quantized_base_equal_adapters_on_its_dequantized_twin(fmt, kind):
    bundle = build_model("tiny-sdxl", seed=0)
    quantize_model(bundle.unet, fmt)
    twin = _dequantized_twin(bundle)
    nets = []
    for b in (bundle, twin):
        torch.manual_seed(0)
        nets.append(models.inject_lora(b, unet="locon", rank=4, conv_rank=4, **KINDS[kind]))
    net, ref = nets
    assert sum(w.quantization is not None for w in net._wrappers.values()) >= 100  # most adapted layers are quantized
    for name, a in net.adapters().items():  # DoRA magnitudes start at the dequantized weight's norms
        if a.is_dora:
            torch.testing.assert_close(a.dora_scale, ref.adapters()[name].dora_scale, rtol=1e-6, atol=1e-7)
    _perturb(net)
    ref.load_state_dict(net.state_dict())
    inputs = _inputs(bundle)
    out, want = bundle.unet(*inputs), twin.unet(*inputs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    want.square().mean().backward()
    grads, ref_grads = dict(net.named_parameters()), dict(ref.named_parameters())
    for name, p in grads.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_gradient_checkpointing_on_a_quantized_base_gives_the_same_gradients(granularity):
    grads = []
    for checkpointing in (False, True):
        bundle = build_model("tiny-sdxl", seed=0)
        quantize_model(bundle.unet, "nf4")
        if checkpointing:
            bundle.unet.set_gradient_checkpointing(True, granularity)
        torch.manual_seed(0)
        net = models.inject_lora(bundle, unet="locon", rank=4, dora=True)
        _perturb(net)
        bundle.unet(*_inputs(bundle)).square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_stacked_networks_and_removal_restore_the_quantized_layer():
    bundle = build_model("tiny-sdxl", seed=0)
    quantize_model(bundle.unet, "int8")
    path = "input_blocks.3.1.transformer_blocks.0.attn1.to_q"
    original = bundle.unet.get_submodule(path)
    keys = set(bundle.unet.state_dict())
    inputs = _inputs(bundle)
    with torch.no_grad():
        before = bundle.unet(*inputs)
    a = models.inject_lora(bundle, unet="kohya", rank=2)
    b = models.inject_lora(bundle, unet="attn", algo="loha", rank=2)
    _perturb(a)
    _perturb(b, seed=4)
    wrapper = bundle.unet.get_submodule(path)
    assert wrapper.quantization == "int8" and set(wrapper.lora_adapters) == {a.tag, b.tag}
    assert wrapper.qweight is original.qweight  # the same packed Parameters, the same state-dict keys
    assert set(bundle.unet.state_dict()) == keys
    b.remove()
    a.remove()
    assert bundle.unet.get_submodule(path) is original
    with torch.no_grad():
        torch.testing.assert_close(bundle.unet(*inputs), before, rtol=0, atol=0)


def test_removal_hands_back_parameters_that_a_conversion_recreated():
    """With torch's overwrite-on-conversion mode `.to()` makes new Parameter objects; the restored
    quantized layer must get the wrapper's current ones."""
    bundle = build_model("tiny-sdxl", seed=0)
    quantize_model(bundle.unet, "fp8")
    net = models.inject_lora(bundle, unet="kohya", rank=2)
    path = "input_blocks.3.1.transformer_blocks.0.attn1.to_q"
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        bundle.unet.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    wrapper = bundle.unet.get_submodule(path)
    current = (wrapper.qweight, wrapper.qscale)
    assert wrapper.base_layer.qscale is not current[1]
    net.remove()
    restored = bundle.unet.get_submodule(path)
    assert (restored.qweight, restored.qscale) == current and restored.qscale.dtype == torch.float64


def test_merge_into_a_quantized_base_is_refused_and_changes_nothing():
    bundle = build_model("tiny-sdxl", seed=0)
    quantize_model(bundle.unet, "nf4")
    net = models.inject_lora(bundle, unet="kohya", rank=4)
    _perturb(net)
    inputs = _inputs(bundle)
    with torch.no_grad():
        before = bundle.unet(*inputs)
    with pytest.raises(RuntimeError, match=r"^cannot merge LoRA lora_unet_\w+ into its nf4-quantized base layer "
                                           r"\(model.quantize\): export the LoRA and merge it into a full-precision "
                                           r"checkpoint with `python -m trainer lora merge`"):
        net.merge()
    assert not any(a.merged for a in net.adapters().values())
    with torch.no_grad():
        torch.testing.assert_close(bundle.unet(*inputs), before, rtol=0, atol=0)


# ---- export ---------------------------------------------------------------------------------------
def _trained_on(fmt, tmp_path, **kw):
    bundle = build_model("tiny-sdxl", seed=0)
    quantize_model(bundle.unet, fmt)
    torch.manual_seed(0)
    net = models.inject_lora(bundle, unet="locon", rank=4, conv_rank=4, **kw)
    _perturb(net)
    path = tmp_path / f"{fmt}.safetensors"
    net.save(path, dtype=torch.float32)
    return path, net


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_export_is_an_ordinary_lora_file_with_the_base_quantization_noted(tmp_path, fmt):
    path, _ = _trained_on(fmt, tmp_path)
    plain = models.inject_lora(build_model("tiny-sdxl", seed=0), unet="locon", rank=4, conv_rank=4)
    plain_path = tmp_path / "plain.safetensors"
    plain.save(plain_path, dtype=torch.float32)
    with safetensors.safe_open(path, "pt") as f, safetensors.safe_open(plain_path, "pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert all(f.get_slice(k).get_shape() == g.get_slice(k).get_shape() for k in f.keys())
        meta, plain_meta = f.metadata(), g.metadata()
    assert json.loads(meta["lorasmith.base_quantization"]) == {"unet": fmt}
    assert "lorasmith.base_quantization" not in plain_meta
    assert {k for k in meta if k.startswith("ss_")} == {k for k in plain_meta if k.startswith("ss_")}


def test_exported_lora_applies_to_the_full_precision_base_by_the_comfyui_formula(tmp_path):
    path, _ = _trained_on("nf4", tmp_path)
    live = build_model("tiny-sdxl", seed=0)  # unquantized
    net = load_lora(live, path)
    merged = build_model("tiny-sdxl", seed=0)
    with safetensors.safe_open(path, "pt") as f, torch.no_grad():
        for name, ref in net.refs().items():
            down, up = f.get_tensor(f"{name}.lora_down.weight"), f.get_tensor(f"{name}.lora_up.weight")
            alpha = f.get_tensor(f"{name}.alpha").item()
            layer = merged.unet.get_submodule(ref.path)  # ComfyUI: W += strength * alpha/r * up @ down
            layer.weight += (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    inputs = _inputs(live)
    with torch.no_grad():
        got, want, base = live.unet(*inputs), merged.unet(*inputs), build_model("tiny-sdxl", seed=0).unet(*inputs)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert ((got - base).norm() / base.norm()).item() > 1e-2  # the LoRA does something


def test_lora_merge_cli_bakes_a_quantized_trained_lora_into_a_full_precision_checkpoint(tmp_path, capsys):
    from models.checkpoints.loading import load_model
    from models.checkpoints.single_file import save_single_file

    base_path = tmp_path / "base.safetensors"
    save_single_file(build_model("tiny-sdxl", seed=0), base_path)
    lora, _ = _trained_on("fp8", tmp_path, dora=True)
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--model", str(base_path), "--lora", str(lora), "--out", str(out)]) == 0
    merged = load_model(out, family="tiny-sdxl")
    assert not any(is_quantized(m) for m in merged.unet.modules())
    live = build_model("tiny-sdxl", seed=0)
    load_lora(live, lora)
    inputs = _inputs(live)
    with torch.no_grad():
        got, want = merged.unet(*inputs), live.unet(*inputs)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_adapters_read_shape_and_device_of_a_quantized_layer_directly():
    from models.lora.layers import LoRAAdapter
    from models.lora.lycoris import LoKrAdapter
    from models.quant import QuantConv2d

    q = QuantConv2d.from_module(nn.Conv2d(32, 48, 3, padding=1), "nf4")
    a = LoRAAdapter(q, 4, 4.0, dora=True)
    assert a.weight_shape == (48, 32, 3, 3) and a.lora_down.weight.shape == (4, 32, 3, 3)
    torch.testing.assert_close(a.dora_scale, torch.linalg.vector_norm(q.dequantize(), dim=(0, 2, 3), keepdim=True))
    k = LoKrAdapter(q, 4, 4.0, factor=4)
    assert k.delta_weight().shape == (48, 32, 3, 3)
