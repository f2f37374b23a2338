"""End-to-end LoRA training on the tiny FLUX.1 family: the quickstart config with tiny-flux, the
attention + MLP preset, 64 px buckets and cached latents/text. Preview images, the validation loss
with the embedded guidance value, exact resume, text-encoder adapters (CLIP-L and T5), `--check`
of flow-incompatible keys and `generate` with the trained LoRA. CPU, a few steps per run."""
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_runs import TINY_LORA, copy_quickstart_images

import trainer.__main__ as cli
from trainer.config import load_config
from trainer.recipe import LoRATrainingRecipe

# Fast in-process runs (as tests/test_train.py), on tiny-flux with its attention + MLP preset.
FLUX = ["model.source=tiny-flux", "lora.preset=attn-mlp", "data.resolution=64", "data.bucket_step=32",
        "data.num_workers=0", "data.cache_latents=true", "data.cache_text=true", "output.tensorboard=false",
        "train.log_every=1", "optim.warmup_steps=0", "train.batch_size=2", "train.save_every=0"]
TRAIN_GUIDANCE = 2.0  # not the family's training default (1.0) nor its sampling default (3.5)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """8 of the quickstart images (4 batches of 2 per epoch)."""
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 8)


def _config(out: Path, data: Path, *overrides):
    return load_config(TINY_LORA, [f"output.dir={out}", f"data.path={data}", *FLUX, *overrides])


