"""Exporting a trained VAE: latent statistics, the latent scale, the file, and reading VAEs back.

The file `<name>.safetensors` holds the ldm single-file VAE layout with no prefix (`encoder.*`,
`decoder.*`, `quant_conv.*`, `post_quant_conv.*`), as Stability's `sdxl_vae.safetensors`: what
`model.vae` / `load_model(..., vae=path)` and ComfyUI's VAE loader read. Its metadata records the
`VAEConfig` (`lorasmith.vae_config`, JSON) and the latent statistics (`lorasmith.latent_stats`);
`<name>.json` beside it holds both plus the equivalent diffusers `config.json` dict.

Latent scale (`output.latent_scale`): the diffusion model sees `(z - shift) * scaling_factor` and
wants it near unit variance. `config` sets `scaling_factor = 1 / std(z)` (and optionally `shift =
mean(z)`) as SD did. `fold` instead rewrites the two 1x1 convolutions next to the latent so that
every channel comes out with mean 0 and std 1 / the preset's scaling factor:

    quant_conv:      mean' = a (mean - m),  logvar' = logvar + 2 ln a     (a = target / std, per channel)
    post_quant_conv: W' = W / a (per input channel),  b' = b + W m

The decoder then maps z' exactly where it mapped z (up to float rounding), the posterior's
spread scales with it, and the family's fixed constant is right in every loader.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from models.checkpoints.diffusers_keys import (
    vae_config_to_diffusers,
    vae_state_dict_to_diffusers,
)
from models.checkpoints.fileio import write_json
from models.checkpoints.safetensors_io import save_file
from models.vae import AutoencoderKL, VAEConfig

CONFIG_KEY = "lorasmith.vae_config"
STATS_KEY = "lorasmith.latent_stats"


# ---- statistics -------------------------------------------------------------------------------
@torch.no_grad()
def latent_stats(vae: AutoencoderKL, images, generator: torch.Generator) -> dict:
    """Statistics of posterior samples z (unscaled) over `images`, an iterable of (B, 3, H, W)
    batches in [-1, 1]: per-channel and global mean / std, the mean posterior std (how much of z
    is noise), and the std of the scaled latents `vae.scale_latents(z)`."""
    sums = sq = count = noise = None
    for batch in images:
        post = vae.encode(batch.to(vae.device, vae.dtype))
        z = post.sample(generator).double()
        if sums is None:
            sums, sq, noise = z.new_zeros(z.shape[1]), z.new_zeros(z.shape[1]), z.new_zeros(z.shape[1])
            count = 0
        sums += z.sum((0, 2, 3))
        sq += z.square().sum((0, 2, 3))
        noise += post.std.double().sum((0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    if count is None:
        raise ValueError("latent_stats: no images")
    mean_c = sums / count
    var_c = (sq / count - mean_c.square()).clamp_min(0)
    mean = float(mean_c.mean())
    var = float((sq.sum() / (count * len(sums))) - mean ** 2)
    std = math.sqrt(max(var, 0.0))
    cfg = vae.config
    scaled_mean = (mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
    return {
        "count": int(count),
        "mean": mean,
        "std": std,
        "channel_mean": [float(v) for v in mean_c],
        "channel_std": [float(v) for v in var_c.sqrt()],
        "posterior_std": [float(v) for v in noise / count],
        "scaled_mean": scaled_mean,
        "scaled_std": std * cfg.scaling_factor,
    }


# ---- latent scale -----------------------------------------------------------------------------
@torch.no_grad()
def fold_latent_normalization(vae: AutoencoderKL, channel_mean, channel_std, target_std: float) -> None:
    """Rewrite `quant_conv` / `post_quant_conv` in place so latent channel c becomes
    (z_c - channel_mean[c]) * target_std / channel_std[c] (see the module docstring)."""
    if vae.quant_conv is None:
        raise ValueError("fold_latent_normalization: this VAE has no quant_conv / post_quant_conv (Flux.1 layout); "
                         "use latent_scale: config")
    c = vae.config.z_channels
    m = torch.as_tensor(channel_mean, dtype=torch.float64)
    std = torch.as_tensor(channel_std, dtype=torch.float64)
    floor = 1e-6 * max(float(std.max()), 1e-12)  # a dead channel stays dead instead of dividing by 0
    a = target_std / std.clamp_min(floor)
    q, p = vae.quant_conv, vae.post_quant_conv
    wq, bq = q.weight.double(), q.bias.double()
    wq[:c] *= a.view(c, 1, 1, 1)
    bq[:c] = a * (bq[:c] - m)
    bq[c:] += 2.0 * torch.log(a)
    wp, bp = p.weight.double(), p.bias.double()
    bp += wp[:, :, 0, 0] @ m
    wp /= a.view(1, c, 1, 1)
    for param, value in ((q.weight, wq), (q.bias, bq), (p.weight, wp), (p.bias, bp)):
        param.copy_(value.to(param.dtype))


def exported_config(config: VAEConfig, stats: dict, mode: str, shift: bool) -> VAEConfig:
    """The config written with the weights: `fold` keeps the preset's constants (the weights were
    normalised to them); `config` sets scaling_factor = 1 / std (and shift_factor = mean)."""
    if mode == "fold":
        return config
    if not stats["std"] > 0:
        raise ValueError("the latents have zero variance (a collapsed encoder); cannot set a scaling factor")
    shift_factor = stats["mean"] if shift else None
    return VAEConfig(**{**asdict(config), "scaling_factor": 1.0 / stats["std"], "shift_factor": shift_factor})


# ---- files ------------------------------------------------------------------------------------
def config_json(config: VAEConfig) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}, sort_keys=True)


def write_vae(vae: AutoencoderKL, path: str | Path, config: VAEConfig, stats: dict | None, *,
              dtype: torch.dtype | None = None, resolution: int | None = None, extra: dict | None = None) -> Path:
    """Write the ldm-layout file `path` (+ `<stem>.json`): `vae`'s weights (in `dtype`, None keeps
    theirs) with `config` (whose constants may differ from `vae.config`) in the metadata."""
    path = Path(path)
    metadata = {"format": "pt", CONFIG_KEY: config_json(config)}
    if stats is not None:
        metadata[STATS_KEY] = json.dumps(stats)
    save_file(vae.state_dict(), path, metadata=metadata, dtype=dtype)
    info = {"config": json.loads(config_json(config)), "diffusers_config": vae_config_to_diffusers(config, resolution),
            "latent_stats": stats, **(extra or {})}
    write_json(path.with_suffix(".json"), info)
    return path


def write_diffusers_folder(vae: AutoencoderKL, folder: str | Path, config: VAEConfig, *,
                           dtype: torch.dtype | None = None, resolution: int | None = None) -> Path:
    """A diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", vae_config_to_diffusers(config, resolution))
    save_file(vae_state_dict_to_diffusers(vae.state_dict(), config), folder / "diffusion_pytorch_model.safetensors",
              metadata={"format": "pt"}, dtype=dtype)
    return folder


