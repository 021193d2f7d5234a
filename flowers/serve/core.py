"""The server behind every protocol's routes: the model, the batcher, admission, metrics, errors.

A protocol's router (vertex.py, tfserving.py, oip.py) turns a request body into `Work` -- how to
decode its images and how to answer with their probabilities -- and hands it to Server.infer, so
every route shares one batcher, one admission limit, one set of metrics and one error policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from flowers.errors import FlowersError
from flowers.serve.batcher import Admission, MicroBatcher, Overloaded
from flowers.serve.payload import ClientError
from flowers.serve.service import ModelService
from flowers.serve.settings import ServeSettings

# uvicorn configures this logger; the model's load and failures appear among its own lines.
log = logging.getLogger("uvicorn.error")
RETRY_AFTER_S = 1
# Decoding threads: Pillow and TensorFlow's resize release the GIL, so a few overlap with the model.
DECODE_THREADS = min(4, os.cpu_count() or 1)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Work:
    """One request's model work, as its protocol parsed it."""

    decode: Callable[[], np.ndarray]  # -> uint8 [N, S, S, 3]; CPU-bound, run in a decoding thread
    answer: Callable[[np.ndarray], Response]  # probabilities [N, C] -> the protocol's response


Parse = Callable[[bytes, Request], Work]
ErrorShape = Callable[[int, str, "dict[str, str] | None"], Response]


class Metrics:
    """The server's Prometheus metrics, in a registry of this app (no process-global state).

    With several uvicorn workers, $PROMETHEUS_MULTIPROC_DIR is set (flowers.serve.server) and
    /metrics sums every worker's figures with prometheus-client's multiprocess collector.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("flowers_serve_requests", "Predict requests answered, by route and "
                                "HTTP status.", ["route", "status"], registry=self.registry)
        self.latency = Histogram("flowers_serve_request_latency_seconds", "Predict request latency "
                                 "in the server, body read to response.", ["route"],
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.batch_size = Histogram("flowers_serve_batch_size", "Images per model call.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.model_latency = Histogram("flowers_serve_model_call_seconds", "Seconds per model call.",
                                       buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.queue_depth = Gauge("flowers_serve_queue_depth", "Requests waiting for a model call.",
                                 multiprocess_mode="livesum", registry=self.registry)
        self.held = Gauge("flowers_serve_requests_held", "Predict requests being decoded, queued "
                          "or run (limit: --max-queue).", multiprocess_mode="livesum",
                          registry=self.registry)
        self.ready = Gauge("flowers_serve_ready", "1 once the model is loaded and warmed up.",
                           multiprocess_mode="livemin", registry=self.registry)

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class Server:
    """The state behind the routes: the model, the batcher, the admission limit, the metrics."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.service = ModelService(settings.target, settings.max_batch)
        self.metrics = Metrics()
        self.admission = Admission(settings.max_queue, on_change=self.metrics.held.set)
        self.batcher: MicroBatcher | None = None
        self.decoders = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="flowers-decode")
        self.ready = False
        self.failure: str | None = None

    async def load(self) -> None:
        """Load and warm up the model; on failure report it and stop the server (see server.py)."""
        batcher = MicroBatcher(self.service.run, self.settings.max_batch, self.settings.max_wait_ms,
                               on_batch=self._observe_batch, on_queue=self.metrics.queue_depth.set)
        try:
            # The model thread loads it too: some runtimes prefer one thread for a model's life.
            await batcher.call_in_model_thread(self.service.load)
        except Exception as exc:  # every runtime has its own exception types for unreadable files
            self.failure = str(exc) if isinstance(exc, FlowersError) else f"{type(exc).__name__}: {exc}"
            log.error("the model failed to load: %s", self.failure)
            self._report_failure()
            return
        self.batcher = batcher
        batcher.start()
        self.ready = True
        self.metrics.ready.set(1)
        d = self.service.describe()
        log.info("ready: %s v%s, %s in %s (loaded in %.1f s, warmed up in %.1f s); routes %s, %s, "
                 "/v1/models/%s:predict, /v2/models/%s/infer", d["name"], d["version"], d["format"],
                 d["runtime"], d["load_s"], d["warmup_s"], self.settings.health_route,
                 self.settings.predict_route, d["name"], d["name"])

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.decoders.shutdown(wait=False, cancel_futures=True)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.mark_process_dead(os.getpid())

    async def infer(self, request: Request, route: str, parse: Parse,
                    error: ErrorShape | None = None) -> Response:
        """Answer one inference request of any protocol; records its status and latency.

        Args:
            route: the route's template, the label of its metrics.
            parse: the protocol's body check (cheap, in the event loop) -> its Work.
            error: the protocol's error body (default {"error": "..."}).
        """
        error = error or error_response
        start = time.perf_counter()
        try:
            response = await self._infer(request, parse)
        except ClientError as exc:
            response = error(exc.status, exc.message, None)
        except Overloaded as exc:
            response = error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
        except Exception as exc:  # the server's fault (a runtime failing), never the client's
            log.exception("error answering an inference request")
            response = error(500, f"internal error: {type(exc).__name__}: {exc}", None)
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    async def _infer(self, request: Request, parse: Parse) -> Response:
        self.require_ready()
        with self.admission:
            body = await read_body(request, self.settings.max_body_bytes)
            work = parse(body, request)
            loop = asyncio.get_running_loop()
            with self.batcher.expecting():
                images = await loop.run_in_executor(self.decoders, work.decode)
            probabilities = await self.batcher.predict(images)
        return work.answer(probabilities)

    def require_ready(self) -> None:
        """Raises ClientError 503 until the model is loaded and warmed up."""
        if not self.ready:
            raise ClientError(503, "the model is still loading; retry when /health answers 200")

    def check_model(self, name: str, version: str | None = None) -> None:
        target = self.settings.target
        if name != target.name:
            raise ClientError(404, f"model {name!r} not found; this server serves {target.name!r}")
        if version is not None and version != str(target.version):
            raise ClientError(404, f"model {name!r} has no version {version!r}; this server "
                                   f"serves version {target.version}")

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.model_latency.observe(seconds)

    def _report_failure(self) -> None:
        """Write the failure where server.serve() reads it, then stop the supervisor gracefully."""
        if self.settings.failure_file:
            Path(self.settings.failure_file).write_text(self.failure or "unknown failure")
        os.kill(self.settings.supervisor_pid or os.getpid(), signal.SIGTERM)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ClientError(415, f"Content-Encoding {encoding} is not supported; send the body "
                               "uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"the body is {int(declared)} bytes; the limit is {limit} "
                               "(--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body has no content-length to check first
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"the body is over the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)




def add_inference_routes(routes: APIRouter, server: Server, model_path: str, action: str,
                         parse: Parse, label_prefix: str = "") -> None:
    """POST {model_path}{action} and its /versions/{version} twin, answered by Server.infer.

    e.g. ("/v1/models/{name}", ":predict"); the metrics label is the route's template (with
    label_prefix, the router's own prefix).
    """
    for path in (f"{model_path}{action}", f"{model_path}/versions/{{version}}{action}"):
        routes.add_api_route(path, _inference_endpoint(server, label_prefix + path, parse),
                             methods=["POST"])


def _inference_endpoint(server: Server, label: str, parse: Parse):
    async def endpoint(name: str, request: Request, version: str | None = None) -> Response:
        server.check_model(name, version)
        return await server.infer(request, label, parse)

    return endpoint
