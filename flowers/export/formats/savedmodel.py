"""TensorFlow's SavedModel folder, with a float32 and a uint8 serving signature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowers.errors import FlowersError
from flowers.export.formats.base import (
    FLOAT32_MAX_ABS_PROB_DIFF,
    ExportFormat,
    LoadedModel,
    Writer,
    input_spec,
)

# The two signatures write_savedmodel gives a SavedModel; verification runs both.
FLOAT_SIGNATURE = "serving_default"
UINT8_SIGNATURE = "serve_uint8"


def write_savedmodel(model: Any, path: Path) -> None:
    """SavedModel with two serving signatures: float32 (serving_default) and uint8 (serve_uint8).

    Both take RGB images [N, S, S, 3] with values 0..255 and return {"probabilities": [N, C]};
    the uint8 one casts to float32 first, so clients can send decoded JPEG bytes unchanged.
    """
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    # No archive.track(model): add_endpoint already tracks the variables the endpoints use, and
    # track() would store every weight a second time (keras-team/keras#23553: 2x the size).
    # Endpoint argument names become the signature's input names.
    archive.add_endpoint("serve", lambda image: {"probabilities": model(image, training=False)},
                         input_signature=[input_spec(model, "float32")])
    archive.add_endpoint(
        "serve_uint8",
        lambda image: {"probabilities": model(tf.cast(image, "float32"), training=False)},
        input_signature=[input_spec(model, "uint8")])
    archive.write_out(str(path), verbose=False)


def open_savedmodel(path: Path, signature: str | None) -> LoadedModel:
    """Load with tf.saved_model and call one signature (None: serving_default)."""
    import tensorflow as tf

    signature = signature or FLOAT_SIGNATURE
    saved = tf.saved_model.load(str(path))
    if signature not in saved.signatures:
        raise FlowersError(f"{path}: SavedModel has no signature {signature!r} "
                           f"(it has {', '.join(saved.signatures) or 'none'})")
    function = saved.signatures[signature]
    (input_name, spec), = function.structured_input_signature[1].items()
    (output_name, output_spec), = function.structured_outputs.items()
    dtype = spec.dtype.as_numpy_dtype

    def predict(images: np.ndarray) -> np.ndarray:
        return function(**{input_name: tf.constant(images.astype(dtype))})[output_name].numpy()

    return LoadedModel(
        format="savedmodel", runtime=f"tf.saved_model {signature} ({spec.dtype.name} input, "
                                     f"tensorflow {tf.__version__})",
        image_size=int(spec.shape[1]), num_classes=int(output_spec.shape[-1]),
        input_name=input_name, output_name=output_name, predict=predict, handle=saved)


FORMAT = ExportFormat(
    name="savedmodel", title="SavedModel",
    purpose="TensorFlow Serving, tf.saved_model.load, TensorFlow.js/TF-TRT converters",
    path="savedmodel", suffix="", marker="saved_model.pb", order=20, serve_rank=20,
    runtime_modules=("tensorflow",), runtime_packages=("tensorflow", "tensorflow-cpu"),
    opener=open_savedmodel, max_abs_prob_diff=FLOAT32_MAX_ABS_PROB_DIFF,
    writers=(Writer("tensorflow", ("tensorflow",), ("tensorflow", "tensorflow-cpu")),),
    write=write_savedmodel, written_with="keras.export.ExportArchive",
    signatures=(FLOAT_SIGNATURE, UINT8_SIGNATURE),
)
