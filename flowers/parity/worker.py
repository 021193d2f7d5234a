"""One backend's side of `flowers parity`, run as a one-shot child (workers.run_worker).

The request names the shared work folder, the experiment, the photos and whether this backend is
the reference ("create"): the reference builds the model, saves its initial weights and the decoded
photos there; every backend (the reference too) loads those, predicts the forward photos, trains the
steps, and writes its arrays (probabilities, losses, clipped counts, trainable weights before and
after) to the request's "arrays" file. The result is what the backend reports about itself (device,
data format, jit, versions): parity.json's "runs". workers.worker_main has selected the request's
backend before run() is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowers import backend, config, workers
from flowers.errors import FlowersError
from flowers.parity.check import CLIP_EPSILON, TARGET_MAX_ABS_PROB_DIFF

INIT_WEIGHTS_FILE = "init.weights.h5"
INPUTS_FILE = "inputs.npz"


def prediction_spread(model, images: np.ndarray) -> float:
    """How much the model's probabilities vary across `images`: max over classes of max - min."""
    import keras

    from flowers.model import with_probabilities

    probs = keras.ops.convert_to_numpy(with_probabilities(model).predict_on_batch(images))
    return float(np.ptp(probs, axis=0).max())


def calibrate_batch_norm(model, experiment: config.Experiment, num_classes: int,
                         images: np.ndarray) -> int:
    """Set every BatchNormalization layer's moving statistics to those of `images`; the count.

    A randomly initialised backbone's inference-mode BatchNormalization (mean 0, variance 1) does
    not normalise: activations shrink or grow layer after layer, and MobileNetV3Small's features
    reach exactly 0 (every photo gets the same prediction; parity would compare nothing). One
    training-mode pass with momentum 0 makes each layer's moving statistics the batch statistics
    of its input; in inference mode the network then computes what that pass computed, with
    unit-scale activations, the way a trained backbone's statistics behave. The pass runs on an
    unfrozen twin (a frozen backbone always runs in inference mode) whose weights come back.
    """
    import dataclasses

    import keras

    from flowers.model import build_model

    twin = build_model(dataclasses.replace(experiment.model, freeze_backbone=False),
                       experiment.data.image_size, num_classes)
    twin.set_weights(model.get_weights())
    layers = [layer for layer in twin._flatten_layers(include_self=False)
              if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = 0.0
    twin(images, training=True)
    model.set_weights(twin.get_weights())
    return len(layers)


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Predict, then train from the saved init, under request["backend"] (see the module docstring)."""
    import keras

    from flowers.model import backbone_rewrite, build_model, rewrite_classifier, with_probabilities

    name = request["backend"]
    work_dir = Path(request["work_dir"])
    experiment = config.from_dict(request["experiment"])
    num_classes = request["num_classes"]
    keras.utils.set_random_seed(experiment.train.seed)
    model = build_model(experiment.model, experiment.data.image_size, num_classes)
    calibrated = _prepare_reference(model, experiment, request) if request["create"] else None
    # rewritten as a run's model is (after any calibration: that needs the BatchNormalization)
    model = rewrite_classifier(model, backbone_rewrite(experiment))
    if request["create"]:
        model.save_weights(work_dir / INIT_WEIGHTS_FILE)
    model.load_weights(work_dir / INIT_WEIGHTS_FILE)
    inputs = np.load(work_dir / INPUTS_FILE)

    # model returns logits (what trains); users see the probabilities
    predictor = with_probabilities(model)
    probs = keras.ops.convert_to_numpy(predictor.predict_on_batch(inputs["forward"].astype(np.float32)))
    init = _trainable(model)
    losses, clipped = _train(model, predictor, experiment, num_classes, inputs,
                             len(request["train_steps"]))
    np.savez(request["arrays"], probs=probs, losses=np.asarray(losses),
             clipped=np.asarray(clipped),
             **{f"init_{k}": v for k, v in init.items()},
             **{f"trained_{k}": v for k, v in _trainable(model).items()})
    return {
        "device": backend.device(name),
        "data_format": model.get_layer("avg_pool").data_format,
        "jit_compile": bool(model.jit_compile),
        **backend.versions(name),
        # reference only: BatchNormalization layers calibrated on the photos (0: none needed)
        **({"batch_norm_layers_calibrated": calibrated} if request["create"] else {}),
    }


def _prepare_reference(model, experiment: config.Experiment, request: dict[str, Any]) -> int:
    """The reference's share: decode the photos into the work folder's INPUTS_FILE, and calibrate
    the model's BatchNormalization where its predictions would not vary across the photos; the
    number of layers calibrated (0: none needed).

    Raises:
        FlowersError: the predictions do not vary enough even after calibrating.
    """
    from flowers.images import load_image_files

    size, num_classes = experiment.data.image_size, request["num_classes"]
    train_files = [f for step in request["train_steps"] for f in step]
    forward = load_image_files(request["forward_files"], size)
    train = load_image_files(train_files, size)
    np.savez(Path(request["work_dir"]) / INPUTS_FILE, forward=forward, train=train,
             train_labels=np.tile(np.arange(num_classes, dtype=np.int32), len(request["train_steps"])))
    forward, train = forward.astype(np.float32), train.astype(np.float32)
    # Predictions that vary less across the photos than the target cannot show a difference.
    if prediction_spread(model, forward) >= TARGET_MAX_ABS_PROB_DIFF:
        return 0
    calibrated = calibrate_batch_norm(model, experiment, num_classes, train)
    spread = prediction_spread(model, forward)
    if spread < TARGET_MAX_ABS_PROB_DIFF:
        raise FlowersError(
            f"parity: {experiment.model.backbone} with random weights predicts (almost) "
            f"the same for every photo (spread {spread:.1e}, even after calibrating "
            f"{calibrated} BatchNormalization layers on the photos); the comparison would "
            "test nothing")
    return calibrated


def _train(model, predictor, experiment: config.Experiment, num_classes: int, inputs,
           steps: int) -> tuple[list[float], list[int]]:
    """Compile the model and train it one step per batch of `inputs`: (each step's loss, each
    step's count of photos whose true-class probability was below CLIP_EPSILON before it)."""
    import keras

    from flowers.model import compile_model

    compile_model(model, experiment.train.learning_rate, num_classes)
    batches = zip(np.split(inputs["train"].astype(np.float32), steps),
                  np.split(inputs["train_labels"], steps), strict=True)
    losses, clipped = [], []
    for x, y in batches:
        # Photos whose true-class probability is below keras' epsilon before this step: where a
        # cross-entropy from probabilities would be clipped under torch and jax.
        p_true = keras.ops.convert_to_numpy(predictor.predict_on_batch(x))[np.arange(len(y)), y]
        clipped.append(int((p_true < CLIP_EPSILON).sum()))
        losses.append(float(model.train_on_batch(x, y, return_dict=True)["loss"]))
    return losses, clipped


def _trainable(model) -> dict[str, np.ndarray]:
    """The model's trainable weights as numpy arrays, named by their position ("000", "001", ...)."""
    import keras

    return {f"{i:03d}": keras.ops.convert_to_numpy(v.value)
            for i, v in enumerate(model.trainable_variables)}


if __name__ == "__main__":
    workers.worker_main(run=run)
