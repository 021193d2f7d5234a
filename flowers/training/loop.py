"""Training a run: set the process up, load the data, build the model, fit every phase (resuming
from the run's checkpoint), measure it and write a complete run directory.

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from flowers import backend, data, distribute, faults, files, interrupt, runs, tracking, weights
from flowers.checkpoint import EpochCheckpoint, Position, restored_position
from flowers.config import Experiment
from flowers.errors import FlowersError
from flowers.metrics import HostMemorySampler
from flowers.model import backbone_rewrite, build_model, compile_model, portable, save_model
from flowers.training.callbacks import (
    EarlyStop,
    EpochTimer,
    PhaseWeights,
    chief_callbacks,
    early_stopping_summary,
    fit_callbacks,
    stopped_phases,
)
from flowers.training.measure import (
    Fitted,
    dedupe_history,
    measure,
    metrics,
    random_draws_of,
    write_predictions,
)
from flowers.training.phases import (
    check_unfreeze,
    learning_rate,
    phase_data,
    restore_last_checkpoint,
    start_finetune,
)
from flowers.training.plan import FRESH, PhaseRun, phase_dir, plan, validates_every_epoch


def train(experiment: Experiment, backend_name: str, runs_root: Path,
          resume_dir: Path | None = None,
          callbacks: Sequence[keras.callbacks.Callback] = (),
          progress: Callable[[str], None] | None = None,
          track: tracking.Tracking | None = None) -> Path:
    """Train `experiment` under the selected backend and write a complete run directory.

    Args:
        experiment: validated experiment.
        backend_name: the backend chosen with backend.select() (keras already uses it).
        runs_root: root of the run directories.
        resume_dir: an `.incomplete-` run directory to continue (its checkpoint is restored);
            experiment must have the settings it was started with (runs.check_resumable).
        callbacks: extra Keras callbacks (run after the built-in ones).
        progress: called with one line per stage (data, model, each epoch, evaluation).
        track: the trackers besides TensorBoard (flowers.tracking), written by the chief only.

    Returns:
        The final run directory.
    """
    cfg = experiment
    if resume_dir is not None:
        runs.check_resumable(resume_dir, cfg)
    engine = distribute.setup(cfg.train.distribution, backend_name, cfg.train.batch_size)
    if resume_dir is not None and engine.is_chief:  # one writer per run directory
        runs.lock(resume_dir)
    if not engine.is_chief:  # the chief reports; every process would print the same lines
        progress = None
    say = progress or _silent
    if summary := engine.summary(cfg.train.batch_size):
        say(summary)
    determinism = _set_up_process(cfg, backend_name)
    splits, fit_splits = _load_data(cfg, engine, say)
    num_classes = len(splits.class_names)
    model, draws = _build(cfg, engine, num_classes, say)
    run_dir = _run_dir(cfg, backend_name, runs_root, resume_dir, engine)
    trackers = (track or tracking.Tracking()).open(run_dir) if engine.is_chief else []
    for tracker in trackers:
        tracker.start(cfg, backend_name, resumed=resume_dir is not None)
    # a run directory deleted mid-run: one line, whatever failed
    with runs.kept(run_dir), tracking.stopping(trackers):
        if engine.is_chief:
            files.write_json(run_dir / "class_names.json", splits.class_names)
        with HostMemorySampler() as host_memory:
            backend.reset_peak_device_memory(backend_name)
            fitted = _fit_in_step(model, fit_splits, cfg, run_dir, backend_name, engine, callbacks,
                                  progress, trackers)
            if not engine.is_chief:  # the chief evaluates and writes the run directory
                return run_dir.with_name(files.final_name(run_dir))
            if engine.distributed:
                model = _single_device_copy(model, engine, cfg, num_classes)
            say("evaluate: validation split, then latency")
            measured = measure(model, splits, cfg)
        run_metrics = metrics(cfg, backend_name, run_dir, fit_splits, engine, fitted, measured,
                              host_memory.peak_mb, resumed=resume_dir is not None,
                              random_draws={"portable_random": draws, "deterministic": determinism})
        final = _publish(run_dir, model, cfg, splits, measured.predictions, run_metrics)
    for tracker in trackers:
        tracker.finish(final)
    return final


def train_seeds(experiments: Sequence[Experiment], backend_name: str, runs_root: Path,
                resume_dir: Path | None = None,
                progress: Callable[[str], None] | None = None,
                track: tracking.Tracking | None = None) -> Iterator[Path]:
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
        yield train(experiment, backend_name, runs_root, resume_dir=resume_dir, progress=progress,
                    track=track)


def _set_up_process(cfg: Experiment, backend_name: str) -> dict[str, Any]:
    """Seeds, kernels, dtype policy and devices as the run asks; the ImageNet weights reachable.
    Returns metrics.json "deterministic" (backend.deterministic_kernels)."""
    determinism = backend.deterministic_kernels(backend_name, cfg.train.deterministic)
    keras.utils.set_random_seed(cfg.train.seed)
    keras.config.set_dtype_policy(cfg.train.dtype_policy)
    backend.hide_gpus_from_tensorflow(backend_name)
    weights.check_available(cfg.model.backbone_spec, cfg.model.weights)
    return determinism


def _load_data(cfg: Experiment, engine: distribute.Engine,
               say: Callable[[str], None]) -> tuple[data.Splits, data.Splits]:
    """The splits, and the splits fit() reads (whole global batches only when data-parallel)."""
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
    return splits, fit_splits


def _build(cfg: Experiment, engine: distribute.Engine, num_classes: int,
           say: Callable[[str], None]) -> tuple[keras.Model, dict[str, Any]]:
    """The compiled model under the engine, and its metrics.json "portable_random"."""
    say(f"model: building {cfg.model.backbone} ({cfg.model.weights} weights) + head, "
        f"{num_classes} classes")
    with engine.scope():
        model = build_model(cfg.model, cfg.data.image_size, num_classes, cfg.train.seed,
                            rewrite=backbone_rewrite(cfg), portable_random=cfg.train.portable_random)
        compile_model(model, cfg.train.learning_rate, num_classes, cfg.train.jit_compile)
    draws = random_draws_of(model, cfg)
    if cfg.finetune.epochs:  # a bad finetune.unfreeze is refused before the run directory exists
        check_unfreeze(model, cfg.finetune.unfreeze)
    return model, draws


def _run_dir(cfg: Experiment, backend_name: str, runs_root: Path, resume_dir: Path | None,
             engine: distribute.Engine) -> Path:
    """The run directory (resume_dir, or a new one the chief starts and locks), the same in every
    process."""
    run_dir = resume_dir
    if run_dir is None and engine.is_chief:
        run_dir = runs.start_run(runs_root, cfg, backend_name)
        runs.lock(run_dir)
    with engine.guard():
        return Path(engine.agree(str(run_dir or "")))  # the chief's run directory, everywhere


def _fit_in_step(model: keras.Model, splits: data.Splits, cfg: Experiment, run_dir: Path,
                 backend_name: str, engine: distribute.Engine,
                 callbacks: Sequence[keras.callbacks.Callback],
                 progress: Callable[[str], None] | None,
                 trackers: Sequence[tracking.Tracker]) -> Fitted:
    """fit(), then every process checks it holds the same weights; an interruption says where the
    run directory's checkpoint stands."""
    with engine.guard():
        try:
            fitted = fit(model, splits, cfg, run_dir, backend_name, engine, callbacks, progress,
                         trackers)
        except interrupt.Interrupted as stop:
            done = newest_position(engine.backup_dir(run_dir))
            stop.hint = (f"{run_dir} keeps its checkpoint after "
                         f"{done.describe(cfg.total_epochs, splits.steps_per_epoch)}")
            raise
        engine.check_in_sync(model)
        engine.barrier("flowers-trained")
    return fitted


