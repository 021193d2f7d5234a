"""Exported models run in their own runtimes, behind one interface, and `flowers predict`.

open_model(path) picks the format from the path (flowers.export.formats: a .keras file runs under the
selected Keras backend, a SavedModel directory with tf.saved_model, a .onnx file with onnxruntime, a
.tflite file with the LiteRT interpreter) and returns its opener's LoadedModel, whose predict() takes
float32 RGB images [N, S, S, 3] in 0..255 and returns class probabilities [N, C]. Export
verification, `flowers predict` and serving all run models through here, so a format is run the same
way when it is checked and when it is used. Opening a .keras file imports keras: select the backend
first.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowers import files
from flowers.errors import FlowersError
from flowers.export import formats
from flowers.export.formats import LoadedModel
from flowers.images import load_image_files
from flowers.metrics import time_calls

# The pip extra that installs every format's writer and runtime.
EXPORT_EXTRA = "pip install -e '.[export]'"
MANIFEST = "manifest.json"
PREDICT_BATCH = 32


def format_of(path: str | Path) -> str:
    """The format of a model path: the name of the registered format that recognizes it.

    Raises:
        FlowersError: the path does not exist or no format recognizes it.
    """
    path = Path(path)
    if not path.exists():
        raise FlowersError(f"model file not found: {path}")
    for record in formats.REGISTRY.values():
        if record.recognizes(path):
            return record.name
    raise FlowersError(f"{path}: unknown model type; expected {_model_kinds()}")


def _model_kinds() -> str:
    """What a model path can be, from the registry: "a .keras, .onnx or .tflite file or a ..."."""
    suffixes = [r.suffix for r in formats.REGISTRY.values() if r.suffix]
    folders = [f"a {r.title} directory (one with {r.marker})"
               for r in formats.REGISTRY.values() if r.marker]
    kinds = [f"a {_or(suffixes)} file", *folders] if suffixes else folders
    return _or(kinds)


def _or(items: Sequence[str]) -> str:
    """"a", "a or b", "a, b or c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


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


def open_model(path: str | Path, signature: str | None = None) -> LoadedModel:
    """Open an exported model in its own runtime (the opener of its format).

    Args:
        path: a .keras, .onnx or .tflite file, or a SavedModel directory.
        signature: the entry point to call, one of the format's `signatures` (None: its first;
            formats without signatures ignore it).

    Returns:
        The LoadedModel.

    Raises:
        FlowersError: unknown type, runtime not installed, or a file its runtime cannot read.
    """
    path = Path(path)
    fmt = format_of(path)
    record = formats.get(fmt)
    require(record.runtime_modules, f"running {fmt} models")
    try:
        return record.opener(path, signature)
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
