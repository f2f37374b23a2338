"""FLUX.1 files stored in fp8 (plain float8 casts, ComfyUI's scaled fp8 with `scale_weight` and its
mixed format with `weight_scale` + `comfy_quant`), and quantize-on-load of the transformer and T5."""
import json

import pytest
import torch
from flux_files_helpers import state, tiny_bundle, write_split
from test_quant_loading import RealTensorBytes

from models.checkpoints.loading import ModelLoadError, load_model
from models.checkpoints.materialize import Part, materialize
from models.checkpoints.open import open_model
from models.checkpoints.safetensors_io import TensorStore, save_file
from models.checkpoints.single_file import meta_module, single_file_state_dict
from models.quant import is_quantized, quantize_model
from models.quant.formats import dequantize, packed_nbytes
from models.quant.model import base_quantization, select_layers

E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(seed=5, t5_width=64)  # T5 layers of >= 4096 weights: quantizable


def load_split(paths, **kwargs):
    return load_model(paths["flux1"], vae=paths["ae"], text_encoders=[paths["clip_l"], paths["t5xxl"]],
                      tokenizers=[None, paths["tokenizer"]], **kwargs)


def scaled(sd: dict, module, per_row: bool, names=("scale_weight",), marker=None, comfy_quant=None):
    """`sd` with every Linear weight of `module` stored as scaled fp8 (ComfyUI's layout), and the
    weights the file then holds: {param: fp8 x scale in fp32}."""
    out, expect = dict(sd), {}
    for path, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        w = layer.weight.detach().float()
        s = w.abs().amax(dim=1) / 448 if per_row else w.abs().amax() / 448
        q = (w / (s[:, None] if per_row else s)).to(E4M3)
        key = f"{path}.weight"
        out[key] = q
        out[f"{path}.{names[0]}"] = s
        out[f"{path}.{'scale_input' if names[0] == 'scale_weight' else 'input_scale'}"] = torch.ones(())
        if comfy_quant is not None:
            out[f"{path}.comfy_quant"] = torch.tensor(list(json.dumps({"format": comfy_quant}).encode()), dtype=torch.uint8)
        expect[key] = q.float() * (s[:, None] if per_row else s)
    if marker is not None:
        out[marker] = torch.empty(0, dtype=E4M3)
    return out, expect


def test_plain_fp8_t5_upcasts_to_the_load_dtype(bundle, tmp_path):
    paths = write_split(bundle, tmp_path, t5_dtype=E4M3)  # t5xxl_fp8_e4m3fn.safetensors: a plain cast
    stored = TensorStore.open(paths["t5xxl"])
    got = load_split(paths, dtype=torch.float32)
    for k, v in got.text_encoders[1].state_dict().items():
        src = "shared.weight" if k == "encoder.embed_tokens.weight" else k
        assert v.dtype == torch.float32 and torch.equal(v, stored[src].float()), k
    # dtype=None: fp8 is storage, never the compute dtype
    assert load_split(paths, dtype=None).text_encoders[1].dtype == torch.float32


@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_scaled_fp8_t5_is_fp8_times_scale(bundle, tmp_path, per_row):
    paths = write_split(bundle, tmp_path)
    t5 = bundle.text_encoders[1]
    sd, expect = scaled(state(t5, drop=("encoder.embed_tokens.weight",)), t5, per_row, marker="scaled_fp8")
    save_file(sd, paths["t5xxl"])
    got = load_split(paths, dtype=torch.float32).text_encoders[1].state_dict()
    assert all(torch.equal(got[k], v) for k, v in expect.items())
    assert torch.equal(got["shared.weight"], t5.shared.weight)  # unscaled tensors as they are
    got16 = load_split(paths, dtype=torch.bfloat16).text_encoders[1].state_dict()
    assert all(torch.equal(got16[k], v.to(torch.bfloat16)) for k, v in expect.items())


