"""The config checker on the training-recipe keys: impossible or senseless combinations are refused
before any model loads, naming the key and the reason; the missing wandb package is one line."""
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "quickstart_data"


def _load(*overrides):
    return load_config(None, [f"data.path={DATA}", *overrides])


@pytest.mark.parametrize("overrides, pattern", [
    (["train.debiased_estimation=true", "train.min_snr_gamma=5"],
     r"train\.debiased_estimation: cannot be combined with train\.min_snr_gamma: both weight the loss by the SNR"),
    (["train.debiased_estimation=true", "train.zero_terminal_snr=true", "model.source=sd15"],
     r"train\.debiased_estimation: .*SNR 0.*1/sqrt\(0\)"),
    (["train.huber_c=0"], r"train\.huber_c: must be in \(0, 1\]"),
    (["train.loss=hubber"], r"train\.loss: must be one of .*did you mean 'huber'"),
    (["train.huber_schedule=linear"], r"train\.huber_schedule: must be one of 'constant', 'exponential', 'snr'"),
    (["train.timestep_sampling=logit"], r"train\.timestep_sampling: .*did you mean 'logit_normal'"),
    (["train.logit_std=0"], r"train\.logit_std: must be > 0"),
    (["train.timestep_shift=-1"], r"train\.timestep_shift: must be > 0"),
    (["train.multires_noise_discount=0"], r"train\.multires_noise_discount: must be in \(0, 1\]"),
    (["train.ip_noise_gamma=-0.1"], r"train\.ip_noise_gamma: must be >= 0"),
    (["train.unmasked_weight=1.5"], r"train\.unmasked_weight: must be in \[0, 1\]"),
    (["data.alpha_mask=true"], r"data\.alpha_mask: .*train\.masked_loss is false"),
    (["train.prior_loss_weight=-1"], r"train\.prior_loss_weight: must be >= 0"),
    (["train.ema_decay=1.0"], r"train\.ema_decay: must be in \[0, 1\)"),
    (["train.ema_decay=0.9", "train.ema_every=0"], r"train\.ema_every: must be >= 1"),
    (["sample.use_ema=true"], r"sample\.use_ema: needs the EMA weights, but train\.ema_decay is null"),
    (["train.ema_decay=0.9", "optim.name=adamw_schedulefree"],
     r"train\.ema_decay: cannot be combined with optim\.name=adamw_schedulefree"),
    (["optim.name=adamw_schedulefree", "optim.scheduler=cosine"],
     r"optim\.scheduler: 'cosine' cannot be used with optim\.name=adamw_schedulefree"),
    (["optim.name=prodigy", "optim.lr=1.0", "optim.lora_plus_ratio=16"],
     r"optim\.lora_plus_ratio: .*Prodigy \(prodigyopt\) does not support"),
    (["optim.name=prodigy", "optim.lr=1.0", "optim.te_lr=0.5"], r"optim\.te_lr: .*Prodigy"),
    (["optim.name=prodigy", "optim.lr=1.0", "optim.down_lr_weight=0.5"], r"optim\.down_lr_weight: .*Prodigy"),
    (["optim.growth_rate=1"], r"optim\.growth_rate: must be > 1 or null"),
    (["optim.d0=0"], r"optim\.d0: must be > 0"),
    (["optim.lora_plus_ratio=0"], r"optim\.lora_plus_ratio: must be > 0"),
    (["optim.block_lr_weight=[1, 1]", "optim.mid_lr_weight=0.5"],
     r"optim\.block_lr_weight: gives every block's multiplier; drop optim\.mid_lr_weight"),
    (["optim.up_lr_weight=[1, -1]"], r"optim\.up_lr_weight: multipliers must be >= 0"),
    (["lora.block_ranks=[4, -1]"], r"lora\.block_ranks: needs one value per UNet block, each >= 0"),
    (["validation.split=0.1", f"validation.path={DATA}"], r"validation\.split: cannot be combined with validation\.path"),
    (["validation.split=1.0"], r"validation\.split: must be a fraction in \[0, 1\)"),
    (["validation.every=10"], r"validation\.every: is set but there are no validation images"),
    (["validation.path=/no/such/folder"], r"validation\.path: '/no/such/folder' does not exist"),
    (["validation.timesteps=[]", "validation.split=0.1"], r"validation\.timesteps: is empty"),
    (["validation.timesteps=[1000]"], r"validation\.timesteps: timesteps must lie in \[0, 1000\)"),
    (["output.wandb=''"], r"output\.wandb: is empty"),
    (["data.subsets=[{path: x, is_reg: maybe}]", "data.path=null"], r"data\.subsets\[0\]\.is_reg: expected true or false"),
])
def test_recipe_keys_are_checked(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _load(*overrides)


def test_good_combinations_pass():
    cfg = _load("train.loss=smooth_l1", "train.huber_schedule=exponential", "train.debiased_estimation=true",
                "model.prediction_type=v_prediction", "train.zero_terminal_snr=true", "train.masked_loss=true",
                "data.alpha_mask=true", "train.ema_decay=0", "sample.use_ema=true", "sample.prompts=[x]",
                "optim.name=prodigy", "optim.lr=1.0", "optim.block_lr_weight=[0, 1, 1]", "validation.split=0.1",
                "validation.every=5", "train.timestep_sampling=logit_normal", "train.multires_noise_iterations=6",
                "train.ip_noise_gamma=0.1", "train.noise_offset=0.05", "output.wandb=proj")
    assert cfg.train.loss == "smooth_l1" and cfg.validation.every == 5 and cfg.optim.block_lr_weight == [0, 1, 1]


def test_missing_wandb_stops_before_the_model_loads(tmp_path, monkeypatch):
    from trainer.monitor import WandbUnavailable
    from trainer.recipe import LoRATrainingRecipe

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr("trainer.recipe.LoRATrainingRecipe._setup_accelerator",
                        lambda self: pytest.fail("got past the package check"))
    with pytest.raises(WandbUnavailable) as info:
        LoRATrainingRecipe(_load(f"output.dir={tmp_path}", "output.wandb=proj")).setup()
    assert "\n" not in str(info.value) and "pip install 'lorasmith[wandb]'" in str(info.value)
