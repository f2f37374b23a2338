"""Txt2ImgPipeline: whole sampling loops against the reference UNet + scheduler loop, PNG
metadata, argument errors.

Parity: the reference UNet2DConditionModel gets our UNet's weights through the reference
single-file converter (`convert_ldm_unet_checkpoint`, our state dict under the
`model.diffusion_model.` prefix); both loops use the text conditioning from our
`encode_prompt` and the same initial noise, with classifier-free guidance.
"""
import pytest
import torch

import models
from reference_models import diffusers_unet
from trainer.sampling.pipeline import GenerationParams, Txt2ImgPipeline, benchmark_sampling, save_png

PROMPT, NEGATIVE = "a red fox in the snow, watercolor", "blurry, low quality"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()



@pytest.fixture(scope="module")
def bundles():
    return {name: models.build_model(name, seed=0) for name in ("tiny-sd15", "tiny-sdxl")}


def _reference_scheduler(sampler, prediction_type):
    import diffusers

    cfg = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    if sampler == "euler":
        return diffusers.EulerDiscreteScheduler(**cfg)
    if sampler == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **cfg)
    return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **cfg)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("family", ["tiny-sd15", "tiny-sdxl"])
def test_sampling_loop_matches_reference(bundles, family, sampler):
    bundle = bundles[family]
    steps, scale, size = 5, 6.5, 64
    noise = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(4))
    pipe = Txt2ImgPipeline(bundle, sampler=sampler)
    job = pipe.prepare(PROMPT, NEGATIVE, steps=steps, guidance_scale=scale, width=size, height=size, latents=noise)
    ours = pipe.sample(job)

    ref = _reference_loop(bundle, diffusers_unet(bundle.unet), sampler, noise, steps, scale, size)
    assert rel(ours, ref) < 1e-4


def _reference_loop(bundle, ref_unet, sampler, noise, steps, guidance_scale, size):
    """The reference scheduler loop with guidance, driving `ref_unet` from `noise`."""
    sched = _reference_scheduler(sampler, bundle.spec.prediction_type)
    with torch.no_grad():
        context, pooled = bundle.encode_prompt([NEGATIVE, PROMPT])
        kwargs = {}
        if (bundle.spec.base == "sdxl"):
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        sched.set_timesteps(steps)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            model_in = sched.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = ref_unet(model_in, t, encoder_hidden_states=context, **kwargs).sample.chunk(2)
            x = sched.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("family", ["tiny-sd15", "tiny-sdxl"])
def test_sampling_with_a_lora_matches_reference_loading_the_same_file(bundles, family, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    bundle = bundles[family]
    steps, scale, size = 4, 5.0, 64
    ref_unet = diffusers_unet(bundle.unet)  # base weights, before any LoRA
    net = models.inject_lora(bundle, unet="kohya", rank=4)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for adapter in net.adapters().values():
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g) * 0.3)
    path = tmp_path / "style.safetensors"
    net.save(path, dtype=torch.float32)
    net.remove()

    noise = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(5))
    pipe = Txt2ImgPipeline(bundle, sampler="euler")
    loaded = pipe.add_lora(path, 1.0)
    try:
        job = pipe.prepare(PROMPT, NEGATIVE, steps=steps, guidance_scale=scale, width=size, height=size, latents=noise)
        ours = pipe.sample(job)
    finally:
        loaded.remove()
    loader = StableDiffusionXLPipeline if (bundle.spec.base == "sdxl") else StableDiffusionPipeline
    state, alphas = loader.lora_state_dict(load_file(path), unet_config=ref_unet.config)
    loader.load_lora_into_unet(state, alphas, ref_unet)
    ref = _reference_loop(bundle, ref_unet, "euler", noise, steps, scale, size)
    plain = _reference_loop(bundle, diffusers_unet(bundle.unet), "euler", noise, steps, scale, size)
    assert rel(ours, ref) < 1e-4
    assert rel(plain, ref) > 1e-3  # the LoRA changes the result


def test_images_seeds_and_png_metadata(bundles, tmp_path):
    from PIL import Image

    pipe = Txt2ImgPipeline(bundles["tiny-sd15"], sampler="euler_a", model_name="tiny, test")
    pipe.loras.append(("style", 0.8))
    images, latents = pipe(
        ["a cat", "a dog"], negative_prompt="blurry", steps=3, guidance_scale=5.5, seed=10, n=2, width=32, height=64,
        return_latents=True, progress=False,
    )
    assert len(images) == 4 and images[0].size == (32, 64) and images[0].mode == "RGB"
    assert latents.shape == (4, 4, 8, 4)
    text = images[3].info["parameters"]
    assert text == (
        "a dog\nNegative prompt: blurry\n"
        'Steps: 3, Sampler: Euler a, CFG scale: 5.5, Seed: 13, Size: 32x64, Model: "tiny, test", '
        'LoRAs: "style:0.8", Version: lorasmith'
    )
    path = save_png(images[3], tmp_path / "out" / "img.png")
    with Image.open(path) as im:
        assert im.text["parameters"] == text
        assert torch.equal(torch.tensor(list(im.getdata())), torch.tensor(list(images[3].getdata())))

    # Image k of a batch is reproduced alone with seed + k (ancestral noise included).
    alone = pipe.sample(pipe.prepare("a dog", "blurry", steps=3, guidance_scale=5.5, seed=13, width=32, height=64))
    assert rel(alone, latents[3:]) < 1e-5
    other = pipe.sample(pipe.prepare("a dog", "blurry", steps=3, guidance_scale=5.5, seed=14, width=32, height=64))
    assert rel(other, latents[3:]) > 1e-2


