"""LoRA files: round trips, metadata and hashes, other spellings, and the errors users meet."""
from __future__ import annotations

import hashlib
import io
import json
import re

import pytest
import safetensors.torch
import torch

import models
from models.bundle import build_model
from models.lora.files import LoRAFileError, load_lora


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def unet_inputs(bundle, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = bundle.unet.config
    y = None if c.adm_in_channels is None else torch.randn(2, c.adm_in_channels, generator=g)
    return (torch.randn(2, c.in_channels, 8, 8, generator=g), torch.rand(2, generator=g) * 999,
            torch.randn(2, 7, c.context_dim, generator=g), y)


def trained(family, **kw):
    """A bundle with a LoRA whose weights are random (as after training)."""
    bundle = build_model(family, seed=0)
    kw = {"unet": "locon", "text_encoders": "te", "rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0, **kw}
    net = models.inject_lora(bundle, **kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for a in net.adapters().values():
            a.lora_down.weight.copy_(torch.randn(a.lora_down.weight.shape, generator=g) * 0.2)
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.2)
    return bundle, net


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_import_export_round_trip_is_bit_exact(tmp_path, dtype):
    bundle, net = trained("tiny-sdxl", dora=dtype == torch.float32)
    first = tmp_path / "a.safetensors"
    net.save(first, dtype=dtype)
    fresh = build_model("tiny-sdxl", seed=0)
    loaded = load_lora(fresh, first)
    second = tmp_path / "b.safetensors"
    loaded.save(second, dtype=dtype)
    a, b = safetensors.torch.load_file(first), safetensors.torch.load_file(second)
    # the network's own state dict is the kohya layout too (training checkpoints / resume)
    assert set(loaded.state_dict()) == set(a)
    again = load_lora(build_model("tiny-sdxl", seed=0), first)
    again.load_state_dict(net.state_dict())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in again.state_dict().items())
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]) for k in a)
    # and the loaded model computes what the trained one did (up to the file dtype)
    inputs = unet_inputs(bundle)
    with torch.no_grad():
        want, got = bundle.unet(*inputs), fresh.unet(*inputs)
    assert rel(got, want) <= (1e-6 if dtype == torch.float32 else 2e-2)


