"""Optimizers and learning-rate schedules for LoRA training.

`build_optimizer` turns `OptimConfig` plus parameter groups into a torch optimizer (torch's own,
bitsandbytes' 8-bit ones, Prodigy from `prodigyopt` or schedule-free AdamW from `schedulefree`);
`build_scheduler` returns a `LambdaLR` that scales every group's own learning rate by the same
warmup + decay factor, so per-group rates (UNet vs text encoders, LoRA+, block multipliers) keep
their ratio throughout training.

Schedule-free AdamW trains at one point (y) and is evaluated at another (x, an average): it must be
in eval mode whenever the weights are read for use (`eval_weights`) and in train mode for steps.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from .config import OptimConfig

TORCH_OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
BNB_OPTIMIZERS = {
    # name -> bitsandbytes.optim class
    "adamw8bit": "AdamW8bit",
    "adam8bit": "Adam8bit",
    "paged_adamw8bit": "PagedAdamW8bit",
    "lion8bit": "Lion8bit",
    "paged_lion8bit": "PagedLion8bit",
}
EXTRA_OPTIMIZERS = {
    # name -> (module, class, pip extra of this package)
    "prodigy": ("prodigyopt", "Prodigy", "prodigy"),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
}
OPTIMIZERS = TORCH_OPTIMIZERS + tuple(BNB_OPTIMIZERS) + tuple(EXTRA_OPTIMIZERS)
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts")


class OptimizerUnavailable(RuntimeError):
    """The configured optimizer cannot run here (e.g. bitsandbytes missing or broken)."""


def param_groups(
    unet_params: Iterable[torch.nn.Parameter],
    text_encoder_params: Iterable[torch.nn.Parameter],
    cfg: OptimConfig,
) -> list[dict]:
    """Optimizer groups: UNet adapters at `cfg.lr`, text-encoder adapters at `cfg.te_lr` (or `lr`).

    Empty groups are dropped; each group carries a `name` used for logging ("unet", "text_encoders").
    """
    groups = []
    unet = [p for p in unet_params if p.requires_grad]
    te = [p for p in text_encoder_params if p.requires_grad]
    if unet:
        groups.append({"name": "unet", "params": unet, "lr": cfg.lr})
    if te:
        te_lr = cfg.te_lr if cfg.te_lr is not None else cfg.lr
        groups.append({"name": "text_encoders", "params": te, "lr": te_lr})
    if not groups:
        raise ValueError("no trainable parameters: the LoRA network is empty (check lora.preset / lora.targets)")
    return groups


def _import_bitsandbytes():
    """Import bitsandbytes or raise `OptimizerUnavailable` saying how to fix it.

    bitsandbytes can fail at import with errors other than ImportError (missing CUDA libraries,
    unsupported platform), so every exception is turned into the same clear message.
    """
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise OptimizerUnavailable(
            f"the 8-bit optimizers need bitsandbytes, which is not installed ({exc}); "
            "install it with `pip install bitsandbytes` or set optim.name=adamw"
        ) from exc
    except Exception as exc:
        raise OptimizerUnavailable(
            f"bitsandbytes is installed but cannot run on this machine ({type(exc).__name__}: {exc}); "
            "set optim.name=adamw"
        ) from exc


def optimizer_class(name: str):
    """The class of an optimizer from an optional package (`EXTRA_OPTIMIZERS`), or
    `OptimizerUnavailable` with the pip command when the package is missing."""
    module, cls, extra = EXTRA_OPTIMIZERS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise OptimizerUnavailable(
            f"optim.name={name} needs the `{module}` package ({exc}); install it with "
            f"`pip install 'lorasmith[{extra}]'` (or `pip install {module}`), or set optim.name=adamw") from exc


def require_optimizer(name: str) -> None:
    """Fail now (before any model loads) when `name` needs an optional package that is missing."""
    if name in EXTRA_OPTIMIZERS:
        optimizer_class(name)
    elif name in BNB_OPTIMIZERS:
        _import_bitsandbytes()


def is_schedule_free(optimizer) -> bool:
    """Whether `optimizer` (or the one an accelerate wrapper holds) has schedule-free train/eval modes."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return any("train_mode" in g for g in inner.param_groups)


