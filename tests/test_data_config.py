"""DataConfig / SubsetConfig: defaults, inheritance, and errors that name the field."""
import pytest

from data.config import DataConfig, SubsetConfig
from data.errors import DataConfigError


def test_defaults_and_inheritance(tmp_path):
    cfg = DataConfig()
    assert cfg.resolution == 1024 and cfg.strict is False and cfg.background == (255, 255, 255)
    assert cfg.resolved_subsets() == []
    cfg = DataConfig(subsets=[{"path": "a", "repeats": 3, "caption_extension": "caption"}, SubsetConfig(path="b")],
                     repeats=2, resolution=512, shuffle_tags=True, background="#102030")
    a, b = cfg.resolved_subsets()
    assert (a.repeats, b.repeats) == (3, 2) and a.caption_extension == ".caption" and b.caption_extension == ".txt"
    assert a.resolution == b.resolution == 512 and a.shuffle_tags and a.name == "a"
    assert cfg.background == (16, 32, 48)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"tag_dropout": 1.5}, r"^tag_dropout: must be a probability"),
    ({"repeats": 0}, r"^repeats: must be >= 1"),
    ({"bucket_step": 30}, r"^bucket_step: must be a multiple of 8"),
    ({"bucket_min_side": 100}, r"^bucket_min_side: must be a multiple of bucket_step"),
    ({"resolution": 1020}, r"resolution: must be a multiple of 8"),
    ({"background": "not-a-colour"}, r"^background: unknown colour"),
    ({"flip": "yes"}, r"^flip: expected true or false"),
    ({"caption_extension": ".png"}, r"^caption_extension: '.png' is an image extension"),
    ({"path": "a", "subsets": [{"path": "b"}]}, r"^path: give either"),
    ({"subsets": [{"path": "b", "repeat": 2}]}, r"^subsets\[0\]\.repeat: unknown key; did you mean 'repeats'"),
    ({"subsets": [{"path": "b", "keep_tokens": -1}]}, r"^subsets\[0\]\.keep_tokens: must be >= 0"),
    ({"subsets": [{"path": "b", "random_crop": True}], "cache_latents": True}, r"^subsets\[0\]\.random_crop: cannot"),
    ({"tag_dropout": 0.1, "cache_text": True}, r"^tag_dropout: cannot be combined with cache_text"),
    ({"cache_dtype": "int8"}, r"^cache_dtype"),
])
def test_errors_name_the_field(kwargs, pattern):
    with pytest.raises(DataConfigError, match=pattern):
        DataConfig(**kwargs)


def test_from_dict_and_sources(tmp_path):
    with pytest.raises(DataConfigError, match="resolutoin: unknown key; did you mean 'resolution'"):
        DataConfig.from_dict({"path": "x", "resolutoin": 512})
    with pytest.raises(DataConfigError, match="no training images given"):
        DataConfig().check_sources()
    with pytest.raises(DataConfigError, match="subsets\\[1\\].path: .* does not exist"):
        DataConfig(subsets=[{"path": str(tmp_path)}, {"path": str(tmp_path / "nope")}]).check_sources()
    DataConfig(path="someone/some-dataset").check_sources()  # hub id: accepted without network
    assert DataConfig.from_dict({"path": str(tmp_path), "flip": True}).flip is True
