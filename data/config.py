"""Data settings: the `data:` section of a training YAML maps onto `DataConfig`.

    data:
      path: ./my_images            # or: subsets: [{path: a, repeats: 3}, {path: b, resolution: 768}]
      resolution: 1024
      shuffle_tags: true
      keep_tokens: 1

Every field of `SubsetConfig` except `path` and `name` may be left out (null): it then inherits the
`DataConfig` field of the same name. Validation happens in `__post_init__` and raises
`DataConfigError` whose message starts with the field name (`subsets[1].repeats: ...`). Checks that
touch the filesystem live in `check_sources()` so a config can be built without its data present.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .errors import DataConfigError

# A hub id looks like `owner/name` (optionally `hf://datasets/owner/name`); anything else must exist.
_HUB_ID = re.compile(r"^(hf://datasets/)?[\w.-]+/[\w.-]+$")


@dataclass
class SubsetConfig:
    """One image source of the dataset, with its own repeats and caption/crop settings.

    `path` is a folder of images (nested; sidecar captions and/or HF-style `metadata.jsonl` /
    `metadata.csv`), a folder written by `datasets.Dataset.save_to_disk`, a `.parquet` file or a folder
    of them, or a Hugging Face hub dataset id (online only). Every other field left as null inherits
    the DataConfig value.
    """

    path: str = ""
    """Where the images are (see the class docstring)."""
    name: str | None = None
    """Label used in the scan summary; null = the path."""
    repeats: int | None = None
    """How many times each image appears per epoch (>= 1)."""
    kohya_repeats: bool | None = None
    """Read repeats from kohya-style sub-folder names `N_name` (`10_cat` = 10 repeats)."""
    resolution: int | None = None
    """Training resolution of this subset (bucket area = resolution^2)."""
    caption_extension: str | None = None
    """Sidecar caption extension (`.txt`, `.caption`); `img.png` uses `img.txt`."""
    default_caption: str | None = None
    """Caption of images without one."""
    caption_from_stem: bool | None = None
    """Use the file name (underscores as spaces) when there is no caption and no default."""
    image_column: str | None = None
    """Image column of HF datasets / parquet."""
    caption_column: str | None = None
    """Caption column of HF datasets / parquet / metadata files."""
    split: str | None = None
    """Split of a DatasetDict or hub dataset."""
    shuffle_tags: bool | None = None
    """Shuffle separator-delimited tags (the first `keep_tokens` stay in place)."""
    keep_tokens: int | None = None
    """Leading tags never shuffled or dropped."""
    tag_separator: str | None = None
    """Tag separator for shuffle/dropout."""
    tag_dropout: float | None = None
    """Probability of dropping each (non-kept) tag."""
    caption_dropout: float | None = None
    """Probability of replacing the whole caption with the empty string."""
    caption_prefix: str | None = None
    """Trigger word(s) prepended to every caption (never shuffled or dropped)."""
    flip: bool | None = None
    """Random horizontal flip (p = 0.5)."""
    random_crop: bool | None = None
    """Random instead of center crop to the bucket."""
    is_reg: bool = False
    """Regularization (prior-preservation) images: drawn alongside the training images, as many per
    epoch as there are training samples (cycling through this set across epochs); their loss is
    weighted by `train.prior_loss_weight`. Epochs count training images only."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise DataConfigError("path: every subset needs a path (folder, saved dataset, parquet file or hub id)")
        _check_common(self, "")
        _check_bool(self, "is_reg", "")


