"""`open_model(<family name>, vae=...)`: a trained VAE under random-weight parts (training a model
from scratch on a VAE trained first). Tiny models written here, CPU, fp32."""
import pytest
import torch

from models import build_model
from models.checkpoints.loading import ModelLoadError
from models.checkpoints.open import open_model
from models.checkpoints.safetensors_io import save_file


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    """A tiny-sdxl VAE file in the ldm layout the VAE recipe exports (no prefix), with weights
    unlike the family's seed-0 ones."""
    vae = build_model("tiny-sdxl", seed=7).vae
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_file(vae.state_dict(), path, metadata={"format": "pt"})
    return path, vae.state_dict()


def test_family_source_takes_the_vae_file(trained_vae):
    path, expected = trained_vae
    got = open_model("tiny-sdxl", vae=str(path), seed=0)
    reference = build_model("tiny-sdxl", seed=0)
    for name, tensor in got.vae.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # The other parts stay the family's random init, the latent scaling the family's.
    for name, tensor in got.denoiser.state_dict().items():
        assert torch.equal(tensor, reference.denoiser.state_dict()[name]), name
    assert got.vae.config.scaling_factor == reference.vae.config.scaling_factor
    assert not got.vae.training and not any(p.requires_grad for p in got.vae.parameters())


def test_family_source_vae_is_checked_like_a_checkpoints(trained_vae, tmp_path):
    _, state = trained_vae
    broken = dict(state)
    del broken["decoder.conv_out.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(broken, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing.*decoder.conv_out.weight"):
        open_model("tiny-sdxl", vae=str(path))
    with pytest.raises(ModelLoadError, match="model.vae.*does not exist"):
        open_model("tiny-sdxl", vae=str(tmp_path / "absent.safetensors"))


def test_family_source_still_refuses_a_separate_unet(trained_vae):
    path, _ = trained_vae
    with pytest.raises(ModelLoadError, match="unet.*random-weight family source"):
        open_model("tiny-sdxl", unet=str(path))
