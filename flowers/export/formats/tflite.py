"""LiteRT (TensorFlow Lite) flatbuffer, run with the LiteRT interpreter on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowers import host
from flowers.export.formats.base import (
    FLOAT32_MAX_ABS_PROB_DIFF,
    ExportFormat,
    LoadedModel,
    Writer,
    input_spec,
)


def write_tflite(model: Any, path: Path) -> None:
    model.export(str(path), format="litert", verbose=False,
                 input_signature=[input_spec(model, "float32")])


def open_tflite(path: Path, signature: str | None) -> LoadedModel:
    from ai_edge_litert.interpreter import Interpreter

    with host.quiet_stderr():
        interpreter = Interpreter(model_path=str(path))
    model_input = interpreter.get_input_details()[0]
    model_output = interpreter.get_output_details()[0]
    allocated_shape: list[tuple[int, ...]] = []

    def predict(images: np.ndarray) -> np.ndarray:
        # The file is exported with a dynamic batch; the interpreter is resized to each new batch.
        if allocated_shape[-1:] != [images.shape]:
            interpreter.resize_tensor_input(model_input["index"], images.shape)
            with host.quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                interpreter.allocate_tensors()
            allocated_shape.append(images.shape)
        interpreter.set_tensor(model_input["index"], images.astype(model_input["dtype"]))
        interpreter.invoke()
        return interpreter.get_tensor(model_output["index"]).copy()

    version = host.package_version("ai-edge-litert") or "unknown version"
    return LoadedModel(
        format="tflite", runtime=f"LiteRT interpreter {version}",
        image_size=int(model_input["shape"][1]), num_classes=int(model_output["shape"][-1]),
        input_name=model_input["name"], output_name=model_output["name"], predict=predict,
        handle=interpreter)


FORMAT = ExportFormat(
    name="tflite", title="LiteRT",
    purpose="the LiteRT (TensorFlow Lite) interpreter on Android, iOS, microcontrollers, edge",
    path="model.tflite", suffix=".tflite", marker="", order=40, serve_rank=30,
    runtime_modules=("ai_edge_litert",), runtime_packages=("ai-edge-litert",), opener=open_tflite,
    max_abs_prob_diff=FLOAT32_MAX_ABS_PROB_DIFF,
    writers=(Writer("tensorflow", ("tensorflow",), ("tensorflow", "tensorflow-cpu")),),
    write=write_tflite, written_with="model.export(format='litert')",
    pads_batches=True,  # the interpreter re-allocates its tensors whenever the batch size changes
    cpu_only=True,
)
