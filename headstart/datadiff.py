"""What changed between the data a model was trained on and today's data.

Both sides are tables of (path, label, sha256): download's `data/raw/manifest.csv` today, and the
copy of it the registry keeps with every promoted model. An image is matched on its path under
`data/raw/<class>/`: a path only today is added, a path only then is removed, and a path on both
sides with another content hash was edited in place. Relabelling moves an image to another class
folder, so it counts as removed from one class and added to the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from headstart.files import atomic_write_json, atomic_write_text
from headstart.reporting import markdown_table

DATA_COLUMNS = ("path", "label", "sha256")
COUNT_COLUMNS = ("class", "before", "after", "added", "removed", "changed")


class DataTableError(ValueError):
    """A data table (raw manifest or a registry copy) that cannot be read; the message says what to do."""


def read_data_table(path: Path, fix: str) -> pd.DataFrame:
    """The (path, label, sha256) columns of a manifest, as text; `fix` says how to rebuild the file."""
    if not path.is_file():
        raise DataTableError(f"{path} not found; {fix}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataTableError(f"{path}: not a readable CSV ({exc}); {fix}") from None
    absent = [column for column in DATA_COLUMNS if column not in table.columns]
    if absent:
        raise DataTableError(f"{path}: missing column(s) {', '.join(absent)}; {fix}")
    repeated = table["path"][table["path"].duplicated()]
    if not repeated.empty:
        raise DataTableError(f"{path}: path {repeated.iloc[0]!r} is listed twice; {fix}")
    return table[list(DATA_COLUMNS)].reset_index(drop=True)


def write_data_table(table: pd.DataFrame, target: Path) -> None:
    atomic_write_text(target, table[list(DATA_COLUMNS)].sort_values("path").to_csv(index=False))


@dataclass(frozen=True)
class DataDiff:
    """Per-class counts (COUNT_COLUMNS) and the classes that appeared or went; `before` None: no baseline."""

    counts: pd.DataFrame
    classes_added: list[str]
    classes_removed: list[str]
    baseline: str | None  # the registry version whose data is `before`, or None

    @property
    def changed(self) -> bool:
        totals = self.counts[["added", "removed", "changed"]].to_numpy().sum()
        return bool(totals) or bool(self.classes_added or self.classes_removed)

    def as_json(self) -> dict[str, Any]:
        totals = {column: int(self.counts[column].sum()) for column in COUNT_COLUMNS[1:]}
        return {"baseline": self.baseline, "changed": self.changed, "classes_added": self.classes_added,
                "classes_removed": self.classes_removed, "totals": totals,
                "per_class": {row["class"]: {c: int(row[c]) for c in COUNT_COLUMNS[1:]}
                              for row in self.counts.to_dict("records")}}


def diff_data(before: pd.DataFrame | None, after: pd.DataFrame, baseline: str | None = None) -> DataDiff:
    """Images added, removed and edited in place per class, from `before` (None: no baseline) to `after`."""
    if before is None:
        counts = after.groupby("label").size().rename("after").reset_index().rename(columns={"label": "class"})
        counts = counts.assign(before=0, added=counts["after"], removed=0, changed=0)
        return DataDiff(counts[list(COUNT_COLUMNS)], [], [], None)
    joined = before.merge(after, on="path", how="outer", suffixes=("_before", "_after"), indicator=True)
    both = joined[joined["_merge"] == "both"]
    events = pd.concat([
        joined.loc[joined["_merge"] == "right_only", ["label_after"]].set_axis(["class"], axis=1).assign(kind="added"),
        joined.loc[joined["_merge"] == "left_only", ["label_before"]].set_axis(["class"], axis=1).assign(kind="removed"),
        both.loc[both["sha256_before"] != both["sha256_after"], ["label_after"]].set_axis(["class"], axis=1)
        .assign(kind="changed"),
    ])
    classes = sorted(set(before["label"]) | set(after["label"]))
    tally = pd.crosstab(events["class"], events["kind"]) if not events.empty else pd.DataFrame()
    counts = pd.DataFrame({
        "class": classes,
        "before": before["label"].value_counts().reindex(classes, fill_value=0).to_numpy(),
        "after": after["label"].value_counts().reindex(classes, fill_value=0).to_numpy(),
        **{kind: (tally[kind] if kind in tally else pd.Series(dtype=int)).reindex(classes, fill_value=0).to_numpy()
           for kind in ("added", "removed", "changed")},
    })
    return DataDiff(counts.astype({c: int for c in COUNT_COLUMNS[1:]}),
                    sorted(set(after["label"]) - set(before["label"])),
                    sorted(set(before["label"]) - set(after["label"])), baseline)


def diff_markdown(diff: DataDiff) -> str:
    """A short Markdown account: the totals, the class changes and the per-class table."""
    lines = ["## Data since the champion", ""]
    if diff.baseline is None:
        lines += ["No champion yet: every image is new to the registry.", ""]
    else:
        totals = diff.as_json()["totals"]
        lines += [f"Compared with the data `{diff.baseline}` was trained on: {totals['added']} added, "
                  f"{totals['removed']} removed, {totals['changed']} changed in place "
                  f"({totals['before']} -> {totals['after']} images)." if diff.changed
                  else f"Same images as the data `{diff.baseline}` was trained on.", ""]
        lines += [f"Classes added: {', '.join(f'`{c}`' for c in diff.classes_added)}.", ""] if diff.classes_added else []
        lines += [f"Classes removed: {', '.join(f'`{c}`' for c in diff.classes_removed)}.", ""] if diff.classes_removed else []
    lines.append(markdown_table(diff.counts))
    return "\n".join(lines) + "\n"


def write_diff(diff: DataDiff, json_path: Path, markdown_path: Path) -> None:
    atomic_write_json(json_path, diff.as_json())
    atomic_write_text(markdown_path, diff_markdown(diff))
