"""Reading LyCORIS files: every LoHa / LoKr / LoCon-Tucker / full-difference / DoRA form loads
(`load_lora`, `lora merge`, `lora inspect`) and gives what ComfyUI's formulas give; broken files
are errors naming the module; `lora resize` turns LoHa / LoKr into a plain LoRA by SVD.
(LyCORIS itself as the oracle: tests/test_lycoris_oracle.py.)
"""
from __future__ import annotations

import itertools
import json

import pytest
import safetensors.torch
import torch
from test_lycoris import comfy_diff, outputs, randomize, rel, sdxl_or_sd_inputs

import models
from models.bundle import build_model
from models.lora.files import LoRAFileError, load_lora
from models.lora.lycoris import factorization
from models.lora.names import components_of
from trainer.__main__ import main

# ------------------------------------------------------------------------------------------------
# A hand-made file holding every form, on tiny-sd15's LoCon modules
# ------------------------------------------------------------------------------------------------
LINEAR_FORMS = ["loha", "lokr_w1ab_w2full", "lokr_both_low", "full", "lora_dora_out", "lokr_full_full"]
CONV3_FORMS = ["lokr_w2full_flat", "lokr_tucker", "loha_tucker", "locon_mid", "full", "loha_dora_in", "lokr_w2full_4d"]
CONV1_FORMS = ["lora_2d", "loha", "lokr_w1ab_w2full"]


def _module(form: str, shape, has_bias: bool, g: torch.Generator) -> dict[str, torch.Tensor]:
    """File tensors (suffix -> tensor) of one module of `form` for a weight of `shape`."""
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3
    out, inn, *k = shape
    ks = 1
    for v in k:
        ks *= v
    (a, b), (c, d) = factorization(out), factorization(inn)
    t = {"alpha": torch.tensor(1.5)}
    if form == "loha":
        t |= {"hada_w1_a": rnd(out, 2), "hada_w1_b": rnd(2, inn * ks), "hada_w2_a": rnd(out, 2),
              "hada_w2_b": rnd(2, inn * ks)}
    elif form in ("loha_tucker", "loha_dora_in"):
        if form == "loha_tucker":
            t |= {"hada_w1_a": rnd(2, out), "hada_w1_b": rnd(2, inn), "hada_t1": rnd(2, 2, *k),
                  "hada_w2_a": rnd(2, out), "hada_w2_b": rnd(2, inn), "hada_t2": rnd(2, 2, *k)}
        else:
            t |= _module("loha", shape, has_bias, g) | {"dora_scale": 1 + rnd(1, inn, 1, 1)}
    elif form == "lokr_w1ab_w2full":
        t |= {"lokr_w1_a": rnd(a, 1), "lokr_w1_b": rnd(1, c), "lokr_w2": rnd(b, d, *k)}
    elif form == "lokr_both_low":  # different ranks: ComfyUI divides alpha by w2's
        t |= {"lokr_w1_a": rnd(a, 1), "lokr_w1_b": rnd(1, c), "lokr_w2_a": rnd(b, 2), "lokr_w2_b": rnd(2, d)}
    elif form == "lokr_full_full":
        t |= {"lokr_w1": rnd(a, c), "lokr_w2": rnd(b, d)}  # scale 1 whatever alpha says
    elif form == "lokr_w2full_flat":
        t |= {"lokr_w1": rnd(a, c), "lokr_w2": rnd(b, d * ks)}
    elif form == "lokr_w2full_4d":
        t |= {"lokr_w1": rnd(a, c), "lokr_w2": rnd(b, d, *k)}
    elif form == "lokr_tucker":
        t |= {"lokr_w1": rnd(a, c), "lokr_t2": rnd(2, 2, *k), "lokr_w2_a": rnd(2, b), "lokr_w2_b": rnd(2, d)}
    elif form == "full":
        t = {"diff": rnd(*shape)} | ({"diff_b": rnd(out)} if has_bias else {})
    elif form == "locon_mid":
        t |= {"lora_down.weight": rnd(3, inn, 1, 1), "lora_mid.weight": rnd(3, 3, *k), "lora_up.weight": rnd(out, 3, 1, 1)}
    elif form == "lora_2d":  # 2-D factors on a 1x1 conv
        t |= {"lora_down.weight": rnd(3, inn), "lora_up.weight": rnd(out, 3)}
    elif form == "lora_dora_out":  # LyCORIS's default DoRA: a magnitude per output
        t |= {"lora_down.weight": rnd(3, inn), "lora_up.weight": rnd(out, 3), "dora_scale": 1 + rnd(out, 1)}
    return t