@dataclass
class DataConfig:
    """The training data: sources, captions, buckets, crops, caches and loading.

    Give either `path` (one source) or `subsets` (several, each with its own repeats, caption
    settings and optional resolution).
    """

    path: str | None = None
    """Folder of images, saved HF dataset folder, parquet file (or folder of them) or hub id."""
    subsets: list[SubsetConfig] = field(default_factory=list)
    """Several sources; each inherits the fields below that it does not set."""
    resolution: int = 1024
    """Training resolution in pixels (bucket area <= resolution^2); multiple of 8."""
    strict: bool = False
    """Stop before training, listing them all, if any image is unusable or any caption file is not
    clean UTF-8 (every image is then fully decoded, as with `verify_images`); otherwise such files
    are skipped (captions repaired) and reported."""
    caption_extension: str = ".txt"
    """Sidecar caption file extension."""
    default_caption: str | None = None
    """Caption of images without a caption file/column value; null = see `caption_from_stem`."""
    caption_from_stem: bool = True
    """Without caption and default, use the file name (underscores as spaces); false = empty caption."""
    image_column: str = "image"
    """Image column of HF datasets / parquet files."""
    caption_column: str = "text"
    """Caption column of HF datasets / parquet files / metadata.jsonl|csv."""
    split: str = "train"
    """Split used for DatasetDicts and hub datasets."""
    repeats: int = 1
    """Times each image is seen per epoch."""
    kohya_repeats: bool = False
    """Opt-in kohya folder convention: sub-folders `N_name` give N repeats (and `name` as caption fallback)."""
    shuffle_tags: bool = False
    """Shuffle comma-separated tags every time a caption is used."""
    keep_tokens: int = 0
    """Number of leading tags kept in place (never shuffled or dropped)."""
    tag_separator: str = ","
    """Separator between tags."""
    tag_dropout: float = 0.0
    """Probability of dropping each tag after the kept ones."""
    caption_dropout: float = 0.0
    """Probability of training on the empty caption (for classifier-free guidance)."""
    caption_prefix: str = ""
    """Trigger word(s) prepended to every caption."""
    flip: bool = False
    """Random horizontal flips (doubles the latent cache)."""
    random_crop: bool = False
    """Random crops instead of center crops (not with `cache_latents`)."""
    alpha_mask: bool = False
    """With `train.masked_loss`, take each image's mask from its alpha channel (opaque = learn,
    transparent = ignore) instead of `<stem>-masklabel.png` files; images without alpha are learnt whole."""
    enable_buckets: bool = True
    """Aspect-ratio buckets; false = every image is cropped to a resolution x resolution square."""
    bucket_min_side: int = 256
    """Shortest bucket side (clamped to the square side for small resolutions)."""
    bucket_max_side: int = 2048
    """Longest bucket side (raised to the square side for large resolutions)."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (multiple of 8)."""
    bucket_no_upscale: bool = False
    """Never enlarge an image: one too small for its bucket gets its own, smaller bucket (needs enable_buckets)."""
    min_size: int = 64
    """Images whose shorter side is below this many pixels are skipped (reported)."""
    max_pixels: int = 178_956_970
    """Images with more pixels are skipped (decompression-bomb guard)."""
    background: str | tuple[int, int, int] = "white"
    """Colour transparent images are composited on: a name, `#rrggbb` or [r, g, b]."""
    verify_images: bool = False
    """Fully decode every image during the scan (slower; finds every corrupt file before training)."""
    cache_latents: bool = False
    """Encode every image once with the VAE and train from cached latents."""
    cache_text: bool = False
    """Encode every caption once with the text encoders (not with tag shuffle/dropout or text-encoder training)."""
    cache_dir: str | None = None
    """Directory of the on-disk caches; null = keep caches in memory."""
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of cached tensors (float16 halves disk use)."""
    cache_memory_limit: float | None = 0.5
    """Without `cache_dir`, refuse to start when the in-memory caches (estimated from the scan and
    the model, printed at start) would need more than this share of the available memory; null = no limit."""
    num_workers: int = 2
    """DataLoader worker processes for decoding (0 = in the main process)."""

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise DataConfigError("path: must be a non-empty string or null")
        if not isinstance(self.subsets, list):
            raise DataConfigError(f"subsets: expected a list of mappings, got {type(self.subsets).__name__}")
        converted = []
        for i, sub in enumerate(self.subsets):
            if isinstance(sub, dict):
                sub = _subset_from_dict(sub, f"subsets[{i}]")
            if not isinstance(sub, SubsetConfig):
                raise DataConfigError(f"subsets[{i}]: expected a mapping with at least `path`, got {sub!r}")
            converted.append(sub)
        self.subsets = converted
        if self.path is not None and self.subsets:
            raise DataConfigError("path: give either `path` (one source) or `subsets` (several), not both")
        _check_common(self, "")
        for name in ("resolution", "bucket_min_side", "bucket_max_side", "bucket_step", "min_size", "max_pixels"):
            _check_int(self, name, "", 1)
        _check_int(self, "num_workers", "", 0)
        if self.bucket_step % 8:
            raise DataConfigError(f"bucket_step: must be a multiple of 8 (the VAE downsamples by 8), got {self.bucket_step}")
        for name in ("bucket_min_side", "bucket_max_side"):
            if getattr(self, name) % self.bucket_step:
                raise DataConfigError(f"{name}: must be a multiple of bucket_step={self.bucket_step}, got {getattr(self, name)}")
        if self.bucket_min_side > self.bucket_max_side:
            raise DataConfigError(f"bucket_min_side: {self.bucket_min_side} is larger than bucket_max_side={self.bucket_max_side}")
        for name in ("strict", "caption_from_stem", "kohya_repeats", "shuffle_tags", "flip", "random_crop",
                     "alpha_mask", "enable_buckets", "bucket_no_upscale", "verify_images", "cache_latents", "cache_text"):
            _check_bool(self, name, "")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise DataConfigError(f"cache_dtype: must be float32, float16 or bfloat16, got {self.cache_dtype!r}")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            raise DataConfigError("cache_dir: must be a directory path or null (in-memory caches)")
        self.background = parse_background(self.background, "background")
        # Without any source yet the top-level fields are checked as if they formed one subset.
        for i, sub in enumerate(self.resolved_subsets() or [self]):
            where = f"subsets[{i}]." if self.subsets else ""
            if sub.resolution % 8:
                raise DataConfigError(f"{where}resolution: must be a multiple of 8, got {sub.resolution}")
            if self.cache_latents and sub.random_crop:
                raise DataConfigError(
                    f"{where}random_crop: cannot be combined with cache_latents (a cached latent fixes one crop); "
                    "set random_crop: false or cache_latents: false")
            if self.cache_text and (sub.shuffle_tags or sub.tag_dropout > 0):
                what = "shuffle_tags" if sub.shuffle_tags else "tag_dropout"
                raise DataConfigError(
                    f"{where}{what}: cannot be combined with cache_text (every epoch makes new captions, so a "
                    f"cached text embedding would be wrong); set {what} off or cache_text: false")

    def resolved_subsets(self) -> list[SubsetConfig]:
        """Effective subsets: `path` as one subset, or `subsets`, with every null field inherited.

        Caption extensions are normalised to start with a dot.
        """
        subs = self.subsets or ([SubsetConfig(path=self.path)] if self.path is not None else [])
        out = []
        for sub in subs:
            values = {}
            for f in fields(SubsetConfig):
                own = getattr(sub, f.name)
                values[f.name] = getattr(self, f.name) if own is None and hasattr(self, f.name) else own
            ext = values["caption_extension"]
            values["caption_extension"] = ext if ext.startswith(".") else "." + ext
            values["name"] = values["name"] or values["path"]
            out.append(replace(sub, **values))
        return out

    def check_sources(self) -> None:
        """Raise DataConfigError when no source is given or a local path does not exist.

        A path that does not exist but looks like a hub id (`owner/name`) is accepted: it is loaded
        with `datasets.load_dataset` when the dataset is built.
        """
        subs = self.resolved_subsets()
        if not subs:
            raise DataConfigError("path: no training images given; set `path` (or `subsets`) to an image folder or dataset")
        if all(sub.is_reg for sub in subs):
            raise DataConfigError("subsets: every subset is is_reg (regularization images); add a subset of training images")
        for i, sub in enumerate(subs):
            where = f"subsets[{i}].path" if self.subsets else "path"
            if not os.path.exists(sub.path) and not _HUB_ID.match(sub.path):
                raise DataConfigError(f"{where}: {sub.path!r} does not exist (and is not a hub id like 'owner/name')")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataConfig:
        """DataConfig from a plain mapping (e.g. parsed YAML); unknown keys raise with a suggestion."""
        if not isinstance(raw, dict):
            raise DataConfigError(f"data: expected a mapping, got {type(raw).__name__}")
        _reject_unknown(cls, raw, "")
        return cls(**raw)


def parse_background(value: Any, name: str) -> tuple[int, int, int]:
    """(r, g, b) 0..255 from a colour name, `#rrggbb` string or a 3-sequence; DataConfigError otherwise."""
    if isinstance(value, str):
        from PIL import ImageColor

        try:
            rgb = ImageColor.getrgb(value)
        except ValueError:
            raise DataConfigError(f"{name}: unknown colour {value!r}; use a name like 'white', '#808080' or [r, g, b]") from None
        return tuple(int(c) for c in rgb[:3])
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)):
        return tuple(value)
    raise DataConfigError(f"{name}: expected a colour name, '#rrggbb' or [r, g, b] with 0..255 integers, got {value!r}")


# ---- field checks -----------------------------------------------------------------------------------
def _check_common(cfg: Any, where: str) -> None:
    """Checks of the fields shared by DataConfig and SubsetConfig (None = inherited, not checked)."""
    for name in ("repeats", "resolution"):
        _check_int(cfg, name, where, 1)
    _check_int(cfg, "keep_tokens", where, 0)
    for name in ("tag_dropout", "caption_dropout"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise DataConfigError(f"{where}{name}: must be a probability in [0, 1], got {value!r}")
    for name in ("kohya_repeats", "caption_from_stem", "shuffle_tags", "flip", "random_crop"):
        _check_bool(cfg, name, where)
    for name in ("caption_extension", "image_column", "caption_column", "split", "tag_separator"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise DataConfigError(f"{where}{name}: must be a non-empty string, got {value!r}")
    for name in ("default_caption", "caption_prefix", "name"):
        value = getattr(cfg, name, None)
        if value is not None and not isinstance(value, str):
            raise DataConfigError(f"{where}{name}: must be a string, got {value!r} (quote it in YAML)")
    ext = cfg.caption_extension
    if ext is not None and ext.lstrip(".").lower() in {"jpg", "jpeg", "png", "webp", "bmp"}:
        raise DataConfigError(f"{where}caption_extension: {ext!r} is an image extension; captions need e.g. '.txt'")


def _check_int(cfg: Any, name: str, where: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataConfigError(f"{where}{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise DataConfigError(f"{where}{name}: must be >= {minimum}, got {value}")


def _check_bool(cfg: Any, name: str, where: str) -> None:
    value = getattr(cfg, name)
    if value is not None and not isinstance(value, bool):
        raise DataConfigError(f"{where}{name}: expected true or false, got {value!r}")


def _reject_unknown(cls: type, raw: dict, where: str) -> None:
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise DataConfigError(f"{where}{key}: unknown key{hint}")


def _subset_from_dict(raw: dict, where: str) -> SubsetConfig:
    _reject_unknown(SubsetConfig, raw, where + ".")
    try:
        return SubsetConfig(**raw)
    except DataConfigError as exc:
        raise DataConfigError(f"{where}.{exc}") from None
