"""Full fine-tuning (`train.mode: full`) end to end on the tiny SDXL-shaped model from random weights:
which weights train (and which stay frozen), fp32 master weights under bf16 autocast, exact resume,
the exported single file and diffusers folder, text-encoder training with samples and validation,
config errors. CPU only, 64 px, a few steps each."""
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_runs import ROOT, copy_quickstart_images, trainer_env

import models
from trainer.config import ConfigError, load_config
from trainer.recipe import LoRATrainingRecipe, TrainingError

FULL = ROOT / "configs" / "full_tiny.yaml"
FAST = ["data.num_workers=0", "output.tensorboard=false", "train.log_every=1", "optim.warmup_steps=0",
        "train.batch_size=2", "train.save_every=0", "optim.lr=1e-3", "optim.weight_decay=0.01"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """4 of the quickstart images (2 batches of 2 per epoch)."""
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 4)


def _config(out: Path, data: Path, *overrides):
    return load_config(FULL, [f"output.dir={out}", f"data.path={data}", *FAST, *overrides])


def _base():
    """The random-weight model the runs start from (`model.source: tiny-sdxl`, `model.seed: 0`)."""
    return models.build_model("tiny-sdxl", seed=0)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}


def _run(recipe: LoRATrainingRecipe):
    summary = recipe.run()
    assert summary.completed and all(math.isfinite(v) for v in summary.losses), summary.losses
    return summary


# ---- which weights train, in which dtype ----------------------------------------------------------------
def test_denoiser_trains_in_fp32_under_bf16_autocast_and_the_rest_stays_frozen(tmp_path, small_data):
    recipe = LoRATrainingRecipe(_config(tmp_path, small_data, "train.max_steps=2", "model.dtype=bf16",
                                        "train.mixed_precision=bf16"))
    _run(recipe)
    base, bundle = _base(), recipe.bundle
    assert recipe.group_names == ["denoiser"]
    # fp32 master weights for the trained part; the frozen parts keep model.dtype
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.float32}
    assert {p.dtype for te in bundle.text_encoders for p in te.parameters()} == {torch.bfloat16}
    unet = bundle.unet.state_dict()
    assert _changed(base.unet.state_dict(), unet) == set(unet), "every denoiser weight must move"
    for mine, ref in zip(bundle.text_encoders, base.text_encoders):  # frozen: exactly the bf16 base weights
        ref = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
        assert not _changed(ref, mine.state_dict())
    assert not any(p.requires_grad for part in (bundle.vae, *bundle.text_encoders) for p in part.parameters())


def test_full_targets_train_only_the_matching_parameters(tmp_path, small_data):
    recipe = LoRATrainingRecipe(_config(tmp_path, small_data, "train.max_steps=2", "train.full_targets=[attn2]"))
    _run(recipe)
    before, after = _base().unet.state_dict(), recipe.bundle.unet.state_dict()
    attn2 = {k for k in before if "attn2" in k}
    assert attn2 and _changed(before, after) == attn2
    assert {k for k, _ in recipe.network.named_parameters()} == {f"unet.{k}" for k in attn2}


