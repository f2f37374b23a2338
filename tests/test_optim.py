"""Optimizers, per-group learning rates, schedules and the bitsandbytes error path."""
import builtins
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from trainer import optim as optim_mod
from trainer.optim import (
    OptimizerUnavailable,
    build_optimizer,
    build_scheduler,
    lr_factor,
    param_groups,
)


def _cfg(**kw):
    base = dict(name="adamw", lr=1e-3, te_lr=None, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                momentum=0.0, scheduler="constant", warmup_steps=0, num_cycles=1, min_lr_ratio=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def _params(n=2):
    return [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(n)]


def test_groups_have_their_own_lr_and_keep_ratio_under_schedule():
    unet, te = _params(), _params(1)
    cfg = _cfg(lr=1e-3, te_lr=5e-4, scheduler="linear", warmup_steps=2)
    groups = param_groups(unet, te, cfg)
    assert [g["name"] for g in groups] == ["unet", "text_encoders"]
    opt = build_optimizer(groups, cfg)
    sched = build_scheduler(opt, cfg, max_steps=10)
    for step in range(6):
        lrs = [g["lr"] for g in opt.param_groups]
        expected = lr_factor(step, scheduler="linear", warmup_steps=2, max_steps=10)
        assert lrs[0] == pytest.approx(1e-3 * expected)
        assert lrs[1] == pytest.approx(5e-4 * expected)
        for p in unet + te:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()


def test_te_lr_defaults_to_lr_and_frozen_params_are_skipped():
    unet, te = _params(), _params(1)
    te[0].requires_grad_(False)
    groups = param_groups(unet, te, _cfg(lr=2e-4))
    assert len(groups) == 1 and groups[0]["lr"] == 2e-4
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups([], te, _cfg())


@pytest.mark.parametrize(
    "name,cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_torch_optimizers_step(name, cls):
    p = _params(1)
    opt = build_optimizer(param_groups(p, [], _cfg(name=name)), _cfg(name=name))
    assert isinstance(opt, cls)
    before = p[0].detach().clone()
    p[0].grad = torch.randn_like(p[0])
    opt.step()
    assert not torch.equal(before, p[0])


def test_fused_adamw_on_cpu_and_foreach_for_mixed_devices():
    opt = build_optimizer(param_groups(_params(1), [], _cfg()), _cfg())
    assert opt.defaults.get("fused")
    mixed = [torch.nn.Parameter(torch.randn(2, 2)), torch.nn.Parameter(torch.randn(2, 2, device="meta"))]
    opt = build_optimizer(param_groups(mixed, [], _cfg()), _cfg())
    assert not opt.defaults.get("fused")
    opt = build_optimizer(param_groups(_params(1), [], _cfg()), _cfg(), allow_fused=False)  # fp16 scaling
    assert not opt.defaults.get("fused")


@pytest.mark.gpu
def test_fused_adamw_on_cuda():
    p = [torch.nn.Parameter(torch.randn(8, 8, device="cuda"))]
    opt = build_optimizer(param_groups(p, [], _cfg()), _cfg())
    assert opt.defaults.get("fused")


def test_schedule_shapes():
    kw = dict(warmup_steps=4, max_steps=24)
    # warmup: 1/4, 2/4, 3/4, 1
    assert [lr_factor(s, scheduler="constant", **kw) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, scheduler="linear", **kw) == pytest.approx(1.0)
    assert lr_factor(14, scheduler="linear", **kw) == pytest.approx(0.5)
    assert lr_factor(24, scheduler="linear", **kw) == pytest.approx(0.0)
    assert lr_factor(14, scheduler="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(9, scheduler="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    # two cycles: back at full rate half-way, at 0.5 a quarter of the way
    restarts = dict(scheduler="cosine_with_restarts", num_cycles=2, **kw)
    assert lr_factor(9, **restarts) == pytest.approx(0.5)
    assert lr_factor(14, **restarts) == pytest.approx(1.0)
    assert lr_factor(24, **restarts) == pytest.approx(0.0)
    assert lr_factor(24, scheduler="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.scheduler"):
        lr_factor(5, scheduler="cosine_annealing", **kw)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="optim.name.*'adamx'"):
        build_optimizer(param_groups(_params(1), [], _cfg()), _cfg(name="adamx"))


def test_bitsandbytes_missing_gives_clear_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(optim_mod.importlib, "import_module", lambda name: fake_import(name))
    cfg = _cfg(name="adamw8bit")
    with pytest.raises(OptimizerUnavailable, match="pip install bitsandbytes.*optim.name=adamw"):
        build_optimizer(param_groups(_params(1), [], cfg), cfg)


def test_bitsandbytes_broken_install_gives_clear_error(monkeypatch):
    def broken(name):
        raise RuntimeError("CUDA Setup failed: libcudart.so not found")

    monkeypatch.setattr(optim_mod.importlib, "import_module", broken)
    cfg = _cfg(name="lion8bit")
    with pytest.raises(OptimizerUnavailable, match="cannot run on this machine.*libcudart"):
        build_optimizer(param_groups(_params(1), [], cfg), cfg)


def test_bitsandbytes_optimizer_when_available():
    bnb = pytest.importorskip("bitsandbytes")
    p = [torch.nn.Parameter(torch.randn(64, 64))]
    cfg = _cfg(name="adamw8bit")
    try:
        opt = build_optimizer(param_groups(p, [], cfg), cfg)
    except OptimizerUnavailable as exc:
        pytest.skip(f"bitsandbytes cannot run here: {exc}")
    assert isinstance(opt, bnb.optim.AdamW8bit)
    p[0].grad = torch.randn_like(p[0])
    before = p[0].detach().clone()
    try:
        opt.step()
    except Exception as exc:  # CPU kernels are optional in bitsandbytes builds
        pytest.skip(f"bitsandbytes optimizer step unsupported here: {exc}")
    assert not torch.equal(before, p[0])
