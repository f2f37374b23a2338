"""Every bad input to `models.load_model` fails with one clear ModelLoadError naming the file."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file as oracle_save

from models.bundle import build_model
from models.checkpoints.loading import ModelLoadError, load_model
from models.checkpoints.single_file import save_single_file, single_file_state_dict


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15") / "tiny_sd15.safetensors"
    return save_single_file(build_model("tiny-sd15", seed=1), path)


@pytest.fixture(scope="module")
def sd15_state():
    return {k: v.clone() for k, v in single_file_state_dict(build_model("tiny-sd15", seed=1)).items()}


def test_wrong_family(sd15_file):
    with pytest.raises(ModelLoadError, match=r"is an SD1\.5 checkpoint .*family='sdxl'.*family='sd15'") as e:
        load_model(sd15_file, family="sdxl")
    assert str(sd15_file) in str(e.value)
    with pytest.raises(ModelLoadError, match="unknown family 'sdxxl'"):
        load_model(sd15_file, family="sdxxl")


def test_lora_passed_as_model(tmp_path):
    lora = {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(4, 32),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(32, 4),
        "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "style_lora.safetensors"
    oracle_save(lora, str(path))
    with pytest.raises(ModelLoadError, match="LoRA.*not a model.*load_lora") as e:
        load_model(path)
    assert "style_lora.safetensors" in str(e.value) and "supported" in str(e.value)


@pytest.mark.parametrize(
    "keys,what",
    [
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "Stable Diffusion 3"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
        (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "Flux"),
        (["conditioner.embedders.0.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight"], "refiner"),
        (["encoder.layer.0.attention.weight", "pooler.dense.weight"], "no SD UNet"),
    ],
)
def test_unsupported_architectures(tmp_path, keys, what):
    path = tmp_path / "other.safetensors"
    oracle_save({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(ModelLoadError, match=what) as e:
        load_model(path)
    message = str(e.value)
    assert str(path) in message and "SD1.5, SD2.x and SDXL" in message and "\n" not in message


def test_truncated_and_corrupt_files(sd15_file, tmp_path):
    data = sd15_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors is truncated: tensor .* ends at byte \d+ but the file"):
        load_model(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    with pytest.raises(ModelLoadError, match="tiny.safetensors is not a safetensors file"):
        load_model(tiny)
    header_cut = tmp_path / "header.safetensors"
    header_cut.write_bytes(data[:100])
    with pytest.raises(ModelLoadError, match="header length .* does not fit"):
        load_model(header_cut)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 2  # inconsistent with dtype x shape
    raw = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(ModelLoadError, match=f"bad.safetensors: tensor '{name}' claims bytes"):
        load_model(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 10)
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(garbage)


def test_missing_unexpected_and_misshaped_tensors(sd15_state, tmp_path):
    state = dict(sd15_state)
    for key in [k for k in state if ".out_layers.3." in k][:6]:
        del state[key]
    path = tmp_path / "pruned.safetensors"
    oracle_save(state, str(path))
    with pytest.raises(ModelLoadError, match=r"pruned\.safetensors does not match the SD1\.5 model \(6 missing: "
                                             r"model\.diffusion_model\..*out_layers\.3.*pruned or partial"):
        load_model(path)

    state = dict(sd15_state)
    state["model.diffusion_model.mystery.weight"] = torch.zeros(3)
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1, 3, 3, 3)
    path = tmp_path / "odd.safetensors"
    oracle_save(state, str(path))
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    message = str(e.value)
    assert "1 unexpected: model.diffusion_model.mystery.weight" in message
    assert "1 wrong shape: first_stage_model.encoder.conv_in.weight [1, 3, 3, 3] vs model [32, 3, 3, 3]" in message
    assert "wrong family" in message


def test_diffusers_folder_problems(tmp_path):
    from models.checkpoints.diffusers_folder import save_diffusers

    folder = save_diffusers(build_model("tiny-sd15", seed=2), tmp_path / "pipe")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"unet has no \.safetensors weights.*incomplete"):
        load_model(folder)
    torch.save({}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights.*--allow-pickle"):
        load_model(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="is a StableDiffusion3Pipeline pipeline; supported"):
        load_model(folder)
    with pytest.raises(ModelLoadError, match="folder without model_index.json"):
        load_model(folder / "vae")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere" / "model.safetensors")


def test_pickle_refused_by_default_and_weights_only_when_allowed(sd15_state, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd15_state, "global_step": 7}, ckpt)
    with pytest.raises(ModelLoadError, match=r"pickle checkpoint.*python -m trainer convert .*--allow-pickle"):
        load_model(ckpt)
    bundle = load_model(ckpt, allow_pickle=True)
    assert torch.equal(bundle.unet.state_dict()["out.2.bias"], sd15_state["model.diffusion_model.out.2.bias"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": Evil()}}, evil)
    with pytest.raises(ModelLoadError, match="weights-only"):
        load_model(evil, allow_pickle=True)
