"""Training and evaluation: compile, fit, evaluate, measure, and write a complete run directory.

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

from flowers import (
    backbones,
    backend,
    data,
    distribute,
    faults,
    files,
    host,
    interrupt,
    randomness,
    runs,
    weights,
)
from flowers.checkpoint import (
    WEIGHTS_FILE,
    EpochCheckpoint,
    Position,
    latest_state,
    restored_position,
    states,
)
from flowers.config import Experiment
from flowers.errors import FlowersError
from flowers.metrics import HostMemorySampler, build_metrics, latency_ms, throughput
from flowers.model import (
    backbone_of,
    backbone_rewrite,
    build_model,
    compile_model,
    feature_extractor,
    head,
    load_model,
    logits_model,
    portable,
    resolve_data_format,
    save_model,
    with_probabilities,
)

PREDICTIONS_FILE = "predictions.csv"


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


@dataclass
class Fitted:
    """What fitting leaves for the metrics: the model that was fit, its epoch times, the cache time."""

    timer: EpochTimer
    jit_compile: bool
    feature_extraction_s: float | None
    # phase -> {"best_epoch", "stopped_epoch"} (1-based) with train.early_stopping_patience, else None
    early_stopping: dict[str, dict[str, int | None] | None] | None = None


@dataclass
class Measured:
    """The trained model measured on the validation split: scores, evaluation time and latency."""

    scores: dict[str, float]
    eval_time_s: float
    latency_ms: dict[str, float]
    predictions: np.ndarray  # probabilities [num_val, num_classes], the validation split's order


def train(experiment: Experiment, backend_name: str, runs_root: Path,
          resume_dir: Path | None = None,
          callbacks: Sequence[keras.callbacks.Callback] = (),
          progress: Callable[[str], None] | None = None) -> Path:
    """Train `experiment` under the selected backend and write a complete run directory.

    Args:
        experiment: validated experiment.
        backend_name: the backend chosen with backend.select() (keras already uses it).
        runs_root: root of the run directories.
        resume_dir: an `.incomplete-` run directory to continue (its checkpoint is restored);
            experiment must have the settings it was started with (runs.check_resumable).
        callbacks: extra Keras callbacks (run after the built-in ones).
        progress: called with one line per stage (data, model, each epoch, evaluation).

    Returns:
        The final run directory.
    """
    cfg = experiment
    if resume_dir is not None:
        runs.check_resumable(resume_dir, cfg)
    say = progress or _silent
    engine = distribute.setup(cfg.train.distribution, backend_name, cfg.train.batch_size)
    if resume_dir is not None and engine.is_chief:  # one writer per run directory
        runs.lock(resume_dir)
    if not engine.is_chief:  # the chief reports; every process would print the same lines
        progress = None
        say = _silent
    if summary := engine.summary(cfg.train.batch_size):
        say(summary)
    determinism = backend.deterministic_kernels(backend_name, cfg.train.deterministic)
    keras.utils.set_random_seed(cfg.train.seed)
    keras.config.set_dtype_policy(cfg.train.dtype_policy)
    backend.hide_gpus_from_tensorflow(backend_name)
    weights.check_available(backbones.resolve(cfg.model.backbone), cfg.model.weights)
    say(f"data: reading {cfg.data.source}")
    splits = data.load(cfg.data, cfg.train.batch_size, cfg.train.seed)
    say(f"data: {splits.summary()}" + (", decoded and cached in memory" if splits.cached else ""))
    # Data-parallel: whole global batches only, so every replica gets an equal share of each step
    # and every process runs the same number of steps (nothing waits forever in a collective).
    fit_splits = dataclasses.replace(splits, drop_remainder=True) if engine.distributed else splits
    if fit_splits.steps_per_epoch < 1:
        raise FlowersError(f"data-parallel training needs at least one whole global batch: "
                           f"{splits.num_train} training images < train.batch_size="
                           f"{cfg.train.batch_size}")
    if cfg.train.early_stopping_patience and not validates_every_epoch(fit_splits):
        raise FlowersError(f"train.early_stopping_patience={cfg.train.early_stopping_patience} "
                           f"watches val_loss, but {splits.num_val} validation images are fewer than "
                           f"one global batch ({fit_splits.batch_size}) and per-epoch validation is "
                           "skipped; add validation images or set train.early_stopping_patience=0")
    num_classes = len(splits.class_names)
    say(f"model: building {cfg.model.backbone} ({cfg.model.weights} weights) + head, "
        f"{num_classes} classes")
    with engine.scope():
        model = build_model(cfg.model, cfg.data.image_size, num_classes, cfg.train.seed,
                            rewrite=backbone_rewrite(cfg), portable_random=cfg.train.portable_random)
        compile_model(model, cfg.train.learning_rate, num_classes, cfg.train.jit_compile)
    random_draws = _random_draws(model, cfg)
    if cfg.finetune.epochs:  # a bad finetune.unfreeze is refused before the run directory exists
        check_unfreeze(model, cfg.finetune.unfreeze)

    run_dir = resume_dir
    if run_dir is None and engine.is_chief:
        run_dir = runs.start_run(runs_root, cfg, backend_name)
        runs.lock(run_dir)
    with engine.guard():
        run_dir = Path(engine.agree(str(run_dir or "")))  # the chief's run directory, everywhere
    with runs.kept(run_dir):  # a run directory deleted mid-run: one line, whatever failed
        if engine.is_chief:
            files.write_json(run_dir / "class_names.json", splits.class_names)
        with HostMemorySampler() as host_memory:
            backend.reset_peak_device_memory(backend_name)
            with engine.guard():
                try:
                    fitted = fit(model, fit_splits, cfg, run_dir, backend_name, engine, callbacks, progress)
                except interrupt.Interrupted as stop:
                    done = newest_position(engine.backup_dir(run_dir))
                    stop.hint = (f"{run_dir} keeps its checkpoint after "
                                 f"{done.describe(cfg.total_epochs, fit_splits.steps_per_epoch)}")
                    raise
                engine.check_in_sync(model)
                engine.barrier("flowers-trained")
            if not engine.is_chief:  # the chief evaluates and writes the run directory
                return run_dir.with_name(files.final_name(run_dir))
            if engine.distributed:
                model = _single_device_copy(model, engine, cfg, num_classes)
            say("evaluate: validation split, then latency")
            measured = measure(model, splits, cfg)
        metrics = _metrics(cfg, backend_name, run_dir, fit_splits, engine, fitted, measured,
                           host_memory.peak_mb, resumed=resume_dir is not None,
                           random_draws={"portable_random": random_draws, "deterministic": determinism})
        write_predictions(run_dir / PREDICTIONS_FILE, measured.predictions, splits)
        if splits.skipped_files:
            files.write_json(run_dir / "skipped_files.json", splits.skipped_files)
        files.write_json(run_dir / "metrics.json", metrics)
        _dedupe_history(run_dir / "history.csv", cfg.train.epochs)
        save_model(portable(model, cfg.model, cfg.data.image_size, num_classes, backbone_rewrite(cfg)),
                   run_dir / "model.keras",
                   splits.class_names)
        shutil.rmtree(run_dir / "backup", ignore_errors=True)
        (run_dir / "progress.json").unlink(missing_ok=True)
        faults.point("run-saved")
        return runs.finalize(run_dir)


def train_seeds(experiments: Sequence[Experiment], backend_name: str, runs_root: Path,
                resume_dir: Path | None = None,
                progress: Callable[[str], None] | None = None) -> Iterator[Path]:
    """train() each experiment in turn (`flowers train --seeds N`: the same settings, seeds
    train.seed, train.seed+1, ...); yields each final run directory as it is written.

    Keras' session is cleared between runs, so automatically named layers (and so the weights'
    paths, which key their portable initial values) are the same as in a run of that seed alone.
    """
    for index, experiment in enumerate(experiments):
        if index:
            keras.backend.clear_session()
        if progress and len(experiments) > 1:
            progress(f"seed {experiment.train.seed} ({index + 1} of {len(experiments)})")
        yield train(experiment, backend_name, runs_root, resume_dir=resume_dir, progress=progress)


@dataclass(frozen=True)
class Phase:
    """One fit() of a run: the head-only phase, then (finetune.epochs > 0) fine-tuning.

    Epochs are numbered continuously over the phases: fine-tuning's first epoch is train.epochs.
    """

    name: str
    start: int
    end: int
    learning_rate: float

    @property
    def epochs(self) -> range:
        return range(self.start, self.end)


def phases(cfg: Experiment) -> list[Phase]:
    head_phase = Phase("head", 0, cfg.train.epochs, cfg.train.learning_rate)
    if not cfg.finetune.epochs:
        return [head_phase]
    return [head_phase, Phase("finetune", cfg.train.epochs, cfg.total_epochs, cfg.finetune.learning_rate)]


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


def fit(model: keras.Model, splits: data.Splits, cfg: Experiment, run_dir: Path, backend_name: str,
        engine: distribute.Engine | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        progress: Callable[[str], None] | None = None) -> Fitted:
    """model.fit for every phase of the run, continuing from run_dir's checkpoint when it has one.

    Every epoch publishes its state (flowers.checkpoint), its times (progress.json) and its history
    row, so an interrupted run resumes at the last finished epoch with the batches it would have
    read, in the phase that epoch belongs to. Under data-parallel training every process keeps its
    own checkpoint; only the chief writes the times, history and TensorBoard logs.
    """
    engine = engine or distribute.Engine()
    say = progress or (lambda line: None)
    backup_dir = engine.backup_dir(run_dir)
    boundary_dir = backup_dir / "head-final"
    steps = splits.steps_per_epoch
    # every process starts at the newest position all of them have saved
    start = Position.from_global_step(engine.minimum(newest_position(backup_dir).global_step(steps)),
                                      steps)
    if start != (0, 0):
        say(f"resume: {start.describe(cfg.total_epochs, steps)} done; continuing")
    timer = EpochTimer(run_dir / "progress.json") if engine.is_chief else None
    chief_callbacks = [
        timer,
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "logs"), write_graph=False, profile_batch=0),
        *([EpochProgress(progress, cfg.total_epochs)] if progress else []),
    ] if engine.is_chief else []
    num_classes = len(splits.class_names)
    feature_extraction_s = None
    ran_head_phase = ran_a_phase = False
    patience = cfg.train.early_stopping_patience
    for phase in phases(cfg):
        checkpoints = phase_dir(phase.name, backup_dir)
        # the state this process restores: data-parallel processes may have saved one apart
        stopped = patience and (EarlyStop.summary(checkpoints, start) or {}).get("stopped_epoch")
        if start.epoch >= phase.end or stopped:
            continue
        restore = start if start > (phase.start, 0) else Position(0)
        if phase.name == "finetune":
            if restore == (0, 0) and not ran_head_phase:
                PhaseWeights.restore(model, boundary_dir)
            unfrozen = unfreeze(model, cfg.finetune.unfreeze)
            say(f"finetune: {len(unfrozen)} backbone layers unfrozen (from {unfrozen[0]!r}; "
                f"BatchNormalization stays frozen), learning rate {phase.learning_rate:g}")
        boundary = [PhaseWeights(model, boundary_dir, phase.end - 1)] \
            if phase.name == "head" and cfg.finetune.epochs else []
        stopper = EarlyStop(patience, phase.end - 1) if patience else None
        begin = max(restore.epoch, phase.start)
        if phase.name == "head" and cfg.train.cache_features:
            say("features: computing the frozen backbone's features once (train.cache_features)")
            clock = time.perf_counter()
            fit_model, train_features, val_data = feature_data(model, splits, cfg)
            feature_extraction_s = time.perf_counter() - clock
            train_data = functools.partial(splits.feature_epochs, train_features)
        else:
            fit_model, val_data = model, splits.val
            train_data = splits.train_epochs
        with engine.scope():
            compile_model(fit_model, learning_rate(cfg, phase, steps), num_classes,
                          cfg.train.jit_compile)
        if timer:
            timer.compiled_again()
        if not validates_every_epoch(splits):
            say(f"validation: fewer than one global batch ({splits.num_val} images); per-epoch "
                "validation is skipped, the final evaluation uses every image")
            val_data = None
        say(f"train: {phase.end - begin} {phase.name} epoch(s) of {steps} steps under {backend_name}"
            + (f" (the first from step {restore.step + 1})" if restore.step else ""))
        # Keras fit() has no first step: a phase resumed inside an epoch fits that epoch's steps
        # left first (steps_per_epoch = the steps left), then the phase's other epochs.
        segments = [(begin, begin + 1, restore.step)] if restore.step else []
        if begin + bool(restore.step) < phase.end:
            segments.append((begin + bool(restore.step), phase.end, 0))
        for first, end, skip in segments:
            checkpoint = EpochCheckpoint(checkpoints, restore if first == begin else Position(0),
                                         companion=stopper, steps_per_epoch=steps,
                                         every_steps=cfg.train.checkpoint_every_steps,
                                         engine=engine)
            fit_callbacks = [
                # The engine's first (torch: rank 0's weights everywhere before training; logs
                # averaged over the processes before anything records them, so every process
                # stops alike).
                *engine.callbacks(),
                # Before the boundary weights and the checkpoint, which then hold the best weights.
                *([stopper] if stopper else []),
                *chief_callbacks,
                *boundary,
                # After the epoch's times and history row are written, so a kill between the two
                # leaves a checkpoint whose epochs all have their times (a re-run epoch replaces its
                # own row/times).
                checkpoint,
                *callbacks,
                StepBoundary(checkpoint),
            ]
            with interrupt.deferred():
                fit_model.fit(engine.shard(train_data(first, end, skip)),
                              validation_data=None if val_data is None else engine.shard(val_data),
                              initial_epoch=first, epochs=end, steps_per_epoch=steps - skip,
                              callbacks=fit_callbacks, shuffle=False,
                              verbose=2 if progress is None and engine.is_chief else 0)
            if fit_model.stop_training:  # early stopping ended the phase
                break
        ran_head_phase = ran_head_phase or phase.name == "head"
        ran_a_phase = True
    if not ran_a_phase:
        # Killed after the last epoch's checkpoint, before the run directory was written: nothing
        # is left to fit, but the model still has to hold what the run trained.
        _restore_last_checkpoint(model, cfg, backup_dir)
    early_stopping = {phase.name: EarlyStop.summary(phase_dir(phase.name, backup_dir))
                      for phase in phases(cfg)} if patience else None
    return Fitted(timer, bool(model.jit_compile), feature_extraction_s, early_stopping)


def newest_position(backup_dir: Path) -> Position:
    """How far the run's checkpoints go: fine-tuning's newest state, else the head phase's."""
    finetune = restored_position(phase_dir("finetune", backup_dir))
    return finetune if finetune != (0, 0) else restored_position(backup_dir)


