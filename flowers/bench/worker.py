"""One backend's side of `flowers bench`, run as `python -m flowers.bench.worker` by flowers.bench.

Timing mode (`--lines`, a workers.LineWorker): builds the model (and the native twins) once, then
answers one JSON request per line with the seconds of each timed call, so the orchestrator can
interleave backends round by round. End-to-end mode (a one-shot workers.run_worker request with
"e2e": "standard" | "cache"): trains the baseline job shape once in this fresh process and returns
its figures (fresh, so its memory peaks are the job's alone). Memory mode ("memory": TASK, one-shot
too): builds the model, runs one task, reports that process's peak memory.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flowers import backend, config, data, files, folders, workers
from flowers.bench.variants import variant_baseline
from flowers.metrics import time_calls


class Worker:
    """The models and data of one backend, and the timed calls `flowers bench` asks for."""

    def __init__(self, request: dict[str, Any]):
        """request: backend, image_size, batch_size, warmup, images, backbone (see flowers.bench.run)."""
        import keras

        self.keras = keras
        self.backend = request["backend"]
        self.image_size, self.batch_size = request["image_size"], request["batch_size"]
        self.warmup = request["warmup"]
        self.backbone = request.get("backbone", "ResNet50")
        keras.utils.set_random_seed(0)
        self.data_config = _data_config(request["images"], self.image_size)
        splits = data.load(self.data_config, self.batch_size, seed=0)
        self.num_classes = len(splits.class_names)
        self.pipeline = splits.train.repeat()
        for _ in splits.train:  # one pass fills the pipeline's cache: epochs after the first
            pass
        self.images, self.labels = (np.array(t) for t in next(iter(splits.train)))
        self.models: dict[str, Any] = {}
        self.original = None  # the first model built, before its rewrite (see _build)
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
            "data_format": resolve_data_format(self._experiment("").model),
            "backbone": self.backbone,
            "jit_compile": bool(self.model.jit_compile),
            "images": self.data_config.source,
            "gflops_per_image": model_gflops(self.model),
            "native": self._native_factory() is not None,
        }

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        """One line of the protocol: {"task": ..., "steps": N} -> measure()'s reply."""
        return self.measure(message["task"], message["steps"])

    def measure(self, task: str, steps: int) -> dict[str, Any]:
        """Time `steps` calls of `task` (after `warmup` untimed calls the first time it runs)."""
        # a contended task is the same call as its quiet one (warmed up already)
        task = task.removeprefix("contended:")
        call, images_per_call = self._task(task)
        result: dict[str, Any] = {"images_per_call": images_per_call}
        if task not in self.warmed:
            result["first_call_s"] = time_calls(lambda: call(1), 1, warmup=0)[0] / 1000
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
        if task.startswith("forward_size:"):
            size = int(task.split(":")[1])
            if task not in self.models:  # built once, with the main model's head weights
                self.models[task] = (_predictor(self._build("", image_size=size)),
                                     self._resized(size))
            sized, images = self.models[task]
            return _repeat(lambda: sized.predict_on_batch(images)), batch
        if task.startswith("variant:") and variant_baseline(task[8:]) == "train_step":
            if task not in self.models:
                self.models[task] = self._build(task[8:])
            trained = self.models[task]
            x = self.keras.ops.convert_to_tensor(self.images)
            y = self.keras.ops.convert_to_tensor(self.labels)
            return _repeat(lambda: trained.train_on_batch(x, y)), batch
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

    def _resized(self, size: int) -> np.ndarray:
        """The batch of real images at another side (bilinear, like the data pipeline)."""
        import tensorflow as tf

        return tf.image.resize(self.images, (size, size)).numpy()

    def _build(self, overrides: str, image_size: int | None = None):
        """The model with variant overrides ("section.key=value,..."), compiled, with the weights of
        the first model built here before its rewrite (every weight's shape is independent of the
        image side)."""
        from flowers.fold import copy_weights
        from flowers.model import backbone_rewrite, build_model, compile_model, rewrite_classifier

        experiment = self._experiment(overrides)
        self.keras.config.set_dtype_policy(experiment.train.dtype_policy)
        try:
            model = build_model(experiment.model, image_size or self.image_size, self.num_classes,
                                portable_random=experiment.train.portable_random)
            # Every model starts from the first one's weights, unrewritten (the native twins copy
            # those); then its backbone is rewritten as a run's would be (backbone_rewrite).
            if self.original is None:
                self.original = model
            else:
                copy_weights(self.original, model)
            model = rewrite_classifier(model, backbone_rewrite(experiment))
            compile_model(model, 1e-3, self.num_classes, experiment.train.jit_compile)
        finally:
            self.keras.config.set_dtype_policy("float32")
        return model

    def _experiment(self, overrides: str) -> config.Experiment:
        """The benchmarked model's experiment (random weights, self.backbone) with variant overrides."""
        experiment = config.from_dict({"data": {"image_size": self.image_size},
                                       "model": {"weights": "none", "backbone": self.backbone}})
        return config.apply_overrides(experiment, [o for o in overrides.split(",") if o])

    def _native_factory(self) -> Callable | None:
        from flowers.bench import native

        if native.unavailable(self.backend, self.backbone):
            return None
        return {"torch": native.torch_native, "tensorflow": native.tensorflow_native}[self.backend]

    def _native(self, compare: bool = True):
        """The native twin, built once; compare: also check it against the Keras model (which
        runs the Keras model: a memory measurement of the twin alone does not)."""
        from flowers.bench import native

        if "native" not in self.natives:
            factory = self._native_factory()
            if factory is None:
                raise ValueError(f"no native baseline for {self.backend}")
            self.natives["native"] = factory(self.original, 1e-3)
            if compare:
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

    Convolutions and dense layers: 2 x multiply-adds (+ bias), where a grouped Conv2D's kernel holds
    in/groups input channels, a DepthwiseConv2D convolves each channel alone and a SeparableConv2D
    is a depthwise then a 1x1 convolution; batch norm (inference), Rescaling and Normalization: 2
    per output value; layer norm: 5 (mean, variance, normalise, scale, shift); activations,
    element-wise additions/products and preprocessing: 1 per value touched (per extra input for
    merges); pooling: 1 per window element. Layer kinds not listed (padding, reshapes, dropout,
    ops written as plain tensor expressions) count 0.
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
        total += _layer_flops(layer, out, inputs)
    return total / 1e9


