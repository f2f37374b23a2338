"""Step-time cost of the recipe options EMA, masked loss and validation loss on the tiny model.

    python -m trainer bench recipe-options [--steps 40] [--rounds 3] [--threads 1] [--json FILE]

Sets up the quickstart config (tiny SDXL-shaped model, 64 px, batch 4, in-memory caches) once per
variant in one process, then times optimizer steps (`_train_step`, CUDA synchronised around each)
round robin, one step of each variant per round after `--warmup` untimed ones, so that the slow
phases of a shared machine hit every variant alike. Reports each variant's median ms/step and the
median of its per-round differences to the baseline of the same data path (cached latents, or
decoding images and masks every step: `uncached`, no DataLoader workers). The validation loss runs
outside the steps (so its step row is an A/A control: the noise of the paired differences); its
line gives the median time of one validation (3 images x 5 timesteps) and what it adds per step at
`validation.every` = `--every`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "baseline": [],
    "ema": ["train.ema_decay=0.999"],
    "ema_on_cpu": ["train.ema_decay=0.999", "train.ema_on_cpu=true"],
    "masked_loss": ["train.masked_loss=true"],
    "uncached": ["data.cache_latents=false"],
    "uncached+masked_loss": ["data.cache_latents=false", "train.masked_loss=true"],
    "validation": ["validation.path={val}"],
}


def _data(folder: Path, val: Path) -> Path:
    """The quickstart images, each with a sidecar mask (left half learnt); 3 of them also in `val`."""
    from PIL import Image

    src = ROOT / "examples" / "quickstart_data"
    for i, img in enumerate(sorted(src.iterdir())):
        shutil.copy(img, folder / img.name)
        if i < 6:  # 3 image + caption pairs
            shutil.copy(img, val / img.name)
        if img.suffix in (".png", ".jpg"):
            size = Image.open(img).size
            mask = Image.new("L", size, 0)
            mask.paste(255, (0, 0, size[0] // 2, size[1]))
            mask.save(folder / f"{img.stem}-masklabel.png")
    return folder


def _setup(overrides: list[str], data: Path, out: Path, threads: int):
    """A set-up recipe of the quickstart config with `overrides`, ready for `_train_step`."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from trainer.config import load_config
    from trainer.recipe import LoRATrainingRecipe

    AcceleratorState._reset_state()
    GradientState._reset_state()
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"output.dir={out}", f"data.path={data}", "train.max_steps=100000", "train.save_every=0",
        "output.tensorboard=false", f"train.cpu_threads={threads}", "optim.warmup_steps=0", "output.overwrite=true",
        *overrides])
    recipe = LoRATrainingRecipe(cfg)
    recipe.setup()
    recipe._release_run_lock()
    recipe._first_bad = torch.full((), -1, dtype=torch.long, device=recipe.device)
    recipe._pending, recipe._last_grad_norm = [], None
    recipe.batches = recipe._batches()
    return recipe


def _time(fn, device) -> float:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _step(recipe) -> None:
    recipe._train_step(recipe.batches)
    recipe.step += 1
    recipe._pending.clear()  # losses are not logged here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer bench recipe-options", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant (default 100)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="timed validations (default 5)")
    parser.add_argument("--every", type=int, default=100, help="validation.every for the per-step figure (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args(argv)
    import logging

    import torch

    from .train import machine_description

    logging.getLogger("trainer").setLevel(logging.WARNING)
    logging.getLogger("data").setLevel(logging.WARNING)
    results = {name: {"step_s": [], "validation_s": [], "val_images": 0} for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        data, val = Path(tmp) / "data", Path(tmp) / "val"
        data.mkdir()
        val.mkdir()
        _data(data, val)
        recipes = {name: _setup([o.format(val=val) for o in overrides], data, Path(tmp) / name, args.threads)
                   for name, overrides in VARIANTS.items()}
        for _ in range(args.warmup):
            for recipe in recipes.values():
                _step(recipe)
        # Round robin, one step of each variant per round: slow phases of a shared machine hit all alike.
        for _ in range(args.steps):
            for name, recipe in recipes.items():
                results[name]["step_s"].append(_time(lambda r=recipe: _step(r), recipe.device))
        validated = recipes["validation"]
        results["validation"]["val_images"] = len(validated.validation)
        for _ in range(args.rounds):
            results["validation"]["validation_s"].append(
                _time(lambda: validated.validation.measure(validated.weights, validated.denoiser,
                                                           validated.accelerator), validated.device))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine_description(device)}")
    print("| variant | ms/step (median) | vs baseline (median of paired differences) |\n|---|---|---|")
    ms = {n: 1000 * statistics.median(r["step_s"]) for n, r in results.items()}
    for name in VARIANTS:
        base = "uncached" if name.startswith("uncached") else "baseline"
        if name == base:
            print(f"| {name} | {ms[name]:.2f} | |")
            continue
        diff = 1000 * statistics.median(a - b for a, b in zip(results[name]["step_s"], results[base]["step_s"]))
        print(f"| {name} | {ms[name]:.2f} | {diff:+.2f} ms ({100 * diff / ms[base]:+.1f}%) |")
    v = results["validation"]
    one = 1000 * statistics.median(v["validation_s"])
    print(f"validation: {one:.1f} ms per validation ({v['val_images']} images x 5 timesteps); at every={args.every}: "
          f"{one / args.every:.2f} ms per step ({100 * one / args.every / ms['baseline']:.1f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_description(device), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
