"""Captions: reading caption files in any encoding, and per-sample wildcards, tag
shuffle/dropout and prefix.

`CaptionProcessor` is a pure function of (caption, rng); the dataset seeds the rng from
(seed, epoch, index), so every caption variant is reproducible. Wildcards `{red|green|blue}` in a
caption or the prefix are replaced by one option, drawn every time the caption is used.
"""
from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

_WHITESPACE = re.compile(r"[ \t\f\v]+")
_WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")  # {a|b|c}: braces holding at least one "|"
MAX_WILDCARD_VARIANTS = 1024  # a text cache encodes every variant; more than this is refused


def has_wildcards(text: str) -> bool:
    """Whether `text` holds a `{a|b}` wildcard."""
    return _WILDCARD.search(text) is not None


def resolve_wildcards(text: str, rng: np.random.Generator) -> str:
    """`text` with each `{a|b|c}` replaced by one of its options (uniform, left to right)."""
    return _WILDCARD.sub(lambda m: m.group(1).split("|")[int(rng.integers(len(m.group(1).split("|"))))], text)


def wildcard_variants(text: str) -> list[str]:
    """Every text the wildcards of `text` can produce (ValueError beyond MAX_WILDCARD_VARIANTS)."""
    import itertools

    options = [m.group(1).split("|") for m in _WILDCARD.finditer(text)]
    count = 1
    for o in options:
        count *= len(o)
    if count > MAX_WILDCARD_VARIANTS:
        raise ValueError(f"caption {text[:60]!r} has {count} wildcard variants (more than {MAX_WILDCARD_VARIANTS})")
    parts = _WILDCARD.split(text)  # literal, option text, literal, ...
    out = []
    for choice in itertools.product(*options):
        pieces = [p if i % 2 == 0 else choice[i // 2] for i, p in enumerate(parts)]
        out.append("".join(pieces))
    return out


def decode_caption(data: bytes) -> tuple[str, str | None]:
    """Text of a caption file and a problem description (None when clean UTF-8).

    UTF-8 (with or without BOM) and BOM-marked UTF-16 are read as such; anything else is decoded as
    cp1252 (latin-1 for bytes cp1252 lacks), which is what non-UTF-8 caption files nearly always are.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), None
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        pos = exc.start
    try:
        text = data.decode("cp1252")
        used = "cp1252"
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        used = "latin-1"
    return text, f"not valid UTF-8 (bad byte at offset {pos}); read as {used} - re-save the file as UTF-8"


def normalise_caption(text: str) -> str:
    """One-line caption: Unicode NFC, lines joined with a space, runs of blanks collapsed, stripped.

    NFC makes visually identical captions (e.g. composed vs decomposed accents) tokenise the same.
    """
    text = unicodedata.normalize("NFC", text).replace("\x00", "")
    lines = [ln.strip() for ln in text.splitlines()]
    return _WHITESPACE.sub(" ", " ".join(ln for ln in lines if ln)).strip()


def read_caption_file(path: str) -> tuple[str | None, str | None]:
    """(caption, problem) of a sidecar file: (None, None) when it does not exist.

    An empty file gives ("", "empty caption file"); undecodable bytes are read as cp1252 and reported.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"caption file unreadable ({exc.strerror or exc})"
    text, problem = decode_caption(data)
    text = normalise_caption(text)
    if not text and problem is None:
        problem = "empty caption file"
    return text, problem


@dataclass(frozen=True)
class CaptionSettings:
    """Per-subset caption randomisation (see DataConfig for each field's meaning)."""

    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_separator: str = ","
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    caption_prefix: str = ""

    @property
    def randomises_text(self) -> bool:
        """True when the same caption can give different texts (beyond whole-caption dropout)."""
        return self.shuffle_tags or self.tag_dropout > 0


class CaptionProcessor:
    """Applies caption dropout, wildcards, keep_tokens, tag dropout, tag shuffle and the prefix.

    Order: 1. whole-caption dropout (-> "") is decided first; 2. wildcards `{a|b}` in the caption
    and in the prefix are resolved; 3. the caption is split on the separator (empty tags dropped)
    and its first `keep_tokens` tags stay in place; 4. the other tags are dropped with probability
    `tag_dropout` each, 5. then shuffled; 6. the prefix tags go in front (never shuffled, dropped or
    counted in keep_tokens; not repeated when the caption already starts with them). Tags are
    re-joined with the separator plus a space (", " for ","), or the bare separator when it is
    whitespace. Random draws happen only for the steps that are on, so turning wildcards on in one
    caption does not change the shuffles of the others.
    """

    def __init__(self, settings: CaptionSettings):
        self.settings = settings
        sep = settings.tag_separator
        self.joiner = sep if not sep.strip() or sep.endswith(" ") else sep + " "
        self.prefix_tags = self.split(settings.caption_prefix)

    @property
    def is_random(self) -> bool:
        """False when every call returns `base(caption)` (no rng needed)."""
        return self.settings.caption_dropout > 0 or self.settings.randomises_text

    def is_random_for(self, caption: str) -> bool:
        """Whether `caption` can give different texts (randomising settings, or wildcards in it or the prefix)."""
        return self.is_random or has_wildcards(caption) or has_wildcards(self.settings.caption_prefix)

    def variants(self, caption: str) -> list[str]:
        """Every text `caption` can give when only wildcards vary (what a text cache encodes)."""
        prefixes = wildcard_variants(self.settings.caption_prefix)
        texts = []
        for prefix in prefixes:
            proc = self if len(prefixes) == 1 and prefix == self.settings.caption_prefix else CaptionProcessor(
                CaptionSettings(**{**self.settings.__dict__, "caption_prefix": prefix}))
            texts.extend(proc.base(c) for c in wildcard_variants(caption))
        return texts

    def split(self, caption: str) -> list[str]:
        """Non-empty stripped tags of `caption`."""
        return [t.strip() for t in caption.split(self.settings.tag_separator) if t.strip()]

    def _with_prefix(self, tags: list[str], prefix_tags: list[str] | None = None) -> list[str]:
        prefix = self.prefix_tags if prefix_tags is None else prefix_tags
        n = len(prefix)
        if n and tags[:n] == prefix:
            return tags
        return prefix + tags

    def base(self, caption: str) -> str:
        """The caption with prefix and no randomisation (what a text cache stores)."""
        if not self.prefix_tags:
            return caption
        return self.joiner.join(self._with_prefix(self.split(caption)))

    def __call__(self, caption: str, rng: np.random.Generator) -> str:
        s = self.settings
        # Draw the dropout decision unconditionally so the other draws do not depend on the rate.
        if rng.random() < s.caption_dropout:
            return ""
        prefix_tags = self.prefix_tags
        if has_wildcards(s.caption_prefix):
            prefix_tags = self.split(resolve_wildcards(s.caption_prefix, rng))
        if has_wildcards(caption):
            caption = resolve_wildcards(caption, rng)
        if not s.randomises_text:
            return self.joiner.join(self._with_prefix(self.split(caption), prefix_tags)) if prefix_tags else caption
        tags = self.split(caption)
        keep = tags[: s.keep_tokens]
        rest = tags[s.keep_tokens:]
        if s.tag_dropout > 0 and rest:
            rest = [t for t, u in zip(rest, rng.random(len(rest))) if u >= s.tag_dropout]
        if s.shuffle_tags and len(rest) > 1:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        return self.joiner.join(self._with_prefix(keep + rest, prefix_tags))
