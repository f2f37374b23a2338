"""Checkpoint loading benchmark: peak memory and time-to-ready of `models.load_model`.

    python -m trainer.bench.load --layout single-file --dir /tmp/bench --generate
    python -m trainer.bench.load --layout diffusers --dir /tmp/bench --repeat 2

`--generate` writes a full-size checkpoint of `--family` (default SDXL) with random fp16 weights
(~6.9 GB for SDXL) into --dir if it is not there yet; delete it when done. Each measurement runs
in a fresh subprocess that resets its peak-RSS counter after imports (`/proc/self/clear_refs`),
loads the checkpoint in fp16 onto the CPU, touches every tensor once (one element per 4 KiB page)
and reports VmHWM from /proc/self/status. Time-to-ready = load + touch, with the file in the page
cache after the first repeat. `--mode to_empty` measures the alternative materialisation
(allocate with `to_empty`, copy in place) instead of `load_state_dict(assign=True)`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _source(layout: str, root: Path) -> Path:
    return root / ("model.safetensors" if layout == "single-file" else "pipeline")


def generate(layout: str, root: Path, family: str) -> Path:
    """Write a random-weight fp16 checkpoint of `family` (full size) without holding it in memory."""
    import torch

    from models.bundle import build_model
    from models.checkpoints.diffusers_folder import (
        WEIGHT_FILES,
        diffusers_state_dicts,
        write_diffusers_configs,
    )
    from models.checkpoints.safetensors_io import write_stream
    from models.checkpoints.single_file import single_file_state_dict

    target = _source(layout, root)
    if target.exists():
        return target
    bundle = build_model(family, device="meta")
    gen = torch.Generator().manual_seed(0)

    def specs(state):
        return [(k, torch.float16 if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in state.items()]

    def random_tensor(state):
        def produce(name):
            ref = state[name]
            if not ref.is_floating_point():
                return torch.arange(ref.numel(), dtype=ref.dtype).reshape(ref.shape)
            return torch.empty(ref.shape, dtype=torch.float16).uniform_(-0.05, 0.05, generator=gen)

        return produce

    if layout == "single-file":
        state = single_file_state_dict(bundle)
        write_stream(target, specs(state), random_tensor(state), {"format": "pt"})
    else:
        write_diffusers_configs(bundle, target, torch.float16)
        for component, state in diffusers_state_dicts(bundle).items():
            write_stream(target / component / WEIGHT_FILES[component], specs(state), random_tensor(state), {"format": "pt"})
    return target


def measure(source: Path, mode: str) -> dict:
    """Runs inside the child process: load, touch, report."""
    import torch

    from models.checkpoints import loading, materialize

    materialize.materialize_mode = mode
    baseline = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    bundle = loading.load_model(source, dtype=torch.float16, device="cpu")
    loaded = time.perf_counter()
    total = 0.0
    n_bytes = 0
    for module in bundle.modules().values():
        for p in module.parameters():
            flat = p.detach().reshape(-1)
            total += float(flat[:: max(1, 4096 // flat.element_size())].float().sum())
            n_bytes += p.numel() * p.element_size()
    ready = time.perf_counter()
    return {
        "peak_rss": _status_kib("VmHWM") * 1024,
        "rss_before": baseline,
        "param_bytes": n_bytes,
        "load_s": loaded - start,
        "ready_s": ready - start,
        "checksum": total,
    }


def file_tensor_bytes(source: Path) -> int:
    from models.checkpoints.safetensors_io import read_header

    files = [source] if source.is_file() else sorted(source.rglob("*.safetensors"))
    return sum(info.nbytes for f in files for info in read_header(f)[0].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=("single-file", "diffusers"), default="single-file")
    parser.add_argument("--dir", type=Path, required=True, help="folder holding (or receiving) the checkpoint")
    parser.add_argument("--family", default="sdxl")
    parser.add_argument("--generate", action="store_true", help="write the random checkpoint if missing")
    parser.add_argument("--repeat", type=int, default=2, help="measurements (fresh process each)")
    parser.add_argument("--mode", choices=("auto", "assign", "to_empty"), default="auto",
                        help="auto: load_model default (zero-copy where possible); assign / to_empty: always copy")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    source = _source(args.layout, args.dir)
    if args.child:
        print(json.dumps(measure(source, args.mode)))
        return 0
    if args.generate:
        t = time.perf_counter()
        generate(args.layout, args.dir, args.family)
        print(f"generated {source} in {time.perf_counter() - t:.1f} s")
    if not source.exists():
        print(f"error: {source} does not exist; pass --generate", file=sys.stderr)
        return 2
    tensor_bytes = file_tensor_bytes(source)
    print(f"{source}: {tensor_bytes / GIB:.2f} GiB of tensors; loading to CPU in fp16, mode={args.mode}")
    for i in range(args.repeat):
        cmd = [sys.executable, "-m", "trainer.bench.load", "--child", "--layout", args.layout, "--dir", str(args.dir),
               "--mode", args.mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"run {i + 1}: peak RSS {r['peak_rss'] / GIB:.2f} GiB = {r['peak_rss'] / tensor_bytes:.3f}x file tensors "
              f"(RSS before load {r['rss_before'] / GIB:.2f} GiB); load {r['load_s']:.2f} s, "
              f"time-to-ready {r['ready_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
