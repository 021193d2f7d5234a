"""The per-backend half of `flowers export`, run in its own process: python -m flowers.export.worker REQ.

A process can use one Keras backend only, so flowers/export/run.py starts this module once per
backend it needs (flowers.workers.run_worker, which also defines the request/result files and how a
failure reaches the user). Under the request's backend it loads model.keras, runs it on the
verification images (probabilities to a .npy, batch-1 latency to the result), then writes the
formats assigned to this backend with each format's write() (flowers.export.formats: Keras' own
exporters).

Request keys: backend, model, images (.npy, float32 [N,S,S,3] 0..255), probabilities_out,
latency_repeats, writes ({format: path}).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from flowers import backend, workers
from flowers.export import formats


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
        write = formats.get(fmt).write
        if write is None:  # flowers.export.run copies such a format; it never asks for it here
            raise ValueError(f"format {fmt!r} has no writer")
        start = time.perf_counter()
        write(loaded.handle, Path(path))
        write_s[fmt] = time.perf_counter() - start
    return {"backend": name, "runtime": loaded.runtime, "device": backend.device(name),
            "batch1_p50_ms": batch1_p50_ms, "write_s": write_s}


if __name__ == "__main__":
    workers.worker_main(run=run)