def every_form_file(bundle, tmp_path, seed=0):
    """(path, tensors, refs, forms): a file with each form on several modules of `bundle`."""
    net = models.inject_lora(bundle, unet="locon", text_encoders="te", rank=1)
    refs = net.refs()
    net.remove()
    parts = components_of(bundle)
    g = torch.Generator().manual_seed(seed)
    counters = {"linear": itertools.cycle(LINEAR_FORMS), "conv3": itertools.cycle(CONV3_FORMS),
                "conv1": itertools.cycle(CONV1_FORMS)}
    tensors, forms = {}, {}
    for name, ref in refs.items():
        layer = parts[ref.component].get_submodule(ref.path)
        shape = tuple(layer.weight.shape)
        kind = "linear" if len(shape) == 2 else ("conv1" if shape[2:] == (1, 1) else "conv3")
        forms[name] = next(counters[kind])
        tensors |= {f"{name}.{k}": v for k, v in _module(forms[name], shape, layer.bias is not None, g).items()}
    path = tmp_path / "every_form.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"lorasmith.family": bundle.family})
    return path, tensors, refs, forms


def _norm_in(w):  # per input channel, as ComfyUI's weight_decompose
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))


def _norm_out(w):  # per output channel, as LyCORIS's weight_decompose (wd_on_out)
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))


def expected_model(family, tensors, refs, strength):
    """A fresh model patched by ComfyUI's formulas; DoRA magnitudes per ComfyUI (per input) or
    per LyCORIS (per output: norm of the adapted weight), strength as ComfyUI's W + s * (W' - W)."""
    ref = build_model(family, seed=0)
    parts = components_of(ref)
    with torch.no_grad():
        for name, r in refs.items():
            layer = parts[r.component].get_submodule(r.path)
            w = layer.weight
            diff, diff_b = comfy_diff(tensors, name, w.shape)
            dora = tensors.get(f"{name}.dora_scale")
            if dora is None:
                w += strength * diff
            else:
                calc = w + diff
                out_axis = dora.shape[0] == w.shape[0]
                norm = _norm_out(calc) if out_axis else _norm_in(calc)
                full = calc * (dora.reshape(norm.shape) / norm)
                w += strength * (full - w)
            if diff_b is not None:
                layer.bias += strength * diff_b
    return ref


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_every_lycoris_form_loads_as_comfyui_applies_it(tmp_path, strength):
    bundle = build_model("tiny-sd15", seed=0)
    path, tensors, refs, forms = every_form_file(bundle, tmp_path)
    assert set(forms.values()) == set(LINEAR_FORMS) | set(CONV3_FORMS) | set(CONV1_FORMS)
    data = sdxl_or_sd_inputs(bundle)
    base = outputs(bundle, *data)
    net = load_lora(bundle, path, strength=strength)
    assert {n: a.algo for n, a in net.adapters().items()} == {
        n: {"lora_2d": "lora", "locon_mid": "lora", "lora_dora_out": "lora"}.get(f, f.split("_")[0])
        for n, f in forms.items()}
    got = outputs(bundle, *data)
    want = outputs(expected_model("tiny-sd15", tensors, refs, strength), *data)
    assert rel(want, base) > 1e-2
    assert rel(got, want) <= 1e-5
    net.merge()  # merged weights (bias updates included) give the same function
    assert rel(outputs(bundle, *data), want) <= 1e-5
    net.remove()
    assert rel(outputs(bundle, *data), base) <= 1e-6
    # re-saving a loaded network writes the same tensors back
    again = load_lora(build_model("tiny-sd15", seed=0), path)
    saved = again.state_dict_for_export(dtype=torch.float32)
    assert saved.keys() == tensors.keys()
    assert all(torch.equal(saved[k].reshape(v.shape), v) for k, v in tensors.items())


