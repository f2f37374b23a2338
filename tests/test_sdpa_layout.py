"""Every attention call in the VAE, the UNet and CLIP hands SDPA q/k/v whose last dimension is
contiguous. CUDA's fused kernels (flash, memory-efficient, cuDNN) require it; otherwise SDPA falls
back to its math kernel, which holds the N x N scores (1 GiB fp32 per matrix for the SDXL VAE
at 1024 px). The CPU kernels accept either layout, so this is checked on the strides."""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from models import build_model
from models.vae import AutoencoderKL, VAEConfig


class RecordSDPA(TorchFunctionMode):
    """Records (shape, stride) of q, k and v at every `F.scaled_dot_product_attention` call."""

    def __init__(self):
        super().__init__()
        self.calls: list[list[tuple[tuple[int, ...], tuple[int, ...]]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append([(tuple(t.shape), t.stride()) for t in args[:3]])
        return func(*args, **(kwargs or {}))

    def strided_last_dims(self) -> list:
        """The calls with a q, k or v whose last dimension is not contiguous."""
        return [c for c in self.calls if any(stride[-1] != 1 and shape[-1] > 1 for shape, stride in c)]


@pytest.mark.parametrize("batch", [1, 2])
def test_vae_attention_inputs_are_last_dim_contiguous(batch):
    vae = AutoencoderKL(VAEConfig.preset("tiny")).eval()
    images = torch.rand(batch, 3, 32, 48) * 2 - 1
    with torch.no_grad(), RecordSDPA() as rec:
        vae.decode(vae.encode(images).mode())
    assert len(rec.calls) == 2  # encoder and decoder mid-block attention
    assert rec.strided_last_dims() == []


@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_attention_inputs_are_last_dim_contiguous(channels_last):
    bundle = build_model("tiny-sdxl", seed=0)
    unet = bundle.unet.eval()
    c = unet.config
    x = torch.randn(2, c.in_channels, 8, 8)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), RecordSDPA() as rec:
        unet(x, torch.tensor([10.0, 500.0]), torch.randn(2, 7, c.context_dim), torch.randn(2, c.adm_in_channels))
    assert rec.calls and rec.strided_last_dims() == []


def test_text_encoder_attention_inputs_are_last_dim_contiguous():
    bundle = build_model("tiny-sdxl", seed=0)
    with torch.no_grad(), RecordSDPA() as rec:
        bundle.encode_prompt(["a photo of a cat", "two dogs"])
    assert len(rec.calls) >= 2 and rec.strided_last_dims() == []


def test_recorder_sees_a_strided_last_dimension():
    q = torch.randn(1, 1, 64, 16).transpose(2, 3)  # (1, 1, 16, 64) with last-dim stride 16
    with RecordSDPA() as rec:
        F.scaled_dot_product_attention(q, q, q)
    assert len(rec.strided_last_dims()) == 1


# ---- the memory predictor models the kernel CUDA would pick ------------------------------------------
def test_predictor_counts_the_math_fallback_for_strided_inputs():
    from trainer.bench.memory import CudaAttention, LiveTensorBytes

    n, d = 1024, 64
    scores = n * n * 4
    contiguous = torch.randn(1, 1, n, d, device="meta")
    strided = torch.randn(1, 1, d, n, device="meta").transpose(2, 3)
    peaks = {}
    for name, q in (("contiguous", contiguous), ("strided", strided)):
        with torch.no_grad(), LiveTensorBytes() as mem, CudaAttention():
            out = F.scaled_dot_product_attention(q, q, q)
        assert out.shape == (1, 1, n, d)
        peaks[name] = mem.peak
    assert peaks["contiguous"] < scores / 4  # fused kernel: no N x N matrix
    assert peaks["strided"] >= scores  # math kernel: the scores are materialised


def test_vae_encode_prediction_equals_real_tensors():
    from trainer.bench.memory import estimate_vae_encode

    meta = estimate_vae_encode("tiny-sdxl", res=64, batch=2)
    cpu = estimate_vae_encode("tiny-sdxl", res=64, batch=2, device="cpu")
    assert meta == cpu
    assert meta.images == 2 * 3 * 64 * 64 * 4 and meta.activations > 0
