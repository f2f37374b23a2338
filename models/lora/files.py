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

LoHa / LoKr networks are written in LyCORIS's kohya-style names (`.hada_w1_a` ... `.lokr_w2`, see
`models.lora.lycoris`) with `ss_network_module` = `lycoris.kohya` and the algorithm in
`ss_network_args`, as LyCORIS itself writes them.

`load_lora(bundle, path)` accepts kohya files (SDXL UNet names in ldm or diffusers-underscored
spelling, SD1.5/SD2 in either, Flux in BFL paths with `lora_te1_` CLIP-L and `lora_te3_` (or
OneTrainer's `lora_te2_`) T5), diffusers/PEFT/ai-toolkit files (`unet.` / `transformer.` /
`text_encoder.` / `text_encoder_2.` + `.lora_A.weight` / `.lora_B.weight`, scale 1; Flux LoRAs on
diffusers pieces of a fused layer (to_q, to_k, to_v, proj_mlp) combine exactly into one adapter on
it, see `models.lora.pieces`), ComfyUI's `diffusion_model.` + BFL path, OneTrainer's
`lora_transformer_` and SimpleTuner's `lycoris_` underscored diffusers paths, LyCORIS files (LoCon with
`lora_mid`, LoHa, LoKr in every w1/w2 form, `dora_scale` per input or per output channel, full
`diff` / `diff_b`; see `models.lora.entries`) and our own output. Every key must land on a module
of the model: a key that does not is an error (or, with strict=False, a warning with the count),
never a silent skip.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import re
import warnings
from collections import Counter
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..clip import CLIPTextConfig
from ..families import FAMILIES, lineages
from ..unet import UNetConfig
from ..checkpoints.fileio import write_bytes
from ..checkpoints.safetensors_io import SafetensorsError, read_tensors, all_finite, count_nonfinite
from .entries import SUFFIX_PATTERN, LoRAModuleWeights, ModuleMismatch
from .layers import weight_shape
from .network import LoRANetwork, LoRATarget
from .pieces import fuse_pieces
from ..quant.model import base_quantization
from .options import LoRAOptions
from .names import LoRANameTable, ModuleRef, components_of, name_table

__all__ = [
    "LoRAFileError",
    "LoRAModuleWeights",
    "build_metadata",
    "explain_unknown",
    "guess_family",
    "load_lora",
    "lora_hashes",
    "nonfinite_tensors",
    "parse_lora_tensors",
    "read_lora_file",
    "require_finite",
    "save_network",
    "write_lora_file",
]

_KOHYA_RE = re.compile(rf"^((?:lora_(?:unet|te\d?|transformer)|lycoris)_\w+?)\."
                       rf"(lora_A\.weight|lora_B\.weight|{SUFFIX_PATTERN})$")
"""Underscore module names: kohya `lora_unet_` / `lora_te[123]_`, OneTrainer `lora_transformer_`,
SimpleTuner `lycoris_` (Flux: diffusers paths)."""
_PEFT_RE = re.compile(r"^((?:unet|text_encoder|text_encoder_2|transformer|diffusion_model)\.[\w.]+?)\."
                      rf"(lora_A\.weight|lora_B\.weight|{SUFFIX_PATTERN})$")
"""Dotted module names: PEFT / diffusers (`unet.`, `transformer.`, `text_encoder[_2].`) and ComfyUI's
`diffusion_model.` + BFL path, with PEFT's or kohya's suffixes."""
_UNSUPPORTED = ("oft_", "boft_", "lora_magnitude_vector", "reshape_weight", ".w_norm", ".b_norm", ".lokr_t1")
"""Key parts of adapter kinds that are not read (OFT/BOFT, PEFT's DoRA magnitude, padded reshapes,
norm-layer updates, LyCORIS's unused LoKr t1)."""
_PEFT_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha"}


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