def _publish(run_dir: Path, model: keras.Model, cfg: Experiment, splits: data.Splits,
             predictions: np.ndarray, run_metrics: dict[str, Any]) -> Path:
    """Write the run directory's records and model.keras, drop the checkpoint, publish it whole."""
    write_predictions(run_dir / runs.PREDICTIONS_FILE, predictions, splits)
    if splits.skipped_files:
        files.write_json(run_dir / "skipped_files.json", splits.skipped_files)
    files.write_json(run_dir / "metrics.json", run_metrics)
    dedupe_history(run_dir / "history.csv", cfg.train.epochs)
    num_classes = len(splits.class_names)
    save_model(portable(model, cfg.model, cfg.data.image_size, num_classes, backbone_rewrite(cfg)),
               run_dir / "model.keras",
               splits.class_names)
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    (run_dir / "progress.json").unlink(missing_ok=True)
    faults.point("run-saved")
    return runs.finalize(run_dir)


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


@dataclass
class _Fitting:
    """What every phase of one fit() shares."""

    model: keras.Model
    splits: data.Splits
    cfg: Experiment
    backend_name: str
    engine: distribute.Engine
    backup_dir: Path
    timer: EpochTimer | None
    chief: list[keras.callbacks.Callback]  # the chief's records (callbacks.chief_callbacks)
    extra: Sequence[keras.callbacks.Callback]  # the caller's, after the built-in ones
    progress: Callable[[str], None] | None

    def say(self, line: str) -> None:
        if self.progress:
            self.progress(line)


