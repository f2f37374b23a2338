"""Numerical parity of models.t5.T5Encoder with transformers' T5EncoderModel (test-only oracle).

A tiny random encoder (every parameter randomised) moves to transformers by name, strictly: our
parameter names are the transformers names. transformers is built from our config.json writer, so
the parity also checks that what we write describes the same network.
"""
import pytest
import torch

from models.t5 import (
    T5_EMBEDDING_KEYS,
    T5Config,
    T5Encoder,
    fill_tied_embedding,
    relative_position_buckets,
    t5_config_to_transformers,
)
from reference_models import rel_err

# 41 tokens: relative distances reach the log-spaced buckets and, with the tiny preset's limit of
# 20, the shared last bucket.
T = 41


def randomise_t5(model: T5Encoder, seed: int) -> None:
    """Norm scales around 1, projections ~ 1/sqrt(fan_in), embeddings and position bias ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("relative_attention_bias.weight", "shared.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def hf_model(ours: T5Encoder, attn: str = "eager"):
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    ref = T5EncoderModel(HFConfig.from_dict(t5_config_to_transformers(ours.config), attn_implementation=attn))
    assert ref.config._attn_implementation == attn
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def ours():
    model = T5Encoder(T5Config.preset("tiny-t5")).eval()
    randomise_t5(model, seed=21)
    return model


def batch():
    """Three rows of a padded batch: full, padded after 30 tokens, padded after 6 (pad id 0)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 32100, (3, T), generator=gen)
    mask = torch.ones(3, T, dtype=torch.long)
    for row, length in ((1, 30), (2, 6)):
        ids[row, length - 1] = 1  # EOS
        ids[row, length:] = 0
        mask[row, length:] = 0
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_transformers(ours, attn, masked):
    ref = hf_model(ours, attn)
    ids, mask = batch()
    with torch.no_grad():
        out = ours(ids, mask if masked else None)
        expected = ref(input_ids=ids, attention_mask=mask if masked else None).last_hidden_state
    assert out.shape == (3, T, 32) and out.dtype == torch.float32
    assert rel_err(out, expected) <= 1e-5
    # The mask matters: padded rows change when their padding is hidden.
    with torch.no_grad():
        other = ours(ids, None if masked else mask)
    assert rel_err(other[1:], out[1:]) > 1e-3
    assert rel_err(other[0], out[0]) <= 1e-6  # the unpadded row is unaffected


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for length, buckets, distance in ((600, 32, 128), (T, 32, 20), (9, 8, 3)):
        pos = torch.arange(length)
        expected = T5Attention._relative_position_bucket(
            pos[None, :] - pos[:, None], bidirectional=True, num_buckets=buckets, max_distance=distance
        )
        ours = relative_position_buckets(length, buckets, distance)
        assert torch.equal(ours, expected)
        assert ours.min() == 0 and ours.max() == buckets - 1


def test_bf16_forward(ours):
    ids, mask = batch()
    low = T5Encoder(ours.config).to(torch.bfloat16).eval()
    low.load_state_dict(ours.state_dict())
    ref = hf_model(ours).to(torch.bfloat16)
    with torch.no_grad():
        out = low(ids, mask)
        full = ours(ids, mask)
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out.float(), full) <= 3e-2
    assert rel_err(out.float(), expected.float()) <= 3e-2


def test_fp16_clamps_overflow_like_transformers(ours):
    """Feed-forward outputs beyond the fp16 range are clamped, so the next blocks stay finite; with
    `wo` kept in fp32 (as transformers loads T5 in fp16) the stream continues in fp32."""
    big = T5Encoder(ours.config).eval()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    state["encoder.block.1.layer.1.DenseReluDense.wo.weight"] *= 3e4
    big.load_state_dict(state)
    ids, _ = batch()
    big.half().float()  # both models get the same fp16-rounded weights
    ref = hf_model(big).half()
    half = big.half()
    with torch.no_grad():
        out = half(ids)
        expected = ref(input_ids=ids).last_hidden_state
        mid = half.encoder.block[1](half.encoder.embed_tokens(ids), half.position_bias(T, torch.float16))
    assert torch.isfinite(out).all() and torch.isfinite(mid).all()
    assert mid.abs().max() >= 60000  # the clamp was reached
    assert rel_err(out.float(), expected.float()) <= 1e-2

    for model in (half, ref):
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
    with torch.no_grad():
        out = half(ids)
        expected = ref(input_ids=ids).last_hidden_state
        stream = half.encoder.block[0](half.encoder.embed_tokens(ids), half.position_bias(T, torch.float16))
    assert stream.dtype == torch.float32  # the residual stream after an fp32 `wo`
    assert out.dtype == torch.float16 and torch.isfinite(out).all()  # the final norm casts back
    assert rel_err(out.float(), expected.float()) <= 1e-2


def test_gradient_checkpointing_same_gradients(ours):
    ids, mask = batch()
    grads = []
    for enabled in (False, True):
        model = T5Encoder(ours.config)
        model.load_state_dict(ours.state_dict())
        model.set_gradient_checkpointing(enabled)
        model(ids, mask).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    assert grads[0]["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].abs().sum() > 0


@pytest.mark.parametrize("keep", T5_EMBEDDING_KEYS)
def test_either_embedding_name_loads(ours, keep):
    state = {k: v for k, v in hf_model(ours).state_dict().items() if k not in T5_EMBEDDING_KEYS or k == keep}
    model = T5Encoder(ours.config).eval()
    model.load_state_dict(state, strict=True)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert torch.equal(model.shared.weight, ours.shared.weight)
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(ids), ours(ids))
    assert list(model.state_dict())[:2] == list(T5_EMBEDDING_KEYS)  # both names, as transformers lists them


def test_different_embeddings_are_refused(ours):
    state = dict(ours.state_dict())
    state["encoder.embed_tokens.weight"] = state["shared.weight"] + 1
    with pytest.raises(ValueError, match="shared.weight and encoder.embed_tokens.weight differ"):
        T5Encoder(ours.config).load_state_dict(state)
    same = {"shared.weight": state["shared.weight"], "encoder.embed_tokens.weight": state["shared.weight"].clone()}
    assert fill_tied_embedding(same).keys() == same.keys()
    assert fill_tied_embedding({"x": torch.zeros(1)}) == {"x": torch.zeros(1)}


def test_embedding_alias_inside_a_parent_module(ours):
    parent = torch.nn.ModuleDict({"te": T5Encoder(ours.config)})
    state = {f"te.{k}": v for k, v in ours.state_dict().items() if k != "encoder.embed_tokens.weight"}
    parent.load_state_dict(state, strict=True)
    assert torch.equal(parent["te"].encoder.embed_tokens.weight, ours.shared.weight)
