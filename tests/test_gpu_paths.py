"""Code paths whose cost or failure only shows on a CUDA GPU, pinned on the CPU where the mechanism
can be observed (copies counted on the meta device, compiled graphs inspected, the CUDA memory
API stubbed), plus `gpu`-marked checks of the real thing (skipped without CUDA; run them with
`python -m pytest -m gpu tests/test_gpu_paths.py tests/test_sdpa_layout.py`)."""
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from training_runs import TINY_LORA, copy_quickstart_images

import models
from data.config import DataConfig
from data.dataset import build_dataset
from data.loader import TokenizeCaptions, build_dataloader
from trainer import optim as optim_mod
from trainer.config import OptimConfig, load_config
from trainer.monitor import TrainingMonitor
from trainer.optim import OptimizerUnavailable, build_optimizer, probe_bitsandbytes
from trainer.sampling.samplers import get_sampler

gpu = pytest.mark.gpu


class CountCopiesTo(TorchDispatchMode):
    """Counts copies from CPU tensors to `device`."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and out.device == self.device:
            self.count += 1
        return out


# ---- Euler a: ancestral noise crosses to the device once per run ---------------------------------------
@pytest.mark.parametrize("per_sample", [False, True])
def test_euler_a_noise_moves_to_the_device_once(per_sample):
    steps = 8
    latents = torch.zeros(2, 4, 8, 8, device="meta")
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)] if per_sample else torch.Generator().manual_seed(1)
    with CountCopiesTo("meta") as mode:
        out = get_sampler("euler_a").sample(lambda x, t: x * 0.1, latents, steps, generator=gens)
    assert out.shape == latents.shape
    assert mode.count == 1  # was one per step with noise (steps - 1)


@gpu
def test_euler_a_on_cuda_matches_cpu_without_syncs():
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 16, 16)
    model = lambda x, t: torch.tanh(x) * 0.2
    sampler = get_sampler("euler_a")
    want = sampler.sample(model, noise, 10, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sampler.sample(model, noise.cuda(), 10, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


# ---- peak memory: the training steps' peak, not setup's ------------------------------------------------
def test_peak_memory_window_restarts_at_start_log_and_samples(monkeypatch):
    peak = {"now": 5000 * 2**20}
    resets = []

    def reset(device=None):
        resets.append(device)
        peak["now"] = 0

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["now"])
    device = torch.device("cuda", 0)
    monitor = TrainingMonitor(None, 10, 0, 1, device, enabled=False)  # after setup and caching
    assert len(resets) == 1
    peak["now"] = 300 * 2**20  # the training steps
    assert monitor.log(1, [0.5], {"unet": 1e-4}, None)["peak_memory_mb"] == 300
    monitor.add_image("samples", Image.new("RGB", (4, 4)), 1)  # sample rendering just ended
    assert len(resets) == 3
    peak["now"] = 200 * 2**20
    assert monitor.log(2, [0.5], {"unet": 1e-4}, None)["peak_memory_mb"] == 200


@gpu
def test_peak_memory_excludes_what_came_before_training():
    device = torch.device("cuda")
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    del big
    monitor = TrainingMonitor(None, 10, 0, 1, device, enabled=False)
    small = torch.empty(2**20, dtype=torch.uint8, device=device)
    assert monitor.log(1, [0.5], {"unet": 1e-4}, None)["peak_memory_mb"] < 128
    del small


# ---- bitsandbytes: a broken CUDA library fails when the optimizer is built ----------------------------
class _BrokenStep(torch.optim.SGD):
    def __init__(self, params, lr=1e-3, betas=None, weight_decay=0.0, eps=None):
        super().__init__(params, lr=lr)

    def step(self, closure=None):
        raise RuntimeError("CUDA Setup failed despite GPU being available.\nInspect the output above")


def _fake_bnb(monkeypatch):
    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=_BrokenStep), __version__="0.0")
    monkeypatch.setattr(optim_mod.importlib, "import_module", lambda name: fake)


def test_bitsandbytes_probe_turns_a_failing_step_into_one_line():
    with pytest.raises(OptimizerUnavailable) as info:
        probe_bitsandbytes(_BrokenStep, {"lr": 1e-3}, torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message and "_BrokenStep" in message and "CUDA Setup failed" in message
    assert "optim.name=adamw" in message


def test_bitsandbytes_probe_is_skipped_off_cuda(monkeypatch):
    _fake_bnb(monkeypatch)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([{"name": "unet", "params": [p], "lr": 1e-3}], OptimConfig(name="adamw8bit"))
    assert isinstance(opt, _BrokenStep)


@gpu
def test_bitsandbytes_probe_runs_on_cuda(monkeypatch):
    _fake_bnb(monkeypatch)
    p = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    with pytest.raises(OptimizerUnavailable, match="cannot run on cuda"):
        build_optimizer([{"name": "unet", "params": [p], "lr": 1e-3}], OptimConfig(name="adamw8bit"))


# ---- module dropout: one draw per forward pass, no branch in compiled blocks --------------------------
def _unet_inputs(bundle, batch=2):
    g = torch.Generator().manual_seed(1)
    c = bundle.unet.config
    return (torch.randn(batch, c.in_channels, 8, 8, generator=g), torch.tensor([20.0, 700.0][:batch]),
            torch.randn(batch, 7, c.context_dim, generator=g), torch.randn(batch, c.adm_in_channels, generator=g))


@pytest.mark.parametrize("dora", [False, True])
def test_module_dropout_drops_whole_adapters(dora):
    """A training forward equals the evaluation forward with each adapter's multiplier set to
    its drawn 0/1 decision: a dropped adapter (DoRA included) leaves its base layer's output."""
    bundle = models.build_model("tiny-sdxl", seed=0)
    net = models.inject_lora(bundle, unet="kohya", rank=4, module_dropout=0.5, dora=dora)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    inputs = _unet_inputs(bundle)
    bundle.unet.train()
    with torch.no_grad():
        trained = bundle.unet(*inputs)
    keeps = {name: float(a._keep) for name, a in net.adapters().items()}
    assert set(keeps.values()) == {0.0, 1.0}
    bundle.unet.eval()
    net.eval()
    for name, a in net.adapters().items():
        a.multiplier = keeps[name]
    with torch.no_grad():
        want = bundle.unet(*inputs)
    torch.testing.assert_close(trained, want, rtol=1e-5, atol=1e-6)


