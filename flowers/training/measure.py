"""A trained run measured and recorded: the final evaluation, latency, predictions.csv, metrics.json
(schema and method: flowers/metrics.py), history.csv's final form; and re-evaluating a saved run.

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

from flowers import backend, data, distribute, files, host, randomness, runs
from flowers.config import Experiment
from flowers.metrics import build_metrics, latency_ms, throughput
from flowers.model import (
    backbone_of,
    compile_model,
    load_model,
    logits_model,
    resolve_data_format,
    with_probabilities,
)
from flowers.training.callbacks import EpochTimer
from flowers.training.plan import phases


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


def random_draws_of(model: keras.Model, cfg: Experiment) -> dict[str, Any]:
    """metrics.json "portable_random" (flowers/randomness.py) of the model a run builds."""
    backbone = backbone_of(model)
    frozen = [backbone] if cfg.model.freeze_backbone else []
    loaded = len(backbone.weights) if cfg.model.weights != "none" else 0
    return randomness.summary(model, cfg.train.portable_random, frozen, loaded)


def _timing(cfg: Experiment, splits: data.Splits, fitted: Fitted) -> tuple[dict[str, Any], str | None]:
    """metrics.json's training times and speed, and the reason the speed is null (if it is)."""
    timer = fitted.timer
    epochs_run = timer.epochs_run(cfg.total_epochs)
    epoch_times = timer.epoch_times_s(cfg.total_epochs)
    phase_times = {phase.name: sum(timer.wall_s[e] for e in phase.epochs if e in epochs_run)
                   for phase in phases(cfg)}
    phase_times["head"] += fitted.feature_extraction_s or 0.0
    images_per_epoch = splits.steps_per_epoch * splits.batch_size if splits.drop_remainder \
        else splits.num_train
    images_per_s, speed_reason = throughput(
        images_per_epoch, epoch_times, [i for i, e in enumerate(epochs_run) if e in timer.warmup_epochs])
    return {
        "epochs": len(epochs_run),
        "finetune_epochs": cfg.finetune.epochs,
        "phase_times_s": phase_times,
        "early_stopping": fitted.early_stopping,
        "feature_extraction_s": fitted.feature_extraction_s,
        "train_time_s": timer.total_wall_s(cfg.total_epochs) + (fitted.feature_extraction_s or 0.0),
        "epoch_times_s": epoch_times,
        "first_epoch_s": epoch_times[0],
        "warmup_epochs": sorted(timer.warmup_epochs),
        "train_images_per_s": images_per_s,
    }, speed_reason


def _null_reasons(cfg: Experiment, fitted: Fitted, device_reason: str | None,
                  speed_reason: str | None) -> dict[str, str]:
    """Why each null figure of metrics.json is null."""
    feature_reason = "train.cache_features is off" if not cfg.train.cache_features else \
        None if fitted.feature_extraction_s is not None else \
        "the head phase, which trains on cached features, had finished before this process resumed"
    return {k: r for k, r in (("peak_device_mem_mb", device_reason),
                              ("train_images_per_s", speed_reason),
                              ("feature_extraction_s", feature_reason),
                              ("early_stopping", None if fitted.early_stopping else
                               "train.early_stopping_patience is 0 (off)")) if r}


def metrics(cfg: Experiment, backend_name: str, run_dir: Path, splits: data.Splits,
            engine: distribute.Engine, fitted: Fitted, measured: Measured, peak_host_rss_mb: float,
            resumed: bool, random_draws: dict[str, Any]) -> dict[str, Any]:
    """metrics.json of a finished run (schema and method: flowers/metrics.py)."""
    peak_device_mb, device_reason = backend.peak_device_memory_mb(backend_name)
    timing, speed_reason = _timing(cfg, splits, fitted)
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
        **timing,
        "peak_host_rss_mb": peak_host_rss_mb,
        "peak_device_mem_mb": peak_device_mb,
        "eval_time_s": measured.eval_time_s,
        "latency_ms": measured.latency_ms,
        "val_loss": float(measured.scores["loss"]),
        "val_accuracy": float(measured.scores["accuracy"]),
        "val_top5_accuracy": float(measured.scores["top5_accuracy"]),
    }, _null_reasons(cfg, fitted, device_reason, speed_reason))


def dedupe_history(path: Path, head_epochs: int) -> None:
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
