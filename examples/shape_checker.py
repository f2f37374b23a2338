"""Shape checker: what colour and shape does a small image of one shape on a plain background show?

    from shape_checker import classify          # with examples/ importable
    verdict = classify(Image.open("x.png"))     # or an (H, W, 3) array
    verdict.colour, verdict.shape, verdict.background, verdict.confidence

    python examples/shape_checker.py IMAGE...   # prints one verdict per image

Made to score images of the shapes world (examples/shapes_world.py) - its own output and samples
of a small diffusion model trained on it, which are blurry and noisy. numpy + Pillow only, no
learned parts, deterministic; about 2 ms for a 64 px image on one CPU core.

Decision rules, in order (distances are Euclidean in RGB, 0..255 per channel):

1. Background = per-channel median of the border ring (2 px at 64 px). Its name comes from its
   mean level - black < 75 <= grey < 185 <= white - unless it is chromatic (max - min channel
   >= 48), then it is None. Border noise = 1.6 x the median distance of the border pixels to it
   (about 2.5 sigma for Gaussian noise; a median, because a shape may touch the border). A
   border noisier than 70 is no plain background: no shape, no colour, confidence 0.
2. Foreground: pixels farther than max(40, 2 noise + 10) from the background are candidates;
   the median of their higher-contrast half is the shape colour. The mask is every pixel farther
   than contrast / 2 (at least 40) from the background - the 50% coverage contour, so blur
   neither grows nor shrinks the shape. Specks go (a mask pixel with < 2 of 8 neighbours set; a hole with >= 7 is
   filled) and only the largest 8-connected component is kept. Fewer than 1% of the pixels, or a
   contrast under 60: no shape.
3. Colour = the hue bin with most votes among the component's core pixels (>= 75% of the
   contrast, away from anti-aliased edges): red [330, 28), yellow [28, 75), green [75, 170),
   blue [170, 255), purple [255, 330) degrees. A pixel votes only if chromatic (max - min >= 40
   and saturation >= 0.3). A bin with fewer votes than half of the core pixels names no colour:
   white, grey and black shapes, and mixtures of hues, get colour None.
4. Shape, from rotational symmetry: the shape's area per 10-degree sector around its centroid
   is a periodic profile; its 3rd, 4th and 5th harmonics (relative to the mean) are strong for a
   triangle, a square and a five-pointed star and near 0 for a circle, whatever the rotation, and
   blur only weakens them. The area is counted on a grid up to 4x finer than the pixels (the
   distance map upsampled bilinearly and thresholded again, ~8000 points), as whole pixels would
   draw the pixel grid's own 4-fold pattern into a small circle. Each harmonic is divided by its
   clean 64 px amplitude (0.27, 0.14, 0.34) to give a score near 1 for its shape. All scores
   < 0.18: circle; else the highest score names the shape. Measured at 64 px (960 clean images,
   960 degraded ones, 800 degraded at the smallest size, 35%): clean, circles score <= 0.04 and
   the true shape >= 0.89; after blur 1 + noise 10/255 + JPEG 75, circles <= 0.14, squares and
   triangles >= 0.76, stars >= 0.16 (98% of them >= 0.27). The misses are the smallest stars in
   colours whose contrast to the background is mostly chroma (purple or green on grey), which
   JPEG's half-resolution chroma turns blocky; without JPEG every one of those 800 is right.
   fill_ratio = area / the smallest rectangle around the shape (any angle) is reported but does
   not decide: square 1, circle 0.785, triangle 0.5, star ~0.4 on clean images, but blur and
   pixel staircases move small squares and stars across any fixed threshold.
5. Confidence in [0, 1]: shape_confidence = the winning score's distance from the nearest
   decision boundary (full at 0.15 away), times penalties for a stretched smallest rectangle
   (aspect > 1.4), mask area outside the kept component and shapes of under 12 x 12 px area;
   colour_confidence = the winning hue bin's share of the core pixels; confidence = the smaller
   of the two (0 when colour or shape is None).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image

HUE_BINS = (  # (name, first degree, end degree); red wraps around 0
    ("red", 330.0, 28.0),
    ("yellow", 28.0, 75.0),
    ("green", 75.0, 170.0),
    ("blue", 170.0, 255.0),
    ("purple", 255.0, 330.0),
)
BLACK_BELOW, WHITE_FROM = 75.0, 185.0  # background mean level bounds (0..255)
CHROMATIC_BACKGROUND = 48.0  # max - min channel from which a background is not black/grey/white
MAX_BORDER_NOISE = 70.0
MIN_CONTRAST = 60.0
MIN_AREA = 0.01  # of the image
PIXEL_CHROMA, PIXEL_SATURATION = 40.0, 0.3
CORE = 0.75  # fraction of the contrast from which a pixel counts as interior (colour votes)
SYMMETRIES = (("triangle", 3, 0.27), ("square", 4, 0.14), ("star", 5, 0.34))
"""(shape, harmonic, its clean amplitude): the harmonic of the sector-area profile that the
shape's rotational symmetry makes strong, and the amplitude it has in clean 64 px images."""
SECTORS = 36
UPSAMPLE = 4
FINE_POINTS = 8000
CIRCLE_BELOW = 0.18  # every symmetry score under this: a circle
SMALL = 12.0  # px: shapes of less area than SMALL**2 lose confidence (their corners are a pixel or two)
MARGIN = 0.15  # score distance from the nearest decision boundary that gives full shape confidence