def test_module_dropout_draws_once_per_forward_from_the_global_generator():
    bundle = models.build_model("tiny-sdxl", seed=0)
    net = models.inject_lora(bundle, unet="kohya", rank=4, module_dropout=0.3)
    inputs = _unet_inputs(bundle)
    bundle.unet.train()
    draws = []
    for _ in range(2):
        torch.manual_seed(5)
        with torch.no_grad():
            bundle.unet(*inputs)
        draws.append([float(a._keep) for a in net.adapters().values()])
        expected = (torch.rand(len(draws[-1]), generator=torch.Generator().manual_seed(5)) >= 0.3).float().tolist()
        assert draws[-1] == expected
    assert draws[0] == draws[1]


def test_module_dropout_does_not_break_compiled_blocks():
    from models.unet_blocks import BasicTransformerBlock

    bundle = models.build_model("tiny-sdxl", seed=0)
    models.inject_lora(bundle, unet="kohya", rank=4, module_dropout=0.3)
    bundle.unet.train()
    block = next(m for m in bundle.unet.modules() if isinstance(m, BasicTransformerBlock))
    captured = {}

    def grab(module, args):
        captured["args"] = args

    handle = block.register_forward_pre_hook(grab)
    with torch.no_grad():
        bundle.unet(*_unet_inputs(bundle))
    handle.remove()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block.forward)(*captured["args"])
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---- token ids: tokenized at collate time, pinned and prefetched ---------------------------------------
@pytest.fixture(scope="module")
def caption_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_imgs")
    for i in range(4):
        arr = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"photo number {i}, red")
    cfg = DataConfig(path=str(root), resolution=64, bucket_step=32, min_size=16)
    return build_dataset(cfg, seed=0, log_summary=False)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_tokenizes_captions(caption_dataset, workers):
    bundle = models.build_model("tiny-sdxl", seed=0)
    # spawn pickles the collate hook (tokenizers included) into the worker
    ctx = "spawn" if workers else None
    loader = build_dataloader(caption_dataset, 2, seed=0, num_workers=workers, multiprocessing_context=ctx,
                              tokenize=TokenizeCaptions(bundle.tokenizers))
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        want = bundle.tokenize(batch["caption"])
        assert len(batch["token_ids"]) == len(want) == 2
        for got, ref in zip(batch["token_ids"], want):
            assert got.dtype == torch.int64 and torch.equal(got, ref)


