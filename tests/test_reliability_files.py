"""Bad model and LoRA files on the command line: a truncated .safetensors, a LoRA given as the base
model, a base model of the wrong family, a LoRA of another family given to `generate`, and a
pickle `.ckpt` each end the real `python -m trainer` process with exit code 2 and one `error:`
line naming the file, and no traceback (tracebacks only with --debug). The processes run
concurrently (they are mostly interpreter start-up).
"""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import trainer.__main__ as cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "tests" / "fixtures" / "tiny_lora.yaml"
TRAIN = ["--config", str(QUICKSTART), "train.max_steps=2", "optim.warmup_steps=0", "output.tensorboard=false",
         "data.num_workers=0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Base models and LoRAs of the tiny families, and broken variants of them."""
    import models
    from models.checkpoints.single_file import save_single_file, single_file_state_dict

    out = tmp_path_factory.mktemp("files")
    sd15 = models.build_model("tiny-sd15", seed=1)
    paths = {"sd15": save_single_file(sd15, out / "tiny_sd15.safetensors")}
    data = paths["sd15"].read_bytes()
    paths["truncated"] = out / "truncated.safetensors"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["ckpt"] = out / "tiny_sd15.ckpt"
    torch.save({"state_dict": single_file_state_dict(sd15)}, paths["ckpt"])
    paths["lora"] = out / "sd15_style.safetensors"  # kohya layout, ss_base_model_version=sd_v1
    models.inject_lora(sd15, unet="kohya", rank=4).save(paths["lora"])
    data_dir = out / "data"
    data_dir.mkdir()
    for img in sorted((ROOT / "examples" / "quickstart_data").glob("*.png"))[:4]:
        shutil.copy(img, data_dir / img.name)
    paths["data"] = data_dir
    return paths


CASES = {
    "truncated-model": (lambda f, o: [*TRAIN, f"output.dir={o}", f"data.path={f['data']}",
                                      f"model.source={f['truncated']}"], "truncated", "is truncated"),
    "lora-as-model": (lambda f, o: [*TRAIN, f"output.dir={o}", f"data.path={f['data']}", f"model.source={f['lora']}"],
                      "lora", "is a LoRA"),
    "wrong-family": (lambda f, o: [*TRAIN, f"output.dir={o}", f"data.path={f['data']}", f"model.source={f['sd15']}",
                                   "model.family=tiny-sdxl"], "sd15", "is an SD1.5 checkpoint"),
    "pickle-model": (lambda f, o: [*TRAIN, f"output.dir={o}", f"data.path={f['data']}", f"model.source={f['ckpt']}"],
                     "ckpt", "pickle"),
    "foreign-lora-generate": (lambda f, o: ["generate", "--model", "tiny-sdxl", "--lora", str(f["lora"]),
                                            "--prompt", "a red circle", "--steps", "1", "--size", "64",
                                            "--out", str(o)], "lora", "is an SD1.5 LoRA"),
}


@pytest.fixture(scope="module")
def results(files, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")

    def run(name):
        out = tmp_path_factory.mktemp(name)
        args = CASES[name][0](files, out)
        proc = subprocess.run([sys.executable, "-m", "trainer", *args], check=False, cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        return name, (proc, out)

    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(run, CASES))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_gets_one_clear_error_and_no_traceback(files, results, case):
    proc, out = results[case]
    _, key, phrase = CASES[case]
    err = proc.stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert str(files[key]) in errors[0] and phrase in errors[0], errors[0]
    assert not list(out.rglob("checkpoints")) and not list(out.rglob("*.png"))  # nothing was trained or drawn


def test_debug_shows_the_traceback(files, tmp_path):
    """--debug re-raises instead of printing one line (in-process: the exception propagates)."""
    from models.checkpoints.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="is truncated"):
        cli.main(["--debug", *TRAIN, f"output.dir={tmp_path}", f"data.path={files['data']}",
                  f"model.source={files['truncated']}"])


def test_allowed_pickle_that_runs_code_is_still_refused(files, tmp_path, capsys):
    """`model.allow_pickle: true` unpickles weights only: a .ckpt whose pickle would run code is refused."""

    class Payload:
        def __reduce__(self):
            import os

            return (os.mkdir, (str(tmp_path / "payload-ran"),))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": Payload()}}, evil)
    rc = cli.main([*TRAIN, f"output.dir={tmp_path / 'out'}", f"data.path={files['data']}",
                   f"model.source={evil}", "model.allow_pickle=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "weights-only" in err and str(evil) in err, err
    assert not (tmp_path / "payload-ran").exists()