def validates_every_epoch(splits: data.Splits) -> bool:
    """False when whole global batches leave no validation batch (per-epoch validation skipped)."""
    return not (splits.drop_remainder and splits.num_val < splits.batch_size)


def phase_dir(phase_name: str, backup_dir: Path) -> Path:
    """Where a phase keeps its epoch checkpoints: the head phase in backup_dir itself (as before
    fine-tuning existed), fine-tuning in backup_dir/finetune."""
    return backup_dir if phase_name == "head" else backup_dir / "finetune"


def _restore_last_checkpoint(model: keras.Model, cfg: Experiment, backup_dir: Path) -> None:
    """Load the run's final checkpoint into model (the head alone when the head phase, the last
    phase, trained on cached features: that is what its checkpoint holds)."""
    last = phases(cfg)[-1]
    state = latest_state(phase_dir(last.name, backup_dir))
    target = head(model) if last.name == "head" and cfg.train.cache_features else model
    with warnings.catch_warnings():  # the checkpoint's optimizer state: nothing left to train
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        target.load_weights(str(state / WEIGHTS_FILE))


def learning_rate(cfg: Experiment, phase: Phase, steps_per_epoch: int):
    """The phase's learning rate: constant, or cosine-decayed to 0 over the phase's steps.

    The schedule reads the optimizer's step count, which the checkpoint restores, so a resumed
    phase continues on the same curve.
    """
    if cfg.train.lr_schedule == "constant":
        return phase.learning_rate
    return keras.optimizers.schedules.CosineDecay(phase.learning_rate,
                                                  decay_steps=steps_per_epoch * (phase.end - phase.start))


