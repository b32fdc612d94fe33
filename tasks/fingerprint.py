"""fingerprint stage: record what `download.source` holds now in data/fingerprint.json, which download depends on.

DVC cannot look outside the repository and Prefect's keys hash only declared files, so this stage runs
every time (dvc.yaml: always_changed) and writes the same bytes while the data is the same; download and
everything after it then stay up to date. headstart/data/sources/fingerprint.py says what is hashed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from headstart.data.sources.fingerprint import render, source_fingerprint
from headstart.files import atomic_write_text, remove_stale_temps
from headstart.hash_cache import HashCache
from headstart.layout import Layout
from headstart.params import Params

log = logging.getLogger(__name__)


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """Fingerprint the source (reading only files whose size or times changed) and write the record."""
    started = time.perf_counter()
    remove_stale_temps(layout.source_fingerprint)
    with HashCache(layout.fingerprint_cache) as cache:
        record = source_fingerprint(params.download, layout, cache)
    atomic_write_text(layout.source_fingerprint, render(record))
    summary = {"kind": record["kind"], "digest": record["digest"], "files": len(record.get("files", {})),
               "read": cache.misses, "seconds": round(time.perf_counter() - started, 2)}
    log.info("fingerprint: %s source %s, digest %s (%d files, %d read)", summary["kind"], params.download.source,
             summary["digest"][:12], summary["files"], summary["read"])
    return summary
