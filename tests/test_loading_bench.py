"""trainer.bench.load on a tiny family: generation writes loadable checkpoints in both layouts and
a measurement reports peak RSS / timings (the full-size run is manual, see the module docstring)."""
import pytest
import torch

from models.checkpoints.loading import load_model
from trainer.bench import load as bench_load


@pytest.mark.parametrize("layout", ["single-file", "diffusers"])
def test_generate_and_measure_tiny(tmp_path, layout):
    source = bench_load.generate(layout, tmp_path, "tiny-sdxl")
    bundle = load_model(source)
    assert bundle.family == "tiny-sdxl" and bundle.unet.dtype == torch.float16
    result = bench_load.measure(source, "auto")
    # everything but the single file's constant extras (position_ids, logit_scale) is a parameter
    extras = (77 * 8 + 2) if layout == "single-file" else 0
    assert result["param_bytes"] == bench_load.file_tensor_bytes(source) - extras
    assert result["peak_rss"] >= result["rss_before"] > 0 and result["ready_s"] >= result["load_s"] > 0
