"""Captions: reading caption files in any encoding, and per-sample tag shuffle/dropout/prefix.

`CaptionProcessor` is a pure function of (caption, rng); the dataset seeds the rng from
(seed, epoch, index), so every caption variant is reproducible.
"""
from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

_WHITESPACE = re.compile(r"[ \t\f\v]+")


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
    """Applies prefix, keep_tokens, tag shuffle, tag dropout and caption dropout to a caption.

    Order: whole-caption dropout (-> "") first; otherwise the caption is split on the separator
    (empty tags dropped), the first `keep_tokens` tags stay in place, the rest are dropped with
    probability `tag_dropout` each and shuffled, and the prefix tags are put in front (not repeated
    when the caption already starts with them). Tags are re-joined with the separator plus a space
    (", " for ","), or the bare separator when it is whitespace.
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

    def split(self, caption: str) -> list[str]:
        """Non-empty stripped tags of `caption`."""
        return [t.strip() for t in caption.split(self.settings.tag_separator) if t.strip()]

    def _with_prefix(self, tags: list[str]) -> list[str]:
        n = len(self.prefix_tags)
        if n and tags[:n] == self.prefix_tags:
            return tags
        return self.prefix_tags + tags

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
        if not s.randomises_text:
            return self.base(caption)
        tags = self.split(caption)
        keep = tags[: s.keep_tokens]
        rest = tags[s.keep_tokens:]
        if s.tag_dropout > 0 and rest:
            rest = [t for t, u in zip(rest, rng.random(len(rest))) if u >= s.tag_dropout]
        if s.shuffle_tags and len(rest) > 1:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        return self.joiner.join(self._with_prefix(keep + rest))
