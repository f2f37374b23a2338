"""EMA updates, LoRA+ and per-block learning rates in the optimizer's parameter groups, per-block
ranks, and the optional optimizers (Prodigy, schedule-free AdamW) with their missing-package error."""
import sys

import pytest
import torch

import models
from models.lora.blocks import block_lr_weights, block_names, unet_block
from trainer.config import OptimConfig
from trainer.ema import AdapterEMA
from trainer.optim import (
    OptimizerUnavailable,
    build_optimizer,
    build_scheduler,
    eval_weights,
    require_optimizer,
)


@pytest.fixture(scope="module")
def bundle():
    return models.build_model("tiny-sdxl", seed=0)


def _network(bundle, **options):
    net = models.inject_lora(bundle, unet="locon", rank=4, **options)
    return net


# ---- EMA -----------------------------------------------------------------------------------------
def test_ema_update_matches_the_formula_and_swaps_back_exactly():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = AdapterEMA([("w", w)], decay=0.9, every=2)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 6.0]))
    ema.update(1)  # not a multiple of every=2: no update
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.0, 2.0]))
    ema.update(2)  # 0.9 * [1, 2] + 0.1 * [3, 6] = [1.2, 2.4]
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.2, 2.4]))
    with torch.no_grad():
        w.copy_(torch.tensor([0.0, 0.0]))
    ema.update(4)  # 0.9 * [1.2, 2.4] = [1.08, 2.16]
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.08, 2.16]))
    before = w.detach().clone()
    with ema.swapped():
        torch.testing.assert_close(w.detach(), torch.tensor([1.08, 2.16]))
    assert torch.equal(w.detach(), before)
    zero = AdapterEMA([("w", w)], decay=0.0)
    with torch.no_grad():
        w.copy_(torch.tensor([5.0, -1.0]))
    zero.update(1)  # decay 0: the EMA is the current weights
    assert torch.equal(zero.shadow["w"], w.detach())
    restored = AdapterEMA([("w", w)], decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow["w"], ema.shadow["w"])
    with pytest.raises(ValueError):
        AdapterEMA([("w", w)], decay=1.0)


# ---- blocks, LoRA+ -------------------------------------------------------------------------------
def test_block_names_follow_the_ldm_paths():
    assert unet_block("input_blocks.4.1.transformer_blocks.0.attn1.to_q") == "IN04"
    assert unet_block("middle_block.1.proj_in") == "MID"
    assert unet_block("output_blocks.11.0.in_layers.2") == "OUT11"
    assert unet_block("time_embed.0") is None and unet_block("out.2") is None
    assert block_names(2) == ["IN00", "IN01", "MID", "OUT00", "OUT01"]
    assert block_lr_weights(2, down=0.5, up=[1.0, 2.0]) == {"IN00": 0.5, "IN01": 0.5, "MID": 1.0, "OUT00": 1.0,
                                                            "OUT01": 2.0}
    with pytest.raises(ValueError, match="optim.block_lr_weight: needs 5 values"):
        block_lr_weights(2, per_block=[1.0] * 4)
    with pytest.raises(ValueError, match="optim.down_lr_weight: needs 2 values"):
        block_lr_weights(2, down=[1.0])


def test_lora_plus_and_block_multipliers_set_the_group_learning_rates(bundle):
    net = _network(bundle)
    try:
        n = len(bundle.denoiser.input_blocks)
        weights = block_lr_weights(n, down=0.5, mid=0.0, up=[2.0] + [1.0] * (n - 1))
        groups = net.param_groups(1e-3, lora_plus_ratio=16.0, unet_block_lr=weights)
        opt = build_optimizer(groups, OptimConfig(lr=1e-3))
        by_name = {g["name"]: g for g in opt.param_groups}
        assert by_name["unet_lora"]["lr"] == pytest.approx(1e-3)
        assert by_name["unet_lora_up"]["lr"] == pytest.approx(16e-3)
        assert by_name["unet_lora_x0.5"]["lr"] == pytest.approx(0.5e-3)
        assert by_name["unet_lora_x0.5_up"]["lr"] == pytest.approx(8e-3)
        assert by_name["unet_lora_x2"]["lr"] == pytest.approx(2e-3)
        # every parameter sits in the group its name and block say; MID is frozen and left out
        owner = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
        refs = net.refs()
        for name, adapter in net.adapters().items():
            block = unet_block(refs[name].path)
            for pname, p in adapter.named_parameters():
                if block == "MID":
                    assert not p.requires_grad and id(p) not in owner
                    continue
                mult = {"OUT00": "_x2"}.get(block, "_x0.5" if block and block.startswith("IN") else "")
                assert owner[id(p)] == "unet_lora" + mult + ("_up" if pname.endswith("lora_up.weight") else "")
        # the schedule scales every group alike, so the ratios hold throughout
        sched = build_scheduler(opt, OptimConfig(scheduler="cosine", warmup_steps=0), max_steps=10)
        for _ in range(5):
            opt.step()
            sched.step()
        ratio = {g["name"]: g["lr"] for g in opt.param_groups}
        assert ratio["unet_lora_up"] / ratio["unet_lora"] == pytest.approx(16.0)
    finally:
        net.remove()