@contextlib.contextmanager
def eval_weights(optimizer, params: list[torch.nn.Parameter]):
    """Within the block, `params` hold the weights to use (schedule-free: x, the average); after it
    they are bit-for-bit the training weights again (y), so reading the weights for samples,
    validation, exports or checkpoints never changes training. No-op for other optimizers."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not is_schedule_free(inner):
        yield
        return
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        inner.eval()
        try:
            yield
        finally:
            inner.train()  # the mode flag; the weights are restored exactly below (eval/train rounds)
            for p, s in zip(params, saved):
                p.copy_(s)


def build_optimizer(groups: list[dict], cfg: OptimConfig, allow_fused: bool = True) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` over `groups` (see `param_groups`).

    AdamW/Adam use the fused kernel (CUDA, and CPU since torch 2.4: several times faster than
    foreach there) when every parameter is a floating tensor on one such device, foreach otherwise.
    `allow_fused=False` is for fp16 loss scaling: a fused step hides an overflow-skipped step from
    accelerate, which would then advance the LR schedule. Weight decay applies to all adapter weights.
    """
    name = cfg.name
    params = [p for g in groups for p in g["params"]]
    kinds = {p.device.type for p in params}
    fusable = bool(params) and len(kinds) == 1 and kinds <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params)
    betas = tuple(cfg.betas)
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        kwargs = {"lr": cfg.lr, "betas": betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
        if fusable and allow_fused:
            kwargs["fused"] = True
        return cls(groups, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise OptimizerUnavailable("optim.name=adafactor needs torch >= 2.5; upgrade torch or use adamw")
        return torch.optim.Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "prodigy":
        return optimizer_class(name)(
            groups, lr=cfg.lr, betas=betas, beta3=cfg.beta3, eps=cfg.eps, weight_decay=cfg.weight_decay,
            decouple=True, use_bias_correction=cfg.use_bias_correction, safeguard_warmup=cfg.safeguard_warmup,
            d0=cfg.d0, d_coef=cfg.d_coef, growth_rate=math.inf if cfg.growth_rate is None else cfg.growth_rate)
    if name == "adamw_schedulefree":
        optimizer = optimizer_class(name)(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                          warmup_steps=cfg.warmup_steps)
        optimizer.train()  # it starts in eval mode; steps need train mode
        return optimizer
    if name in BNB_OPTIMIZERS:
        bnb = _import_bitsandbytes()
        cls = getattr(bnb.optim, BNB_OPTIMIZERS[name], None)
        if cls is None:
            raise OptimizerUnavailable(
                f"this bitsandbytes ({getattr(bnb, '__version__', '?')}) has no {BNB_OPTIMIZERS[name]}; "
                "upgrade bitsandbytes or pick another optim.name"
            )
        kwargs = {"lr": cfg.lr, "betas": betas, "weight_decay": cfg.weight_decay}
        if "eps" in inspect.signature(cls.__init__).parameters:
            kwargs["eps"] = cfg.eps
        try:
            optimizer = cls(groups, **kwargs)
        except Exception as exc:
            raise OptimizerUnavailable(
                f"bitsandbytes could not create {BNB_OPTIMIZERS[name]} ({type(exc).__name__}: {exc}); "
                "set optim.name=adamw"
            ) from exc
        if kinds == {"cuda"}:
            probe_bitsandbytes(cls, kwargs, params[0].device)
        return optimizer
    raise ValueError(f"optim.name: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def probe_bitsandbytes(cls, kwargs: dict, device: torch.device) -> None:
    """Run one step of bitsandbytes optimizer `cls` on a throw-away tensor on `device`.

    bitsandbytes loads its CUDA library, and fails on a mismatched CUDA runtime or GPU, only at
    the first `step()`: probing when the optimizer is built turns that failure (otherwise after
    model loading and caching, inside the first training step) into one `OptimizerUnavailable`
    line. 4096 elements: bitsandbytes keeps 8-bit state only from that size on.
    """
    try:
        p = torch.zeros(4096, device=device, requires_grad=True)
        p.grad = torch.ones_like(p)
        cls([p], **kwargs).step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernel launch errors surface here
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise OptimizerUnavailable(
            f"bitsandbytes {cls.__name__} cannot run on {device} ({type(exc).__name__}: {first}); "
            "fix the bitsandbytes install (python -m bitsandbytes) or set optim.name=adamw"
        ) from exc


def lr_factor(step: int, *, scheduler: str, warmup_steps: int, max_steps: int, num_cycles: int = 1,
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier on the base learning rate for optimizer step `step` (0-based).

    Warmup ramps linearly as (step + 1) / warmup_steps, so the first step already moves and the
    last warmup step reaches the full rate. After warmup, `progress` runs 0 -> 1 over the remaining
    steps and the factor decays to `min_lr_ratio`: linearly, along a half cosine, or along
    `num_cycles` half cosines that restart at the full rate.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if scheduler == "linear":
        decay = 1.0 - progress
    elif scheduler == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif scheduler == "cosine_with_restarts":
        if progress >= 1.0:
            decay = 0.0
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    else:
        raise ValueError(f"optim.scheduler: unknown schedule {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> LambdaLR:
    """A `LambdaLR` applying `lr_factor` to every parameter group; step it once per optimizer step.
    Schedule-free AdamW gets a constant factor (its warmup runs inside the optimizer)."""
    schedule_free = is_schedule_free(optimizer)

    def factor(step: int) -> float:
        if schedule_free:
            return 1.0
        return lr_factor(
            step,
            scheduler=cfg.scheduler,
            warmup_steps=cfg.warmup_steps,
            max_steps=max_steps,
            num_cycles=cfg.num_cycles,
            min_lr_ratio=cfg.min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)
