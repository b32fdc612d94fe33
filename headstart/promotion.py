"""The promotion gate: does the newly exported model (the challenger) replace the champion?

Both models are loaded through headstart.serving's loaders (as `headstart predict` loads them) and
score the same images: today's test split, so the champion is re-scored on data it may never have
seen rather than trusted on its old numbers. The split keeps every image's assignment as images are
added, so today's test images were never in the champion's training split. The comparison is
headstart.uncertainty's paired one (the PR report's): McNemar's exact test on the images whose
correctness differs, a paired-bootstrap interval of the accuracy change, and the classes whose F1
dropped beyond the noise.

The challenger is kept out when it is significantly worse (McNemar p < alpha, more images lost than
gained) or its accuracy falls by more than `promote.tolerance`; `promote.force` promotes it anyway.
Accuracy over two different class sets is not comparable (the champion cannot name a new class), so
when classes were added or removed the models are compared on the test images of the classes both
know (`promote.class_change: compare_shared`, the default: a folder the user adds is a request to
serve it, and the shared classes must not get worse for it), or the champion stays until
`promote.force` (`require_force`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from headstart.data.images import load_rgb
from headstart.data.manifest import read_split_manifest
from headstart.files import atomic_write_json, atomic_write_text
from headstart.layout import Layout
from headstart.params import PromoteParams
from headstart.registry import ARTIFACT, gto_version
from headstart.reporting import markdown_table
from headstart.serving import load_predictor
from headstart.uncertainty import LEVEL, PairedComparison, Predictions, compare_predictions, format_interval

BATCH = 32
Outcome = Literal["promoted", "kept", "unchanged"]


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str
    notices: list[str] = field(default_factory=list)
    comparison: PairedComparison | None = None
    shared_classes: list[str] | None = None  # set when the class sets differ and only these were compared

    @property
    def promote(self) -> bool:
        return self.outcome == "promoted"


def test_rows(layout: Layout) -> pd.DataFrame:
    manifest = read_split_manifest(layout.split_manifest)
    rows = manifest[manifest["split"] == "test"].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{layout.split_manifest} has no test images to compare the models on: set split.test > 0")
    return rows


def score(model_file: Path, rows: pd.DataFrame, root: Path) -> Predictions:
    """The model's predictions of `rows` (path, label), decoded as predict decodes them."""
    predictor = load_predictor(model_file)
    chunks = [predictor.predict([load_rgb(root / path, target_size=predictor.image_size)
                                 for path in rows["path"].iloc[start:start + BATCH]])
              for start in range(0, len(rows), BATCH)]
    probs = np.concatenate(chunks)
    frame = pd.DataFrame({"path": rows["path"], "label": rows["label"],
                          "predicted": [predictor.classes[i] for i in probs.argmax(axis=1)],
                          "confidence": probs.max(axis=1)})
    return Predictions(frame=frame, classes=list(predictor.classes), probabilities=probs)


def _only_labels(predictions: Predictions, labels: list[str]) -> Predictions:
    keep = predictions.frame["label"].isin(labels).to_numpy()
    return Predictions(predictions.frame[keep].reset_index(drop=True), predictions.classes, predictions.probabilities[keep])


def _listed(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names) or "none"


