"""Quantized weight formats (models.quant.formats): bitsandbytes' byte layouts, the error of each
format on normally distributed weights, edge cases (zero rows and blocks, odd sizes, small
channels) and the packed sizes."""
import math

import pytest
import torch

from models.quant.formats import CHUNK, FP8_MAX, NF4_CODE, dequantize, packed_layout, packed_nbytes, quantize

SHAPES = [(64, 128), (33, 7), (40, 24, 3, 3), (5, 3)]  # 64-multiples, odd sizes, a conv, a partial block


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes.functional")


# ---- bitsandbytes layouts ---------------------------------------------------------------------------
def test_nf4_code_table_is_bitsandbytes_table(bnb):
    assert torch.equal(bnb.get_4bit_type("nf4", device="cpu"), torch.tensor(NF4_CODE))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_bytes_equal_bitsandbytes_quantize_4bit(bnb, shape, dtype):
    w = (torch.randn(shape) * 0.05).to(dtype)
    qweight, qscale = quantize(w, "nf4")
    ref, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(qweight, ref.reshape(-1)) and torch.equal(qscale, state.absmax)
    if dtype == torch.float32:  # (bitsandbytes' CPU dequantization of half inputs runs torch.compile: slow)
        back = dequantize(qweight, qscale, "nf4", shape, torch.float32)
        assert torch.equal(back, bnb.dequantize_4bit(ref, state).reshape(shape))


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_bytes_equal_bitsandbytes_vectorwise_quant(bnb, shape):
    w = torch.randn(shape) * 0.05
    qweight, qscale = quantize(w, "int8")
    ref, stats, _ = bnb.int8_vectorwise_quant(w.reshape(shape[0], -1).clone())
    assert torch.equal(qweight.reshape(shape[0], -1), ref) and torch.equal(qscale, stats)
    want = bnb.int8_vectorwise_dequant(ref, stats)
    assert torch.equal(dequantize(qweight, qscale, "int8", shape, torch.float32).reshape(shape[0], -1), want)


def test_a_weight_bigger_than_one_chunk_is_quantized_as_a_whole(bnb):
    """quantize works through CHUNK weights at a time; the pieces must join without a seam."""
    shape = (2101, 2049)  # 4.3 M weights, odd: the last nf4 piece ends inside a block and a byte
    assert math.prod(shape) > CHUNK
    w = torch.randn(shape) * 0.05
    qweight, qscale = quantize(w, "nf4")
    ref, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(qweight, ref.reshape(-1)) and torch.equal(qscale, state.absmax)
    qweight, qscale = quantize(w, "int8")
    ref, stats, _ = bnb.int8_vectorwise_quant(w.clone())
    assert torch.equal(qweight, ref) and torch.equal(qscale, stats)
    qweight, qscale = quantize(w, "fp8")
    scale = w.abs().amax(1) / FP8_MAX
    assert torch.equal(qscale, scale)
    assert torch.equal(qweight, (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8))


def test_nf4_packs_the_first_index_in_the_high_nibble():
    w = torch.zeros(64)
    w[0], w[1] = -1.0, 1.0  # levels 0 and 15, block absmax 1
    qweight, qscale = quantize(w[None], "nf4")
    assert qweight[0].item() == 0x0F and qweight[1].item() == 0x77 and qscale.tolist() == [1.0]


# ---- accuracy ---------------------------------------------------------------------------------------
# Relative Frobenius error of one weight, N(0, 1) entries (4096 x 320 values, seed 0). These are the
# per-layer figures docs/benchmarks.md quotes: fp8 2.6 %, int8 0.87 %, nf4 9.2 %.
BOUNDS = {"fp8": 0.03, "int8": 0.01, "nf4": 0.095}


