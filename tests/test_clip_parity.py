"""CLIPTextEncoder against transformers' CLIP text models and open_clip's TextTransformer.

Tiny configs, random weights (LayerNorms included), CPU float32, relative error <= 1e-5 as
(ours - ref).norm() / ref.norm(). Weight mapping: transformers -> ours by identical names (minus
`HF_IGNORED_KEYS`); open_clip -> ours through `models.checkpoints.openclip_keys.openclip_to_hf`.
open_clip's weights and outputs are recorded data (`open_clip_oracle`, tests/fixtures/).
"""
import pytest
import torch
from torch import nn

import open_clip_oracle
from models.clip import CLIPTextConfig, CLIPTextEncoder
from models.checkpoints.openclip_keys import HF_IGNORED_KEYS, hf_to_openclip, openclip_to_hf

BOS, EOS = 49406, 49407
TOL = 1e-5


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def randomize_(module: nn.Module, seed: int) -> None:
    """Non-trivial values everywhere: weights ~ N(0, 1/fan_in), biases and LN shifts ~ N(0, 0.1),
    LN scales ~ 1 + N(0, 0.1), embeddings ~ N(0, 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(s in name for s in ("norm", "ln_"))
            if is_norm and leaf == "weight":
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


def make_ids(pad_id: int, batch: int = 5, seed: int = 0) -> torch.Tensor:
    """(batch, 77) ids: BOS, random tokens, EOS at varied positions (1 .. 76), then pad_id."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BOS, (batch, 77), generator=gen)
    ids[:, 0] = BOS
    eos_positions = [1, 9, 40, 75, 76][:batch]
    for row, pos in enumerate(eos_positions):
        ids[row, pos] = EOS
        ids[row, pos + 1 :] = pad_id
    return ids


def hf_config(cfg: CLIPTextConfig):
    from transformers import CLIPTextConfig as HFConfig

    return HFConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.projection_dim or cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=1,
    )


def load_from_hf(ours: CLIPTextEncoder, hf: nn.Module) -> None:
    """Identical names; transformers 5's CLIPTextModel lists its text transformer's entries without
    the `text_model.` prefix that saved checkpoints (and CLIPTextModelWithProjection) use."""
    state = {}
    for k, v in hf.state_dict().items():
        if not k.startswith(("text_model.", "text_projection.")):
            k = "text_model." + k
        if k not in HF_IGNORED_KEYS:
            state[k] = v
    ours.load_state_dict(state, strict=True)


@pytest.mark.parametrize("pad_id", [EOS, 0], ids=["pad-eos", "pad-zero"])
def test_clip_l_matches_transformers(pad_id):
    from transformers import CLIPTextModel

    cfg = CLIPTextConfig.preset("tiny-clip-l")
    hf = CLIPTextModel(hf_config(cfg)).eval()
    randomize_(hf, seed=1)
    ours = CLIPTextEncoder(cfg).eval()
    load_from_hf(ours, hf)
    ids = make_ids(pad_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids)
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert rel_err(a, b) <= TOL, f"hidden_states[{i}]"
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert out.pooled.shape == (5, cfg.hidden_size)
    assert rel_err(out.pooled, ref.pooler_output) <= TOL
    # The pooled row really is the first EOS (HF and we agree on it; guard against both being wrong).
    assert torch.equal(out.pooled[1], out.last_hidden_state[1, 9])


