"""Quantized layers and models (models.quant.layers / model): the op equals the full-precision op
on the dequantized weight, backward keeps no full-size weight, which layers are quantized, and
the error of a quantized tiny-sdxl UNet next to the fp32 and bf16 ones."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.quant import QuantConv2d, QuantLinear, is_quantized, quantization_of, quantize_model
from models.quant.model import compute_dtype, select_layers

FORMATS = ["fp8", "int8", "nf4"]


def _saved_tensors(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward while `fn()` runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


# ---- one layer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_is_linear_on_the_dequantized_weight(fmt):
    lin = nn.Linear(96, 80)
    q = QuantLinear.from_module(lin, fmt)
    w = q.dequantize()
    assert q.weight_shape == (80, 96) and w.shape == (80, 96) and w.dtype == torch.float32
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, want = q(x), F.linear(x_ref, w, lin.bias)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert q.bias is lin.bias and not q.bias.requires_grad  # the layer's own (frozen) bias


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_conv_is_conv_on_the_dequantized_weight(fmt):
    conv = nn.Conv2d(24, 32, 3, stride=2, padding=1)
    q = QuantConv2d.from_module(conv, fmt)
    x = torch.randn(2, 24, 9, 9, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = q(x)
    want = F.conv2d(x_ref, q.dequantize(), conv.bias, 2, 1)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [nn.Linear(256, 128), nn.Conv2d(64, 64, 3, padding=1)], ids=["linear", "conv"])
def test_backward_keeps_only_the_packed_weight(layer):
    """A full-precision frozen layer keeps its weight (and a conv its input) for backward; a
    quantized one keeps its packed tensors only, so a step never holds every dequantized weight."""
    x = torch.randn(4, 256, requires_grad=True) if isinstance(layer, nn.Linear) else torch.randn(1, 64, 8, 8, requires_grad=True)
    layer.requires_grad_(False)
    plain = _saved_tensors(lambda: layer(x))
    assert any(t.numel() == layer.weight.numel() for t in plain)  # the baseline the test compares against
    q = (QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear).from_module(layer, "nf4")
    saved = _saved_tensors(lambda: q(x))
    assert {id(t) for t in saved} == {id(q.qweight), id(q.qscale)}


def test_quantized_layers_survive_dtype_and_layout_casts():
    q = QuantConv2d.from_module(nn.Conv2d(32, 32, 3, padding=1), "fp8")
    x = torch.randn(1, 32, 6, 6)
    want = q(x)
    bits = q.qweight.clone()
    q.to(memory_format=torch.channels_last)  # train.channels_last
    q.to(torch.float64)  # a module-wide cast: the packed fp8 bits are uint8 and stay as they are
    assert q.qweight.dtype == torch.uint8 and torch.equal(q.qweight, bits)
    q.compute_dtype, q.bias.data = torch.float32, q.bias.data.float()
    q.qscale.data = q.qscale.data.float()
    torch.testing.assert_close(q(x), want)


# ---- which layers ---------------------------------------------------------------------------------
def test_sdxl_layers_chosen_for_quantization():
    bundle = models.build_model("sdxl", device="meta")
    unet = {path for path, _ in select_layers(bundle.unet)}
    layers = {p for p, m in bundle.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert layers - unet == {"input_blocks.0.0", "out.2"}  # the 4-channel latent input / output convs
    for part in ("text_encoder", "text_encoder_2"):
        te = bundle.modules()[part]
        linears = {p for p, m in te.named_modules() if isinstance(m, nn.Linear)}
        assert {p for p, _ in select_layers(te)} == linears  # embeddings and norms are not layers it takes


def test_small_layers_and_norms_keep_the_compute_dtype():
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 32), nn.Conv2d(32, 32, 1))
    assert quantize_model(model, "int8") == 1
    assert is_quantized(model[0]) and isinstance(model[1], nn.LayerNorm)
    assert type(model[2]) is nn.Linear and type(model[3]) is nn.Conv2d  # 2048 and 1024 weights < 4096


def test_quantize_model_refuses_a_model_with_adapters():
    bundle = models.build_model("tiny-sdxl")
    models.inject_lora(bundle, unet="kohya", rank=2)
    with pytest.raises(ValueError, match="carries LoRA adapters; quantize the base model before injecting"):
        quantize_model(bundle.unet, "nf4")


def test_unet_dtype_is_the_compute_dtype_of_quantized_layers():
    bundle = models.build_model("tiny-sdxl", dtype=torch.bfloat16)
    quantize_model(bundle.unet, "nf4")
    assert next(bundle.unet.parameters()).dtype == torch.uint8  # the first Parameter is a packed weight
    assert bundle.unet.dtype == torch.bfloat16 == compute_dtype(bundle.unet)
    assert quantization_of(bundle.unet) == "nf4" and quantization_of(bundle.vae) is None
    with pytest.raises(ValueError, match="unknown mode 'q4'"):
        quantize_model(bundle.vae, "q4")


# ---- the quantized UNet ---------------------------------------------------------------------------
# Relative error of the tiny-sdxl UNet output (seed-0 random weights, fp32) with quantized weights,
# against the fp32 output; the bf16 model's own error is 1.4 %. Every layer's weight error (fp8
# 2.5 %, int8 0.4 %, nf4 9.1 % on these uniform random weights) grows about 3x through the 38
# random layers. docs/benchmarks.md quotes these figures.
UNET_BOUNDS = {"fp8": (0.06, 0.10), "int8": (0.008, 0.02), "nf4": (0.22, 0.35)}


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    bundle = models.build_model("tiny-sdxl", seed=0)
    unet = bundle.unet
    c = unet.config
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500]),
              torch.randn(2, 77, c.context_dim, generator=gen), torch.randn(2, c.adm_in_channels, generator=gen))
    with torch.no_grad():
        ref = unet(*inputs)
    return unet, inputs, ref


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_unet_forward_error(tiny_unet, fmt):
    unet, inputs, ref = tiny_unet
    q = copy.deepcopy(unet)
    assert quantize_model(q, fmt) == 169
    with torch.no_grad():
        err = _rel(q(*inputs), ref)
    low, high = UNET_BOUNDS[fmt]
    assert low < err < high, err


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_bf16_unet_forward_error(tiny_unet, fmt):
    """Compute dtype bf16: the quantized forward next to the bf16 forward of the same weights."""
    unet, inputs, _ = tiny_unet
    half = copy.deepcopy(unet).to(torch.bfloat16)
    bf16_inputs = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs]
    q = copy.deepcopy(half)
    quantize_model(q, fmt)
    with torch.no_grad():
        want = half(*bf16_inputs)
        got = q(*bf16_inputs)
    assert got.dtype == torch.bfloat16
    assert _rel(got, want) < UNET_BOUNDS[fmt][1] + 0.01