def test_guidance_off_uses_one_pass_and_no_negative(bundles):
    pipe = Txt2ImgPipeline(bundles["tiny-sdxl"])
    job = pipe.prepare("a cat", "ugly", steps=2, guidance_scale=1.0, width=64, height=64)
    assert job.cond["context"].shape[0] == 1 and job.cond["pooled"].shape[0] == 1 and job.time_ids.shape == (1, 6)
    assert job.negatives == [""]
    calls = []
    unet = bundles["tiny-sdxl"].unet
    handle = unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        pipe.sample(job)
    finally:
        handle.remove()
    assert calls == [1, 1]


def test_sdxl_micro_conditioning_reaches_the_unet(bundles):
    pipe = Txt2ImgPipeline(bundles["tiny-sdxl"])
    unet = bundles["tiny-sdxl"].unet
    seen = []
    handle = unet.register_forward_hook(lambda m, args, out: seen.append(args[3]))
    try:
        pipe.sample(pipe.prepare("a cat", steps=1, width=64, height=64))
        pipe.sample(pipe.prepare("a cat", steps=1, width=64, height=64, original_size=(128, 96), crop_top_left=(8, 0)))
    finally:
        handle.remove()
    from models.unet import sdxl_vector

    _, pooled = bundles["tiny-sdxl"].encode_prompt(["a cat"])
    expected = sdxl_vector(pooled, torch.tensor([[128.0, 96, 8, 0, 64, 64]]))
    base, cropped = seen
    assert torch.allclose(cropped[1:], expected) and not torch.allclose(base, cropped)


def test_bad_arguments_raise_clear_errors(bundles):
    pipe = Txt2ImgPipeline(bundles["tiny-sdxl"])
    with pytest.raises(ValueError, match="not a multiple of 8"):
        pipe.prepare("x", width=60, height=64)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe.prepare("x", width=64, height=64, latents=torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="unknown sampler"):
        Txt2ImgPipeline(bundles["tiny-sdxl"], sampler="plms")
    with pytest.raises(ValueError, match="negative prompts"):
        pipe.prepare(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="steps"):
        pipe.prepare("x", steps=0)


def test_infotext_quotes_separators():
    p = GenerationParams("p", "", 20, "DPM++ 2M Karras", 7.0, 1, 1024, 768, "C:/models/x.safetensors")
    assert p.infotext() == (
        'p\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 1024x768, '
        'Model: "C:/models/x.safetensors", Version: lorasmith'
    )


def test_benchmark_sampling_reports_per_step_time(bundles):
    out = benchmark_sampling(bundles["tiny-sd15"], steps=2, width=32, height=32, warmup_steps=0)
    assert out["steps"] == 2 and out["s_per_step"] > 0 and out["width"] == 32
    assert out["sample_s"] == pytest.approx(out["s_per_step"] * 2)


# ---- LoRA ------------------------------------------------------------------------------------------
def test_strength_zero_lora_equals_no_lora(bundles, tmp_path):
    bundle = bundles["tiny-sd15"]
    net = models.inject_lora(bundle, unet="attn", rank=4)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for adapter in net.adapters().values():  # fresh adapters have up = 0: make them matter
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g) * 0.5)
    path = tmp_path / "style.safetensors"
    net.save(path, dtype=torch.float32)
    net.remove()

    def run(pipe):
        return pipe.sample(pipe.prepare(PROMPT, NEGATIVE, steps=3, guidance_scale=5.0, seed=1, width=32, height=32))

    plain = run(Txt2ImgPipeline(bundle))
    for strength, same in ((0.0, True), (1.0, False)):
        pipe = Txt2ImgPipeline(bundle)
        loaded = pipe.add_lora(path, strength)
        try:
            out = run(pipe)
        finally:
            loaded.remove()
        assert pipe.loras == [("style", strength)]
        assert (rel(out, plain) < 1e-6) == same, strength
    assert rel(run(Txt2ImgPipeline(bundle)), plain) < 1e-6  # removed cleanly


