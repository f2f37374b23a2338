"""`python -m trainer bench`: LoRA training throughput, optionally against diffusers + PEFT.

    python -m trainer bench --family tiny-sdxl --res 256 --batch 2 --steps 10 --compare diffusers
    python -m trainer bench --family sdxl --batch 4 --dtype bf16 --compare diffusers        # on a GPU
    python -m trainer bench --family sdxl --batch 1 --checkpointing --what train,load,data,sample

Sections (``--what``, comma-separated):

- ``train``: our UNet with random weights (no download) and a fresh LoRA (``--preset``, ``--rank``;
  ``--algo lora,loha,lokr`` times each adapter algorithm in turn, one row each, with its size
  as an fp16 file) trains on fixed random inputs (cached latents and text embeddings, so no VAE or text encoder
  runs): warm-up steps, then timed steps of forward, MSE loss, backward and AdamW (fused kernel).
  With ``--compare diffusers`` the same weights go into diffusers' UNet2DConditionModel (built from
  the config.json and weight names we write for diffusers folders) with a PEFT LoRA on the same
  modules and the same adapter weights; both live in this process and their timed steps alternate
  (A B, B A, A B, ...), so that machine load hits both alike. The table gives s/step (median), images/s, achieved
  TFLOP/s (UNet forward FLOPs counted once with FlopCounterMode; a training step counts 3x
  forward, 4x with ``--checkpointing``), % of ``--peak-tflops`` and peak memory.
- ``load``: checkpoint load time and peak RSS (``trainer.bench.load``: a random fp16 single-file
  checkpoint of the family is written to a temporary folder and loaded to the CPU; SDXL: ~6.9 GB),
  or, without that module, ``build_model`` on meta + materialise + random-init times.
- ``data``: data-pipeline images/s (``trainer.bench.data.benchmark_pipeline``).
- ``sample``: sampler s/step with classifier-free guidance (``trainer.sampling.pipeline.benchmark_sampling``).

CUDA is synchronised only around timed regions; the training step reads nothing back to the host.
diffusers and PEFT are benchmark-only dependencies, imported only under ``--compare diffusers``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import GRANULARITIES

from ..config import DTYPE_NAMES, torch_dtype

SECTIONS = ("train", "load", "data", "sample")
PEAK_TFLOPS = ((r"H100.*PCIe", 756.0), (r"H100.*(HBM3|SXM)", 989.0), (r"H200(?!.*NVL)", 989.0), (r"A100", 312.0))
"""Default `--peak-tflops` by CUDA device name (regex): dense bf16/fp16 tensor-core TFLOP/s, no
sparsity. Other GPUs (H100/H200 NVL, consumer cards, ...) need the flag."""
GIB = 1024**3
DATA_WORKERS = 2
"""DataLoader worker processes in the data section (as in training on one GPU)."""


class BenchError(ValueError):
    """Bad benchmark arguments or a missing optional dependency; printed as one `error:` line."""

    user_facing = True


@dataclass
class BenchConfig:
    """What to benchmark and how (one field per command-line flag)."""

    family: str = "sdxl"
    """Model family (`models.FAMILIES`): sdxl, sd15, sd2, tiny-sdxl, tiny-sd15."""
    res: int | None = None
    """Image side in pixels (latents are res/8); None = the family's native resolution."""
    batch: int = 1
    """Images per training step."""
    steps: int = 10
    """Timed steps per model (after warm-up); the median step time is reported."""
    warmup: int = 2
    """Untimed steps per model first (allocator warm-up, library loading, torch.compile)."""
    checkpointing: str | None = None
    """Our checkpointing granularity (block | layer | transformer; diffusers: its own, per block);
    training FLOPs then count 4x forward."""
    dtype: str | None = None
    """Base weight dtype, bf16 | fp16 | fp32 (None: bf16 on CUDA, fp32 on CPU). LoRA weights are
    always fp32; with bf16/fp16 the forward runs under autocast, as in training."""
    rank: int = 16
    """LoRA rank (alpha = rank)."""
    preset: str = "kohya"
    """LoRA target preset of `models.inject_lora` (attn, kohya, locon)."""
    algo: tuple[str, ...] = ("lora",)
    """Adapter algorithms (`models.lora.network.ALGOS`: lora, loha, lokr), timed one after another."""
    factor: int = -1
    """LoKr factorization factor (`lora.factor`)."""
    compare: str | None = None
    """`diffusers`: also train diffusers' UNet2DConditionModel + PEFT LoRA, interleaved."""
    compile: bool = False
    """torch.compile every transformer block (both models)."""
    channels_last: bool = False
    """Channels-last weights and latents (both models)."""
    what: tuple[str, ...] = ("train",)
    """Sections to run, see SECTIONS."""
    device: str | None = None
    """cuda | cpu (None: cuda when available)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s for the % column (None: by GPU name, see PEAK_TFLOPS; none on CPU)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    seed: int = 0
    """Seed of weights and inputs."""
    data_images: int = 32
    """Images generated for the data section."""
    sample_steps: int = 10
    """Sampler steps timed in the sample section."""
    json: str | None = None
    """Also write every figure to this JSON file."""


# ==================================================================================== CLI ==
def _sections(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {bad or text!r}; choose from {','.join(SECTIONS)}")
    return names


def _algos(text: str) -> tuple[str, ...]:
    from models.lora.network import ALGOS

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in ALGOS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown algorithm(s) {bad or text!r}; choose from {','.join(ALGOS)}")
    return names


def _at_least(minimum: int):
    def parse(text: str) -> int:
        if int(text) < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return int(text)

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from models.bundle import FAMILIES
    from models.lora.network import UNET_PRESETS

    a = parser.add_argument
    a("--family", default="sdxl", choices=list(FAMILIES), help="model family (random weights; default sdxl)")
    a("--res", type=_at_least(1), default=None, help="image side in pixels (default: the family's native size)")
    a("--batch", type=_at_least(1), default=1, help="images per step (default 1)")
    a("--steps", type=_at_least(1), default=10, help="timed steps per model (default 10)")
    a("--warmup", type=_at_least(0), default=2, help="untimed warm-up steps per model (default 2)")
    a("--checkpointing", nargs="?", const="block", default=None, choices=GRANULARITIES,
      help="gradient checkpointing, optionally its granularity (default block)")
    a("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="base weight dtype (default bf16 on CUDA, fp32 on CPU)")
    a("--rank", type=_at_least(1), default=16, help="LoRA rank (default 16)")
    a("--preset", choices=list(UNET_PRESETS), default="kohya", help="LoRA target modules (default kohya)")
    a("--algo", type=_algos, default=("lora",), help="adapter algorithms, comma-separated: lora,loha,lokr (default lora)")
    a("--factor", type=int, default=-1, help="LoKr factorization factor (default -1: most square)")
    a("--compare", choices=["diffusers"], default=None, help="also time diffusers' UNet + PEFT LoRA")
    a("--compile", action="store_true", help="torch.compile the transformer blocks")
    a("--channels-last", action="store_true", help="channels-last memory format")
    a("--what", type=_sections, default=("train",), help=f"sections, comma-separated: {','.join(SECTIONS)}")
    a("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    a("--peak-tflops", type=float, default=None,
      help="peak for the %% column (default: H100 SXM/H200 989, H100 PCIe 756, A100 312; else required)")
    a("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    a("--seed", type=int, default=0)
    a("--data-images", type=_at_least(1), default=32, help="images generated for the data section (default 32)")
    a("--sample-steps", type=_at_least(1), default=10, help="sampler steps for the sample section (default 10)")
    a("--json", default=None, metavar="FILE", help="also write all figures to FILE as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__})
    try:
        results = run_benchmarks(cfg)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.json:
        with open(cfg.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0


# ============================================================================= environment ==
def _resolve(cfg: BenchConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible; drop --device or use --device cpu")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype_name == "fp16" and device.type != "cuda":
        raise BenchError("--dtype fp16 needs a CUDA device; use --dtype bf16 or fp32 on CPU")
    return device, torch_dtype(dtype_name)


def machine_description(device: torch.device) -> str:
    """One line naming the hardware: GPU name, or the CPU model from /proc/cpuinfo and its cores."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads "
            f"(torch {torch.__version__}, load average {os.getloadavg()[0]:.1f})")


