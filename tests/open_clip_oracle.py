"""The open_clip text-tower oracle as recorded data, so tests need neither open_clip nor the
torchvision it requires.

tests/fixtures/open_clip_text_tower.safetensors holds one tiny random OpenCLIP `TextTransformer`
(width 64, 3 layers, MLP 128, projection 64: our `tiny-bigg` shapes) and open_clip's outputs for
fixed token ids, with 2 heads and with 1 head. tests/fixtures/make_open_clip_fixtures.py wrote it
with open_clip itself; rerun that script to regenerate.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "open_clip_text_tower.safetensors"


def _read() -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(FIXTURE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["tower"])


def tower_config() -> dict:
    """context_length, vocab_size, width, layers, mlp, output_dim of the recorded tower."""
    return _read()[1]


def tower_state_dict() -> dict[str, torch.Tensor]:
    """The tower's state dict as open_clip names it (`transformer.resblocks.0.attn.in_proj_weight`,
    `text_projection`, ...), float32. Token-embedding rows no recorded id uses are zero."""
    tensors, config = _read()
    sd = {k.removeprefix("weights."): v.float() for k, v in tensors.items()
          if k.startswith("weights.") and not k.startswith("weights.token_embedding.")}
    embedding = torch.zeros(config["vocab_size"], config["width"])
    embedding[tensors["weights.token_embedding.ids"]] = tensors["weights.token_embedding.rows"].float()
    sd["token_embedding.weight"] = embedding
    return sd


def token_ids(case: str) -> torch.Tensor:
    """(B, 77) int64 ids of a recorded case: `bigg.pad_eos`, `bigg.pad_zero` (5 rows, EOS at
    1, 9, 40, 75, 76, padded with EOS / 0) or `loading` (2 rows, one of each padding)."""
    return _read()[0][f"ids.{case}"]


def outputs(heads: int, case: str) -> dict[str, torch.Tensor]:
    """open_clip's outputs for `token_ids(case)` with `heads` attention heads: `hidden.<i>` (B, 77,
    64) after layer i (before ln_final), `final` = ln_final(last), `pooled` (B, 64) = the
    projected EOS feature. Only the entries the tests read were recorded."""
    prefix = f"heads{heads}.{case}."
    return {k.removeprefix(prefix): v for k, v in _read()[0].items() if k.startswith(prefix)}
