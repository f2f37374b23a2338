"""`python -m trainer lora inspect|merge|resize`: look into, bake in and shrink LoRA files.

    python -m trainer lora inspect my_lora.safetensors [--family sdxl]
    python -m trainer lora merge --model sdxl.safetensors --lora style.safetensors:0.8 --lora b.safetensors \\
        --out merged.safetensors [--dtype fp16]
    python -m trainer lora resize my_lora.safetensors --rank 8 --out my_lora_r8.safetensors

inspect: family guess, per-block algorithm/rank/alpha summary, metadata, hash check, a check for
NaN/inf values and a check of every key against the family's model built on `meta` (no weights
needed); exit 1 if any value is non-finite or the keys do not match. LyCORIS files (LoCon with
`lora_mid`, LoHa, LoKr, full `diff`) are read too.
merge: loads the base checkpoint, folds each LoRA in at its strength (default 1) and writes a
single-file checkpoint (ComfyUI / A1111 layout).
resize: per module, the best rank-R approximation (truncated SVD) of the update
(alpha / rank) * up @ down (3x3 convs flattened to out x in*9). The scale is folded into the
weights and alpha is written equal to the new rank (scale 1), so any loader reproduces the
truncated update exactly; `dora_scale` is carried over unchanged. LoHa, LoKr, Tucker LoCon and
full-difference modules are converted the same way into a plain LoRA of the requested rank (their
update computed as ComfyUI does; the family's model on `meta` gives the layer shapes the factors
do not show, `--family` when it cannot be guessed). The retained energy ||D_r||^2 / ||D||^2 is
printed per module.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter, defaultdict
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
    p.add_argument("--family", default=None, help="family whose layer shapes LoHa/LoKr modules need "
                                                  "(default: the guessed one)")
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
    tensors, metadata = read_lora_file(path, check_finite=False)  # reported below as a finding
    modules, unknown = parse_lora_tensors(tensors)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    size = path.stat().st_size if path.is_file() else 0
    kohya = sum(1 for n in modules if n.startswith("lora_"))
    print(f"file: {path} ({size / 2**20:.2f} MiB, {len(tensors)} tensors, {', '.join(dtypes)})")
    print(f"format: {'kohya (ComfyUI / A1111 / diffusers names)' if kohya == len(modules) else 'diffusers/PEFT'}"
          f", {len(modules)} modules" + (f", {len(unknown)} other keys" if unknown else ""))
    kinds = Counter(w.label() for w in modules.values())
    print("algorithms: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
    family, why = guess_family(modules, metadata)
    print(f"family guess: {family or 'unknown'} ({why})")
    if any("dora_scale" in w for w in modules.values()):
        print("DoRA: yes (dora_scale present)")

    groups: dict[str, list] = defaultdict(list)
    for name, w in modules.items():
        m = _BLOCK.match(name)
        groups[m.group(1) if m else "other"].append(w)
    print("modules per block: count, algorithms, ranks, alphas (3x3 conv modules counted separately when the "
          "tensors show the kernel)")
    for block in sorted(groups, key=_block_order):
        ws = groups[block]
        algos = ",".join(sorted({w.label() for w in ws}))
        ranks = sorted({str(w.rank) if w.rank is not None else "full" for w in ws})
        alphas = sorted({w["alpha"] if "alpha" in w else float(w.rank or 1) for w in ws})
        convs = sum(1 for w in ws if w.visible_kernel() not in (None, (1, 1)))
        print(f"  {block:<28} {len(ws):>4}  {algos:<14} rank {','.join(ranks):<8} alpha "
              f"{','.join(f'{a:g}' for a in alphas):<8}" + (f" ({convs} conv 3x3)" if convs else ""))

    print("metadata:" if metadata else "metadata: none")
    keys = [k for k in _SHOW_FIRST if k in metadata] + sorted(k for k in metadata if k not in _SHOW_FIRST)
    for k in keys:
        print(f"  {k}: {metadata[k] if args.all_metadata else _short(metadata[k])}")
    if "sshs_model_hash" in metadata and path.is_file():
        ok = _payload_hash(path) == metadata["sshs_model_hash"]
        print(f"sshs_model_hash: {'matches the tensor data' if ok else 'does NOT match the tensor data'}")

    finite = _finite_check(tensors)
    check = args.family or (family.split("/")[0] if family else None)
    if check is None:
        print("key check: skipped (family unknown; pass --family)")
        return finite
    return max(finite, _key_check(tensors, metadata, check, path))


def _finite_check(tensors) -> int:
    """Print whether every value is finite; 1 (a finding) when some are NaN/inf, else 0."""
    from models.checkpoints.safetensors_io import count_nonfinite
    from models.lora.files import nonfinite_tensors

    bad = nonfinite_tensors(tensors)
    if not bad:
        print("values: all finite")
        return 0
    print(f"values: NOT FINITE in {len(bad)} of {len(tensors)} tensors - this LoRA gives black or noise images; "
          "export it again from a good checkpoint")
    for key in bad[:8]:
        nan, inf = count_nonfinite(tensors[key])
        print(f"  {key}: {nan} NaN, {inf} inf of {tensors[key].numel()}")
    if len(bad) > 8:
        print(f"  ... and {len(bad) - 8} more")
    return 1


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
        net = network_from_tensors(bundle, tensors, metadata, source=str(path), check_finite=False)
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

    from models.checkpoints.open import open_model
    from models.lora.files import network_from_tensors, read_lora_file
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
    # Every LoRA is read (and checked: readable, finite) before the base model loads.
    files = [read_lora_file(file) for file, _ in loras]
    bundle = open_model(args.model, family=args.family, dtype=None, labels=("--family", "--model", "--vae"))
    for (file, strength), (tensors, metadata) in zip(loras, files):
        net = network_from_tensors(bundle, tensors, metadata, source=str(file), strength=strength,
                                   check_finite=False)
        net.merge(keep_original=False)
        net.remove(keep_merged=True)
        print(f"merged {file} at strength {strength:g} ({len(net.refs())} modules)")
    dtype = torch_dtype(args.dtype) if args.dtype else None
    save_single_file(bundle, out, dtype=dtype)
    print(f"wrote {out} (family {bundle.family})")
    return 0


# ------------------------------------------------------------------------------------------------
def resize_tensors(tensors: dict, rank: int, conv_rank: int | None = None,
                   shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[dict, dict]:
    """Rank-reduced plain-LoRA copies of a LoRA's tensors (float32) and a report.

    Each module's update D (LoRA: (alpha / r) * up @ down; LoHa / LoKr / Tucker LoCon / full
    difference: as ComfyUI computes it) is replaced by its best rank-r' approximation
    U_r' S_r' V_r'^T (3x3 convs flattened to out x in*9): up = U sqrt(S), down = sqrt(S) V^T,
    alpha = r', with r' = min(requested, r) for LoRA and min(requested, out, in*k) otherwise.
    `shapes` (module name -> base weight shape) is needed for modules whose tensors do not show
    the layer shape (every kind but plain LoRA and full differences).
    Report: module -> (kind, old rank or None, new rank, fraction of ||D||_F^2 kept).
    """
    import torch

    from models.lora.files import LoRAFileError, explain_unknown, parse_lora_tensors

    modules, unknown = parse_lora_tensors(tensors)
    if unknown:
        raise LoRAFileError("resize: keys that form no adapter: " + "; ".join(explain_unknown(unknown, tensors)[:3]))
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError(f"--rank / --conv-rank must be >= 1, got {rank} / {conv_rank}")
    out, report = {}, {}
    for name, w in modules.items():
        if "diff_b" in w:
            raise LoRAFileError(f"resize: {name} holds diff_b (a bias update), which a LoRA cannot express")
        shape = file_weight_shape(w) or (shapes or {}).get(name)
        if shape is None:
            raise LoRAFileError(f"resize: {name} ({w.label()}) needs the layer shape of a model; pass --family")
        delta, _ = w.delta(tuple(shape))
        is_conv = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        limit = w.rank if w.algo == "lora" else min(delta.shape[0], delta[0].numel())
        target = min(conv_rank or rank if is_conv else rank, limit)
        u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
        root = s[:target].sqrt()
        ones = [1] * (len(shape) - 2)
        out[f"{name}.lora_down.weight"] = (root[:, None] * vh[:target]).reshape(target, *shape[1:]).contiguous()
        out[f"{name}.lora_up.weight"] = (u[:, :target] * root).reshape(shape[0], target, *ones).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(target))
        if "dora_scale" in w:
            out[f"{name}.dora_scale"] = w["dora_scale"].float()
        total = float(s.square().sum())
        report[name] = (w.label(), w.rank, target, float(s[:target].square().sum()) / total if total > 0 else 1.0)
    return out, report


def file_weight_shape(w) -> tuple[int, ...] | None:
    """The base weight shape a plain LoRA (up, down) or full difference shows, else None."""
    if w.algo == "lora" and not w.tucker:
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        return (up.shape[0], *down.shape[1:])
    if w.algo == "full":
        return tuple(w["diff"].shape)
    return None


def _model_shapes(tensors: dict, metadata: dict, family: str | None) -> dict[str, tuple[int, ...]]:
    """Module name -> base weight shape, from the family's model on meta (guessed when not given)."""
    from models.bundle import FAMILIES, build_model
    from models.lora.files import LoRAFileError, guess_family, parse_lora_tensors
    from models.lora.names import components_of, name_table

    modules, _ = parse_lora_tensors(tensors)
    if family is None:
        guess, why = guess_family(modules, metadata)
        family = guess.split("/")[0] if guess else None
        if family is None:
            raise LoRAFileError(f"resize: cannot tell the model family ({why}); pass --family")
    if family not in FAMILIES:
        raise LoRAFileError(f"resize: unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    bundle = build_model(family, device="meta")
    table, parts = name_table(bundle), components_of(bundle)
    shapes = {}
    for name in modules:
        ref = table.from_kohya(name) if name.startswith("lora_") else table.from_peft(name)
        if ref is not None:
            shapes[name] = tuple(parts[ref.component].get_submodule(ref.path).weight.shape)
    return shapes


def resize(args: argparse.Namespace) -> int:
    import torch

    from models.lora.files import parse_lora_tensors, read_lora_file, write_lora_file

    out = Path(args.out)
    if (problem := _out_problem(out, args.force)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    tensors, metadata = read_lora_file(args.file)
    in_dtype = next((t.dtype for k, t in tensors.items() if not k.endswith(".alpha")), torch.float32)
    dtype = torch_dtype(args.dtype) if args.dtype else in_dtype
    modules, _ = parse_lora_tensors(tensors)
    needs_model = any(file_weight_shape(w) is None for w in modules.values())
    shapes = _model_shapes(tensors, metadata, args.family) if needs_model else None
    new, report = resize_tensors(tensors, args.rank, args.conv_rank, shapes)
    new = {k: v.to(dtype) for k, v in new.items()}
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    linear = [report[n][2] for n in report if _is_linear(new, n)]
    conv = [report[n][2] for n in report if not _is_linear(new, n)]
    meta["ss_network_dim"] = str(max(linear) if linear else max(conv))
    meta["ss_network_alpha"] = meta["ss_network_dim"]
    try:
        net_args = json.loads(meta.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        net_args = {}
    for key in ("algo", "factor", "decompose_both", "use_tucker"):  # the result is a plain LoRA
        net_args.pop(key, None)
    if conv:
        net_args["conv_dim"] = net_args["conv_alpha"] = str(max(conv))
    meta["ss_network_args"] = json.dumps(net_args)
    meta["ss_network_module"] = "networks.lora"
    kinds = Counter(label for label, _, _, _ in report.values())
    old = sorted({r for _, r, _, _ in report.values() if r is not None})
    meta["lorasmith.resized_from"] = json.dumps({"ranks": old, "kinds": dict(kinds), "file": Path(args.file).name})
    write_lora_file(out, new, meta)
    print("update energy kept per module (||D_r||^2 / ||D||^2):")
    for name, (label, r, target, kept) in report.items():
        print(f"  {name:<72} {label:<13} rank {r if r is not None else 'full':>4} -> {target:<4} {kept:.4f}")
    kept = [k for _, _, _, k in report.values()]
    print(f"resized {len(report)} modules ({', '.join(f'{k} {n}' for k, n in kinds.items())}): rank "
          f"{','.join(map(str, old)) or 'full'} -> {meta['ss_network_dim']}" + (f" (conv {max(conv)})" if conv else ""))
    print(f"update energy kept: mean {sum(kept) / len(kept):.4f}, min {min(kept):.4f}")
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
