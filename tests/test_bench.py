"""Smoke tests of `python -m trainer bench` on CPU with the tiny SDXL family (no timing asserts)."""
import contextlib
import io
import json

import pytest

from trainer.__main__ import main


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """One `bench --compare diffusers` run (1 warm-up + 2 timed steps per model): stdout and JSON."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["bench", "--family", "tiny-sdxl", "--steps", "2", "--warmup", "1", "--compare", "diffusers",
                   "--threads", "1", "--json", str(out)])
    return rc, buffer.getvalue(), json.loads(out.read_text())


def test_compare_prints_table_for_both_models(compare_run):
    rc, stdout, _ = compare_run
    assert rc == 0, stdout
    assert "ours (lorasmith)" in stdout and "diffusers+PEFT" in stdout
    assert "ours/diffusers: step time" in stdout
    assert "% peak" in stdout and "n/a" in stdout  # no stated peak on CPU


def test_compare_uses_same_network_weights_and_lora(compare_run):
    _, _, r = compare_run
    train = r["train"]
    ours, ref = train["rows"]
    # Same modules adapted and same adapter weights: the outputs agree to fp32 rounding.
    assert ours["lora_modules"] == ref["lora_modules"] > 0
    assert ours["lora_params"] == ref["lora_params"]
    assert train["parity_rel_diff"] < 1e-5
    assert len(ours["times"]) == len(ref["times"]) == 2


def test_figures_are_consistent(compare_run):
    _, _, r = compare_run
    train = r["train"]
    assert train["res"] == 64 and train["batch"] == 1 and train["flop_factor"] == 3
    assert train["forward_gflop"] > 0
    for row in train["rows"]:
        assert row["s_per_step"] > 0 and row["pct_peak"] is None
        assert row["tflops"] == pytest.approx(3 * train["forward_gflop"] * 1e9 / row["s_per_step"] / 1e12)
        assert row["images_per_s"] == pytest.approx(1 / row["s_per_step"])
        assert row["peak_mem_gib"] > 0
    assert train["ratio_step_time"] == pytest.approx(train["rows"][0]["s_per_step"] / train["rows"][1]["s_per_step"])
    assert "cores" in r["machine"]


def test_unknown_section_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--what", "train,bogus"])
    assert exc.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_fp16_on_cpu_is_a_clear_error(capsys):
    assert main(["bench", "--family", "tiny-sdxl", "--device", "cpu", "--dtype", "fp16"]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
