"""Training LoHa and LoKr through the recipe on the tiny SDXL-shaped model: the run trains, an
interrupted run resumed from its checkpoint equals the uninterrupted one (rank and module dropout
on, so the resumed random streams matter), and the exported LyCORIS file reproduces the trained
network when loaded back."""
import json
import signal

import pytest
import torch
from safetensors import safe_open
from test_lycoris import outputs, rel, sdxl_or_sd_inputs
from training_runs import TINY_LORA, copy_quickstart_images

from models.lora.files import load_lora
from trainer.config import load_config
from trainer.recipe import LoRATrainingRecipe

FAST = ["data.num_workers=0", "data.cache_latents=true", "data.cache_text=true", "output.tensorboard=false",
        "train.log_every=1", "optim.warmup_steps=0", "train.batch_size=2", "train.max_steps=4",
        "train.save_every=0", "output.export_dtype=fp32", "lora.rank_dropout=0.1", "lora.module_dropout=0.2"]
ALGOS = {
    "loha": ["lora.algo=loha", "lora.rank=4", "lora.alpha=2", "lora.use_tucker=true"],
    "lokr": ["lora.algo=lokr", "lora.rank=2", "lora.alpha=4", "lora.factor=4", "lora.decompose_both=true"],
}

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return copy_quickstart_images(tmp_path_factory.mktemp("data"), 4)


def _config(out, data, algo, *extra):
    return load_config(TINY_LORA, [f"output.dir={out}", f"data.path={data}", *FAST, *ALGOS[algo], *extra])


@pytest.mark.parametrize("algo", list(ALGOS))
def test_lycoris_training_resumes_exactly_and_exports_a_loadable_file(tmp_path, small_data, algo):
    full = LoRATrainingRecipe(_config(tmp_path / "a", small_data, algo))
    summary = full.run()
    assert summary.completed and len(summary.losses) == 4
    adapters = full.network.adapters()
    assert {a.algo for a in adapters.values()} == {algo}
    assert all(torch.count_nonzero(a.delta_weight()) > 0 for a in adapters.values())  # every update moved

    part = LoRATrainingRecipe(_config(tmp_path / "b", small_data, algo))
    part.setup()
    step_fn = part._train_step

    def interrupted_step(batches):
        step_fn(batches)
        if part.step == 1:  # the second step is running: Ctrl-C arrives now
            signal.raise_signal(signal.SIGINT)

    part._train_step = interrupted_step
    part_summary = part.train()
    assert not part_summary.completed and part_summary.checkpoint.name == "step-00000002"
    resumed = LoRATrainingRecipe(_config(tmp_path / "b", small_data, algo, "train.resume=latest"))
    resumed_summary = resumed.run()
    assert resumed_summary.completed and resumed_summary.start_step == 2
    assert part_summary.losses + resumed_summary.losses == summary.losses
    want, got = full.network.state_dict(), resumed.network.state_dict()
    assert want.keys() == got.keys() and any(".hada_" in k or ".lokr_" in k for k in want)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), key

    # the exported file: LyCORIS metadata, and it loads back to the trained function
    with safe_open(str(summary.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == algo
    bundle = full.bundle
    bundle.unet.eval()
    full.network.eval()
    data = [t.to(full.device) if isinstance(t, torch.Tensor) else t for t in sdxl_or_sd_inputs(bundle)]
    trained = outputs(bundle, *data)
    full.network.remove()
    base = outputs(bundle, *data)
    load_lora(bundle, summary.lora_path)
    assert rel(trained, base) > 1e-4
    assert rel(outputs(bundle, *data), trained) <= 1e-5


def test_bench_times_each_algorithm_with_its_adapter_size(capsys):
    from trainer.bench.train import (
        BenchConfig,
        BenchError,
        adapter_file_bytes,
        bench_train,
        print_train,
    )

    cfg = BenchConfig(family="tiny-sdxl", steps=1, warmup=0, algo=("lora", "loha", "lokr"), device="cpu")
    device = torch.device("cpu")
    r = bench_train(cfg, device, torch.float32)
    rows = {row["algo"]: row for row in r["rows"]}
    assert list(rows) == ["lora", "loha", "lokr"] and all(row["s_per_step"] > 0 for row in rows.values())
    # LoHa: two rank-16 pairs per module, twice LoRA's parameters; each row's size is its own network's
    assert rows["loha"]["lora_params"] == 2 * rows["lora"]["lora_params"]
    import models

    bundle = models.build_model("tiny-sdxl", device="meta")
    net = models.inject_lora(bundle, unet="kohya", rank=16, algo="lokr")
    assert rows["lokr"]["file_mib"] * 2**20 == adapter_file_bytes(net)
    print_train(r, device)
    assert "ours lokr" in capsys.readouterr().out
    with pytest.raises(BenchError, match="--compare diffusers: PEFT's counterpart is plain LoRA"):
        bench_train(BenchConfig(family="tiny-sdxl", algo=("loha",), compare="diffusers"), device, torch.float32)