def default_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 tensor-core TFLOP/s of a GPU known by its CUDA name (PEAK_TFLOPS), else None."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def peak_tflops(cfg: BenchConfig, device: torch.device) -> float | None:
    """The peak of the % column: `--peak-tflops`, else the GPU's known peak; None on CPU."""
    if cfg.peak_tflops is not None or device.type != "cuda":
        return cfg.peak_tflops
    name = torch.cuda.get_device_name(device)
    peak = default_peak_tflops(name)
    if peak is None:
        raise BenchError(f"--peak-tflops: no known peak for {name!r}; pass its dense bf16 TFLOP/s, "
                         "e.g. --peak-tflops 989 for an H100 SXM")
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # the only host syncs: around timed regions
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM, which `measure_peak` resets)."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes held by a model's parameters/buffers and its optimizer state (shared storages once)."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                for t in tensors if t.device.type != "meta"}
    return sum(storages.values())


# ================================================================================== train ==
@dataclass
class Contender:
    """One model being trained: fixed inputs bound in `forward`, its LoRA optimizer, its timings."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[], torch.Tensor]
    """Runs the UNet on the bench inputs: () -> prediction (B, 4, h, w)."""
    target: torch.Tensor
    autocast: Callable[[], contextlib.AbstractContextManager]
    lora_params: int
    lora_modules: int
    times: list[float] = field(default_factory=list)
    """Wall-clock seconds of each timed step."""
    cpu_times: list[float] = field(default_factory=list)
    """CPU seconds of this process (all threads) in each timed step: on a shared machine this
    varies less than wall time with the other load."""
    peak_bytes: int | None = None

    def step(self) -> None:
        """One training step: forward (autocast), fp32 MSE, backward, optimizer step. No host sync."""
        with self.autocast():
            pred = self.forward()
        F.mse_loss(pred.float(), self.target).backward()
        self.optimizer.step()
        # Gradients freed after the step, so that a model waiting its turn holds no gradient memory.
        self.optimizer.zero_grad(set_to_none=True)


def _optimizer(params: list[torch.Tensor], device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel (CUDA; CPU since torch 2.4: ~4x faster there than
    the per-parameter loop that is torch's CPU default), else torch's default implementation."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)


def make_inputs(unet_config, batch: int, res: int, device, dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random cached-style inputs: x (B,4,res/8,res/8) latents, timesteps (B,), context (B,77,D),
    target like x (fp32); SDXL-style configs also pooled (B,P), time_ids (B,6) and y (B,adm)."""
    from models.unet import sdxl_vector

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet_config.in_channels, res // 8, res // 8, generator=g)
    out = {"x": x, "timesteps": torch.randint(0, 1000, (batch,), generator=g).float(),
           "context": torch.randn(batch, 77, unet_config.context_dim, generator=g),
           "target": torch.randn(x.shape, generator=g)}
    if unet_config.adm_in_channels is not None:
        out["pooled"] = torch.randn(batch, unet_config.adm_in_channels - 6 * 256, generator=g)
        out["time_ids"] = torch.tensor([[res, res, 0, 0, res, res]] * batch, dtype=torch.float32)
        out["y"] = sdxl_vector(out["pooled"], out["time_ids"])
    for k, v in out.items():
        keep_fp32 = k in ("timesteps", "target", "time_ids")
        out[k] = v.to(device=device, dtype=None if keep_fp32 else dtype)
    return out


