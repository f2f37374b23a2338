"""Generate examples/quickstart_data/: 12 small images of simple coloured shapes with captions.

    python examples/make_quickstart_data.py [--out examples/quickstart_data]

The images are 96x96, 128x96 and 96x128 (so the quickstart exercises aspect-ratio buckets), PNG and
JPEG, each with a `.txt` caption such as "a red circle on a white background". The output is
deterministic and committed, so the offline quickstart needs no download.
"""
from __future__ import annotations

import argparse
import math
import os

from PIL import Image, ImageDraw

SIZES = [(96, 96), (128, 96), (96, 128)]
SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # five-pointed star
        r_out, r_in = (x1 - x0) / 2, (x1 - x0) / 5
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_in
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        draw.polygon(pts, fill=fill)


def make(out: str) -> list[str]:
    """Write the 12 images + captions into `out`; returns the image paths."""
    os.makedirs(out, exist_ok=True)
    colour_names, bg_names = list(COLOURS), list(BACKGROUNDS)
    paths = []
    for i in range(12):
        w, h = SIZES[i % len(SIZES)]
        shape, colour = SHAPES[i % len(SHAPES)], colour_names[(i // 2) % len(colour_names)]
        bg = bg_names[(i // 4) % len(bg_names)]
        img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
        side = int(min(w, h) * 0.6)
        x0, y0 = (w - side) // 2 + (i % 3 - 1) * 6, (h - side) // 2
        draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
        stem = f"{i:02d}_{colour}_{shape}"
        path = os.path.join(out, stem + (".png" if i % 2 == 0 else ".jpg"))
        if path.endswith(".png"):
            img.save(path, optimize=True)
        else:
            img.save(path, quality=92)
        with open(os.path.join(out, stem + ".txt"), "w", encoding="utf-8") as fh:
            fh.write(f"a {colour} {shape} on a {bg} background\n")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart_data"))
    args = parser.parse_args()
    paths = make(args.out)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {len(paths)} images with captions to {args.out} ({total / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
