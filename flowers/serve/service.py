"""The served model: opened once with flowers.export.runtimes, warmed up, run on batches of decoded images.

Runtimes that compile or allocate per input shape (a format's pads_batches, flowers.export.formats)
-- Keras (jax traces and compiles every new batch size, tf.function retraces) and the LiteRT
interpreter (re-allocates its tensors whenever the batch size changes) -- get batches padded to the
next bucket (powers of two up to --max-batch, and --max-batch itself), so they see a handful of
shapes, all compiled during the warm-up, instead of a compile in the middle of serving. onnxruntime
and SavedModels take any batch size at no cost and are run unpadded.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from flowers.export import formats
from flowers.serve.settings import ServeTarget

WARMUP_CALLS_PER_SHAPE = 2
# Mid-grey: warm-up images only need the right shape and a plausible value range.
WARMUP_PIXEL = 127.0


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two below max_batch, and max_batch: the batch shapes a padded runtime sees."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


class ModelService:
    """One model instance. Not thread-safe: the batcher calls run() from one thread only."""

    def __init__(self, target: ServeTarget, max_batch: int):
        self.target = target
        self.max_batch = max_batch
        self.model: Any = None  # the runtimes.LoadedModel, once load() has run
        self.class_names: list[str] = []
        self.load_s: float | None = None
        self.warmup_s: float | None = None

    @property
    def pads(self) -> bool:
        return formats.get(self.target.format).pads_batches

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    def load(self) -> None:
        """Open the model in its runtime and run every batch shape it will see (seconds, once).

        Raises:
            FlowersError: a file its runtime cannot read, or class names that do not fit it.
        """
        from flowers.export import runtimes

        start = time.perf_counter()
        self.model = runtimes.open_model(self.target.model_path)
        self.class_names = runtimes.class_names_for(self.target.model_path, self.model)
        self.load_s = time.perf_counter() - start
        start = time.perf_counter()
        # Unpadded runtimes see every size; warming the smallest and largest covers their
        # one-time costs (memory arenas, kernel selection) without compiling anything.
        sizes = bucket_sizes(self.max_batch) if self.pads else sorted({1, self.max_batch})
        for size in sizes:
            images = np.full((size, self.image_size, self.image_size, 3), WARMUP_PIXEL, np.float32)
            for _ in range(WARMUP_CALLS_PER_SHAPE):
                self.model.predict(images)
        self.warmup_s = time.perf_counter() - start

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, C] for uint8 images [N, S, S, 3], in chunks of at most max_batch."""
        outputs = []
        for first in range(0, len(images), self.max_batch):
            chunk = images[first:first + self.max_batch].astype(np.float32)
            size = len(chunk)
            if self.pads:
                padded = next(b for b in bucket_sizes(self.max_batch) if b >= size)
                chunk = np.concatenate([chunk, np.zeros((padded - size, *chunk.shape[1:]), np.float32)])
            outputs.append(np.asarray(self.model.predict(chunk))[:size])
        return np.concatenate(outputs)

    def describe(self) -> dict[str, Any]:
        """What is being served, for /health, GET /v1/models/<name> and the startup log line."""
        model = self.model
        return {
            "name": self.target.name, "version": self.target.version, "format": self.target.format,
            "runtime": model.runtime if model else None, "model_path": self.target.model_path,
            "image_size": model.image_size if model else None,
            "classes": self.class_names, "max_batch": self.max_batch, "padded_batches": self.pads,
            "load_s": self.load_s, "warmup_s": self.warmup_s,
        }
