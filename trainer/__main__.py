"""Command line: `python -m trainer [SUBCOMMAND] ...` (also installed as `lorasmith`).

    python -m trainer --config configs/quickstart.yaml [train.max_steps=50 ...]   # train (default)
    python -m trainer generate ...      # text-to-image with an optional LoRA
    python -m trainer convert ...       # checkpoint / LoRA format conversion
    python -m trainer lora inspect|merge|resize ...
    python -m trainer bench ...
    python -m trainer vae --config configs/toy/vae.yaml   # train a VAE

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int` and is imported only
when used, so `python -m trainer lora inspect` does not import the training stack. Bad input
(config, paths, files) prints one `error: ...` line and exits 2; other failures exit 1 with a
one-line message; `--debug` shows full tracebacks instead.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("trainer.__main__", "train a LoRA from a YAML config (the default subcommand)"),
    "generate": ("trainer.cli.generate", "generate images with a base model and optional LoRAs"),
    "convert": ("trainer.cli.convert", "convert checkpoints and LoRA files between formats"),
    "lora": ("trainer.cli.lora", "inspect, merge or resize LoRA files"),
    "bench": ("trainer.bench.cli", "benchmarks: train | sample | load | data | unet | memory | ... sections"),
    "vae": ("trainer.vae.cli", "train a VAE (AutoencoderKL) from a YAML config and export it"),
}

# Exceptions that mean "the input is wrong" (exit 2, no traceback): (module, class name). They are
# looked up only in modules already imported: an exception class that was never imported cannot
# have been raised.
_USER_ERRORS = (
    ("trainer.config", "ConfigError"),
    ("trainer.checkpoint", "CheckpointError"),
    ("trainer.optim", "OptimizerUnavailable"),
    ("models.checkpoints.loading", "ModelLoadError"),
    ("models.lora.files", "LoRAFileError"),
    ("data.errors", "DataError"),
)
_USER_BUILTINS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _user_error_types() -> tuple[type, ...]:
    found: list[type] = list(_USER_BUILTINS)
    for module_name, cls_name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


# ---- train (default subcommand) -----------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="YAML config file (see configs/README.md)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.max_steps=100"
    )
    parser.add_argument("--check", action="store_true", help="validate the config, print it and exit")


def run(args: argparse.Namespace) -> int:
    import logging

    from .config import config_to_dict, load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = load_config(args.config, args.overrides)
    if args.check:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
        print(f"config OK: {args.config}", file=sys.stderr)
        return 0
    from .recipe import LoRATrainingRecipe

    recipe = LoRATrainingRecipe(cfg, config_path=args.config)
    return recipe.run().exit_code


# ---- our sibling packages ------------------------------------------------------------------------
_SIBLINGS = ("models", "data")
"""Top-level packages installed beside `trainer`. Their names are generic, so a user's
`models.py` or `data/` in the working directory (first on sys.path) can shadow them."""


def shadowed_packages() -> list[str]:
    """One message per sibling package that would not be imported from beside `trainer`."""
    home = Path(__file__).resolve().parent.parent
    problems = []
    for name in _SIBLINGS:
        try:
            spec = importlib.util.find_spec(name)  # locates the package without running it
        except (ImportError, ValueError):
            spec = None
        ours = home / name
        if spec is None:
            problems.append(f"lorasmith's `{name}` package is missing (expected {ours}); reinstall lorasmith")
            continue
        locations = list(spec.submodule_search_locations or [])
        found = Path(spec.origin) if spec.origin else Path(locations[0]) if locations else None
        if found is None or found.resolve() != ours / "__init__.py":
            problems.append(f"`{name}` would be imported from {found}, which shadows lorasmith's `{name}` package "
                            f"({ours}); rename {found} or run from another directory")
    return problems


# ---- dispatch -------------------------------------------------------------------------------------
def _top_level_help() -> str:
    lines = ["usage: python -m trainer [SUBCOMMAND] [-h] [--debug] ...", "", "subcommands:"]
    lines += [f"  {name:<9} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += [
        "",
        "With no subcommand, trains: python -m trainer --config configs/quickstart.yaml [KEY=VALUE ...]",
        "Run `python -m trainer SUBCOMMAND -h` for the options of one subcommand.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    problems = shadowed_packages()  # before anything imports them
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    name = argv.pop(0) if argv[0] in SUBCOMMANDS else "train"
    if name == "train" and argv and not argv[0].startswith("-") and "=" not in argv[0]:
        print(f"error: unknown subcommand {argv[0]!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module_name, description = SUBCOMMANDS[name]
    try:
        module = sys.modules[__name__] if name == "train" else importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if debug or exc.name != module_name:
            raise
        print(f"error: the `{name}` subcommand is not available in this installation", file=sys.stderr)
        return 2
    dispatch = getattr(module, "dispatch", None)  # subcommands whose sections have their own options
    if dispatch is not None:
        code = dispatch(argv)
        if code is not None:
            return code
    parser = argparse.ArgumentParser(prog=f"python -m trainer {name}", description=description)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.debug = debug
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, _user_error_types()):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        message = str(exc) or type(exc).__name__
        if getattr(exc, "user_facing", False):
            print(f"error: {message}", file=sys.stderr)
        else:
            print(f"error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
