"""The FastAPI app: every protocol's router over one Server (core.py), errors as JSON, metrics.

Routes (each protocol's module says what it takes and answers):
  vertex.py     GET $AIP_HEALTH_ROUTE (/health), POST $AIP_PREDICT_ROUTE (/predict): Vertex AI
  tfserving.py  POST /v1/models/<name>[/versions/<v>]:predict, GET /v1/models/<name>, GET /:
                TF Serving's REST API and KServe's v1 protocol
  oip.py        /v2/...: the Open Inference Protocol (KServe v2, Triton)
  GET /metrics  Prometheus: requests by route and status, latency, batch sizes, model-call time,
                queue depth, held requests
Every client mistake is a 4xx with a JSON error; the lifespan loads the model in the background
(so health routes can answer 503 meanwhile), and on shutdown -- after uvicorn has answered every
open request -- stops the batcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from flowers.serve import oip, tfserving, vertex
from flowers.serve.core import Server, error_response
from flowers.serve.payload import ClientError
from flowers.serve.settings import SETTINGS_ENV, ServeSettings

log = logging.getLogger("uvicorn.error")


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

    for protocol in (vertex, tfserving, oip):
        app.include_router(protocol.router(server))

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


def app_from_env() -> FastAPI:
    """uvicorn's app factory in each worker process: settings from $FLOWERS_SERVE_SETTINGS."""
    from flowers import backend

    settings = ServeSettings.from_json(os.environ[SETTINGS_ENV])
    backend.select(settings.target.backend)  # before runtimes import keras
    backend.hide_gpus_from_tensorflow(settings.target.backend)
    return create_app(settings)
