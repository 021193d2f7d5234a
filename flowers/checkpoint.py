"""The per-epoch state an interrupted run resumes from, published whole through flowers.files.

keras.callbacks.BackupAndRestore writes its weights and then its training_metadata.json in place, so
a kill between or during the two writes leaves a file that cannot be read, or weights one epoch
ahead of the epoch counter (the resumed run would then train that epoch twice). Here each epoch's
state is written into a staging directory and renamed to backup/epoch-<N>/ when both files are in
it; the newest complete epoch-<N> is what a resume restores, and older ones are deleted after it.

BackupAndRestore saves model.save_weights (weights and optimizer state), which leaves out the
random generators' states (a SeedGenerator's state is a variable, but not a weight): a resumed
process would draw the Dropout masks of epoch 0 again. Each state also holds those (RNG_FILE).

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Protocol

import h5py
import keras
import numpy as np

from flowers import faults, files
from flowers.errors import FlowersError

WEIGHTS_FILE = "latest.weights.h5"
METADATA_FILE = "training_metadata.json"
RNG_FILE = "rng_state.npz"
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")
log = logging.getLogger(__name__)


def states(backup_dir: Path) -> dict[int, Path]:
    """epoch -> its complete backup/epoch-<N>/ directory.

    A state is published whole, but a disk can still lose or truncate its files (a crash before
    the data reached the disk, a copy cut short): one whose metadata is not JSON or whose weights
    file HDF5 cannot open is left out with one warning, and the previous epoch's state (the two
    newest are kept) is what a resume restores.
    """
    found = {}
    for p in backup_dir.glob("epoch-*"):
        if (m := _EPOCH_DIR.match(p.name)) and (p / METADATA_FILE).is_file():
            problem = _damage(p)
            if problem is None:
                found[int(m.group(1))] = p
            elif p not in _warned:
                _warned.add(p)
                log.warning("checkpoint %s is damaged (%s); resuming from the one before it",
                            p, problem)
    return found


_warned: set[Path] = set()


def _damage(state: Path) -> str | None:
    """None when a state's files can be read, else what is wrong."""
    try:
        int(files.read_json(state / METADATA_FILE)["epoch"])
    except (FlowersError, KeyError, TypeError, ValueError) as exc:
        return f"{METADATA_FILE}: {exc}"
    try:
        with h5py.File(state / WEIGHTS_FILE, "r"):
            pass
    except OSError as exc:
        return f"{WEIGHTS_FILE}: {str(exc).splitlines()[0][:200]}"
    if (state / RNG_FILE).is_file():
        try:
            with np.load(state / RNG_FILE) as saved:
                [saved[name] for name in saved.files]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            return f"{RNG_FILE}: {exc}"
    return None


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
        rng_file = Path(self._weights_path).with_name(RNG_FILE)
        if rng_file.is_file():
            restore_rng_state(self.model, rng_file)

    def _save_model(self):
        with files.staging_dir(self._backup) as staging:
            self.model.save_weights(str(staging / WEIGHTS_FILE))
            save_rng_state(self.model, staging / RNG_FILE)
            files.write_json(staging / METADATA_FILE,
                             {"epoch": self._current_epoch, "batch": self._last_batch_seen})
            if self._companion is not None:
                self._companion.save_state(staging)
            faults.point(f"checkpoint-staged:{self._current_epoch}")
            files.publish_dir(staging, self._backup / f"epoch-{self._current_epoch}", replace=True)
        faults.point(f"checkpoint-published:{self._current_epoch}")
        for epoch, old in states(self._backup).items():
            if epoch < self._current_epoch - 1:
                shutil.rmtree(old, ignore_errors=True)


def rng_variables(model: keras.Model) -> list:
    """The model's random generator states (each SeedGenerator's state variable), in layer order."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


def save_rng_state(model: keras.Model, path: Path) -> None:
    np.savez(path, *[np.asarray(keras.ops.convert_to_numpy(v.value)) for v in rng_variables(model)])


def restore_rng_state(model: keras.Model, path: Path) -> None:
    """Put the generator states saved by save_rng_state back (the same model, so the same list)."""
    variables = rng_variables(model)
    with np.load(path) as saved:
        if len(saved.files) != len(variables):
            raise ValueError(f"{path}: {len(saved.files)} generator states for a model with "
                             f"{len(variables)}")
        for i, variable in enumerate(variables):
            variable.assign(saved[f"arr_{i}"])