def read_vae(path: str | Path, like: VAEConfig | None = None, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu") -> AutoencoderKL:
    """An `AutoencoderKL` from a VAE file or folder: a file written by `write_vae` (its recorded
    config), an ldm-named VAE (bare or `first_stage_model.*`, also inside a full checkpoint), a
    diffusers-named file, or a diffusers VAE / pipeline folder. `like` supplies what shapes do not
    tell (norm groups, latent constants) for files without a recorded config; default the SDXL VAE.
    dtype None keeps the stored dtype. Raises ModelLoadError naming the file."""
    from models.checkpoints.components import (
        folder_vae,
        open_weights,
        shapes_of,
        vae_from_diffusers_store,
    )
    from models.checkpoints.materialize import ModelLoadError, Part, load_part
    from models.checkpoints.single_file import (
        VAE_PREFIX,
        infer_vae_config,
        is_ignored,
        same_vae_shapes,
    )

    path = Path(path)
    like = like or VAEConfig()
    if path.is_dir():
        folder = path / "vae" if (path / "model_index.json").is_file() else path
        part = folder_vae(folder, None, False, False)
    else:
        store = open_weights(path)
        recorded = store.metadata.get(CONFIG_KEY)
        config = VAEConfig(**json.loads(recorded)) if recorded else None
        keys = list(store)
        if any(k.startswith("encoder.down_blocks.") for k in keys):
            part = vae_from_diffusers_store(store, config or like)
        else:
            prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in keys) else ""
            sources = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and not is_ignored(k)}
            if not {"encoder.conv_in.weight", "decoder.conv_in.weight"} & set(sources):
                sample = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
                raise ModelLoadError(f"{path} holds no VAE ({len(keys)} tensors like {sample}); expected ldm names "
                                     "('encoder.conv_in.weight', optionally under 'first_stage_model.') or "
                                     "diffusers names ('encoder.down_blocks.*')")
            if config is None:
                shapes = shapes_of(sources, store)
                try:
                    inferred = infer_vae_config(shapes, like)
                except (KeyError, ValueError, IndexError, ZeroDivisionError):
                    inferred = like  # not a VAE: validate_parts names what is missing
                config = like if same_vae_shapes(inferred, like) else inferred
            part = Part("vae", config, store, sources, label=dict(sources), prefix=prefix)
    return load_part(part, "sdxl", None, dtype, device).train(False)


# ---- images -----------------------------------------------------------------------------------
def image_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """uint8 (rows*H, N*W, 3) grid of (N, 3, H, W) [-1, 1] tensors, one tensor per row."""
    lines = []
    for row in rows:
        pixels = ((row.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        lines.append(pixels.permute(2, 0, 3, 1).reshape(row.shape[2], -1, 3))
    return torch.cat(lines, 0).cpu().numpy()


def save_grid(rows: list[torch.Tensor], path: str | Path) -> Path:
    """Write `image_grid(rows)` as a PNG (atomically)."""
    import io

    from PIL import Image

    from models.checkpoints.fileio import write_bytes

    buffer = io.BytesIO()
    Image.fromarray(image_grid(rows)).save(buffer, format="PNG")
    return write_bytes(path, buffer.getvalue())
