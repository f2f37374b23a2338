"""The meta-device memory predictor with quantized frozen weights (`python -m trainer bench memory`):
packed bytes resident, one layer's dequantized weight transient, and the SDXL goals."""
import pytest
import torch

import models
from models.quant.formats import dequantize, packed_nbytes, quantize
from models.quant.model import select_layers
from trainer.bench.memory import GIB, LiveTensorBytes, estimate_step, main


def _resident_weight_bytes(family: str, fmt: str, dtype=torch.bfloat16) -> int:
    """Packed bytes of the quantized layers + the rest of the UNet in `dtype`, computed by hand."""
    unet = models.build_model(family, device="meta", dtype=dtype).unet
    layers = dict(select_layers(unet))
    total = 0
    for name, p in unet.named_parameters():
        path, _, leaf = name.rpartition(".")
        if path in layers and leaf == "weight":
            total += packed_nbytes(tuple(p.shape), fmt)
        else:
            total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_meta_prediction_equals_the_same_step_on_real_tensors(fmt):
    for ckpt in ("none", "layer"):
        meta = estimate_step("tiny-sdxl", checkpointing=ckpt, quantize=fmt)
        cpu = estimate_step("tiny-sdxl", checkpointing=ckpt, quantize=fmt, device="cpu")
        assert meta == cpu, ckpt


def test_nf4_is_predicted_as_the_cuda_kernel_runs_it():
    """bitsandbytes' CUDA kernel writes the weight directly; the CPU path has index temporaries."""
    meta = estimate_step("tiny-sdxl", checkpointing="layer", quantize="nf4")
    cpu = estimate_step("tiny-sdxl", checkpointing="layer", quantize="nf4", device="cpu")
    qweight, qscale = quantize(torch.empty(256, 320, device="meta"), "nf4")
    with LiveTensorBytes() as mem:  # one dequantization on meta allocates the bf16 result, nothing else
        dequantize(qweight, qscale, "nf4", (256, 320), torch.bfloat16)
    assert mem.peak == 256 * 320 * 2
    unet = models.build_model("tiny-sdxl", device="meta").unet
    largest = max(m.weight.numel() for _, m in select_layers(unet))
    assert meta.weights == cpu.weights and meta.peak + 2 * largest <= cpu.peak


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
def test_resident_weights_are_the_packed_bytes(fmt):
    e = estimate_step("tiny-sdxl", checkpointing="layer", quantize=fmt)
    assert e.weights == _resident_weight_bytes("tiny-sdxl", fmt)


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_only_one_dequantized_weight_lives_at_a_time(fmt):
    """Without checkpointing every layer's saved tensors stay until backward: the quantized step
    needs no more activation memory than the full-precision one, plus one layer's transient
    weight (a step that kept each dequantized weight would add the whole model)."""
    plain = estimate_step("tiny-sdxl", checkpointing="none")
    quant = estimate_step("tiny-sdxl", checkpointing="none", quantize=fmt)
    unet = models.build_model("tiny-sdxl", device="meta").unet
    largest = max(m.weight.numel() for _, m in select_layers(unet)) * (4 + 2)  # fp32 intermediate + bf16 result
    assert quant.activations <= plain.activations + largest
    assert quant.peak < plain.peak - 0.4 * plain.weights


def test_sdxl_1024_goals_with_quantized_weights():
    """SDXL 1024 px, batch 1, rank-16 kohya LoRA, layer checkpointing, cached inputs: fp8 <= 4.5 GiB,
    NF4 <= 4.0 GiB (6.03 GiB unquantized, tests/test_bench_memory.py)."""
    fp8 = estimate_step("sdxl", checkpointing="layer", quantize="fp8")
    nf4 = estimate_step("sdxl", checkpointing="layer", quantize="nf4")
    assert fp8.weights == _resident_weight_bytes("sdxl", "fp8")
    assert fp8.weights / GIB == pytest.approx(2.40, abs=0.01) and nf4.weights / GIB == pytest.approx(1.35, abs=0.01)
    assert fp8.peak < 4.5 * GIB and nf4.peak < 4.0 * GIB
    assert fp8.lora == nf4.lora and nf4.optimizer == 2 * nf4.lora


def test_cli_prints_one_table_per_family_with_every_mode(capsys):
    assert main(["--family", "tiny-sdxl", "tiny-sd15", "--checkpointing", "none", "layer", "--batch", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("predicted GPU memory of one training step") == 2
    for mode in ("none", "fp8", "int8", "nf4"):
        for ckpt in ("none", "layer"):
            assert out.count(f"| {mode} | {ckpt} |") == 2
    assert "batch 1: peak MiB" in out and "batch 2: peak MiB" in out  # tiny families print MiB