def test_lora_merge_and_inspect_read_lycoris_files(tmp_path, capsys):
    from models.checkpoints.loading import load_model
    from models.checkpoints.single_file import save_single_file

    base = build_model("tiny-sd15", seed=0)
    base_path = tmp_path / "base.safetensors"
    save_single_file(base, base_path)
    path, tensors, refs, forms = every_form_file(base, tmp_path)
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--model", str(base_path), "--lora", f"{path}:0.6", "--out", str(out)]) == 0
    merged = load_model(out, family="tiny-sd15")
    data = sdxl_or_sd_inputs(merged)
    assert rel(outputs(merged, *data), outputs(expected_model("tiny-sd15", tensors, refs, 0.6), *data)) <= 1e-5
    capsys.readouterr()
    assert main(["lora", "inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"format: kohya (ComfyUI / A1111 / diffusers names), {len(forms)} modules" in text
    for label in ("loha", "lokr", "full", "lora+tucker", "loha+tucker", "lokr+tucker", "loha+dora", "lora+dora"):
        assert f"{label} " in text.split("algorithms: ")[1].split("\n")[0], label
    assert f"key check against tiny-sd15: all {len(forms)} modules match" in text


BROKEN = {  # suffix -> tensor changes on one LoKr / LoHa module, and the message expected
    "mixed": ({"lokr_w1_a": torch.zeros(2, 1)}, r"has both lokr_w1 and lokr_w1_a/lokr_w1_b"),
    "no_t2": ({"hada_t1": torch.zeros(2, 2, 3, 3)}, r"incomplete loha adapter: missing hada_t2"),
    "t1": ({"lokr_t1": torch.zeros(2, 2, 3, 3)}, r"lokr_t1 \(an adapter type this loader does not support\)"),
    "shape": ({"hada_w1_a": torch.zeros(5, 2)}, r"shapes hada_w1_a \[5, 2\].*the model needs hada_w1_a \[64, 2\]"),
    "lokr_shape": ({"lokr_w2": torch.zeros(3, 3)}, r"LoKr tensors .*lokr_w2 \[3, 3\] do not fit a weight of shape"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_lycoris_modules_are_errors_naming_them(tmp_path, case):
    bundle = build_model("tiny-sd15", seed=0)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 64 -> 64
    changes, message = BROKEN[case]
    if case in ("no_t2",):
        name = "lora_unet_down_blocks_1_resnets_0_conv2"  # 3x3 conv 64 -> 64
    base = {"hada_w1_a": torch.ones(64, 2), "hada_w1_b": torch.ones(2, 64 * (9 if "conv" in name else 1)),
            "hada_w2_a": torch.ones(64, 2), "hada_w2_b": torch.ones(2, 64 * (9 if "conv" in name else 1))}
    if case in ("mixed", "t1", "lokr_shape"):
        base = {"lokr_w1": torch.ones(8, 8), "lokr_w2": torch.ones(8, 8)}
    tensors = {f"{name}.{k}": v for k, v in (base | changes).items()}
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(LoRAFileError, match=message) as err:
        load_lora(bundle, path)
    assert name in str(err.value) or case == "t1"
    assert not any("LoRA" in type(m).__name__ for m in bundle.unet.modules())


# ------------------------------------------------------------------------------------------------
# resize: LoHa / LoKr -> plain LoRA
# ------------------------------------------------------------------------------------------------
def test_resize_converts_lycoris_modules_to_lora_by_svd(tmp_path, capsys):
    bundle = build_model("tiny-sdxl", seed=0)
    net = models.inject_lora(bundle, unet="locon", text_encoders="te", algo="loha", rank=2, alpha=1.0,
                             use_tucker=True)
    randomize(net, std=0.3)
    path = tmp_path / "loha.safetensors"
    net.save(path, dtype=torch.float32, metadata={"lorasmith.family": "tiny-sdxl"})
    data = sdxl_or_sd_inputs(bundle)
    want = outputs(bundle, *data)
    parts = components_of(bundle)
    shapes = {n: tuple(parts[r.component].get_submodule(r.path).weight.shape) for n, r in net.refs().items()}
    deltas = {n: a.delta_weight().detach() for n, a in net.adapters().items()}
    net.remove()
    # LoHa rank 2 is at most rank 4 (a Hadamard product of two rank-2 matrices): rank 4 keeps it
    exact = tmp_path / "exact.safetensors"
    assert main(["lora", "resize", str(path), "--rank", "4", "--out", str(exact)]) == 0
    text = capsys.readouterr().out
    assert "update energy kept per module" in text and "loha+tucker" in text
    assert all(f"{n} " in text for n in deltas)
    lora = safetensors.torch.load_file(exact)
    assert not any(k.split(".", 1)[1].startswith(("hada", "lokr")) for k in lora)
    fresh = build_model("tiny-sdxl", seed=0)
    load_lora(fresh, exact)
    assert rel(outputs(fresh, *data), want) <= 1e-4
    # rank 1: the best rank-1 approximation of each update (Eckart-Young), energy reported
    cut_path = tmp_path / "cut.safetensors"
    assert main(["lora", "resize", str(path), "--rank", "1", "--out", str(cut_path)]) == 0
    text = capsys.readouterr().out
    cut = safetensors.torch.load_file(cut_path)
    for name, d in deltas.items():
        got = (cut[f"{name}.lora_up.weight"].flatten(1) @ cut[f"{name}.lora_down.weight"].flatten(1))
        got = got * (cut[f"{name}.alpha"].item() / cut[f"{name}.lora_down.weight"].shape[0])
        s = torch.linalg.svdvals(d.flatten(1))
        assert abs(rel(got, d.flatten(1)) - (s[1:].square().sum() / s.square().sum()).sqrt().item()) <= 1e-4
        kept = (s[0].square() / s.square().sum()).item()
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(name + " "))
        assert abs(float(line.split()[-1]) - kept) <= 1e-4, line
        assert tuple(cut[f"{name}.lora_down.weight"].shape) == (1, *shapes[name][1:])
    with safetensors.safe_open(str(cut_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and "algo" not in json.loads(meta["ss_network_args"])


def test_resize_of_lokr_without_a_known_family_asks_for_it(tmp_path, capsys):
    bundle = build_model("tiny-sd15", seed=0)
    net = models.inject_lora(bundle, unet="locon", algo="lokr", rank=1, factor=4)
    path = tmp_path / "lokr.safetensors"
    tensors = net.state_dict_for_export(dtype=torch.float32)
    safetensors.torch.save_file(tensors, path)  # no metadata; tiny widths match no full-size family
    assert main(["lora", "resize", str(path), "--rank", "2", "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "pass --family" in capsys.readouterr().err
    assert main(["lora", "resize", str(path), "--rank", "2", "--family", "tiny-sd15",
                 "--out", str(tmp_path / "o.safetensors")]) == 0


def test_resize_at_full_rank_keeps_every_form_exactly(tmp_path, capsys):
    """Every module kind (DoRA magnitudes carried over) resized to full rank: the plain LoRA gives
    the same function; a `diff_b` bias update has no LoRA form and is refused."""
    bundle = build_model("tiny-sd15", seed=0)
    path, tensors, refs, _ = every_form_file(bundle, tmp_path)
    out = tmp_path / "resized.safetensors"
    assert main(["lora", "resize", str(path), "--rank", "4096", "--out", str(out)]) == 2  # a user error
    assert "diff_b (a bias update), which a LoRA cannot express" in capsys.readouterr().err
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".diff_b")}
    safetensors.torch.save_file(tensors, path, metadata={"lorasmith.family": "tiny-sd15"})
    assert main(["lora", "resize", str(path), "--rank", "4096", "--out", str(out)]) == 0
    resized = safetensors.torch.load_file(out)
    assert {k.split(".", 1)[1] for k in resized} == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    data = sdxl_or_sd_inputs(bundle)
    load_lora(bundle, out, strength=0.7)
    assert rel(outputs(bundle, *data), outputs(expected_model("tiny-sd15", tensors, refs, 0.7), *data)) <= 1e-5
