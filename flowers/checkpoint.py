"""The per-epoch state an interrupted run resumes from, published whole through flowers.files.

keras.callbacks.BackupAndRestore writes its weights and then its training_metadata.json in place, so
a kill between or during the two writes leaves a file that cannot be read, or weights one epoch
ahead of the epoch counter (the resumed run would then train that epoch twice). Here each epoch's
state is written into a staging directory and renamed to backup/epoch-<N>/ when both files are in
it; the newest complete epoch-<N> is what a resume restores, and older ones are deleted after it.

BackupAndRestore saves model.save_weights (weights and optimizer state), which leaves out the
random generators' states (a SeedGenerator's state is a variable, but not a weight): a resumed
process would draw the Dropout masks of epoch 0 again. Each state also holds those (RNG_FILE).

With train.checkpoint_every_steps, and when SIGINT/SIGTERM stops training between two steps, a
state is also saved inside an epoch: backup/epoch-<N>-step-<S>/ after S steps of epoch N (0-based;
N epochs done). BackupAndRestore restarts such an epoch from its first batch; here the resumed run
trains only the batches left (flowers.training), and the state adds what an epoch's history row
needs: the running values of the training metrics (METRICS_FILE). fit() resets them at the start of
every epoch and builds the accuracy metrics only in its first step, so they go back after that
step, added to it: every training metric here is a Keras Mean (a running total and count), and
saved + (0 + this step's) is the sum an uninterrupted epoch computes, to the bit. Under
tf.distribute.MirroredStrategy each device keeps its own running values (SyncOnRead variables): they
are saved and added back per device (distribute.Engine.replica_values), so the same holds there.

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import NamedTuple, Protocol

import h5py
import keras
import numpy as np

from flowers import distribute, faults, files
from flowers.errors import FlowersError

WEIGHTS_FILE = "latest.weights.h5"
METADATA_FILE = "training_metadata.json"
RNG_FILE = "rng_state.npz"
METRICS_FILE = "metrics_state.npz"
_STATE_DIR = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?$")
log = logging.getLogger(__name__)


class Position(NamedTuple):
    """How far a run got: `epoch` epochs done and `step` steps of the next one (0: at its start).

    Positions order as training goes; a state at Position(3, 0) is the one after epoch 3.
    """

    epoch: int
    step: int = 0

    def dir_name(self) -> str:
        return f"epoch-{self.epoch}" + (f"-step-{self.step}" if self.step else "")

    def describe(self, epochs: int, steps_per_epoch: int) -> str:
        """'3 of 6 epochs', or '3 of 6 epochs and 5 of 20 steps of epoch 4' (epoch 4 is 1-based)."""
        done = f"{self.epoch} of {epochs} epochs"
        return done + (f" and {self.step} of {steps_per_epoch} steps of epoch {self.epoch + 1}"
                       if self.step else "")

    def global_step(self, steps_per_epoch: int) -> int:
        return self.epoch * steps_per_epoch + self.step

    @classmethod
    def from_global_step(cls, step: int, steps_per_epoch: int) -> Position:
        return cls(*divmod(step, steps_per_epoch))


def states(backup_dir: Path) -> dict[Position, Path]:
    """Position -> its complete backup/epoch-<N>[-step-<S>]/ directory.

    A state is published whole, but a disk can still lose or truncate its files (a crash before
    the data reached the disk, a copy cut short): one whose metadata is not JSON or whose weights
    file HDF5 cannot open is left out with one warning, and the previous epoch's state (the two
    newest are kept) is what a resume restores.
    """
    found = {}
    for p in backup_dir.glob("epoch-*"):
        if (m := _STATE_DIR.match(p.name)) and (p / METADATA_FILE).is_file():
            problem = _damage(p)
            if problem is None:
                found[Position(int(m.group(1)), int(m.group(2) or 0))] = p
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
    for name in (RNG_FILE, METRICS_FILE):
        if (state / name).is_file():
            try:
                with np.load(state / name) as saved:
                    [saved[key] for key in saved.files]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                return f"{name}: {exc}"
    return None


def latest_state(backup_dir: Path) -> Path | None:
    """The newest complete state directory, None when there is none."""
    found = states(backup_dir)
    return found[max(found)] if found else None


def restored_position(backup_dir: Path) -> Position:
    """The newest position a resumed run can start at (Position(0) when nothing is saved).

    The training data starts at that position's batches, so it is read before fit() restores it.
    """
    return max(states(backup_dir), default=Position(0))


class Companion(Protocol):
    """A callback whose state is saved and restored with each epoch's checkpoint."""

    def save_state(self, staging: Path) -> None: ...

    def load_state(self, state: Path) -> None: ...


