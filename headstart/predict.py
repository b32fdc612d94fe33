"""`headstart predict`: classify image files, folders and http(s) URLs with any exported model.

Every exported format takes raw uint8 RGB images of any size (resizing and preprocessing live
inside the model), so this module only decodes images (`headstart.data.images.load_rgb`), fetches
URLs and runs the model through the loaders of `headstart.serving`, the export contract. `--runtime auto`
serves a `.keras` export with its OpenVINO twin (`serving.twin`), without importing TensorFlow.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np

from headstart.data.images import ImageError, is_candidate_image, load_rgb
from headstart.layout import Layout
from headstart.registry import resolve_model
from headstart.serving import MODEL_CARD, Predictor, load_predictor
from headstart.web import FetchError, fetch_bytes, is_url

CHUNK = 32


class InputError(ValueError):
    """A command-line input that names nothing predict can read."""


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Source:
    """One input image: its display name and how to get its bytes or path."""

    name: str
    load: Callable[[], np.ndarray]


def _unusable(reason: str) -> Callable[[], np.ndarray]:
    def fail() -> np.ndarray:
        raise InputError(reason)

    return fail


def expand_inputs(inputs: Iterable[str], max_bytes: int, timeout_s: float,
                  image_size: int | None = None) -> Iterator[Source]:
    """Files as given, folders walked recursively (image file names only), URLs fetched lazily.

    Images are decoded toward `image_size` (the model's input side), as training decoded them.
    Inputs that cannot be used become sources that fail when loaded, so errors come out in input order.
    """
    decode = partial(load_rgb, target_size=image_size)
    for text in inputs:
        if is_url(text):
            def load_url(url: str = text) -> np.ndarray:
                return decode(fetch_bytes(url, max_bytes, timeout_s))

            yield Source(text, load_url)
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_candidate_image(p))
            if not found:
                yield Source(text, _unusable("folder holds no image files"))
            for image in found:
                yield Source(str(image), partial(decode, image))
        elif path.exists():
            yield Source(text, partial(decode, path))
        else:
            yield Source(text, _unusable("no such file or folder"))


# ---------------------------------------------------------------- output


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(classes[i], float(probs[i])) for i in order]


class _Writer:
    def __init__(self, fmt: str, k: int, stream: IO[str]):
        self.fmt, self.k, self.stream = fmt, k, stream
        self.rows: list[tuple[str, list[tuple[str, float]]]] = []
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(["input", "rank", "label", "probability"])

    def add(self, name: str, ranked: list[tuple[str, float]]) -> None:
        if self.fmt == "jsonl":
            entries = [{"label": label, "probability": round(p, 6)} for label, p in ranked]
            self.stream.write(json.dumps({"input": name, "predictions": entries}) + "\n")
        elif self.fmt == "csv":
            for rank, (label, p) in enumerate(ranked, start=1):
                self.csv.writerow([name, rank, label, f"{p:.6f}"])
        else:
            self.rows.append((name, ranked))

    def close(self) -> None:
        if self.fmt != "table" or not self.rows:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"top-{self.k} predictions")
        table.add_column("input", overflow="fold")
        for rank in range(1, self.k + 1):
            table.add_column(f"#{rank}")
        for name, ranked in self.rows:
            table.add_row(name, *[f"{label} {p:.1%}" for label, p in ranked])
        Console(file=self.stream, width=max(100, 30 + 24 * self.k)).print(table)


def _chunks(sources: Iterable[Source], size: int) -> Iterator[list[Source]]:
    chunk: list[Source] = []
    for source in sources:
        chunk.append(source)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict_inputs(predictor: Predictor, inputs: Sequence[str], k: int, fmt: str, stdout: IO[str], stderr: IO[str],
                   max_bytes: int = 20 * 2**20, timeout_s: float = 30.0,
                   explain: Callable[[list[str], list[np.ndarray], np.ndarray], None] | None = None) -> int:
    """Predict every input, one stderr line per failure; returns the number of failures.

    `explain` gets each chunk's names, images and probabilities (`headstart predict --explain`)."""
    failures = 0

    def report(name: str, reason: str) -> None:
        nonlocal failures
        failures += 1
        print(f"headstart predict: {name}: {reason}", file=stderr)

    writer = _Writer(fmt, k, stdout)
    for chunk in _chunks(expand_inputs(inputs, max_bytes, timeout_s, predictor.image_size), CHUNK):
        names, images = [], []
        for source in chunk:
            try:
                images.append(source.load())
                names.append(source.name)
            except (ImageError, FetchError, InputError, OSError) as exc:
                report(source.name, str(exc))
        if images:
            probs = predictor.predict(images)
            for name, row in zip(names, probs, strict=True):
                writer.add(name, top_k(row, predictor.classes, k))
            if explain is not None:
                explain(names, images, probs)
    writer.close()
    return failures


def main(args: argparse.Namespace) -> int:
    """CLI entry: exit 0 when every input was predicted, 1 when any failed."""
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    model = resolve_model(args.model, Layout(Path(args.root)))
    explain = None
    if args.explain is not None:  # first: a model Grad-CAM cannot explain is refused before any prediction
        from headstart.explain import overlay_writer

        explain = overlay_writer(model, args.explain_layer, Path(args.explain))
    predictor = load_predictor(model, runtime=args.runtime)
    if predictor.image_size is None:
        print(f"headstart predict: warning: no {MODEL_CARD} beside {args.model}, so its input size is "
              "unknown: images are decoded at full size (more memory; large photos come out slightly "
              f"differently than in training). Copy the export folder's {MODEL_CARD} next to the model.",
              file=sys.stderr)
    k = min(args.top_k, len(predictor.classes))
    failures = predict_inputs(predictor, args.inputs, k, args.format, sys.stdout, sys.stderr,
                              max_bytes=args.max_bytes, timeout_s=args.timeout, explain=explain)
    if explain is not None:
        print(f"headstart predict: wrote {len(explain.written)} Grad-CAM overlays to {args.explain}", file=sys.stderr)
    return 1 if failures else 0
