"""Rectified-flow objective: x_t and the velocity target, per-sample time and noise draws, the
fixed and resolution-dependent time shifts, loss weighting, huber thresholds, refused options,
and the validation loss at fixed times t / 1000."""
import math

import pytest
import torch

from trainer import losses
from trainer.flow import FlowMatchingObjective, image_seq_len, shift_mu, time_shift
from trainer.objective import DiffusionObjective, sample_seed
from trainer.schedule import NoiseSchedule
from trainer.validation_loss import ValidationLoss, _Item

SHAPE = (16, 8, 6)


def test_noisy_input_and_velocity_target():
    g = torch.Generator().manual_seed(0)
    x0, eps, extra = (torch.randn(3, *SHAPE, generator=g) for _ in range(3))
    t = torch.tensor([0.0, 0.25, 1.0])
    obj = FlowMatchingObjective()
    noisy, target = obj.noisy_and_target(x0, eps, t)
    for b in range(3):
        assert torch.allclose(noisy[b], (1 - t[b]) * x0[b] + t[b] * eps[b], atol=1e-6)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], eps[2])
    assert torch.equal(target, eps - x0) and target.dtype == torch.float32
    perturbed, target2 = obj.noisy_and_target(x0, eps, t, input_noise=extra)
    assert torch.allclose(perturbed[1], 0.75 * x0[1] + 0.25 * extra[1]) and torch.equal(target2, target)


def test_draws_are_per_sample_whatever_the_batching():
    obj = FlowMatchingObjective(noise_offset=0.05, multires_noise_iterations=2, ip_noise_gamma=0.1,
                                timestep_sampling="logit_normal", resolution_shift=(0.5, 1.15))
    noise, t, inp = obj.draw(SHAPE, [0, 1, 2, 3], seed=7)
    assert noise.shape == (4, *SHAPE) and noise.dtype == torch.float32 and inp.shape == noise.shape
    assert t.shape == (4,) and t.dtype == torch.float32 and bool(((t > 0) & (t < 1)).all())
    for i in range(4):
        n1, t1, i1 = obj.draw(SHAPE, [i], seed=7)
        assert torch.equal(n1[0], noise[i]) and torch.equal(t1[0], t[i]) and torch.equal(i1[0], inp[i])
    n2, t2 = obj.sample(SHAPE, [2, 0], seed=7)
    assert torch.equal(n2, noise[[2, 0]]) and torch.equal(t2, t[[2, 0]])
    other, t_other, _ = obj.draw(SHAPE, [0, 1, 2, 3], seed=8)
    assert not torch.equal(other, noise) and not torch.equal(t_other, t)


def test_draw_order_matches_the_ddpm_objective():
    """The time comes first, then the noise: the same generator draws as `DiffusionObjective`
    with a non-integer timestep path, and an option switched on leaves earlier draws alone."""
    plain = FlowMatchingObjective()
    noise, t, inp = plain.draw(SHAPE, [5], seed=3)
    gen = torch.Generator().manual_seed(sample_seed(3, 5))
    u = float(torch.rand((1,), generator=gen, dtype=torch.float64))
    assert t[0].item() == pytest.approx(u, abs=1e-7) and inp is None
    assert torch.equal(noise[0], torch.randn(SHAPE, generator=gen))
    ddpm = DiffusionObjective(NoiseSchedule(), timestep_shift=2.0)
    assert torch.equal(ddpm.draw(SHAPE, [5], seed=3)[0], noise)
    offset = FlowMatchingObjective(noise_offset=0.1, ip_noise_gamma=0.2)
    n2, t2, i2 = offset.draw(SHAPE, [5], seed=3)
    assert torch.equal(t2, t)
    delta = n2 - noise  # a per-channel constant
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta)) and delta.abs().max() > 0
    assert not torch.equal(i2, n2)


def test_fixed_shift_and_range_transform_the_same_draws():
    idx = list(range(64))
    base = FlowMatchingObjective().sample(SHAPE, idx, seed=1)[1].double()
    s = 3.0
    shifted = FlowMatchingObjective(timestep_shift=s).sample(SHAPE, idx, seed=1)[1].double()
    assert torch.allclose(shifted, s * base / (1 + (s - 1) * base), atol=1e-6)
    assert bool((shifted >= base - 1e-7).all()) and shifted.mean() > base.mean() + 0.1
    ranged = FlowMatchingObjective(timestep_min=200, timestep_max=600).sample(SHAPE, idx, seed=1)[1].double()
    assert torch.allclose(ranged, 0.2 + 0.4 * base, atol=1e-6)
    assert bool(((ranged >= 0.2) & (ranged < 0.6)).all())


