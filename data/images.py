"""Reading images robustly: probing sizes, spotting broken files, converting every mode to RGB.

Everything here works on PIL images and raises `ImageLoadError(reason)` for a file that cannot be
used (empty, not an image, truncated, too large, ...); callers skip such files and report them.
Sizes are always (width, height) in pixels *after* EXIF orientation.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
DEFAULT_MAX_PIXELS = 178_956_970

ImageSource = str | os.PathLike | bytes

# EXIF orientations 5..8 rotate by 90 degrees, so the stored width and height swap.
_SWAPS_AXES = {5, 6, 7, 8}
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_lock = threading.Lock()


class ImageLoadError(Exception):
    """An image cannot be used; `reason` is a short human-readable explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of an image: size after EXIF orientation, format and mode as stored."""

    width: int
    height: int
    format: str
    mode: str


def content_hash(data: bytes) -> str:
    """Hex digest identifying file contents (cache keys)."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def read_bytes(path: str | os.PathLike) -> bytes:
    """Whole file contents; ImageLoadError for unreadable or empty files."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageLoadError(f"cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    return data


def _allow_pixels(max_pixels: int) -> None:
    # PIL refuses images above 2 * MAX_IMAGE_PIXELS at open time. Our own `max_pixels` check
    # replaces that guard, so PIL's limit is only ever raised to the user's setting, never lowered.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_pixels > limit:
        with _lock:
            Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)


def _open(data: bytes | str | os.PathLike, max_pixels: int) -> Image.Image:
    """PIL image (header parsed, pixels not decoded) with the pixel-count guard applied.

    data: encoded bytes or a file path (PIL then reads only the header until `load()`).
    """
    _allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"too many pixels ({exc}); raise data.max_pixels to allow it") from None
    except UnidentifiedImageError:
        raise ImageLoadError("not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise ImageLoadError(f"corrupt or truncated image header ({exc})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageLoadError(f"invalid size {w}x{h}")
    if w * h > max_pixels:
        img.close()
        raise ImageLoadError(f"too many pixels: {w}x{h} = {w * h} > max_pixels {max_pixels} (raise data.max_pixels to allow it)")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - malformed EXIF is common and harmless: treat as upright
        return 1


def _looks_complete(fmt: str, head: bytes, tail: bytes, size: int) -> bool:
    """Cheap end-of-file check from the first/last bytes of a file of `size` bytes.

    False means "decode fully to find out", not "broken": e.g. JPEGs with data after the end marker.
    """
    if fmt == "JPEG":
        return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return tail.endswith(_PNG_END)
    if fmt == "WEBP":
        return len(head) >= 8 and struct.unpack("<I", head[4:8])[0] + 8 <= size
    if fmt == "BMP":
        declared = struct.unpack("<I", head[2:6])[0] if len(head) >= 6 else 0
        return 0 < declared <= size
    return False


def _head_tail(source: bytes | str | os.PathLike) -> tuple[bytes, bytes, int]:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:16]), bytes(source[-64:]), len(source)
    try:
        with open(source, "rb") as fh:
            head = fh.read(16)
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - 64))
            tail = fh.read(64)
    except OSError as exc:
        raise ImageLoadError(f"cannot read file ({exc.strerror or exc})") from None
    return head, tail, size


def _decode_all(img: Image.Image) -> None:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, MemoryError) as exc:
        raise ImageLoadError(f"corrupt or truncated image data ({exc})") from None


def probe_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = False) -> ImageInfo:
    """Size/format of an image file or encoded bytes, decoding pixels only when needed.

    Truncation is caught by an end-of-file marker check; files that fail it, PNGs (PIL decodes
    them to find their EXIF anyway) and every file when `verify` are fully decoded. Raises
    ImageLoadError with the reason.
    """
    head, tail, size = _head_tail(source)
    if size == 0:
        raise ImageLoadError("empty file (0 bytes)")
    img = _open(source, max_pixels)
    try:
        fmt = img.format or "?"
        w, h = img.size
        # PIL decodes a PNG to read its EXIF (the chunk may follow the pixels) and `_orientation`
        # hides errors, so decode first: a damaged PNG fails here instead of passing as upright.
        if verify or fmt == "PNG" or not _looks_complete(fmt, head, tail, size):
            _decode_all(img)
        if _orientation(img) in _SWAPS_AXES:
            w, h = h, w
        return ImageInfo(width=w, height=h, format=fmt, mode=img.mode)
    finally:
        img.close()


def load_image(
    source: ImageSource,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_decode_size: tuple[int, int] | None = None,
    with_alpha: bool = False,
) -> Image.Image | tuple[Image.Image, Image.Image | None]:
    """Decoded RGB image with EXIF orientation applied; with `with_alpha`, (RGB image, its alpha
    channel as an "L" image, or None when the image has no transparency).

    source: file path or encoded bytes. min_decode_size: (w, h) the caller will resize to; JPEGs may
    then be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling) while staying >= twice that size, which
    keeps quality and saves most of the decode time for large photos. The returned image can
    therefore be smaller than the file's size; callers compute geometry from the probed size.
    """
    data = read_bytes(source) if not isinstance(source, (bytes, bytearray)) else bytes(source)
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    img = _open(data, max_pixels)
    if min_decode_size is not None and img.format == "JPEG":
        want = (2 * min_decode_size[0], 2 * min_decode_size[1])
        if _orientation(img) in _SWAPS_AXES:
            want = want[::-1]
        try:
            img.draft(None, want)
        except Exception:  # noqa: BLE001, S110 - drafting is only an optimisation
            pass
    _decode_all(img)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001, S110 - malformed EXIF: keep the stored orientation, keep the image
        pass
    if with_alpha:
        return to_rgb(img, background), alpha_channel(img)
    return to_rgb(img, background)


def alpha_channel(img: Image.Image) -> Image.Image | None:
    """The transparency of `img` as an "L" image (255 = opaque), or None when it has none."""
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return img.convert("RGBA").getchannel("A")
    return None


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Transparency (RGBA, LA, PA, P with a transparency entry, RGBa/La) is composited over
    `background`; 16/32-bit integer images are scaled (not clipped) to 8 bits; float images in [0, 1]
    are scaled by 255; CMYK/YCbCr/LAB/HSV use PIL's conversions.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if mode == "I" and arr.max(initial=0) <= 255:
            arr8 = np.clip(arr, 0, 255)
        else:
            arr8 = (np.clip(arr, 0, 65535) + 128) // 257  # 65535 -> 255, rounding to nearest
        return Image.fromarray(arr8.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        arr8 = np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    return img.convert("RGB")
