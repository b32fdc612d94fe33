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

    # fingerprint
    @property
    def source_fingerprint(self) -> Path:
        """The source's fingerprint (a dep of download; byte-identical while the data is unchanged)."""
        return self.root / "data" / "fingerprint.json"

    @property
    def fingerprint_cache(self) -> Path:
        """(path, size, mtime_ns, ctime_ns) -> sha256 of source files, so an unchanged file is not read again."""
        return self.root / "data" / "cache" / "fingerprint" / "hashes.sqlite3"

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

    @property
    def extract_dir(self) -> Path:
        """Extracted archives, one folder per archive content hash (not a DVC out)."""
        return self.root / "data" / "cache" / "extract"

    @property
    def registry_lock(self) -> Path:
        """Held while the champion is read, compared and replaced (promote, rollback): one change at a time."""
        return self.root / "data" / "cache" / "registry.lock"

    @property
    def download_lock(self) -> Path:
        """Held over a whole download (transfer, extraction, the swap of data/raw): one at a time per project."""
        return self.root / "data" / "cache" / "download.lock"

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
    def conversion_cache_dir(self) -> Path:
        """The backbone converted for OpenVINO / ONNX Runtime, one folder per conversion key (not a DVC out,
        which DVC would delete before each run)."""
        return self.root / "data" / "cache" / "conversions"

    @property
    def features_dir(self) -> Path:
        return self.root / "data" / "features"

    # train_head
    @property
    def head_dir(self) -> Path:
        return self.root / "models" / "head"

    @property
    def head_model(self) -> Path:
        return self.head_dir / "head.keras"

    @property
    def head_history(self) -> Path:
        return self.head_dir / "history.csv"

    def live_dir(self, stage: str) -> Path:
        """Where dvclive logs a training stage's per-epoch metrics (declared as metrics/plots in dvc.yaml)."""
        return self.root / "live" / stage

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
    def finetune_model(self) -> Path:
        return self.finetune_dir / "model.keras"

    @property
    def finetune_history(self) -> Path:
        return self.finetune_dir / "history.csv"

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
        """Evaluate's figures (a DVC out that DVC empties before evaluate runs)."""
        return self.reports_dir / "figures"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    @property
    def evaluation_report(self) -> Path:
        return self.reports_dir / "evaluation.md"

    @property
    def classification_report(self) -> Path:
        """Per-class precision, recall (with its interval) and F1 on the test split (a DVC plot)."""
        return self.reports_dir / "classification_report.csv"

    @property
    def confusion_csv(self) -> Path:
        return self.reports_dir / "confusion.csv"

    @property
    def calibration_csv(self) -> Path:
        return self.reports_dir / "calibration.csv"

    @property
    def predictions_file(self) -> Path:
        """Per-image test predictions (in git, for the PR report's paired comparison)."""
        return self.reports_dir / "predictions.csv"

    # lr_find (a tool outside the pipeline: nothing here is a DVC out)
    @property
    def lr_find_curve(self) -> Path:
        return self.reports_dir / "lr_find.csv"

    @property
    def lr_find_result(self) -> Path:
        return self.reports_dir / "lr_find.json"

    @property
    def lr_find_plot(self) -> Path:
        """Beside its CSV, not in reports/figures: DVC empties that folder before evaluate runs."""
        return self.reports_dir / "lr_find.png"

    # export
    @property
    def export_dir(self) -> Path:
        return self.root / "models" / "export"

    @property
    def export_parity(self) -> Path:
        return self.reports_dir / "export_parity.json"

    def outputs(self, stage: str) -> tuple[Path, ...]:
        """What `stage` writes: its outs, metrics and plots in dvc.yaml (tests/test_dvc_deps.py checks both agree)."""
        live = (self.live_dir(stage) / "metrics.json", self.live_dir(stage) / "plots" / "metrics")
        return {
            "fingerprint": (self.source_fingerprint,),
            "download": (self.raw_dir, self.quarantine),
            "split": (self.split_manifest, self.split_summary),
            "features": (self.backbone_dir, self.features_dir),
            "train_head": (self.head_dir, *live),
            "audit": (self.leakage_csv, self.suspect_labels_csv, self.audit_figures_dir, self.audit_metrics),
            "finetune": (self.finetune_dir, *live),
            "evaluate": (self.evaluation_report, self.figures_dir, self.predictions_file, self.metrics_file,
                         self.confusion_csv, self.classification_report, self.calibration_csv),
            "export": (self.export_dir, self.export_parity),
            "promote": (self.registry_dir, self.champion_dir, self.data_diff_json, self.data_diff_md,
                        self.promotion_json, self.promotion_md),
        }[stage]

    # promote
    @property
    def registry_dir(self) -> Path:
        """Every promoted model as a version and the champion pointer (headstart/registry.py)."""
        return self.root / "models" / "registry"

    @property
    def champion_dir(self) -> Path:
        """A copy of the champion's version folder: what `headstart predict` serves by default."""
        return self.root / "models" / "champion"

    @property
    def data_diff_json(self) -> Path:
        return self.reports_dir / "data_diff.json"

    @property
    def data_diff_md(self) -> Path:
        return self.reports_dir / "data_diff.md"

    @property
    def promotion_json(self) -> Path:
        return self.reports_dir / "promotion.json"

    @property
    def promotion_md(self) -> Path:
        return self.reports_dir / "promotion.md"