# ---- CLI -------------------------------------------------------------------------------------------
def test_generate_cli_writes_pngs_with_parameters(tmp_path, capsys):
    from PIL import Image

    from trainer.__main__ import main

    out = tmp_path / "imgs"
    argv = ["generate", "--model", "tiny-sd15", "--prompt", "a cat", "--negative", "dog", "--steps", "2",
            "--guidance-scale", "4", "--seed", "5", "--size", "32x64", "--n", "2", "--sampler", "dpmpp_2m",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-5.png", "00001-6.png"]
    with Image.open(files[1]) as im:
        assert im.size == (32, 64)
        assert im.text["parameters"] == (
            "a cat\nNegative prompt: dog\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 4, Seed: 6, Size: 32x64, "
            "Model: tiny-sd15, Version: lorasmith"
        )
    assert "s/step" in capsys.readouterr().err
    assert main(argv[:-3] + ["--n", "1", "--out", str(out)]) == 0  # numbering continues
    assert max(f.name for f in out.glob("*.png")) == "00002-5.png"


def test_generate_cli_reads_the_old_cfg_flag_as_guidance_scale():
    import argparse

    from trainer.cli.generate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = ["--prompt", "x", "--out", "o"]
    assert parser.parse_args([*common, "--cfg", "3.5"]).guidance_scale == 3.5
    assert parser.parse_args([*common, "--guidance-scale", "2"]).guidance_scale == 2
    assert parser.parse_args(common).guidance_scale is None
    assert "--cfg" not in parser.format_help() and "--guidance-scale" in parser.format_help()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--size", "64by64"], "--size '64by64': expected WIDTHxHEIGHT"),
        (["--size", "60x64"], "multiples of 8"),
        (["--lora", "missing.safetensors:0.7"], "missing.safetensors: no such file"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_generate_cli_bad_arguments(tmp_path, capsys, extra, message):
    from trainer.__main__ import main

    argv = ["generate", "--model", "tiny-sd15", "--prompt", "x", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_parse_helpers():
    from trainer.cli.generate import GenerateArgumentError, parse_lora, parse_size

    assert parse_size("1024x768") == (1024, 768) and parse_size("512") == (512, 512)
    with pytest.raises(GenerateArgumentError):
        parse_size("0x64")
    with pytest.raises(GenerateArgumentError, match="is a directory"):
        parse_lora("/tmp")


# ---- dtypes and devices ----------------------------------------------------------------------------
def test_bfloat16_model_runs_close_to_float32(bundles):
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=2, guidance_scale=5.0, seed=2, width=64, height=64)
    ref_pipe = Txt2ImgPipeline(bundles["tiny-sdxl"])
    ref = ref_pipe.sample(ref_pipe.prepare(**kwargs))
    half = models.build_model("tiny-sdxl", seed=0, dtype=torch.bfloat16)
    pipe = Txt2ImgPipeline(half)
    job = pipe.prepare(**kwargs)
    assert job.cond["context"].dtype == torch.bfloat16 and job.noise.dtype == torch.float32
    out = pipe.sample(job)
    assert out.dtype == torch.float32 and rel(out, ref) < 0.1
    decoded = pipe.decode(out)
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()


@pytest.mark.gpu
def test_cuda_reproduces_cpu_images_for_the_same_seed(bundles):
    # Noise (initial and ancestral) is drawn on CPU, so only kernel rounding differs.
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=5.0, seed=3, width=64, height=64,
                  n=2)
    cpu_pipe = Txt2ImgPipeline(bundles["tiny-sdxl"], sampler="euler_a")
    ref = cpu_pipe.sample(cpu_pipe.prepare(**kwargs))
    gpu_pipe = Txt2ImgPipeline(models.build_model("tiny-sdxl", seed=0).to("cuda"), sampler="euler_a")
    out = gpu_pipe.sample(gpu_pipe.prepare(**kwargs))
    assert out.device.type == "cuda" and rel(out.cpu(), ref) < 1e-2
    fp16 = Txt2ImgPipeline(models.build_model("tiny-sdxl", seed=0, device="cuda", dtype=torch.float16))
    images = fp16(**kwargs, progress=False)
    assert len(images) == 2 and images[0].size == (64, 64)


def test_generate_cli_takes_defaults_and_lora_from_a_training_config(bundles, tmp_path):
    from PIL import Image

    from trainer.__main__ import main

    bundle = models.build_model("tiny-sd15", seed=3)
    net = models.inject_lora(bundle, unet="attn", rank=2)
    run_dir = tmp_path / "runs" / "mystyle"
    run_dir.mkdir(parents=True)
    net.save(run_dir / "mystyle.safetensors")
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {source: tiny-sd15, seed: 3}\n"
        f"output: {{dir: {tmp_path / 'runs'}, name: mystyle}}\n"
        "sample: {steps: 2, guidance_scale: 3.5, sampler: ddim, seed: 42, size: 32, negative_prompt: bad}\n"
    )
    out = tmp_path / "imgs"
    assert main(["generate", "--config", str(config), "--prompt", "a cat", "--out", str(out), "--no-progress"]) == 0
    (path,) = out.glob("*.png")
    with Image.open(path) as im:
        assert im.size == (32, 32)
        assert im.text["parameters"] == (
            "a cat\nNegative prompt: bad\nSteps: 2, Sampler: DDIM, CFG scale: 3.5, Seed: 42, Size: 32x32, "
            'Model: tiny-sd15, LoRAs: "mystyle:1", Version: lorasmith'
        )
