"""Soak benchmark: a long tiny-model run with periodic checkpoints, LoRA exports and sample images,
recording the process's resident memory and open file descriptors as training goes on.

    python -m trainer.bench.soak --steps 5000 [--every 250] [--save-every 100] [--json soak.json]

Trains the quickstart config (tiny SDXL-shaped model, 64 px, cached latents and text, tensorboard
on) for `--steps` steps into a temporary run directory, with a checkpoint every `--save-every`
steps (keep_last 2, so old ones are deleted), an export every `--export-every` and a sample image
every `--sample-every`. A background thread reads VmRSS from /proc/self/status and counts
/proc/self/fd each time the step counter passes a multiple of `--every`. Prints the table and the
growth after warm-up (from the first sample at or after `--warmup` steps to the last): neither
should grow with the step count. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rss_mb() -> float:
    """Resident set size of this process in MB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def open_fds() -> int:
    """Open file descriptors of this process (entries of /proc/self/fd, minus the listing's own)."""
    return len(os.listdir("/proc/self/fd")) - 1


class _Sampler(threading.Thread):
    """Records (step, seconds, RSS MB, fds) whenever `recipe.step` reaches the next multiple of `every`."""

    def __init__(self, recipe, every: int):
        super().__init__(daemon=True)
        self.recipe, self.every = recipe, every
        self.rows: list[dict] = []
        self.done = threading.Event()
        self.t0 = time.perf_counter()

    def record(self, step: int) -> None:
        self.rows.append({"step": step, "seconds": round(time.perf_counter() - self.t0, 1),
                          "rss_mb": round(rss_mb(), 1), "fds": open_fds()})

    def run(self) -> None:
        mark = self.every
        while not self.done.wait(0.02):
            step = self.recipe.step
            if step >= mark:
                self.record(step)
                mark = (step // self.every + 1) * self.every


def soak(steps: int, every: int, save_every: int, export_every: int, sample_every: int, out: Path) -> list[dict]:
    """Run the soak training into `out`; returns the recorded rows (the first one after setup)."""
    import torch

    from trainer.config import load_config
    from trainer.recipe import LoRATrainingRecipe

    torch.set_num_threads(1)
    overrides = [f"output.dir={out}", f"data.path={ROOT / 'examples' / 'quickstart_data'}",
                 f"train.max_steps={steps}", f"train.save_every={save_every}", "train.keep_last=2",
                 f"train.export_every={export_every}", "train.log_every=10", "output.tensorboard=true",
                 "sample.prompts=[a red circle]", f"sample.every={sample_every}", "sample.steps=4",
                 "data.num_workers=0", "optim.scheduler=constant", "optim.warmup_steps=0"]
    recipe = LoRATrainingRecipe(load_config(ROOT / "configs" / "quickstart.yaml", overrides))
    recipe.setup()
    sampler = _Sampler(recipe, every)
    sampler.record(0)
    sampler.start()
    try:
        summary = recipe.train()
    finally:
        sampler.done.set()
        sampler.join()
    if not summary.completed:
        raise RuntimeError(f"the soak run stopped early: {summary.stopped}")
    if sampler.rows[-1]["step"] != steps:
        sampler.record(steps)
    return sampler.rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="training steps")
    parser.add_argument("--every", type=int, default=250, help="sample RSS and fds every N steps")
    parser.add_argument("--warmup", type=int, default=500, help="steps excluded from the growth figures")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (keep_last 2)")
    parser.add_argument("--export-every", type=int, default=100, help="export the LoRA every N steps")
    parser.add_argument("--sample-every", type=int, default=250, help="render a sample image every N steps")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        rows = soak(args.steps, args.every, args.save_every, args.export_every, args.sample_every, Path(tmp))
    print(f"{'step':>7} {'seconds':>8} {'RSS MB':>8} {'fds':>5}")
    for r in rows:
        print(f"{r['step']:>7} {r['seconds']:>8.1f} {r['rss_mb']:>8.1f} {r['fds']:>5}")
    warm = next((r for r in rows if r["step"] >= args.warmup), rows[0])
    last = rows[-1]
    span = max(1, last["step"] - warm["step"])
    print(f"after warm-up (step {warm['step']} -> {last['step']}): RSS {last['rss_mb'] - warm['rss_mb']:+.1f} MB "
          f"({(last['rss_mb'] - warm['rss_mb']) / span * 1000:+.2f} MB per 1000 steps), "
          f"fds {last['fds'] - warm['fds']:+d}, peak RSS {max(r['rss_mb'] for r in rows):.1f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
