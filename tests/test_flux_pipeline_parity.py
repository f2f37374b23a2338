"""FLUX.1 prompt encoding, sampling and decoding against diffusers' `FluxPipeline` (test-only oracle)
holding the same weights: tiny-flux, fp32, CPU.

The oracle's parts are transformers' CLIPTextModel and T5EncoderModel (our encoders use the
transformers names, so their state dicts move as they are), diffusers' FluxTransformer2DModel
(weights through our BFL -> diffusers converter) and AutoencoderKL (through our VAE converter),
with transformers tokenizers built from the same vocabularies: CLIP's from the shipped BPE file,
T5's from the tiny family's `tokenizers` object. Its scheduler is configured as the published
FLUX.1 pipelines are: dev with dynamic (resolution-dependent) shifting, schnell with none.
"""
import dataclasses

import pytest
import torch

import models
from models.checkpoints.diffusers_keys import vae_state_dict_to_diffusers
from models.checkpoints.flux_keys import flux_config_to_diffusers, flux_state_dict_to_diffusers
from models.flux import FluxTransformer, pack_latents, unpack_latents
from models.t5 import t5_config_to_transformers
from reference_models import diffusers_vae_config, hf_text_encoder, randomise, rel_err
from trainer.sampling.pipeline import Txt2ImgPipeline

PROMPTS = ["a photo of a cat", "", "masterpiece, 1girl, (blue eyes:1.2), long hair", "x " * 90]
# Non-square on purpose: a transposed packing or position id would show.
HEIGHT, WIDTH = 48, 64


def _randomise_encoders(bundle, seed: int) -> None:
    """Random text encoders (default-initialised ones give near-constant outputs): CLIP's linear and
    norm layers as the other parity tests do, every T5 parameter around its natural scale."""
    clip, t5 = bundle.text_encoders
    randomise(clip, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in t5.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("relative_attention_bias.weight", "shared.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def _randomise_denoiser(model: FluxTransformer, seed: int) -> None:
    """Linear layers at ~1/sqrt(fan_in), RMSNorm scales around 1: every path carries signal."""
    randomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))


def _schnell_like(dev):
    """tiny-flux built as FLUX.1-schnell is: no guidance embedding, no time shift."""
    spec = dataclasses.replace(dev.spec, name="tiny-flux-schnell", distilled_guidance=None, flow_shift=None,
                               default_steps=4)
    denoiser = FluxTransformer(dataclasses.replace(dev.denoiser.config, guidance_embed=False)).eval()
    _randomise_denoiser(denoiser, seed=31)
    return models.ModelBundle("tiny-flux", denoiser=denoiser, vae=dev.vae, text_encoders=dev.text_encoders,
                              tokenizers=dev.tokenizers, spec=spec)


