"""One metrics schema and one measuring method for every backend.

How each figure is measured (the same code runs under torch, tensorflow and jax):
- epoch_times_s: wall seconds of each epoch's training steps (validation excluded).
- first_epoch_s: epoch_times_s[0]; it carries graph tracing / compilation / warm-up.
- feature_extraction_s: train.cache_features only: computing the backbone features once.
- warmup_epochs: the first epoch each process ran (epoch 0, plus the first epoch after every
  resume): it carries tracing/compilation, so the throughput leaves it out.
- train_images_per_s: images trained per epoch (num_train; whole global batches only in
  data-parallel runs) * (epochs not in warmup_epochs) / their summed epoch_times_s -- steady state,
  compile time excluded, all replicas together. Needs one epoch that is not a warm-up epoch.
- distribution, replicas, processes: train.distribution, the devices the global batch was split
  over, and the processes they ran in (1, 1 without data-parallel training).
- train_time_s: wall seconds of all epochs, validation included (what a user waits for), plus
  feature_extraction_s when features are cached.
- peak_host_rss_mb: largest resident set size of this process, sampled every 50 ms by a thread.
- peak_device_mem_mb: the framework allocator's peak on the GPU; null on CPU.
- eval_time_s: one model.evaluate over the validation split.
- latency_ms: predict_on_batch on real validation images at batch 1 and 32; 3 untimed warm-up
  calls, then train.latency_repeats timed calls; p50 and p95 of those.
- seed: train.seed. portable_random: whether the initial weights and dropout masks were the
  backend-independent ones (flowers/randomness.py), how many weights were drawn and loaded, the
  portable dropout layers and any random layer that trains with the backend's own draws.
  deterministic: train.deterministic and the switch it turned on.
- predictions.csv (beside metrics.json): the final model on every validation image, in the split's
  stored order: index, item (the file's path in the data folder, else empty), label, predicted,
  p_true (the probability of the true class). flowers compare pairs runs by these rows.
A figure that cannot be measured is null and its reason is in null_reasons; never 0, never omitted.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flowers.errors import FlowersError

LATENCY_WARMUP_CALLS = 3
LATENCY_KEYS = ("batch1_p50", "batch1_p95", "batch32_p50", "batch32_p95")
# Every metrics.json has exactly these keys (plus null_reasons); report.py relies on it.
METRIC_KEYS = (
    "experiment", "seed", "backend", "backend_version", "keras_version", "tensorflow_version",
    "python_version", "device", "host", "config_hash", "run_id", "created", "resumed",
    "num_train", "num_val", "num_classes", "skipped_files", "data_cached",
    "backbone", "data_format", "jit_compile", "dtype_policy", "distribution", "replicas", "processes",
    "portable_random", "deterministic",
    "epochs", "finetune_epochs", "phase_times_s", "early_stopping", "feature_extraction_s", "train_time_s",
    "epoch_times_s", "first_epoch_s", "warmup_epochs",
    "train_images_per_s",
    "peak_host_rss_mb", "peak_device_mem_mb", "eval_time_s", "latency_ms",
    "val_loss", "val_accuracy", "val_top5_accuracy",
)
NUMERIC_KEYS = ("train_time_s", "first_epoch_s", "train_images_per_s", "peak_host_rss_mb",
                "peak_device_mem_mb", "eval_time_s", "val_loss", "val_accuracy",
                "val_top5_accuracy")


class HostMemorySampler:
    """Context manager that samples this process's RSS in a background thread; peak in MiB."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_mb = self._rss_mb()

    def _rss_mb(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> HostMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = LATENCY_WARMUP_CALLS) -> list[float]:
    """Call fn `warmup` times untimed, then `repeats` times; return each timed call in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def latency_ms(predict_on_batch: Callable[[np.ndarray], Any], images: np.ndarray,
               repeats: int) -> dict[str, float]:
    """p50/p95 latency of predict_on_batch at batch 1 and batch 32 on the given real images.

    Fewer than 32 images are repeated to fill the batch (latency does not depend on content).
    """
    batch32 = np.resize(images, (32, *images.shape[1:])).astype(np.float32)
    result = {}
    for size, batch in ((1, batch32[:1]), (32, batch32)):
        times = time_calls(lambda b=batch: predict_on_batch(b), repeats)
        result[f"batch{size}_p50"] = float(np.percentile(times, 50))
        result[f"batch{size}_p95"] = float(np.percentile(times, 95))
    return result


def throughput(num_images: int, epoch_times_s: list[float],
               warmup_epochs: list[int] = (0,)) -> tuple[float | None, str | None]:
    """Training images per second over the epochs that are not warm-up epochs, or (None, reason)."""
    steady = [t for epoch, t in enumerate(epoch_times_s) if epoch not in set(warmup_epochs)]
    if not steady:
        return None, ("needs at least 2 epochs in one process (the first epoch a process runs "
                      "carries compile/warm-up time)")
    return num_images * len(steady) / sum(steady), None


def build_metrics(values: dict[str, Any], null_reasons: dict[str, str]) -> dict[str, Any]:
    """Assemble a metrics.json dict in schema order; every null must come with a reason."""
    missing = [k for k in METRIC_KEYS if k not in values]
    if missing:
        raise ValueError(f"metrics missing keys: {missing}")
    metrics = {k: values[k] for k in METRIC_KEYS}
    unexplained = [k for k, v in metrics.items() if v is None and k not in null_reasons]
    if unexplained:
        raise ValueError(f"null metrics without a reason: {unexplained}")
    metrics["null_reasons"] = dict(null_reasons)
    return metrics


def read_metrics(path: Path) -> dict[str, Any]:
    """Load and check a metrics.json; raises FlowersError if it is corrupt or not this schema."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FlowersError(f"{path}: unreadable metrics.json ({exc})") from None
    if not isinstance(metrics, dict):
        raise FlowersError(f"{path}: metrics.json is not a JSON object")
    # Runs from before warmup_epochs existed excluded epoch 0 only.
    metrics.setdefault("warmup_epochs", [0])
    # Runs from before data-parallel training ran on one device in one process.
    for key, value in (("distribution", "none"), ("replicas", 1), ("processes", 1)):
        metrics.setdefault(key, value)
    # Runs from before model.backbone and [finetune]: ResNet50, head-only, every epoch run.
    metrics.setdefault("backbone", "ResNet50")
    metrics.setdefault("finetune_epochs", 0)
    metrics.setdefault("phase_times_s", {"head": metrics.get("train_time_s")})
    metrics.setdefault("early_stopping", None)  # runs from before train.early_stopping_patience
    # Runs from before train.portable_random: each backend drew its own weights and masks.
    metrics.setdefault("portable_random", {"enabled": False})
    metrics.setdefault("seed", None)  # runs from before it: config.json has train.seed
    metrics.setdefault("deterministic", {"requested": False, "applied": None})
    missing = [k for k in (*METRIC_KEYS, "null_reasons") if k not in metrics]
    if missing:
        raise FlowersError(f"{path}: metrics.json lacks {', '.join(missing)}")
    for key in NUMERIC_KEYS:
        value = metrics[key]
        if value is None:
            if key not in metrics["null_reasons"]:
                raise FlowersError(f"{path}: {key} is null without a reason")
        elif not isinstance(value, int | float) or not math.isfinite(value):
            raise FlowersError(f"{path}: {key}={value!r} is not a number")
    return metrics
