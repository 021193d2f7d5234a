"""The clients people use against a real `flowers serve`: kserve's InferenceRESTClient (protocol v1
and v2), tritonclient's HTTP client (binary tensors on and off), and the Vertex AI SDK's
PredictionServiceClient over its REST transport with anonymous credentials.

The clients run in their own virtualenv (pyproject's serve-clients extra; `serve_clients` in
conftest.py) through tests/serve_clients.py, against one server on 127.0.0.1 whose Vertex AI predict
route is the SDK's own path. Each: its health calls, one inference on real photos (flowers12 when
present, else the generated set) whose probabilities equal `flowers predict`'s within 1e-5, and one
bad request surfaced as the client's own error type, never a crash inside the client.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import FLOWERS12, flowers, learnable_photos, served

ENDPOINT = "projects/flowers/locations/local/endpoints/1"
CLIENTS_TIMEOUT_S = 300
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def photos(learnable_set) -> list:
    real = sorted((FLOWERS12 / "test").glob("*/*.jpg"))[:2] if FLOWERS12.is_dir() else []
    return real or learnable_photos(learnable_set, 2)


@pytest.fixture(scope="module")
def answers(served_version, serve_clients, photos, tmp_path_factory) -> dict:
    """What every client got from one server (tests/serve_clients.py's JSON)."""
    log = tmp_path_factory.mktemp("serve-clients") / "server.log"
    # --max-body-mb 8: tritonclient sends a whole decoded photo as UINT8 pixels.
    with served(str(served_version), "--max-body-mb", "8", log=log,
                env={"AIP_PREDICT_ROUTE": f"/v1/{ENDPOINT}:predict"}) as (url, _):
        request = {"url": url, "model": "smoke", "photos": [str(p) for p in photos], "classes": 1000,
                   "vertex_endpoint": ENDPOINT, "clients": ["kserve", "triton", "vertex"]}
        done = subprocess.run([str(serve_clients), str(Path(__file__).parent / "serve_clients.py"),
                               json.dumps(request)], capture_output=True, text=True,
                              timeout=CLIENTS_TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-3000:]
        answers = json.loads(done.stdout)
        answers["vertex_health"] = httpx.get(f"{url}/health", timeout=30).json()
    return answers


@pytest.fixture(scope="module")
def expected(served_version, photos) -> list[dict[str, float]]:
    """`flowers predict`'s probabilities of every class, per photo."""
    result = flowers("predict", str(served_version / "model.onnx"), *map(str, photos), "--top", "1000",
                     "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return [{entry["class"]: entry["probability"] for entry in p["top"]} for p in json.loads(result.stdout)]


def by_class(rows: list[list[float]], names: list[str]) -> list[dict[str, float]]:
    return [dict(zip(names, row, strict=True)) for row in rows]


def top_lists(predictions: list[dict]) -> list[dict[str, float]]:
    return [{entry["class"]: entry["probability"] for entry in p["top"]} for p in predictions]


def assert_close(got: list[dict[str, float]], want: list[dict[str, float]], tolerance: float = TOLERANCE):
    assert len(got) == len(want)
    for got_row, want_row in zip(got, want, strict=True):
        assert got_row.keys() == want_row.keys()
        assert max(abs(got_row[c] - want_row[c]) for c in want_row) <= tolerance, (got_row, want_row)


def test_kserve_v1(answers, expected):
    v1 = answers["kserve_v1"]
    assert v1["live"] is True and v1["ready"] is True
    assert_close(top_lists(v1["predictions"]), expected)
    for error, status, message in ((v1["unknown_model"], "404", "model 'roses' not found"),
                                   (v1["bad_request"], "400", "instance 0: bad base64")):
        assert error["type"] == "httpx.HTTPStatusError", error
        assert status in error["message"] and message in error["message"]


def test_kserve_v2(answers, expected):
    v2 = answers["kserve_v2"]
    names = answers["triton"]["metadata"]["parameters"]["class_names"]  # the probabilities' order
    assert (v2["live"], v2["ready"], v2["model_ready"], v2["id"]) == (True, True, True, "kserve-1")
    assert_close(by_class(v2["probabilities"], names), expected)
    assert v2["bad_request"]["type"] == "httpx.HTTPStatusError"
    assert "400" in v2["bad_request"]["message"] and "unknown input 'pixels'" in v2["bad_request"]["message"]


def test_tritonclient_binary_and_json(answers, expected):
    triton = answers["triton"]
    names = triton["metadata"]["parameters"]["class_names"]
    assert (triton["live"], triton["ready"], triton["model_ready"]) == (True, True, True)
    assert {i["name"]: i["datatype"] for i in triton["metadata"]["inputs"]} == {"photos": "BYTES",
                                                                               "images": "UINT8"}
    assert_close(by_class(triton["binary"], names), expected)
    assert_close(by_class(triton["json"], names), expected)
    # The first photo's pixels as decoded by the clients' own Pillow, resized by the server.
    assert_close(by_class(triton["images"], names), expected[:1])
    for labels, want in zip(triton["classification"], expected, strict=True):
        best = sorted(want, key=want.get, reverse=True)[:2]
        assert [label.split(":", 2)[2] for label in labels] == best
        scores = [float(label.split(":")[0]) for label in labels]  # printed with 6 decimals
        assert all(abs(score - want[c]) <= 1e-6 for score, c in zip(scores, best, strict=True))
    for error, status, message in ((triton["bad_request"], "[400]", 'input "photos" is BYTES'),
                                   (triton["unknown_model"], "[404]", "model 'roses' not found")):
        assert error["type"] == "tritonclient.utils.InferenceServerException", error
        assert error["message"].startswith(status) and message in error["message"]


def test_vertex_ai_sdk_rest_transport(answers, expected):
    vertex = answers["vertex"]
    assert answers["vertex_health"]["status"] == "ready"  # the SDK has no health call: the route's
    assert_close(top_lists(vertex["predictions"]), expected)  # top_k 1000.0, a Struct double
    error = vertex["bad_request"]
    assert error["type"] == "google.api_core.exceptions.BadRequest", error
    assert error["message"].startswith("400 POST") and "instance 0: bad base64" in error["message"]