def test_logit_normal_draw():
    obj = FlowMatchingObjective(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=2.0)
    t = obj.sample(SHAPE, [0, 9], seed=4)[1]
    for k, index in enumerate((0, 9)):
        gen = torch.Generator().manual_seed(sample_seed(4, index))
        z = float(torch.randn((1,), generator=gen, dtype=torch.float64))
        assert t[k].item() == pytest.approx(1 / (1 + math.exp(-(0.5 + 2.0 * z))), abs=1e-6)


def test_resolution_shift_uses_the_image_token_count():
    assert image_seq_len(64, 48) == 32 * 24 and image_seq_len(7, 7) == 9
    assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)
    assert shift_mu(2176, 0.2, 2.2) == pytest.approx(1.2)
    idx = list(range(32))
    obj = FlowMatchingObjective(resolution_shift=(0.5, 1.15))
    base = FlowMatchingObjective().sample((16, 32, 32), idx, seed=2)[1].double()
    for (h, w), tokens in (((32, 32), 256), ((64, 64), 1024), ((128, 32), 1024)):
        t = obj.sample((16, h, w), idx, seed=2)[1].double()
        mu = shift_mu(tokens)
        assert obj.mu(h, w) == pytest.approx(mu)
        assert torch.allclose(t, math.exp(mu) / (math.exp(mu) + 1 / base - 1), atol=1e-6)
        assert bool((t > base).all())  # mu > 0 moves every time towards noise
    small = obj.sample((16, 32, 32), idx, seed=2)[1]
    large = obj.sample((16, 64, 64), idx, seed=2)[1]
    assert bool((large > small).all())  # more tokens, larger mu, noisier times
    assert FlowMatchingObjective().mu(64, 64) is None


def test_time_shift_edges():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    out = time_shift(1.0, t)
    assert out[0] == 0 and out[2] == 1 and out[1].item() == pytest.approx(math.e / (math.e + 1))
    assert torch.equal(time_shift(0.0, t), t)


def test_weightings():
    t = torch.tensor([0.1, 0.5, 0.9])
    assert FlowMatchingObjective().weights(t) is None
    assert torch.allclose(FlowMatchingObjective(weighting="sigma_sqrt").weights(t), 1 / t**2)
    cos = FlowMatchingObjective(weighting="cosmap").weights(t)
    assert torch.allclose(cos, 2 / (math.pi * (1 - 2 * t + 2 * t**2)))


def test_huber_thresholds_follow_the_flow_snr():
    c = 0.1
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    snr = FlowMatchingObjective(loss="huber", huber_c=c, huber_schedule="snr").huber_threshold(t)
    assert snr[0] == pytest.approx(1.0) and snr[-1] == pytest.approx(c)
    sigma = t[1:3] / (1 - t[1:3])  # 1 / sqrt(((1 - t) / t)^2): the DDPM formula's sigma
    assert torch.allclose(snr[1:3], (1 - c) / (1 + sigma) ** 2 + c)
    exp = FlowMatchingObjective(loss="huber", huber_c=c, huber_schedule="exponential").huber_threshold(t)
    assert torch.allclose(exp, c**t)
    const = FlowMatchingObjective(loss="huber", huber_c=c, huber_schedule="constant").huber_threshold(t)
    assert torch.equal(const, torch.full_like(t, c))


