"""Saving matplotlib figures the same way in every report (object API: no pyplot state, no display)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from headstart.files import atomic_path


def save_figure(figure: Figure, target: Path) -> None:
    with atomic_path(target, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
