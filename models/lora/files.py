"""LoRA `.safetensors` files: writing (kohya layout + metadata + hashes) and reading (any common spelling).

Written files (`LoRANetwork.save`) are what ComfyUI, A1111/Forge and diffusers read:
`<kohya name>.lora_down.weight` (r, in[, kh, kw]), `.lora_up.weight` (out, r[, 1, 1]), a 0-dim
`.alpha` always (a missing alpha means scale 1 to ComfyUI), `.dora_scale` for DoRA. Metadata:
kohya `ss_*` keys, `modelspec.*` (SAI model spec), and the two hashes A1111's additional-networks
index uses, computed like kohya's `precalculate_safetensors_hashes`:
`sshs_model_hash` = sha256 of everything after the header (the tensor bytes) and
`sshs_legacy_hash` = first 8 hex digits of sha256 of bytes [0x100000, 0x110000), both over the
file as serialised with only the `ss_*` metadata. Writes are atomic (temp file in the destination
folder, fsync, rename).

`load_lora(bundle, path)` accepts kohya files (SDXL UNet names in ldm or diffusers-underscored
spelling, SD1.5/SD2 in either), diffusers/PEFT files (`unet.` / `text_encoder.` /
`text_encoder_2.` + `.lora_A.weight` / `.lora_B.weight`, scale 1) and our own output. Every key
must land on a module of the model: a key that does not is an error (or, with strict=False, a
warning with the count), never a silent skip.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..bundle import FAMILIES
from .network import LoRAConfig, LoRANetwork, LoRATarget
from .names import LoRANameTable, ModuleRef, components_of, name_table

__all__ = [
    "LoRAFileError",
    "LoRAModuleWeights",
    "build_metadata",
    "guess_family",
    "load_lora",
    "lora_hashes",
    "parse_lora_tensors",
    "read_lora_file",
    "save_network",
    "write_lora_file",
]

_KOHYA_RE = re.compile(r"^(lora_(?:unet|te|te1|te2)_\w+?)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
_PEFT_RE = re.compile(r"^((?:unet|text_encoder|text_encoder_2)\.[\w.]+?)\.(lora_A\.weight|lora_B\.weight|alpha)$")
_UNSUPPORTED = ("hada_", "lokr_", "lora_mid", "oft_", "diff_b", ".diff", "lora_magnitude_vector", "reshape_weight")
_ARCH = {"sdxl": "stable-diffusion-xl-v1-base", "sd15": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512"}
_BASE_VERSION = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1", "sd2": "sd_v2"}
_FAMILY_WORDS = {"sdxl": "an SDXL", "sd15": "an SD1.x", "sd2": "an SD2.x", "sd1or2": "an SD1.x/SD2.x"}
_CONTEXT_DIM = {2048: "sdxl", 768: "sd15", 1024: "sd2"}


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used: unreadable, of another model family, or with keys that
    match no module of the model. The message names the file and what to do."""


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def lora_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them: over the safetensors bytes of
    `tensors` with only the `ss_*` entries of `metadata`."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, ss_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_lora_file(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Write `tensors` + `metadata` (plus the two sshs_* hashes) atomically; returns the metadata."""
    for k, t in tensors.items():
        if t.is_meta:
            raise ValueError(f"cannot save LoRA tensor {k}: it is on the meta device (load or train weights first)")
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    metadata = {str(k): str(v) for k, v in metadata.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = lora_hashes(tensors, metadata)
    _atomic_write(Path(path), safetensors.torch.save(tensors, metadata))
    return metadata


def _fmt(x: float) -> str:
    return f"{x:g}"


def build_metadata(network: LoRANetwork, title: str | None = None, extra: dict | None = None) -> dict[str, str]:
    """kohya `ss_*` + `modelspec.*` metadata for `network`; `extra` entries (any JSON-able values)
    are added last and win. The sshs_* hashes are added by `write_lora_file`."""
    spec = network.bundle.spec
    adapters = network.adapters()
    refs = network.refs()
    is_conv = {n: a.lora_down.weight.dim() == 4 and a.lora_down.weight.shape[2:] != (1, 1) for n, a in adapters.items()}
    linear = [a for n, a in adapters.items() if not is_conv[n]]
    conv = [a for n, a in adapters.items() if is_conv[n]]
    common = lambda xs: Counter(xs).most_common(1)[0][0] if xs else None
    dim = common([a.rank for a in linear]) or common([a.rank for a in conv])
    alpha = common([a.alpha for a in linear]) or common([a.alpha for a in conv])
    args: dict[str, str] = {}
    if conv:
        args["conv_dim"], args["conv_alpha"] = str(common([a.rank for a in conv])), _fmt(common([a.alpha for a in conv]))
    cfg = network.config
    if cfg.rank_dropout:
        args["rank_dropout"] = _fmt(cfg.rank_dropout)
    if cfg.module_dropout:
        args["module_dropout"] = _fmt(cfg.module_dropout)
    if any(a.is_dora for a in adapters.values()):
        args["dora_wd"] = "True"
    pred = "v" if spec.prediction_type == "v_prediction" else "epsilon"
    arch = _ARCH[spec.base]
    if spec.base == "sd2" and pred == "v":
        arch = "stable-diffusion-v2-768-v"
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": _fmt(alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": _fmt(cfg.dropout),
        "ss_base_model_version": _BASE_VERSION[spec.base],
        "ss_v2": str(spec.base == "sd2"),
        "ss_training_comment": "",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": (
            "https://github.com/Stability-AI/generative-models" if spec.base == "sdxl" else "diffusers"
        ),
        "modelspec.title": title or "lora",
        "modelspec.resolution": f"{spec.resolution}x{spec.resolution}",
        "modelspec.prediction_type": pred,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "lorasmith.modules": json.dumps(dict(Counter(r.component for r in refs.values()))),
    }
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_network(network: LoRANetwork, path, dtype=torch.float16, metadata: dict | None = None,
                 format: str = "kohya") -> dict[str, str]:
    """`LoRANetwork.save`: export tensors in `dtype` (None keeps float32) and write them with metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA output {path}: use a .safetensors file name")
    tensors = network.state_dict_for_export(dtype=dtype, format=format)
    meta = build_metadata(network, title=path.stem, extra=metadata)
    if format == "peft":
        meta["lorasmith.format"] = "peft (diffusers load_lora_weights; not read by ComfyUI for attention layers)"
    return write_lora_file(path, tensors, meta)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def read_lora_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a `.safetensors` LoRA (a diffusers folder: its
    `pytorch_lora_weights.safetensors`). Raises LoRAFileError naming the file if it is missing,
    truncated or not safetensors."""
    p = Path(path)
    if p.is_dir():
        p = p / "pytorch_lora_weights.safetensors"
    if not p.is_file():
        raise LoRAFileError(f"LoRA file {p} does not exist")
    try:
        with safetensors.safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as e:  # noqa: BLE001 - safetensors raises several types (SafetensorError, OSError, ...)
        raise LoRAFileError(
            f"LoRA file {p} is not a readable .safetensors file ({e}); it may be truncated or corrupt - "
            "download or export it again"
        ) from None
    return tensors, metadata