# ---- exact resume -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_interrupt_and_resume_equal_uninterrupted_run(tmp_path, small_data, dtype):
    extra = ["train.max_steps=5", "train.ema_decay=0.9", "optim.scheduler=cosine", "train.noise_offset=0.05",
             "train.keep_last=2", "train.save_every=2", f"train.full_dtype={dtype}"]
    if dtype == "bf16":
        extra += ["train.mixed_precision=bf16"]
    full = LoRATrainingRecipe(_config(tmp_path / "a", small_data, *extra))
    full_summary = _run(full)
    optimizer = type(getattr(full.optimizer, "optimizer", full.optimizer)).__name__
    assert optimizer == {"fp32": "AdamW", "bf16": "StochasticAdamW"}[dtype]

    part = LoRATrainingRecipe(_config(tmp_path / "b", small_data, *extra))
    part.setup()
    step_fn = part._train_step

    def interrupted_step(batches):
        step_fn(batches)
        if part.step == 2:  # the third step is running: Ctrl-C arrives now
            signal.raise_signal(signal.SIGINT)

    part._train_step = interrupted_step
    part_summary = part.train()
    assert not part_summary.completed and part_summary.checkpoint.name == "step-00000003"
    checkpoint = tmp_path / "b" / "full_tiny" / "checkpoints" / "step-00000003"
    with safe_open(str(checkpoint / "adapter.safetensors"), "pt") as f:  # the trained weights, by name
        key = "unet.input_blocks.0.0.weight"
        assert f.get_tensor(key).dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16)

    resumed = LoRATrainingRecipe(_config(tmp_path / "b", small_data, *extra, "train.resume=latest"))
    resumed_summary = _run(resumed)
    assert resumed_summary.start_step == 3
    assert part_summary.losses + resumed_summary.losses == full_summary.losses
    want, got = full.network.state_dict(), resumed.network.state_dict()
    assert want.keys() == got.keys() and not _changed(want, got)
    assert not _changed(full.weights.ema.state_dict(), resumed.weights.ema.state_dict())
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step-00000004", "step-00000005"]  # keep_last


# ---- export ------------------------------------------------------------------------------------------------
def test_exported_single_file_and_diffusers_folder_load_back_equal(tmp_path, small_data):
    recipe = LoRATrainingRecipe(_config(tmp_path, small_data, "train.max_steps=3", "train.export_every=2",
                                        "train.ema_decay=0.5", "output.export_diffusers=true"))
    summary = _run(recipe)
    run = tmp_path / "full_tiny"
    assert summary.lora_path == run / "full_tiny.safetensors"
    assert (run / "full_tiny-step00000002.safetensors").is_file()
    trained = {k: v.clone() for k, v in recipe.bundle.unet.state_dict().items()}
    frozen = recipe.bundle.text_encoders[1].state_dict()
    for source in (summary.lora_path, run / "full_tiny-diffusers"):
        loaded = models.load_model(str(source))
        assert loaded.family == "tiny-sdxl"
        got = loaded.unet.state_dict()
        assert got.keys() == trained.keys() and not _changed(trained, got), source
        assert not _changed(frozen, loaded.text_encoders[1].state_dict())
    with safe_open(str(summary.lora_path), "pt") as f:
        assert f.metadata()["lorasmith.weights"] == "trained" and f.metadata()["ss_steps"] == "3"
    ema = models.load_model(str(run / "full_tiny-ema.safetensors")).unet.state_dict()
    shadow = recipe.weights.ema.state_dict()
    assert all(torch.equal(ema[k], shadow[f"unet.{k}"]) for k in ema)
    assert _changed(trained, ema) == set(trained)  # the EMA is not the trained weights


def test_flux_transformer_and_both_text_encoders_train_and_export(tmp_path, small_data):
    """The same code path for another denoiser: tiny FLUX.1 (transformer, CLIP-L + T5) from random weights."""
    recipe = LoRATrainingRecipe(_config(tmp_path, small_data, "model.source=tiny-flux", "train.max_steps=2",
                                        "train.train_text_encoders=true", "data.cache_text=false"))
    summary = _run(recipe)
    assert {k.split(".", 1)[0] for k, _ in recipe.network.named_parameters()} == {"unet", "te1", "te3"}
    loaded = models.load_model(str(summary.lora_path))
    assert loaded.family == "tiny-flux"
    for mine, theirs in zip([recipe.bundle.denoiser, *recipe.bundle.text_encoders],
                            [loaded.denoiser, *loaded.text_encoders]):
        want = mine.state_dict()
        assert not _changed(want, theirs.state_dict())
    base = models.build_model("tiny-flux", seed=0).denoiser.state_dict()
    assert _changed(base, recipe.bundle.denoiser.state_dict())


