"""Config choices are `Literal` types that mirror the registries of the code that runs them, and
reading / checking a config imports no torch."""
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from models.lora.options import LoRAOptions, TextEncoderPreset, UNetPreset
from trainer import config as C

ROOT = Path(__file__).resolve().parents[1]


def _choices(tp) -> set:
    """The string values of a Literal (or of the Literals inside a union)."""
    if typing.get_origin(tp) is typing.Literal:
        return set(typing.get_args(tp))
    return set().union(*(_choices(a) for a in typing.get_args(tp)))


def _registries() -> dict[str, tuple[object, set]]:
    from accelerate.utils import PrecisionType

    from models.families import FAMILIES
    from models.lora.names import TEXT_ENCODER_PRESETS, UNET_PRESETS
    from models.quant.formats import MODES
    from models.unet import GRANULARITIES
    from trainer.flow import FLOW_WEIGHTINGS
    from trainer.losses import HUBER_SCHEDULES, LOSS_TYPES, TIMESTEP_SAMPLINGS
    from trainer.objective import PREDICTION_TYPES
    from trainer.optim import OPTIMIZERS, SCHEDULERS
    from trainer.sampling.samplers import SAMPLER_NAMES

    # Families registered by models.families itself (a plug-in's spec class lives elsewhere).
    builtin = {n for n, s in FAMILIES.items() if type(s).__module__.startswith("models.families.")}
    return {
        "optimizers": (C.OptimizerName, set(OPTIMIZERS)),
        "schedulers": (C.SchedulerName, set(SCHEDULERS)),
        "samplers": (C.SamplerName, set(SAMPLER_NAMES)),
        "prediction types": (C.PredictionType, set(PREDICTION_TYPES)),
        "checkpointing": (C.Checkpointing, set(GRANULARITIES)),
        "losses": (C.LossType, set(LOSS_TYPES)),
        "huber schedules": (C.HuberSchedule, set(HUBER_SCHEDULES)),
        "timestep samplings": (C.TimestepSampling, set(TIMESTEP_SAMPLINGS)),
        "flow weightings": (C.FlowWeighting, set(FLOW_WEIGHTINGS)),
        "precisions": (C.Precision, set(C.DTYPE_NAMES)),
        "mixed precision": (C.MixedPrecision, {"no"} | (set(C.DTYPE_NAMES) & {p.value for p in PrecisionType})),
        "unet presets": (UNetPreset, set(UNET_PRESETS)),
        "text-encoder presets": (TextEncoderPreset, set(TEXT_ENCODER_PRESETS)),
        "families": (C.BuiltinFamily, builtin),
        "quantization": (C.QuantizeMode, set(MODES)),
    }


@pytest.mark.parametrize("what", list(_registries()))
def test_each_choice_literal_equals_its_registry(what):
    literal, registry = _registries()[what]
    assert set(typing.get_args(literal)) == registry, what


def test_config_fields_use_the_choice_literals():
    hints = {cls: typing.get_type_hints(cls) for cls in (C.ModelConfig, C.TrainConfig, C.OptimConfig,
                                                         C.OutputConfig, C.SampleConfig, LoRAOptions)}
    uses = [
        (C.ModelConfig, "dtype", C.Precision), (C.ModelConfig, "vae_dtype", C.Precision),
        (C.ModelConfig, "prediction_type", C.PredictionType), (C.TrainConfig, "mixed_precision", C.MixedPrecision),
        (C.TrainConfig, "gradient_checkpointing", C.Checkpointing), (C.OptimConfig, "name", C.OptimizerName),
        (C.OptimConfig, "scheduler", C.SchedulerName), (C.OutputConfig, "export_dtype", C.Precision),
        (C.SampleConfig, "sampler", C.SamplerName), (LoRAOptions, "preset", UNetPreset),
        (C.TrainConfig, "loss", C.LossType), (C.TrainConfig, "huber_schedule", C.HuberSchedule),
        (C.TrainConfig, "timestep_sampling", C.TimestepSampling),
        (C.ModelConfig, "quantize", C.QuantizeMode), (C.ModelConfig, "quantize_text_encoders", C.QuantizeMode),
    ]
    for cls, name, literal in uses:
        assert _choices(hints[cls][name]) == set(typing.get_args(literal)), f"{cls.__name__}.{name}"
    assert typing.get_type_hints(C.Config)["lora"] is LoRAOptions


def test_precision_names_map_to_torch_dtypes():
    import torch

    for name in typing.get_args(C.Precision):
        assert isinstance(C.torch_dtype(name), torch.dtype)


def test_a_family_registered_by_a_plug_in_is_accepted():
    from dataclasses import replace

    from models.families import FAMILIES, register_family, unregister_family

    spec = register_family(replace(FAMILIES["tiny-sd15"], name="plugin-tiny"))
    try:
        cfg = C.load_config(None, ["model.source=plugin-tiny", f"data.path={ROOT / 'examples' / 'quickstart_data'}"])
        assert cfg.model.source == spec.name
    finally:
        unregister_family("plugin-tiny")
    with pytest.raises(C.ConfigError, match=r"model\.family: must be one of .*got 'plugin-tiny'"):
        C.load_config(None, ["model.family=plugin-tiny"])


# ---- no torch -------------------------------------------------------------------------------------
_NO_TORCH = ("assert 'torch' not in sys.modules, "
             "sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'trainer', 'data'))")


@pytest.mark.parametrize("name", ["quickstart.yaml", "sdxl_lora.yaml", "sd15_lora.yaml", "sdxl_character.yaml"])
def test_loading_and_checking_a_config_imports_no_torch(name):
    key = "data.subsets.0.path" if name == "sdxl_character.yaml" else "data.path"
    code = ("import sys; from trainer.config import load_config; "
            f"load_config('configs/{name}', ['{key}=examples/quickstart_data']); {_NO_TORCH}")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.parametrize("name", ["sdxl_lora.yaml", "sdxl_character.yaml"])
def test_cli_check_imports_no_torch(name):
    code = (f"import runpy, sys; sys.argv = ['trainer', '--config', 'configs/{name}', '--check']\n"
            "try:\n    runpy.run_module('trainer', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            f"{_NO_TORCH}")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "config OK" in out.stderr