@pytest.mark.parametrize("kind", ["mse", "huber", "smooth_l1"])
def test_loss_with_pixel_and_sample_weights(kind):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g)
    t = torch.tensor([0.2, 0.5, 0.8])
    mask = (torch.rand(3, 1, *SHAPE[1:], generator=g) > 0.5).float()
    mask[2] = 0
    sample_w = torch.tensor([1.0, 0.5, 2.0])
    obj = FlowMatchingObjective(loss=kind, weighting="cosmap")
    per = obj.per_sample_loss(pred.half(), target, t, pixel_weights=mask, sample_weights=sample_w)
    c = None if kind == "mse" else obj.huber_threshold(t)
    elem = losses.elementwise_loss(pred.half(), target, kind, c) * mask
    expected = elem.flatten(1).mean(1) * obj.weights(t) * sample_w
    assert torch.allclose(per, expected) and per[2] == 0 and per.dtype == torch.float32
    assert obj.loss(pred.half(), target, t, pixel_weights=mask, sample_weights=sample_w) == pytest.approx(
        expected.mean().item())
    assert FlowMatchingObjective().loss(target, target, t) == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
    ({"debiased_estimation": True}, "debiased_estimation"),
    ({"timestep_min": 500, "timestep_max": 500}, "timestep_min"),
    ({"timestep_max": 1001}, "timestep_max"),
    ({"weighting": "snr"}, "weighting"),
    ({"loss": "l1"}, "loss"),
    ({"huber_schedule": "linear"}, "huber_schedule"),
    ({"timestep_sampling": "beta"}, "timestep_sampling"),
    ({"timestep_shift": 0.0}, "timestep_shift"),
    ({"resolution_shift": (0.5,)}, "resolution_shift"),
])
def test_refused_options_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchingObjective(**kwargs)


def test_the_training_objective_of_a_flow_family():
    from models.bundle import family_spec
    from trainer.config import TrainConfig
    from trainer.objective import build_objective

    dev = build_objective(TrainConfig(), family_spec("flux-dev"), "flow")
    schnell = build_objective(TrainConfig(), family_spec("flux-schnell"), "flow")
    assert isinstance(dev, FlowMatchingObjective) and dev.resolution_shift == (0.5, 1.15)
    assert isinstance(schnell, FlowMatchingObjective) and schnell.resolution_shift is None
    assert isinstance(build_objective(TrainConfig(), family_spec("tiny-sd15"), "epsilon"), DiffusionObjective)


class _Dataset:
    def __len__(self):
        return 2


@pytest.mark.parametrize("flow", [True, False])
def test_validation_loss_uses_fixed_times(flow):
    objective = FlowMatchingObjective() if flow else DiffusionObjective(NoiseSchedule())
    val = ValidationLoss(_Dataset(), objective, [100, 500, 900], seed=3, device="cpu", guidance=2.0)
    g = torch.Generator().manual_seed(0)
    val.items = [_Item(i, torch.randn(1, *SHAPE, generator=g), {"context": torch.zeros(1, 2, 4)}, None,
                       torch.zeros(1, 6), None) for i in range(2)]
    seen = []

    def predict(noisy, timesteps, cond=None, token_ids=None, time_ids=None):
        seen.append(timesteps)
        return torch.zeros_like(noisy)

    loss = val.compute(predict)
    expected_t = torch.tensor([0.1, 0.5, 0.9]) if flow else torch.tensor([100, 500, 900])
    assert all(torch.equal(t, expected_t) for t in seen)
    targets = []
    for item in val.items:
        noise = []
        for j in range(3):
            gen = torch.Generator().manual_seed(sample_seed(3, item.index * 3 + j))
            noise.append(torch.randn(SHAPE, generator=gen))
        targets.append(objective.noisy_and_target(item.latents.expand(3, -1, -1, -1), torch.stack(noise),
                                                  expected_t)[1])
    assert loss == pytest.approx(torch.stack(targets).pow(2).mean().item(), rel=1e-5)


def test_validation_embeds_the_training_guidance():
    """A guidance-distilled denoiser sees the training guidance value during validation, and a
    model without guidance gets no guidance argument at all."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    weights = SimpleNamespace(evaluating=nullcontext, for_use=nullcontext, ema=None)
    accelerator = SimpleNamespace(autocast=nullcontext)
    for guidance in (1.5, None):
        val = ValidationLoss(_Dataset(), FlowMatchingObjective(), [300, 700], seed=0, device="cpu", guidance=guidance)
        val.items = [_Item(0, torch.randn(1, *SHAPE), {"context": torch.zeros(1, 2, 4)}, None, torch.zeros(1, 6), None)]
        seen = []

        def denoiser(noisy, timesteps, seen=seen, **kwargs):
            seen.append(kwargs.get("guidance", "absent"))
            return torch.zeros_like(noisy)

        val.measure(weights, denoiser, accelerator)
        if guidance is None:
            assert seen == ["absent"]
        else:
            assert torch.equal(seen[0], torch.full((2,), guidance))
