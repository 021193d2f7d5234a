"""The FastAPI app: Vertex AI and TF Serving routes over one ModelService, errors as JSON, metrics.

Routes (health and predict follow $AIP_HEALTH_ROUTE / $AIP_PREDICT_ROUTE, see settings.py):
  GET  /health                         200 once the model is loaded and warmed up, 503 before
  POST /predict                        {"instances": [...], "parameters": {"top_k": K}}
  POST /v1/models/<name>:predict       the same, TF Serving REST style (<name> = the experiment)
  POST /v1/models/<name>/versions/<v>:predict
  GET  /v1/models/<name>               TF Serving model status (LOADING / AVAILABLE)
  GET  /metrics                        Prometheus: requests by route and status, latency,
                                       batch sizes, model-call time, queue depth, held requests
Every client mistake is a 4xx with {"error": "..."}; the lifespan loads the model in the background
(so /health can answer 503 meanwhile), and on shutdown -- after uvicorn has answered every open
request -- stops the batcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from flowers.errors import FlowersError
from flowers.export import runtimes
from flowers.serve import payload
from flowers.serve.batcher import Admission, MicroBatcher, Overloaded
from flowers.serve.payload import ClientError
from flowers.serve.service import ModelService
from flowers.serve.settings import SETTINGS_ENV, ServeSettings

# uvicorn configures this logger; the model's load and failures appear among its own lines.
log = logging.getLogger("uvicorn.error")
RETRY_AFTER_S = 1
# Decoding threads: Pillow and TensorFlow's resize release the GIL, so a few overlap with the model.
DECODE_THREADS = min(4, os.cpu_count() or 1)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
                 "/v1/models/%s:predict", d["name"], d["version"], d["format"], d["runtime"],
                 d["load_s"], d["warmup_s"], self.settings.health_route, self.settings.predict_route,
                 d["name"])

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.decoders.shutdown(wait=False, cancel_futures=True)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.mark_process_dead(os.getpid())

    async def predict(self, request: Request, route: str) -> JSONResponse:
        """Answer one predict request; records its status and latency."""
        start = time.perf_counter()
        try:
            response = await self._predict(request)
        except ClientError as exc:
            response = error_response(exc.status, exc.message)
        except Overloaded as exc:
            response = error_response(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
        except Exception as exc:  # the server's fault (a runtime failing), never the client's
            log.exception("error answering a predict request")
            response = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    async def _predict(self, request: Request) -> JSONResponse:
        if not self.ready:
            raise ClientError(503, "the model is still loading; retry when /health answers 200")
        with self.admission:
            body = await read_body(request, self.settings.max_body_bytes)
            parsed = payload.parse_body(body, self.settings.max_instances)
            loop = asyncio.get_running_loop()
            with self.batcher.expecting():
                images = await loop.run_in_executor(self.decoders, payload.decode_instances,
                                                    parsed.instances, self.service.image_size)
            probabilities = await self.batcher.predict(images)
        names = self.service.class_names
        return JSONResponse({"predictions": [{"top": runtimes.top_classes(row, names, parsed.top_k)}
                                             for row in probabilities]})

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


def create_app(settings: ServeSettings) -> FastAPI:
    """The ASGI app serving settings.target; the model loads when the lifespan starts."""
    server = Server(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(server.load(), name="flowers-load")
        yield
        if not loading.done():  # stopped while loading: the thread finishes, nothing waits on it
            loading.cancel()
        await server.close()

    app = FastAPI(title="flowers serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    _add_error_handlers(app)

    @app.get(settings.health_route)
    async def health() -> JSONResponse:
        if not server.ready:
            return error_response(503, "loading the model")
        return JSONResponse({"status": "ready", "model": server.service.describe()})

    @app.post(settings.predict_route)
    async def predict(request: Request) -> JSONResponse:
        return await server.predict(request, settings.predict_route)

    _add_tfserving_routes(app, server)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": "..."}: unknown routes, client mistakes (4xx), server faults (500)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) \
            else str(exc.detail)
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error answering %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def _add_tfserving_routes(app: FastAPI, server: Server) -> None:
    """TF Serving's REST routes: predict (with or without a version) and the model status."""
    target = server.settings.target

    @app.post("/v1/models/{name}:predict")
    async def tfserving_predict(name: str, request: Request) -> JSONResponse:
        server.check_model(name)
        return await server.predict(request, "/v1/models/{name}:predict")

    @app.post("/v1/models/{name}/versions/{version}:predict")
    async def tfserving_version_predict(name: str, version: str, request: Request) -> JSONResponse:
        server.check_model(name, version)
        return await server.predict(request, "/v1/models/{name}/versions/{version}:predict")

    @app.get("/v1/models/{name}")
    async def tfserving_status(name: str) -> dict[str, Any]:
        server.check_model(name)
        return {"model_version_status": [{
            "version": str(target.version),
            "state": "AVAILABLE" if server.ready else "LOADING",
            "status": {"error_code": "OK", "error_message": ""}}]}


def app_from_env() -> FastAPI:
    """uvicorn's app factory in each worker process: settings from $FLOWERS_SERVE_SETTINGS."""
    from flowers import backend

    settings = ServeSettings.from_json(os.environ[SETTINGS_ENV])
    backend.select(settings.target.backend)  # before runtimes import keras
    backend.hide_gpus_from_tensorflow(settings.target.backend)
    return create_app(settings)
