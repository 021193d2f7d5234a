"""TF Serving's REST API, which KServe's v1 protocol adopted: predict, model status, liveness.

  POST /v1/models/<name>:predict                 {"instances": [...]} as on the Vertex AI route
  POST /v1/models/<name>/versions/<v>:predict
  GET  /v1/models/<name>                         TF Serving's model_version_status, and KServe v1's
                                                 "name" and "ready"
  GET  /                                         KServe v1 liveness: {"status": "alive"}
<name> is the experiment. Errors are TF Serving's {"error": "..."}.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from flowers.serve.core import Server, add_inference_routes
from flowers.serve.vertex import instances_work


def router(server: Server) -> APIRouter:
    target = server.settings.target
    routes = APIRouter()

    def parse(body: bytes, _: Request):
        return instances_work(server, body)

    @routes.get("/")
    async def live() -> dict[str, str]:
        return {"status": "alive"}

    add_inference_routes(routes, server, "/v1/models/{name}", ":predict", parse)

    @routes.get("/v1/models/{name}")
    async def status(name: str) -> dict[str, Any]:
        server.check_model(name)
        return {"name": name, "ready": server.ready, "model_version_status": [{
            "version": str(target.version),
            "state": "AVAILABLE" if server.ready else "LOADING",
            "status": {"error_code": "OK", "error_message": ""}}]}

    return routes