def unfreeze(model: keras.Model, which: str) -> list[str]:
    """Make the chosen backbone layers trainable for fine-tuning; returns their names.

    which is finetune.unfreeze: "all", a number N (the last N layers) or a layer name (that layer
    and every one after it; a name prefix such as "conv5" starts at the first layer that has it).
    BatchNormalization layers stay frozen: the backbone runs them in inference mode (training=False
    in build_model), and their statistics, learned on ImageNet, are not relearned from small batches
    (the Keras transfer-learning guide).

    Raises:
        FlowersError: a count larger than the backbone, or a name no backbone layer has.
    """
    backbone = backbone_of(model)
    layers = _backbone_layers(backbone)
    first = unfreeze_from(layers, which, backbone.name)
    backbone.trainable = True
    for index, layer in enumerate(layers):
        layer.trainable = index >= first and not isinstance(layer, keras.layers.BatchNormalization)
    return [layer.name for layer in layers[first:]]


def check_unfreeze(model: keras.Model, which: str) -> None:
    """Raise the FlowersError unfreeze() would, without changing the model."""
    backbone = backbone_of(model)
    unfreeze_from(_backbone_layers(backbone), which, backbone.name)


def _backbone_layers(backbone: keras.Model) -> list:
    return [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]


def unfreeze_from(layers: list, which: str, backbone_name: str) -> int:
    """The index of the first layer finetune.unfreeze selects (see unfreeze)."""
    which = which.strip()
    if which == "all":
        return 0
    if which.isdigit():
        if int(which) > len(layers):
            raise FlowersError(f"finetune.unfreeze={which}: {backbone_name} has only {len(layers)} "
                               "layers")
        return len(layers) - int(which)
    names = [layer.name for layer in layers]
    for index, name in enumerate(names):
        if name == which or name.startswith(which):
            return index
    import difflib

    close = difflib.get_close_matches(which, names, n=3)
    hint = f"; close: {', '.join(close)}" if close else ""
    raise FlowersError(f"finetune.unfreeze={which!r}: no layer of {backbone_name} is named or starts "
                       f"with that{hint} (first layers: {', '.join(names[:3])}, last: {names[-1]})")


