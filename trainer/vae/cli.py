"""`python -m trainer vae --config FILE [KEY=VALUE ...]`: train a VAE (see trainer/vae/train.py)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="YAML config file (configs/README.md, 'VAE training')")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. train.max_steps=100")
    parser.add_argument("--check", action="store_true", help="validate the config, print it and exit")


def run(args: argparse.Namespace) -> int:
    import logging

    from ..config import config_to_dict
    from .config import load_vae_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_vae_config(args.config, args.overrides)
    if args.check:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
        print(f"config OK: {args.config}", file=sys.stderr)
        return 0
    from .train import VAETrainer

    return VAETrainer(cfg, config_path=args.config).run().exit_code