def _check_size(cfg: BenchConfig) -> int:
    from models.bundle import family_spec

    res = cfg.res or family_spec(cfg.family).resolution
    if res % 8:
        raise BenchError(f"--res {res}: must be a multiple of 8 pixels (the VAE works on 8x8 blocks)")
    return res


def build_ours(cfg: BenchConfig, device: torch.device, dtype: torch.dtype):
    """Our UNet (random weights, on `device` in `dtype`) in a bundle whose other parts stay on meta
    (training from cached latents and embeddings needs neither VAE nor text encoders), with a
    LoRA of the first `cfg.algo`.

    Returns (bundle, network). See `add_network` for the adapter values.
    """
    import models
    from models.unet import UNet

    bundle = models.build_model(cfg.family, device="meta")
    torch.manual_seed(cfg.seed)
    bundle.unet = UNet(bundle.unet.config, device=device, dtype=dtype)
    return bundle, add_network(cfg, bundle, cfg.algo[0])


def _inject_args(cfg: BenchConfig, algo: str) -> dict:
    return {"unet": cfg.preset, "rank": cfg.rank, "algo": algo, **({"factor": cfg.factor} if algo == "lokr" else {})}


def add_network(cfg: BenchConfig, bundle, algo: str):
    """A fresh `algo` network on `bundle`. Its zero-initialised factors (LoRA up, LoHa w2a, LoKr
    w2 / w2_b) get small random values so that the adapters change the output (the parity check
    against the reference then covers them)."""
    import models

    network = models.inject_lora(bundle, **_inject_args(cfg, algo))
    with torch.no_grad():
        for adapter in network.adapters().values():
            for p in adapter.file_tensors().values():
                if not p.any():
                    nn.init.normal_(p, std=0.02)
    return network


