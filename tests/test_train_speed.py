"""Training speed options (checkpointing granularity, channels-last, torch.compile) change the
speed, not the result; and the optimizer step never waits for the device (no host sync)."""
import traceback
import weakref

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from training_runs import TINY_LORA, copy_quickstart_images

from models.unet_blocks import BasicTransformerBlock
from trainer.config import load_config
from trainer.recipe import LoRATrainingRecipe

FAST = ["data.num_workers=0", "data.cache_latents=true", "data.cache_text=true", "output.tensorboard=false",
        "optim.warmup_steps=0", "train.batch_size=2", "train.save_every=0"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 4)


def _run(out, data, *overrides) -> tuple[LoRATrainingRecipe, object]:
    cfg = load_config(TINY_LORA, [f"output.dir={out}", f"data.path={data}", *FAST, "train.max_steps=3",
                                   "train.log_every=1", *overrides])
    recipe = LoRATrainingRecipe(cfg)
    return recipe, recipe.run()


def _assert_same_training(base, other, base_dir, other_dir):
    (_, want), (_, got) = base, other
    assert got.completed and len(got.losses) == len(want.losses) == 3
    assert got.losses == pytest.approx(want.losses, rel=1e-5, abs=1e-7)
    a = load_file(base_dir / "quickstart" / "quickstart.safetensors")
    b = load_file(other_dir / "quickstart" / "quickstart.safetensors")
    assert a.keys() == b.keys()
    # Whole-network relative difference: Adam turns rounding noise in near-zero gradients into
    # full-size steps, so single small tensors may differ more than the network as a whole.
    diff = sum((b[k].double() - a[k].double()).square().sum() for k in a if k.endswith("weight"))
    norm = sum(a[k].double().square().sum() for k in a if k.endswith("weight"))
    assert (diff / norm).sqrt() < 1e-3


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, small_data):
    out = tmp_path_factory.mktemp("plain")
    return out, _run(out, small_data)


@pytest.mark.parametrize("granularity", ["layer", "transformer"])
def test_checkpointing_granularity_and_channels_last_train_the_same(tmp_path, small_data, baseline, granularity):
    run = _run(tmp_path, small_data, f"train.gradient_checkpointing={granularity}", "train.channels_last=true")
    unet = run[0].bundle.unet
    assert unet.gradient_checkpointing == granularity
    conv = unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    _assert_same_training(baseline[1], run, baseline[0], tmp_path)


def test_checkpointing_true_means_block(tmp_path, small_data):
    cfg = load_config(TINY_LORA, [f"output.dir={tmp_path}", f"data.path={small_data}", *FAST,
                                   "train.gradient_checkpointing=true"])
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    assert recipe.bundle.unet.gradient_checkpointing == "block"