def _layer_flops(layer, out: int, inputs: list) -> int:
    """FLOP of one layer per image (see model_gflops); `out` = output values per image."""
    kind = type(layer).__name__
    bias = 1 if getattr(layer, "use_bias", False) else 0
    if kind in ("Conv1D", "Conv2D", "Conv3D"):
        # kernel (..., in / groups, out): the grouped case needs nothing more
        return out * (2 * int(np.prod(layer.kernel.shape[:-1])) + bias)
    if kind == "DepthwiseConv2D":
        # kernel (kh, kw, in, depth_multiplier): each output value sees kh x kw inputs of its channel
        return out * (2 * int(np.prod(layer.kernel.shape[:2])) + bias)
    if kind == "SeparableConv2D":
        kh, kw, channels, multiplier = layer.depthwise_kernel.shape
        positions = out // layer.pointwise_kernel.shape[-1]
        return (positions * channels * multiplier * 2 * kh * kw
                + out * (2 * channels * multiplier + bias))
    if kind == "Dense":
        return out * (2 * layer.kernel.shape[0] + bias)
    if kind in ("BatchNormalization", "Rescaling", "Normalization"):
        return 2 * out
    if kind == "LayerNormalization":
        return 5 * out
    if kind in ("Activation", "ReLU", "Add", "Multiply", "Subtract", "Average", "Maximum",
                "Minimum", "ResNet50Preprocess", "ImagenetPreprocess", "LayerScale"):
        return out * max(1, len(inputs) - 1)
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        return out * int(np.prod(layer.pool_size))
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return int(np.prod(inputs[0].shape[1:]))
    return 0