def _record_guidance(module: torch.nn.Module) -> list[tuple[str, float | None]]:
    """(phase, embedded guidance) of every transformer call; phase "train" (gradients on),
    "sample" (inference mode, the preview pipeline) or "eval" (no gradients: the validation loss)."""
    calls = []

    def hook(_, args):  # forward(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        guidance = args[6] if len(args) > 6 else None
        phase = ("sample" if torch.is_inference_mode_enabled() else "train" if torch.is_grad_enabled() else "eval")
        values = None if guidance is None else sorted(set(guidance.flatten().tolist()))
        calls.append((phase, values))

    module.register_forward_pre_hook(hook)
    return calls


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
    """One 6-step run with preview images and the validation loss every 3 steps."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("run")
    cfg = _config(out, small_data, "train.max_steps=6", f"train.guidance={TRAIN_GUIDANCE}",
                  "sample.prompts=[a red circle, a blue square]", "sample.every=3", "sample.steps=2",
                  "optim.scheduler=constant", "optim.lr=1e-2", "validation.split=0.25", "validation.every=3")
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    calls = _record_guidance(recipe.bundle.denoiser)
    summary = recipe.train()
    calls = list(calls)  # the run's calls only
    # The validation loss again, now and with another guidance value (while the accelerator lives).
    measure = recipe.validation.measure
    val = [measure(recipe.weights, recipe.denoiser, recipe.accelerator)["val/loss"]]
    recipe.validation.guidance = 5.0
    val.append(measure(recipe.weights, recipe.denoiser, recipe.accelerator)["val/loss"])
    recipe.validation.guidance = TRAIN_GUIDANCE
    val.append(measure(recipe.weights, recipe.denoiser, recipe.accelerator)["val/loss"])
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return SimpleNamespace(cfg=cfg, recipe=recipe, summary=summary, calls=calls, val=val, dir=out / "quickstart")


def test_training_exports_a_flux_lora(trained):
    cfg, recipe, summary, run = trained.cfg, trained.recipe, trained.summary, trained.dir
    assert summary.completed and len(summary.losses) == 6
    assert all(torch.isfinite(torch.tensor(summary.losses)))
    assert summary.lora_path == run / "quickstart.safetensors"
    state = load_file(str(summary.lora_path))
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    double = {s for s in stems if s.startswith("lora_unet_double_blocks_")}
    single = {s for s in stems if s.startswith("lora_unet_single_blocks_")}
    assert stems == double | single  # nothing else: no UNet names, no text encoders
    depth, single_depth = recipe.bundle.denoiser.config.depth, recipe.bundle.denoiser.config.depth_single_blocks
    parts = ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
             "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")
    assert double == {f"lora_unet_double_blocks_{i}_{p}" for i in range(depth) for p in parts}
    assert single == {f"lora_unet_single_blocks_{i}_{p}" for i in range(single_depth) for p in ("linear1", "linear2")}
    for stem in stems:
        assert float(state[f"{stem}.alpha"]) == cfg.lora.alpha
        assert state[f"{stem}.lora_down.weight"].shape[0] == cfg.lora.rank
        assert state[f"{stem}.lora_up.weight"].abs().max() > 0  # every adapter trained


@torch.no_grad()
def _flow_losses(cfg, lora: Path) -> dict[float, float]:
    """Flow-matching loss on the training images at fixed noise and times, with the exported LoRA
    loaded into a fresh base model at strength 0 (the base) and 1."""
    import models
    from data.dataset import build_dataset
    from data.loader import build_dataloader

    bundle = models.build_model(cfg.model.source, seed=cfg.model.seed)
    network = models.load_lora(bundle, lora)
    dataset = build_dataset(cfg.data, seed=0, log_summary=False, holdout=cfg.validation.split)  # as the run split
    batch = next(iter(build_dataloader(dataset, len(dataset), shuffle=False)))
    assert len(batch["pixels"]) == 6
    x0 = bundle.vae.scale_latents(bundle.vae.encode(batch["pixels"]).mean)
    cond = bundle.conditioning(bundle.tokenize(batch["caption"]))
    gen = torch.Generator().manual_seed(1000)
    draws = [(torch.randn(x0.shape, generator=gen), t) for t in (0.25, 0.5, 0.75, 0.9)]
    guidance = torch.full((len(x0),), TRAIN_GUIDANCE)
    losses = {}
    for multiplier in (0.0, 1.0):
        network.multiplier = multiplier
        total = 0.0
        for noise, t in draws:
            times = torch.full((len(x0),), t)
            pred = bundle.denoise((1 - t) * x0 + t * noise, times, cond, guidance=guidance)
            total += torch.nn.functional.mse_loss(pred, noise - x0).item()
        losses[multiplier] = total / len(draws)
    return losses


def test_the_trained_lora_lowers_the_flow_loss(trained):
    losses = _flow_losses(trained.cfg, trained.summary.lora_path)
    assert losses[1.0] < 0.97 * losses[0.0], losses


def test_previews_and_validation_embed_their_guidance(trained):
    recipe, calls, run = trained.recipe, trained.calls, trained.dir
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    with Image.open(run / "samples" / "step-00000006.png") as im:
        assert im.size == (128, 64)  # 2 prompts side by side at the family resolution
    phases = {phase for phase, _ in calls}
    assert phases == {"train", "sample", "eval"}
    # Training and the validation loss embed train.guidance; previews FLUX.1-dev's 3.5.
    assert {tuple(g) for phase, g in calls if phase in ("train", "eval")} == {(TRAIN_GUIDANCE,)}
    assert {tuple(g) for phase, g in calls if phase == "sample"} == {(3.5,)}
    eval_calls = sum(phase == "eval" for phase, _ in calls)
    assert eval_calls == 2 * len(recipe.validation.items)  # at steps 3 and 6, one call per image

    loss, other, again = trained.val
    assert torch.isfinite(torch.tensor(loss)) and loss == again  # fixed noise and times
    assert abs(other - loss) > 1e-4 * loss  # the guidance value reaches the loss


def test_interrupt_and_resume_equal_uninterrupted_run(tmp_path, small_data):
    extra = ["train.max_steps=5", "lora.dropout=0.1", "lora.module_dropout=0.2", "data.caption_dropout=0.3",
             "train.timestep_sampling=logit_normal", "optim.scheduler=cosine"]
    full = LoRATrainingRecipe(_config(tmp_path / "a", small_data, *extra))
    full_summary = full.run()
    assert full_summary.completed and len(full_summary.losses) == 5

    part = LoRATrainingRecipe(_config(tmp_path / "b", small_data, *extra))
    part.setup()
    step_fn = part._train_step

    def interrupted_step(batches):
        step_fn(batches)
        if part.step == 2:  # the third step is running: Ctrl-C arrives now
            signal.raise_signal(signal.SIGINT)

    part._train_step = interrupted_step
    part_summary = part.train()
    assert not part_summary.completed and "SIGINT at step 3" in part_summary.stopped
    assert part_summary.checkpoint.name == "step-00000003"

    resumed = LoRATrainingRecipe(_config(tmp_path / "b", small_data, *extra, "train.resume=latest"))
    resumed_summary = resumed.run()
    assert resumed_summary.completed and resumed_summary.start_step == 3
    assert part_summary.losses + resumed_summary.losses == full_summary.losses
    want, got = full.network.state_dict(), resumed.network.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), key


def test_text_encoder_training_adapts_clip_l_and_t5(tmp_path, small_data):
    cfg = _config(tmp_path, small_data, "train.max_steps=2", "train.train_text_encoders=true",
                  "data.cache_text=false", "optim.te_lr=1e-3")
    recipe = LoRATrainingRecipe(cfg)
    summary = recipe.run()
    assert summary.completed and all(torch.isfinite(torch.tensor(summary.losses)))
    assert recipe.group_names == ["unet_lora", "text_encoder_lora"]
    state = load_file(str(summary.lora_path))
    for prefix in ("lora_te1_text_model_encoder_layers_", "lora_te3_encoder_block_"):
        ups = [v for k, v in state.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups, f"no {prefix}* adapters in {sorted(state)[:4]}"
        assert all(u.abs().max() > 0 for u in ups), prefix  # gradients reached every encoder adapter
    assert not any(k.startswith("lora_te2_") for k in state)


def test_check_accepts_tiny_flux_and_names_flow_incompatible_keys(capsys):
    base = ["--config", str(TINY_LORA), "model.source=tiny-flux", "lora.preset=attn-mlp", "--check"]
    assert cli.main(base) == 0
    assert "config OK" in capsys.readouterr().err
    cases = {
        "train.min_snr_gamma=5": "train.min_snr_gamma: belongs to noise-schedule (DDPM) training",
        "sample.sampler=ddim": "sample.sampler: 'ddim' is a noise-schedule sampler",
        "train.gradient_checkpointing=layer": "train.gradient_checkpointing: 'layer' is not available for FLUX.1",
        "data.resolution=72": "data.resolution: 72 must be a multiple of 16",
    }
    for override, message in cases.items():
        assert cli.main([*base[:-1], override, "--check"]) == 2, override
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (override, err)


def test_generate_with_the_trained_lora(trained, tmp_path, capsys):
    lora = trained.summary.lora_path
    out = tmp_path / "imgs"
    argv = ["generate", "--model", "tiny-flux", "--prompt", "a red circle", "--steps", "3", "--size", "64x48",
            "--seed", "4", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert cli.main([*argv[:-3], "--lora", f"{lora}:1.0", "--out", str(out / "lora"), "--no-progress"]) == 0
    capsys.readouterr()
    (plain,), (adapted,) = sorted(out.glob("*.png")), sorted((out / "lora").glob("*.png"))
    with Image.open(plain) as a, Image.open(adapted) as b:
        assert a.size == b.size == (64, 48)
        assert a.text["parameters"].startswith("a red circle\nSteps: 3, Sampler: Euler, CFG scale: 1, "
                                               "Distilled CFG Scale: 3.5, Shift: mu ")
        assert 'LoRAs: "quickstart:1"' in b.text["parameters"]
        assert a.tobytes() != b.tobytes()  # the LoRA changes the image