def test_compiled_transformer_blocks_train_the_same(tmp_path, small_data, baseline):
    run = _run(tmp_path, small_data, "train.compile=true", "train.gradient_checkpointing=transformer")
    blocks = [m for m in run[0].bundle.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    _assert_same_training(baseline[1], run, baseline[0], tmp_path)


# ---- host syncs ---------------------------------------------------------------------------------------
# Reads that only ever touch CPU tensors, so they cannot wait for a GPU: the timestep range check
# (guarded to CPU tensors) and the DataLoader's base seed (drawn from the CPU generator).
CPU_ONLY_READS = (("trainer/schedule.py", "_alpha_bar"), ("torch/utils/data/dataloader.py", None))


class CountHostReads(TorchDispatchMode):
    """Records ops that copy a tensor value to the host (`.item()`, `bool(t)`, `float(t)`, `if t:`),
    except CPU_ONLY_READS: on a GPU each one waits for all queued work."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            stack = traceback.extract_stack()
            if not any(f.filename.replace("\\", "/").endswith(path) and name in (None, f.name)
                       for f in stack for path, name in CPU_ONLY_READS):
                self.reads.append("".join(traceback.format_list(stack[-6:-1])))
        return func(*args, **(kwargs or {}))


# Tensors the data pipeline builds are pinned by the DataLoader on CUDA and copied by the prefetcher
# without blocking; only tensors the step itself builds from Python data are suspects on the CPU.
DATA_PIPELINE = ("torch/utils/data/", "data/loader.py")
HOST_DATA = (torch.tensor, torch.as_tensor, torch.from_numpy)


def _target(func, args, kwargs):
    """(source, destination device) of a host->device transfer call, else None."""
    if func is torch.Tensor.to:
        device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
        return (args[0], device) if device is not None else None
    if func is torch.Tensor.cuda:
        return args[0], torch.device("cuda")
    if func is torch.Tensor.copy_:
        return (args[1], args[0].device) if isinstance(args[1], torch.Tensor) else None
    if func is torch.as_tensor and isinstance(args[0], torch.Tensor) and kwargs.get("device") is not None:
        return args[0], kwargs["device"]
    return None


class CountHostCopies(TorchFunctionMode):
    """Records copies to a device from pageable (non-pinned) host memory, which block the host on
    a GPU: `.to(device)`, `.cuda()`, `copy_` and `torch.tensor(data, device=...)`. On the CPU no
    copy happens, so a tensor the step builds from Python data (outside the data pipeline) counts
    when it is sent to a device, or built with an explicit device."""

    def __init__(self):
        super().__init__()
        self.copies = []
        self._built: dict[int, weakref.ref] = {}

    def _record(self):
        self.copies.append("".join(traceback.format_list(traceback.extract_stack()[-7:-2])))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in HOST_DATA and not (args and isinstance(args[0], torch.Tensor)):
            if kwargs.get("device") is not None:
                self._record()
            elif not any(p in f.filename.replace("\\", "/") for f in traceback.extract_stack() for p in DATA_PIPELINE):
                self._built[id(out)] = weakref.ref(out)
            return out
        moved = _target(func, args, kwargs)
        if moved is not None:
            src, device = moved
            ref = self._built.get(id(src))
            from_python = ref is not None and ref() is src
            pageable = src.device.type == "cpu" and torch.device(device).type != "cpu" and not src.is_pinned()
            if from_python or pageable:
                self._record()
        return out


def test_copy_counter_sees_pageable_and_python_built_copies():
    with CountHostCopies() as mode:
        torch.tensor([1, 2]).to("cpu")  # built from Python data: a pageable copy on a GPU
        torch.zeros(3).to("meta")  # a real copy from pageable memory to another device
        torch.tensor([3], device="cpu")
        torch.randn(3).to("cpu")  # a no-op move of a computed tensor: not counted
        torch.zeros(2).copy_(torch.tensor([1.0, 2.0]))
    assert len(mode.copies) == 4


def test_counter_sees_host_reads():
    with CountHostReads() as mode:
        x = torch.randn(3)
        float(x.sum())
        bool((x > 0).all())
    assert len(mode.reads) == 2


def test_timestep_lookup_reads_nothing_off_the_cpu():
    """The range check that makes the CPU exclusion above safe is skipped off the CPU."""
    from trainer.schedule import NoiseSchedule

    schedule = NoiseSchedule()
    timesteps = torch.randint(0, 1000, (4,), device="meta")
    with CountHostReads() as mode:
        noisy = schedule.add_noise(torch.empty(4, 4, 8, 8, device="meta"), torch.empty(4, 4, 8, 8, device="meta"),
                                   timesteps)
    assert noisy.shape == (4, 4, 8, 8) and mode.reads == []
    with pytest.raises(ValueError, match="timesteps must lie in"):
        schedule.add_noise(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.tensor([1000]))


@pytest.mark.parametrize("overrides", [[], ["train.min_snr_gamma=5", "train.noise_offset=0.05", "train.grad_accum=2",
                                            "train.mixed_precision=bf16", "lora.dropout=0.1",
                                            "model.prediction_type=v_prediction"],
                                       ["data.cache_text=false", "train.train_text_encoders=true",
                                        "lora.module_dropout=0.2"],
                                       ["data.cache_text=false", "data.cache_latents=false"]],
                         ids=["default", "snr-offset-accum-bf16-dropout-v", "text-encoders-module-dropout",
                              "uncached"])
def test_training_steps_never_read_device_values(tmp_path, small_data, overrides):
    """Losses, gradient norms and the non-finite check stay on the device between log intervals,
    and nothing is copied to the device from pageable host memory (token ids come pinned from
    the data loader)."""
    cfg = load_config(TINY_LORA, [f"output.dir={tmp_path}", f"data.path={small_data}", *FAST, "train.max_steps=4",
                                   "train.log_every=4", *overrides])
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    step = recipe._train_step
    reads = []

    copies = []

    def counted_step(batches):
        with CountHostReads() as mode, CountHostCopies() as copy_mode:
            step(batches)
        reads.extend(mode.reads)
        copies.extend(copy_mode.copies)

    recipe._train_step = counted_step
    summary = recipe.train()
    assert summary.completed and len(summary.losses) == 4
    assert reads == []
    assert copies == []