def end_to_end(request: dict[str, Any]) -> dict[str, Any]:
    """Train the baseline job shape once (standard or feature-cache mode) and report its figures.

    request: backend, e2e ("standard" | "cache" | "cache-bf16"), epochs, images_per_class, image_size,
    batch_size, images, backbone (see flowers.bench.run).
    """
    from flowers.training.loop import train

    workdir = Path(tempfile.mkdtemp(prefix="flowers-bench-e2e-"))
    try:
        source = _data_config(request["images"], request["image_size"]).source
        if source.startswith("folder:"):
            source = "folder:" + str(_subset(Path(source[7:]), workdir / "images",
                                             request["images_per_class"]))
        experiment = config.from_dict({
            "name": "bench-e2e",
            "data": {"source": source, "image_size": request["image_size"]},
            "model": {"weights": "none", "backbone": request.get("backbone", "ResNet50")},
            "train": {"epochs": request["epochs"], "batch_size": request["batch_size"],
                      "learning_rate": 1e-4, "latency_repeats": 2,
                      "cache_features": request["e2e"].startswith("cache"),
                      "dtype_policy": ("mixed_bfloat16" if request["e2e"].endswith("-bf16")
                                       else "float32")},
        })
        start = time.perf_counter()  # one whole run: wall time of a span, not a repeated call
        run_dir = train(experiment, request["backend"], workdir / "runs")
        wall_s = time.perf_counter() - start
        metrics = files.read_json(run_dir / "metrics.json")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    keys = ("val_accuracy", "val_loss", "train_time_s", "feature_extraction_s", "num_train",
            "num_val", "peak_host_rss_mb", "peak_device_mem_mb", "null_reasons")
    return {"mode": request["e2e"], "backbone": experiment.model.backbone, "wall_s": wall_s,
            "epochs": request["epochs"],
            **{k: metrics[k] for k in keys}}


def memory(request: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one task in this fresh process: the model (and data) built, then the task.

    request: a timing request (see Worker) plus "memory": the task ("forward_batch", "train_step",
    "native_forward" or "native_train"). Host: the process's peak RSS (getrusage) after building
    and after the task's warm-up and two timed calls; device: the allocator's peak on a GPU.
    """
    import resource

    def peak_rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    name, task = request["backend"], request["memory"]
    worker = Worker(request)
    if task.startswith("native"):
        worker._native(compare=False)  # the Keras model is built (its weights), never run
    built = peak_rss_mb()
    backend.reset_peak_device_memory(name)
    worker.measure(task, 2)
    device_mb, device_reason = backend.peak_device_memory_mb(name)
    return {"task": task, "after_build_rss_mb": built, "peak_rss_mb": peak_rss_mb(),
            "peak_device_mem_mb": device_mb, "device_null_reason": device_reason}


def one_shot(request: dict[str, Any]) -> dict[str, Any]:
    """A one-shot request: an end-to-end run ("e2e") or a memory measurement ("memory")."""
    return memory(request) if "memory" in request else end_to_end(request)


def _subset(root: Path, target: Path, per_class: int) -> Path:
    """A train/test folder of links to the first images of each class (a fixed image count)."""
    listing = folders.scan_folder(root, 0.2, seed=0)
    for split, paths, labels, count in (("train", listing.train_files, listing.train_labels, per_class),
                                        ("test", listing.val_files, listing.val_labels,
                                         max(1, per_class // 2))):
        taken: dict[int, int] = {}
        for path, label in zip(paths, labels, strict=True):
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
    """count -> the seconds of each of `count` calls of fn (the warm-up is measure()'s)."""
    return lambda count: [ms / 1000 for ms in time_calls(fn, count, warmup=0)]


if __name__ == "__main__":
    workers.worker_main(run=one_shot, start=Worker)

