"""ModelBundle: build_model on every family, and encode_prompt against diffusers' own pipelines.

The oracle is `StableDiffusionXLPipeline.encode_prompt` / `StableDiffusionPipeline.encode_prompt`
with transformers text encoders holding the same weights (our CLIP parameter names are the HF
names, so the state dict moves as is) and transformers tokenizers built from the same vocabulary.
"""
import pytest
import torch

import models
from models.bundle import FAMILIES
from reference_models import hf_text_encoder

PROMPTS = ["a photo of a cat", "masterpiece, 1girl, (blue eyes:1.2), long hair", "", "x " * 90]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_build_on_meta_allocates_nothing(family):
    bundle = models.build_model(family, device="meta")
    for name, module in bundle.modules().items():
        devices = {p.device.type for p in module.parameters()}
        assert devices == {"meta"}, name
    assert bundle.family == family
    assert len(bundle.text_encoders) == {"sdxl": 2, "flux": 2}.get(bundle.spec.base, 1)


def test_unknown_family_names_the_supported_ones():
    with pytest.raises(ValueError, match="supported: .*sdxl"):
        models.build_model("sd3")


def test_build_model_seed_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = models.build_model("tiny-sd15", seed=7)
    after = torch.rand(1)
    b = models.build_model("tiny-sd15", seed=7)
    assert torch.equal(after, expected_next)
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(pa, pb)


def _hf_text_encoders(bundle):
    return [hf_text_encoder(te) for te in bundle.text_encoders]


def test_sdxl_encode_prompt_matches_diffusers(hf_files):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    bundle = models.build_model("tiny-sdxl")
    for te in bundle.text_encoders:
        _randomise(te)
    te1, te2 = _hf_text_encoders(bundle)
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=HFTokenizer.from_pretrained(str(hf_files), model_max_length=77),
        tokenizer_2=HFTokenizer.from_pretrained(str(hf_files), pad_token="!", model_max_length=77),
        unet=None,
        scheduler=None,
    )
    with torch.no_grad():
        ref_context, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        context, pooled = bundle.encode_prompt(PROMPTS)
    assert context.shape == (len(PROMPTS), 77, 96) and pooled.shape == (len(PROMPTS), 64)
    assert _rel(context, ref_context) <= 1e-5
    assert _rel(pooled, ref_pooled) <= 1e-5


def test_sd15_encode_prompt_matches_diffusers(hf_files):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    bundle = models.build_model("tiny-sd15")
    _randomise(bundle.text_encoders[0])
    (te,) = _hf_text_encoders(bundle)
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=te,
        tokenizer=HFTokenizer.from_pretrained(str(hf_files), model_max_length=77),
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with torch.no_grad():
        ref_context, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        context, pooled = bundle.encode_prompt(PROMPTS)
    assert pooled is None
    assert _rel(context, ref_context) <= 1e-5


def test_sd2_conditioning_is_penultimate_layer_with_final_norm():
    bundle = models.build_model("sd2", device="meta")
    te = bundle.text_encoders[0]
    assert te.config.projection_dim is None and te.config.activation == "gelu"
    # Real numbers on a tiny stand-in of the same scheme: penultimate hidden state + final LN.
    tiny = models.build_model("tiny-sd15")
    _randomise(tiny.text_encoders[0])
    sd2_like = models.ModelBundle(
        family="sd2", unet=tiny.unet, vae=tiny.vae, text_encoders=tiny.text_encoders, tokenizers=tiny.tokenizers
    )
    ids = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        full = tiny.text_encoders[0](ids[0])
        context, pooled = sd2_like.encode_tokens(ids)
        expected = tiny.text_encoders[0].text_model.final_layer_norm(full.hidden_states[-2])
    assert pooled is None
    assert torch.equal(context, expected)
    assert not torch.allclose(context, full.last_hidden_state)
