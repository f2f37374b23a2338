"""Non-finite weights (NaN / inf) are refused wherever weights are read: a LoRA file in `generate`,
`lora merge`, `lora resize` and `models.load_lora`; a reported finding in `lora inspect`; the LoRA
weights or optimizer state of a checkpoint on resume; a base checkpoint's tensors on load. Each
refusal is one line naming the file and the first module/tensor affected.

The damaged files are made by the test: a good file is read, one tensor gets a NaN (or an inf),
and it is written back with its metadata.
"""
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import models
import trainer.__main__ as cli
from models.checkpoints.loading import ModelLoadError, load_model
from models.lora.files import LoRAFileError
from trainer.checkpoint import CheckpointError, CheckpointManager


# The tensor that gets the NaN: a mid-network up weight, so "first module" is not trivially the first key.
POISONED = "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _poison(src: Path, dst: Path, key: str, value: float = float("nan")) -> Path:
    tensors, metadata = _read(src)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[tensors[key].numel() // 2] = value
    save_file(tensors, str(dst), metadata=metadata)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from models.checkpoints.single_file import save_single_file

    out = tmp_path_factory.mktemp("finite")
    bundle = models.build_model("tiny-sdxl", seed=3)
    paths = {"model": save_single_file(bundle, out / "tiny_sdxl.safetensors")}
    network = models.inject_lora(bundle, unet="kohya", rank=4)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.01)
    paths["lora"] = out / "good.safetensors"
    network.save(paths["lora"])
    tensors, _ = _read(paths["lora"])
    assert f"{POISONED}.lora_up.weight" in tensors, sorted(tensors)[:5]
    paths["nan_lora"] = _poison(paths["lora"], out / "nan.safetensors", f"{POISONED}.lora_up.weight")
    paths["inf_lora"] = _poison(paths["lora"], out / "inf.safetensors", f"{POISONED}.lora_down.weight", float("inf"))
    return paths


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- LoRA files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["nan_lora", "inf_lora"])
def test_generate_refuses_a_non_finite_lora(files, tmp_path, capsys, which):
    out = tmp_path / "images"
    code = cli.main(["generate", "--model", "tiny-sdxl", "--lora", str(files[which]), "--prompt", "a red circle",
                     "--steps", "1", "--size", "64", "--out", str(out), "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert str(files[which]) in line and f"first {POISONED} " in line and "non-finite" in line, line
    assert not out.exists() or not any(out.iterdir())


def test_load_lora_refuses_a_non_finite_lora(files):
    bundle = models.build_model("tiny-sdxl", device="meta")
    with pytest.raises(LoRAFileError, match=rf"nan\.safetensors: non-finite .* first {POISONED} .*1 NaN, 0 inf"):
        models.load_lora(bundle, files["nan_lora"])
    models.load_lora(bundle, files["lora"])  # the good file loads


def test_inspect_reports_non_finite_values_as_a_finding(files, capsys):
    assert cli.main(["lora", "inspect", str(files["lora"]), "--family", "tiny-sdxl"]) == 0
    assert "values: all finite" in capsys.readouterr().out
    code = cli.main(["lora", "inspect", str(files["nan_lora"]), "--family", "tiny-sdxl"])
    out = capsys.readouterr().out
    assert code == 1
    assert "values: NOT FINITE in 1 of" in out and f"{POISONED}.lora_up.weight: 1 NaN, 0 inf" in out, out
    assert "key check against tiny-sdxl: all" in out  # the rest of the report is still there


def test_merge_refuses_a_non_finite_lora_before_loading_the_model(files, tmp_path, capsys, monkeypatch):
    import models.checkpoints.loading as loading

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded before the LoRA was checked")

    monkeypatch.setattr(loading, "load_model", no_model)
    out = tmp_path / "merged.safetensors"
    code = cli.main(["lora", "merge", "--model", str(files["model"]), "--lora", str(files["lora"]),
                     "--lora", f"{files['nan_lora']}:0.5", "--out", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and str(files["nan_lora"]) in line and f"first {POISONED} " in line, line
    assert not out.exists()


def test_resize_refuses_a_non_finite_lora(files, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    code = cli.main(["lora", "resize", str(files["inf_lora"]), "--rank", "2", "--out", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and str(files["inf_lora"]) in line and "0 NaN, 1 inf" in line, line
    assert not out.exists()


# ---- base checkpoints ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["zero-copy", "converted"])
def test_a_base_checkpoint_with_nan_weights_is_refused(files, tmp_path, dtype):
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    bad = _poison(files["model"], tmp_path / "nan_model.safetensors", key)
    with pytest.raises(ModelLoadError, match=rf"nan_model\.safetensors: tensor '{key}' holds non-finite values "
                                             r"\(1 NaN, 0 inf\)"):
        load_model(bad, dtype=dtype)
    load_model(files["model"], dtype=dtype)


def test_a_weight_beyond_fp16_range_is_refused_when_converting(files, tmp_path):
    key = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    big = _poison(files["model"], tmp_path / "big.safetensors", key, 1e6)
    load_model(big)  # fp32 holds it
    with pytest.raises(ModelLoadError, match=rf"tensor '{key}' has values beyond the range of torch.float16"):
        load_model(big, dtype=torch.float16)


# ---- training checkpoints -------------------------------------------------------------------------------------
def _checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor]) -> Path:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return CheckpointManager(root).save(step, weights=weights, optimizer=opt, scheduler=sched,
                                        trainer_state={"data": {}})


def test_resume_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    good = {"unet.a.lora_down.weight": torch.randn(2, 3), "unet.a.lora_up.weight": torch.zeros(3, 2)}
    _checkpoint(tmp_path, 2, good)
    bad = _checkpoint(tmp_path, 4, {k: v.clone() for k, v in good.items()})
    weights = load_file(str(bad / "adapter.safetensors"))
    weights["unet.a.lora_up.weight"][1, 1] = float("nan")
    save_file(weights, str(bad / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match=r"step-00000004 is unusable: adapter.safetensors: non-finite values "
                                              r"\(NaN/inf\) in unet.a.lora_up.weight\. Resume from the previous one "
                                              r"with train.resume=.*step-00000002"):
        CheckpointManager(tmp_path).load(bad)
    CheckpointManager(tmp_path).load(tmp_path / "step-00000002")


def test_resume_refuses_a_checkpoint_with_non_finite_optimizer_state(tmp_path):
    path = _checkpoint(tmp_path, 2, {"unet.a.lora_down.weight": torch.randn(2, 3)})
    state = torch.load(path / "optimizer.pt", weights_only=True)
    state["state"][0]["exp_avg_sq"][0] = float("inf")
    torch.save(state, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer.pt: non-finite values \(NaN/inf\) in state.0.exp_avg_sq"):
        CheckpointManager(tmp_path).load(path)


def test_training_resume_from_a_non_finite_checkpoint_fails_cleanly(tmp_path, capsys):
    """Through the CLI: exit 2, one line naming the checkpoint file and the previous checkpoint."""
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    data.mkdir()
    for img in sorted((root / "examples" / "quickstart_data").glob("*.png"))[:4]:
        shutil.copy(img, data / img.name)
    args = ["--config", str(root / "tests" / "fixtures" / "tiny_lora.yaml"), f"output.dir={tmp_path}", f"data.path={data}",
            "train.max_steps=4", "train.save_every=2", "optim.warmup_steps=0", "output.tensorboard=false",
            "train.batch_size=2"]
    assert cli.main(args) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    latest = tmp_path / "quickstart" / "checkpoints" / "step-00000004"
    weights = load_file(str(latest / "adapter.safetensors"))
    first = sorted(k for k in weights if k.endswith("lora_up.weight"))[3]
    weights[first].view(-1)[0] = float("nan")
    save_file(weights, str(latest / "adapter.safetensors"))
    capsys.readouterr()
    code = cli.main([*args, "train.max_steps=6", "train.resume=latest"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"step-00000004 is unusable: adapter.safetensors: non-finite values (NaN/inf) in {first}" in line, line
    assert "train.resume=" in line and "step-00000002" in line