@gpu
def test_loader_token_ids_arrive_pinned_on_cuda(caption_dataset):
    bundle = models.build_model("tiny-sdxl", seed=0)
    loader = build_dataloader(caption_dataset, 2, seed=0, num_workers=0, device="cuda",
                              tokenize=TokenizeCaptions(bundle.tokenizers))
    assert loader.loader.pin_memory
    batch = next(iter(loader))
    assert all(t.is_cuda for t in batch["token_ids"])


# ---- the training step on the recipe ----------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 2)


def _recipe(tmp_path, data, *overrides):
    from trainer.recipe import LoRATrainingRecipe

    cfg = load_config(TINY_LORA, [f"output.dir={tmp_path}", f"data.path={data}", "data.num_workers=0",
                                   "output.tensorboard=false", "optim.warmup_steps=0", "train.batch_size=2",
                                   "train.save_every=0", "train.max_steps=2", "train.log_every=2", *overrides])
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    return recipe


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_channels_last_reaches_the_first_convolution(tmp_path, small_data):
    recipe = _recipe(tmp_path, small_data, "train.channels_last=true", "data.cache_latents=true",
                     "data.cache_text=true")
    seen = []
    first_conv = recipe.bundle.unet.input_blocks[0][0]
    handle = first_conv.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    batch = next(recipe._batches())
    recipe._loss(batch, 0)
    handle.remove()
    assert seen == [True]


@gpu
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_step_never_syncs_on_cuda(tmp_path, small_data):
    """Text encoders trained from uncached captions, module dropout, bf16: the whole optimizer
    step runs without one synchronising CUDA call."""
    recipe = _recipe(tmp_path, small_data, "data.cache_text=false", "data.cache_latents=true",
                     "train.train_text_encoders=true", "lora.module_dropout=0.2", "train.mixed_precision=bf16",
                     "model.dtype=bf16")
    assert recipe.device.type == "cuda"
    batches = recipe._batches()
    recipe._first_bad = torch.full((), -1, dtype=torch.long, device=recipe.device)
    recipe._pending = []
    recipe._train_step(batches)  # warm-up: first-step allocations and library loading
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        recipe._train_step(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu
def test_vae_attention_runs_without_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig.preset("tiny")).cuda().eval()
    images = torch.rand(1, 3, 64, 64, device="cuda") * 2 - 1
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with torch.no_grad(), sdpa_kernel(fused):  # raises "no available kernel" for strided q/k/v
        latents = vae.encode(images).mode()
        images_back = vae.decode(latents)
    assert images_back.shape == images.shape


# ---- benchmark: the % of peak column knows the GPU ----------------------------------------------------
@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 NVL", None),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_peak_tflops_by_gpu_name(name, peak):
    from trainer.bench.train import default_peak_tflops

    assert default_peak_tflops(name) == peak


def test_unknown_gpu_needs_peak_tflops(monkeypatch):
    from trainer.bench.train import BenchConfig, BenchError, peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    cuda = torch.device("cuda")
    with pytest.raises(BenchError, match="--peak-tflops.*RTX 4090"):
        peak_tflops(BenchConfig(), cuda)
    assert peak_tflops(BenchConfig(peak_tflops=165.0), cuda) == 165.0
    assert peak_tflops(BenchConfig(), torch.device("cpu")) is None
