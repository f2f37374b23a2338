"""Shapes world: a procedural image + caption dataset of one coloured shape on a plain background.

    python examples/shapes_world.py OUT_DIR [--count 480] [--size 64] [--seed 0]
        [--colors red green blue yellow] [--shapes ...] [--backgrounds ...] [--random]
        [--max-rotation 15]

Every image shows one shape (circle, square, triangle, star) in one colour (red, green, blue,
yellow; `purple` exists but the base world never uses it, so it can stand for a concept a model
has not seen; `any` draws a fill of any hue and leaves the colour out of the caption, for training
a VAE that must encode every colour) on one background (white, black, grey). The shape's size is 35-75% of the image
side, it lies fully inside the frame (1 px margin), squares, triangles and stars are rotated by up
to `max_rotation` degrees, and the fill and background colours are jittered per image. Edges are
anti-aliased: coverage is sampled on a 4x4 grid per pixel.

OUT_DIR receives `NNNNNN_colour_shape.png` + `.txt` caption pairs (the layout the folder data
source reads, as in examples/quickstart_data/; captions read "a red circle on a white
background") and `manifest.jsonl`, one JSON object per image: file, caption, shape, colour,
background, size (px), center ([x, y] px), rotation (degrees), fill_rgb, background_rgb and
pixels_sha256 (SHA-256 of the raw RGB bytes). Each run replaces the manifest with its own images
and overwrites files of the same names.

Determinism: every image is a function of (seed, index, world settings) only. Random draws come
from BLAKE2b of "seed/index/field" (no RNG library whose stream could change between versions),
geometry is rounded to 1/32 px and rasterised with integer arithmetic (not Pillow's polygon
filler, whose edge rules have changed between versions), so the pixels - and pixels_sha256 - are
the same on every machine and version. PNG bytes are written by Pillow with fixed options and no
metadata, so they match wherever the zlib build matches.

Balanced mode (the default) enumerates every shape x colour x background combination once per
cycle of len(shapes) * len(colours) * len(backgrounds) images, in an order shuffled per cycle;
`--random` draws the combination per image instead.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "star")
BASE_COLOURS = ("red", "green", "blue", "yellow")
COLOURS = {  # base RGB of each colour name; `purple` is the held-out extra
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 200),
}
ANY = "any"
"""Pseudo-colour of the codec's world: a fill of any hue (uniform over the colour circle), saturation
50-90 % and value 55-95 %, and a caption without a colour word. The toy VAE trains on it beside the
base world, so that it encodes colours the text-to-image model never sees (purple) - as a real VAE
encodes any image - while the denoiser and text towers learn only the four base colours."""
BACKGROUNDS = {"white": 243, "black": 22, "grey": 128}  # base grey level of each background
SIZE_RANGE = (35, 75)
"""Shape size in percent of the image side: circle diameter, square side, triangle base and
height, star outer diameter (before rotation)."""
STAR_INNER = 0.42
"""Star inner radius / outer radius (a regular pentagram has 0.38; a little fatter survives
downsampling to 64 px better)."""
SUB = 32
"""Geometry grid: coordinates are integers in 1/SUB px."""
SS = 4
"""Anti-aliasing: SS x SS coverage samples per pixel."""
MAX_SIZE = 1024  # keeps the integer cross products far inside int64


def _u64(seed: int, index: int, field: str) -> int:
    """A 64-bit draw that depends only on (seed, index, field)."""
    digest = hashlib.blake2b(f"{seed}/{index}/{field}".encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _randint(seed: int, index: int, field: str, lo: int, hi: int) -> int:
    """Integer in [lo, hi] (inclusive)."""
    return lo + _u64(seed, index, field) % (hi - lo + 1)


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that defines one image. Lengths in px of the output image; `center` is the
    centre of the shape's circumscribing circle (the bounding-box centre for circle and square)."""

    index: int
    shape: str
    colour: str
    background: str
    size: float
    center: tuple[float, float]
    rotation: int
    fill_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]

    @property
    def caption(self) -> str:
        colour = "" if self.colour == ANY else f"{self.colour} "
        return f"a {colour}{self.shape} on a {self.background} background"

    @property
    def stem(self) -> str:
        return f"{self.index:06d}_{self.colour}_{self.shape}"


