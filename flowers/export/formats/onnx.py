"""ONNX, run with onnxruntime on the CPU; written by torch when it is installed, else tf2onnx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowers.export.formats.base import (
    FLOAT32_MAX_ABS_PROB_DIFF,
    ExportFormat,
    LoadedModel,
    Writer,
    input_spec,
)


def write_onnx(model: Any, path: Path) -> None:
    model.export(str(path), format="onnx", verbose=False,
                 input_signature=[input_spec(model, "float32")])


def open_onnx(path: Path, signature: str | None) -> LoadedModel:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run([model_output.name], {model_input.name: images.astype(np.float32)})[0]

    return LoadedModel(
        format="onnx", runtime=f"onnxruntime {onnxruntime.__version__}",
        image_size=int(model_input.shape[1]), num_classes=int(model_output.shape[-1]),
        input_name=model_input.name, output_name=model_output.name, predict=predict,
        handle=session)


FORMAT = ExportFormat(
    name="onnx", title="ONNX",
    purpose="onnxruntime (CPU/GPU/mobile), TensorRT, OpenVINO and other ONNX runtimes",
    # Served first from a version: it needs neither Keras nor TensorFlow's graph runtime.
    path="model.onnx", suffix=".onnx", marker="", order=30, serve_rank=10,
    runtime_modules=("onnxruntime",), runtime_packages=("onnxruntime",), opener=open_onnx,
    max_abs_prob_diff=FLOAT32_MAX_ABS_PROB_DIFF,
    # torch writes ONNX in ~12 s where tf2onnx (the tensorflow route) takes ~50 s for the same
    # numbers (smoke ResNet50, 2-core CPU), so torch comes first when it is installed.
    writers=(Writer("torch", ("torch", "onnx"), ("torch", "onnx", "onnxscript")),
             Writer("tensorflow", ("tf2onnx", "onnx"), ("tf2onnx", "onnx"))),
    write=write_onnx, written_with="model.export(format='onnx')",
    cpu_only=True,  # CPUExecutionProvider
)