class EpochCheckpoint(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose states are directories published atomically, after each epoch and,
    when asked, inside one.

    Restoring is BackupAndRestore's own (weights and optimizer state, then the initial epoch) plus
    the generators' states and, for a state inside an epoch, the training metrics' running values.
    The fit() that restores a state inside epoch N must train only its steps left: initial_epoch=N,
    steps_per_epoch=steps_per_epoch - S, the batches after the first S (flowers.training).
    """

    def __init__(self, backup_dir: Path, position: Position | None = None,
                 companion: Companion | None = None, steps_per_epoch: int = 0,
                 every_steps: int = 0, engine: distribute.Engine | None = None):
        """Restore `position`'s state (the newest when None; nothing when Position(0)).

        steps_per_epoch: the epoch's steps (needed for states inside an epoch).
        every_steps: also save a state every that many steps inside an epoch (0: never; an epoch's
            last step is followed by the epoch's own state). save_step() saves one now.

        engine: the distribution engine the model trains under (it reads and restores the metrics'
            running values per replica).

        A companion callback keeps its own state in every state's directory: save_state(staging)
        before it is published, load_state(state) now, for the position restored.

        Data-parallel processes restore the newest position that every one of them has published:
        a process killed between two checkpoints can be one behind the others, so the two newest
        states are kept.
        """
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False,
                         double_checkpoint=False)
        self._backup = Path(backup_dir)
        found = states(self._backup)
        if position is None:
            position = max(found, default=Position(0))
        state = found.get(position, self._backup / "none") if position != (0, 0) else \
            self._backup / "none"
        self._weights_path = str(state / WEIGHTS_FILE)
        self._training_metadata_path = str(state / METADATA_FILE)
        self._companion = companion
        self._engine = engine or distribute.Engine()
        self._restored = position if state.is_dir() else Position(0)
        self._steps_per_epoch, self._every_steps = steps_per_epoch, every_steps
        self._first_epoch_of_fit = True
        self._epoch_offset = 0
        self._metrics_to_add = False
        self._last_published: Position | None = None
        if companion is not None and state.is_dir():
            companion.load_state(state)

    @property
    def step_offset(self) -> int:
        """The current epoch's steps done before this fit() (its batch 0 is that step)."""
        return self._epoch_offset

    def on_train_begin(self, logs=None):
        # model._initial_epoch is where BackupAndRestore tells fit() to start; it outlives a fit()
        # call, so a later phase's fit would start at the previous phase's restored epoch. Cleared
        # here, set again by the restore below when this checkpoint has a state.
        self.model._initial_epoch = None
        super().on_train_begin(logs)
        self._first_epoch_of_fit = True
        state = Path(self._weights_path).parent
        if (state / RNG_FILE).is_file():
            restore_rng_state(self.model, state / RNG_FILE)

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch  # BackupAndRestore sets it only at an epoch's end
        # a state inside this epoch: its metrics' running values go back after the first step
        self._metrics_to_add = self._first_epoch_of_fit and self._restored.step > 0
        self._first_epoch_of_fit = False
        self._epoch_offset = self._restored.step if epoch == self._restored.epoch else 0

    def on_train_batch_end(self, batch, logs=None):
        if self._metrics_to_add:
            self._metrics_to_add = False
            add_saved_sums(self.model.metrics_variables,
                           Path(self._weights_path).with_name(METRICS_FILE), self._engine)
        if self._every_steps and (self._epoch_offset + batch + 1) % self._every_steps == 0:
            self.save_step(batch)

    def save_step(self, batch: int) -> bool:
        """Save the state after training step `batch` of this fit()'s current epoch; False, saving
        nothing, after the epoch's last step (the epoch's own state follows its validation)."""
        done = self._epoch_offset + batch + 1  # steps of this epoch done
        if done >= self._steps_per_epoch:
            return False
        self._publish(Position(self._current_epoch, done))
        return True

    def _save_model(self):
        self._publish(Position(self._current_epoch))

    def _publish(self, position: Position) -> None:
        if position == self._last_published:  # a signal right after an every_steps state
            return
        with files.staging_dir(self._backup) as staging:
            self.model.save_weights(str(staging / WEIGHTS_FILE))
            save_variables(rng_variables(self.model), staging / RNG_FILE)
            if position.step:
                save_sums(self.model.metrics_variables, staging / METRICS_FILE, self._engine)
            files.write_json(staging / METADATA_FILE, {"epoch": position.epoch, "batch": position.step})
            if self._companion is not None:
                self._companion.save_state(staging)
            faults.point(f"checkpoint-staged:{_point_name(position)}")
            files.publish_dir(staging, self._backup / position.dir_name(), replace=True)
        self._last_published = position
        faults.point(f"checkpoint-published:{_point_name(position)}")
        for old in sorted(states(self._backup), reverse=True)[2:]:  # keep the two newest
            shutil.rmtree(self._backup / old.dir_name(), ignore_errors=True)


def _point_name(position: Position) -> str:
    """The fault point's name for a state: '<epoch>' after an epoch, '<epoch>:<step>' inside one."""
    return f"{position.epoch}:{position.step}" if position.step else str(position.epoch)


def rng_variables(model: keras.Model) -> list:
    """The model's random generator states (each SeedGenerator's state variable), in layer order."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


def save_variables(variables: list, path: Path) -> None:
    np.savez(path, *[np.asarray(keras.ops.convert_to_numpy(v)) for v in variables])


def restore_variables(variables: list, path: Path) -> None:
    """Put values saved by save_variables back (the same model, so the same list)."""
    with np.load(path) as saved:
        if len(saved.files) != len(variables):
            raise ValueError(f"{path}: {len(saved.files)} saved values for {len(variables)} variables")
        for i, variable in enumerate(variables):
            variable.assign(saved[f"arr_{i}"])


def save_sums(variables: list, path: Path, engine: distribute.Engine) -> None:
    """Save the training metrics' running totals and counts, per replica (engine.replica_values)."""
    np.savez(path, *[engine.replica_values(v) for v in variables])


def add_saved_sums(variables: list, path: Path, engine: distribute.Engine) -> None:
    """Add the running totals and counts saved by save_sums to the variables' values."""
    sums = [v for v in variables if v.name in ("total", "count")]
    if len(sums) != len(variables):
        others = sorted({v.path for v in variables} - {v.path for v in sums})
        raise FlowersError(f"cannot resume inside an epoch: the training metrics' variables "
                           f"{', '.join(others)} are not running totals or counts; set "
                           "train.checkpoint_every_steps=0")
    with np.load(path) as saved:
        if len(saved.files) != len(variables):
            raise ValueError(f"{path}: {len(saved.files)} saved values for {len(variables)} variables")
        for i, variable in enumerate(variables):
            engine.add_to_replicas(variable, saved[f"arr_{i}"].reshape(-1, *variable.shape))


def restore_rng_state(model: keras.Model, path: Path) -> None:
    """Put the generator states saved with a checkpoint back."""
    restore_variables(rng_variables(model), path)
