"""The Keras callbacks of a training run, and the order fit() runs them in.

Epoch times (progress.json), history.csv, the trackers' records and progress lines are the chief's; the
interruption boundary, early stopping and the head phase's final weights are every process's.

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from flowers import distribute, faults, files, interrupt
from flowers.checkpoint import EpochCheckpoint, Position, latest_state, states
from flowers.config import Experiment
from flowers.tracking import Tracker
from flowers.training.plan import phase_dir, phases


class EpochTimer(keras.callbacks.Callback):
    """Times each epoch's training steps and whole epoch; persists them for --resume.

    Times are keyed by epoch index, so an epoch re-run after an interruption replaces its entry.
    The first epoch each process runs carries tracing/compilation (a resumed process traces
    again), so those epochs are recorded as warm-up epochs and left out of the throughput.
    """

    def __init__(self, progress_path: Path):
        super().__init__()
        self.progress_path = progress_path
        saved = files.read_json(progress_path) if progress_path.is_file() else {}
        self.train_s = {int(k): v for k, v in saved.get("train_s", {}).items()}
        self.wall_s = {int(k): v for k, v in saved.get("wall_s", {}).items()}
        self.warmup_epochs = set(saved.get("warmup_epochs", []))
        self._first_in_process = True
        self._epoch = 0
        self._start = self._train_end = 0.0

    def compiled_again(self) -> None:
        """The next epoch traces/compiles again (a new phase recompiles the model): warm-up too."""
        self._first_in_process = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._first_in_process:
            self.warmup_epochs.add(epoch)
            self._first_in_process = False
        self._start = self._train_end = time.perf_counter()

    def on_test_begin(self, logs=None):
        # During fit, validation starts right after the epoch's last training step.
        self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = time.perf_counter()
        if self._train_end <= self._start:  # no validation ran this epoch
            self._train_end = end
        self.train_s[epoch] = self._train_end - self._start
        self.wall_s[epoch] = end - self._start
        files.write_json(self.progress_path, {"train_s": self.train_s, "wall_s": self.wall_s,
                                             "warmup_epochs": sorted(self.warmup_epochs)})

    def epochs_run(self, epochs: int) -> list[int]:
        """The run's epochs that were trained, in order (early stopping skips a phase's last ones)."""
        return sorted(e for e in self.train_s if e < epochs)

    def epoch_times_s(self, epochs: int) -> list[float]:
        return [self.train_s[e] for e in self.epochs_run(epochs)]

    def total_wall_s(self, epochs: int) -> float:
        return sum(self.wall_s[e] for e in self.epochs_run(epochs))


class StepBoundary(keras.callbacks.Callback):
    """Where SIGINT/SIGTERM stop training (flowers.interrupt): after a step, once the state after
    it is saved, or, after an epoch's last step, once the epoch is validated and its checkpoint
    published (this callback runs after EpochCheckpoint). Also the fault points
    train-step:<epoch>:<step> (flowers.faults; <step> counts from the epoch's start, also in a
    fit() that resumed mid-epoch)."""

    def __init__(self, checkpoint: EpochCheckpoint):
        super().__init__()
        self.checkpoint = checkpoint

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.checkpoint.step_offset + batch
        faults.point(f"train-step:{self._epoch}:{step}")
        if interrupt.pending() and self.checkpoint.save_step(batch):
            interrupt.check()

    def on_epoch_end(self, epoch, logs=None):
        interrupt.check()


class EpochProgress(keras.callbacks.Callback):
    """One progress line per epoch through a callback (library code does not print)."""

    def __init__(self, progress: Callable[[str], None], epochs: int):
        super().__init__()
        self.progress, self.epochs = progress, epochs

    def on_epoch_end(self, epoch, logs=None):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in (logs or {}).items()
                          if k in ("loss", "accuracy", "val_loss", "val_accuracy"))
        self.progress(f"epoch {epoch + 1}/{self.epochs}: {shown}")


class PhaseWeights(keras.callbacks.Callback):
    """Publishes the full model's weights after the head phase's last epoch (before its checkpoint).

    The head phase's checkpoint holds what that phase fit (in feature-cache mode only the head);
    fine-tuning starts from these weights when a run resumes between the two phases.
    """

    def __init__(self, model: keras.Model, folder: Path, last_epoch: int):
        super().__init__()
        self.full_model, self.folder, self.last_epoch = model, folder, last_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.last_epoch or self.model.stop_training:  # the phase's last epoch
            with files.staging_dir(self.folder.parent) as staging:
                _save_weights(staging / "weights.npz", self.full_model.get_weights())
                files.publish_dir(staging, self.folder, replace=True)

    @staticmethod
    def restore(model: keras.Model, folder: Path) -> None:
        model.set_weights(_load_weights(folder / "weights.npz"))


def _save_weights(path: Path, values: list[np.ndarray]) -> None:
    np.savez(path, *values)


def _load_weights(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


class EarlyStop(keras.callbacks.EarlyStopping):
    """train.early_stopping_patience for one phase: ends it when val_loss has not improved for
    `patience` epochs, and puts the phase's best weights back.

    The best weights go back at the epoch the phase ends (stopped, or its last), before that epoch's
    checkpoint and the boundary weights are written, so both hold them, and so does model.keras.
    The callback's state (best val_loss, its epoch, the wait, the best weights) is saved with every
    epoch's checkpoint (a checkpoint.Companion), so a resumed phase stops where an uninterrupted
    one would.
    """

    STATE_FILE, WEIGHTS_FILE = "early_stopping.json", "best.weights.npz"

    def __init__(self, patience: int, last_epoch: int):
        super().__init__(monitor="val_loss", patience=patience, restore_best_weights=True)
        self.last_epoch = last_epoch
        self._restored: tuple[dict, list[np.ndarray]] | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._restored:
            state, self.best_weights = self._restored
            self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if (self.stopped_epoch or epoch == self.last_epoch) and self.best_weights is not None:
            self.model.set_weights(self.best_weights)

    def on_train_end(self, logs=None):
        # The best weights went back at the phase's last epoch (on_epoch_end). A phase resumed
        # mid-epoch is two fit() calls: the second one goes on from this state.
        self._restored = (self._state(), self.best_weights)

    def _state(self) -> dict:
        return {"best": None if self.best is None else float(self.best), "best_epoch": self.best_epoch,
                "wait": self.wait, "stopped_epoch": self.stopped_epoch or None}

    def save_state(self, staging: Path) -> None:
        files.write_json(staging / self.STATE_FILE, self._state())
        _save_weights(staging / self.WEIGHTS_FILE, self.best_weights or [])

    def load_state(self, state: Path) -> None:
        best_weights = _load_weights(state / self.WEIGHTS_FILE)
        self._restored = (files.read_json(state / self.STATE_FILE), best_weights or None)

    @classmethod
    def summary(cls, checkpoints: Path,
                position: Position | None = None) -> dict[str, int | None] | None:
        """{"best_epoch", "stopped_epoch"} (1-based, None: ran every epoch) from the phase's
        checkpoint at `position` (the newest when None); None when there is none."""
        state = latest_state(checkpoints) if position is None else states(checkpoints).get(position)
        if state is None or not (state / cls.STATE_FILE).is_file():
            return None
        saved = files.read_json(state / cls.STATE_FILE)
        return {"best_epoch": saved["best_epoch"] + 1,
                "stopped_epoch": None if saved["stopped_epoch"] is None else saved["stopped_epoch"] + 1}


def stopped_phases(cfg: Experiment, backup_dir: Path, start: Position) -> set[str]:
    """The phases early stopping had ended at `start`, the state this process restores
    (data-parallel processes may have saved one apart); none when it is off."""
    if not cfg.train.early_stopping_patience:
        return set()
    return {phase.name for phase in phases(cfg)
            if (EarlyStop.summary(phase_dir(phase.name, backup_dir), start) or {}).get("stopped_epoch")}


def early_stopping_summary(cfg: Experiment,
                           backup_dir: Path) -> dict[str, dict[str, int | None] | None] | None:
    """metrics.json "early_stopping": each phase's EarlyStop.summary; None when it is off."""
    if not cfg.train.early_stopping_patience:
        return None
    return {phase.name: EarlyStop.summary(phase_dir(phase.name, backup_dir)) for phase in phases(cfg)}


