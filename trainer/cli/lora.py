"""`python -m trainer lora inspect|merge|resize`: look into, bake in and shrink LoRA files.

    python -m trainer lora inspect my_lora.safetensors [--family sdxl]
    python -m trainer lora merge --model sdxl.safetensors --lora style.safetensors:0.8 --lora b.safetensors \\
        --out merged.safetensors [--dtype fp16]
    python -m trainer lora resize my_lora.safetensors --rank 8 --out my_lora_r8.safetensors

inspect: family guess, per-block rank/alpha summary, metadata, hash check, and a check of every
key against the family's model built on `meta` (no weights needed; exit 1 if keys do not match).
merge: loads the base checkpoint, folds each LoRA in at its strength (default 1) and writes a
single-file checkpoint (ComfyUI / A1111 layout).
resize: per module, the best rank-R approximation (truncated SVD) of the update
(alpha / rank) * up @ down (3x3 convs flattened to out x in*9). The scale is folded into the
weights and alpha is written equal to the new rank (scale 1), so any loader reproduces the
truncated update exactly; `dora_scale` is carried over unchanged.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from ..config import DTYPE_NAMES, torch_dtype

_BLOCK = re.compile(
    r"^(lora_unet_(?:(?:input_blocks|output_blocks|down_blocks|up_blocks)_\d+|middle_block|mid_block)"
    r"|unet\.(?:(?:down_blocks|up_blocks)\.\d+|mid_block)|lora_te\d?|text_encoder(?:_2)?)"
)
_SHOW_FIRST = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
               "modelspec.architecture", "modelspec.title", "sshs_model_hash", "sshs_legacy_hash")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lora_command", required=True, metavar="{inspect,merge,resize}")
    p = sub.add_parser("inspect", help="summarise a LoRA file and check its keys against a model family")
    p.add_argument("file", help="LoRA .safetensors file")
    p.add_argument("--family", default=None, help="family to check the keys against (sdxl, sd15, sd2, ...); "
                                                  "default: the guessed one")
    p.add_argument("--all-metadata", action="store_true", help="print every metadata entry in full")
    p = sub.add_parser("merge", help="fold LoRAs into a base checkpoint and write a single file")
    p.add_argument("--model", required=True, help="base checkpoint: single file, diffusers folder or hub id")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="LoRA file, optionally with a strength (default 1.0); repeat for several")
    p.add_argument("--out", required=True, help="output single-file .safetensors checkpoint")
    p.add_argument("--family", default=None, help="insist on a base family (default: detect)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="dtype of the written checkpoint (default: the base checkpoint's)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p = sub.add_parser("resize", help="reduce the rank of a LoRA file by truncated SVD")
    p.add_argument("file", help="input LoRA .safetensors file")
    p.add_argument("--rank", type=int, required=True, help="new rank of Linear / 1x1 modules")
    p.add_argument("--conv-rank", type=int, default=None, help="new rank of 3x3 conv modules (default: --rank)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="output dtype (default: the input's)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args: argparse.Namespace) -> int:
    return {"inspect": inspect, "merge": merge, "resize": resize}[args.lora_command](args)


# ------------------------------------------------------------------------------------------------
def _payload_hash(path: Path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def _short(value: str, limit: int = 160) -> str:
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} chars)"


def inspect(args: argparse.Namespace) -> int:
    from models.lora.files import guess_family, parse_lora_tensors, read_lora_file

    path = Path(args.file)
    tensors, metadata = read_lora_file(path)
    modules, unknown = parse_lora_tensors(tensors)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    size = path.stat().st_size if path.is_file() else 0
    kohya = sum(1 for n in modules if n.startswith("lora_"))
    print(f"file: {path} ({size / 2**20:.2f} MiB, {len(tensors)} tensors, {', '.join(dtypes)})")
    print(f"format: {'kohya (ComfyUI / A1111 / diffusers names)' if kohya == len(modules) else 'diffusers/PEFT'}"
          f", {len(modules)} modules" + (f", {len(unknown)} other keys" if unknown else ""))
    family, why = guess_family(modules, metadata)
    print(f"family guess: {family or 'unknown'} ({why})")
    if any("dora_scale" in w for w in modules.values()):
        print("DoRA: yes (dora_scale present)")

    groups: dict[str, list] = defaultdict(list)
    for name, w in modules.items():
        m = _BLOCK.match(name)
        groups[m.group(1) if m else "other"].append(w)
    print("modules per block: count, ranks, alphas (3x3 conv modules counted separately)")
    for block in sorted(groups, key=_block_order):
        ws = groups[block]
        ranks = sorted({w["down"].shape[0] for w in ws})
        alphas = sorted({w.get("alpha", float(w["down"].shape[0])) for w in ws})
        convs = sum(1 for w in ws if w["down"].dim() == 4 and tuple(w["down"].shape[2:]) != (1, 1))
        print(f"  {block:<28} {len(ws):>4}  rank {','.join(map(str, ranks)):<8} alpha "
              f"{','.join(f'{a:g}' for a in alphas):<8}" + (f" ({convs} conv 3x3)" if convs else ""))

    print("metadata:" if metadata else "metadata: none")
    keys = [k for k in _SHOW_FIRST if k in metadata] + sorted(k for k in metadata if k not in _SHOW_FIRST)
    for k in keys:
        print(f"  {k}: {metadata[k] if args.all_metadata else _short(metadata[k])}")
    if "sshs_model_hash" in metadata and path.is_file():
        ok = _payload_hash(path) == metadata["sshs_model_hash"]
        print(f"sshs_model_hash: {'matches the tensor data' if ok else 'does NOT match the tensor data'}")

    check = args.family or {"sd1or2": "sd15"}.get(family, family)
    if check is None:
        print("key check: skipped (family unknown; pass --family)")
        return 0
    return _key_check(tensors, metadata, check, path)


def _block_order(block: str):
    m = re.search(r"(\d+)$", block)
    kind = 0 if "unet" in block else 1
    stage = next((i for i, s in enumerate(("input", "down", "middle", "mid", "output", "up")) if s in block), 9)
    return kind, stage, int(m.group(1)) if m else -1, block


def _key_check(tensors, metadata, family: str, path: Path) -> int:
    from models.bundle import FAMILIES, build_model
    from models.lora.files import LoRAFileError, network_from_tensors

    if family not in FAMILIES:
        print(f"error: unknown family {family!r}; choose one of {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    bundle = build_model(family, device="meta")
    try:
        net = network_from_tensors(bundle, tensors, metadata, source=str(path))
    except LoRAFileError as e:
        print(f"key check against {family}: FAILED\n  {e}")
        return 1
    counts = defaultdict(int)
    for ref in net.refs().values():
        counts[ref.component] += 1
    net.remove()
    detail = ", ".join(f"{c} {n}" for c, n in counts.items())
    print(f"key check against {family}: all {len(net.refs())} modules match ({detail})")
    return 0


# ------------------------------------------------------------------------------------------------
def _parse_lora_arg(value: str) -> tuple[str, float]:
    """`FILE[:STRENGTH]`; a trailing `:x` counts as a strength only when x is a number."""
    head, sep, tail = value.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return value, 1.0


def _out_problem(out: Path, force: bool) -> str | None:
    """Why `--out` cannot be written (not .safetensors, or exists without --force), or None."""
    if out.suffix != ".safetensors":
        return f"--out must be a .safetensors file, got {out}"
    if out.exists() and not force:
        return f"{out} exists; pass --force to overwrite it"
    return None


def merge(args: argparse.Namespace) -> int:

    from models.checkpoints.loading import load_model
    from models.lora.files import load_lora
    from models.checkpoints.single_file import save_single_file

    out = Path(args.out)
    if (problem := _out_problem(out, args.force)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    loras = [_parse_lora_arg(v) for v in args.lora]
    for file, _ in loras:
        if not Path(file).is_file():
            print(f"error: LoRA file {file} does not exist", file=sys.stderr)
            return 2
    bundle = load_model(args.model, family=args.family)
    for file, strength in loras:
        net = load_lora(bundle, file, strength=strength)
        net.merge(keep_original=False)
        net.remove(keep_merged=True)
        print(f"merged {file} at strength {strength:g} ({len(net.refs())} modules)")
    dtype = torch_dtype(args.dtype) if args.dtype else None
    save_single_file(bundle, out, dtype=dtype)
    print(f"wrote {out} (family {bundle.family})")
    return 0


# ------------------------------------------------------------------------------------------------
def resize_tensors(tensors: dict, rank: int, conv_rank: int | None = None) -> tuple[dict, dict]:
    """Rank-reduced copies of a kohya LoRA's tensors (float32) and a report.

    Each module's update D = (alpha / r) * up @ down is replaced by its best rank-r' approximation
    U_r' S_r' V_r'^T with r' = min(requested, r): up = U sqrt(S), down = sqrt(S) V^T, alpha = r'.
    Report: module -> (old rank, new rank, fraction of ||D||_F^2 kept).
    """
    import torch

    from models.lora.files import LoRAFileError, parse_lora_tensors

    modules, unknown = parse_lora_tensors(tensors)
    if unknown or any(not n.startswith("lora_") for n in modules):
        raise LoRAFileError("resize works on kohya-format LoRA files (lora_down/lora_up/alpha keys); "
                            f"unsupported keys: {(unknown or list(modules))[:3]}")
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError(f"--rank / --conv-rank must be >= 1, got {rank} / {conv_rank}")
    out, report = {}, {}
    for name, w in modules.items():
        down, up = w["down"].float(), w["up"].float()
        r = down.shape[0]
        is_conv = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
        target = min(conv_rank or rank if is_conv else rank, r)
        delta = (up.flatten(1) @ down.flatten(1)) * (w.get("alpha", float(r)) / r)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:target].sqrt()
        new_up = (u[:, :target] * root).reshape(up.shape[0], target, *up.shape[2:])
        new_down = (root[:, None] * vh[:target]).reshape(target, *down.shape[1:])
        out[f"{name}.lora_down.weight"] = new_down.contiguous()
        out[f"{name}.lora_up.weight"] = new_up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(target))
        if "dora_scale" in w:
            out[f"{name}.dora_scale"] = w["dora_scale"].float()
        total = float(s.square().sum())
        report[name] = (r, target, float(s[:target].square().sum()) / total if total > 0 else 1.0)
    return out, report


def resize(args: argparse.Namespace) -> int:
    import torch

    from models.lora.files import read_lora_file, write_lora_file

    out = Path(args.out)
    if (problem := _out_problem(out, args.force)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    tensors, metadata = read_lora_file(args.file)
    in_dtype = next((t.dtype for k, t in tensors.items() if k.endswith(".lora_down.weight")), torch.float32)
    dtype = torch_dtype(args.dtype) if args.dtype else in_dtype
    new, report = resize_tensors(tensors, args.rank, args.conv_rank)
    new = {k: v.to(dtype) for k, v in new.items()}
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    linear = [report[n][1] for n in report if _is_linear(new, n)]
    conv = [report[n][1] for n in report if not _is_linear(new, n)]
    meta["ss_network_dim"] = str(max(linear) if linear else max(conv))
    meta["ss_network_alpha"] = meta["ss_network_dim"]
    try:
        net_args = json.loads(meta.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        net_args = {}
    if conv:
        net_args["conv_dim"] = net_args["conv_alpha"] = str(max(conv))
    meta["ss_network_args"] = json.dumps(net_args)
    old = sorted({r for r, _, _ in report.values()})
    meta["lorasmith.resized_from"] = json.dumps({"ranks": old, "file": Path(args.file).name})
    write_lora_file(out, new, meta)
    kept = [k for _, _, k in report.values()]
    print(f"resized {len(report)} modules: rank {','.join(map(str, old))} -> {meta['ss_network_dim']}"
          + (f" (conv {max(conv)})" if conv else ""))
    print(f"update energy kept (||D_r||^2 / ||D||^2): mean {sum(kept) / len(kept):.4f}, min {min(kept):.4f}")
    print(f"wrote {out}")
    return 0


def _is_linear(tensors: dict, name: str) -> bool:
    down = tensors[f"{name}.lora_down.weight"]
    return down.dim() == 2 or tuple(down.shape[2:]) == (1, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer lora", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