@dataclass(frozen=True)
class World:
    """The settings that, with an index, define an image. `size`: image side in px."""

    seed: int = 0
    size: int = 64
    colours: tuple[str, ...] = BASE_COLOURS
    shapes: tuple[str, ...] = SHAPES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    balanced: bool = True
    max_rotation: int = 15

    def __post_init__(self):
        for kind, names, known in (("colour", self.colours, (*COLOURS, ANY)), ("shape", self.shapes, SHAPES),
                                   ("background", self.backgrounds, BACKGROUNDS)):
            if not names:
                raise ValueError(f"shapes world: no {kind}s given; choose from {', '.join(known)}")
            bad = [n for n in names if n not in known]
            if bad or len(set(names)) != len(names):
                raise ValueError(f"shapes world: {kind}s {list(names)} must be distinct names from "
                                 f"{', '.join(known)}")
        if not 16 <= self.size <= MAX_SIZE:
            raise ValueError(f"shapes world: size {self.size} must be in 16..{MAX_SIZE} px")
        if not 0 <= self.max_rotation <= 45:
            raise ValueError(f"shapes world: max_rotation {self.max_rotation} must be in 0..45 degrees")

    @property
    def combinations(self) -> list[tuple[str, str, str]]:
        """Every (shape, colour, background), in a fixed order."""
        return [(s, c, b) for s in self.shapes for c in self.colours for b in self.backgrounds]

    def _combination(self, index: int) -> tuple[str, str, str]:
        combos = self.combinations
        n = len(combos)
        if not self.balanced:
            return combos[_u64(self.seed, index, "combination") % n]
        cycle, pos = divmod(index, n)
        # Shuffle each cycle by sorting on per-cycle hash keys (ties broken by position).
        order = sorted(range(n), key=lambda k: (_u64(self.seed, cycle, f"order{k}"), k))
        return combos[order[pos]]

    def spec(self, index: int) -> ShapeSpec:
        """The shape, colour, background, geometry and colours of image `index` (>= 0)."""
        if index < 0:
            raise ValueError(f"shapes world: index {index} must be >= 0")
        seed = self.seed
        shape, colour, background = self._combination(index)
        size = self.size * _randint(seed, index, "size", *SIZE_RANGE) / 100
        rotation = 0 if shape == "circle" else _randint(seed, index, "rotation", -self.max_rotation,
                                                        self.max_rotation)
        # Extent of the shape around its centre; shrink it if a large rotation would not fit.
        lo, hi = _extent(shape, size, rotation)
        room = self.size - 2  # 1 px margin each side
        span = max(hi["x"] - lo["x"], hi["y"] - lo["y"])
        if span > room:
            size *= room / span
        size = round(size * SUB) / SUB
        lo, hi = _extent(shape, size, rotation)
        center = []
        for axis in ("x", "y"):
            first = math.ceil((1 - lo[axis]) * SUB)  # smallest centre (1/SUB px) keeping the margin
            last = math.floor((self.size - 1 - hi[axis]) * SUB)
            center.append(_randint(seed, index, "center_" + axis, first, max(first, last)) / SUB)
        if colour == ANY:
            fill = _any_hue(seed, index)
        else:
            base = COLOURS[colour]
            shade = _randint(seed, index, "shade", 85, 105)  # percent, shared by the three channels
            fill = tuple(min(255, max(0, base[ch] * shade // 100 + _randint(seed, index, f"fill{ch}", -12, 12)))
                         for ch in range(3))
        grey = BACKGROUNDS[background] + _randint(seed, index, "background", -10, 10)
        bg = tuple(min(255, max(0, grey + _randint(seed, index, f"background{ch}", -3, 3))) for ch in range(3))
        return ShapeSpec(index, shape, colour, background, size, (center[0], center[1]), rotation, fill, bg)

    def image(self, index: int) -> np.ndarray:
        """Image `index` as (size, size, 3) uint8 RGB."""
        return render(self.spec(index), self.size)


def _any_hue(seed: int, index: int) -> tuple[int, int, int]:
    """RGB of the `any` pseudo-colour: HSV with hue in [0, 360) degrees, saturation 50-90 %, value
    55-95 %, in integer arithmetic (exact on every machine)."""
    hue = _randint(seed, index, "hue", 0, 359)
    sat = _randint(seed, index, "saturation", 50, 90)
    val = _randint(seed, index, "value", 55, 95)
    sector, within = divmod(hue, 60)  # within: degrees into the sector
    top = 255 * val // 100
    low = top * (100 - sat) // 100
    rise = low + (top - low) * within // 60
    fall = top - (top - low) * within // 60
    return [(top, rise, low), (fall, top, low), (low, top, rise), (low, fall, top), (rise, low, top),
            (top, low, fall)][sector]


def _outline(shape: str, size: float, rotation: int) -> list[tuple[float, float]]:
    """Vertices (px, around the centre, y down, clockwise on screen) of a polygonal shape."""
    h = size / 2
    if shape == "square":
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":  # apex up; base and height both `size`
        pts = [(0.0, -h), (h, h), (-h, h)]
    elif shape == "star":  # five points, one up
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * STAR_INNER
            a = math.radians(-90 + 36 * k)
            pts.append((r * math.cos(a), r * math.sin(a)))
    else:
        raise ValueError(f"shapes world: {shape!r} has no outline")
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def _extent(shape: str, size: float, rotation: int) -> tuple[dict, dict]:
    """Smallest and largest offset ({"x", "y"} px) of the shape from its centre."""
    if shape == "circle":
        return {"x": -size / 2, "y": -size / 2}, {"x": size / 2, "y": size / 2}
    pts = _outline(shape, size, rotation)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return {"x": min(xs), "y": min(ys)}, {"x": max(xs), "y": max(ys)}


def _convex_parts(spec: ShapeSpec) -> list[list[tuple[int, int]]]:
    """The shape as a union of convex polygons, vertices in 1/SUB px (absolute, integers)."""
    pts = _outline(spec.shape, spec.size, spec.rotation)
    # Rounding to the 1/SUB grid makes the rasterisation pure integer arithmetic; a last-bit
    # difference in cos/sin could only matter at an exact half-unit, never in practice.
    q = [(round((spec.center[0] + x) * SUB), round((spec.center[1] + y) * SUB)) for x, y in pts]
    if spec.shape != "star":
        return [q]
    outer, inner = q[0::2], q[1::2]
    # Inner pentagon plus five point triangles, each on one pentagon edge.
    return [inner] + [[inner[k - 1], outer[k], inner[k]] for k in range(5)]


def coverage(spec: ShapeSpec, size: int) -> np.ndarray:
    """(size, size) int64: how many of the SS*SS samples of each pixel the shape covers."""
    # Sample j of pixel x sits at x + (2j + 1) / (2 SS) px.
    offs = (np.arange(SS) * 2 + 1) * (SUB // (2 * SS))
    sx = (np.arange(size)[:, None] * SUB + offs[None, :]).reshape(1, -1)  # (1, size*SS)
    sy = sx.reshape(-1, 1)  # (size*SS, 1)
    if spec.shape == "circle":
        cx, cy = round(spec.center[0] * SUB), round(spec.center[1] * SUB)
        r = round(spec.size / 2 * SUB)
        inside = (sx - cx) ** 2 + (sy - cy) ** 2 <= r * r
    else:
        inside = np.zeros((size * SS, size * SS), dtype=bool)
        for poly in _convex_parts(spec):
            part = np.ones_like(inside)
            for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
                # Clockwise on screen (y down): the inside is where the cross product is >= 0.
                part &= (x1 - x0) * (sy - y0) - (y1 - y0) * (sx - x0) >= 0
            inside |= part
    return inside.reshape(size, SS, size, SS).sum(axis=(1, 3))


def render(spec: ShapeSpec, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB image of `spec`: background and fill mixed by coverage."""
    cov = coverage(spec, size)[..., None]
    n = SS * SS
    fill, bg = np.array(spec.fill_rgb, dtype=np.int64), np.array(spec.background_rgb, dtype=np.int64)
    return ((bg * (n - cov) + fill * cov + n // 2) // n).astype(np.uint8)


def save_png(pixels: np.ndarray, path: str) -> None:
    """Write (H, W, 3) uint8 as PNG with fixed options and no metadata chunks."""
    Image.fromarray(pixels, "RGB").save(path, format="PNG", compress_level=9, optimize=False)


def manifest_row(spec: ShapeSpec, pixels: np.ndarray) -> dict:
    """The manifest entry of one image (sizes and centres are multiples of 1/32 px, so exact)."""
    return {"file": spec.stem + ".png", "caption": spec.caption, "shape": spec.shape,
            "colour": spec.colour, "background": spec.background, "size": spec.size,
            "center": list(spec.center), "rotation": spec.rotation, "fill_rgb": list(spec.fill_rgb),
            "background_rgb": list(spec.background_rgb),
            "pixels_sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()}


def write_dataset(out_dir: str, count: int, world: World, start: int = 0) -> list[dict]:
    """Write images start..start+count-1 of `world` (PNG + caption) and `manifest.jsonl` into
    `out_dir`; returns the manifest rows."""
    if count < 1:
        raise ValueError(f"shapes world: count {count} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for index in range(start, start + count):
        spec = world.spec(index)
        pixels = render(spec, world.size)
        save_png(pixels, os.path.join(out_dir, spec.stem + ".png"))
        with open(os.path.join(out_dir, spec.stem + ".txt"), "w", encoding="utf-8", newline="\n") as fh:
            fh.write(spec.caption + "\n")
        rows.append(manifest_row(spec, pixels))
    with open(os.path.join(out_dir, "manifest.jsonl"), "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(json.dumps(row, separators=(", ", ": ")) + "\n" for row in rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder for the images, captions and manifest.jsonl")
    parser.add_argument("--count", type=int, default=None,
                        help="number of images (default: 10 balanced cycles of combinations)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (16..1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="index of the first image")
    parser.add_argument("--colors", "--colours", dest="colours", nargs="+", default=list(BASE_COLOURS),
                        metavar="COLOUR", help=f"colours to use, from {', '.join(COLOURS)}, or {ANY} "
                        "(any hue, no colour word in the caption: the VAE's world)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="SHAPE")
    parser.add_argument("--backgrounds", nargs="+", default=list(BACKGROUNDS), metavar="BACKGROUND")
    parser.add_argument("--random", action="store_true",
                        help="draw each image's combination instead of enumerating them evenly")
    parser.add_argument("--max-rotation", type=int, default=15, help="degrees (0 disables)")
    args = parser.parse_args(argv)
    try:
        world = World(seed=args.seed, size=args.size, colours=tuple(args.colours), shapes=tuple(args.shapes),
                      backgrounds=tuple(args.backgrounds), balanced=not args.random,
                      max_rotation=args.max_rotation)
        count = 10 * len(world.combinations) if args.count is None else args.count
        if args.start < 0:
            raise ValueError(f"shapes world: --start {args.start} must be >= 0")
        rows = write_dataset(args.out_dir, count, world, start=args.start)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {len(rows)} images with captions and manifest.jsonl to {args.out_dir}")


if __name__ == "__main__":
    main()
