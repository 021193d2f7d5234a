"""The real clients people use against a running `flowers serve`: run by tests/test_serve_clients.py
in the serve-clients virtualenv (pyproject's `serve-clients` extra, apart from the server's own
packages), never imported by the suite.

    python serve_clients.py '{"url": ..., "model": ..., "photos": [...], "vertex_endpoint": ...}'

Prints one JSON object: for each client, what its health calls returned, the probabilities its
infer calls got back ([image][class], the served class order), and how it surfaced a bad request
(exception type and message). A client that crashes instead of raising its own error type shows up
as a wrong type here, which the test reports.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import numpy as np
from PIL import Image


def failure(call) -> dict[str, str]:
    """The exception a call raised: {"type": module.Class, "message"}; {} when none was raised."""
    try:
        call()
    except Exception as exc:  # the point: which type each client raises for a 4xx
        return {"type": f"{type(exc).__module__}.{type(exc).__name__}", "message": str(exc)}
    return {}


async def async_failure(call) -> dict[str, str]:
    try:
        await call()
    except Exception as exc:
        return {"type": f"{type(exc).__module__}.{type(exc).__name__}", "message": str(exc)}
    return {}


def kserve_clients(args: dict) -> dict:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    url, model, encoded = args["url"], args["model"], args["encoded"]

    async def v1() -> dict:
        client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=120, retries=0))
        try:
            body = {"instances": [{"b64": base64.b64encode(e).decode()} for e in encoded],
                    "parameters": {"top_k": args["classes"]}}
            answer = await client.infer(url, body, model_name=model)
            return {"live": await client.is_server_live(url),
                    "ready": await client.is_model_ready(url, model),
                    "predictions": answer["predictions"],
                    "unknown_model": await async_failure(lambda: client.is_model_ready(url, "roses")),
                    "bad_request": await async_failure(lambda: client.infer(
                        url, {"instances": [{"b64": "%%% not base64"}]}, model_name=model))}
        finally:
            await client.close()

    async def v2() -> dict:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=0))
        try:
            photos = InferInput("photos", [len(encoded)], "BYTES")
            photos.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=True)
            answer = await client.infer(url, InferRequest(model, [photos], request_id="kserve-1"),
                                        model_name=model)
            wrong = InferInput("pixels", [1, 2, 2, 3], "UINT8", data=[0] * 12)
            return {"live": await client.is_server_live(url),
                    "ready": await client.is_server_ready(url),
                    "model_ready": await client.is_model_ready(url, model),
                    "id": answer.id, "probabilities": answer.outputs[0].as_numpy().tolist(),
                    "bad_request": await async_failure(
                        lambda: client.infer(url, InferRequest(model, [wrong]), model_name=model))}
        finally:
            await client.close()

    return {"kserve_v1": asyncio.run(v1()), "kserve_v2": asyncio.run(v2())}


def triton_client(args: dict) -> dict:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(args["url"].removeprefix("http://"), network_timeout=120)
    model, encoded = args["model"], args["encoded"]

    def photos(binary: bool) -> triton.InferInput:
        tensor = triton.InferInput("photos", [len(encoded)], "BYTES")
        items = encoded if binary else [base64.b64encode(e) for e in encoded]
        tensor.set_data_from_numpy(np.array(items, dtype=np.object_), binary_data=binary)
        return tensor

    # The first photo's decoded pixels, whole: the server resizes them as training does.
    pixels = np.asarray(Image.open(args["photos"][0]).convert("RGB"))[np.newaxis]
    images = triton.InferInput("images", list(pixels.shape), "UINT8")
    images.set_data_from_numpy(pixels, binary_data=True)
    wrong = triton.InferInput("photos", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros(1, np.float32), binary_data=False)
    json_output = triton.InferRequestedOutput("probabilities", binary_data=False)
    ranked = triton.InferRequestedOutput("probabilities", binary_data=True, class_count=2)
    try:
        return {"triton": {
            "live": client.is_server_live(), "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(model),
            "metadata": client.get_model_metadata(model),
            # tritonclient's default: binary input, and every output binary when none is named.
            "binary": client.infer(model, [photos(True)]).as_numpy("probabilities").tolist(),
            "json": client.infer(model, [photos(False)], outputs=[json_output])
                          .as_numpy("probabilities").tolist(),
            "images": client.infer(model, [images]).as_numpy("probabilities").tolist(),
            "classification": [[label.decode() for label in row] for row in client.infer(
                model, [photos(True)], outputs=[ranked]).as_numpy("probabilities")],
            "bad_request": failure(lambda: client.infer(model, [wrong])),
            "unknown_model": failure(lambda: client.infer("roses", [photos(True)])),
        }}
    finally:
        client.close()


def vertex_client(args: dict) -> dict:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform_v1 import PredictionServiceClient
    from google.cloud.aiplatform_v1.services.prediction_service.transports import (
        PredictionServiceRestTransport,
    )
    from google.protobuf import json_format, struct_pb2

    transport = PredictionServiceRestTransport(host=args["url"].removeprefix("http://"),
                                               credentials=AnonymousCredentials(), url_scheme="http")
    client = PredictionServiceClient(transport=transport)

    def values(items) -> list:
        return [json_format.ParseDict(item, struct_pb2.Value()) for item in items]

    instances = values({"b64": base64.b64encode(e).decode()} for e in args["encoded"])
    # A Struct's numbers are doubles: top_k reaches the server as 4.0, not 4.
    parameters = json_format.ParseDict({"top_k": args["classes"]}, struct_pb2.Value())
    answer = client.predict(endpoint=args["vertex_endpoint"], instances=instances, parameters=parameters)
    predictions = json_format.MessageToDict(answer._pb)["predictions"]
    return {"vertex": {"predictions": predictions, "bad_request": failure(lambda: client.predict(
        endpoint=args["vertex_endpoint"], instances=values([{"b64": "%%% not base64"}])))}}


CLIENTS = {"kserve": kserve_clients, "triton": triton_client, "vertex": vertex_client}


def main() -> None:
    args = json.loads(sys.argv[1])
    args["encoded"] = [open(path, "rb").read() for path in args["photos"]]
    results = {}
    for name in args["clients"]:
        results.update(CLIENTS[name](args))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
