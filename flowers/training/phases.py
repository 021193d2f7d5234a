"""The phases of a run as models and data: the head phase's data (images, or the frozen backbone's
cached features), fine-tuning's unfrozen layers, each phase's learning rate, and the model after the
last phase's checkpoint. What runs when is flowers.training.plan.

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from flowers import data
from flowers.checkpoint import WEIGHTS_FILE, latest_state
from flowers.config import Experiment
from flowers.model import backbone_of, feature_extractor, head
from flowers.training.callbacks import PhaseWeights
from flowers.training.plan import Phase, PhaseRun, phase_dir, phases, unfreeze_from


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
    first = unfreeze_from([layer.name for layer in layers], which, backbone.name)
    backbone.trainable = True
    for index, layer in enumerate(layers):
        layer.trainable = index >= first and not isinstance(layer, keras.layers.BatchNormalization)
    return [layer.name for layer in layers[first:]]


def check_unfreeze(model: keras.Model, which: str) -> None:
    """Raise the FlowersError unfreeze() would, without changing the model."""
    backbone = backbone_of(model)
    unfreeze_from([layer.name for layer in _backbone_layers(backbone)], which, backbone.name)


def _backbone_layers(backbone: keras.Model) -> list:
    return [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]


def start_finetune(model: keras.Model, cfg: Experiment, run: PhaseRun, boundary_dir: Path,
                   say: Callable[[str], None]) -> None:
    """Fine-tuning's model: from the head phase's final weights when that phase ended in an earlier
    process, with finetune.unfreeze's layers trainable."""
    if run.from_boundary_weights:
        PhaseWeights.restore(model, boundary_dir)
    unfrozen = unfreeze(model, cfg.finetune.unfreeze)
    say(f"finetune: {len(unfrozen)} backbone layers unfrozen (from {unfrozen[0]!r}; "
        f"BatchNormalization stays frozen), learning rate {run.phase.learning_rate:g}")


def learning_rate(cfg: Experiment, phase: Phase, steps_per_epoch: int):
    """The phase's learning rate: constant, or cosine-decayed to 0 over the phase's steps.

    The schedule reads the optimizer's step count, which the checkpoint restores, so a resumed
    phase continues on the same curve.
    """
    if cfg.train.lr_schedule == "constant":
        return phase.learning_rate
    return keras.optimizers.schedules.CosineDecay(phase.learning_rate,
                                                  decay_steps=steps_per_epoch * (phase.end - phase.start))


@dataclass
class PhaseData:
    """What one phase fits: the model (the head alone on cached features), its training batches
    per epoch range (first, end, skip) -> dataset, and its validation data."""

    model: keras.Model
    train: Callable[[int, int, int], Any]
    val: Any
    feature_extraction_s: float | None = None


def phase_data(model: keras.Model, splits: data.Splits, cfg: Experiment, run: PhaseRun,
               say: Callable[[str], None]) -> PhaseData:
    """The images, or (train.cache_features, head phase) the frozen backbone's features, computed
    once here and timed."""
    if not run.caches_features:
        return PhaseData(model, splits.train_epochs, splits.val)
    say("features: computing the frozen backbone's features once (train.cache_features)")
    clock = time.perf_counter()
    head_model, train_features, val_data = feature_data(model, splits, cfg)
    seconds = time.perf_counter() - clock
    return PhaseData(head_model, functools.partial(splits.feature_epochs, train_features), val_data,
                     seconds)


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


def restore_last_checkpoint(model: keras.Model, cfg: Experiment, backup_dir: Path) -> None:
    """Load the run's final checkpoint into model (the head alone when the head phase, the last
    phase, trained on cached features: that is what its checkpoint holds)."""
    last = phases(cfg)[-1]
    state = latest_state(phase_dir(last.name, backup_dir))
    target = head(model) if last.name == "head" and cfg.train.cache_features else model
    with warnings.catch_warnings():  # the checkpoint's optimizer state: nothing left to train
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        target.load_weights(str(state / WEIGHTS_FILE))
