"""Exported models run in their own runtimes, behind one interface, and `flowers predict`.

open_model(path) picks the runtime from the path -- a .keras file (Keras under the selected backend),
a SavedModel directory (tf.saved_model), a .onnx file (onnxruntime), a .tflite file (the LiteRT
interpreter) -- and returns a LoadedModel whose predict() takes float32 RGB images [N, S, S, 3] in
0..255 and returns class probabilities [N, C]. Export verification and `flowers predict` both run
models through here, so a format is run the same way when it is checked and when it is used.
Opening a .keras file imports keras: select the backend first.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowers import files, host
from flowers.errors import FlowersError
from flowers.images import load_image_files
from flowers.metrics import time_calls

FORMATS = ("keras", "savedmodel", "onnx", "tflite")
# Where each format lives inside an export version (savedmodel is a directory).
FORMAT_PATHS = {"keras": "model.keras", "savedmodel": "savedmodel", "onnx": "model.onnx",
                "tflite": "model.tflite"}
# Modules each runtime imports, and the pip extra that installs them.
RUNTIME_MODULES = {"keras": ("keras",), "savedmodel": ("tensorflow",), "onnx": ("onnxruntime",),
                   "tflite": ("ai_edge_litert",)}
EXPORT_EXTRA = "pip install -e '.[export]'"
MANIFEST = "manifest.json"
# The two SavedModel signatures flowers exports (see flowers.export.worker.write_savedmodel).
SAVEDMODEL_FLOAT_SIGNATURE = "serving_default"
SAVEDMODEL_UINT8_SIGNATURE = "serve_uint8"
PREDICT_BATCH = 32


@dataclass
class LoadedModel:
    """A model opened in its runtime; predict() maps float32 images 0..255 to probabilities."""

    format: str
    runtime: str  # what runs it, with its version, e.g. "onnxruntime 1.32.0"
    image_size: int
    num_classes: int
    input_name: str
    output_name: str
    predict: Callable[[np.ndarray], np.ndarray]
    handle: Any  # the runtime's own object: keras.Model, SavedModel, InferenceSession, Interpreter
    class_names: list[str] | None = None  # only .keras files carry them


def format_of(path: str | Path) -> str:
    """The format of a model path: keras, savedmodel, onnx or tflite.

    Raises:
        FlowersError: the path does not exist or is none of those.
    """
    path = Path(path)
    if not path.exists():
        raise FlowersError(f"model file not found: {path}")
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "savedmodel"
    suffixes = {".keras": "keras", ".onnx": "onnx", ".tflite": "tflite"}
    if path.is_file() and path.suffix.lower() in suffixes:
        return suffixes[path.suffix.lower()]
    raise FlowersError(f"{path}: unknown model type; expected a .keras, .onnx or .tflite file "
                       "or a SavedModel directory (one with saved_model.pb)")


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules that are not installed (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(modules: Sequence[str], purpose: str) -> None:
    """Raise a one-line FlowersError naming the extra to install when a module is missing."""
    missing = missing_modules(modules)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise FlowersError(f"{purpose} needs {', '.join(missing)}, which {verb} not installed; "
                           f"install it with: {EXPORT_EXTRA}")


def open_model(path: str | Path, signature: str = SAVEDMODEL_FLOAT_SIGNATURE) -> LoadedModel:
    """Open an exported model in its own runtime.

    Args:
        path: a .keras, .onnx or .tflite file, or a SavedModel directory.
        signature: the SavedModel signature to call (ignored by the other formats).

    Returns:
        The LoadedModel.

    Raises:
        FlowersError: unknown type, runtime not installed, or a file its runtime cannot read.
    """
    path = Path(path)
    fmt = format_of(path)
    require(RUNTIME_MODULES[fmt], f"running {fmt} models")
    opener = {"keras": _open_keras, "savedmodel": _open_savedmodel, "onnx": _open_onnx,
              "tflite": _open_tflite}[fmt]
    try:
        return opener(path, signature)
    except FlowersError:
        raise
    except Exception as exc:  # every runtime has its own exception types for unreadable files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlowersError(f"{path}: not a readable {fmt} model ({reason})") from None


def run_and_time(model: LoadedModel, images: np.ndarray, repeats: int) -> tuple[np.ndarray, float]:
    """Probabilities for all images in one batch, and the p50 latency in ms of one image.

    The latency is measured like metrics.latency_ms: untimed warm-up calls, then `repeats` timed
    calls of predict() on a batch of 1 (numpy in, numpy out, so conversions are included).
    """
    probabilities = model.predict(images)
    single = images[:1]
    times = time_calls(lambda: model.predict(single), repeats)
    return probabilities, float(np.percentile(times, 50))


def class_names_for(path: str | Path, model: LoadedModel) -> list[str]:
    """Class names for a model: inside a .keras file, else manifest.json beside the model."""
    if model.class_names:
        return model.class_names
    manifest = Path(path).parent / MANIFEST
    if manifest.is_file():
        names = files.read_json(manifest).get("class_names")
        if not isinstance(names, list) or len(names) != model.num_classes:
            raise FlowersError(f"{manifest} does not list {model.num_classes} class names for "
                               f"{Path(path).name}; is it the manifest of another model?")
        return [str(n) for n in names]
    return [f"class_{i}" for i in range(model.num_classes)]


def predict_files(model_path: str | Path, image_paths: Sequence[str | Path],
                  top: int = 5) -> list[dict[str, Any]]:
    """Classify image files with any exported model, decoding them exactly as training did.

    Args:
        model_path: a .keras, .onnx or .tflite file or a SavedModel directory.
        image_paths: JPEG/PNG/BMP/GIF files.
        top: how many classes to return per image (at most the number of classes).

    Returns:
        One dict per image: {"image": path, "top": [{"class": name, "probability": p}, ...]}.

    Raises:
        FlowersError: unknown or unreadable model, or a missing, corrupt or non-image file.
    """
    model = open_model(model_path)
    names = class_names_for(model_path, model)
    images = load_image_files(image_paths, model.image_size).astype(np.float32)
    probabilities = np.concatenate([model.predict(images[i:i + PREDICT_BATCH])
                                    for i in range(0, len(images), PREDICT_BATCH)])
    return [{"image": str(path), "top": top_classes(row, names, top)}
            for path, row in zip(image_paths, probabilities, strict=True)]


def top_classes(probabilities: np.ndarray, class_names: Sequence[str], top: int) -> list[dict[str, Any]]:
    """The `top` most probable classes of one image, best first (ties keep class order).

    Returns:
        [{"class": name, "probability": p}, ...], at most len(class_names) entries.
    """
    best = np.argsort(-probabilities, kind="stable")[:min(top, len(class_names))]
    return [{"class": class_names[i], "probability": float(probabilities[i])} for i in best]


def _open_keras(path: Path, signature: str) -> LoadedModel:
    import keras

    from flowers.model import load_model

    model, class_names = load_model(path)
    return LoadedModel(
        format="keras", runtime=f"keras {keras.__version__} ({keras.backend.backend()})",
        image_size=int(model.input_shape[1]), num_classes=int(model.output_shape[-1]),
        input_name=model.inputs[0].name, output_name=model.outputs[0].name,
        predict=lambda images: keras.ops.convert_to_numpy(model.predict_on_batch(images)),
        handle=model, class_names=class_names)


def _open_savedmodel(path: Path, signature: str) -> LoadedModel:
    import tensorflow as tf

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


def _open_onnx(path: Path, signature: str) -> LoadedModel:
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


def _open_tflite(path: Path, signature: str) -> LoadedModel:
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

