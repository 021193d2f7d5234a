"""The per-epoch state an interrupted run resumes from, published whole through flowers.files.

keras.callbacks.BackupAndRestore writes its weights and then its training_metadata.json in place, so
a kill between or during the two writes leaves a file that cannot be read, or weights one epoch
ahead of the epoch counter (the resumed run would then train that epoch twice). Here each epoch's
state is written into a staging directory and renamed to backup/epoch-<N>/ when both files are in
it; the newest complete epoch-<N> is what a resume restores, and older ones are deleted after it.

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Protocol

import keras

from flowers import faults, files

WEIGHTS_FILE = "latest.weights.h5"
METADATA_FILE = "training_metadata.json"
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")


def states(backup_dir: Path) -> dict[int, Path]:
    """epoch -> its complete backup/epoch-<N>/ directory."""
    return {int(m.group(1)): p for p in backup_dir.glob("epoch-*")
            if (m := _EPOCH_DIR.match(p.name)) and (p / METADATA_FILE).is_file()}


def latest_state(backup_dir: Path) -> Path | None:
    """The newest complete backup/epoch-<N>/ directory, None when there is none."""
    found = states(backup_dir)
    return found[max(found)] if found else None


def restored_epoch(backup_dir: Path) -> int:
    """The newest epoch a resumed run can start at (0 when nothing is saved).

    The training data starts at that epoch's order, so it is read before fit() restores the state.
    """
    state = latest_state(backup_dir)
    return int(files.read_json(state / METADATA_FILE)["epoch"]) if state else 0


class Companion(Protocol):
    """A callback whose state is saved and restored with each epoch's checkpoint."""

    def save_state(self, staging: Path) -> None: ...

    def load_state(self, state: Path) -> None: ...


class EpochCheckpoint(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose state is one directory per epoch, published atomically.

    Restoring is BackupAndRestore's own (weights and optimizer state, then the initial epoch);
    only where it reads and how it writes change.
    """

    def __init__(self, backup_dir: Path, epoch: int | None = None, companion: Companion | None = None):
        """Restore `epoch`'s state (the newest when None; nothing when 0).

        A companion callback keeps its own state in every epoch's directory: save_state(staging)
        before it is published, load_state(state) now, for the epoch restored.

        Data-parallel processes restore the newest epoch that every one of them has published: a
        process killed between two checkpoints can be one epoch behind the others, so the two
        newest states are kept.
        """
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False,
                         double_checkpoint=False)
        self._backup = Path(backup_dir)
        found = states(self._backup)
        if epoch is None:
            epoch = max(found, default=0)
        state = found.get(epoch, self._backup / "none") if epoch else self._backup / "none"
        self._weights_path = str(state / WEIGHTS_FILE)
        self._training_metadata_path = str(state / METADATA_FILE)
        self._companion = companion
        if companion is not None and state.is_dir():
            companion.load_state(state)

    def on_train_begin(self, logs=None):
        # model._initial_epoch is where BackupAndRestore tells fit() to start; it outlives a fit()
        # call, so a later phase's fit would start at the previous phase's restored epoch. Cleared
        # here, set again by the restore below when this checkpoint has a state.
        self.model._initial_epoch = None
        super().on_train_begin(logs)

    def _save_model(self):
        with files.staging_dir(self._backup) as staging:
            self.model.save_weights(str(staging / WEIGHTS_FILE))
            files.write_json(staging / METADATA_FILE,
                             {"epoch": self._current_epoch, "batch": self._last_batch_seen})
            if self._companion is not None:
                self._companion.save_state(staging)
            files.publish_dir(staging, self._backup / f"epoch-{self._current_epoch}", replace=True)
        faults.point(f"checkpoint-published:{self._current_epoch}")
        for epoch, old in states(self._backup).items():
            if epoch < self._current_epoch - 1:
                shutil.rmtree(old, ignore_errors=True)
