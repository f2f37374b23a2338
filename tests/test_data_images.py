"""Image reading: every PIL mode to RGB, EXIF orientation, broken files, pixel limits, crop/flip geometry."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import ImageLoadError, load_image, probe_image, to_rgb
from data.transforms import cover_size, plan_crop, render, to_tensor


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16_rgb(arr: np.ndarray) -> bytes:
    """16-bit RGB PNG (PIL cannot write one): arr uint16 (H, W, 3)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _rgb(data: bytes, background=(255, 255, 255)) -> np.ndarray:
    img = load_image(data, background=background)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_rgba_and_la_composited_on_background():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:2, :, 3] = 0  # top half transparent
    rgba[2:, :, 3] = 128  # bottom half 50%
    data = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    white = _rgb(data)
    assert (white[0, 0] == [255, 255, 255]).all()
    assert abs(white[3, 0, 1] - 127) <= 2 and white[3, 0, 0] == 255
    black = _rgb(data, background=(0, 0, 0))
    assert (black[0, 0] == [0, 0, 0]).all() and abs(black[3, 0, 0] - 128) <= 2
    la = Image.fromarray(np.stack([np.full((4, 4), 200, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert (_rgb(_encode(la, "PNG"), background=(10, 20, 30))[0, 0] == [10, 20, 30]).all()


def test_palette_with_transparency_and_plain_modes():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 1)
    data = _encode(p, "PNG", transparency=0)
    out = _rgb(data, background=(0, 255, 0))
    assert (out[0, 0] == [0, 0, 255]).all() and (out[1, 1] == [0, 255, 0]).all()
    assert (_rgb(_encode(Image.new("L", (3, 3), 77), "PNG"))[1, 1] == 77).all()
    assert (_rgb(_encode(Image.new("1", (3, 3), 1), "BMP"))[0, 0] == 255).all()
    cmyk = _rgb(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert cmyk[4, 4, 0] > 200 and cmyk[4, 4, 1] < 60 and cmyk[4, 4, 2] < 60  # red


def test_sixteen_bit_images_are_scaled_not_clipped():
    gray = np.array([[0, 32896, 65535]], np.uint16)
    img16 = Image.fromarray(gray)
    assert img16.mode.startswith("I;16")
    out = _rgb(_encode(img16, "PNG"))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32896, 257
    out = _rgb(_png16_rgb(rgb16))
    assert out[0, 0].tolist() == [255, 128, 1]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert to_rgb(f).getpixel((1, 0))[0] in (127, 128)


def test_exif_orientation_rotates_size_and_pixels():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:10, :10] = [255, 0, 0]  # red block at stored top-left
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    data = _encode(img, "JPEG", quality=95, exif=exif.tobytes())
    info = probe_image(data)
    assert (info.width, info.height) == (40, 60)
    out = _rgb(data)
    assert out.shape == (60, 40, 3)
    assert out[3, 36, 0] > 200 and out[3, 3, 0] < 60  # top-left block now at the top-right


def test_broken_files_raise_with_reason(tmp_path):
    good = _encode(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")
    png = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    cases = {
        "empty.jpg": (b"", "empty"),
        "text.png": (b"this is not an image at all", "not an image"),
        "trunc.jpg": (good[: len(good) // 2], "truncated"),
        "trunc.png": (png[: len(png) // 2], "truncated"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageLoadError, match=reason):
            probe_image(str(path))
        with pytest.raises(ImageLoadError):
            load_image(str(path))
    # data after the JPEG end marker is legal: a full decode confirms the file is fine
    tail = tmp_path / "tail.jpg"
    tail.write_bytes(good + b"appended-metadata")
    assert probe_image(str(tail)).width == 64


def test_pixel_limit_reports_instead_of_crashing():
    data = _encode(Image.new("RGB", (50, 40)), "PNG")
    with pytest.raises(ImageLoadError, match="too many pixels"):
        probe_image(data, max_pixels=1999)
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(data, max_pixels=1999)
    assert probe_image(data, max_pixels=2000).width == 50


def test_jpeg_draft_keeps_at_least_twice_the_target():
    data = _encode(Image.new("RGB", (800, 600), (200, 100, 50)), "JPEG")
    img = load_image(data, min_decode_size=(100, 75))
    assert img.size == (200, 150)  # 1/4 scale still >= 2x the target
    assert load_image(data, min_decode_size=(500, 375)).size == (800, 600)


def test_crop_plan_center_random_and_flip_convention():
    plan = plan_crop((300, 200), (128, 128))
    assert plan.resized == (192, 128) == cover_size((300, 200), (128, 128))
    assert (plan.top, plan.left) == (0, 32)
    assert plan.original_size == (200, 300) and plan.target_size == (128, 128)
    rng = np.random.default_rng(0)
    lefts = {plan_crop((300, 200), (128, 128), random_crop=True, rng=rng).left for _ in range(200)}
    assert min(lefts) >= 0 and max(lefts) <= 64 and len(lefts) > 30
    flipped = plan_crop((300, 200), (128, 128), random_crop=True, flip=True, rng=np.random.default_rng(3))
    assert flipped.crop_top_left == (flipped.top, 192 - flipped.left - 128)


def test_render_matches_resize_then_crop_and_flip():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(base).resize((240, 150), Image.Resampling.BILINEAR))  # smooth
    img = Image.fromarray(base)
    plan = plan_crop((240, 150), (96, 64), random_crop=True, rng=np.random.default_rng(5))
    full = np.asarray(img.resize(plan.resized, Image.Resampling.LANCZOS)).astype(float)
    ref = full[plan.top:plan.top + 64, plan.left:plan.left + 96]
    out = np.asarray(render(img, plan)).astype(float)
    assert out.shape == (64, 96, 3)
    assert np.abs(out - ref).mean() < 1.5
    # flip: the pixels are the crop of the flipped resized image at the reported corner
    fplan = plan_crop((240, 150), (96, 64), random_crop=True, flip=True, rng=np.random.default_rng(5))
    top, left = fplan.crop_top_left
    ref_f = full[:, ::-1][top:top + 64, left:left + 96]
    assert np.abs(np.asarray(render(img, fplan)).astype(float) - ref_f).mean() < 1.5


def test_render_without_scaling_is_an_exact_crop():
    arr = np.random.default_rng(2).integers(0, 255, (80, 64, 3), dtype=np.uint8)
    plan = plan_crop((64, 80), (64, 64))
    assert plan.resized == (64, 80) and (plan.top, plan.left) == (8, 0)
    assert np.array_equal(np.asarray(render(Image.fromarray(arr), plan)), arr[8:72])


def test_to_tensor_range_layout_dtype():
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = [255, 0, 128]
    t = to_tensor(Image.fromarray(arr))
    assert t.dtype == torch.float32 and t.shape == (3, 2, 3)
    assert t[:, 0, 0].tolist()[:2] == [1.0, -1.0] and abs(t[2, 0, 0].item() - (128 / 127.5 - 1)) < 1e-6
    assert t.min() >= -1 and t.max() <= 1
