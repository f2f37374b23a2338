"""Bad training data: corrupt, truncated, empty, CMYK, RGBA, 16-bit, EXIF-rotated, oversized
(decompression-bomb guard), tiny images and empty / missing / non-UTF-8 captions.

Training runs on what is usable and names every bad file exactly once, whether it is found by
the scan or only when decoded (a JPEG with 0xFF bytes written over its entropy-coded middle has
an intact header and end marker, so only decoding finds it); `data.strict: true` stops before any
model is built and lists them all.
"""
import io
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from training_runs import TINY_LORA

import trainer.__main__ as cli
from trainer.config import load_config
from trainer.recipe import LoRATrainingRecipe

MAX_PIXELS = 100_000
# Unusable images, found by the scan or (midcorrupt.jpg) only when decoded.
BAD_IMAGES = ["corrupt.png", "truncated.png", "zero.jpg", "bomb.png", "tiny.png", "midcorrupt.png", "midcorrupt.jpg"]
LATE = "midcorrupt.jpg"
BAD_CAPTIONS = ["latin1_caption.txt"]
# Usable odd images and captions: trained on, never reported as problems.
ODD_BUT_FINE = ["cmyk.jpg", "rgba.png", "gray16.png", "exif_rot.jpg"]
NO_CAPTION = ["empty_caption.png", "missing_caption.png"]
RUN = ["output.tensorboard=false", "optim.warmup_steps=0", "train.batch_size=2", "train.max_steps=8",
       "train.save_every=0", "data.resolution=64", "data.bucket_step=32", f"data.max_pixels={MAX_PIXELS}"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_data")
    rng = np.random.default_rng(0)

    def rgb(w: int, h: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")

    def caption(name: str, text: str) -> None:
        (out / name).with_suffix(".txt").write_text(text)

    for i in range(4):
        rgb(96, 96).save(out / f"good{i}.png")
        caption(f"good{i}.png", f"a good image {i}")
    (out / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    data = _png(rgb(96, 96))
    (out / "truncated.png").write_bytes(data[: len(data) // 2])
    middle = bytearray(_png(rgb(96, 96)))
    middle[len(middle) // 2: len(middle) // 2 + 200] = bytes(200)  # header and IEND intact
    (out / "midcorrupt.png").write_bytes(bytes(middle))
    buf = io.BytesIO()
    rgb(96, 96).save(buf, "JPEG", quality=90)
    middle = bytearray(buf.getvalue())
    middle[len(middle) // 2: len(middle) // 2 + 400] = b"\xff" * 400  # SOI/EOI intact
    (out / "midcorrupt.jpg").write_bytes(bytes(middle))
    (out / "zero.jpg").write_bytes(b"")
    rgb(400, 400).save(out / "bomb.png")  # 160000 pixels > MAX_PIXELS
    rgb(10, 10).save(out / "tiny.png")  # below min_size
    rgb(96, 96).convert("CMYK").save(out / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (96, 96, 4), dtype=np.uint8), "RGBA").save(out / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (96, 96), dtype=np.uint16)).save(out / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 128x96, shown 96x128
    rgb(128, 96).save(out / "exif_rot.jpg", exif=exif.tobytes())
    for name in BAD_IMAGES + ODD_BUT_FINE:
        caption(name, name.replace(".", " "))
    rgb(96, 96).save(out / "empty_caption.png")
    caption("empty_caption.png", "")
    rgb(96, 96).save(out / "missing_caption.png")
    rgb(96, 96).save(out / "latin1_caption.png")
    (out / "latin1_caption.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    assert Image.open(out / "gray16.png").mode == "I;16" and Image.open(out / "cmyk.jpg").mode == "CMYK"
    return out


def _name_counts(text: str, names: list[str]) -> dict[str, int]:
    """How many lines of `text` name each file (`corrupt.png`, not `midcorrupt.png`)."""
    lines = text.splitlines()
    return {n: sum(bool(re.search(rf"(?<![\w-]){re.escape(n)}", line)) for line in lines) for n in names}


@pytest.fixture
def user_log(capfd):
    """What a user of the command line sees: log records of every process (DataLoader workers
    are forked and inherit the handler) written to stderr, as `logging.basicConfig` does."""
    class ToStderr(logging.Handler):
        def emit(self, record):
            os.write(2, (self.format(record) + "\n").encode())

    handler = ToStderr()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    capfd.readouterr()

    def read() -> str:
        return capfd.readouterr().err.replace("\r", "\n")

    yield read
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.mark.parametrize("overrides", [["data.cache_latents=true", "data.num_workers=0"],
                                       ["data.cache_latents=false", "data.num_workers=2"]],
                         ids=["cached-latents", "decoded-in-workers"])
def test_training_survives_bad_data_and_names_each_bad_file_once(bad_data, tmp_path, user_log, overrides):
    cfg = load_config(TINY_LORA, [f"output.dir={tmp_path}", f"data.path={bad_data}", *RUN, *overrides])
    recipe = LoRATrainingRecipe(cfg)
    summary = recipe.run()
    log_text = user_log()
    assert summary.completed and all(np.isfinite(summary.losses)) and len(summary.losses) == 8
    assert (tmp_path / "quickstart" / "quickstart.safetensors").is_file()

    used = {Path(r.name).name for r in recipe.dataset.records}
    assert set(ODD_BUT_FINE + NO_CAPTION + ["latin1_caption.png"]) <= used
    assert not (set(BAD_IMAGES) - {LATE}) & used  # skipped by the scan
    # 12 usable images (midcorrupt.jpg passes the scan) = 6 batches per epoch: 8 steps cover 2 epochs
    assert len(recipe.loader) == 6

    counts = _name_counts(log_text, BAD_IMAGES + BAD_CAPTIONS + ODD_BUT_FINE)
    assert {n: counts[n] for n in BAD_IMAGES + BAD_CAPTIONS} == dict.fromkeys(BAD_IMAGES + BAD_CAPTIONS, 1), log_text
    assert {n: counts[n] for n in ODD_BUT_FINE} == dict.fromkeys(ODD_BUT_FINE, 0), log_text
    for name, reason in (("zero.jpg", "empty file"), ("bomb.png", "max_pixels"), ("tiny.png", "too small"),
                         ("truncated.png", "truncated"), ("midcorrupt.png", "corrupt"), (LATE, "corrupt"),
                         ("latin1_caption", "UTF-8")):
        line = next(line for line in log_text.splitlines() if name in line)
        assert reason in line, line


def test_strict_mode_lists_every_bad_file_before_loading_a_model(bad_data, tmp_path, monkeypatch, capsys, caplog):
    import models
    import models.bundle

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data scan rejected the data")

    monkeypatch.setattr("models.build_model", no_model)
    monkeypatch.setattr(models.bundle, "build_model", no_model)
    caplog.set_level(logging.INFO)
    rc = cli.main(["--config", str(TINY_LORA), f"output.dir={tmp_path}", f"data.path={bad_data}", *RUN,
                   "data.strict=true", "data.num_workers=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"strict mode: {len(BAD_IMAGES + BAD_CAPTIONS)} problem(s)" in err, err
    everything = err + "\n" + "\n".join(r.getMessage() for r in caplog.records)
    counts = _name_counts(everything, BAD_IMAGES + BAD_CAPTIONS + ODD_BUT_FINE)
    assert {n: counts[n] for n in BAD_IMAGES + BAD_CAPTIONS} == dict.fromkeys(BAD_IMAGES + BAD_CAPTIONS, 1), everything
    assert not any(counts[n] for n in ODD_BUT_FINE), everything
    assert not (tmp_path / "quickstart" / "checkpoints").exists()
    assert models.build_model is no_model  # still patched: nothing was restored by accident


def test_strict_mode_accepts_clean_odd_images(bad_data, tmp_path):
    """Odd but valid files (CMYK, RGBA, 16-bit, EXIF-rotated, no/empty caption) pass strict mode."""
    clean = tmp_path / "clean"
    clean.mkdir()
    bad_stems = {Path(n).stem for n in BAD_IMAGES + BAD_CAPTIONS}
    for path in bad_data.iterdir():
        if path.stem not in bad_stems:
            shutil.copy(path, clean / path.name)
    from data.config import DataConfig
    from data.dataset import build_dataset

    cfg = DataConfig(path=str(clean), resolution=64, bucket_step=32, max_pixels=MAX_PIXELS, strict=True)
    dataset = build_dataset(cfg, log_summary=False)
    names = {Path(r.name).name for r in dataset.records}
    assert set(ODD_BUT_FINE + NO_CAPTION) <= names and len(names) == 10
    rotated = next(r for r in dataset.records if r.name.endswith("exif_rot.jpg"))
    assert (rotated.width, rotated.height) == (96, 128)  # EXIF orientation applied
