"""Gradient checkpointing recomputes activations without changing outputs or gradients."""
import pytest
import torch

from models.unet import UNet, UNetConfig, sdxl_vector
from models.unet_blocks import BasicTransformerBlock, ResBlock



def make_case(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = UNetConfig.preset(preset)
    unet = UNet(cfg).train()
    x = torch.randn(2, 4, 8, 12)
    t = torch.tensor([3.0, 700.0])
    ctx = torch.randn(2, 9, cfg.context_dim)
    y = sdxl_vector(torch.randn(2, 64), torch.full((2, 6), 512.0)) if cfg.adm_in_channels else None
    return unet, (x, t, ctx, y)


def loss_and_grads(unet, inputs):
    unet.zero_grad(set_to_none=True)
    x = inputs[0].clone().requires_grad_()
    out = unet(x, *inputs[1:])
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in unet.named_parameters()}


@pytest.mark.parametrize("granularity", ["block", "layer", "transformer"])
@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd15"])
def test_checkpointing_keeps_outputs_and_gradients(preset, granularity):
    unet, inputs = make_case(preset)
    out0, gx0, grads0 = loss_and_grads(unet, inputs)
    unet.set_gradient_checkpointing(True, granularity=granularity)
    assert unet.gradient_checkpointing == granularity
    out1, gx1, grads1 = loss_and_grads(unet, inputs)
    assert torch.allclose(out0, out1, rtol=0, atol=1e-6)
    assert torch.allclose(gx0, gx1, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], rtol=1e-6, atol=1e-6), name


def count_calls(unet, cls):
    """Counter of runs of every `cls` module. Pre-hooks on its first sublayer: the checkpointed
    recomputation calls the module's body directly and stops once the saved tensors are rebuilt."""
    calls = []
    first = {ResBlock: "in_layers", BasicTransformerBlock: "norm1"}[cls]
    for m in unet.modules():
        if isinstance(m, cls):
            getattr(m, first).register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize(
    "granularity,recomputed,kept",
    [
        ("block", ResBlock, None),
        ("layer", ResBlock, None),
        ("layer", BasicTransformerBlock, None),
        ("transformer", BasicTransformerBlock, ResBlock),
    ],
)
def test_checkpointed_modules_run_again_in_backward(granularity, recomputed, kept):
    unet, inputs = make_case("tiny-sdxl")
    unet.set_gradient_checkpointing(True, granularity=granularity)
    calls = count_calls(unet, recomputed)
    other = count_calls(unet, kept) if kept else None
    out = unet(*inputs)
    forward_calls = len(calls)
    assert forward_calls == sum(isinstance(m, recomputed) for m in unet.modules())
    out.square().mean().backward()
    assert len(calls) == 2 * forward_calls  # each one recomputed once
    if other is not None:
        assert len(other) == sum(isinstance(m, kept) for m in unet.modules())  # not recomputed


def test_on_in_eval_off_under_no_grad_and_when_disabled():
    # Frozen-base LoRA training keeps the UNet in eval mode: checkpointing must still apply.
    unet, inputs = make_case("tiny-sdxl")
    unet.set_gradient_checkpointing(True)
    calls = count_calls(unet, ResBlock)
    n_res = sum(isinstance(m, ResBlock) for m in unet.modules())
    with torch.no_grad():
        unet(*inputs)
    assert len(calls) == n_res
    unet.eval()
    unet(*inputs).sum().backward()
    assert len(calls) == 3 * n_res  # forward + recompute in backward
    unet.set_gradient_checkpointing(False)
    assert unet.gradient_checkpointing is None
    unet(*inputs).sum().backward()
    assert len(calls) == 4 * n_res


def test_bad_granularity():
    unet, _ = make_case("tiny-sd15")
    with pytest.raises(ValueError, match="granularity"):
        unet.set_gradient_checkpointing(True, granularity="everything")


def test_selective_checkpointing_context_fn_keeps_gradients_and_saves_what_the_policy_says():
    """`context_fn` reaches torch's checkpoint: with a policy that keeps matmul outputs, backward
    runs exactly the matmuls of an uncheckpointed backward (recomputing everything runs more)."""
    from functools import partial

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in matmuls
            return func(*args, **(kwargs or {}))

    def backward_matmuls(save: bool | None):
        def policy(ctx, op, *args, **kwargs):
            return CheckpointPolicy.MUST_SAVE if save and op in matmuls else CheckpointPolicy.PREFER_RECOMPUTE

        unet, inputs = make_case("tiny-sdxl")
        if save is not None:
            context_fn = partial(create_selective_checkpoint_contexts, policy)
            unet.set_gradient_checkpointing(True, "transformer", context_fn=context_fn)
        out = unet(inputs[0].clone().requires_grad_(), *inputs[1:])
        with CountMatmuls() as mode:
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return mode.count, unet

    unet, inputs = make_case("tiny-sdxl")
    out0, gx0, grads0 = loss_and_grads(unet, inputs)
    plain, _ = backward_matmuls(save=None)
    recompute_all, _ = backward_matmuls(save=False)
    saved, selective = backward_matmuls(save=True)
    assert saved == plain < recompute_all
    selective.zero_grad(set_to_none=True)
    out1, gx1, grads1 = loss_and_grads(selective, inputs)
    assert torch.allclose(out0, out1, rtol=0, atol=1e-6) and torch.allclose(gx0, gx1, rtol=0, atol=1e-6)
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], rtol=1e-6, atol=1e-6), name
    selective.set_gradient_checkpointing(False)
    assert all(getattr(m, "checkpoint_context_fn", None) is None for m in selective.modules())