@dataclass(frozen=True)
class Verdict:
    """What `classify` sees. Names are None when there is no such thing (or no decision);
    features are 0 when there is no shape."""

    colour: str | None
    shape: str | None
    background: str | None
    fill_ratio: float
    """Shape area / area of its minimum-area enclosing rectangle."""
    coverage: float
    """Shape area / image area."""
    aspect: float
    """Long / short side of the minimum-area enclosing rectangle."""
    contrast: float
    """RGB distance between the shape colour and the background (0..441)."""
    symmetry: tuple[float, ...]
    """Scores for SYMMETRIES (triangle, square, star): ~1 for that shape, ~0 for a circle."""
    colour_confidence: float
    shape_confidence: float
    confidence: float
    """min(colour_confidence, shape_confidence); 0 when colour or shape is None."""


def _as_rgb(image) -> np.ndarray:
    """(H, W, 3) float32 in 0..255 from a PIL image, a uint8 array (H, W[, 3|4]) or a float array
    in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 8:
        raise ValueError(f"shape checker: expected an (H, W, 3) image of at least 8x8 px, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"shape checker: arrays must be uint8 or float in [0, 1], got {arr.dtype}")
    if not np.isfinite(arr).all() or arr.min() < -0.5 or arr.max() > 1.5:
        raise ValueError("shape checker: float arrays must hold values in [0, 1] "
                         f"(got {np.nanmin(arr):.3g}..{np.nanmax(arr):.3g}); pass uint8 for 0..255")
    return np.clip(arr, 0.0, 1.0).astype(np.float32) * 255.0


def _border(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) pixels of the border ring (width side / 32, at least 1 px)."""
    h, w = rgb.shape[:2]
    b = max(1, round(min(h, w) / 32))
    return np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                           rgb[b:-b, :b].reshape(-1, 3), rgb[b:-b, -b:].reshape(-1, 3)])


