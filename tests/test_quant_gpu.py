"""Quantized frozen bases on CUDA (`pytest -m gpu tests/test_quant_gpu.py`; skipped without a GPU):
bitsandbytes' NF4 kernel reads our layout, quantizing on the GPU gives the CPU's bytes, a bf16
autocast training step runs on packed weights, and train.offload_frozen moves the cached parts."""
import pytest
import torch

import models
from models.quant import quantize_model
from models.quant.formats import dequantize, quantize

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1280, 640), (320, 320, 3, 3), (33, 7)])
def test_bitsandbytes_nf4_kernel_equals_the_torch_dequantization(shape, dtype):
    w = torch.randn(shape) * 0.05
    qweight, qscale = quantize(w, "nf4")
    want = dequantize(qweight, qscale, "nf4", shape, dtype)  # CPU: our torch code
    got = dequantize(qweight.cuda(), qscale.cuda(), "nf4", shape, dtype)  # CUDA: bitsandbytes' kernel
    assert got.is_cuda and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
def test_quantizing_on_the_gpu_gives_the_cpu_bytes(fmt):
    w = torch.randn(640, 320, 3, 3, dtype=torch.bfloat16)
    cpu = quantize(w, fmt)
    gpu = quantize(w.cuda(), fmt)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
def test_bf16_autocast_step_on_a_quantized_unet(fmt):
    bundle = models.build_model("tiny-sdxl", seed=0, dtype=torch.bfloat16)
    quantize_model(bundle.unet, fmt)
    bundle.to("cuda")
    net = models.inject_lora(bundle, unet="locon", rank=4, dora=True)
    net.to("cuda")
    c = bundle.unet.config
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = bundle.unet(x, torch.tensor([3, 700], device="cuda"), torch.randn(2, 77, c.context_dim, device="cuda"),
                          torch.randn(2, c.adm_in_channels, device="cuda"))
    out.float().square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_offload_frozen_keeps_cached_parts_off_the_gpu(tmp_path):
    from training_runs import TINY_LORA, copy_quickstart_images

    from trainer.config import load_config
    from trainer.recipe import LoRATrainingRecipe

    data = tmp_path / "data"
    data.mkdir()
    copy_quickstart_images(data, 4)
    cfg = load_config(TINY_LORA, [f"output.dir={tmp_path}", f"data.path={data}", "train.max_steps=2", "sample.every=1",
                                   "model.quantize=nf4", "sample.prompts=[a cat]", "sample.steps=2",
                                   "output.tensorboard=false", "model.dtype=bf16", "train.mixed_precision=bf16"])
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    on = lambda module: {p.device.type for p in module.parameters()}  # noqa: E731
    assert on(recipe.bundle.unet) == {"cuda"}
    assert on(recipe.bundle.vae) == {"cpu"} and all(on(te) == {"cpu"} for te in recipe.bundle.text_encoders)
    assert recipe.train().completed  # samples after step 1 and at the end
    assert len(list((tmp_path / "quickstart" / "samples").glob("*.png"))) >= 1
    assert on(recipe.bundle.vae) == {"cpu"} and all(on(te) == {"cpu"} for te in recipe.bundle.text_encoders)