def chief_callbacks(run_dir: Path, timer: EpochTimer, epochs: int,
                    progress: Callable[[str], None] | None,
                    trackers: Sequence[Tracker]) -> list[keras.callbacks.Callback]:
    """The chief's records of every epoch: its times, its history row, the trackers' (TensorBoard,
    MLflow), a progress line."""
    return [
        timer,
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        *(callback for tracker in trackers for callback in tracker.callbacks()),
        *([EpochProgress(progress, epochs)] if progress else []),
    ]


def fit_callbacks(engine: distribute.Engine, stopper: EarlyStop | None,
                  chief: Sequence[keras.callbacks.Callback],
                  boundary: PhaseWeights | None, checkpoint: EpochCheckpoint,
                  extra: Sequence[keras.callbacks.Callback]) -> list[keras.callbacks.Callback]:
    """One model.fit()'s callbacks, in the order each must run in."""
    return [
        # The engine's first (torch: rank 0's weights everywhere before training; logs averaged
        # over the processes before anything records them, so every process stops alike).
        *engine.callbacks(),
        # Before the boundary weights and the checkpoint, which then hold the best weights.
        *([stopper] if stopper else []),
        *chief,
        *([boundary] if boundary else []),
        # After the epoch's times and history row are written, so a kill between the two leaves a
        # checkpoint whose epochs all have their times (a re-run epoch replaces its own row/times).
        checkpoint,
        *extra,
        StepBoundary(checkpoint),
    ]