def test_fp8_quantize_keeps_the_stored_bytes(bundle, tmp_path):
    """quantize fp8 of a scaled-fp8 T5: qweight is the file's bytes, qscale its scale; exact, and the
    full-precision weights never exist."""
    paths = write_split(bundle, tmp_path)
    t5 = bundle.text_encoders[1]
    sd, expect = scaled(state(t5, drop=("encoder.embed_tokens.weight",)), t5, per_row=False, marker="scaled_fp8")
    save_file(sd, paths["t5xxl"])
    got = load_split(paths, dtype=torch.float32, quantize={"text_encoder_2": "fp8"}).text_encoders[1]
    quantized = {p: m for p, m in got.named_modules() if is_quantized(m)}
    assert len(quantized) == len(select_layers(meta_module(t5.config))) > 0
    for path, layer in quantized.items():
        assert torch.equal(layer.qweight, sd[f"{path}.weight"].view(torch.uint8))
        w = dequantize(layer.qweight, layer.qscale, "fp8", tuple(layer.qweight.shape), torch.float32)
        assert torch.equal(w, expect[f"{path}.weight"]), path
    # materialised alone (a small vocabulary, so the weights dominate): live bytes are the packed
    # weights plus the rest, and the peak stays near that - no fp32 copy of the weights
    from models.t5 import T5Config, T5Encoder

    small = T5Encoder(T5Config.preset("tiny-t5", d_model=64, d_kv=16, d_ff=128, vocab_size=256))
    sd, _ = scaled(state(small, drop=("encoder.embed_tokens.weight",)), small, per_row=False, marker="scaled_fp8")
    save_file(sd, tmp_path / "small.safetensors")
    module = meta_module(small.config)
    layers = dict(select_layers(module))
    packed = sum(packed_nbytes(tuple(m.weight.shape), "fp8") for m in layers.values())
    largest = max(m.weight.numel() for m in layers.values()) * 4
    full = sum(m.weight.numel() * 4 for m in layers.values())
    rest = sum(v.numel() * 4 for k, v in small.state_dict().items() if k.rpartition(".")[0] not in layers
               and k != "encoder.embed_tokens.weight")
    names = {k: ("shared.weight" if k == "encoder.embed_tokens.weight" else k) for k in module.state_dict()}
    part = Part("text_encoder_2", small.config, TensorStore.open(tmp_path / "small.safetensors"), sources=names,
                scales={f"{p}.weight": f"{p}.scale_weight" for p in layers})
    with RealTensorBytes() as mem:
        materialize(module, part, torch.float32, torch.device("cpu"), zero_copy=False, quantize="fp8")
    assert mem.now == packed + rest
    assert mem.peak <= packed + rest + 3 * largest < rest + full / 2


def test_comfy_mixed_format_transformer_in_an_all_in_one_file(bundle, tmp_path):
    """`weight_scale` per output row + `comfy_quant` {"format": "float8_e4m3fn"} under
    model.diffusion_model.: upcast, and with quantize fp8 the stored bytes."""
    prefix = "model.diffusion_model."
    sd = {k: v for k, v in single_file_state_dict(bundle).items() if not k.startswith(prefix)}
    inner, expect = scaled(state(bundle.denoiser), bundle.denoiser, per_row=True, names=("weight_scale",),
                           marker="scaled_fp8", comfy_quant="float8_e4m3fn")
    sd.update({prefix + k: v for k, v in inner.items()})
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(sd, path)
    got = load_model(path, dtype=torch.float32).denoiser.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expect.items())
    unscaled = [k for k in got if k not in expect]
    assert unscaled and all(torch.equal(got[k], bundle.denoiser.state_dict()[k]) for k in unscaled)
    q = load_model(path, dtype=torch.float32, quantize={"unet": "fp8"}).denoiser
    layer = q.get_submodule("double_blocks.0.img_attn.qkv")
    assert is_quantized(layer) and torch.equal(layer.qweight, inner["double_blocks.0.img_attn.qkv.weight"].view(torch.uint8))
    sd[prefix + "double_blocks.0.img_attn.qkv.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'),
                                                                           dtype=torch.uint8)
    save_file(sd, path)
    with pytest.raises(ModelLoadError, match=r"double_blocks.0.img_attn.qkv.weight' is stored in ComfyUI's 'nvfp4' "
                                             r"quantized format, which this loader does not read"):
        load_model(path)


def test_e5m2_storage_is_requantized_like_the_upcast_model(bundle, tmp_path):
    paths = write_split(bundle, tmp_path)
    save_file(state(bundle.denoiser), paths["flux1"], dtype=torch.float8_e5m2)
    got = load_split(paths, dtype=torch.float32, quantize={"unet": "fp8"}).denoiser
    want = load_split(paths, dtype=torch.float32).denoiser
    quantize_model(want, "fp8")
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantize_on_load_equals_quantizing_the_loaded_model(bundle, tmp_path, fmt):
    paths = write_split(bundle, tmp_path)
    got = load_split(paths, dtype=torch.float32, quantize={"unet": fmt, "text_encoder_2": fmt})
    want = load_split(paths, dtype=torch.float32)
    quantize_model(want.denoiser, fmt)
    quantize_model(want.text_encoders[1], fmt)
    for part in ("unet", "text_encoder_2"):
        a, b = got.modules()[part].state_dict(), want.modules()[part].state_dict()
        assert a.keys() == b.keys() and any(k.endswith("qweight") for k in a), part
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), part
    assert base_quantization(got) == {"unet": fmt, "text_encoder_2": fmt}


def test_open_model_quantizes_flux_parts(bundle, tmp_path):
    paths = write_split(bundle, tmp_path)
    got = open_model(str(paths["flux1"]), vae=str(paths["ae"]), text_encoders=[str(paths["clip_l"]), str(paths["t5xxl"])],
                     tokenizers=[None, str(paths["tokenizer"])], quantize="fp8", quantize_text_encoders="int8")
    assert base_quantization(got) == {"unet": "fp8", "text_encoder_2": "int8"}  # tiny CLIP: layers too small
    cond = got.conditioning(got.tokenize("a cat"))
    assert torch.isfinite(got.denoise(torch.randn(1, 16, 4, 4), torch.tensor([0.3]), cond)).all()
