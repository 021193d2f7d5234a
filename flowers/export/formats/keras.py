"""Keras' own .keras file: the run's model.keras, copied, run under any Keras backend."""

from __future__ import annotations

from pathlib import Path

from flowers.export.formats.base import FLOAT32_MAX_ABS_PROB_DIFF, ExportFormat, LoadedModel


def open_keras(path: Path, signature: str | None) -> LoadedModel:
    """Load the file under the Keras backend already selected (select it first)."""
    import keras

    from flowers.model import load_model

    model, class_names = load_model(path)
    return LoadedModel(
        format="keras", runtime=f"keras {keras.__version__} ({keras.backend.backend()})",
        image_size=int(model.input_shape[1]), num_classes=int(model.output_shape[-1]),
        input_name=model.inputs[0].name, output_name=model.outputs[0].name,
        predict=lambda images: keras.ops.convert_to_numpy(model.predict_on_batch(images)),
        handle=model, class_names=class_names)


FORMAT = ExportFormat(
    name="keras", title="Keras",
    purpose="Keras 3 under torch, tensorflow or jax (keras.saving.load_model)",
    path="model.keras", suffix=".keras", marker="", order=10, serve_rank=40,
    runtime_modules=("keras",), runtime_packages=("keras",), opener=open_keras,
    max_abs_prob_diff=FLOAT32_MAX_ABS_PROB_DIFF,
    # No writers: training wrote it; an export copies the run's file.
    keras_backends=True,
    # jax traces and compiles every new batch size, tf.function retraces.
    pads_batches=True,
)
