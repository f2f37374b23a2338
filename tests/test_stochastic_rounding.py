"""Stochastic rounding into bf16 and the AdamW that uses it for bf16 full fine-tuning (`trainer.stochastic`)."""
import torch

from trainer.stochastic import StochasticAdamW, stochastic_round_to_bf16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above |x| (same sign), by truncating the fp32 bit pattern."""
    lo = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    hi = ((x.view(torch.int32) & -(1 << 16)) + (1 << 16)).view(torch.float32)
    return lo, hi


def test_rounding_is_unbiased_and_lands_on_the_two_neighbours():
    gen = torch.Generator().manual_seed(0)
    for value in (1.0 + 0.3 * 2**-7, -3.0 - 0.8 * 2**-6, 1e-30 * 1.37):
        x = torch.full((200_000,), value, dtype=torch.float32)
        rounded = stochastic_round_to_bf16(x, gen).float()
        lo, hi = _neighbours(x[:1])
        assert set(rounded.unique().tolist()) == {lo.item(), hi.item()}, value
        frac = (value - lo.item()) / (hi.item() - lo.item())
        assert abs((rounded == hi).float().mean().item() - frac) < 0.01, value
        assert abs(rounded.double().mean().item() - value) < 0.01 * abs(hi.item() - lo.item()), value


def test_exact_values_and_specials_stay_put():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), -float("inf")])
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact.bfloat16().float())
    assert torch.isnan(stochastic_round_to_bf16(torch.tensor([float("nan")]))).all()


def test_fp32_parameters_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = StochasticAdamW([ours], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn_like(w)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.data, ref.data, rtol=0, atol=1e-6)


def test_small_updates_survive_in_bf16_where_round_to_nearest_loses_them():
    """lr far below bf16's spacing at 1.0 (2^-7): round-to-nearest never moves the weights;
    stochastic rounding moves their mean as fp32 AdamW would."""
    steps, lr = 50, 1e-4
    start = torch.ones(4096)

    def train(cls, dtype, **kw):
        p = torch.nn.Parameter(start.to(dtype, copy=True))
        opt = cls([p], lr=lr, weight_decay=0.0, **kw)
        for _ in range(steps):
            p.grad = torch.ones_like(p)  # Adam's step is ~lr per step: total ~ steps * lr
            opt.step()
        return p.detach().float()

    fp32 = train(torch.optim.AdamW, torch.float32, foreach=False)
    nearest = train(torch.optim.AdamW, torch.bfloat16, foreach=False)
    stochastic = train(StochasticAdamW, torch.bfloat16, seed=1)
    assert torch.equal(nearest, start)  # every update lost
    moved = (start - fp32).mean().item()
    assert abs((start - stochastic).mean().item() - moved) < 0.1 * moved
    # Fresh random bits every step: each weight moves about Binomial(50, 1/39) spacings of 2^-8. With
    # the same bits every step a weight would move at every step or never (50 spacings or none).
    assert (start - stochastic).max().item() < 12 * 2**-8


def test_moments_stay_fp32_through_a_state_dict_round_trip_and_rounding_repeats():
    torch.manual_seed(0)
    w = torch.randn(256).bfloat16()
    grads = [torch.randn(256).bfloat16() for _ in range(4)]

    def run(resume_at=None):
        p = torch.nn.Parameter(w.clone())
        opt = StochasticAdamW([p], lr=1e-3, seed=7)
        for i, g in enumerate(grads):
            if i == resume_at:  # a fresh optimizer and parameter from the saved state
                state, p = opt.state_dict(), torch.nn.Parameter(p.detach().clone())
                opt = StochasticAdamW([p], lr=1e-3, seed=7)
                opt.load_state_dict(state)
                assert opt.state[p]["exp_avg"].dtype == torch.float32
            p.grad = g
            opt.step()
        return p.detach(), opt.state[p]["exp_avg_sq"]

    (a, va), (b, vb) = run(), run(resume_at=2)
    assert torch.equal(a, b) and torch.equal(va, vb)
