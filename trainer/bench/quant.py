"""Quantized frozen bases (`model.quantize`): step time, loss and loading memory of each format.

    python -m trainer bench quantization --what step [--family tiny-sdxl] [--steps 30] [--threads 1]
    python -m trainer bench quantization --what loss [--loss-steps 100]
    python -m trainer bench quantization --what load --dir DIR [--generate] [--family sdxl]
    python -m trainer bench quantization --what memory --family sdxl --res 1024 --batch 1 \
        --preset kohya --checkpointing layer          # CUDA only

step: the quickstart recipe (tiny SDXL-shaped model, 64 px, batch 4, LoCon rank 8, cached latents
    and text) once per mode in one process, `model.dtype` and `train.mixed_precision` = `--dtype`
    (bf16 by default), timed optimizer steps round robin (one step of each mode per round, after
    `--warmup` untimed ones), as `trainer.bench.recipe_options` does. Prints each mode's median
    ms/step and the median of its per-round differences to `none` (the `--dtype` model).
    `--family sdxl --res 1024 --batch 1 --preset kohya --rank 16 --checkpointing layer` gives the
    GPU figures.
loss: `--loss-steps` optimizer steps of the quickstart recipe in fp32 per mode (same seed, data,
    noise and timesteps: only the frozen weights differ); prints the mean loss of the first and
    last 10 steps and the last-10 difference to `none`.
memory (CUDA): each mode in a fresh process: the recipe set up as for `step` (caches built, frozen
    parts offloaded), peak statistics reset, three steps; prints `max_memory_allocated`, the
    figure `python -m trainer bench memory` predicts.
load: peak RSS of `load_model` of a random-weight fp16 checkpoint (`trainer.bench.load`'s file,
    `--generate` writes it) in a fresh process per mode, quantizing the UNet (and with
    `--text-encoders` the text encoders) while loading, against the file's tensor bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
MODES = ("none", "fp8", "int8", "nf4")


def _overrides(args, mode: str, dtype: str) -> list[str]:
    out = [f"model.source={args.family}", f"model.quantize={mode}", f"model.dtype={dtype}",
           f"train.mixed_precision={'no' if dtype == 'fp32' else dtype}", f"train.batch_size={args.batch}",
           f"data.path={ROOT / 'examples' / 'quickstart_data'}"]
    if args.res:
        out.append(f"data.resolution={args.res}")
    if args.preset:
        out += [f"lora.preset={args.preset}", f"lora.rank={args.rank}", f"lora.alpha={args.rank}"]
    if args.checkpointing:
        out.append(f"train.gradient_checkpointing={args.checkpointing}")
    if args.device == "cpu":
        out.append("train.device=cpu")
    return out


def bench_step(args) -> dict:
    import torch

    from .recipe_options import _setup, _step, _time
    from .train import machine_description

    times: dict[str, list[float]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        recipes = {m: _setup(_overrides(args, m, args.dtype), ROOT / "examples" / "quickstart_data",
                             Path(tmp) / m, args.threads) for m in args.modes}
        for _ in range(args.warmup):
            for recipe in recipes.values():
                _step(recipe)
        for _ in range(args.steps):  # round robin: slow phases of a shared machine hit every mode alike
            for m, recipe in recipes.items():
                times[m].append(_time(lambda r=recipe: _step(r), recipe.device))
        device = next(iter(recipes.values())).device
    print(f"machine: {machine_description(torch.device(device))}")
    print(f"{args.family}, {args.res or 64} px, batch {args.batch}, {args.dtype}, {args.steps} timed steps per mode")
    print("| model.quantize | ms/step (median) | vs none (median of paired differences) |\n|---|---|---|")
    ms = {m: 1000 * statistics.median(t) for m, t in times.items()}
    for m in args.modes:
        if m == "none" or "none" not in times:
            print(f"| {m} | {ms[m]:.2f} | |")
            continue
        diff = 1000 * statistics.median(a - b for a, b in zip(times[m], times["none"]))
        print(f"| {m} | {ms[m]:.2f} | {diff:+.2f} ms ({100 * diff / ms['none']:+.1f}%) |")
    return {"step_s": times}


def bench_loss(args) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from trainer.config import load_config
    from trainer.recipe import LoRATrainingRecipe

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.modes:
            AcceleratorState._reset_state()
            GradientState._reset_state()
            cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
                f"output.dir={Path(tmp) / m}", f"train.max_steps={args.loss_steps}", "train.save_every=0",
                "output.tensorboard=false", "train.log_every=1", f"train.cpu_threads={args.threads}",
                f"data.path={ROOT / 'examples' / 'quickstart_data'}", f"model.quantize={m}"])
            losses = LoRATrainingRecipe(cfg).run().losses
            results[m] = {"first10": statistics.mean(losses[:10]), "last10": statistics.mean(losses[-10:]),
                          "losses": losses}
    print(f"quickstart recipe, fp32, {args.loss_steps} steps per mode (same seed, data, noise, timesteps)")
    print("| model.quantize | mean loss, steps 1-10 | mean loss, last 10 steps | last 10 vs none |\n|---|---|---|---|")
    for m, r in results.items():
        rel = "" if m == "none" or "none" not in results else \
            f"{100 * (r['last10'] / results['none']['last10'] - 1):+.2f}%"
        print(f"| {m} | {r['first10']:.4f} | {r['last10']:.4f} | {rel} |")
    return results


def _measure_step_memory(args, mode: str) -> dict:
    """In the child process: CUDA peak memory of three steps after setup (caches built)."""
    import torch

    from .recipe_options import _setup, _step

    with tempfile.TemporaryDirectory() as tmp:
        recipe = _setup(_overrides(args, mode, args.dtype), ROOT / "examples" / "quickstart_data", Path(tmp),
                        args.threads)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            _step(recipe)
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated(), "resident_before": resident}


def bench_memory(args, argv: list[str]) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: --what memory measures CUDA memory and needs a GPU; "
                         "`python -m trainer bench memory` predicts it without one")
    rest = [a for i, a in enumerate(argv) if a != "--what" and (i == 0 or argv[i - 1] != "--what")]
    print(f"{args.family}, {args.res or 64} px, batch {args.batch}, {args.dtype}, checkpointing "
          f"{args.checkpointing or 'off'}: CUDA max_memory_allocated over 3 steps after setup")
    print("| model.quantize | resident after setup GiB | peak GiB |\n|---|---|---|")
    results = {}
    for m in args.modes:
        cmd = [sys.executable, "-m", "trainer.bench.quant", *rest, "--child-memory", m]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
        r = results[m] = json.loads(out)
        print(f"| {m} | {r['resident_before'] / GIB:.2f} | **{r['peak'] / GIB:.2f}** |")
    return results


def _measure_load(source: Path, mode: str, text_encoders: bool) -> dict:
    """In the child process: load with quantization, report peak RSS (as `trainer.bench.load`)."""
    import torch

    from models.checkpoints.loading import load_model
    from .load import _status_kib

    baseline = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    plan = {"unet": mode} | ({"text_encoder": mode, "text_encoder_2": mode} if text_encoders else {})
    bundle = load_model(source, dtype=torch.float16, device="cpu", quantize=plan)
    seconds = time.perf_counter() - start
    n_bytes = sum(t.numel() * t.element_size() for m in bundle.modules().values() for t in m.parameters())
    return {"peak_rss": _status_kib("VmHWM") * 1024, "rss_before": baseline, "model_bytes": n_bytes, "load_s": seconds}


def bench_load(args) -> dict:
    from .load import _source, file_tensor_bytes, generate

    source = _source(args.layout, args.dir)
    if args.generate:
        generate(args.layout, args.dir, args.family)
    if not source.exists():
        raise SystemExit(f"error: {source} does not exist; pass --generate")
    tensor_bytes = file_tensor_bytes(source)
    print(f"{source}: {tensor_bytes / GIB:.2f} GiB of fp16 tensors; loading to CPU, fp16 compute dtype, "
          f"quantizing the UNet{' and text encoders' if args.text_encoders else ''} while loading")
    print("| model.quantize | model in memory GiB | peak RSS GiB | peak - RSS before load GiB | peak / file tensors | "
          "load s |\n|---|---|---|---|---|---|")
    results = {}
    for m in args.modes:
        cmd = [sys.executable, "-m", "trainer.bench.quant", "--child-load", m, "--dir", str(args.dir),
               "--layout", args.layout] + (["--text-encoders"] if args.text_encoders else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
        r = results[m] = json.loads(out)
        print(f"| {m} | {r['model_bytes'] / GIB:.2f} | {r['peak_rss'] / GIB:.2f} | "
              f"{(r['peak_rss'] - r['rss_before']) / GIB:.2f} | {r['peak_rss'] / tensor_bytes:.3f} | {r['load_s']:.1f} |")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer bench quantization", description=__doc__.split("\n")[0])
    p.add_argument("--what", default="step", help="comma-separated: step, loss, memory, load (default step)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--family", default=None, help="step: tiny-sdxl (default); load: sdxl (default)")
    p.add_argument("--res", type=int, default=None, help="step: pixels (default: the quickstart's 64)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16", help="step: compute dtype")
    p.add_argument("--preset", default=None, help="step: LoRA preset (default: the quickstart's locon)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--checkpointing", default=None, help="step: train.gradient_checkpointing")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--steps", type=int, default=30, help="step: timed steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", type=Path, help="load: folder holding (or receiving) the checkpoint")
    p.add_argument("--layout", choices=("single-file", "diffusers"), default="single-file")
    p.add_argument("--generate", action="store_true", help="load: write the random checkpoint if missing")
    p.add_argument("--text-encoders", action="store_true", help="load: quantize the text encoders too")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every figure to FILE")
    p.add_argument("--child-load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.child_memory:
        args.family = args.family or "tiny-sdxl"
        print(json.dumps(_measure_step_memory(args, args.child_memory)))
        return 0
    if args.child_load:
        from .load import _source

        print(json.dumps(_measure_load(_source(args.layout, args.dir), args.child_load, args.text_encoders)))
        return 0
    import logging

    logging.getLogger("trainer").setLevel(logging.WARNING)
    logging.getLogger("data").setLevel(logging.WARNING)
    results = {}
    for what in args.what.split(","):
        if what == "step":
            args.family = args.family or "tiny-sdxl"
            results["step"] = bench_step(args)
        elif what == "loss":
            results["loss"] = bench_loss(args)
        elif what == "memory":
            args.family = args.family or "tiny-sdxl"
            results["memory"] = bench_memory(args, argv)
        elif what == "load":
            if args.dir is None:
                p.error("--what load needs --dir")
            args.family = args.family or "sdxl"
            results["load"] = bench_load(args)
        else:
            p.error(f"unknown --what {what!r}; use step, loss, memory, load")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
