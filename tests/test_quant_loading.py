"""Quantize while loading (models.quant.loading through materialize / load_model / open_model):
the same bytes as quantizing a loaded model, without the full-precision model ever in memory."""
import pytest
import safetensors.torch
import torch

from models.bundle import build_model
from models.checkpoints import materialize as materialize_module
from models.checkpoints.loading import ModelLoadError, load_model
from models.checkpoints.materialize import Part, materialize
from models.checkpoints.open import open_model
from models.checkpoints.safetensors_io import TensorStore
from models.checkpoints.single_file import meta_module, save_single_file
from models.quant import is_quantized, quantize_model
from models.quant.formats import packed_nbytes
from models.quant.model import base_quantization, select_layers
from models.unet import UNetConfig
from trainer.bench.memory import LiveTensorBytes


class RealTensorBytes(LiveTensorBytes):
    """Live bytes of real (not meta) tensors: the modules being loaded start on meta."""

    def _add(self, t):
        if not t.is_meta:
            super()._add(t)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_single_file(build_model("tiny-sdxl", seed=0), path, dtype=torch.float16)
    return path


def _packed(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if k.endswith(("qweight", "qscale"))}


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
def test_loading_quantized_equals_quantizing_the_loaded_model(checkpoint, fmt):
    got = load_model(checkpoint, dtype=torch.float32, quantize={"unet": fmt, "text_encoder_2": fmt})
    want = load_model(checkpoint, dtype=torch.float32)
    quantize_model(want.unet, fmt)
    quantize_model(want.text_encoders[1], fmt)
    for part in ("unet", "text_encoder_2"):
        a, b = got.modules()[part].state_dict(), want.modules()[part].state_dict()
        assert a.keys() == b.keys() and len(_packed(got.modules()[part])) > 10
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert base_quantization(got) == {"unet": fmt, "text_encoder_2": fmt}  # never the VAE, only what was asked
    assert not any(p.requires_grad for p in _packed(got.unet).values())  # integer Parameters cannot


def test_stored_dtype_is_the_compute_dtype_when_dtype_is_none(checkpoint):
    bundle = load_model(checkpoint, dtype=None, quantize={"unet": "fp8"})
    q = next(m for m in bundle.unet.modules() if is_quantized(m))
    assert q.compute_dtype == torch.float16 and bundle.unet.dtype == torch.float16


@pytest.mark.parametrize("mode", ["auto", "assign", "to_empty"])
def test_every_materialisation_mode_gives_the_same_quantized_model(checkpoint, monkeypatch, mode):
    want = _packed(load_model(checkpoint, dtype=torch.float32, quantize={"unet": "nf4"}).unet)
    monkeypatch.setattr(materialize_module, "materialize_mode", mode)  # the load benchmark's switch
    got = _packed(load_model(checkpoint, dtype=torch.float32, quantize={"unet": "nf4"}).unet)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_the_full_precision_weights_never_all_exist(tmp_path):
    """Materialising a UNet from an fp16 file into fp32 with nf4: the peak of live tensor bytes is
    the packed model plus about one layer's fp32 copy, far below the fp32 model."""
    config = UNetConfig.preset("tiny-sdxl")
    state = build_model("tiny-sdxl", seed=0).unet.state_dict()
    path = tmp_path / "unet.safetensors"
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in state.items()}, path)
    module = meta_module(config)
    layers = dict(select_layers(module))
    packed = sum(packed_nbytes(tuple(m.weight.shape), "nf4") for m in layers.values())
    rest = sum(v.numel() * 4 for k, v in state.items() if k.rpartition(".")[0] not in layers or
               not k.endswith("weight"))
    largest = max(m.weight.numel() for m in layers.values()) * 4
    full = sum(v.numel() * 4 for v in state.values())
    part = Part("unet", config, TensorStore.open(path), sources={k: k for k in state})
    with RealTensorBytes() as mem:
        materialize(module, part, torch.float32, torch.device("cpu"), zero_copy=True, quantize="nf4")
    assert mem.now == packed + rest
    assert mem.peak <= packed + rest + 3 * largest
    assert mem.peak < full / 2
    assert sum(is_quantized(m) for m in module.modules()) == len(layers)


def test_a_damaged_weight_is_refused_before_it_is_quantized(tmp_path):
    bundle = build_model("tiny-sdxl", seed=0)
    with torch.no_grad():
        bundle.unet.input_blocks[1][0].in_layers[2].weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "bad.safetensors"
    save_single_file(bundle, path)
    with pytest.raises(ModelLoadError, match=r"holds non-finite values \(1 NaN, 0 inf\); the checkpoint is damaged"):
        load_model(path, quantize={"unet": "nf4"})


def test_open_model_quantizes_family_sources_and_checkpoints(checkpoint):
    for source in ("tiny-sdxl", str(checkpoint)):
        bundle = open_model(source, quantize="nf4", quantize_text_encoders="int8")
        assert base_quantization(bundle) == {"unet": "nf4", "text_encoder_2": "int8"}, source  # tiny te1: small layers
        assert not any(is_quantized(m) for m in bundle.vae.modules())
        assert all(not m.training for m in bundle.unet.modules())
    assert base_quantization(open_model("tiny-sdxl")) == {}
    with pytest.raises(ValueError, match="model.quantize_text_encoders: unknown mode 'fp4'"):
        open_model("tiny-sdxl", quantize_text_encoders="fp4")
