"""Time forward+backward of the native UNet against diffusers' UNet2DConditionModel.

    python -m trainer.bench.unet [--config tiny-sdxl] [--batch 2] [--res 64] [--steps 10]

Both models get the same config (the config.json we write for diffusers folders), the same weights
(ours random, renamed by our diffusers-folder converter) and the same inputs, in one process; runs
alternate between the two so that machine noise hits both alike. ``--res`` is the latent side
(pixels / 8). ``--config`` takes a UNet preset or one of ``BENCH_CONFIGS`` (mid-size variants).
diffusers is a benchmark-only dependency, imported by ``diffusers_unet_class`` and nowhere else.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.checkpoints.diffusers_keys import (
    unet_config_to_diffusers,
    unet_state_dict_to_diffusers,
)
from models.unet import UNet, UNetConfig, sdxl_vector

BENCH_CONFIGS = {
    # SDXL layout at 1/5 width: heads of 64 channels, full 2048 context and 2816 adm.
    "mid-sdxl": ("sdxl", {"model_channels": 64}),
    "mid-sd15": ("sd15", {"model_channels": 64}),
}


def bench_config(name: str) -> UNetConfig:
    """A UNet preset or a ``BENCH_CONFIGS`` entry."""
    if name in BENCH_CONFIGS:
        base, changes = BENCH_CONFIGS[name]
        return UNetConfig.preset(base).replace(**changes)
    try:
        return UNetConfig.preset(name)
    except ValueError as err:
        raise ValueError(f"{err}; or a bench config: {', '.join(BENCH_CONFIGS)}") from None


def diffusers_unet_class():
    """diffusers' UNet2DConditionModel (the comparison baseline; imported only when compared)."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as exc:
        raise RuntimeError(f"the comparison with diffusers needs it installed (pip install diffusers): {exc}") from None
    return UNet2DConditionModel


def build_reference(unet: UNet) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel holding copies of ``unet``'s weights (strict load).

    Its config is the config.json we write for diffusers folders and its weights are ours under the
    names our converter gives them, so a wrong config or name fails the load or the output check.
    """
    model_class = diffusers_unet_class()
    state = unet_state_dict_to_diffusers(unet.state_dict(), unet.config)
    with torch.device("meta"):
        ref = model_class.from_config(unet_config_to_diffusers(unet.config, sample_size=32))
    ref.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return ref


def make_inputs(cfg: UNetConfig, batch: int, height: int, width: int, generator=None) -> dict:
    """Random inputs: x, timesteps, context, and for SDXL-style configs pooled/time_ids/y."""
    g = generator
    inputs = {
        "x": torch.randn(batch, cfg.in_channels, height, width, generator=g),
        "timesteps": torch.randint(0, 1000, (batch,), generator=g).float(),
        "context": torch.randn(batch, 77, cfg.context_dim, generator=g),
    }
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(batch, cfg.adm_in_channels - 6 * 256, generator=g)
        sizes = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0])
        time_ids = sizes + torch.randint(0, 64, (batch, 6), generator=g) * 8.0
        inputs.update(pooled=pooled, time_ids=time_ids, y=sdxl_vector(pooled, time_ids))
    return inputs


def run_ours(unet: UNet, inp: dict) -> torch.Tensor:
    return unet(inp["x"], inp["timesteps"], inp["context"], y=inp.get("y"))


def run_reference(ref: torch.nn.Module, inp: dict) -> torch.Tensor:
    extra = {}
    if "pooled" in inp:
        extra["added_cond_kwargs"] = {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}
    return ref(inp["x"], inp["timesteps"], inp["context"], return_dict=False, **extra)[0]


def _step(fn, model, inp) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    fn(model, inp).square().mean().backward()
    return time.perf_counter() - t0


def compare(config: str, batch: int, res: int, steps: int, warmup: int = 2) -> dict:
    """Median seconds per fwd+bwd step of ours and diffusers', and their output rel. error."""
    torch.manual_seed(0)
    cfg = bench_config(config)
    ours = UNet(cfg).train()
    ref = build_reference(ours).train()
    inp = make_inputs(cfg, batch, res, res)
    with torch.no_grad():
        a, b = run_ours(ours, inp), run_reference(ref, inp)
        rel = ((a - b).norm() / b.norm()).item()
    for _ in range(warmup):
        _step(run_ours, ours, inp)
        _step(run_reference, ref, inp)
    t_ours, t_ref = [], []
    for _ in range(steps):
        t_ours.append(_step(run_ours, ours, inp))
        t_ref.append(_step(run_reference, ref, inp))
    mo, mr = statistics.median(t_ours), statistics.median(t_ref)
    # Each step of ours is paired with the diffusers step right after it; the median of the pair
    # ratios is robust to load changes on a shared machine.
    paired = statistics.median(a / b for a, b in zip(t_ours, t_ref))
    return {"config": config, "batch": batch, "res": res, "ours_s": mo, "diffusers_s": mr, "ratio": mo / mr,
            "paired_ratio": paired, "rel_err": rel, "params": sum(p.numel() for p in ours.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.bench.unet", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny-sdxl", help="UNet preset or mid-sdxl / mid-sd15")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--res", type=int, default=64, help="latent height = width")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = compare(args.config, args.batch, args.res, args.steps)
    print(f"UNet fwd+bwd, {r['config']} ({r['params'] / 1e6:.1f}M params), batch {r['batch']}, "
          f"latent {r['res']}x{r['res']}, {torch.get_num_threads()} threads, median of {args.steps}")
    print(f"{'model':<12}{'s/step':>10}")
    print(f"{'ours':<12}{r['ours_s']:>10.4f}")
    print(f"{'diffusers':<12}{r['diffusers_s']:>10.4f}")
    print(f"ratio ours/diffusers: {r['ratio']:.3f} (of medians), {r['paired_ratio']:.3f} (median of paired steps)")
    print(f"output rel. err vs diffusers: {r['rel_err']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
