"""Gradient checkpointing of the Flux transformer recomputes each block without changing outputs or gradients."""
import functools

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from models.flux import FluxConfig, FluxTransformer, image_ids, pack_latents, text_ids
from models.flux_blocks import DoubleStreamBlock, SingleStreamBlock


def make_case(seed: int = 0):
    torch.manual_seed(seed)
    cfg = FluxConfig.preset("tiny-flux")
    model = FluxTransformer(cfg).train()
    with torch.no_grad():  # RMSNorm scales start at 1; make their gradients path visible
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.add_(0.3 * torch.randn_like(p))
    img = pack_latents(torch.randn(2, 16, 4, 6))
    inputs = (img, image_ids(2, 4, 6), torch.randn(2, 5, 32), text_ids(2, 5), torch.tensor([0.2, 0.9]),
              torch.randn(2, cfg.vec_in_dim), torch.tensor([3.5, 1.0]))
    return model, inputs


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    img = inputs[0].clone().requires_grad_()
    out = model(img, *inputs[1:])
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), img.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def count_block_runs(model):
    """Forward runs of every double/single block, counted at their first sublayer (the checkpointed
    recomputation calls the block body directly)."""
    calls = []
    for m in model.modules():
        if isinstance(m, DoubleStreamBlock):
            m.img_mod.register_forward_pre_hook(lambda *a: calls.append(1))
        elif isinstance(m, SingleStreamBlock):
            m.modulation.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_checkpointing_keeps_outputs_and_gradients():
    model, inputs = make_case()
    out0, gx0, grads0 = loss_and_grads(model, inputs)
    model.set_gradient_checkpointing(True)
    assert model.gradient_checkpointing == "block"
    out1, gx1, grads1 = loss_and_grads(model, inputs)
    assert torch.allclose(out0, out1, rtol=0, atol=1e-6)
    assert torch.allclose(gx0, gx1, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys() == dict(model.named_parameters()).keys()
    assert all(g.abs().sum() > 0 for g in grads0.values())
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], rtol=1e-6, atol=1e-6), name


def test_every_block_is_recomputed_in_backward_and_only_then():
    model, inputs = make_case()
    calls = count_block_runs(model)
    n_blocks = len(model.double_blocks) + len(model.single_blocks)
    loss_and_grads(model, inputs)
    assert len(calls) == n_blocks  # off: one forward each

    calls.clear()
    model.set_gradient_checkpointing(True)
    loss_and_grads(model, inputs)
    assert len(calls) == 2 * n_blocks  # forward + recomputation

    calls.clear()
    with torch.no_grad():  # inference records nothing, recomputes nothing
        model(*inputs)
    assert len(calls) == n_blocks

    calls.clear()
    model.set_gradient_checkpointing(False)
    assert model.gradient_checkpointing is None
    loss_and_grads(model, inputs)
    assert len(calls) == n_blocks


def test_context_fn_reaches_every_block():
    """A selective policy (save matmuls, recompute the rest) is handed to torch's checkpoint."""
    model, inputs = make_case()
    out0, _, grads0 = loss_and_grads(model, inputs)
    seen = []

    def policy(ctx, op, *args, **kwargs):
        seen.append(op)
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    model.set_gradient_checkpointing(True, context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
    out1, _, grads1 = loss_and_grads(model, inputs)
    assert seen and torch.allclose(out0, out1, rtol=0, atol=1e-6)
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], rtol=1e-6, atol=1e-6), name
    assert all(b.checkpoint_context_fn is not None for b in model.blocks())
    model.set_gradient_checkpointing(False)
    assert all(b.checkpoint_context_fn is None and not b.gradient_checkpointing for b in model.blocks())


def test_unknown_granularity_is_refused():
    model, _ = make_case()
    with pytest.raises(ValueError, match=r"granularity 'layer' not in \('block',\)"):
        model.set_gradient_checkpointing(True, "layer")
