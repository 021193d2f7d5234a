"""The Open Inference Protocol (KServe v2, Triton, Seldon MLServer) over REST.

  GET  /v2/health/live                      {"live": true}
  GET  /v2/health/ready                     {"ready": true}; 503 while the model loads
  GET  /v2                                  server metadata: name, version, extensions
  GET  /v2/models                           {"models": [<name>]} (KServe's model list)
  GET  /v2/models/<name>[/versions/<v>]     model metadata: inputs, outputs, class names
  GET  /v2/models/<name>[/versions/<v>]/ready    {"name", "ready": true}; 503 while loading
  POST /v2/models/<name>[/versions/<v>]/infer    tensors in, probabilities out (oip_codec.py)
Inference goes through the same batcher, limits and metrics as the v1 routes; errors are the
protocol's {"error": "..."} with a 4xx status (5xx for the server's own faults).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

import flowers
from flowers.serve import oip_codec
from flowers.serve.core import Server, Work, add_inference_routes

EXTENSIONS = ["binary_tensor_data", "classification"]


def router(server: Server) -> APIRouter:
    routes = APIRouter(prefix="/v2")
    target = server.settings.target

    @routes.get("/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @routes.get("/health/ready")
    async def server_ready() -> dict[str, bool]:
        server.require_ready()
        return {"ready": True}

    @routes.get("")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "flowers", "version": flowers.__version__, "extensions": EXTENSIONS}

    @routes.get("/models")
    async def models() -> dict[str, list[str]]:
        return {"models": [target.name]}

    _add_model_routes(routes, server)
    return routes


def _add_model_routes(routes: APIRouter, server: Server) -> None:
    """Metadata, readiness and inference of the model, with or without its version."""
    service, target = server.service, server.settings.target

    def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        server.check_model(name, version)
        server.require_ready()
        return oip_codec.model_metadata(target.name, str(target.version), target.format,
                                        service.image_size, service.class_names)

    def ready(name: str, version: str | None = None) -> dict[str, Any]:
        server.check_model(name, version)
        server.require_ready()
        return {"name": target.name, "ready": True}

    def parse(body: bytes, request: Request) -> Work:
        parsed = oip_codec.parse_infer(body, request.headers.get(oip_codec.HEADER_LENGTH),
                                       target.name, server.settings.max_instances)

        def answer(probabilities) -> Response:
            content, headers = oip_codec.encode_response(parsed, probabilities, service.class_names,
                                                         target.name, str(target.version))
            return Response(content, headers=headers)

        return Work(decode=lambda: parsed.decode(service.image_size), answer=answer)

    routes.add_api_route("/models/{name}", metadata, methods=["GET"])
    routes.add_api_route("/models/{name}/versions/{version}", metadata, methods=["GET"])
    routes.add_api_route("/models/{name}/ready", ready, methods=["GET"])
    routes.add_api_route("/models/{name}/versions/{version}/ready", ready, methods=["GET"])

    add_inference_routes(routes, server, "/models/{name}", "/infer", parse, label_prefix="/v2")