def _scheduler(shift: tuple[float, float] | None):
    """FlowMatchEulerDiscreteScheduler as in the published scheduler_config.json of FLUX.1-dev
    (dynamic shifting over 256..4096 tokens) or FLUX.1-schnell (no shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if shift is None:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=shift[0], max_shift=shift[1],
        base_image_seq_len=256, max_image_seq_len=4096)


def _oracle(bundle, hf_files):
    """FluxPipeline holding `bundle`'s weights."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    clip, t5 = bundle.text_encoders
    text_encoder_2 = T5EncoderModel(T5Config.from_dict(t5_config_to_transformers(t5.config))).eval()
    text_encoder_2.load_state_dict(t5.state_dict(), strict=True)

    cfg = bundle.denoiser.config
    transformer = FluxTransformer2DModel(
        **{k: v for k, v in flux_config_to_diffusers(cfg).items() if not k.startswith("_")}).eval()
    transformer.load_state_dict(flux_state_dict_to_diffusers(bundle.denoiser.state_dict(), cfg), strict=True)

    vae = AutoencoderKL(**diffusers_vae_config(bundle.vae.config, sample_size=bundle.spec.resolution)).eval()
    vae.load_state_dict(vae_state_dict_to_diffusers(bundle.vae.state_dict(), bundle.vae.config), strict=True)

    t5_tok = bundle.tokenizers[1]
    pipe = FluxPipeline(
        scheduler=_scheduler(bundle.spec.flow_shift),
        vae=vae,
        text_encoder=hf_text_encoder(clip),
        tokenizer=CLIPTokenizer.from_pretrained(str(hf_files), model_max_length=77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=T5TokenizerFast(tokenizer_object=t5_tok._tok, eos_token="</s>", pad_token="<pad>",
                                    unk_token="<unk>", extra_ids=0, model_max_length=t5_tok.max_length),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dev():
    bundle = models.build_model("tiny-flux", seed=0)
    _randomise_encoders(bundle, seed=7)
    _randomise_denoiser(bundle.denoiser, seed=11)
    randomise(bundle.vae, seed=13)
    for module in bundle.modules().values():
        module.eval()
    return bundle


@pytest.fixture(scope="module")
def dev_pipe(dev, hf_files):
    return _oracle(dev, hf_files)


# ---- (a) prompt encoding -----------------------------------------------------------------------
def test_encode_prompt_matches_diffusers(dev, dev_pipe):
    t5_length = dev.spec.t5_max_length
    with torch.no_grad():
        ref_context, ref_pooled, ref_text_ids = dev_pipe.encode_prompt(
            PROMPTS, prompt_2=None, device="cpu", max_sequence_length=t5_length)
        cond = dev.conditioning(dev.tokenize(PROMPTS))
    assert cond["context"].shape == ref_context.shape == (len(PROMPTS), t5_length, 32)
    assert cond["pooled"].shape == ref_pooled.shape == (len(PROMPTS), 32)
    assert rel_err(cond["context"], ref_context) <= 1e-5
    assert rel_err(cond["pooled"], ref_pooled) <= 1e-5
    assert torch.equal(ref_text_ids, torch.zeros(t5_length, 3))
    # Rows differ (an encoder ignoring its input would not), the empty prompt included.
    for i in range(1, len(PROMPTS)):
        assert rel_err(cond["context"][i], cond["context"][0]) > 1e-2
        assert rel_err(cond["pooled"][i], cond["pooled"][0]) > 1e-2


def test_token_ids_match_the_oracle_tokenizers(dev, dev_pipe):
    """CLIP-L rows padded with EOS to 77, T5 rows cut at t5_max_length - 1 then EOS, padded with 0."""
    clip_ids, t5_ids = dev.tokenize(PROMPTS)
    kwargs = {"padding": "max_length", "truncation": True, "return_tensors": "pt"}
    ref_clip = dev_pipe.tokenizer(PROMPTS, max_length=77, **kwargs).input_ids
    ref_t5 = dev_pipe.tokenizer_2(PROMPTS, max_length=dev.spec.t5_max_length, **kwargs).input_ids
    assert torch.equal(clip_ids, ref_clip) and torch.equal(t5_ids, ref_t5)
    assert t5_ids[-1, -1] == 1 and t5_ids[1, :2].tolist() == [1, 0]  # long prompt cut before EOS; "" is EOS, pad
    assert clip_ids[1, 1:].eq(49407).all()  # CLIP-L pads with EOS


def test_encode_comparison_catches_convention_errors(dev, dev_pipe):
    """What the parity above would catch: T5 run with an attention mask over its padding (diffusers'
    FluxPipeline attends to it), the pooled vector read at the row's end instead of its first EOS."""
    clip, t5 = dev.text_encoders
    clip_ids, t5_ids = dev.tokenize(PROMPTS)
    with torch.no_grad():
        ref_context, ref_pooled, _ = dev_pipe.encode_prompt(PROMPTS, None, device="cpu",
                                                            max_sequence_length=dev.spec.t5_max_length)
        masked = t5(t5_ids, (t5_ids != 0).long())
        last = clip(clip_ids).last_hidden_state[:, -1]
    assert rel_err(masked, ref_context) > 1e-2
    assert rel_err(last, ref_pooled) > 1e-2


# ---- (b, c) the denoising loop and decoding ----------------------------------------------------
def _seeded_noise(seed: int, batch: int, height: int, width: int) -> torch.Tensor:
    """The initial noise `Txt2ImgPipeline.prepare` draws: image k from its own CPU generator seeded
    seed + k, (1, 16, H/8, W/8) each."""
    return torch.cat([torch.randn((1, 16, height // 8, width // 8), generator=torch.Generator().manual_seed(seed + k))
                      for k in range(batch)])


def _oracle_run(pipe, prompts, noise, steps, guidance):
    """FluxPipeline run from `noise` (B, 16, h, w): (final latents (B, 16, h, w), image (B, 3, H, W) in [0, 1])."""
    h, w = noise.shape[-2:]
    seen = {}

    def keep_latents(p, i, t, kwargs):
        seen["latents"] = kwargs["latents"]
        return {}

    with torch.no_grad():
        image = pipe(prompts, height=8 * h, width=8 * w, num_inference_steps=steps, guidance_scale=guidance,
                     latents=pack_latents(noise), output_type="pt",
                     max_sequence_length=pipe.tokenizer_2.model_max_length, callback_on_step_end=keep_latents,
                     callback_on_step_end_tensor_inputs=["latents"]).images
    return unpack_latents(seen["latents"], h, w), image


def _ours(bundle, prompts, steps, guidance, seed=0, latents=None):
    pipe = Txt2ImgPipeline(bundle)
    job = pipe.prepare(prompts, steps=steps, guidance_scale=guidance, seed=seed, width=WIDTH, height=HEIGHT,
                       latents=latents)
    latents = pipe.sample(job)
    return job, latents, (pipe.decode(latents) / 2 + 0.5).clamp(0, 1)


def test_dev_sampling_matches_diffusers(dev, dev_pipe):
    prompts, seed, steps = ["a watercolor fox", "a red cube on a table"], 5, 6
    job, latents, image = _ours(dev, prompts, steps, guidance=3.5, seed=seed)
    noise = _seeded_noise(seed, len(prompts), HEIGHT, WIDTH)
    assert torch.equal(job.noise, noise)
    ref_latents, ref_image = _oracle_run(dev_pipe, prompts, noise, steps, guidance=3.5)
    assert latents.shape == ref_latents.shape == (2, 16, HEIGHT // 8, WIDTH // 8)
    assert rel_err(latents, ref_latents) <= 1e-5
    assert rel_err(latents, noise) > 0.1  # the run moved away from the noise
    assert image.shape == ref_image.shape == (2, 3, HEIGHT, WIDTH)
    assert (image - ref_image).abs().max().item() <= 1e-5

    # The comparison catches a missing time shift and a wrong embedded guidance value.
    scheduler = dev_pipe.scheduler
    try:
        dev_pipe.scheduler = _scheduler(None)
        unshifted, _ = _oracle_run(dev_pipe, prompts, noise, steps, guidance=3.5)
    finally:
        dev_pipe.scheduler = scheduler
    other_guidance, _ = _oracle_run(dev_pipe, prompts, noise, steps, guidance=1.0)
    assert rel_err(latents, unshifted) > 1e-3
    assert rel_err(latents, other_guidance) > 1e-3


def test_decode_comparison_catches_a_missing_latent_shift(dev, dev_pipe):
    z = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = Txt2ImgPipeline(dev).decode(z)
        cfg = dev_pipe.vae.config
        ref = dev_pipe.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample
        unshifted = dev_pipe.vae.decode(z / cfg.scaling_factor).sample
    assert rel_err(ours, ref) <= 1e-5
    assert rel_err(ours, unshifted) > 1e-3


def test_schnell_sampling_matches_diffusers(dev, hf_files):
    schnell = _schnell_like(dev)
    pipe = _oracle(schnell, hf_files)
    prompts, steps = ["a lighthouse at dusk"], 4
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(2))
    job, latents, image = _ours(schnell, prompts, steps, guidance=7.0, latents=noise)  # no guidance input: ignored
    assert job.distilled_guidance is None and job.shift == "none" and torch.equal(job.noise, noise)
    ref_latents, ref_image = _oracle_run(pipe, prompts, noise, steps, guidance=7.0)
    assert rel_err(latents, ref_latents) <= 1e-5
    assert (image - ref_image).abs().max().item() <= 1e-5
    # With dev's dynamic shifting the oracle lands elsewhere: the schedule is compared too.
    pipe.scheduler = _scheduler(dev.spec.flow_shift)
    shifted, _ = _oracle_run(pipe, prompts, noise, steps, guidance=7.0)
    assert rel_err(latents, shifted) > 1e-3
