"""Vertex AI's custom-container contract: the health and predict routes, Google's error shape.

Routes follow $AIP_HEALTH_ROUTE and $AIP_PREDICT_ROUTE (settings.py): GET health answers 200 once
the model is loaded and warmed up, 503 before; POST predict takes {"instances": [...],
"parameters": {"top_k": K}} (payload.py) and answers {"predictions": [{"top": [...]}, ...]}.
Errors on these routes have Google's shape, {"error": {"code", "message", "status"}}, which Google's
client libraries (google-api-core) read; the TF Serving routes keep TF Serving's {"error": "..."}.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from flowers.export import runtimes
from flowers.serve import payload
from flowers.serve.core import Server, Work

# google.rpc.Code names of the HTTP statuses this server answers (google/rpc/code.proto).
GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "NOT_FOUND", 409: "ABORTED", 413: "OUT_OF_RANGE", 415: "INVALID_ARGUMENT",
                 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def google_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """{"error": {"code": 400, "message": "...", "status": "INVALID_ARGUMENT"}}."""
    name = GOOGLE_STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
    return JSONResponse({"error": {"code": status, "message": message, "status": name}},
                        status_code=status, headers=headers)


def instances_work(server: Server, body: bytes) -> Work:
    """The {"instances": [...]} body of Vertex AI and TF Serving as Work for Server.infer."""
    parsed = payload.parse_body(body, server.settings.max_instances)
    service = server.service

    def answer(probabilities) -> Response:
        return JSONResponse({"predictions": [
            {"top": runtimes.top_classes(row, service.class_names, parsed.top_k)}
            for row in probabilities]})

    return Work(decode=lambda: payload.decode_instances(parsed.instances, service.image_size),
                answer=answer)


def router(server: Server) -> APIRouter:
    settings = server.settings
    routes = APIRouter()

    @routes.get(settings.health_route)
    async def health() -> Response:
        if not server.ready:
            return google_error(503, "loading the model")
        return JSONResponse({"status": "ready", "model": server.service.describe()})

    @routes.post(settings.predict_route)
    async def predict(request: Request) -> Response:
        return await server.infer(request, settings.predict_route,
                                  lambda body, _: instances_work(server, body), google_error)

    return routes
