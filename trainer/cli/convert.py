"""`python -m trainer convert SRC DST`: rewrite a model checkpoint in the other layout.

    python -m trainer convert sdxl_diffusers/ sdxl.safetensors            # folder -> single file
    python -m trainer convert sdxl.safetensors sdxl_diffusers/ --dtype fp16
    python -m trainer convert model.ckpt model.safetensors --allow-pickle  # pickle -> safetensors

SRC is anything `models.load_model` reads (diffusers folder, single file, hub id); DST is written
as a single `.safetensors` file (ComfyUI / A1111 layout, exactly the reference key set for SDXL
and SD1.5) or a diffusers folder. Without --dtype every tensor keeps its stored dtype, so a
folder -> file -> folder round trip is bit-exact. Files are written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import DTYPE_NAMES, torch_dtype
from .generate import add_part_arguments, parse_slots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="diffusers folder, .safetensors file, hub id or huggingface.co URL")
    parser.add_argument("dst", help="output .safetensors file or diffusers folder")
    parser.add_argument("--to", choices=("single-file", "diffusers"), default=None,
                        help="output layout (default: single-file when DST ends in .safetensors, else diffusers)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="convert floating tensors (default: keep the stored dtypes)")
    parser.add_argument("--family", default=None, help="insist on a family (sdxl, sd15, sd2); default: detect")
    parser.add_argument("--vae", default=None, help="replace the VAE with this file/folder (e.g. an fp16-fix VAE)")
    add_part_arguments(parser)
    parser.add_argument("--unet", default=None, help="replace the UNet with this file/folder")
    parser.add_argument("--variant", default=None, help="diffusers weight variant to read (e.g. fp16)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read .ckpt/.pt/.bin pickles (weights only); only for files you trust")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def run(args: argparse.Namespace) -> int:

    from models.checkpoints.diffusers_folder import save_diffusers
    from models.checkpoints.open import open_model
    from models.checkpoints.single_file import save_single_file

    dst = Path(args.dst)
    layout = args.to or ("single-file" if dst.suffix == ".safetensors" else "diffusers")
    if layout == "single-file" and dst.suffix != ".safetensors":
        print(f"error: single-file output must end in .safetensors, got {dst}", file=sys.stderr)
        return 2
    if dst.exists() and not args.force:
        print(f"error: {dst} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if Path(args.src).exists() and dst.exists() and Path(args.src).resolve() == dst.resolve():
        print("error: SRC and DST are the same path", file=sys.stderr)
        return 2
    dtype = torch_dtype(args.dtype) if args.dtype else None
    # Loading in the output dtype halves peak memory for fp32 -> fp16; without --dtype the
    # stored dtypes are kept (bit-exact).
    # The file is written in `dtype` (or the stored dtypes): the VAE keeps them too (vae_dtype=dtype).
    bundle = open_model(args.src, family=args.family, dtype=dtype, vae_dtype=dtype, vae=args.vae, unet=args.unet,
                        text_encoders=parse_slots(args.text_encoders), tokenizers=parse_slots(args.tokenizers),
                        variant=args.variant, allow_pickle=args.allow_pickle, labels=("--family", "SRC", "--vae"))
    if layout == "single-file":
        save_single_file(bundle, dst, dtype=dtype)
    else:
        save_diffusers(bundle, dst, dtype=dtype)
    print(f"wrote {dst} ({layout}, family {bundle.family})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer convert", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
