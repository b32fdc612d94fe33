"""Keras callbacks: resumable per-epoch checkpoints for fine-tuning (and the state they keep), epoch timing
for the head, a time cap for CPUs."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import keras
from pydantic import BaseModel, ConfigDict, Field

from headstart.files import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]  # per epoch


class FinetuneState(BaseModel):
    """Where a fine-tuning run stands: `state.json` beside the epoch weights, rewritten after every epoch,
    read back to resume. Epoch 0 of `history` is the head-only model (the baseline every epoch must beat)."""

    model_config = ConfigDict(extra="forbid")

    history: list[dict[str, int | float]]
    best_val_loss: float
    epochs_done: int = Field(0, ge=0)
    best_epoch: int = Field(0, ge=0)
    wait: int = Field(0, ge=0)  # epochs since val loss last improved: EarlyStopping's count
    stopped: bool = False  # EarlyStopping (or the time cap) ended the run
    last: str = ""  # weights file of the last finished epoch
    best: str = ""  # weights file of the best epoch so far

    @classmethod
    def fresh(cls, baseline: dict[str, float]) -> FinetuneState:
        return cls(history=[{"epoch": 0, **baseline}], best_val_loss=baseline["val_loss"])

    @classmethod
    def load(cls, folder: Path) -> FinetuneState | None:
        """The saved state, or None when there is none or it is damaged (the run then starts from the head)."""
        path = folder / "state.json"
        if not path.exists():
            return None
        try:
            state = cls.model_validate_json(path.read_text())
            for name in {state.last, state.best}:
                with h5py.File(folder / name, "r"):  # a file cut short does not open
                    pass
        except (ValueError, OSError) as exc:
            log.warning("finetune: checkpoint %s is damaged (%s: %s); starting again from the head-only model",
                        folder, type(exc).__name__, exc)
            return None
        return state

    def save(self, folder: Path, model: keras.Model, improved: bool) -> None:
        """This epoch's weights (with the optimizer state) written atomically, then the state that names them."""
        self.last = f"epoch-{self.epochs_done}.weights.h5"
        with atomic_path(folder / self.last, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
        if improved:
            self.best = f"best-{self.epochs_done}.weights.h5"
            with atomic_path(folder / self.best, suffix=".weights.h5") as tmp:
                shutil.copyfile(folder / self.last, tmp)
        atomic_write_json(folder / "state.json", self.model_dump())
        for old in folder.glob("*.weights.h5"):
            if old.name not in (self.last, self.best):
                old.unlink()


class EpochCheckpoints(keras.callbacks.Callback):
    """What ModelCheckpoint and BackupAndRestore lack, for a resumable run that can keep the head only.

    Both Keras callbacks write their files in place, so a kill mid-write leaves a torn checkpoint,
    and neither knows the baseline (the head-only model, epoch 0). Here each epoch is saved through
    `FinetuneState.save`: a killed run resumes from the last complete epoch. `best` only moves when
    val loss beats every earlier epoch, the baseline included. The callback also prepares each epoch
    (`before_epoch`) so that data order, augmentation and dropout are pure functions of the epoch,
    and restores EarlyStopping's count.
    """

    def __init__(self, folder: Path, state: FinetuneState, before_epoch: Callable[[int], None],
                 stopper: keras.callbacks.EarlyStopping | None) -> None:
        super().__init__()
        self.folder, self.state, self.before_epoch, self.stopper = folder, state, before_epoch, stopper

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.stopper is not None:  # placed after EarlyStopping, whose on_train_begin resets its count
            self.stopper.best, self.stopper.wait = self.state.best_val_loss, self.state.wait

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.before_epoch(epoch)
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs, state = logs or {}, self.state
        entry = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items() if k != "learning_rate"},
                 "seconds": time.perf_counter() - self.started}
        improved = entry["val_loss"] < state.best_val_loss
        state.history.append(entry)
        state.epochs_done = epoch + 1
        state.wait = 0 if improved else state.wait + 1
        if improved:
            state.best_val_loss, state.best_epoch = entry["val_loss"], epoch + 1
        state.save(self.folder, self.model, improved)
        log.info("epoch %d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f (%.1f s)", epoch + 1, entry["loss"],
                 entry["accuracy"], entry["val_loss"], entry["val_accuracy"], entry["seconds"])


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch (training plus validation)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


class TimeCap(keras.callbacks.Callback):
    """Stop after the epoch that passes `minutes` of training in this run (a CPU's guard, not the plan:
    the step budget sets the schedule's length, and a capped run keeps its best epoch so far)."""

    def __init__(self, minutes: float) -> None:
        super().__init__()
        self.seconds, self.reached = minutes * 60.0, False

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if time.perf_counter() - self._start >= self.seconds and not self.model.stop_training:
            log.warning("finetune: stopped after epoch %d, past the %.0f-minute cap (finetune.max_minutes)",
                        epoch + 1, self.seconds / 60)
            self.model.stop_training = self.reached = True
