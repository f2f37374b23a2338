"""bf16 weights without fp32 master copies: AdamW whose update is rounded stochastically.

A bf16 weight has 8 significant bits, so an update smaller than half its spacing (|w| * 2^-9) is lost
entirely by round-to-nearest: with small learning rates most weights of a bf16 model trained with a
plain optimizer never move. Stochastic rounding keeps the update in expectation: the fp32 result x
lying between the bf16 neighbours lo < x < hi becomes hi with probability (x - lo) / (hi - lo), else
lo, so E[round(x)] = x and many small updates add up as they would in fp32.

`stochastic_round_to_bf16` does this with integer arithmetic on the fp32 bit pattern: bf16 is the
upper 16 bits of fp32, so adding a uniform random integer in [0, 2^16) to the pattern and clearing
the lower 16 bits rounds the magnitude up exactly with that probability (for either sign; inf and
NaN stay inf and NaN, a value within one spacing of the largest finite may round up to inf).

`StochasticAdamW` is torch's AdamW (decoupled weight decay, bias correction, the same operation
order) computed per parameter in fp32 from the bf16 weight and gradient, with fp32 moment estimates;
only the final write into the weight rounds stochastically. The random bits come from a generator
seeded by (seed, parameter index, step), so a resumed run rounds exactly as an uninterrupted one.
Memory per trained weight: 2 bytes weight + 2 gradient + 8 moments (fp32 master training: 4 + 4 + 8),
plus fp32 temporaries of one parameter at a time.
"""
from __future__ import annotations

import math

import torch

from .objective import sample_seed

_LOW_BITS = 1 << 16


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`x` (fp32, any shape) rounded to bf16 stochastically (module docstring); same shape, bf16."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 takes fp32, got {x.dtype}")
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & -_LOW_BITS  # -2^16 = 0xFFFF0000: keep the upper 16 bits
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the lower bits are zero


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW for bf16 (or any float) parameters with fp32 moments and a stochastically rounded
    bf16 write (module docstring); fp32 parameters are written as computed, exactly as torch's
    AdamW. Arguments as `torch.optim.AdamW`, plus `seed` for the rounding."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, seed: int = 0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, index: int, step: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(sample_seed(self.seed, index * 0x100000000 + step))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1  # position over all groups: the rounding seed of this parameter
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"])
                grad = p.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                weight = p.float() if p.dtype != torch.float32 else p
                weight.mul_(1 - lr * decay)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                weight.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
                if p.dtype == torch.bfloat16:
                    p.copy_(stochastic_round_to_bf16(weight, self._generator(p.device, index, step)))
                elif weight is not p:
                    p.copy_(weight)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the moments stay fp32 (torch casts floating state to the parameter's dtype,
        which would round bf16 parameters' moments and break exact resumption)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                for key in ("exp_avg", "exp_avg_sq"):
                    self.state[p][key] = saved[i][key].to(device=p.device, dtype=torch.float32)
                self.state[p]["step"] = saved[i]["step"].to(dtype=torch.float32, device="cpu")