def write_lora_file(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Write `tensors` + `metadata` (plus the two sshs_* hashes) atomically; returns the metadata."""
    for k, t in tensors.items():
        if t.is_meta:
            raise ValueError(f"cannot save LoRA tensor {k}: it is on the meta device (load or train weights first)")
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    metadata = {str(k): str(v) for k, v in metadata.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = lora_hashes(tensors, metadata)
    write_bytes(Path(path), safetensors.torch.save(tensors, metadata))
    return metadata


def _fmt(x: float) -> str:
    return f"{x:g}"


def build_metadata(network: LoRANetwork, title: str | None = None, extra: dict | None = None) -> dict[str, str]:
    """kohya `ss_*` + `modelspec.*` metadata for `network`; `extra` entries (any JSON-able values)
    are added last and win. The sshs_* hashes are added by `write_lora_file`.

    Plain LoRA/LoCon: `ss_network_module` = `networks.lora` (kohya; Flux: `networks.lora_flux`). LoHa,
    LoKr and Tucker cores: `lycoris.kohya` with LyCORIS's network args (`algo` loha / lokr / locon, `factor`,
    `decompose_both`, `use_tucker`, `conv_dim` / `conv_alpha`), as LyCORIS writes them.
    `lorasmith.base_quantization` (JSON {part: fp8 | int8 | nf4}) is added when the model had
    quantized frozen weights (`models.quant`); the tensors are an ordinary LoRA all the same."""
    spec = network.bundle.spec
    adapters = network.adapters()
    refs = network.refs()
    is_conv = {n: len(a.weight_shape) == 4 and a.weight_shape[2:] != (1, 1) for n, a in adapters.items()}
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
    algos = Counter(a.algo for a in adapters.values())
    tucker = any(a.tucker for a in adapters.values())
    lycoris = set(algos) != {"lora"} or tucker
    if lycoris:
        algo = algos.most_common(1)[0][0]
        args = {"algo": "locon" if algo == "lora" else algo, **args}
        if "lokr" in algos:
            args["factor"] = str(cfg.factor)
            args["decompose_both"] = str(cfg.decompose_both)
        args["use_tucker"] = str(tucker)
    family_meta = spec.lora_metadata()
    flux = spec.lora_unet_names == "bfl"
    meta = {
        # kohya sd-scripts trains Flux with its own network module (BFL names, lora_te3_ for T5)
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora_flux" if flux else "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": _fmt(alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": _fmt(cfg.dropout),
        "ss_base_model_version": family_meta["ss_base_model_version"],
        "ss_v2": family_meta["ss_v2"],
        "ss_training_comment": "",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family_meta["modelspec.architecture"],
        "modelspec.implementation": family_meta["modelspec.implementation"],
        "modelspec.title": title or "lora",
        "modelspec.resolution": family_meta["modelspec.resolution"],
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "lorasmith.modules": json.dumps(dict(Counter(r.component for r in refs.values()))),
    }
    if "modelspec.prediction_type" in family_meta:  # kohya writes none for Flux (a flow model)
        meta["modelspec.prediction_type"] = family_meta["modelspec.prediction_type"]
    if quantized := base_quantization(network.bundle):
        meta["lorasmith.base_quantization"] = json.dumps(quantized)  # trained on a quantized base
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
def read_lora_file(path, *, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a `.safetensors` LoRA (a diffusers folder: its
    `pytorch_lora_weights.safetensors`). Raises LoRAFileError naming the file if it is missing,
    truncated or not safetensors, or (`check_finite`) if any tensor holds NaN or inf."""
    p = Path(path)
    if p.is_dir():
        p = p / "pytorch_lora_weights.safetensors"
    if not p.is_file():
        raise LoRAFileError(f"LoRA file {p} does not exist")
    try:
        tensors, metadata = read_tensors(p)
    except (SafetensorsError, OSError) as e:
        raise LoRAFileError(
            f"LoRA file {p} is not a readable .safetensors file ({e}); it may be truncated or corrupt - "
            "download or export it again"
        ) from None
    if check_finite:
        require_finite(tensors, str(p))
    return tensors, metadata