# ---- text encoders, samples, validation -------------------------------------------------------------------
def test_text_encoders_train_fully_with_samples_and_validation(tmp_path, small_data):
    recipe = LoRATrainingRecipe(_config(
        tmp_path, small_data, "train.max_steps=2", "train.train_text_encoders=true", "data.cache_text=false",
        "optim.te_lr=1e-4", "sample.prompts=[a red circle]", "sample.every=1", "sample.steps=2",
        "validation.split=0.25", "validation.timesteps=[500]"))
    _run(recipe)
    assert recipe.group_names == ["denoiser", "text_encoders"]
    assert [g["initial_lr"] for g in recipe.optimizer.param_groups] == [1e-3, 1e-4]  # optim.lr, optim.te_lr
    base = _base()
    for i, component in enumerate(("te1", "te2")):
        trained = {k.split(".", 1)[1] for k, _ in recipe.network.named_parameters() if k.startswith(component + ".")}
        before = base.text_encoders[i].state_dict()
        changed = _changed(before, recipe.bundle.text_encoders[i].state_dict())
        assert trained and changed == trained, component
    # CLIP-L is read at its penultimate layer: its last layer gets no gradient and is not trained
    assert not any(k.startswith("te1.text_model.encoder.layers.2.") for k, _ in recipe.network.named_parameters())
    assert any(k.startswith("te2.text_model.encoder.layers.2.") for k, _ in recipe.network.named_parameters())
    assert sorted(p.name for p in (tmp_path / "full_tiny" / "samples").iterdir()) == ["step-00000001.png",
                                                                                   "step-00000002.png"]
    assert recipe.network.training and recipe.bundle.text_encoders[0].training  # back in train mode


# ---- data parallel ----------------------------------------------------------------------------------------
def test_two_process_data_parallel_equals_single_process(tmp_path, small_data):
    """2 gloo processes x batch 2 == 1 process accumulating the same 2 batches per step, with the text
    encoders training too (a trained weight without a gradient would stop DDP)."""
    common = [f"data.path={small_data}", *FAST, "train.max_steps=2", "train.device=cpu",
              "train.train_text_encoders=true", "data.cache_text=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer", "--config", str(FULL), f"output.dir={tmp_path / 'ddp'}", *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = LoRATrainingRecipe(load_config(FULL, [f"output.dir={tmp_path / 'one'}", *common, "train.grad_accum=2"]))
    _run(single)
    ckpt = "full_tiny/checkpoints/step-00000002/adapter.safetensors"
    ddp, one = load_file(str(tmp_path / "ddp" / ckpt)), load_file(str(tmp_path / "one" / ckpt))
    assert ddp.keys() == one.keys() and any(k.startswith("te2.") for k in one)
    for key in one:
        err = (ddp[key] - one[key]).norm() / one[key].norm().clamp(min=1e-12)
        assert err <= 1e-5, (key, float(err))


# ---- config errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["lora.rank=4"], r"lora\.rank: configures LoRA adapters, but train\.mode is full"),
    (["optim.lora_plus_ratio=16"], r"optim\.lora_plus_ratio: sets learning rates of LoRA adapters"),
    (["model.quantize=nf4"], r"model\.quantize: 'nf4' stores the denoiser quantized"),
    (["train.full_dtype=bf16", "train.mixed_precision=bf16", "optim.name=sgd"],
     r"train\.full_dtype: bf16 weights train with AdamW .* optim\.name=sgd"),
    (["train.full_dtype=bf16"], r"train\.mixed_precision: 'no' with train\.full_dtype: bf16"),
    (["train.full_targets=['(']"], r"train\.full_targets\[0\]: invalid regex"),
    (["train.mode=lora", "train.full_targets=[attn]"], r"train\.full_targets: applies to train\.mode: full"),
    (["train.train_text_encoders=true"], r"data\.cache_text: cannot be combined with train\.train_text_encoders"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FULL, overrides)


def test_full_targets_matching_nothing_stop_before_training(tmp_path, small_data):
    cfg = _config(tmp_path, small_data, "train.full_targets=[no_such_layer]")
    with pytest.raises(TrainingError, match=r"train: full_targets: \['no_such_layer'\] matches no trainable"):
        LoRATrainingRecipe(cfg).run()
