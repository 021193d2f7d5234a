"""The per-backend half of `flowers export`, run in its own process: python -m flowers.export.worker REQ.

A process can use one Keras backend only, so flowers/export/run.py starts this module once per
backend it needs (flowers.workers.run_worker, which also defines the request/result files and how a
failure reaches the user). Under the request's backend it loads model.keras, runs it on the
verification images (probabilities to a .npy, batch-1 latency to the result), then writes the
formats assigned to this backend with Keras' own exporters.

Request keys: backend, model, images (.npy, float32 [N,S,S,3] 0..255), probabilities_out,
latency_repeats, writes ({format: path}).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from flowers import backend, workers


def write_savedmodel(model, path: Path) -> None:
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
                         input_signature=[_input_spec(model, "float32")])
    archive.add_endpoint(
        "serve_uint8",
        lambda image: {"probabilities": model(tf.cast(image, "float32"), training=False)},
        input_signature=[_input_spec(model, "uint8")])
    archive.write_out(str(path), verbose=False)


def write_onnx(model, path: Path) -> None:
    model.export(str(path), format="onnx", verbose=False,
                 input_signature=[_input_spec(model, "float32")])


def write_tflite(model, path: Path) -> None:
    model.export(str(path), format="litert", verbose=False,
                 input_signature=[_input_spec(model, "float32")])


WRITERS = {"savedmodel": write_savedmodel, "onnx": write_onnx, "tflite": write_tflite}


def _input_spec(model, dtype: str):
    """Dynamic batch, the model's image size, named like the model's input ("image")."""
    import keras

    return keras.InputSpec(shape=(None, *model.input_shape[1:]), dtype=dtype,
                           name=model.inputs[0].name)


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Do one worker request (see the module docstring); returns the result dict.

    Runs under the request's backend, which workers.worker_main has selected.
    """
    name = request["backend"]
    from flowers.export.runtimes import open_model, run_and_time

    loaded = open_model(request["model"])
    images = np.load(request["images"])
    probabilities, batch1_p50_ms = run_and_time(loaded, images, request["latency_repeats"])
    np.save(request["probabilities_out"], probabilities)
    write_s = {}
    for fmt, path in request["writes"].items():
        start = time.perf_counter()
        WRITERS[fmt](loaded.handle, Path(path))
        write_s[fmt] = time.perf_counter() - start
    return {"backend": name, "runtime": loaded.runtime, "device": backend.device(name),
            "batch1_p50_ms": batch1_p50_ms, "write_s": write_s}


if __name__ == "__main__":
    workers.worker_main(run=run)
