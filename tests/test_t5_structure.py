"""Structure and configuration of models.t5: the full-size T5-XXL encoder on the meta device against
transformers' T5EncoderModel, presets, config.json round trip and input checks."""
import pytest
import torch

from models.t5 import (
    T5Config,
    T5Encoder,
    T5LayerNorm,
    t5_config_from_transformers,
    t5_config_to_transformers,
)

# text_encoder_2/config.json of black-forest-labs/FLUX.1-dev (google/t5-v1_1-xxl), as published.
FLUX_T5_CONFIG = {
    "_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
    "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": True, "vocab_size": 32128,
}
XXL_PARAMETERS = 4_762_310_656  # 4.76 B: 24 blocks of 192.9 M, the 131.6 M embedding, bias table, final norm


def test_full_size_names_and_shapes_match_transformers():
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    with torch.device("meta"):
        ours = T5Encoder(T5Config.preset("t5-xxl"))
        ref = T5EncoderModel(HFConfig.from_dict(FLUX_T5_CONFIG))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(expected) == 220  # 24 * 9 + embedding (two names) + bias table + final norm
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert got == expected
    assert got["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (32, 64)
    assert len(list(ours.parameters())) == 219  # the tied embedding counts once
    assert sum(p.numel() for p in ours.parameters()) == XXL_PARAMETERS
    assert sum(p.numel() for p in ref.parameters()) == XXL_PARAMETERS
    assert all(t.is_meta for t in ours.state_dict().values())


def test_meta_model_infers_shapes():
    with torch.device("meta"):
        enc = T5Encoder(T5Config.preset("t5-xxl")).to(torch.bfloat16)
    ids = torch.zeros(2, 512, dtype=torch.long, device="meta")
    out = enc(ids, torch.ones(2, 512, device="meta"))
    assert out.shape == (2, 512, 4096) and out.dtype == torch.bfloat16 and out.is_meta
    assert enc.dtype == torch.bfloat16 and enc.device.type == "meta"


def test_presets_and_config_round_trip():
    xxl = T5Config.preset("t5-xxl")
    assert (xxl.d_model, xxl.d_kv, xxl.d_ff, xxl.num_layers, xxl.num_heads, xxl.vocab_size) == (
        4096, 64, 10240, 24, 64, 32128)
    assert (xxl.relative_attention_num_buckets, xxl.relative_attention_max_distance) == (32, 128)
    assert xxl.layer_norm_epsilon == 1e-6 and xxl.inner_dim == 4096
    assert t5_config_from_transformers(FLUX_T5_CONFIG) == xxl
    tiny = T5Config.preset("tiny-t5")
    assert tiny.vocab_size == 32128 and tiny.num_layers >= 2
    assert t5_config_from_transformers(t5_config_to_transformers(tiny)) == tiny
    assert T5Config.preset("tiny-t5", num_layers=5).num_layers == 5
    with pytest.raises(ValueError, match="unknown T5 preset 't5-base'; known presets: t5-xxl, tiny-t5"):
        T5Config.preset("t5-base")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=0), "d_model"),
        (dict(num_heads=2.5), "num_heads"),
        (dict(relative_attention_num_buckets=7), "relative_attention_num_buckets"),
        (dict(relative_attention_max_distance=8), "relative_attention_max_distance"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
        (dict(eos_token_id=40000), "eos_token_id"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"T5Config.{field}"):
        T5Config(**kwargs)


def test_unsupported_transformers_configs_are_named():
    with pytest.raises(ValueError, match="cfg.json: feed_forward_proj='relu'"):  # original T5 (v1.0)
        t5_config_from_transformers(dict(FLUX_T5_CONFIG, feed_forward_proj="relu"), where="cfg.json")
    with pytest.raises(ValueError, match="cfg.json: model_type='mt5'"):
        t5_config_from_transformers(dict(FLUX_T5_CONFIG, model_type="mt5"), where="cfg.json")
    with pytest.raises(ValueError, match="cfg.json: T5Config.num_heads"):
        t5_config_from_transformers(dict(FLUX_T5_CONFIG, num_heads=0), where="cfg.json")


def test_rms_norm_matches_transformers_including_epsilon():
    from transformers.models.t5.modeling_t5 import T5LayerNorm as HFNorm

    ours, ref = T5LayerNorm(16, 1e-6), HFNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16))
        ref.weight.copy_(ours.weight)
    for scale in (1.0, 1e-3):  # at 1e-3 the variance is ~1e-6: epsilon matters
        x = torch.randn(3, 5, 16) * scale
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=0)
        torch.testing.assert_close(ours.to(torch.bfloat16)(x.bfloat16()), ref.to(torch.bfloat16)(x.bfloat16()))
        ours.float(), ref.float()
    assert ours.to(torch.bfloat16)(torch.randn(2, 16)).dtype == torch.bfloat16


def test_bad_inputs_are_reported():
    enc = T5Encoder(T5Config.preset("tiny-t5"))
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, tokens\) integer tensor"):
        enc(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be"):
        enc(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 3\) differs from input_ids shape \(1, 4\)"):
        enc(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3))
