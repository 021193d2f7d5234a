"""One backend's side of `flowers bench`, run as `python -m flowers.bench.worker` by flowers.bench.

Timing mode: builds the model (and the native twins) once, then answers one JSON request per stdin
line with the seconds of each timed call, so the orchestrator can interleave backends round by
round. End-to-end mode (--e2e standard|cache): trains the baseline job shape once in this fresh
process and prints its figures (fresh, so its memory peaks are the job's alone).

Protocol lines go to the original stdout; everything else (keras progress, C++ logs) is sent to
stderr so it cannot corrupt the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flowers import backend, config, data


def main(argv: list[str] | None = None) -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    args = _parser().parse_args(argv)
    backend.select(args.backend)
    if args.e2e:
        _send(protocol, end_to_end(args))
        return
    worker = Worker(args)
    _send(protocol, {"ready": worker.describe()})
    for line in sys.stdin:
        request = json.loads(line)
        if request["task"] == "quit":
            break
        try:
            _send(protocol, worker.measure(request["task"], request["steps"]))
        except Exception as exc:  # reported to the orchestrator, which names the task
            _send(protocol, {"error": f"{type(exc).__name__}: {exc}"})


class Worker:
    """The models and data of one backend, and the timed calls `flowers bench` asks for."""

    def __init__(self, args: argparse.Namespace):
        import keras

        self.keras = keras
        self.backend = args.backend
        self.image_size, self.batch_size, self.warmup = args.image_size, args.batch_size, args.warmup
        backend.hide_gpus_from_tensorflow(self.backend)
        keras.utils.set_random_seed(0)
        self.data_config = _data_config(args.images, args.image_size)
        splits = data.load(self.data_config, args.batch_size, seed=0)
        self.num_classes = len(splits.class_names)
        self.pipeline = splits.train.repeat()
        for _ in splits.train:  # one pass fills the pipeline's cache: epochs after the first
            pass
        self.images, self.labels = (np.array(t) for t in next(iter(splits.train)))
        self.models: dict[str, Any] = {}
        # self.model trains (it returns logits); the forward figures time what users run, the
        # probability-returning model, which shares its weights.
        self.model = self.models[""] = self._build("")
        self.predictor = _predictor(self.model)
        self.natives: dict[str, Any] = {}
        self.native_differences: dict[str, float] | None = None
        self.warmed: set[str] = set()

    def describe(self) -> dict[str, Any]:
        from flowers.model import resolve_data_format

        return {
            "device": backend.device(self.backend),
            "versions": backend.versions(self.backend),
            "data_format": resolve_data_format("auto"),
            "jit_compile": bool(self.model.jit_compile),
            "images": self.data_config.source,
            "gflops_per_image": model_gflops(self.model),
            "native": self._native_factory() is not None,
        }

    def measure(self, task: str, steps: int) -> dict[str, Any]:
        """Time `steps` calls of `task` (after `warmup` untimed calls the first time it runs)."""
        call, images_per_call = self._task(task)
        result: dict[str, Any] = {"images_per_call": images_per_call}
        if task not in self.warmed:
            start = time.perf_counter()
            call(1)
            result["first_call_s"] = time.perf_counter() - start
            if self.warmup > 1:
                call(self.warmup - 1)
            self.warmed.add(task)
        result["samples_s"] = call(steps)
        if task.startswith("native") and self.native_differences:
            result["native_differences"] = self.native_differences
        return result

    def _task(self, task: str) -> tuple[Callable[[int], list[float]], int]:
        batch, model, predictor = self.batch_size, self.model, self.predictor
        if task == "forward_b1":
            return _repeat(lambda: predictor.predict_on_batch(self.images[:1])), 1
        if task == "forward_batch":
            return _repeat(lambda: predictor.predict_on_batch(self.images)), batch
        if task == "train_step":
            # one step per call on backend tensors already in memory: what native code times
            x = self.keras.ops.convert_to_tensor(self.images)
            y = self.keras.ops.convert_to_tensor(self.labels)
            return _repeat(lambda: model.train_on_batch(x, y)), batch
        if task == "train_memory":
            return lambda steps: self._fit_steps(steps, in_memory=True), batch
        if task == "train_tfdata":
            return lambda steps: self._fit_steps(steps, in_memory=False), batch
        if task.startswith("variant:"):
            if task not in self.models:  # built once: a new model object would be traced again
                self.models[task] = _predictor(self._build(task[8:]))
            variant = self.models[task]
            return _repeat(lambda: variant.predict_on_batch(self.images)), batch
        if task in ("native_forward", "native_train"):
            native = self._native()
            if task == "native_forward":
                return _repeat(lambda: native.forward(self.images)), batch
            return _repeat(lambda: native.train_step(self.images, self.labels)), batch
        raise ValueError(f"unknown task {task!r}")

    def _fit_steps(self, steps: int, in_memory: bool) -> list[float]:
        """Per-step seconds of model.fit fed by the real tf.data pipeline or by in-memory arrays.

        Measured between consecutive batch ends, so each interval holds one data hand-off, one
        step and keras' per-step work; `steps + 1` batches give `steps` intervals. Both feeds go
        through the same fit loop, so their ratio is the cost of the pipeline hand-off.
        """
        ends: list[float] = []
        recorder = self.keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
        count = (steps + 1) * self.batch_size
        if in_memory:
            x = np.resize(self.images, (count, *self.images.shape[1:]))
            y = np.resize(self.labels, count)
            self.model.fit(x, y, batch_size=self.batch_size, epochs=1, shuffle=False, verbose=0,
                           callbacks=[recorder])
        else:
            self.model.fit(self.pipeline, steps_per_epoch=steps + 1, epochs=1, verbose=0,
                           callbacks=[recorder])
        return list(np.diff(ends))

    def _build(self, overrides: str):
        """The model with variant overrides ("section.key=value,..."), compiled."""
        from flowers.model import build_model, compile_model

        sets = [o for o in overrides.split(",") if o]
        experiment = config.apply_overrides(config.from_dict({"model": {"weights": "none"}}), sets)
        self.keras.config.set_dtype_policy(experiment.train.dtype_policy)
        try:
            model = build_model(experiment.model, self.image_size, self.num_classes)
            compile_model(model, 1e-3, self.num_classes, experiment.train.jit_compile)
        finally:
            self.keras.config.set_dtype_policy("float32")
        if self.models.get(""):  # variants run the main model's weights
            model.set_weights(self.models[""].get_weights())
        return model

    def _native_factory(self) -> Callable | None:
        from flowers.bench import native

        return {"torch": native.torch_native, "tensorflow": native.tensorflow_native}.get(self.backend)

    def _native(self):
        from flowers.bench import native

        if "native" not in self.natives:
            factory = self._native_factory()
            if factory is None:
                raise ValueError(f"no native baseline for {self.backend}")
            self.natives["native"] = factory(self.model, 1e-3)
            self.native_differences = native.differences(self.model, self.natives["native"],
                                                         self.images)
        return self.natives["native"]


def _predictor(model):
    """with_probabilities(model), predicting with the jit_compile setting `model` was compiled with.

    The wrapper is a new, uncompiled keras.Model, which would otherwise take the backend's "auto"
    default and lose a train.jit_compile variant.
    """
    from flowers.model import with_probabilities

    predictor = with_probabilities(model)
    predictor.jit_compile = model.jit_compile
    return predictor


def model_gflops(model) -> float:
    """Forward GFLOP per image, counted from the Keras layers' shapes (nothing hard-coded).

    Convolutions and dense layers: 2 x multiply-adds (+ bias); batch norm (inference): 2 per
    output value; activations, additions, pooling and preprocessing: 1 per value touched.
    """
    total = 0
    for layer in model._flatten_layers(include_self=False):
        if hasattr(layer, "layers"):
            continue  # a nested model: its layers are visited themselves
        try:
            out = int(np.prod(layer.output.shape[1:]))
            inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        except (AttributeError, ValueError):
            continue
        kind = type(layer).__name__
        if kind == "Conv2D":
            kernel = layer.kernel.shape  # (kh, kw, in, out)
            total += out * (2 * kernel[0] * kernel[1] * kernel[2] + (1 if layer.use_bias else 0))
        elif kind == "Dense":
            total += out * (2 * layer.kernel.shape[0] + 1)
        elif kind == "BatchNormalization":
            total += 2 * out
        elif kind in ("Activation", "ReLU", "Add", "ResNet50Preprocess"):
            total += out * max(1, len(inputs) - 1)
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            total += out * int(np.prod(layer.pool_size))
        elif kind == "GlobalAveragePooling2D":
            total += int(np.prod(inputs[0].shape[1:]))
    return total / 1e9


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    """Train the baseline job shape once (standard or feature-cache mode) and report its figures."""
    from flowers.train import train

    workdir = Path(tempfile.mkdtemp(prefix="flowers-bench-e2e-"))
    try:
        source = _data_config(args.images, args.image_size).source
        if source.startswith("folder:"):
            source = "folder:" + str(_subset(Path(source[7:]), workdir / "images",
                                             args.e2e_images_per_class))
        experiment = config.from_dict({
            "name": "bench-e2e",
            "data": {"source": source, "image_size": args.image_size},
            "model": {"weights": "none"},
            "train": {"epochs": args.e2e_epochs, "batch_size": args.batch_size,
                      "learning_rate": 1e-4, "latency_repeats": 2,
                      "cache_features": args.e2e == "cache"},
        })
        start = time.perf_counter()
        run_dir = train(experiment, args.backend, workdir / "runs")
        wall_s = time.perf_counter() - start
        metrics = json.loads((run_dir / "metrics.json").read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    keys = ("val_accuracy", "val_loss", "train_time_s", "feature_extraction_s", "num_train",
            "num_val", "peak_host_rss_mb", "peak_device_mem_mb", "null_reasons")
    return {"mode": args.e2e, "wall_s": wall_s, "epochs": args.e2e_epochs,
            **{k: metrics[k] for k in keys}}


def _subset(root: Path, target: Path, per_class: int) -> Path:
    """A train/test folder of links to the first images of each class (a fixed image count)."""
    listing = data.scan_folder(root, 0.2, seed=0)
    for split, files, labels, count in (("train", listing.train_files, listing.train_labels, per_class),
                                        ("test", listing.val_files, listing.val_labels,
                                         max(1, per_class // 2))):
        taken: dict[int, int] = {}
        for path, label in zip(files, labels, strict=True):
            if taken.get(label, 0) < count:
                taken[label] = taken.get(label, 0) + 1
                folder = target / split / listing.class_names[label]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / Path(path).name).symlink_to(path)
    return target


def _data_config(images: str, image_size: int):
    source = f"folder:{images}" if images else "synthetic"
    return config.from_dict({"data": {"source": source, "image_size": image_size,
                                      "synthetic_train_images": 256, "synthetic_classes": 12}}).data


def _repeat(fn: Callable[[], Any]) -> Callable[[int], list[float]]:
    def timed(count: int) -> list[float]:
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return samples

    return timed


def _send(stream, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flowers.bench.worker")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", default="", help="class folder of real photos ('' = synthetic)")
    parser.add_argument("--e2e", choices=("standard", "cache"))
    parser.add_argument("--e2e-epochs", type=int, default=10)
    parser.add_argument("--e2e-images-per-class", type=int, default=20)
    return parser


if __name__ == "__main__":
    main()
