"""Atomic checkpoints: contents round-trip, RNG restore, pruning and `latest` never picking partials."""
import json
import random

import numpy as np
import pytest
import torch

from trainer.checkpoint import CheckpointError, CheckpointManager, capture_rng, restore_rng
from trainer.optim import build_scheduler


class _Cfg:
    scheduler, warmup_steps, num_cycles, min_lr_ratio = "cosine", 2, 1, 0.0


def _training_objects():
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    sched = build_scheduler(opt, _Cfg, max_steps=10)
    for _ in range(3):
        layer(torch.randn(2, 4)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return layer, opt, sched


def _save(mgr, step, layer, opt, sched, **kw):
    return mgr.save(step, weights=dict(layer.state_dict()), optimizer=opt, scheduler=sched,
                    trainer_state={"epoch": 1, "sampler": {"pos": step * 2}}, **kw)


def test_roundtrip_restores_everything(tmp_path):
    layer, opt, sched = _training_objects()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    path = _save(mgr, 3, layer, opt, sched, scaler=scaler, meta={"loss": 0.5})
    assert path.name == "step-00000003"
    assert json.loads((path / "meta.json").read_text())["complete"] is True

    ck = mgr.load(mgr.resolve("latest"))
    assert ck.step == 3 and ck.trainer_state["sampler"] == {"pos": 6} and ck.trainer_state["epoch"] == 1
    for k, v in layer.state_dict().items():
        assert torch.equal(ck.weights[k], v)
    layer2 = torch.nn.Linear(4, 3)
    layer2.load_state_dict(ck.weights)
    opt2 = torch.optim.AdamW(layer2.parameters(), lr=1e-2)
    sched2 = build_scheduler(opt2, _Cfg, max_steps=10)
    opt2.load_state_dict(ck.optimizer)
    sched2.load_state_dict(ck.scheduler)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert ck.scaler["scale"] == 1024.0
    # one more identical step on both gives identical weights
    x = torch.randn(2, 4)
    for lay, o in ((layer, opt), (layer2, opt2)):
        lay(x).square().mean().backward()
        o.step()
    assert torch.equal(layer.weight, layer2.weight)


def test_rng_states_roundtrip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_keep_last_and_latest(tmp_path):
    layer, opt, sched = _training_objects()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        _save(mgr, step, layer, opt, sched)
    assert [s for s, _ in mgr.list()] == [20, 30]
    assert mgr.latest().name == "step-00000030"
    assert not list(tmp_path.glob(".t*"))  # no temp or trash dirs left behind


def test_latest_ignores_partial_checkpoints(tmp_path):
    layer, opt, sched = _training_objects()
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 5, layer, opt, sched)
    # a crash mid-save leaves a hidden temp dir; a hand-made dir without the completion marker
    (tmp_path / ".tmp-step-00000009").mkdir()
    (tmp_path / ".tmp-step-00000009" / "adapter.safetensors").write_bytes(b"partial")
    broken = tmp_path / "step-00000008"
    broken.mkdir()
    (broken / "meta.json").write_text('{"step": 8')  # truncated JSON
    assert mgr.latest().name == "step-00000005"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        mgr.resolve(str(broken))
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.resolve(str(tmp_path / "nope"))
    assert mgr.resolve(None) is None
    assert CheckpointManager(tmp_path / "empty").resolve("latest") is None
    # saving the same step again after the crash replaces the stale temp dir
    _save(mgr, 9, layer, opt, sched)
    assert mgr.latest().name == "step-00000009"


def test_rank_specific_rng_files(tmp_path):
    layer, opt, sched = _training_objects()
    main = CheckpointManager(tmp_path, keep_last=1, rank=0)
    torch.manual_seed(0)
    path = _save(main, 1, layer, opt, sched)
    assert (path / "rng-0.pt").exists()
    # a different rank falls back to rank 0's state when its own file is absent (world size changed)
    ck = CheckpointManager(tmp_path, rank=3).load(path)
    assert torch.equal(ck.rng["torch"], main.load(path).rng["torch"])