def _background_name(bg: np.ndarray) -> str | None:
    if bg.max() - bg.min() >= CHROMATIC_BACKGROUND:
        return None
    level = float(bg.mean())
    return "black" if level < BLACK_BELOW else "white" if level >= WHITE_FROM else "grey"


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """(H, W) count of set 8-neighbours."""
    p = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) - mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of `mask` (union-find over row runs)."""
    p = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
    edges = np.diff(p, axis=1)
    rows, starts = np.nonzero(edges == 1)  # row-major, so starts and ends pair up
    _, ends = np.nonzero(edges == -1)
    n = len(rows)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows_l, starts_l, ends_l = rows.tolist(), starts.tolist(), ends.tolist()
    prev_begin, prev_end = 0, 0  # runs of the row above the current one: [prev_begin, prev_end)
    i = 0
    while i < n:
        j = i
        while j < n and rows_l[j] == rows_l[i]:
            j += 1
        if prev_end > prev_begin and rows_l[prev_begin] == rows_l[i] - 1:
            a = prev_begin
            for k in range(i, j):  # two pointers: runs are sorted by start within a row
                while a < prev_end and ends_l[a] < starts_l[k]:
                    a += 1
                b = a
                while b < prev_end and starts_l[b] <= ends_l[k]:  # touch, diagonals included
                    ra, rk = find(b), find(k)
                    if ra != rk:
                        parent[ra] = rk
                    b += 1
        prev_begin, prev_end = i, j
        i = j
    roots = np.array([find(k) for k in range(n)])
    sizes = np.bincount(roots, weights=ends - starts, minlength=n)
    keep = roots == int(np.argmax(sizes))
    out = np.zeros_like(mask)
    for r, s, e in zip(rows[keep].tolist(), starts[keep].tolist(), ends[keep].tolist()):
        out[r, s:e] = True
    return out


def _min_rectangle(mask: np.ndarray) -> tuple[float, float]:
    """(area px^2, long / short side) of the smallest rectangle around the mask's pixels (unit
    squares), over rectangle angles in 1-degree steps (within 0.02% of the exact minimum)."""
    ys = np.nonzero(mask.any(axis=1))[0]
    sub = mask[ys]
    left = np.argmax(sub, axis=1).astype(np.float64)
    right = sub.shape[1] - np.argmax(sub[:, ::-1], axis=1).astype(np.float64)
    # Each row's outer pixel corners are all that can touch a rectangle around the mask.
    x = np.concatenate([left, left, right, right])
    y = np.concatenate([ys, ys + 1, ys, ys + 1]).astype(np.float64)
    theta = np.radians(np.arange(90))
    c, s = np.cos(theta), np.sin(theta)
    along = x[:, None] * c + y[:, None] * s  # (N, 90)
    across = y[:, None] * c - x[:, None] * s
    wa, wc = np.ptp(along, axis=0), np.ptp(across, axis=0)
    k = int(np.argmin(wa * wc))
    return float(wa[k] * wc[k]), float(max(wa[k], wc[k]) / min(wa[k], wc[k]))


def _hue_votes(pixels: np.ndarray) -> np.ndarray:
    """Votes per HUE_BINS entry from (N, 3) pixels; achromatic pixels do not vote."""
    mx, mn = pixels.max(axis=1), pixels.min(axis=1)
    chroma = mx - mn
    chromatic = (chroma >= PIXEL_CHROMA) & (chroma >= PIXEL_SATURATION * mx)
    p, c, m = pixels[chromatic], chroma[chromatic], mx[chromatic]
    r, g, b = p[:, 0], p[:, 1], p[:, 2]
    hue = np.where(m == r, ((g - b) / c) % 6, np.where(m == g, (b - r) / c + 2, (r - g) / c + 4)) * 60.0
    votes = np.array([((hue >= lo) | (hue < hi)).sum() if lo > hi else ((hue >= lo) & (hue < hi)).sum()
                      for _, lo, hi in HUE_BINS])
    return votes


def _upsample(a: np.ndarray, f: int) -> np.ndarray:
    """(H, W) -> (H f, W f), bilinear, pixel centres aligned (edges clamped)."""
    for axis in (0, 1):
        n = a.shape[axis]
        pos = np.clip((np.arange(n * f) + 0.5) / f - 0.5, 0, n - 1)
        lo = np.minimum(pos.astype(np.int64), n - 2) if n > 1 else np.zeros(n * f, dtype=np.int64)
        t = (pos - lo) if n > 1 else np.zeros(n * f)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1, 1]
        shape[axis] = -1
        t = t.reshape(shape)
        a = np.take(a, lo, axis=axis) * (1 - t) + np.take(a, hi, axis=axis) * t
    return a


def _fine_points(mask: np.ndarray, dist: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(y, x, f): the points of a grid f times finer than the pixels where the bilinearly
    upsampled distance map exceeds `threshold`, within the component `mask` grown by 1 px; each
    point stands for 1/f^2 px. f (1..UPSAMPLE) gives about FINE_POINTS points: small shapes need
    the finer grid, large ones have pixels to spare. Coordinates are grid units from the
    component's corner."""
    f = int(np.clip(round(np.sqrt(FINE_POINTS / mask.sum())), 1, UPSAMPLE))
    grown = mask | (_neighbours(mask) > 0)
    ys, xs = np.nonzero(grown)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    inside = (_upsample(dist[box], f) if f > 1 else dist[box]) > threshold
    fy, fx = np.nonzero(inside & grown[box].repeat(f, 0).repeat(f, 1))
    return fy, fx, f


def _symmetry_scores(fy: np.ndarray, fx: np.ndarray) -> list[float]:
    """One score per SYMMETRIES entry from the shape's fine-grid points: amplitude of its harmonic
    in the area per angular sector around the centroid (relative to the mean, so size-free;
    rotation only changes the phase), divided by the clean amplitude - about 1 for that shape,
    near 0 for the others."""
    angle = np.arctan2(fy - fy.mean(), fx - fx.mean())  # radians
    sector = np.floor(angle * (SECTORS / (2 * np.pi))).astype(np.int64) % SECTORS
    spectrum = np.abs(np.fft.rfft(np.bincount(sector, minlength=SECTORS).astype(np.float64)))
    return [float(spectrum[k] / spectrum[0] / clean) for _, k, clean in SYMMETRIES]


