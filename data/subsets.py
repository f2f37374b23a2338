"""One subset, whatever its kind: `scan_subset` dispatches to the folder scanner (`sources`) or
the Hugging Face table scanner (`hf`). It lives apart from both so neither imports the other's
back (hf builds on sources' options and caption helpers)."""
from __future__ import annotations

import logging

from .config import SubsetConfig
from .hf import open_table, scan_table
from .scan import ScanReport
from .sources import ScanOptions, scan_folder, source_kind

log = logging.getLogger(__name__)


def scan_subset(sub: SubsetConfig, subset_index: int, opts: ScanOptions, report: ScanReport,
                hf_cache_dir: str | None = None):
    """(records, table) of one subset; `table` is the HF table rows refer to (None for folders)."""
    kind = source_kind(sub.path)
    if kind == "folder":
        records, table = scan_folder(sub, subset_index, opts, report), None
    else:
        table = open_table(sub, kind, cache_dir=hf_cache_dir)
        records = scan_table(table, sub, subset_index, opts, report)
    log.debug("scanned %s (%s): %d images", sub.path, kind, len(records))
    return records, table