def fit(model: keras.Model, splits: data.Splits, cfg: Experiment, run_dir: Path, backend_name: str,
        engine: distribute.Engine | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        progress: Callable[[str], None] | None = None,
        trackers: Sequence[tracking.Tracker] | None = None) -> Fitted:
    """model.fit for every phase of the run, continuing from run_dir's checkpoint when it has one.

    Every epoch publishes its state (flowers.checkpoint), its times (progress.json) and its history
    row, so an interrupted run resumes at the last finished epoch with the batches it would have
    read, in the phase that epoch belongs to. Under data-parallel training every process keeps its
    own checkpoint; only the chief writes the times and history and calls the trackers (None:
    TensorBoard alone).
    """
    engine = engine or distribute.Engine()
    backup_dir = engine.backup_dir(run_dir)
    steps = splits.steps_per_epoch
    # every process starts at the newest position all of them have saved
    start = Position.from_global_step(engine.minimum(newest_position(backup_dir).global_step(steps)),
                                      steps)
    if start != FRESH and progress:
        progress(f"resume: {start.describe(cfg.total_epochs, steps)} done; continuing")
    timer = EpochTimer(run_dir / "progress.json") if engine.is_chief else None
    if trackers is None:
        trackers = tracking.Tracking().open(run_dir)
    chief = chief_callbacks(run_dir, timer, cfg.total_epochs, progress, trackers) if timer else []
    fitting = _Fitting(model, splits, cfg, backend_name, engine, backup_dir, timer, chief, callbacks,
                       progress)
    phase_runs = plan(cfg, start, stopped_phases(cfg, backup_dir, start))
    feature_extraction_s = None
    for run in phase_runs:
        seconds = _fit_phase(fitting, run)
        feature_extraction_s = feature_extraction_s if seconds is None else seconds
    if not phase_runs:
        # Killed after the last epoch's checkpoint, before the run directory was written: nothing
        # is left to fit, but the model still has to hold what the run trained.
        restore_last_checkpoint(model, cfg, backup_dir)
    return Fitted(timer, bool(model.jit_compile), feature_extraction_s,
                  early_stopping_summary(cfg, backup_dir))


def _fit_phase(fitting: _Fitting, run: PhaseRun) -> float | None:
    """model.fit() for one phase, in segments (plan.PhaseRun.segments); returns the time computing
    the cached features took (None: the phase trained on images)."""
    cfg, phase, splits, engine = fitting.cfg, run.phase, fitting.splits, fitting.engine
    steps, patience = splits.steps_per_epoch, cfg.train.early_stopping_patience
    boundary_dir = fitting.backup_dir / "head-final"
    if phase.name == "finetune":
        start_finetune(fitting.model, cfg, run, boundary_dir, fitting.say)
    boundary = PhaseWeights(fitting.model, boundary_dir, phase.end - 1) \
        if run.saves_boundary_weights else None
    stopper = EarlyStop(patience, phase.end - 1) if patience else None
    phase_in = phase_data(fitting.model, splits, cfg, run, fitting.say)
    with engine.scope():
        compile_model(phase_in.model, learning_rate(cfg, phase, steps), len(splits.class_names),
                      cfg.train.jit_compile)
    if fitting.timer:
        fitting.timer.compiled_again()
    val_data = phase_in.val
    if not validates_every_epoch(splits):
        fitting.say(f"validation: fewer than one global batch ({splits.num_val} images); per-epoch "
                    "validation is skipped, the final evaluation uses every image")
        val_data = None
    fitting.say(f"train: {phase.end - run.begin} {phase.name} epoch(s) of {steps} steps under "
                f"{fitting.backend_name}"
                + (f" (the first from step {run.restore[1] + 1})" if run.restore[1] else ""))
    for segment in run.segments():
        checkpoint = EpochCheckpoint(phase_dir(phase.name, fitting.backup_dir),
                                     Position(*segment.restore), companion=stopper,
                                     steps_per_epoch=steps,
                                     every_steps=cfg.train.checkpoint_every_steps, engine=engine)
        callbacks = fit_callbacks(engine, stopper, fitting.chief, boundary, checkpoint, fitting.extra)
        with interrupt.deferred():
            phase_in.model.fit(engine.shard(phase_in.train(segment.first, segment.end, segment.skip)),
                               validation_data=None if val_data is None else engine.shard(val_data),
                               initial_epoch=segment.first, epochs=segment.end,
                               steps_per_epoch=steps - segment.skip, callbacks=callbacks,
                               shuffle=False,
                               verbose=2 if fitting.progress is None and engine.is_chief else 0)
        if phase_in.model.stop_training:  # early stopping ended the phase
            break
    return phase_in.feature_extraction_s


def newest_position(backup_dir: Path) -> Position:
    """How far the run's checkpoints go: fine-tuning's newest state, else the head phase's."""
    finetune = restored_position(phase_dir("finetune", backup_dir))
    return finetune if finetune != FRESH else restored_position(backup_dir)


def _silent(line: str) -> None:
    pass
