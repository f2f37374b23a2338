"""Image records and the scan report shared by every source type.

A scan turns a subset into `ImageRecord`s (one per usable image) and notes every problem in a
`ScanReport`: skipped files (with reasons), caption files that needed repair, and images that had no
caption. The report is printed once before training; with `strict` it becomes a `DataScanError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DataScanError


@dataclass(slots=True)
class ImageRecord:
    """One usable image.

    name: path or `source[row]`, for messages; path: local file or None; row: row of an HF table or
    None; subset: index into the resolved subsets; repeats: samples per epoch; width/height: pixels
    after EXIF orientation; caption: raw caption (normalised, before shuffle/dropout).
    """

    name: str
    path: str | None
    row: int | None
    subset: int
    repeats: int
    width: int
    height: int
    caption: str


@dataclass
class ScanReport:
    """Problems found while scanning. Entries are (file name, reason)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Images (or would-be images) that are not used: corrupt, truncated, empty, too small, ..."""
    caption_errors: list[tuple[str, str]] = field(default_factory=list)
    """Caption data that had to be repaired (not UTF-8, unreadable, malformed metadata row)."""
    caption_notes: list[tuple[str, str]] = field(default_factory=list)
    """Images without (or with an empty) caption and the fallback used."""
    subsets: list[tuple[str, int, int]] = field(default_factory=list)
    """Per subset: (name, usable images, samples per epoch with repeats)."""
    regularization: set[str] = field(default_factory=set)
    """Names of the subsets (above) that hold regularization images."""
    held_out: int = 0
    """Training images held out for the validation loss (`validation.split`)."""

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((str(name), reason))

    @property
    def errors(self) -> list[tuple[str, str]]:
        """What strict mode refuses: skipped files and caption files that were not clean UTF-8."""
        return self.skipped + self.caption_errors

    def summary(self, limit: int = 20) -> str:
        """Multi-line human-readable summary; lists at most `limit` entries per section."""
        train = [(n, s) for name, n, s in self.subsets if name not in self.regularization]
        reg = [(n, s) for name, n, s in self.subsets if name in self.regularization]
        used, samples = sum(n for n, _ in train), sum(s for _, s in train)
        what = f"{used} usable training images ({samples} samples per epoch)"
        if reg:
            what += (f" and {sum(n for n, _ in reg)} regularization images ({sum(s for _, s in reg)} with repeats; "
                     f"{samples} drawn per epoch)")
        if self.held_out:
            what += f"; {self.held_out} training images held out for validation"
        head = (f"data scan: {what} in {len(self.subsets)} subset(s); "
                f"{len(self.skipped)} skipped, {len(self.caption_errors)} caption problem(s), "
                f"{len(self.caption_notes)} without caption")
        lines = [head]
        for name, n, s in self.subsets:
            kind = "regularization " if name in self.regularization else ""
            lines.append(f"  subset {name}: {n} {kind}images, {s} samples")
        for title, entries in (("skipped", self.skipped), ("caption problems", self.caption_errors),
                               ("without caption", self.caption_notes)):
            if not entries:
                continue
            lines.append(f"{title} ({len(entries)}):")
            lines.extend(f"  {name}: {reason}" for name, reason in entries[:limit])
            if len(entries) > limit:
                lines.append(f"  ... and {len(entries) - limit} more")
        return "\n".join(lines)

    def raise_if_errors(self) -> None:
        """DataScanError listing *every* unusable file when there is any (strict mode)."""
        errs = self.errors
        if not errs:
            return
        listing = "\n".join(f"  {name}: {reason}" for name, reason in errs)
        raise DataScanError(
            f"strict mode: {len(errs)} problem(s) in the training data; fix or remove these files "
            f"(or set data.strict: false to skip them):\n{listing}")
