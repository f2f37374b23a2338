"""Hub sources with a local stand-in for huggingface_hub (no network): what gets downloaded, and
the one-sentence messages for offline / gated / missing repositories."""
import fnmatch
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hf_errors

from models.bundle import build_model
from models.checkpoints.diffusers_folder import save_diffusers
from models.checkpoints.hub import HubRef, parse_hub_source
from models.checkpoints.loading import ModelLoadError, load_model
from models.checkpoints.single_file import save_single_file


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A stand-in hub repo: diffusers folder (fp16 variant for the UNet only) plus files a real
    repo has that loading must not fetch (a root single file, pickles, ONNX)."""
    root = tmp_path_factory.mktemp("hub") / "stabilityai--tiny-xl"
    bundle = build_model("tiny-sdxl", seed=7)
    save_diffusers(bundle, root)
    save_diffusers(build_model("tiny-sdxl", dtype=torch.float16, seed=7), root / "half")
    shutil.copy(root / "half" / "unet" / "diffusion_pytorch_model.safetensors",
                root / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    shutil.rmtree(root / "half")
    save_single_file(bundle, root / "tiny_xl_base.safetensors")
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (root / "text_encoder" / "model.onnx").write_bytes(b"onnx")
    return root, bundle


class StandIn:
    """Replaces snapshot_download / hf_hub_download: copies from a local folder, recording calls."""

    def __init__(self, source: Path, cache: Path):
        self.source, self.cache, self.calls = source, cache, []

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, **kwargs):
        self.calls.append(("snapshot", repo_id, list(allow_patterns or [])))
        dest = self.cache / repo_id.replace("/", "--")
        for path in sorted(self.source.rglob("*")):
            rel = path.relative_to(self.source).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dest / rel)
        return str(dest)

    def hf_hub_download(self, repo_id, filename, *, revision=None, **kwargs):
        self.calls.append(("file", repo_id, filename, revision))
        dest = self.cache / repo_id.replace("/", "--") / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.source / filename, dest)
        return str(dest)


@pytest.fixture
def hub(repo, tmp_path, monkeypatch):
    stand_in = StandIn(repo[0], tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", stand_in.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", stand_in.hf_hub_download)
    return stand_in


def test_parse_hub_source():
    assert parse_hub_source("stabilityai/stable-diffusion-xl-base-1.0") == HubRef("stabilityai/stable-diffusion-xl-base-1.0")
    assert parse_hub_source("https://huggingface.co/x/y/blob/main/f.safetensors") == HubRef("x/y", "f.safetensors", "main")
    assert parse_hub_source("https://huggingface.co/x/y/resolve/v1.0/sub/f.safetensors") == HubRef("x/y", "sub/f.safetensors", "v1.0")
    assert parse_hub_source("x/y/f.safetensors") == HubRef("x/y", "f.safetensors")
    assert parse_hub_source("./local/model.safetensors") is None
    assert parse_hub_source("/abs/model.safetensors") is None
    assert parse_hub_source("model.safetensors") is None


def test_repo_snapshot_fetches_only_what_loading_needs(hub, repo):
    bundle = load_model("stabilityai/tiny-xl")
    assert bundle.family == "tiny-sdxl"
    assert torch.equal(bundle.unet.state_dict()["out.2.weight"], repo[1].unet.state_dict()["out.2.weight"])
    fetched = {p.relative_to(hub.cache).as_posix() for p in hub.cache.rglob("*") if p.is_file()}
    assert "stabilityai--tiny-xl/unet/diffusion_pytorch_model.safetensors" in fetched
    assert not any(f.endswith((".bin", ".onnx", ".fp16.safetensors", "tiny_xl_base.safetensors")) for f in fetched)
    assert len(hub.calls) == 1


def test_half_dtype_prefers_fp16_variant_and_falls_back(hub, repo):
    bundle = load_model("stabilityai/tiny-xl", dtype=torch.float16)
    fetched = {p.name for p in (hub.cache / "stabilityai--tiny-xl" / "unet").iterdir()}
    assert "diffusion_pytorch_model.fp16.safetensors" in fetched
    assert "diffusion_pytorch_model.safetensors" not in fetched
    # the other components have no fp16 variant: a second, targeted snapshot fetches their plain weights
    assert len(hub.calls) == 2 and not any("unet/" in p for p in hub.calls[1][2] if "safetensors" in p)
    assert bundle.vae.dtype == torch.float16
    assert torch.equal(bundle.vae.state_dict()["quant_conv.bias"], repo[1].vae.state_dict()["quant_conv.bias"].half())


@pytest.mark.parametrize("source", ["https://huggingface.co/stabilityai/tiny-xl/blob/main/tiny_xl_base.safetensors",
                                    "stabilityai/tiny-xl/tiny_xl_base.safetensors"])
def test_single_file_from_hub(hub, repo, source):
    bundle = load_model(source)
    assert hub.calls[0][:3] == ("file", "stabilityai/tiny-xl", "tiny_xl_base.safetensors")
    assert torch.equal(bundle.vae.state_dict()["quant_conv.bias"], repo[1].vae.state_dict()["quant_conv.bias"])


class FakeResponse:
    status_code = 401
    headers: dict = {}
    request = None
    text = ""

    def json(self):
        return {}


@pytest.mark.parametrize(
    "exc,pattern",
    [
        (hf_errors.LocalEntryNotFoundError("not cached"), "unreachable .*HF_HUB_OFFLINE.*not in the local cache"),
        (hf_errors.OfflineModeIsEnabled("offline"), "unreachable"),
        (ConnectionError("no route"), "unreachable"),
        (hf_errors.GatedRepoError("gated", response=FakeResponse()), "gated or needs authorisation.*huggingface-cli login"),
        (hf_errors.HfHubHTTPError("forbidden", response=FakeResponse()), "gated or needs authorisation"),
        (hf_errors.RepositoryNotFoundError("nope", response=type("R404", (FakeResponse,), {"status_code": 404})()),
         "does not exist or is private"),
    ],
)
def test_hub_failures_are_one_clear_sentence(monkeypatch, exc, pattern):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    for source in ("someone/some-model", "someone/some-model/model.safetensors"):
        with pytest.raises(ModelLoadError, match=pattern) as e:
            load_model(source)
        assert str(e.value).startswith(f"cannot download {source}") and "\n" not in str(e.value)


def test_repo_without_model_index(monkeypatch, tmp_path):
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline repository.*<file>.safetensors"):
        load_model("someone/single-file-repo")


def test_vae_override_from_a_component_repo(hub, repo):
    """`vae="user/vae-repo"`: a repo with config.json + weights at its root (like the fp16-fix VAE)."""
    hub.source = repo[0] / "vae"  # the stand-in serves the pipeline's vae/ folder as a repo root
    bundle = load_model(repo[0], vae="someone/fixed-vae", dtype=torch.float16)
    patterns = hub.calls[0][2]
    assert "config.json" in patterns and not any(p.startswith(("unet/", "text_encoder")) for p in patterns)
    assert torch.equal(bundle.vae.state_dict()["quant_conv.bias"], repo[1].vae.state_dict()["quant_conv.bias"].half())
