"""Numerical parity of models.flux.FluxTransformer with diffusers' FluxTransformer2DModel (test-only oracle).

Weights move from our reference-named state dict to diffusers through diffusers' own
`convert_flux_transformer_checkpoint_to_diffusers` (fed with the `model.diffusion_model.` prefix
of a ComfyUI-saved file), an independent definition of the reference names; the result is loaded
strictly. That converter hard-codes Flux.1's width (3072) where it splits a single block's
`linear1` into q | k | v | mlp, so for tiny models `reference_state` passes it full-width probes
that name their source, reads which rows went where, and applies the same split at tiny width.
"""
import pytest
import torch

from models.checkpoints.flux_keys import (
    FluxDiffusersView,
    flux_config_to_diffusers,
    flux_state_dict_from_diffusers,
    flux_state_dict_to_diffusers,
)
from models.flux import FluxConfig, FluxTransformer, image_ids, pack_latents, text_ids
from reference_models import randomise, rel_err

PREFIX = "model.diffusion_model."
REFERENCE_WIDTH = 3072  # the width convert_flux_transformer_checkpoint_to_diffusers assumes

CASES = {
    "tiny-flux": FluxConfig.preset("tiny-flux"),  # guidance-distilled (dev layout)
    "tiny-schnell": FluxConfig.preset("tiny-flux").replace(guidance_embed=False, depth=1, depth_single_blocks=3),
    # three heads, wider tokens in than out (the layout of Flux.1 Fill/Depth checkpoints)
    "tiny-3heads": FluxConfig.preset("tiny-flux").replace(hidden_size=96, num_heads=3, axes_dim=(4, 14, 14),
                                                          in_channels=128, vec_in_dim=24, context_in_dim=40),
}

# (batch, latent height, latent width, text tokens): non-square, batch 2, odd token counts.
INPUTS = [(2, 6, 10, 7), (1, 8, 8, 1), (2, 12, 4, 16)]


def randomise_all(model: torch.nn.Module, seed: int) -> None:
    """`randomise` (linear weights and biases) plus the RMSNorm scales it does not know."""
    randomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    untouched = [n for n, p in model.named_parameters() if n.endswith(".scale") and torch.all(p == 1)]
    assert not untouched


def diffusers_kwargs(cfg: FluxConfig) -> dict:
    """FluxTransformer2DModel kwargs of `cfg`, written out from diffusers' own parameter meanings."""
    return {
        "patch_size": 1, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "num_layers": cfg.depth, "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim, "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed, "axes_dims_rope": tuple(cfg.axes_dim),
    }