def _nothing(background: str | None) -> Verdict:
    return Verdict(None, None, background, 0.0, 0.0, 0.0, 0.0, (0.0,) * len(SYMMETRIES), 0.0, 0.0, 0.0)


def classify(image) -> Verdict:
    """Colour, shape and background of one image: a PIL image, an (H, W, 3) uint8 array or a float
    array in [0, 1]. See the module docstring for the rules."""
    rgb = _as_rgb(image)
    border = _border(rgb)
    bg = np.median(border, axis=0)
    background = _background_name(bg)
    # Median, not a high percentile: a shape may touch the border ring. For Gaussian noise of
    # sigma per channel the median distance is 1.54 sigma, so `noise` is about 2.5 sigma.
    noise = 1.6 * float(np.median(np.linalg.norm(border - bg, axis=1)))
    if noise > MAX_BORDER_NOISE:
        return _nothing(None)
    dist = np.linalg.norm(rgb - bg, axis=2)  # (H, W)
    h, w = dist.shape
    candidates = dist > max(40.0, 2.0 * noise + 10.0)
    if candidates.sum() < MIN_AREA * h * w:
        return _nothing(background)
    cand_d = dist[candidates]
    strong = rgb[candidates][cand_d >= np.median(cand_d)]
    fill = np.median(strong, axis=0)
    contrast = float(np.linalg.norm(fill - bg))
    if contrast < MIN_CONTRAST:
        return _nothing(background)
    threshold = max(contrast / 2, 40.0)
    mask = dist > threshold
    near = _neighbours(mask)
    mask = (mask & (near >= 2)) | (~mask & (near >= 7))
    if mask.sum() < MIN_AREA * h * w:
        return _nothing(background)
    shape_mask = _largest_component(mask)
    area = float(shape_mask.sum())
    stray = 1.0 - area / float(mask.sum())
    if area < MIN_AREA * h * w:
        return _nothing(background)

    core = shape_mask & (dist >= CORE * contrast)
    core_px = rgb[core] if core.sum() >= 5 else rgb[shape_mask]
    votes = _hue_votes(core_px)
    best = int(np.argmax(votes))
    if votes[best] * 2 < len(core_px):
        colour, colour_conf = None, 0.0
    else:
        colour, colour_conf = HUE_BINS[best][0], float(votes[best] / len(core_px))

    rect_area, aspect = _min_rectangle(shape_mask)
    fill_ratio = area / rect_area
    fy, fx, f = _fine_points(shape_mask, dist, threshold)
    if fy.size < f * f:
        return _nothing(background)
    scores = _symmetry_scores(fy, fx)
    order = sorted(range(len(SYMMETRIES)), key=lambda k: -scores[k])
    best, second = order[0], order[1]
    if scores[best] < CIRCLE_BELOW:
        shape, margin = "circle", CIRCLE_BELOW - scores[best]
    else:
        shape = SYMMETRIES[best][0]
        margin = min(scores[best] - CIRCLE_BELOW, scores[best] - scores[second])
    shape_conf = min(1.0, margin / MARGIN)
    shape_conf *= float(np.clip((2.0 - aspect) / 0.6, 0.0, 1.0)) * (1.0 - stray)
    shape_conf *= min(1.0, float(np.sqrt(area)) / SMALL)
    confidence = min(colour_conf, shape_conf) if colour is not None else 0.0
    coverage = fy.size / (f * f) / (h * w)  # the finer grid measures thin star points better
    return Verdict(colour, shape, background, fill_ratio, coverage, aspect, contrast,
                   tuple(scores), colour_conf, shape_conf, confidence)


def main(argv: list[str] | None = None) -> None:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        raise SystemExit("usage: python examples/shape_checker.py IMAGE...")
    for path in paths:
        try:
            with Image.open(path) as img:
                v = classify(img)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"shape checker: cannot read {path}: {exc}") from None
        print(f"{path}: {v.colour} {v.shape} on {v.background} (confidence {v.confidence:.2f}, "
              f"fill ratio {v.fill_ratio:.3f}, symmetry scores {', '.join(f'{x:.2f}' for x in v.symmetry)})")


if __name__ == "__main__":
    main()