def _single_device_copy(model: keras.Model, engine: distribute.Engine, cfg: Experiment,
                        num_classes: int) -> keras.Model:
    """The trained weights in a model on this process's default device, as a one-device run has.

    The final evaluation and latency of a data-parallel run are measured on the chief alone, the
    same way as for any other run.
    """
    trained = engine.local_weights(model)
    engine.release()
    local = build_model(cfg.model, cfg.data.image_size, num_classes, rewrite=backbone_rewrite(cfg),
                        portable_random=cfg.train.portable_random)
    local.set_weights(trained)
    compile_model(local, cfg.train.learning_rate, num_classes, cfg.train.jit_compile)
    return local


def measure(model: keras.Model, splits: data.Splits, cfg: Experiment) -> Measured:
    """Evaluate the full model on the validation split, then time predictions (metrics.py's method).

    The full model (backbone + the head just trained) is what gets evaluated and timed, after one
    untimed batch: in feature-cache runs it has not been traced yet, in standard runs it has
    (validation), and eval_time_s must mean the same in both.
    """
    model.evaluate(splits.val.take(1), verbose=0)
    start = time.perf_counter()
    scores = model.evaluate(splits.val, return_dict=True, verbose=0)
    eval_time_s = time.perf_counter() - start
    sample_images = next(iter(splits.val))[0].numpy()
    # timed on what users deploy: the model that returns probabilities
    deployed = with_probabilities(model)
    latency = latency_ms(deployed.predict_on_batch, sample_images, cfg.train.latency_repeats)
    predictions = np.concatenate([np.asarray(deployed.predict_on_batch(x.numpy()))
                                  for x, _ in splits.val])
    return Measured(scores, eval_time_s, latency, predictions)