def test_default_groups_are_unchanged(bundle):
    net = _network(bundle)
    try:
        groups = net.param_groups(1e-4)
        assert [g["name"] for g in groups] == ["unet_lora"] and len(groups[0]["params"]) == len(list(net.parameters()))
    finally:
        net.remove()


def test_per_block_ranks_and_alphas(bundle):
    n = len(bundle.denoiser.input_blocks)
    ranks = [2] * n + [0] + [6] * n  # no Linear / 1x1 adapter in MID
    net = _network(bundle, block_ranks=ranks, block_alphas=[1.0] * (2 * n + 1), conv_block_ranks=[3] * (2 * n + 1))
    try:
        refs = net.refs()
        seen = set()
        for name, adapter in net.adapters().items():
            path = refs[name].path
            block = unet_block(path)
            seen.add(block)
            conv3 = adapter.lora_down.weight.dim() == 4 and adapter.lora_down.weight.shape[-1] == 3
            assert conv3 or block != "MID"  # rank 0: no Linear adapter in MID (its 3x3 convs have rank 3)
            if block is None:
                assert adapter.rank == 4  # outside the blocks: the plain rank
            elif conv3:
                assert adapter.rank == 3 and adapter.alpha == 3.0  # conv alpha null: the block rank
            else:
                assert adapter.rank == (2 if block.startswith("IN") else 6) and adapter.alpha == 1.0
        assert any(b and b.startswith("IN") for b in seen) and any(b and b.startswith("OUT") for b in seen)
    finally:
        net.remove()
    with pytest.raises(ValueError, match="block_ranks: needs"):
        _network(bundle, block_ranks=[4, 4])


# ---- optional optimizers ---------------------------------------------------------------------------
def _fit(opt, params, steps=5, target=None):
    target = torch.tensor([1.0, -2.0, 0.5]) if target is None else target
    for _ in range(steps):
        loss = ((params[0] - target) ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_prodigy_learns_its_step_size():
    pytest.importorskip("prodigyopt")
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([{"params": [p], "lr": 1.0, "name": "unet_lora"}],
                          OptimConfig(name="prodigy", lr=1.0, d0=1e-4, weight_decay=0.0))
    assert type(opt).__name__ == "Prodigy" and opt.param_groups[0]["d0"] == 1e-4
    _fit(opt, [p], steps=20)
    assert opt.param_groups[0]["d"] > 1e-4  # the step-size estimate grew from d0
    assert float(((p.detach() - torch.tensor([1.0, -2.0, 0.5])) ** 2).sum()) < 5.25  # moved towards the target


def test_schedule_free_eval_weights_are_the_average_and_training_weights_come_back_exactly():
    pytest.importorskip("schedulefree")
    p = torch.nn.Parameter(torch.zeros(1000))  # many values: an eval/train round trip rounds some of them
    opt = build_optimizer([{"params": [p], "lr": 0.1, "name": "unet_lora"}],
                          OptimConfig(name="adamw_schedulefree", lr=0.1, warmup_steps=2, weight_decay=0.0))
    assert opt.param_groups[0]["train_mode"] and opt.param_groups[0]["warmup_steps"] == 2
    sched = build_scheduler(opt, OptimConfig(name="adamw_schedulefree", warmup_steps=2), max_steps=10)
    _fit(opt, [p], target=torch.randn(1000, generator=torch.Generator().manual_seed(0)))
    sched.step()
    assert sched.get_last_lr() == [0.1]  # the warmup runs inside the optimizer, not the schedule
    y = p.detach().clone()
    z = opt.state[p]["z"]
    beta1 = opt.param_groups[0]["betas"][0]
    with eval_weights(opt, [p]):
        x = p.detach().clone()
        torch.testing.assert_close(x, y + (1 - 1 / beta1) * (z - y))  # x = lerp(y, z, 1 - 1/beta1)
        assert not opt.param_groups[0]["train_mode"]
    assert opt.param_groups[0]["train_mode"] and torch.equal(p.detach(), y)  # bit for bit


def test_missing_optional_package_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes `import prodigyopt` fail
    with pytest.raises(OptimizerUnavailable) as info:
        require_optimizer("prodigy")
    message = str(info.value)
    assert "\n" not in message and "pip install 'lorasmith[prodigy]'" in message and "optim.name" in message