@pytest.mark.parametrize("pad_id", [EOS, 0], ids=["pad-eos", "pad-zero"])
def test_bigg_matches_transformers_with_projection(pad_id):
    from transformers import CLIPTextModelWithProjection

    cfg = CLIPTextConfig.preset("tiny-bigg")
    hf = CLIPTextModelWithProjection(hf_config(cfg)).eval()
    randomize_(hf, seed=2)
    ours = CLIPTextEncoder(cfg).eval()
    load_from_hf(ours, hf)
    ids = make_ids(pad_id, seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert rel_err(a, b) <= TOL, f"hidden_states[{i}]"
    assert rel_err(out.hidden_states[-2], ref.hidden_states[-2]) <= TOL
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert out.pooled.shape == (5, cfg.projection_dim)
    assert rel_err(out.pooled, ref.text_embeds) <= TOL


@pytest.mark.parametrize("case", ["bigg.pad_eos", "bigg.pad_zero"])
def test_bigg_matches_open_clip(case):
    cfg = CLIPTextConfig.preset("tiny-bigg")
    tower = open_clip_oracle.tower_config()
    assert (tower["width"], tower["layers"], tower["mlp"], tower["output_dim"]) == (
        cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.projection_dim)
    prefix = "conditioner.embedders.1.model."
    checkpoint = {prefix + k: v for k, v in open_clip_oracle.tower_state_dict().items()}
    checkpoint[prefix + "logit_scale"] = torch.tensor(4.6)  # harmless extra in SDXL files
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other parts are skipped
    ours = CLIPTextEncoder(cfg).eval()
    ours.load_state_dict(openclip_to_hf(checkpoint, prefix), strict=True)

    ref = open_clip_oracle.outputs(cfg.num_heads, case)
    with torch.no_grad():
        out = ours(open_clip_oracle.token_ids(case))
    for i in range(1, cfg.num_layers + 1):
        assert rel_err(out.hidden_states[i], ref[f"hidden.{i}"]) <= TOL, f"layer {i}"
    assert rel_err(out.hidden_states[-2], ref[f"hidden.{cfg.num_layers - 1}"]) <= TOL  # SDXL's context layer
    assert rel_err(out.last_hidden_state, ref["final"]) <= TOL
    assert rel_err(out.pooled, ref["pooled"]) <= TOL


def test_openclip_keys_round_trip_exact():
    cfg = CLIPTextConfig.preset("tiny-bigg")
    sd = open_clip_oracle.tower_state_dict()
    hf = openclip_to_hf(sd)
    # Views, not copies: usable on memory-mapped checkpoints.
    q = hf["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    fused = sd["transformer.resblocks.0.attn.in_proj_weight"]
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(hf["text_projection.weight"], sd["text_projection"].T)
    back = hf_to_openclip(hf, prefix="cond.")
    assert set(back) == {"cond." + k for k in sd}
    for k, v in sd.items():
        assert torch.equal(back["cond." + k], v), k
        assert back["cond." + k].is_contiguous()
    ours = CLIPTextEncoder(cfg)
    ours.load_state_dict(hf)
    assert set(hf_to_openclip(ours.state_dict())) == set(sd)


def test_openclip_keys_errors():
    good = {"m.token_embedding.weight": torch.zeros(2, 2)}
    with pytest.raises(KeyError, match="m.transformer.resblocks.0.attn.bogus"):
        openclip_to_hf({**good, "m.transformer.resblocks.0.attn.bogus": torch.zeros(1)}, "m.")
    with pytest.raises(ValueError, match="no OpenCLIP text-tower keys"):
        openclip_to_hf(good, "other.")
    with pytest.raises(KeyError, match="missing k_proj, v_proj"):
        hf_to_openclip({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(KeyError, match="not CLIP text encoder parameters"):
        hf_to_openclip({"vision_model.foo": torch.zeros(1)})
    # Extras are dropped silently.
    assert openclip_to_hf({**good, "m.attn_mask": torch.zeros(1), "m.visual.proj": torch.zeros(1)}, "m.").keys() == {
        "text_model.embeddings.token_embedding.weight"
    }


class _CallCounter:
    def __init__(self, module: nn.Module):
        self.count = 0
        module.register_forward_pre_hook(self)  # pre-hook: the recomputation may stop before the end

    def __call__(self, *args):
        self.count += 1


def test_output_layer_stops_early_and_is_exact():
    cfg = CLIPTextConfig.preset("tiny-bigg")
    ours = CLIPTextEncoder(cfg).eval()
    randomize_(ours, seed=7)
    ids = make_ids(0, seed=8)
    last = _CallCounter(ours.text_model.encoder.layers[-1])
    with torch.no_grad():
        full = ours(ids)
        assert last.count == 1
        early = ours(ids, output_layer=-2)
        assert last.count == 1, "the last layer must not run"
        first = ours(ids, output_layer=0)
        same = ours(ids, output_layer=-1)
    assert len(early.hidden_states) == cfg.num_layers + 1
    assert torch.equal(early.hidden_states[-2], full.hidden_states[-2])
    assert early.hidden_states[-1] is None and early.last_hidden_state is None and early.pooled is None
    assert torch.equal(first.hidden_states[0], full.hidden_states[0]) and first.hidden_states[1] is None
    assert torch.equal(same.pooled, full.pooled)
    for bad in (cfg.num_layers + 1, -(cfg.num_layers + 2), 1.5):
        with pytest.raises(ValueError, match="output_layer"):
            ours(ids, output_layer=bad)


def test_gradient_checkpointing_same_values_and_grads():
    cfg = CLIPTextConfig.preset("tiny-clip-l")
    ours = CLIPTextEncoder(cfg).train()
    randomize_(ours, seed=9)
    ids = make_ids(EOS, seed=10)

    def run():
        ours.zero_grad()
        out = ours(ids)
        (out.last_hidden_state.square().mean() + out.pooled.sum()).backward()
        return out.last_hidden_state.detach(), [p.grad.clone() for p in ours.parameters()]

    ref_out, ref_grads = run()
    ours.set_gradient_checkpointing(True)
    calls = _CallCounter(ours.text_model.encoder.layers[0])
    out, grads = run()
    assert calls.count == 2, "with checkpointing the layer is re-run in backward"
    assert torch.allclose(out, ref_out, rtol=0, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= TOL
    with torch.no_grad():  # no recomputation bookkeeping without grads
        calls.count = 0
        ours(ids)
        assert calls.count == 1


def test_input_validation():
    ours = CLIPTextEncoder(CLIPTextConfig.preset("tiny-clip-l"))
    with pytest.raises(ValueError, match="integer tensor"):
        ours(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="77 positions"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    assert ours(torch.full((2, 10), EOS)).last_hidden_state.shape == (2, 10, 32)  # shorter is fine