def write_predictions(path: Path, probabilities: np.ndarray, splits: data.Splits) -> None:
    """predictions.csv: every validation image in the split's order (flowers/metrics.py)."""
    labels = splits.val_examples.labels
    items = splits.val_items or ("",) * len(labels)
    predicted = probabilities.argmax(axis=1)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["index", "item", "label", "predicted", "p_true"])
    writer.writerows([index, item, int(label), int(guess), repr(float(probabilities[index, label]))]
                     for index, (item, label, guess) in enumerate(zip(items, labels, predicted,
                                                                      strict=True)))
    files.write_text(path, text.getvalue())


def _random_draws(model: keras.Model, cfg: Experiment) -> dict[str, Any]:
    """metrics.json "portable_random" (flowers/randomness.py) of the model a run builds."""
    backbone = backbone_of(model)
    frozen = [backbone] if cfg.model.freeze_backbone else []
    loaded = len(backbone.weights) if cfg.model.weights != "none" else 0
    return randomness.summary(model, cfg.train.portable_random, frozen, loaded)


def _metrics(cfg: Experiment, backend_name: str, run_dir: Path, splits: data.Splits,
             engine: distribute.Engine, fitted: Fitted, measured: Measured, peak_host_rss_mb: float,
             resumed: bool, random_draws: dict[str, Any]) -> dict[str, Any]:
    """metrics.json of a finished run (schema and method: flowers/metrics.py)."""
    peak_device_mb, device_reason = backend.peak_device_memory_mb(backend_name)
    timer = fitted.timer
    epochs_run = timer.epochs_run(cfg.total_epochs)
    epoch_times = timer.epoch_times_s(cfg.total_epochs)
    phase_times = {phase.name: sum(timer.wall_s[e] for e in phase.epochs if e in epochs_run)
                   for phase in phases(cfg)}
    phase_times["head"] += fitted.feature_extraction_s or 0.0
    warmup_epochs = sorted(timer.warmup_epochs)
    images_per_epoch = splits.steps_per_epoch * splits.batch_size if splits.drop_remainder \
        else splits.num_train
    images_per_s, speed_reason = throughput(
        images_per_epoch, epoch_times, [i for i, e in enumerate(epochs_run) if e in timer.warmup_epochs])
    feature_reason = "train.cache_features is off" if not cfg.train.cache_features else \
        None if fitted.feature_extraction_s is not None else \
        "the head phase, which trains on cached features, had finished before this process resumed"
    null_reasons = {k: r for k, r in (("peak_device_mem_mb", device_reason),
                                       ("train_images_per_s", speed_reason),
                                       ("feature_extraction_s", feature_reason),
                                       ("early_stopping", None if fitted.early_stopping else
                                        "train.early_stopping_patience is 0 (off)")) if r}
    return build_metrics({
        "experiment": cfg.name,
        "seed": cfg.train.seed,
        "backend": backend_name,
        **backend.versions(backend_name),
        "device": backend.device(backend_name),
        "host": host.host_info(),
        "config_hash": cfg.config_hash(),
        "run_id": files.read_json(run_dir / "config.json")["run_id"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "resumed": resumed,
        "num_train": splits.num_train,
        "num_val": splits.num_val,
        "num_classes": len(splits.class_names),
        "skipped_files": len(splits.skipped_files),
        "data_cached": splits.cached,
        "backbone": cfg.model.backbone,
        "data_format": resolve_data_format(cfg.model),
        "jit_compile": fitted.jit_compile,
        "dtype_policy": cfg.train.dtype_policy,
        "distribution": engine.distribution,
        "replicas": engine.replicas,
        "processes": engine.processes,
        **random_draws,
        "epochs": len(epochs_run),
        "finetune_epochs": cfg.finetune.epochs,
        "phase_times_s": phase_times,
        "early_stopping": fitted.early_stopping,
        "feature_extraction_s": fitted.feature_extraction_s,
        "train_time_s": timer.total_wall_s(cfg.total_epochs) + (fitted.feature_extraction_s or 0.0),
        "epoch_times_s": epoch_times,
        "first_epoch_s": epoch_times[0],
        "warmup_epochs": warmup_epochs,
        "train_images_per_s": images_per_s,
        "peak_host_rss_mb": peak_host_rss_mb,
        "peak_device_mem_mb": peak_device_mb,
        "eval_time_s": measured.eval_time_s,
        "latency_ms": measured.latency_ms,
        "val_loss": float(measured.scores["loss"]),
        "val_accuracy": float(measured.scores["accuracy"]),
        "val_top5_accuracy": float(measured.scores["top5_accuracy"]),
    }, null_reasons)


def feature_data(model: keras.Model, splits: data.Splits, cfg: Experiment):
    """train.cache_features: the head model, the training images' features (data.Examples, in the
    split's stored order) and the validation features' dataset, which replace images.

    The backbone is frozen (inference-mode BatchNorm) and there is no augmentation, so each image's
    pooled features never change: computing them once and training the head on them is the same
    math as running the backbone every step. Batch the training features with data.epoch_batches,
    in the same per-epoch order as the images, so the head sees the same batches.
    """
    extractor = feature_extractor(model)

    def features(dataset, labels) -> data.Examples:
        rows = [np.asarray(extractor.predict_on_batch(x.numpy()), np.float32) for x, _ in dataset]
        return data.Examples(np.concatenate(rows), labels, "array")

    train_features = features(splits.train_in_order, splits.train_examples.labels)
    val_features = features(splits.val, splits.val_examples.labels)
    return (head(model), train_features,
            data.in_order(val_features, cfg.train.batch_size, drop_remainder=splits.drop_remainder))


def cached_feature_data(model: keras.Model, splits: data.Splits, cfg: Experiment,
                        first_epoch: int = 0, end_epoch: int | None = None):
    """feature_data with the training features batched for epochs first_epoch..end_epoch-1."""
    head_model, train_features, val_data = feature_data(model, splits, cfg)
    return (head_model,
            splits.feature_epochs(train_features, first_epoch,
                                  cfg.train.epochs if end_epoch is None else end_epoch),
            val_data)


def evaluate_run(run_dir: Path, backend_name: str) -> dict[str, Any]:
    """Re-evaluate a run's model.keras on its validation split under the selected backend.

    Returns:
        A dict with the run, both backends, the device and val_loss/val_accuracy/val_top5_accuracy.
    """
    experiment, raw = runs.read_run_config(run_dir)
    backend.hide_gpus_from_tensorflow(backend_name)
    splits = data.load(experiment.data, experiment.train.batch_size, experiment.train.seed)
    model, class_names = load_model(run_dir / "model.keras")
    # Through the logits (from_logits=True): the probabilities' cross-entropy, the same on every backend.
    model = logits_model(model)
    compile_model(model, experiment.train.learning_rate, len(class_names))
    start = time.perf_counter()
    scores = model.evaluate(splits.val, return_dict=True, verbose=0)
    return {
        "run_dir": str(run_dir),
        "trained_backend": raw["backend"],
        "backend": backend_name,
        "device": backend.device(backend_name),
        "num_val": splits.num_val,
        "val_loss": float(scores["loss"]),
        "val_accuracy": float(scores["accuracy"]),
        "val_top5_accuracy": float(scores["top5_accuracy"]),
        "eval_time_s": time.perf_counter() - start,
    }


def _dedupe_history(path: Path, head_epochs: int) -> None:
    """Keep the last row per epoch (an epoch re-run after an interruption is logged twice) and
    add the phase column ("head", or "finetune" from epoch head_epochs on)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    by_epoch = {row["epoch"]: row for row in rows}
    ordered = sorted(by_epoch.values(), key=lambda r: int(r["epoch"]))
    for row in ordered:
        row["phase"] = "head" if int(row["epoch"]) < head_epochs else "finetune"
    fieldnames = list(rows[0]) + (["phase"] if "phase" not in rows[0] else [])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(ordered)


def _silent(line: str) -> None:
    pass