def _module_of(key: str) -> str:
    m = _KOHYA_RE.match(key) or _PEFT_RE.match(key)
    return m.group(1) if m else key


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names (sorted) of the tensors holding NaN or inf; one fused reduction per tensor."""
    return sorted(k for k, t in tensors.items() if not all_finite(t))


def require_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """LoRAFileError naming `source` and the first module affected when any tensor holds NaN or
    inf: such a LoRA silently gives black or noise images."""
    bad = nonfinite_tensors(tensors)
    if not bad:
        return
    nan, inf = count_nonfinite(tensors[bad[0]])
    modules = sorted({_module_of(k) for k in bad})
    raise LoRAFileError(
        f"{source}: non-finite values (NaN/inf) in {len(bad)} tensor(s) of {len(modules)} module(s), first "
        f"{modules[0]} ({bad[0]}: {nan} NaN, {inf} inf); the LoRA is damaged (e.g. its training diverged) and "
        "would give black or noise images - export it again from a good checkpoint"
    )


def parse_lora_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, LoRAModuleWeights], list[str]]:
    """Group file tensors per module name (kohya name, or PEFT module path) by key suffix (PEFT
    lora_A/lora_B become lora_down/lora_up), with the keys that form no complete adapter of a
    known kind (`explain_unknown` says why)."""
    modules: dict[str, LoRAModuleWeights] = {}
    keys: dict[str, list[str]] = {}
    unknown = []
    for key, t in tensors.items():
        m = _KOHYA_RE.match(key) or _PEFT_RE.match(key)
        if m is None:
            unknown.append(key)
            continue
        suffix = _suffix(m)
        entry = modules.setdefault(m.group(1), LoRAModuleWeights())
        entry[suffix] = float(t.float().item()) if suffix == "alpha" else t
        keys.setdefault(m.group(1), []).append(key)
    for name, entry in list(modules.items()):
        if entry.problem():
            unknown.extend(keys[name])
            del modules[name]
    return modules, sorted(unknown)


def _suffix(match: re.Match) -> str:
    """The kohya suffix of a matched key (PEFT lora_A/lora_B -> lora_down/lora_up)."""
    suffix = match.group(2)
    return _PEFT_SUFFIX.get(suffix, suffix)


def explain_unknown(unknown: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """One `<key or module> (<why>)` line per unread key of `parse_lora_tensors`, one per module
    for incomplete or mixed adapters."""
    lines, seen = [], set()
    for key in unknown:
        m = _KOHYA_RE.match(key) or _PEFT_RE.match(key)
        if m is None:
            unsupported = any(part in key for part in _UNSUPPORTED)
            lines.append(f"{key} ({'an adapter type this loader does not support' if unsupported else 'not a LoRA weight'})")
            continue
        if m.group(1) in seen:
            continue
        seen.add(m.group(1))
        group = LoRAModuleWeights({_suffix(mm): v for k, v in tensors.items()
                                   if (mm := _KOHYA_RE.match(k) or _PEFT_RE.match(k)) and mm.group(1) == m.group(1)})
        lines.append(f"{m.group(1)} ({group.problem() or 'not a LoRA weight'})")
    return lines


_FLUX_TOP = r"(?:double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)"
_FLUX_KEY = re.compile(rf"^(?:lora_unet_{_FLUX_TOP}(?:_|$)|diffusion_model\.{_FLUX_TOP}(?:\.|$)|transformer\.|"
                       r"lora_transformer_|lycoris_(?:single_)?transformer_blocks_\d)")
"""Module names only a Flux transformer LoRA has (BFL block paths, diffusers `transformer.` paths)."""
_T5_KEY = re.compile(r"^(?:lora_te[23]_encoder_block_|text_encoder_2\.encoder\.block\.)")
"""T5 encoder module names (Flux: `lora_te3_`, or `lora_te2_` as OneTrainer numbers it)."""


def guess_family(modules: dict[str, dict], metadata: dict[str, str] | None = None) -> tuple[str | None, str]:
    """Best guess of the lineage a LoRA was trained for: (a family name, several lineages joined by
    "/" when the keys fit more than one, or None; the reason). Our own exports record the exact
    family; other files are matched against what each registered lineage declares (denoiser
    spelling, text-encoder components, cross-attention width, text width, kohya `ss_base_model_version`)."""
    names = list(modules)
    recorded = (metadata or {}).get("lorasmith.family")
    if recorded:
        # Our own exports name the exact family, tiny test families included.
        return recorded, f"its metadata says lorasmith.family={recorded}"
    reps = list(lineages().values())  # one family per lineage, the one named after it where there is one

    def answer(specs, why):
        return "/".join(s.base for s in specs), why

    def having(component):
        return [s for s in reps if component in s.lora_text_components]

    flux = [s for s in reps if s.lora_unet_names == "bfl"]
    if flux and any(_FLUX_KEY.match(n) for n in names):
        return answer(flux, "its keys name Flux transformer layers (double_blocks / single_blocks)")
    if having("te3") and any(_T5_KEY.match(n) for n in names):
        return answer(having("te3"), "it has a T5 text encoder (lora_te3_ keys)")
    if having("te2") and any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names):
        return answer(having("te2"), "it has two text encoders (lora_te1_/lora_te2_ keys)")
    unets = [s for s in reps if s.lora_unet_names != "bfl"]
    for n, w in modules.items():
        if re.search(r"attn2[._]to_[kv]$", n):
            width = w.in_width
            fits = [s for s in unets if UNetConfig.preset(s.unet).context_dim == width]
            if fits:
                return answer(fits, f"its cross-attention reads {width}-wide text features")
            break
    if having("te1") and any(n.startswith("lora_te1_") for n in names):
        return answer(having("te1"), "its text encoder keys are lora_te1_ (CLIP-L of a two-encoder model)")
    one_tower = [s for s in reps if len(s.lora_text_components) == 1]
    for n, w in modules.items():
        if re.search(r"mlp[._]fc1$", n) and n.startswith(("lora_te_", "text_encoder.")):
            width = w.in_width
            fits = [s for s in one_tower if CLIPTextConfig.preset(s.text_encoders[0]).hidden_size == width]
            return answer(fits or one_tower, "it has one text encoder (lora_te_ keys)")
    version = (metadata or {}).get("ss_base_model_version", "")  # kohya: sd_v1, sd_v2_512, sdxl_base_v1-0, flux1
    for s in reps:
        stem = "_".join(s.base_model_version.split("_")[:2])
        if stem and version.startswith(stem):
            return s.base, f"its metadata says ss_base_model_version={version}"
    return None, "no family-specific keys"


def _lineage_words(name: str) -> str:
    """"an SDXL", "an SD1.5/SD2.x": the article and title(s) of a family or a "/"-joined lineage list."""
    reps = lineages()
    titles = [FAMILIES[n].title if n in FAMILIES else reps[n].lineage_title or reps[n].title if n in reps else n
              for n in name.split("/")]
    words = "/".join(titles)
    return ("an " if words[:1] in "AEIOSaeio" else "a ") + words  # "an SDXL", "a FLUX.1"


def load_lora(bundle, path, strength: float = 1.0, strict: bool = True) -> LoRANetwork:
    """Read a LoRA file and inject it into `bundle` at `strength`; returns its (unmerged) network.

    Raises LoRAFileError for an unreadable file, a LoRA of another family, or (strict) keys that
    match no module / have the wrong shape; strict=False warns with the count and loads the rest.
    """
    tensors, metadata = read_lora_file(path)  # checks finiteness
    net = network_from_tensors(bundle, tensors, metadata, source=str(path), strength=strength, strict=strict,
                               check_finite=False)
    return net


def network_from_tensors(bundle, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
                         source: str = "<state dict>", strength: float = 1.0, strict: bool = True,
                         check_finite: bool = True) -> LoRANetwork:
    """`load_lora` for tensors already in memory (`check_finite`: refuse NaN/inf, see `require_finite`)."""
    if check_finite:
        require_finite(tensors, source)
    metadata = dict(metadata or {})
    modules, unknown = parse_lora_tensors(tensors)
    if not modules:
        raise LoRAFileError(
            f"{source}: no LoRA weights found (expected kohya `*.lora_down.weight`/`*.lora_up.weight`, LyCORIS "
            f"`*.hada_w1_a`/`*.lokr_w1`/`*.diff` or PEFT `*.lora_A.weight`/`*.lora_B.weight` keys; "
            f"{'; '.join(explain_unknown(unknown, tensors)[:3])})"
        )
    family, why = guess_family(modules, metadata)
    base = bundle.spec.base
    if family in FAMILIES:
        family = FAMILIES[family].base
    if family is not None and base not in family.split("/"):
        words = _lineage_words(family)
        raise LoRAFileError(
            f"{source} is {words} LoRA ({why}) but the model is {bundle.family!r}; "
            f"load it on {words} model or pick a LoRA made for {bundle.family}"
        )
    targets, weights, bad = _targets(bundle, modules)
    bad = explain_unknown(unknown, tensors) + bad
    if bad:
        listing = "; ".join(bad[:12]) + (f"; ... and {len(bad) - 12} more" if len(bad) > 12 else "")
        msg = f"{source}: {len(bad)} LoRA key(s)/module(s) do not match the {bundle.family} model: {listing}"
        if strict or not targets:
            raise LoRAFileError(msg + ". Check that the LoRA is for this model family; strict=False loads the rest")
        warnings.warn(msg + f". Loaded the other {len(targets)} modules (strict=False).", stacklevel=3)
    net = LoRANetwork(bundle, targets, _config_of(targets, metadata))
    for name, adapter in net.adapters().items():
        adapter.load_file_tensors(weights[name])
    net.multiplier = strength
    net.file_metadata = metadata
    return net


def _targets(bundle, modules: dict[str, LoRAModuleWeights]):
    """(LoRATargets, kohya name -> tensors, problem lines) for the file's modules on `bundle`.

    A module named whole in any spelling becomes its own target; LoRAs on diffusers pieces of one
    fused Flux layer (`transformer.` / `lora_transformer_` / `lycoris_` + to_q, to_k, ...) become one
    target through `models.lora.pieces.fuse_pieces`. A layer named twice is a problem, not a merge."""
    table: LoRANameTable = name_table(bundle)
    parts = components_of(bundle)
    targets, weights, bad = [], {}, []
    whole: dict[ModuleRef, str] = {}
    pieces: dict[ModuleRef, list] = {}
    for name, w in modules.items():
        ref = table.lookup(name)
        found = table.piece(name) if ref is None else None
        if ref is not None:
            if ref in whole:
                bad.append(f"{name} (names {ref.path} like {whole[ref]} does)")
                continue
            whole[ref] = name
            targets += _fit(parts, ref, name, w, weights, bad)
        elif found is not None:
            ref, mine = found
            twice = [n for n, p, _ in pieces.get(ref, []) if p[0].module == mine[0].module]
            if twice:
                bad.append(f"{name} (names the diffusers module {mine[0].module} like {twice[0]} does)")
            else:
                pieces.setdefault(ref, []).append((name, mine, w))
        else:
            bad.append(f"{name} (no such module)")
    for ref, group in pieces.items():
        names = "+".join(n for n, _, _ in group)
        if ref in whole:
            bad.append(f"{names} (pieces of {ref.path}, which {whole[ref]} names whole)")
            continue
        try:
            fused = fuse_pieces(weight_shape(parts[ref.component].get_submodule(ref.path)), ref.path, group)
        except ModuleMismatch as exc:
            bad.append(f"{names} ({exc})")
            continue
        targets += _fit(parts, ref, names, fused, weights, bad)
    return targets, weights, bad


def _fit(parts, ref: ModuleRef, name: str, w: LoRAModuleWeights, weights: dict, bad: list) -> list[LoRATarget]:
    """[the target of tensors `w` on `ref`'s layer] (recorded in `weights`), or [] with the misfit in `bad`."""
    layer = parts[ref.component].get_submodule(ref.path)
    try:
        fields = w.target_fields(weight_shape(layer), layer.bias is not None)
    except ModuleMismatch as exc:
        bad.append(f"{name} ({exc})")
        return []
    weights[ref.kohya] = w
    return [LoRATarget(ref, **fields)]


def _config_of(targets: list[LoRATarget], metadata: dict[str, str]) -> LoRAOptions:
    """LoRAOptions describing loaded adapters (for metadata on re-save)."""
    ranks = Counter(t.rank for t in targets).most_common(1)[0][0]
    alphas = Counter(t.alpha for t in targets).most_common(1)[0][0]
    try:
        dropout = float(metadata.get("ss_network_dropout") or 0.0)
    except ValueError:
        dropout = 0.0
    algos = Counter(t.algo for t in targets if t.algo != "full").most_common(1)
    algo = algos[0][0] if algos else "lora"
    lokr = [t.layout for t in targets if t.layout is not None]
    return LoRAOptions(rank=ranks, alpha=alphas, preset=None, text_encoders=None, dropout=dropout, algo=algo,
                      dora=algo == "lora" and any(t.dora for t in targets), use_tucker=any(t.tucker for t in targets),
                      decompose_both=any(layout.w1_rank is not None for layout in lokr))
