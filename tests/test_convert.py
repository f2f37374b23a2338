"""`python -m trainer convert` and the writers behind it (`save_single_file`, `save_diffusers`).

- diffusers folder -> single file -> diffusers folder is bit-exact for every tensor and config;
- full-size SDXL / SD1.5 bundles (built on meta) give exactly the reference single-file key set;
- folders we write load in diffusers / transformers (the test-only oracles) with equal outputs.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import models
from models.bundle import build_model
from models.checkpoints.diffusers_folder import save_diffusers
from models.checkpoints.single_file import save_single_file, single_file_state_dict
from trainer.__main__ import main as cli

FIXTURES = Path(__file__).parent / "fixtures"



def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                out[f"{path.parent.name}/{key}"] = f.get_tensor(key)
    return out


def configs_of(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))}


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_full_size_single_file_has_reference_key_set(family):
    expected = {}
    for line in (FIXTURES / f"{family}_single_file_expected_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        expected[key] = json.loads(shape)
    got = {k: list(v.shape) for k, v in single_file_state_dict(build_model(family, device="meta")).items()}
    assert got == expected


@pytest.mark.parametrize("family,dtype", [("tiny-sdxl", torch.float16), ("tiny-sd15", torch.float32)])
def test_folder_to_single_file_to_folder_is_bit_exact(tmp_path, family, dtype):
    bundle = build_model(family, dtype=dtype, seed=3)
    src = save_diffusers(bundle, tmp_path / "src")
    assert cli(["convert", str(src), str(tmp_path / "model.safetensors")]) == 0
    assert cli(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "back")]) == 0
    a, b = tensors_of(src), tensors_of(tmp_path / "back")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == dtype and torch.equal(a[key], b[key]), key
    assert configs_of(src) == configs_of(tmp_path / "back")
    # the single file itself holds the bundle's weights under ldm names
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        conv_in = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert torch.equal(conv_in, bundle.unet.state_dict()["input_blocks.0.0.weight"])


def test_convert_dtype_force_and_errors(tmp_path, capsys):
    bundle = build_model("tiny-sd15", seed=4)
    path = save_single_file(bundle, tmp_path / "m.safetensors")
    assert cli(["convert", str(path), str(tmp_path / "half.safetensors"), "--dtype", "fp16"]) == 0
    half = models.load_model(tmp_path / "half.safetensors")
    assert half.unet.dtype == torch.float16
    assert torch.equal(half.unet.state_dict()["out.2.weight"], bundle.unet.state_dict()["out.2.weight"].half())
    assert cli(["convert", str(path), str(tmp_path / "half.safetensors")]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert cli(["convert", str(path), str(tmp_path / "half.safetensors"), "--force", "--dtype", "bf16"]) == 0
    assert cli(["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors")]) == 2


def test_pickle_converts_only_with_allow_pickle(tmp_path, capsys):
    from models.checkpoints.single_file import single_file_state_dict as sfsd

    bundle = build_model("tiny-sd15", seed=5)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: v.clone() for k, v in sfsd(bundle).items()}, "global_step": 1}, ckpt)
    assert cli(["convert", str(ckpt), str(tmp_path / "m.safetensors")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert cli(["convert", str(ckpt), str(tmp_path / "m.safetensors"), "--allow-pickle"]) == 0
    loaded = models.load_model(tmp_path / "m.safetensors")
    assert torch.equal(loaded.vae.state_dict()["decoder.conv_out.bias"], bundle.vae.state_dict()["decoder.conv_out.bias"])


def test_written_folder_loads_in_diffusers_and_transformers(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from models.unet import sdxl_vector

    bundle = build_model("tiny-sdxl", seed=6)
    folder = save_diffusers(bundle, tmp_path / "pipe")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 96, generator=gen)
    pooled, time_ids = torch.randn(1, 64, generator=gen), torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    ids = bundle.tokenizers[1](["a red fox"])

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        want = unet(x, 500, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        assert rel(bundle.unet(x, torch.tensor([500]), ctx, y=sdxl_vector(pooled, time_ids)), want.sample) <= 1e-5
        z = torch.randn(1, 4, 4, 4, generator=gen)
        assert rel(bundle.vae.decode(z), vae.decode(z).sample) <= 1e-5
        assert rel(bundle.text_encoders[1](ids).pooled, te2(ids).text_embeds) <= 1e-5
    # and our loader reads it back with the same family and tokenizer padding
    again = models.load_model(folder)
    assert again.family == "tiny-sdxl" and [t.pad_token_id for t in again.tokenizers] == [49407, 0]
