"""Exceptions of the data pipeline.

Every class here means "the input is wrong" (a setting, a file, a cache): the command line prints the
message without a traceback, so each message names the field or file and says what to do.
"""
from __future__ import annotations


class DataError(Exception):
    """Base class of data-pipeline errors caused by the user's data or settings."""


class DataConfigError(DataError, ValueError):
    """A data setting is invalid. The message starts with the field name, e.g. ``tag_dropout: ...``.

    It subclasses ValueError so dataclass builders that re-raise ValueError from ``__post_init__``
    (with the section prefix ``data:``) keep the message intact.
    """


class DataScanError(DataError):
    """Strict mode found unusable files before training; the message lists every one of them."""


class CacheError(DataError):
    """A latent/text cache cannot be used with the given settings, or an entry is missing/corrupt."""
