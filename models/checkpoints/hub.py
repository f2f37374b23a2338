"""Hugging Face Hub sources: repo ids and file URLs, downloaded into the huggingface_hub cache.

Accepted spellings (a path that exists locally always wins):

    stabilityai/stable-diffusion-xl-base-1.0                    a diffusers repo (snapshot)
    user/repo/path/to/model.safetensors                         one file of a repo
    https://huggingface.co/user/repo/blob/main/model.safetensors    the same as a URL (blob or resolve)

Only what loading needs is fetched: configs, tokenizer files and the safetensors weights of the
pipeline components (the fp16 variant first when loading in fp16), never pickles, ONNX or
top-level single files of a diffusers repo. Failures become one-sentence HubError messages
(offline, gated/unauthorised, not found).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HubError", "HubRef", "download", "download_tokenizer", "parse_hub_source"]

COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")
_TOKENIZER_FILES = ["*.json", "*.txt", "*.model"]  # vocab.json + merges.txt (CLIP), tokenizer.json / spiece.model (T5)
_META_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    *(f"{c}/config.json" for c in COMPONENTS),
    *(f"{d}/{p}" for d in ("tokenizer", "tokenizer_2") for p in _TOKENIZER_FILES),
]
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_URL = re.compile(rf"^https?://(?:www\.)?huggingface\.co/({_NAME}/{_NAME})/(?:blob|resolve)/([^/]+)/(.+)$")
_REPO = re.compile(rf"^({_NAME}/{_NAME})$")
_REPO_FILE = re.compile(rf"^({_NAME}/{_NAME})/(.+\.(?:safetensors|json))$")


class HubError(OSError):
    """A hub source that could not be fetched (offline, gated, missing)."""


@dataclass(frozen=True)
class HubRef:
    """A repo (filename None: the whole pipeline) or one file in it, at `revision`."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None


def parse_hub_source(source: str) -> HubRef | None:
    """HubRef for a hub id / URL spelling, None for anything else (callers check local paths first)."""
    m = _URL.match(source)
    if m:
        return HubRef(m.group(1), m.group(3), m.group(2))
    if source.startswith(("/", ".", "~")) or "\\" in source:
        return None
    m = _REPO.match(source)
    if m:
        return HubRef(m.group(1))
    m = _REPO_FILE.match(source)
    if m:
        return HubRef(m.group(1), m.group(2))
    return None


def _weight_patterns(component: str, half: bool) -> list[str]:
    """Weight files of one component folder ("" = the repo root of a single-component repo)."""
    d = f"{component}/" if component else ""
    if half:
        return [f"{d}*.fp16.safetensors", f"{d}*.fp16-*-of-*.safetensors", f"{d}*.safetensors.index.fp16.json"]
    return [f"{d}diffusion_pytorch_model.safetensors", f"{d}model.safetensors",
            f"{d}diffusion_pytorch_model-*-of-*.safetensors", f"{d}model-*-of-*.safetensors",
            f"{d}*.safetensors.index.json"]


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.endswith(".safetensors") for p in folder.iterdir())


def _explain(exc: Exception, what: str) -> HubError:
    """One sentence for a huggingface_hub / network failure."""
    name = type(exc).__name__
    names = {c.__name__ for c in type(exc).__mro__}
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if "GatedRepoError" in names or status in (401, 403):
        return HubError(
            f"cannot download {what}: access is gated or needs authorisation (HTTP {status or 401}); accept the "
            "model's licence on its Hugging Face page and log in with `huggingface-cli login` (or set HF_TOKEN)"
        )
    if "RepositoryNotFoundError" in names:
        return HubError(f"cannot download {what}: the repository does not exist or is private (check the id, or log in)")
    if "RevisionNotFoundError" in names:
        return HubError(f"cannot download {what}: the revision does not exist in that repository")
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} or "Connect" in name or "Timeout" in name \
            or isinstance(exc, (ConnectionError, TimeoutError)):
        return HubError(
            f"cannot download {what}: the Hugging Face Hub is unreachable (offline or HF_HUB_OFFLINE=1) and it is "
            "not in the local cache; download it on a connected machine or pass a local path"
        )
    if "EntryNotFoundError" in names:
        return HubError(f"cannot download {what}: that file is not in the repository")
    return HubError(f"cannot download {what}: {name}: {exc}")


def download(ref: HubRef, prefer_half: bool = False, component: bool = False) -> Path:
    """Fetch `ref` into the huggingface_hub cache; returns the local file or snapshot folder.

    component: the repo holds one model (config.json + weights at its root, e.g. a VAE repo used
    as `vae=`) rather than a pipeline.
    """
    import huggingface_hub  # runtime dependency, imported only when a hub source is used

    what = f"{ref.repo_id}/{ref.filename}" if ref.filename else ref.repo_id
    folders = ("",) if component else COMPONENTS
    meta = ["config.json"] if component else _META_PATTERNS
    try:
        if ref.filename is not None:
            return Path(huggingface_hub.hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision))
        first = [p for c in folders for p in _weight_patterns(c, prefer_half)]
        root = Path(huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=meta + first))
        if not component and not (root / "model_index.json").is_file():
            raise HubError(
                f"{ref.repo_id} is not a diffusers pipeline repository (no model_index.json); pass one of its "
                f"files instead, e.g. {ref.repo_id}/<file>.safetensors"
            )
        lacking = [c for c in folders if (root / c / "config.json").is_file() and not _has_weights(root / c)]
        if lacking:
            # No fp16 variant (or only one) for these components: fetch their other weights.
            again = [p for c in lacking for p in _weight_patterns(c, not prefer_half)]
            root = Path(huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=meta + again))
        return root
    except HubError:
        raise
    except Exception as exc:  # noqa: BLE001 - huggingface_hub / httpx / requests errors, by name (versions differ)
        raise _explain(exc, what) from None


def download_tokenizer(ref: HubRef) -> Path:
    """Fetch a tokenizer: one file (`ref.filename`), or the tokenizer files of a repo, from its
    `tokenizer_2/` folder (a FLUX.1 pipeline repo) when it has one, else from its root (e.g. a T5
    repo's spiece.model). Returns the file or the folder holding them."""
    import huggingface_hub

    what = f"{ref.repo_id}/{ref.filename}" if ref.filename else f"the tokenizer of {ref.repo_id}"
    try:
        if ref.filename is not None:
            return Path(huggingface_hub.hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision))
        patterns = [*(f"tokenizer_2/{p}" for p in _TOKENIZER_FILES), "tokenizer.json", "spiece.model",
                    "tokenizer_config.json", "special_tokens_map.json"]
        root = Path(huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))
        return root / "tokenizer_2" if (root / "tokenizer_2").is_dir() else root
    except Exception as exc:  # noqa: BLE001 - as in `download`
        raise _explain(exc, what) from None
