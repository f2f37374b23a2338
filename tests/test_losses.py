"""Loss shapes, weightings and noise/timestep variants against hand-computed values: Huber and
smooth-L1 with their threshold schedules, debiased estimation, prior-loss and mask composition,
logit-normal and shifted timesteps, pyramid noise and input perturbation."""
import math

import pytest
import torch

from trainer import losses
from trainer.objective import DiffusionObjective
from trainer.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


# ---- elementwise losses and thresholds -------------------------------------------------------------------
def test_huber_and_smooth_l1_match_hand_computed_values():
    pred = torch.tensor([[1.5, -0.2]])
    target = torch.zeros(1, 2)
    c = torch.tensor([0.5])
    # d = 1.5: sqrt(2.25 + 0.25) - 0.5 = 1.0811388; huber = 2c * that, smooth_l1 = 2 * that
    huber = losses.elementwise_loss(pred, target, "huber", c)
    smooth = losses.elementwise_loss(pred, target, "smooth_l1", c)
    inner = [math.sqrt(1.5**2 + 0.25) - 0.5, math.sqrt(0.2**2 + 0.25) - 0.5]
    torch.testing.assert_close(huber, torch.tensor([[1.0 * inner[0], 1.0 * inner[1]]]))
    torch.testing.assert_close(smooth, torch.tensor([[2 * inner[0], 2 * inner[1]]]))
    torch.testing.assert_close(losses.elementwise_loss(pred, target, "mse"), torch.tensor([[2.25, 0.04]]))
    # pseudo-Huber limits: ~d^2 for |d| << c, ~2c|d| for |d| >> c
    tiny, big = torch.tensor([[1e-3]]), torch.tensor([[100.0]])
    assert losses.elementwise_loss(tiny, torch.zeros(1, 1), "huber", c).item() == pytest.approx(1e-6, rel=0.05)  # fp32 rounding
    assert losses.elementwise_loss(big, torch.zeros(1, 1), "huber", c).item() == pytest.approx(2 * 0.5 * 100, rel=1e-2)


def test_huber_threshold_schedules(schedule):
    t = torch.tensor([0, 500, 999])
    abar = schedule.alphas_cumprod
    const = losses.huber_threshold("constant", 0.1, t, abar, 1000)
    torch.testing.assert_close(const, torch.full((3,), 0.1))
    expo = losses.huber_threshold("exponential", 0.1, t, abar, 1000)  # c^(t/T)
    torch.testing.assert_close(expo, torch.tensor([1.0, 0.1**0.5, 0.1**0.999]))
    snr = losses.huber_threshold("snr", 0.1, t, abar, 1000)
    want = []
    for step in t.tolist():
        a = float(abar[step])
        sigma = math.sqrt((1 - a) / a)
        want.append(0.9 / (1 + sigma) ** 2 + 0.1)
    torch.testing.assert_close(snr, torch.tensor(want))
    assert snr[0] > snr[1] > snr[2] > 0.1  # large near clean images, c at pure noise
    zero = NoiseSchedule(zero_terminal_snr=True)  # sigma = inf at the last step: exactly c, not NaN
    assert losses.huber_threshold("snr", 0.1, torch.tensor([999]), zero.alphas_cumprod, 1000).item() == pytest.approx(0.1)


def test_objective_uses_the_scheduled_threshold(schedule):
    obj = DiffusionObjective(schedule, loss="smooth_l1", huber_c=0.2, huber_schedule="constant")
    pred, target, t = torch.full((2, 1, 1, 1), 1.0), torch.zeros(2, 1, 1, 1), torch.tensor([10, 900])
    expected = 2 * (math.sqrt(1 + 0.04) - 0.2)
    torch.testing.assert_close(obj.per_sample_loss(pred, target, t), torch.full((2,), expected))


# ---- weightings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights(schedule, prediction):
    obj = DiffusionObjective(schedule, prediction, debiased_estimation=True)
    t = torch.tensor([0, 100, 500, 999])
    snr = [min(float(schedule.alphas_cumprod[s] / (1 - schedule.alphas_cumprod[s])), 1000.0) for s in t.tolist()]
    assert snr[0] == 1000.0  # t = 0 is capped (snr is ~1e3..1e4 there)
    want = [1 / (x + 1) if prediction == "v_prediction" else 1 / math.sqrt(x) for x in snr]
    torch.testing.assert_close(obj.weights(t), torch.tensor(want))
    # per_sample_loss multiplies the MSE by the weight
    pred, target = torch.ones(4, 1, 2, 2), torch.zeros(4, 1, 2, 2)
    torch.testing.assert_close(obj.per_sample_loss(pred, target, t), torch.tensor(want))


def test_debiased_estimation_refuses_min_snr_and_zero_snr_epsilon(schedule):
    with pytest.raises(ValueError, match="both weight the loss by SNR"):
        DiffusionObjective(schedule, debiased_estimation=True, min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="1/sqrt\\(0\\)"):
        DiffusionObjective(NoiseSchedule(zero_terminal_snr=True), "epsilon", debiased_estimation=True)
    DiffusionObjective(NoiseSchedule(zero_terminal_snr=True), "v_prediction", debiased_estimation=True)