class LoRAModuleWeights(dict):
    """Tensors of one module in a file: keys `down`, `up`, optional `alpha` (float), `dora_scale`."""


def parse_lora_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, LoRAModuleWeights], list[str]]:
    """Group file tensors per module name (kohya name, or PEFT module path), with the keys that
    are not LoRA weights of a known kind. PEFT down/up are lora_A/lora_B."""
    modules: dict[str, LoRAModuleWeights] = {}
    unknown = []
    kinds = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
             "alpha": "alpha", "dora_scale": "dora_scale"}
    for key, t in tensors.items():
        m = _KOHYA_RE.match(key) or _PEFT_RE.match(key)
        if m is None:
            unknown.append(key)
            continue
        entry = modules.setdefault(m.group(1), LoRAModuleWeights())
        kind = kinds[m.group(2)]
        entry[kind] = float(t.float().item()) if kind == "alpha" else t
    for name, entry in list(modules.items()):
        if "down" not in entry or "up" not in entry:
            unknown.extend(f"{name}.{k}" for k in entry)
            del modules[name]
    return modules, sorted(unknown)


def guess_family(modules: dict[str, dict], metadata: dict[str, str] | None = None) -> tuple[str | None, str]:
    """Best guess of the family a LoRA was trained for: (`sdxl` | `sd15` | `sd2` | `sd1or2` | None, reason)."""
    names = list(modules)
    recorded = (metadata or {}).get("lorasmith.family")
    if recorded:
        # Our own exports name the exact family, tiny test families included.
        return recorded, f"its metadata says lorasmith.family={recorded}"
    if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in names):
        return "sdxl", "it has two text encoders (lora_te1_/lora_te2_ keys)"
    for n, w in modules.items():
        if re.search(r"attn2[._]to_[kv]$", n):
            width = w["down"].shape[1]
            if width in _CONTEXT_DIM:
                return _CONTEXT_DIM[width], f"its cross-attention reads {width}-wide text features"
            break
    for n, w in modules.items():
        if re.search(r"mlp[._]fc1$", n) and n.startswith(("lora_te_", "text_encoder.")):
            width = w["down"].shape[1]
            return ({768: "sd15", 1024: "sd2"}.get(width, "sd1or2"), "it has one text encoder (lora_te_ keys)")
    base = (metadata or {}).get("ss_base_model_version", "")  # kohya: sd_v1, sd_v2_512, sdxl_base_v1-0, ...
    for prefix, family in (("sdxl", "sdxl"), ("sd_v1", "sd15"), ("sd_v2", "sd2")):
        if base.startswith(prefix):
            return family, f"its metadata says ss_base_model_version={base}"
    return None, "no family-specific keys"


def _expected_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple, tuple]:
    w = layer.weight
    if w.dim() == 4:
        return (rank, w.shape[1], *w.shape[2:]), (w.shape[0], rank, 1, 1)
    return (rank, w.shape[1]), (w.shape[0], rank)


