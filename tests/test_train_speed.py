"""Training speed options (checkpointing granularity, channels-last, torch.compile) change the
speed, not the result; and the optimizer step never waits for the device (no host sync)."""
import traceback

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from training_runs import QUICKSTART, copy_quickstart_images

from models.unet_blocks import BasicTransformerBlock
from trainer.config import load_config
from trainer.recipe import LoRATrainingRecipe

FAST = ["data.num_workers=0", "data.cache_latents=true", "data.cache_text=true", "output.tensorboard=false",
        "optim.warmup_steps=0", "train.batch_size=2", "train.save_every=0"]

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 4)


def _run(out, data, *overrides) -> tuple[LoRATrainingRecipe, object]:
    cfg = load_config(QUICKSTART, [f"output.dir={out}", f"data.path={data}", *FAST, "train.max_steps=3",
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
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", f"data.path={small_data}", *FAST,
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
                                            "model.prediction_type=v_prediction"]],
                         ids=["default", "snr-offset-accum-bf16-dropout-v"])
def test_training_steps_never_read_device_values(tmp_path, small_data, overrides):
    """Losses, gradient norms and the non-finite check stay on the device between log intervals."""
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", f"data.path={small_data}", *FAST, "train.max_steps=4",
                                   "train.log_every=4", *overrides])
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    step = recipe._train_step
    reads = []

    def counted_step(batches):
        with CountHostReads() as mode:
            step(batches)
        reads.extend(mode.reads)

    recipe._train_step = counted_step
    summary = recipe.train()
    assert summary.completed and len(summary.losses) == 4
    assert reads == []