@pytest.mark.parametrize("fmt", BOUNDS)
def test_relative_error_of_each_format(fmt):
    w = torch.randn(320, 4096, generator=torch.Generator().manual_seed(0))
    qweight, qscale = quantize(w, fmt)
    back = dequantize(qweight, qscale, fmt, tuple(w.shape), torch.float32)
    err = _rel(back, w)
    assert err < BOUNDS[fmt]
    assert err > BOUNDS[fmt] / 4  # a format that stored the weight exactly would be a bug too


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_scales_are_per_output_channel(fmt):
    """A channel 1e6 times smaller than the others keeps its own relative precision (one
    per-tensor scale would round it to zero, below even fp8's subnormals)."""
    w = torch.randn(8, 256)
    w[3] *= 1e-6
    qweight, qscale = quantize(w, fmt)
    back = dequantize(qweight, qscale, fmt, tuple(w.shape), torch.float32)
    assert _rel(back[3], w[3]) < 2 * BOUNDS[fmt]


def test_nf4_scales_are_per_block_of_64():
    w = torch.randn(1, 256)
    w[0, 64:128] *= 1e-4  # the second block alone
    qweight, qscale = quantize(w, "nf4")
    back = dequantize(qweight, qscale, "nf4", tuple(w.shape), torch.float32)
    assert qscale.shape == (4,) and _rel(back[0, 64:128], w[0, 64:128]) < 0.15


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_zero_rows_and_blocks_come_back_as_exact_zeros(fmt, shape):
    w = torch.randn(shape)
    w[0] = 0.0
    qweight, qscale = quantize(w, fmt)
    back = dequantize(qweight, qscale, fmt, shape, torch.float32)
    assert torch.isfinite(back).all() and torch.equal(back[0], torch.zeros_like(back[0]))
    assert _rel(back[1:], w[1:]) < 1.5 * BOUNDS[fmt]


def test_fp8_uses_the_full_e4m3_range_without_overflow():
    w = torch.randn(16, 64) * 1e3  # far beyond 448: the scale brings every row into range
    qweight, qscale = quantize(w, "fp8")
    levels = qweight.view(torch.float8_e4m3fn).float()
    assert torch.isfinite(levels).all() and levels.abs().amax() == FP8_MAX
    assert torch.allclose(qscale, w.abs().amax(1) / FP8_MAX)


# ---- sizes, dtypes, devices ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,per_weight", [("fp8", 1.0), ("int8", 1.0), ("nf4", 0.5 + 4 / 64)])
def test_packed_sizes(fmt, per_weight):
    shape = (1280, 1280)
    qweight, qscale = quantize(torch.randn(shape), fmt)
    real = qweight.numel() * qweight.element_size() + qscale.numel() * qscale.element_size()
    assert real == packed_nbytes(shape, fmt)
    scales = 1280 * 4 if fmt != "nf4" else 0
    assert real == math.prod(shape) * per_weight + scales
    assert {k: (tuple(t.shape), t.dtype) for k, t in zip(("qweight", "qscale"), (qweight, qscale))} == \
        packed_layout(shape, fmt)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
def test_meta_weights_give_packed_shapes_only(fmt):
    w = torch.empty(640, 320, 3, 3, device="meta", dtype=torch.bfloat16)
    qweight, qscale = quantize(w, fmt)
    assert qweight.is_meta and qscale.is_meta
    assert {"qweight": (tuple(qweight.shape), qweight.dtype), "qscale": (tuple(qscale.shape), qscale.dtype)} == \
        packed_layout(tuple(w.shape), fmt)
    out = dequantize(qweight, qscale, fmt, tuple(w.shape), torch.bfloat16)
    assert out.is_meta and out.shape == w.shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_rounds_once_to_the_compute_dtype(dtype):
    w = torch.randn(64, 64)
    for fmt in ("fp8", "int8", "nf4"):
        qweight, qscale = quantize(w, fmt)
        exact = dequantize(qweight, qscale, fmt, (64, 64), torch.float32)
        assert torch.equal(dequantize(qweight, qscale, fmt, (64, 64), dtype), exact.to(dtype)), fmt


def test_bad_format_and_input_are_refused():
    with pytest.raises(ValueError, match="unknown weight format 'int4'; use one of fp8, int8, nf4"):
        quantize(torch.randn(4, 4), "int4")
    with pytest.raises(TypeError, match="must be floating point"):
        quantize(torch.ones(4, 4, dtype=torch.int64), "fp8")