def load_lora(bundle, path, strength: float = 1.0, strict: bool = True) -> LoRANetwork:
    """Read a LoRA file and inject it into `bundle` at `strength`; returns its (unmerged) network.

    Raises LoRAFileError for an unreadable file, a LoRA of another family, or (strict) keys that
    match no module / have the wrong shape; strict=False warns with the count and loads the rest.
    """
    tensors, metadata = read_lora_file(path)
    net = network_from_tensors(bundle, tensors, metadata, source=str(path), strength=strength, strict=strict)
    return net


def network_from_tensors(bundle, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
                         source: str = "<state dict>", strength: float = 1.0, strict: bool = True) -> LoRANetwork:
    """`load_lora` for tensors already in memory."""
    metadata = dict(metadata or {})
    modules, unknown = parse_lora_tensors(tensors)
    unsupported = [k for k in unknown if any(s in k for s in _UNSUPPORTED)]
    if unsupported:
        raise LoRAFileError(
            f"{source}: holds {len(unsupported)} tensors of an adapter type this loader does not support "
            f"(LoHa/LoKr/Tucker mid/OFT/PEFT-DoRA), e.g. {unsupported[:3]}; only plain LoRA/LoCon (+ kohya DoRA) loads"
        )
    if not modules:
        raise LoRAFileError(
            f"{source}: no LoRA weights found (expected kohya `*.lora_down.weight`/`*.lora_up.weight` or PEFT "
            f"`*.lora_A.weight`/`*.lora_B.weight` keys; first keys: {list(tensors)[:5]})"
        )
    family, why = guess_family(modules, metadata)
    base = bundle.spec.base
    if family in FAMILIES:
        family = FAMILIES[family].base
    if family is not None and family != base and not (family == "sd1or2" and base in ("sd15", "sd2")):
        raise LoRAFileError(
            f"{source} is {_FAMILY_WORDS[family]} LoRA ({why}) but the model is {bundle.family!r}; "
            f"load it on {_FAMILY_WORDS[family]} model or pick a LoRA made for {bundle.family}"
        )
    table: LoRANameTable = name_table(bundle)
    parts = components_of(bundle)
    targets, weights, bad = [], {}, [f"{k} (not a LoRA weight)" for k in unknown]
    for name, w in modules.items():
        ref: ModuleRef | None = table.from_kohya(name) if name.startswith("lora_") else table.from_peft(name)
        if ref is None:
            bad.append(f"{name} (no such module)")
            continue
        layer = parts[ref.component].get_submodule(ref.path)
        rank = w["down"].shape[0]
        want_down, want_up = _expected_shapes(layer, rank)
        down, up = w["down"], w["up"]
        if down.dim() == 2 and len(want_down) == 4 and want_down[2:] == (1, 1):  # 2-D LoRA on a 1x1 conv
            down, up = down[:, :, None, None], up[:, :, None, None]
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            bad.append(f"{name} (shapes down {list(down.shape)} up {list(up.shape)}, the model needs "
                       f"{list(want_down)} {list(want_up)})")
            continue
        dora = w.get("dora_scale")
        if dora is not None and dora.numel() != layer.weight.shape[1]:
            bad.append(f"{name} (dora_scale of {dora.numel()} values, the model needs {layer.weight.shape[1]})")
            continue
        alpha = w.get("alpha", float(rank))  # absent alpha = scale 1, as in ComfyUI
        targets.append(LoRATarget(ref, rank, alpha, dora is not None))
        weights[ref.kohya] = (down, up, dora)
    if bad:
        listing = "; ".join(bad[:12]) + (f"; ... and {len(bad) - 12} more" if len(bad) > 12 else "")
        msg = f"{source}: {len(bad)} LoRA key(s)/module(s) do not match the {bundle.family} model: {listing}"
        if strict or not targets:
            raise LoRAFileError(msg + ". Check that the LoRA is for this model family; strict=False loads the rest")
        warnings.warn(msg + f". Loaded the other {len(targets)} modules (strict=False).", stacklevel=3)
    net = LoRANetwork(bundle, targets, _config_of(targets, metadata))
    with torch.no_grad():
        for name, adapter in net.adapters().items():
            down, up, dora = weights[name]
            adapter.lora_down.weight.copy_(down)
            adapter.lora_up.weight.copy_(up)
            if dora is not None:
                adapter.dora_scale.copy_(dora.reshape(adapter.dora_scale.shape))
    net.multiplier = strength
    net.file_metadata = metadata
    return net


def _config_of(targets: list[LoRATarget], metadata: dict[str, str]) -> LoRAConfig:
    """A LoRAConfig describing loaded adapters (for metadata on re-save)."""
    ranks = Counter(t.rank for t in targets).most_common(1)[0][0]
    alphas = Counter(t.alpha for t in targets).most_common(1)[0][0]
    try:
        dropout = float(metadata.get("ss_network_dropout") or 0.0)
    except ValueError:
        dropout = 0.0
    return LoRAConfig(rank=ranks, alpha=alphas, unet=None, text_encoders=None, dropout=dropout,
                      dora=any(t.dora for t in targets))