def test_file_layout_metadata_and_hashes(tmp_path):
    _, net = trained("tiny-sdxl", dora=True)
    path = tmp_path / "style.safetensors"
    meta = net.save(path, metadata={"ss_num_train_images": 12, "ss_sd_model_name": "base.safetensors"})
    tensors = safetensors.torch.load_file(path)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    for name in names:  # every module: down, up, 0-dim alpha (absent alpha would mean scale 1 in ComfyUI)
        assert tensors[f"{name}.alpha"].shape == ()
        assert f"{name}.lora_down.weight" in tensors and f"{name}.lora_up.weight" in tensors
        assert f"{name}.dora_scale" in tensors
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"].shape == (32, 2, 1, 1)
    assert float(tensors["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 1.0
    assert float(tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 2.0
    assert all(t.dtype == torch.float16 for t in tensors.values())

    with safetensors.safe_open(str(path), "pt") as f:
        on_disk = f.metadata()
    assert on_disk == meta
    assert on_disk["ss_base_model_version"] == "sdxl_base_v1-0"
    assert on_disk["ss_network_module"] == "networks.lora"
    assert on_disk["ss_network_dim"] == "4" and on_disk["ss_network_alpha"] == "2"
    assert json.loads(on_disk["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1", "dora_wd": "True"}
    assert on_disk["ss_num_train_images"] == "12" and on_disk["ss_sd_model_name"] == "base.safetensors"
    assert on_disk["modelspec.sai_model_spec"] == "1.0.1"
    assert on_disk["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert on_disk["modelspec.title"] == "style" and on_disk["modelspec.resolution"] == "64x64"
    assert on_disk["modelspec.prediction_type"] == "epsilon"
    assert re.match(r"\d{4}-\d\d-\d\dT", on_disk["modelspec.date"])

    # sshs_model_hash: sha256 of the bytes after the header (kohya's addnet_hash_safetensors)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert on_disk["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    # sshs_legacy_hash: over the file serialised with only the ss_* metadata, bytes 0x100000..+0x10000
    ss_only = safetensors.torch.save(tensors, {k: v for k, v in on_disk.items() if k.startswith("ss_")})
    assert on_disk["sshs_legacy_hash"] == hashlib.sha256(io.BytesIO(ss_only).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    assert len(on_disk["sshs_legacy_hash"]) == 8
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_failed_save_keeps_the_previous_file(tmp_path):
    _, net = trained("tiny-sd15")
    path = tmp_path / "keep.safetensors"
    net.save(path)
    before = path.read_bytes()
    meta_bundle = build_model("tiny-sd15", device="meta")
    meta_net = models.inject_lora(meta_bundle, unet="kohya", rank=4)
    with pytest.raises(ValueError, match="meta"):
        meta_net.save(path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_diffusers_underscored_sdxl_and_peft_files_import(tmp_path):
    bundle, net = trained("tiny-sdxl")
    inputs = unet_inputs(bundle)
    with torch.no_grad():
        want = bundle.unet(*inputs)
    ours = net.state_dict_for_export()
    # kohya names with the diffusers-underscored UNet spelling (other SDXL trainers write these)
    renamed = {}
    for key, t in ours.items():
        name, _, suffix = key.partition(".")
        ref = net.refs()[name]
        alias = ref.aliases[0] if ref.component == "unet" and ref.aliases else name
        renamed[f"{alias}.{suffix}"] = t
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in renamed)
    p = tmp_path / "diffusers_spelling.safetensors"
    safetensors.torch.save_file(renamed, p)
    fresh = build_model("tiny-sdxl", seed=0)
    loaded = load_lora(fresh, p)
    assert set(loaded.state_dict_for_export()) == set(ours)  # re-export uses the ldm spelling
    with torch.no_grad():
        assert rel(fresh.unet(*inputs), want) <= 1e-6
    # diffusers/PEFT layout (alpha folded into lora_B)
    peft_path = tmp_path / "peft.safetensors"
    net.save(peft_path, dtype=torch.float32, format="peft")
    keys = safetensors.torch.load_file(peft_path)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight" in keys
    fresh = build_model("tiny-sdxl", seed=0)
    load_lora(fresh, peft_path)
    with torch.no_grad():
        assert rel(fresh.unet(*inputs), want) <= 1e-6


def test_keys_that_match_no_module_are_errors_not_skips(tmp_path):
    _, net = trained("tiny-sd15", text_encoders=None)
    tensors = net.state_dict_for_export()
    tensors["lora_unet_no_such_block_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_block_proj_in.lora_up.weight"] = torch.zeros(8, 4)
    tensors["lora_unet_no_such_block_proj_in.alpha"] = torch.tensor(4.0)
    tensors["something_else.weight"] = torch.zeros(3)
    p = tmp_path / "extra.safetensors"
    safetensors.torch.save_file(tensors, p)
    fresh = build_model("tiny-sd15", seed=0)
    with pytest.raises(LoRAFileError, match=r"extra\.safetensors: 2 LoRA key") as err:
        load_lora(fresh, p)
    assert "lora_unet_no_such_block_proj_in (no such module)" in str(err.value)
    assert "something_else.weight (not a LoRA weight)" in str(err.value)
    assert not any("LoRA" in type(m).__name__ for m in fresh.unet.modules())
    with pytest.warns(UserWarning, match="2 LoRA key"):
        loose = load_lora(fresh, p, strict=False)
    assert len(loose.adapters()) == len(net.adapters())


def test_wrong_shape_and_wrong_family_and_unsupported_types(tmp_path):
    _, xl = trained("tiny-sdxl")
    p = tmp_path / "xl.safetensors"
    xl.save(p)
    sd15 = build_model("tiny-sd15", seed=0)
    with pytest.raises(LoRAFileError, match=r"xl\.safetensors is an SDXL LoRA .* but the model is 'tiny-sd15'"):
        load_lora(sd15, p)
    _, sd = trained("tiny-sd15", text_encoders=None)
    tensors = sd.state_dict_for_export()
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    tensors[key] = torch.zeros(4, 7)
    p2 = tmp_path / "shape.safetensors"
    safetensors.torch.save_file(tensors, p2)
    with pytest.raises(LoRAFileError, match=r"shapes down \[4, 7\]"):
        load_lora(sd15, p2)
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}
    p3 = tmp_path / "loha.safetensors"
    safetensors.torch.save_file(tensors, p3)
    with pytest.raises(LoRAFileError, match="incomplete loha adapter: missing hada_w1_b, hada_w2_a, hada_w2_b"):
        load_lora(sd15, p3)
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": torch.zeros(2, 2, 2)}
    safetensors.torch.save_file(tensors, p3)
    with pytest.raises(LoRAFileError, match="adapter type"):
        load_lora(sd15, p3)


def test_truncated_or_missing_file_names_the_file(tmp_path):
    _, net = trained("tiny-sd15", text_encoders=None)
    p = tmp_path / "cut.safetensors"
    net.save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    fresh = build_model("tiny-sd15", seed=0)
    with pytest.raises(LoRAFileError, match=r"cut\.safetensors .*truncated or corrupt"):
        load_lora(fresh, p)
    with pytest.raises(LoRAFileError, match="does not exist"):
        load_lora(fresh, tmp_path / "nope.safetensors")