def reference_state(state: dict, cfg: FluxConfig) -> dict:
    """`state` (reference names) under diffusers names, by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    full_rows = 3 * REFERENCE_WIDTH + 4 * REFERENCE_WIDTH
    tag = 10**6  # probe value = tag * (source id + 1) + row: names the source tensor and row of every entry
    ckpt, sources = {}, []
    for key, value in state.items():
        if key.startswith("single_blocks.") and ".linear1." in key:
            sources.append(key)
            value = tag * len(sources) + torch.arange(full_rows)
        ckpt[PREFIX + key] = value.clone()
    converted = convert_flux_transformer_checkpoint_to_diffusers(ckpt)

    h, mlp = cfg.hidden_size, cfg.mlp_hidden
    tiny_rows = {0: (0, h), 1: (h, 2 * h), 2: (2 * h, 3 * h), 3: (3 * h, 3 * h + mlp)}
    seen = set()
    for key, value in converted.items():
        if value.dtype != torch.int64:
            continue
        source = sources[int(value[0]) // tag - 1]
        first = int(value[0]) % tag
        segment = first // REFERENCE_WIDTH
        # the converter hands over one whole q/k/v/mlp segment, in row order
        seg_len = 4 * REFERENCE_WIDTH if segment == 3 else REFERENCE_WIDTH
        assert first == segment * REFERENCE_WIDTH and torch.equal(value, value[0] + torch.arange(seg_len)), key
        start, stop = tiny_rows[segment]
        converted[key] = state[source][start:stop].clone()
        seen.add((source, segment))
    assert seen == {(s, i) for s in sources for i in range(4)}
    return converted


def build_pair(cfg: FluxConfig, seed: int = 1234):
    from diffusers import FluxTransformer2DModel

    ours = FluxTransformer(cfg).eval()
    randomise_all(ours, seed)
    ref = FluxTransformer2DModel(**diffusers_kwargs(cfg)).eval()
    ref.load_state_dict(reference_state(ours.state_dict(), cfg), strict=True)
    return ours, ref


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    cfg = CASES[request.param]
    return request.param, cfg, *build_pair(cfg)


def make_inputs(cfg: FluxConfig, batch: int, height: int, width: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    img = pack_latents(torch.randn(batch, cfg.in_channels // 4, height, width, generator=gen))
    txt = torch.randn(batch, tokens, cfg.context_in_dim, generator=gen)
    y = torch.randn(batch, cfg.vec_in_dim, generator=gen)
    t = torch.rand(batch, generator=gen)
    guidance = 1 + 4 * torch.rand(batch, generator=gen) if cfg.guidance_embed else None
    return img, image_ids(batch, height, width), txt, text_ids(batch, tokens), t, y, guidance


def run_ref(ref, img, img_ids, txt, txt_ids, t, y, guidance):
    # diffusers takes the ids once for the batch, as (L, 3)
    return ref(img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids[0],
               txt_ids=txt_ids[0], guidance=guidance, return_dict=False)[0]


@pytest.mark.parametrize("shape", INPUTS, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_diffusers(pair, shape):
    name, cfg, ours, ref = pair
    inputs = make_inputs(cfg, *shape, seed=sum(shape))
    with torch.no_grad():
        got, want = ours(*inputs), run_ref(ref, *inputs)
    assert got.shape == want.shape == inputs[0].shape[:2] + (cfg.out_channels,)
    assert want.std() > 0.1  # a live network, not a collapsed one
    assert rel_err(got, want) <= 1e-5, name


def test_timestep_and_guidance_extremes_match_diffusers(pair):
    _, cfg, ours, ref = pair
    img, iid, txt, tid, _, y, guidance = make_inputs(cfg, 2, 6, 8, 5, seed=3)
    t = torch.tensor([0.0, 1.0])
    if guidance is not None:
        guidance = torch.tensor([1.0, 10.0])
    with torch.no_grad():
        assert rel_err(ours(img, iid, txt, tid, t, y, guidance), run_ref(ref, img, iid, txt, tid, t, y, guidance)) <= 1e-5


def test_input_gradients_match_diffusers(pair):
    """Backward too: gradients reaching the image tokens and the text sequence."""
    _, cfg, ours, ref = pair
    img, iid, txt, tid, t, y, guidance = make_inputs(cfg, 2, 6, 8, 5, seed=11)
    grads = []
    for model in (ours, ref):
        xi, ci = img.clone().requires_grad_(), txt.clone().requires_grad_()
        out = ours(xi, iid, ci, tid, t, y, guidance) if model is ours else run_ref(ref, xi, iid, ci, tid, t, y, guidance)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((xi.grad, ci.grad))
    assert rel_err(grads[0][0], grads[1][0]) <= 1e-5
    assert rel_err(grads[0][1], grads[1][1]) <= 1e-5


def test_ids_per_sample_or_shared_and_scalar_conditioning():
    """(B, L, 3), (1, L, 3) and (L, 3) ids give the same result; scalar t/guidance broadcast."""
    cfg = CASES["tiny-flux"]
    ours = FluxTransformer(cfg).eval()
    randomise_all(ours, 5)
    img, iid, txt, tid, _, y, _ = make_inputs(cfg, 2, 4, 6, 3, seed=5)
    with torch.no_grad():
        base = ours(img, iid, txt, tid, torch.full((2,), 0.25), y, torch.full((2,), 3.5))
        assert torch.equal(ours(img, iid[:1], txt, tid[0], 0.25, y, 3.5), base)
        assert torch.equal(ours(img, iid[0], txt, tid[:1], torch.tensor(0.25), y, torch.tensor([3.5])), base)


def test_diffusers_key_map_equals_diffusers_converter():
    """flux_state_dict_to_diffusers gives diffusers' converter's names and values, and
    flux_state_dict_from_diffusers brings them back exactly."""
    for name, cfg in CASES.items():
        ours = FluxTransformer(cfg)
        randomise_all(ours, 7)
        state = ours.state_dict()
        want = reference_state(state, cfg)
        got = flux_state_dict_to_diffusers(state, cfg)
        assert sorted(got) == sorted(want), name
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], name
        back = flux_state_dict_from_diffusers(want, cfg)
        assert sorted(back) == sorted(state), name
        assert [k for k in state if not torch.equal(back[k], state[k])] == [], name
        prefixed = flux_state_dict_from_diffusers({"transformer." + k: v for k, v in want.items()}, cfg,
                                                  prefix="transformer.")
        assert all(torch.equal(prefixed[k], state[k]) for k in state)


def test_key_map_uses_views_where_it_can():
    """To diffusers: split tensors are views of ours (no copy); from diffusers: unfused tensors pass through."""
    cfg = CASES["tiny-flux"]
    state = FluxTransformer(cfg).state_dict()
    out = flux_state_dict_to_diffusers(state, cfg)
    qkv = state["double_blocks.0.img_attn.qkv.weight"]
    assert out["transformer_blocks.0.attn.to_k.weight"].data_ptr() == qkv[cfg.hidden_size:].data_ptr()
    assert out["x_embedder.weight"] is state["img_in.weight"]
    back = flux_state_dict_from_diffusers(out, cfg)
    assert back["img_in.weight"] is state["img_in.weight"]


def test_diffusers_view_builds_one_parameter_at_a_time():
    cfg = CASES["tiny-flux"]
    state = FluxTransformer(cfg).state_dict()
    stored = {"transformer." + k: v for k, v in flux_state_dict_to_diffusers(state, cfg).items()}
    stored["transformer.extra.weight"] = torch.zeros(1)
    view = FluxDiffusersView(stored, cfg, prefix="transformer.")
    assert sorted(view) == sorted(state) and len(view) == len(state)
    assert view.unused() == ["transformer.extra.weight"]
    parts = view.sources("single_blocks.1.linear1.bias")
    assert [p.shape[0] for p in parts] == [64, 64, 64, 256]
    assert torch.equal(view["single_blocks.1.linear1.bias"], state["single_blocks.1.linear1.bias"])
    view.check()
    del stored["transformer.transformer_blocks.1.attn.norm_added_k.weight"]
    with pytest.raises(ValueError, match=r"^the diffusers transformer: missing transformer.transformer_blocks.1"
                                         r".attn.norm_added_k.weight \(needed for double_blocks.1.txt_attn.norm"):
        view.check()


def test_diffusers_config_and_error_messages():
    for cfg in CASES.values():
        written = flux_config_to_diffusers(cfg)
        assert written.pop("_class_name") == "FluxTransformer2DModel"
        assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in written.items()} == diffusers_kwargs(cfg)
    cfg = CASES["tiny-flux"]
    state = flux_state_dict_to_diffusers(FluxTransformer(cfg).state_dict(), cfg)
    del state["single_transformer_blocks.1.proj_mlp.bias"]
    with pytest.raises(ValueError, match=r"^x.safetensors: missing single_transformer_blocks.1.proj_mlp.bias "
                                         r"\(needed for single_blocks.1.linear1.bias\)"):
        flux_state_dict_from_diffusers(state, cfg, where="x.safetensors")
    state["single_transformer_blocks.1.proj_mlp.bias"] = torch.zeros(cfg.mlp_hidden + 1)
    with pytest.raises(ValueError, match=r"proj_mlp.bias has shape \[257\], expected 256 rows"):
        flux_state_dict_from_diffusers(state, cfg)
    with pytest.raises(ValueError, match="mlp_ratio=3.0"):
        flux_config_to_diffusers(cfg.replace(mlp_ratio=3.0))
