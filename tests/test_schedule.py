"""NoiseSchedule against the reference DDPMScheduler (scaled-linear SD betas)."""
import pytest
import torch

from trainer.schedule import NoiseSchedule, rescale_zero_terminal_snr


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ref(zero_snr=False):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=zero_snr,
    )


@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_match_reference(zero_snr):
    ref = _ref(zero_snr)
    ours = NoiseSchedule(zero_terminal_snr=zero_snr)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float32
    # The reference computes in float32 and we in float64: its rounding sets the tolerance.
    assert rel(ours.betas, ref.betas) < 1e-5
    assert rel(ours.alphas_cumprod, ref.alphas_cumprod) < 1e-6
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    if zero_snr:
        assert ours.alphas_cumprod[-1] == 0 and ours.snr(torch.tensor([999]))[0] == 0
        assert torch.isfinite(ours.sigmas).all()
    else:
        assert abs(ours.alphas_cumprod[-1].item() - 0.0046601) < 1e-6  # SD: sigma_max = 14.6146


def test_rescale_function_matches_reference():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as ref_rescale

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ours = rescale_zero_terminal_snr(betas)
    ref = ref_rescale(betas.clone())
    assert rel(ours, ref) < 1e-12
    ab = torch.cumprod(1 - ours, 0)
    assert ab[-1].abs() < 1e-12 and abs(ab[0] - (1 - betas[0])) < 1e-12


@pytest.mark.parametrize("zero_snr", [False, True])
def test_add_noise_and_velocity_match_reference(zero_snr):
    ref = _ref(zero_snr)
    ours = NoiseSchedule(zero_terminal_snr=zero_snr)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert rel(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) < 1e-5
    assert rel(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t)) < 1e-5
    assert rel(ours.training_target(x0, noise, t, "v_prediction"), ref.get_velocity(x0, noise, t)) < 1e-5
    assert torch.equal(ours.training_target(x0, noise, t, "epsilon"), noise)


def test_half_inputs_computed_in_float32():
    ours = NoiseSchedule()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 4, 4, generator=g)
    noise = torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([3, 600, 999])
    out = ours.add_noise(x0.bfloat16(), noise.bfloat16(), t)
    assert out.dtype == torch.float32
    exact = ours.add_noise(x0.bfloat16().float(), noise.bfloat16().float(), t)
    assert torch.equal(out, exact)


def test_snr_and_sigma():
    ours = NoiseSchedule()
    t = torch.tensor([0, 10, 999])
    ab = ours.alphas_cumprod[t].double()
    assert rel(ours.snr(t), ab / (1 - ab)) < 1e-6
    assert rel(ours.sigma(t), ((1 - ab) / ab).sqrt()) < 1e-6
    assert abs(ours.sigmas[-1].item() - 14.6146) < 1e-3  # SD's sigma_max
    # sigma_to_t inverts sigma_at on and between the table entries.
    tt = torch.tensor([0.0, 3.25, 500.0, 998.5, 999.0], dtype=torch.float64)
    back = ours.sigma_to_t(ours.sigma_at(tt))
    assert (back - tt).abs().max() < 0.02


def test_bad_inputs_raise_clear_errors():
    ours = NoiseSchedule()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        ours.add_noise(x, x, torch.tensor([1000]))
    with pytest.raises(TypeError, match="integer"):
        ours.add_noise(x, x, torch.tensor([1.5]))
    with pytest.raises(ValueError, match="prediction_type"):
        ours.training_target(x, x, torch.tensor([1]), "sample")
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="cosine")
