"""Where every stage reads and writes, relative to the project root.

`dvc.yaml` spells out the same paths for DVC; keeping them here lets the Prefect flow and the
tests run a stage in any directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    # download
    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def raw_manifest(self) -> Path:
        return self.root / "data" / "raw" / "manifest.csv"

    @property
    def raw_sample(self) -> Path:
        """Per class: images kept of those available, and the effective download.max_images_per_class."""
        return self.root / "data" / "raw" / "sample.json"

    @property
    def quarantine(self) -> Path:
        return self.root / "data" / "quarantine.csv"

    @property
    def downloads_dir(self) -> Path:
        """Persistent download cache (outside DVC outs so a resumed transfer survives a rerun)."""
        return self.root / "data" / "cache" / "downloads"

    # split
    @property
    def split_dir(self) -> Path:
        return self.root / "data" / "split"

    @property
    def split_manifest(self) -> Path:
        return self.split_dir / "manifest.csv"

    @property
    def split_summary(self) -> Path:
        return self.split_dir / "summary.json"

    # features
    @property
    def backbone_dir(self) -> Path:
        """Converted backbone weights (keyed by source sha256) and their description."""
        return self.root / "data" / "backbone"

    @property
    def feature_cache_dir(self) -> Path:
        """Content-addressed feature shards, kept across runs (not a DVC out)."""
        return self.root / "data" / "cache" / "features"

    @property
    def features_dir(self) -> Path:
        return self.root / "data" / "features"

    # train_head
    @property
    def head_dir(self) -> Path:
        return self.root / "models" / "head"

    # audit
    @property
    def audit_metrics(self) -> Path:
        return self.root / "reports" / "audit.json"

    @property
    def leakage_csv(self) -> Path:
        return self.root / "reports" / "leakage.csv"

    @property
    def suspect_labels_csv(self) -> Path:
        return self.root / "reports" / "suspect_labels.csv"

    @property
    def audit_figures_dir(self) -> Path:
        """Not reports/figures: that folder is evaluate's DVC out, which DVC empties before evaluate runs."""
        return self.root / "reports" / "audit"

    # finetune
    @property
    def finetune_dir(self) -> Path:
        return self.root / "models" / "finetune"

    @property
    def checkpoint_dir(self) -> Path:
        """Per-epoch fine-tuning checkpoints, kept across interrupted runs (not a DVC out)."""
        return self.root / "data" / "cache" / "finetune_checkpoints"

    @property
    def image_cache_dir(self) -> Path:
        """Decoded, resized training images (float32, as evaluation sees them; memory-mapped), rebuilt when the images change."""
        return self.root / "data" / "cache" / "images"

    # evaluate
    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def figures_dir(self) -> Path:
        """Evaluate's figures (a DVC out that DVC empties before evaluate runs); lr_find draws here too."""
        return self.reports_dir / "figures"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions_file(self) -> Path:
        """Per-image test predictions (in git, for the PR report's paired comparison)."""
        return self.reports_dir / "predictions.csv"

    # export
    @property
    def export_dir(self) -> Path:
        return self.root / "models" / "export"
