"""`python -m trainer lora inspect|merge|resize` on tiny models and files."""
from __future__ import annotations

import safetensors.torch
import torch

import models
from models.bundle import build_model
from models.lora.files import load_lora
from trainer.__main__ import main


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def trained_file(tmp_path, family="tiny-sdxl", name="lora.safetensors", seed=7, **kw):
    bundle = build_model(family, seed=0)
    kw = {"unet": "locon", "text_encoders": "te", "rank": 6, "alpha": 3.0, "conv_rank": 4, "conv_alpha": 2.0, **kw}
    net = models.inject_lora(bundle, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in net.adapters().values():
            a.lora_down.weight.copy_(torch.randn(a.lora_down.weight.shape, generator=g) * 0.2)
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.2)
    path = tmp_path / name
    net.save(path, dtype=torch.float32)
    return path, bundle, net


def unet_inputs(bundle):
    g = torch.Generator().manual_seed(1)
    c = bundle.unet.config
    y = None if c.adm_in_channels is None else torch.randn(2, c.adm_in_channels, generator=g)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5.0, 900.0]),
            torch.randn(2, 7, c.context_dim, generator=g), y)


def test_inspect_summarises_and_checks_keys(tmp_path, capsys):
    path, _, net = trained_file(tmp_path, dora=True)
    assert main(["lora", "inspect", str(path), "--family", "tiny-sdxl"]) == 0
    out = capsys.readouterr().out
    assert f"{len(net.adapters())} modules" in out
    assert "family guess: sdxl (it has two text encoders" in out
    assert "DoRA: yes" in out
    assert "lora_unet_input_blocks_1" in out and "rank 4" in out and "(2 conv 3x3)" in out
    assert "ss_network_dim: 6" in out and "modelspec.architecture: stable-diffusion-xl-v1-base/lora" in out
    assert "sshs_model_hash: matches the tensor data" in out
    assert f"key check against tiny-sdxl: all {len(net.adapters())} modules match" in out
    # the same file checked against another family fails with the reason, exit code 1
    assert main(["lora", "inspect", str(path), "--family", "tiny-sd15"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_inspect_of_a_broken_file_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["lora", "inspect", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err


def test_merge_writes_a_checkpoint_equal_to_the_live_loras(tmp_path, capsys):
    from models.checkpoints.loading import load_model
    from models.checkpoints.single_file import save_single_file

    base = build_model("tiny-sd15", seed=0)
    base_path = tmp_path / "base.safetensors"
    save_single_file(base, base_path)
    a, _, _ = trained_file(tmp_path, "tiny-sd15", "a.safetensors", seed=1)
    b, _, _ = trained_file(tmp_path, "tiny-sd15", "b.safetensors", seed=2, unet="kohya", text_encoders=None)
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--model", str(base_path), "--lora", f"{a}:0.7", "--lora", str(b),
                 "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    merged = load_model(out, family="tiny-sd15")
    live = build_model("tiny-sd15", seed=0)
    load_lora(live, a, strength=0.7)
    load_lora(live, b)
    inputs = unet_inputs(live)
    ids = torch.randint(0, 49406, (2, 77))
    ids[:, 0], ids[:, 9:] = 49406, 49407
    with torch.no_grad():
        assert rel(merged.unet(*inputs), live.unet(*inputs)) <= 1e-5
        assert rel(merged.text_encoders[0](ids).last_hidden_state, live.text_encoders[0](ids).last_hidden_state) <= 1e-5
        assert rel(merged.unet(*inputs), base.unet(*inputs)) > 1e-2
    assert main(["lora", "merge", "--model", str(base_path), "--lora", str(a), "--out", str(out)]) == 2  # exists


def test_resize_keeps_the_update_when_the_rank_allows_and_truncates_optimally(tmp_path, capsys):
    path, _, _ = trained_file(tmp_path, "tiny-sd15")
    src = safetensors.torch.load_file(path)

    def delta(t, name):
        down, up = t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1)) * (t[f"{name}.alpha"].item() / down.shape[0])

    same = tmp_path / "same.safetensors"
    assert main(["lora", "resize", str(path), "--rank", "6", "--conv-rank", "4", "--out", str(same)]) == 0
    small = tmp_path / "small.safetensors"
    assert main(["lora", "resize", str(path), "--rank", "2", "--out", str(small)]) == 0
    assert "resized" in capsys.readouterr().out
    full, cut = safetensors.torch.load_file(same), safetensors.torch.load_file(small)
    names = {k.split(".")[0] for k in src}
    assert {k.split(".")[0] for k in cut} == names
    for name in names:
        d = delta(src, name)
        assert rel(delta(full, name), d) <= 1e-5  # rank kept: same update, alpha = rank
        assert cut[f"{name}.lora_down.weight"].shape[0] == 2 and cut[f"{name}.alpha"].item() == 2.0
        s = torch.linalg.svdvals(d)
        best = s[2:].square().sum().sqrt() / s.square().sum().sqrt()  # Eckart-Young optimum
        assert abs(rel(delta(cut, name), d) - best.item()) <= 1e-4
    with safetensors.safe_open(str(small), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2"
    # the resized file loads into the model like any other
    load_lora(build_model("tiny-sd15", seed=0), small)
