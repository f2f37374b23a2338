"""The meta-device memory predictor: its byte counter, its CUDA-autocast rules, its flash
attention stand-in, and the predicted SDXL figures it is used for."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.bench.memory import GIB, CudaAutocast, LiveTensorBytes, estimate_step, main


def test_counter_follows_allocations_frees_and_views():
    with LiveTensorBytes() as mem:
        a = torch.empty(1000, device="meta")  # 4000 B
        b = torch.empty(500, device="meta")  # 2000 B
        view = b.view(20, 25)  # same storage: nothing new
        assert mem.now == 6000
        del a
        c = torch.empty(100, dtype=torch.bfloat16, device="meta")  # 200 B
        assert (mem.now, mem.peak) == (2200, 6000)
        del b
        assert mem.now == 2200  # the view keeps the storage alive
        del view, c
        assert mem.now == 0


def test_counter_sees_tensors_saved_for_backward():
    lin = nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256, requires_grad=True)
    with LiveTensorBytes() as mem:
        mem.track(lin.weight, x)
        y = torch.tanh(lin(x))  # keeps its output for backward
        h = lin(x).relu()
        kept = mem.now
        del h  # relu's output (its saved tensor) goes with it
        assert mem.now == kept - 64 * 256 * 4
        y.sum().backward()
    assert mem.peak >= (256 * 256 + 64 * 256 * 4) * 4


def test_cuda_autocast_rules():
    w = nn.Parameter(torch.randn(8, 8))
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with CudaAutocast(torch.bfloat16) as mode:
        assert F.linear(x.float(), w).dtype == torch.bfloat16  # matmuls in the low precision
        assert F.group_norm(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16), 2).dtype == torch.float32
        assert F.layer_norm(x, (8,)).dtype == torch.float32
        assert torch.softmax(x, -1).dtype == torch.float32
        assert (x * 2).dtype == torch.bfloat16  # element-wise ops keep their dtype
        F.linear(x, w)
        assert len(mode.cache) == 1  # the trainable weight was cast once and reused
    assert mode.cache == {}  # the cache ends with the region


def test_flash_attention_stand_in_matches_sdpa_and_keeps_no_score_matrix():
    q, k, v = (torch.randn(1, 2, 1024, 64, requires_grad=True) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    with CudaAutocast(torch.float32), LiveTensorBytes() as mem:
        got = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    scores = 2 * 1024 * 1024 * 4
    assert mem.peak < scores / 4  # the math path would hold (B, H, N, N) scores and probabilities


def test_meta_prediction_equals_the_same_step_on_real_tensors():
    torch.manual_seed(0)
    for ckpt in ("none", "layer"):
        meta = estimate_step("tiny-sdxl", checkpointing=ckpt)
        cpu = estimate_step("tiny-sdxl", checkpointing=ckpt, device="cpu")
        assert meta == cpu, ckpt


def test_sdxl_1024_prediction():
    """SDXL, 1024x1024, batch 1, rank-16 kohya LoRA, bf16 autocast: no checkpointing needs the
    ~13 GiB other trainers report; layer checkpointing fits the 6.5 GiB goal."""
    full = estimate_step("sdxl", checkpointing="none")
    assert full.weights / GIB == pytest.approx(4.78, abs=0.01)
    assert 12 * GIB < full.peak < 15 * GIB
    layer = estimate_step("sdxl", checkpointing="layer")
    assert layer.peak < 6.5 * GIB
    assert layer.lora == full.lora and layer.optimizer == 2 * layer.lora


def test_cli_prints_a_table(capsys):
    assert main(["--family", "tiny-sdxl", "--checkpointing", "none", "block"]) == 0
    out = capsys.readouterr().out
    assert "| none |" in out and "| block |" in out and "peak MiB" in out  # tiny families print MiB
