"""Noise/timestep sampling, targets and loss weighting of the training objective."""
import pytest
import torch

from trainer.objective import DiffusionObjective
from trainer.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


def test_sampling_is_per_sample_deterministic_and_split_invariant(schedule):
    obj = DiffusionObjective(schedule, timestep_min=100, timestep_max=900)
    noise, t = obj.sample((4, 8, 8), range(6), seed=3)
    assert noise.shape == (6, 4, 8, 8) and noise.dtype == torch.float32
    assert t.dtype == torch.int64 and t.shape == (6,)
    # splitting the batch (across processes / micro-batches) gives the same per-sample draws
    n1, t1 = obj.sample((4, 8, 8), range(3), seed=3)
    n2, t2 = obj.sample((4, 8, 8), range(3, 6), seed=3)
    assert torch.equal(torch.cat([n1, n2]), noise) and torch.equal(torch.cat([t1, t2]), t)
    other, _ = obj.sample((4, 8, 8), range(6), seed=4)
    assert not torch.allclose(other, noise)
    assert len(set(noise.flatten(1).sum(1).tolist())) == 6  # each sample distinct


def test_timesteps_uniform_in_half_open_range(schedule):
    obj = DiffusionObjective(schedule, timestep_min=10, timestep_max=14)
    _, t = obj.sample((1, 1, 1), range(2000), seed=0)
    assert t.min() == 10 and t.max() == 13
    counts = torch.bincount(t - 10, minlength=4).float()
    assert (counts / 2000 - 0.25).abs().max() < 0.05
    with pytest.raises(ValueError, match="timestep_min"):
        DiffusionObjective(schedule, timestep_min=500, timestep_max=500)


def test_noise_offset_adds_per_channel_constant(schedule):
    plain = DiffusionObjective(schedule)
    offset = DiffusionObjective(schedule, noise_offset=0.5)
    n0, t0 = plain.sample((4, 16, 16), range(64), seed=1)
    n1, t1 = offset.sample((4, 16, 16), range(64), seed=1)
    assert torch.equal(t0, t1)
    diff = n1 - n0
    # the difference is constant over H, W and has std ~ offset across samples/channels
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff), atol=1e-6)
    assert 0.35 < diff[..., 0, 0].std().item() < 0.65


def test_targets_eps_and_v(schedule):
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.bfloat16)
    noise = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    eps = DiffusionObjective(schedule, "epsilon")
    noisy, target = eps.noisy_and_target(x0, noise, t)
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert noisy.dtype == torch.float32 and target.dtype == torch.float32
    torch.testing.assert_close(noisy, ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise)
    assert torch.equal(target, noise)
    v = DiffusionObjective(schedule, "v_prediction")
    _, vt = v.noisy_and_target(x0, noise, t)
    torch.testing.assert_close(vt, schedule.get_velocity(x0, noise, t))
    torch.testing.assert_close(vt, ab.sqrt() * noise - (1 - ab).sqrt() * x0.float())


def test_min_snr_weights(schedule):
    t = torch.tensor([0, 100, 400, 999])
    snr = schedule.snr(t)
    gamma = 5.0
    w_eps = DiffusionObjective(schedule, "epsilon", min_snr_gamma=gamma).weights(t)
    w_v = DiffusionObjective(schedule, "v_prediction", min_snr_gamma=gamma).weights(t)
    torch.testing.assert_close(w_eps, torch.minimum(snr, torch.tensor(gamma)) / snr)
    torch.testing.assert_close(w_v, torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    assert w_eps[0] < 1 and w_eps[-1] == 1  # high-SNR (small t) steps are down-weighted
    assert DiffusionObjective(schedule).weights(t) is None


def test_min_snr_finite_at_zero_terminal_snr():
    zsnr = NoiseSchedule(zero_terminal_snr=True)
    t = torch.tensor([999, 10])
    assert zsnr.snr(t)[0] == 0
    w_eps = DiffusionObjective(zsnr, "epsilon", min_snr_gamma=5.0).weights(t)
    w_v = DiffusionObjective(zsnr, "v_prediction", min_snr_gamma=5.0).weights(t)
    assert torch.isfinite(w_eps).all() and w_eps[0] == 1
    assert torch.isfinite(w_v).all() and w_v[0] == 0


def test_loss_is_fp32_weighted_mse(schedule):
    pred = torch.randn(4, 4, 8, 8).to(torch.bfloat16)
    target = torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 10, 300, 900])
    plain = DiffusionObjective(schedule).loss(pred, target, t)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, torch.nn.functional.mse_loss(pred.float(), target))
    obj = DiffusionObjective(schedule, min_snr_gamma=5.0)
    weighted = obj.loss(pred, target, t)
    per = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, (per * obj.weights(t)).mean())
    pred.requires_grad_(True)
    obj.loss(pred, target, t).backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16