def test_prior_mask_and_snr_weights_compose_as_documented(schedule):
    """loss = mean_b( s_b * w_b * mean_{c,h,w}( m * l ) ), computed by hand for two samples."""
    obj = DiffusionObjective(schedule, min_snr_gamma=5.0)
    pred = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 1.0]]]])  # (2, 1, 1, 2)
    target = torch.zeros(2, 1, 1, 2)
    t = torch.tensor([50, 800])
    mask = torch.tensor([[[[1.0, 0.25]]], [[[0.5, 1.0]]]])
    prior = torch.tensor([1.0, 0.5])
    w = obj.weights(t)
    assert w[0] != w[1]
    per = [(1.0 * 1 + 4.0 * 0.25) / 2, (9.0 * 0.5 + 1.0 * 1) / 2]
    want = (prior[0] * w[0] * per[0] + prior[1] * w[1] * per[1]) / 2
    got = obj.loss(pred, target, t, pixel_weights=mask, sample_weights=prior)
    torch.testing.assert_close(got, want)


def test_ignored_pixels_get_exactly_zero_gradient(schedule):
    obj = DiffusionObjective(schedule, loss="huber", huber_c=0.1)
    pred = torch.randn(2, 4, 6, 6, requires_grad=True)
    target = torch.randn(2, 4, 6, 6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[..., :, 3:] = 1.0  # learn the right half only (unmasked_weight 0)
    obj.loss(pred, target, torch.tensor([10, 700]), pixel_weights=mask).backward()
    assert torch.count_nonzero(pred.grad[..., :3]) == 0
    assert torch.count_nonzero(pred.grad[..., 3:]) == pred.grad[..., 3:].numel()
    # an all-zero mask: zero loss and zero gradient, never NaN
    pred.grad = None
    loss = obj.loss(pred, target, torch.tensor([10, 700]), pixel_weights=torch.zeros(2, 1, 6, 6))
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(pred.grad) == 0


# ---- timesteps ---------------------------------------------------------------------------------------------
def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_logit_normal_timesteps_follow_their_distribution(schedule):
    mean, std, n = 0.5, 0.8, 20000
    obj = DiffusionObjective(schedule, timestep_sampling="logit_normal", logit_mean=mean, logit_std=std)
    _, t = obj.sample((1, 1, 1), range(n), seed=7)
    again = obj.sample((1, 1, 1), range(n), seed=7)[1]
    assert torch.equal(t, again) and t.min() >= 0 and t.max() <= 999
    for edge in (100, 250, 500, 750, 900):
        u = edge / 1000  # P(t < edge) = P(sigmoid(mean + std z) < u)
        want = _normal_cdf((math.log(u / (1 - u)) - mean) / std)
        got = (t < edge).float().mean().item()
        assert abs(got - want) < 0.015, (edge, got, want)


def test_timestep_shift_moves_timesteps_towards_noise(schedule):
    s, n = 3.0, 20000
    obj = DiffusionObjective(schedule, timestep_shift=s)
    _, t = obj.sample((1, 1, 1), range(n), seed=3)
    for edge in (200, 500, 800):
        x = edge / 1000  # u' = s u / (1 + (s - 1) u) < x  <=>  u < x / (s - (s - 1) x)
        want = x / (s - (s - 1) * x)
        assert abs((t < edge).float().mean().item() - want) < 0.015
    plain = DiffusionObjective(schedule, timestep_min=10, timestep_max=20)  # shift 1: torch.randint as before
    gen = torch.Generator().manual_seed(__import__("trainer.objective", fromlist=["sample_seed"]).sample_seed(5, 0))
    assert plain.sample((1, 1, 1), [0], seed=5)[1].item() == torch.randint(10, 20, (1,), generator=gen).item()


def test_logit_normal_respects_the_timestep_range(schedule):
    obj = DiffusionObjective(schedule, timestep_sampling="logit_normal", timestep_min=200, timestep_max=300)
    _, t = obj.sample((1, 1, 1), range(3000), seed=0)
    assert t.min() >= 200 and t.max() <= 299 and len(t.unique()) > 50


# ---- noise ---------------------------------------------------------------------------------------------
def test_pyramid_noise_shape_unit_variance_and_low_frequencies(schedule):
    plain = DiffusionObjective(schedule)
    pyramid = DiffusionObjective(schedule, multires_noise_iterations=6, multires_noise_discount=0.8)
    n0, t0 = plain.sample((4, 32, 32), range(64), seed=2)
    n1, t1 = pyramid.sample((4, 32, 32), range(64), seed=2)
    assert n1.shape == (64, 4, 32, 32) and torch.equal(t0, t1)
    torch.testing.assert_close(n1.flatten(1).std(dim=1), torch.ones(64))  # unit std per sample
    # white noise: a channel's spatial mean has variance 1/(32*32); pyramid levels add coarse structure
    white = n0.mean(dim=(2, 3)).var().item()
    coarse = n1.mean(dim=(2, 3)).var().item()
    assert white < 2 / 1024 and coarse > 20 * white, (white, coarse)
    # per sample: the same whatever the batch split
    a, _ = pyramid.sample((4, 32, 32), range(3), seed=2)
    torch.testing.assert_close(a, n1[:3])


def test_input_perturbation_changes_the_input_not_the_target(schedule):
    obj = DiffusionObjective(schedule, ip_noise_gamma=0.1)
    plain = DiffusionObjective(schedule)
    latents = torch.randn(3, 4, 8, 8)
    noise, t, input_noise = obj.draw((4, 8, 8), range(3), seed=1)
    n0, t0, none = plain.draw((4, 8, 8), range(3), seed=1)
    assert none is None and torch.equal(noise, n0) and torch.equal(t, t0)
    extra = (input_noise - noise) / 0.1
    assert 0.8 < extra.std().item() < 1.2
    noisy, target = obj.noisy_and_target(latents, noise, t, input_noise)
    torch.testing.assert_close(noisy, schedule.add_noise(latents, input_noise, t))
    assert torch.equal(target, noise)  # epsilon target: the plain noise