def decide(p: PromoteParams, champion: Predictions, challenger: Predictions) -> Decision:
    """Promote or keep, from both models' predictions of the same test images."""
    added = sorted(set(challenger.classes) - set(champion.classes))
    removed = sorted(set(champion.classes) - set(challenger.classes))
    notices: list[str] = []
    shared: list[str] | None = None
    forced = "promote.force is set: promoted although "
    if added or removed:
        shared = sorted(set(champion.classes) & set(challenger.classes))
        notices.append(f"The class set changed (added: {_listed(added)}; removed: {_listed(removed)}). Accuracy over "
                       "different classes is not comparable, so the models were compared on the test images of the "
                       f"{len(shared)} classes both know; the new classes have no champion to beat.")
        problem = None
        if p.class_change == "require_force":
            problem = "the class set changed and promote.class_change is require_force"
        elif not shared:
            problem = "the two models share no class, so there is nothing to compare"
        if problem:
            return Decision("promoted", forced + problem, notices, None, shared) if p.force else \
                Decision("kept", f"{problem}: set promote.force: true to promote the challenger", notices, None, shared)
        champion, challenger = _only_labels(champion, shared), _only_labels(challenger, shared)
    found = compare_predictions(champion, challenger, p.resamples, p.seed)
    change, low, high = found.accuracy_change
    problems = []
    if found.mcnemar_p < p.alpha and found.head_only_right < found.base_only_right:
        problems.append(f"it is significantly worse (McNemar p < promote.alpha {p.alpha:g}: "
                        f"{found.base_only_right} images lost, {found.head_only_right} gained)")
    if change < -p.tolerance:
        problems.append(f"its accuracy fell by {-change:.4f} > promote.tolerance {p.tolerance:g}")
    dropped = found.per_class.loc[found.per_class["dropped"], "class"].tolist()
    if dropped:
        notices.append(f"F1 dropped beyond the noise for {_listed(dropped)}.")
        if p.block_on_dropped_class:
            problems.append(f"F1 dropped beyond the noise for {_listed(dropped)} (promote.block_on_dropped_class)")
    summary = (f"accuracy {found.base_accuracy:.4f} -> {found.head_accuracy:.4f} (change {change:+.4f}, "
               f"{LEVEL:.0%} interval {format_interval(low, high)}), McNemar p = {found.mcnemar_p:.4g}, "
               f"on {found.images} test images")
    if not problems:
        return Decision("promoted", f"not worse than the champion: {summary}", notices, found, shared)
    if p.force:
        return Decision("promoted", forced + "; ".join(problems) + f" ({summary})", notices, found, shared)
    return Decision("kept", "; ".join(problems) + f" ({summary})", notices, found, shared)


def comparison_json(found: PairedComparison | None) -> dict[str, Any] | None:
    if found is None:
        return None
    change, low, high = found.accuracy_change
    per_class = found.per_class.replace({np.nan: None}).to_dict("records")
    return {"images": found.images, "champion_accuracy": found.base_accuracy, "challenger_accuracy": found.head_accuracy,
            "accuracy_change": {"change": change, "low": low, "high": high}, "mcnemar_p": found.mcnemar_p,
            "champion_only_right": found.base_only_right, "challenger_only_right": found.head_only_right,
            "dropped_classes": found.per_class.loc[found.per_class["dropped"], "class"].tolist(), "per_class": per_class}


def write_report(layout: Layout, decision: Decision, before: str | None, after: str | None, registered: str | None,
                 p: PromoteParams) -> dict[str, Any]:
    """reports/promotion.{json,md}: the decision, why, the comparison and the GTO commands for a new version."""
    record = {"outcome": decision.outcome, "reason": decision.reason, "notices": decision.notices,
              "champion_before": before, "champion_after": after, "registered": registered,
              "shared_classes": decision.shared_classes, "comparison": comparison_json(decision.comparison),
              "params": p.model_dump(mode="json")}
    atomic_write_json(layout.promotion_json, record)
    title = {"promoted": f"promoted `{registered}`", "kept": f"kept the champion `{before}`",
             "unchanged": f"unchanged: `{after}` stays the champion"}[decision.outcome]
    lines = [f"## Promotion gate: {title}", "", decision.reason[0].upper() + decision.reason[1:] + ".", ""]
    lines += [f"- {notice}" for notice in decision.notices] + ([""] if decision.notices else [])
    found = decision.comparison
    if found is not None:
        change, low, high = found.accuracy_change
        lines += [markdown_table(pd.DataFrame([{"": "accuracy", f"champion {before}": found.base_accuracy,
                                                "challenger": found.head_accuracy, "change": change,
                                                f"{LEVEL:.0%} interval": format_interval(low, high)}])), "",
                  f"Rules: keep the champion when the change is below -{p.tolerance:g} (promote.tolerance) or "
                  f"McNemar's p < {p.alpha:g} (promote.alpha) with more images lost than gained.", ""]
    if registered is not None:
        tag = gto_version(registered)
        lines += [f"Served from `models/champion` (`headstart predict`; `--model {registered}` names it). After "
                  f"committing dvc.lock, tag it for DVC's model registry: `gto register {ARTIFACT} HEAD --version "
                  f"{tag}` and `gto assign {ARTIFACT} --version {tag} --stage prod`.", ""]
    atomic_write_text(layout.promotion_md, "\n".join(lines).rstrip() + "\n")
    return record
