"""`python -m trainer bench [SECTION] [options]`: every benchmark behind one command.

Sections:
    train, sample, load, data   the comparison tables of `trainer.bench.train` (one or several
                                with `--what train,sample`; no section = train)
    unet                        UNet forward+backward, ours vs diffusers (`trainer.bench.unet`)
    memory                      predicted GPU memory of a training step, no GPU (`trainer.bench.memory`)
    load-file                   load time / peak RSS of a full-size checkpoint file (`trainer.bench.load`)
    data-loader                 DataLoader throughput on generated or given images (`trainer.bench.data`)
    cache-memory                RSS of the in-memory latent/text caches (`trainer.bench.cache_memory`)
    soak                        a long run's RSS and open files over time (`trainer.bench.soak`)
    recipe-options              step-time cost of EMA, masked loss and validation (`trainer.bench.recipe_options`)
    quantization                step time, loss and loading memory of quantized bases (`trainer.bench.quant`)

`python -m trainer bench SECTION -h` shows the options of one section.
"""
from __future__ import annotations

import importlib

import argparse

from . import train
from .train import SECTIONS, run  # noqa: F401  (the table sections' runner)

TOOLS = {
    "unet": "trainer.bench.unet",
    "memory": "trainer.bench.memory",
    "load-file": "trainer.bench.load",
    "data-loader": "trainer.bench.data",
    "cache-memory": "trainer.bench.cache_memory",
    "soak": "trainer.bench.soak",
    "recipe-options": "trainer.bench.recipe_options",
    "quantization": "trainer.bench.quant",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The table sections' options, with every section listed in the help."""
    train.add_arguments(parser)
    parser.usage = "python -m trainer bench [SECTION] [options]"
    parser.epilog = "sections:" + __doc__.split("Sections:", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def dispatch(argv: list[str]) -> int | None:
    """Run a tool section with its own options; rewrite a table section into `--what`. Returns the
    exit code of a tool section, or None to let the table benchmark parse `argv` (edited in place)."""
    if not argv or argv[0].startswith("-"):
        return None
    section = argv[0]
    if section in TOOLS:
        module = importlib.import_module(TOOLS[section])
        return int(module.main(argv[1:]) or 0)
    if section in SECTIONS:
        argv[:1] = ["--what", section]
        return None
    return None
