"""promote stage: gate the newly exported model against the champion, and keep every promoted one.

Reads models/export (the challenger), the registry (models/registry: the champion and its data),
today's data (data/raw/manifest.csv) and test split. Writes reports/data_diff.{json,md} (what changed
since the champion's data), reports/promotion.{json,md} (the decision and why), a new registry
version when the challenger is promoted, and models/champion (a copy of the champion, which
`headstart predict` serves). A kept champion is a decision, not an error: the stage succeeds.
A challenger already in the registry (same model card) is not registered again, so a rerun after
`headstart registry rollback` keeps the rollback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from headstart.datadiff import DataTableError, diff_data, read_data_table, write_diff
from headstart.files import exclusive, remove_stale_temps, sha256_file
from headstart.layout import Layout
from headstart.params import Params
from headstart.promotion import Decision, comparison_json, decide, score, test_rows, write_report
from headstart.registry import CARD, DATA_TABLE, Registry, git_revision, now, preferred_model_file

log = logging.getLogger(__name__)


def _fingerprint(layout: Layout) -> str | None:
    """The source fingerprint's digest (data/fingerprint.json), when that stage wrote one."""
    if not layout.source_fingerprint.exists():
        return None
    try:
        return json.loads(layout.source_fingerprint.read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataTableError(f"{layout.source_fingerprint}: no readable 'digest' ({exc}); rerun `dvc repro` to "
                             "rewrite it") from None


def _entry(layout: Layout, card: dict[str, Any], export_id: str, decision: Decision, images: int) -> dict[str, Any]:
    return {"promoted_at": now(), "reason": decision.reason, "export_id": export_id, "git": git_revision(layout.root),
            "classes": card["classes"], "metrics": card.get("metrics"), "params": card.get("params"),
            "data": {"fingerprint": _fingerprint(layout), "raw_manifest_sha256": sha256_file(layout.raw_manifest),
                     "split_manifest_sha256": sha256_file(layout.split_manifest), "images": images},
            "gate": comparison_json(decision.comparison)}


def run(params: Params, layout: Layout) -> dict[str, Any]:
    p = params.promote
    remove_stale_temps(layout.champion_dir)
    registry = Registry.of(layout)
    with exclusive(layout.registry_lock, "promote"):  # a rollback or another promote waits
        champion = registry.champion()
        card_file = layout.export_dir / CARD
        if not card_file.exists():
            raise FileNotFoundError(f"{card_file} not found: run the export stage first (headstart export)")
        card = json.loads(card_file.read_text())
        today = read_data_table(layout.raw_manifest, "run the download stage (headstart download)")
        baseline = (read_data_table(registry.path(champion) / DATA_TABLE, "restore the registry (dvc checkout "
                                    "models/registry) or roll back to another version") if champion else None)
        write_diff(diff_data(baseline, today, champion), layout.data_diff_json, layout.data_diff_md)

        export_id = sha256_file(card_file)
        known = registry.version_of(export_id)
        if known is not None and known == champion:
            decision = Decision("unchanged", f"the challenger is {known}, already the champion")
        elif known is not None:
            decision = Decision("kept", f"the challenger is already registered as {known}, which is not the champion "
                                f"(rolled back or replaced): `headstart registry rollback {known}` serves it again")
        elif champion is None:
            decision = Decision("promoted", "first model: no champion yet")
        else:
            rows = test_rows(layout)
            decision = decide(p, score(preferred_model_file(registry.path(champion)), rows, layout.root),
                              score(preferred_model_file(layout.export_dir), rows, layout.root))

        registered = None
        if decision.promote:
            entry = _entry(layout, card, export_id, decision, len(today))
            registered = registry.register(layout.export_dir, entry, today)
            registry.set_champion(registered, "promote", decision.reason)
        registry.publish(layout.champion_dir)
        after = registry.champion()
    write_report(layout, decision, champion, after, registered, p)
    log.info("promote: %s (champion %s -> %s): %s", decision.outcome, champion, after, decision.reason)
    return {"outcome": decision.outcome, "champion_before": champion, "champion_after": after, "registered": registered}
