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


# EXIF 2.32, tag 0x0112: how the stored image maps to the displayed one, as PIL transposes
# (written from the spec's table, not from the code under test).
_EXIF_TRANSPOSE = {
    1: [],
    2: [Image.Transpose.FLIP_LEFT_RIGHT],  # mirrored horizontally
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],  # mirrored vertically
    5: [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90],  # mirrored, then 90 CCW (= transpose)
    6: [Image.Transpose.ROTATE_270],  # 90 clockwise
    7: [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_270],  # mirrored, then 90 CW (= transverse)
    8: [Image.Transpose.ROTATE_90],  # 90 counter-clockwise
}
# The spec's wording: where the stored row 0 / column 0 end up on display, i.e. the displayed
# corner holding the stored top-left pixel, as (row end, column end) with 0 = first, -1 = last.
_STORED_TOP_LEFT_SHOWN_AT = {1: (0, 0), 2: (0, -1), 3: (-1, -1), 4: (-1, 0), 5: (0, 0), 6: (0, -1), 7: (-1, -1), 8: (-1, 0)}


def _reference_orient(img: Image.Image, orientation: int) -> Image.Image:
    for op in _EXIF_TRANSPOSE[orientation]:
        img = img.transpose(op)
    return img


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_probed_size_and_reference_pixels(orientation, fmt):
    # 5 x 3 stored pixels, every one a different colour: no transpose maps it onto itself.
    rng = np.random.default_rng(orientation)
    stored = rng.permutation(256)[:15].astype(np.uint8).reshape(3, 5)
    stored = np.stack([stored, 255 - stored, np.full_like(stored, 40)], axis=-1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(stored), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    # JPEG is lossy: the reference starts from the stored pixels as decoded, with EXIF ignored.
    decoded = Image.open(io.BytesIO(data)).convert("RGB") if fmt == "JPEG" else Image.fromarray(stored)
    want = np.asarray(_reference_orient(decoded, orientation))
    info = probe_image(data)
    out = _rgb(data)
    assert (info.width, info.height) == (out.shape[1], out.shape[0])
    assert (info.width, info.height) == ((3, 5) if orientation >= 5 else (5, 3))
    assert np.array_equal(out, want)
    row, col = _STORED_TOP_LEFT_SHOWN_AT[orientation]
    assert np.array_equal(out[row, col], np.asarray(decoded)[0, 0])


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


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_draft_never_decodes_below_twice_the_target(orientation):
    # Stored 200 x 800; with orientation 6 it is shown 800 x 200. The targets include aspect ratios
    # unlike the image's, where drafting against the wrong axis would decode far too small.
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.new("RGB", (200, 800), (90, 120, 30)), "JPEG", exif=exif.tobytes())
    shown = (800, 200) if orientation == 6 else (200, 800)
    for target in [(25, 75), (75, 25), (100, 25), (25, 100), (50, 50), (400, 10)]:
        img = load_image(data, min_decode_size=target)
        full = img.size == shown
        assert full or (img.width >= 2 * target[0] and img.height >= 2 * target[1]), (target, img.size)
        assert img.width * shown[1] == img.height * shown[0]  # same aspect: only DCT scaling


def test_corrupt_png_with_intact_end_is_refused():
    rng = np.random.default_rng(4)
    data = bytearray(_encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 200:start + 400] = bytes(200)  # zero a stretch of the compressed pixels; IEND untouched
    with pytest.raises(ImageLoadError, match="corrupt"):
        probe_image(bytes(data))
    with pytest.raises(ImageLoadError):
        load_image(bytes(data))


def test_sixteen_bit_rounds_to_nearest():
    gray = np.array([[200, 65000, 128, 129]], np.uint16)  # /257: 0.78, 252.9, 0.498, 0.502
    assert _rgb(_encode(Image.fromarray(gray), "PNG"))[0, :, 0].tolist() == [1, 253, 0, 1]


def test_random_crop_reaches_both_ends():
    # The cover resize leaves slack along one axis only: left for landscape, top for portrait.
    # 65 positions each; 1000 draws miss an end with probability < 1e-6.
    rng = np.random.default_rng(0)
    wide = [plan_crop((300, 200), (128, 128), random_crop=True, rng=rng) for _ in range(1000)]
    tall = [plan_crop((200, 300), (128, 128), random_crop=True, rng=rng) for _ in range(1000)]
    assert wide[0].resized == (192, 128) and tall[0].resized == (128, 192)
    assert (min(p.left for p in wide), max(p.left for p in wide)) == (0, 64)
    assert (min(p.top for p in tall), max(p.top for p in tall)) == (0, 64)


def test_render_of_a_draft_decoded_image_matches_the_full_one():
    # JPEG draft decoding hands render() an image smaller than the probed size; the crop box must
    # be scaled to the decoded pixels.
    rng = np.random.default_rng(6)
    small = Image.fromarray(rng.integers(0, 255, (15, 24, 3), dtype=np.uint8))
    full = small.resize((480, 300), Image.Resampling.BICUBIC)  # smooth, so half size loses little
    half = full.resize((240, 150), Image.Resampling.BOX)
    plan = plan_crop(full.size, (96, 64), random_crop=True, rng=np.random.default_rng(2))
    a = np.asarray(render(full, plan)).astype(float)
    b = np.asarray(render(half, plan)).astype(float)
    assert a.shape == b.shape == (64, 96, 3)
    assert np.abs(a - b).mean() < 3