def adapter_file_bytes(network) -> int:
    """Size of the network's tensors in an fp16 file (alpha included, header excluded)."""
    return sum(t.numel() * 2 for t in network.state_dict_for_export(dtype=None).values())


def _prepare(model: nn.Module, cfg: BenchConfig) -> None:
    model.train()  # our checkpointing applies in training mode only; dropout is 0 in every preset
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place: parameter names stay the same
        for module in model.modules():
            if type(module).__name__ == "BasicTransformerBlock":
                module.compile()


def ours_contender(cfg, bundle, network, inputs, device, autocast, name: str = "ours (lorasmith)") -> Contender:
    unet = bundle.unet
    if cfg.checkpointing:
        unet.set_gradient_checkpointing(True, cfg.checkpointing)
    _prepare(unet, cfg)
    params = [p for g in network.param_groups(1e-4) for p in g["params"]]
    x, ts, ctx, y = inputs["x"], inputs["timesteps"], inputs["context"], inputs.get("y")
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return Contender(name, unet, _optimizer(params, device), lambda: unet(x, ts, ctx, y),
                     inputs["target"], autocast, sum(p.numel() for p in params), len(network.adapters()))


# ---- reference: diffusers + PEFT (benchmark-only dependencies, imported here only) -----------
def build_reference(unet, network) -> nn.Module:
    """diffusers' UNet2DConditionModel with `unet`'s weights (copies, strict load) and a PEFT LoRA
    on the modules `network` adapts, holding the same adapter weights (fp32, scale folded in B)."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from trainer.bench.unet import build_reference as diffusers_copy

    try:
        ref = diffusers_copy(unet)  # our config.json and converter; strict load
        from peft import LoraConfig
    except ImportError as exc:
        raise BenchError(f"--compare diffusers needs diffusers and peft ({exc}); "
                         "install them with: pip install 'lorasmith[test]'") from None
    ref.requires_grad_(False)

    refs = network.refs()
    paths = {name: refs[name].peft.removeprefix("unet.") for name in network.adapters()}
    missing = [refs[n].path for n, p in paths.items() if refs[n].peft is None]
    if missing:
        raise BenchError(f"--compare diffusers: diffusers' UNet has no module for {missing[:3]}; use --preset kohya")
    # PEFT matches `target_modules` as a regex on full module paths: exactly our preset's modules.
    pattern = "|".join(re.escape(p) for p in sorted(paths.values()))
    ref.add_adapter(LoraConfig(r=network.config.rank, lora_alpha=network.config.rank, target_modules=pattern,
                               lora_dropout=0.0, init_lora_weights=True))
    with torch.no_grad():
        for name, adapter in network.adapters().items():
            layer = ref.get_submodule(paths[name])
            a_w, b_w = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            layer.lora_A["default"].weight = nn.Parameter(adapter.lora_down.weight.detach().clone().reshape(a_w.shape))
            scaled = adapter.lora_up.weight.detach() * (adapter.scale / layer.scaling["default"])
            layer.lora_B["default"].weight = nn.Parameter(scaled.clone().reshape(b_w.shape))
    return ref


def reference_contender(cfg, unet, network, inputs, device, autocast) -> tuple[Contender, float]:
    """The diffusers + PEFT contender, and the relative difference of its first output from ours."""
    ref = build_reference(unet, network)
    if cfg.checkpointing:
        ref.enable_gradient_checkpointing()
    params = [p for n, p in ref.named_parameters() if "lora_" in n]
    extra = {}
    if "pooled" in inputs:
        extra["added_cond_kwargs"] = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
    x, ts, ctx = inputs["x"], inputs["timesteps"], inputs["context"]
    with torch.no_grad(), autocast():
        ours_out = unet(x, ts, ctx, inputs.get("y")).float()
        ref_out = ref(x, ts, ctx, return_dict=False, **extra)[0].float()
    rel = ((ours_out - ref_out).norm() / ref_out.norm()).item()
    _prepare(ref, cfg)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    contender = Contender("diffusers+PEFT", ref, _optimizer(params, device),
                          lambda: ref(x, ts, ctx, return_dict=False, **extra)[0], inputs["target"], autocast,
                          sum(p.numel() for p in params), sum(1 for n, _ in ref.named_modules() if n.endswith("lora_A")))
    return contender, rel


# ---- FLOPs, timing, memory -------------------------------------------------------------------
def forward_flops(cfg: BenchConfig, res: int, algo: str = "lora") -> int:
    """FLOPs of one UNet+LoRA forward at batch 1, counted by FlopCounterMode on a meta copy
    (no memory, no compute; attention counted as its matmuls; LoHa/LoKr: building each update
    and applying it)."""
    from torch.utils.flop_counter import FlopCounterMode

    import models

    bundle = models.build_model(cfg.family, device="meta")
    models.inject_lora(bundle, **_inject_args(cfg, algo))
    inputs = make_inputs(bundle.unet.config, 1, res, "meta", torch.float32, cfg.seed)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bundle.unet(inputs["x"], inputs["timesteps"], inputs["context"], inputs.get("y"))
    return int(counter.get_total_flops())


def _timed_step(c: Contender, device: torch.device) -> None:
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    c.step()
    _sync(device)
    c.times.append(time.perf_counter() - start)
    c.cpu_times.append(time.process_time() - cpu)


def measure_peak(c: Contender, device: torch.device, others: list[Contender]) -> None:
    """Peak memory of one step of `c`, less the resident memory (weights, LoRA, optimizer state)
    of the other models held in the process: CUDA max_memory_allocated, or peak RSS on CPU."""
    held = sum(resident_bytes(o.model, o.optimizer) for o in others)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        c.step()
        _sync(device)
        c.peak_bytes = torch.cuda.max_memory_allocated(device) - held
    else:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
        c.step()
        c.peak_bytes = peak_rss_bytes() - held


def bench_train(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict:
    peak = peak_tflops(cfg, device)  # before any work: an unknown GPU needs --peak-tflops
    if cfg.compare and tuple(cfg.algo) != ("lora",):
        raise BenchError("--compare diffusers: PEFT's counterpart is plain LoRA; use --algo lora")
    bundle, network = build_ours(cfg, device, dtype)
    res = _check_size(cfg)
    inputs = make_inputs(bundle.unet.config, cfg.batch, res, device, dtype, cfg.seed)
    amp = dtype != torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if amp else contextlib.nullcontext()

    factor = 4 if cfg.checkpointing else 3
    rows, parity, fused, fwd_lora = [], None, False, None
    for i, algo in enumerate(cfg.algo):
        if i:  # one network at a time on the same UNet
            network.remove()
            network = add_network(cfg, bundle, algo)
        name = "ours (lorasmith)" if len(cfg.algo) == 1 else f"ours {algo}"
        contenders = [ours_contender(cfg, bundle, network, inputs, device, autocast, name)]
        fused = fused or bool(contenders[0].optimizer.defaults.get("fused"))
        for _ in range(cfg.warmup):
            contenders[0].step()
        measure_peak(contenders[0], device, [])  # before the reference exists: the cleanest figure
        if cfg.compare == "diffusers":
            ref, parity = reference_contender(cfg, bundle.unet, network, inputs, device, autocast)
            for _ in range(cfg.warmup):
                ref.step()
            measure_peak(ref, device, contenders)
            contenders.append(ref)
        for step in range(cfg.steps):
            # A B, B A, A B, ...: each model runs first and second equally often.
            for c in contenders if step % 2 == 0 else contenders[::-1]:
                _timed_step(c, device)
        fwd = forward_flops(cfg, res, algo) * cfg.batch
        fwd_lora = fwd if fwd_lora is None else fwd_lora
        size = adapter_file_bytes(network)
        for c in contenders:
            s = statistics.median(c.times)
            tflops = factor * fwd / s / 1e12
            rows.append({"model": c.name, "algo": algo if c is contenders[0] else "lora",
                         "s_per_step": s, "images_per_s": cfg.batch / s,
                         "cpu_s_per_step": statistics.median(c.cpu_times), "tflops": tflops,
                         "pct_peak": None if peak is None else 100 * tflops / peak,
                         "peak_mem_gib": None if c.peak_bytes is None else c.peak_bytes / GIB,
                         "lora_params": c.lora_params, "lora_modules": c.lora_modules,
                         "file_mib": size / 2**20 if c is contenders[0] else None,
                         "times": c.times, "cpu_times": c.cpu_times})
    out = {"family": cfg.family, "res": res, "batch": cfg.batch, "dtype": str(dtype).replace("torch.", ""),
           "rank": cfg.rank, "preset": cfg.preset, "algo": list(cfg.algo), "factor": cfg.factor,
           "checkpointing": cfg.checkpointing, "compile": cfg.compile,
           "channels_last": cfg.channels_last, "forward_gflop": fwd_lora / 1e9, "flop_factor": factor,
           "peak_tflops": peak, "rows": rows, "parity_rel_diff": parity, "fused_adamw": fused}
    if cfg.compare == "diffusers":
        out["ratio_step_time"] = rows[0]["s_per_step"] / rows[1]["s_per_step"]
        out["ratio_cpu_time"] = rows[0]["cpu_s_per_step"] / rows[1]["cpu_s_per_step"]
    return out


def print_train(r: dict, device: torch.device) -> None:
    cpu = device.type == "cpu"
    first = r["rows"][0]
    print(f"LoRA training, {r['family']} {r['res']}x{r['res']} px (latent {r['res'] // 8}^2), batch {r['batch']}, "
          f"{r['dtype']}, rank {r['rank']} {r['preset']} ({first['lora_modules']} modules, "
          f"{first['lora_params'] / 1e6:.2f}M params), AdamW{' fused' if r['fused_adamw'] else ''}"
          f"{', checkpointing ' + r['checkpointing'] if r['checkpointing'] else ''}{', compile' if r['compile'] else ''}"
          f"{', channels-last' if r['channels_last'] else ''}")
    peak = "n/a" if r["peak_tflops"] is None else f"{r['peak_tflops']:g}"
    print(f"UNet+LoRA forward {r['forward_gflop']:.3f} GFLOP/step; step = {r['flop_factor']}x forward; "
          f"peak {peak} TFLOP/s; median of {len(first['times'])} steps")
    head = f"{'model':<18}{'s/step':>10}{'images/s':>10}{'TFLOP/s':>10}{'% peak':>8}"
    several = len(r.get("algo", ())) > 1
    if several:
        head += f"{'params M':>10}{'file MiB':>10}"
    print(head + (f"{'CPU s/step':>12}  peak RSS GiB" if cpu else "  peak GiB (allocated)"))
    for row in r["rows"]:
        pct = "n/a" if row["pct_peak"] is None else f"{row['pct_peak']:.1f}"
        gib = "n/a" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.3f}"
        line = f"{row['model']:<18}{row['s_per_step']:>10.4f}{row['images_per_s']:>10.2f}{row['tflops']:>10.4g}{pct:>8}"
        if several:
            line += f"{row['lora_params'] / 1e6:>10.3f}{row['file_mib']:>10.3f}"
        print(line + (f"{row['cpu_s_per_step']:>12.4f}  {gib}" if cpu else f"  {gib}"))
    if "ratio_step_time" in r:
        ratio = r["ratio_step_time"]
        extra = f", CPU time {r['ratio_cpu_time']:.3f}" if cpu else ""
        print(f"ours/diffusers: step time {ratio:.3f}{extra} (throughput {1 / ratio:.2f}x); "
              f"output rel. diff {r['parity_rel_diff']:.1e} (same weights, LoRA and inputs)")
        print("peak memory of diffusers+PEFT excludes our model's weights, LoRA and optimizer state"
              + ("; CPU peak RSS is process-wide (Python, libraries, allocator caches)" if cpu else ""))


def run_benchmarks(cfg: BenchConfig) -> dict:
    """Run the selected sections, print their tables, return every figure (JSON-serialisable)."""
    from .sections import bench_data, bench_load, bench_sample, print_data, print_load, print_sample

    device, dtype = _resolve(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results: dict = {"machine": machine_description(device), "device": str(device), "config": asdict(cfg)}
    print(f"machine: {results['machine']}")
    sections = {"train": (lambda: bench_train(cfg, device, dtype), lambda r: print_train(r, device)),
                "load": (lambda: bench_load(cfg, device, dtype), print_load),
                "data": (lambda: bench_data(cfg), print_data),
                "sample": (lambda: bench_sample(cfg, device, dtype), print_sample)}
    for name in SECTIONS:
        if name in cfg.what:
            measure, show = sections[name]
            results[name] = measure()
            show(results[name])
    return results
