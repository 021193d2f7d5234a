"""flowers serve / loadtest: the server as a real subprocess on a free loopback port, bounded loops.

Every server is started by `served()`, which waits for /health with a deadline and stops the
process by pid (SIGTERM, then SIGKILL) however the test ends. The smoke model (32 px) is exported to
ONNX once per module; figures are never timed here (`flowers bench-serve` measures them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import flowers, learnable_photos, one_line_error, python, served
from flowers.serve.bench import free_port, stop

START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def version(served_version) -> Path:
    return served_version


@pytest.fixture(scope="module")
def photos(learnable_set) -> list[Path]:
    return learnable_photos(learnable_set)


@pytest.fixture(scope="module")
def server(version, tmp_path_factory) -> Iterator[str]:
    """One server for the request tests: batches up to 16, small limits to test them."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with served(str(version), "--max-batch", "16", "--max-wait-ms", "20", "--max-instances", "8",
                "--max-body-mb", "1", log=log) as (url, _):
        yield url


def b64(path: Path) -> dict[str, str]:
    return {"b64": base64.b64encode(path.read_bytes()).decode()}


def post(url: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=content, timeout=REQUEST_TIMEOUT_S,
                      headers={"Content-Type": "application/json"}, **kwargs)


def error_message(response: httpx.Response) -> str:
    """The error's message: Google's {"error": {"code", "message", "status"}} on the Vertex AI routes,
    TF Serving's and the Open Inference Protocol's {"error": "..."} elsewhere."""
    error = response.json()["error"]
    if isinstance(error, dict):
        assert error["code"] == response.status_code and error["status"].isupper(), error
        return error["message"]
    return error


def probabilities(prediction: dict) -> dict[str, float]:
    return {entry["class"]: entry["probability"] for entry in prediction["top"]}


def metric_samples(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT_S).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_served_predictions_equal_flowers_predict_on_both_routes(server, version, photos):
    expected = json.loads(flowers("predict", str(version / "model.onnx"), *map(str, photos), "--json").stdout)
    body = {"instances": [b64(p) for p in photos], "parameters": {"top_k": 4}}
    for route in ("/predict", "/v1/models/smoke:predict", "/v1/models/smoke/versions/1:predict"):
        response = post(f"{server}{route}", body)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == len(photos)
        for got, want in zip(predictions, expected, strict=True):
            assert got["top"][0]["class"] == want["top"][0]["class"], route
            got_p, want_p = probabilities(got), probabilities(want)
            assert got_p.keys() == want_p.keys()
            assert max(abs(got_p[c] - want_p[c]) for c in got_p) <= 1e-4, route

    # A pixel array of the decoded photo is resized the same way: the same answer.
    pixels = np.asarray(Image.open(photos[0]).convert("RGB")).tolist()
    response = post(f"{server}/predict", {"instances": [pixels], "parameters": {"top_k": 4}})
    assert response.status_code == 200, response.text
    got_p, want_p = probabilities(response.json()["predictions"][0]), probabilities(expected[0])
    assert max(abs(got_p[c] - want_p[c]) for c in got_p) <= 1e-4

    default_top = post(f"{server}/predict", {"instances": [b64(photos[0])]}).json()["predictions"][0]
    assert len(default_top["top"]) == 4  # top_k 5 by default, at most the 4 classes

    status = httpx.get(f"{server}/v1/models/smoke", timeout=REQUEST_TIMEOUT_S).json()
    assert status["model_version_status"][0] == {"version": "1", "state": "AVAILABLE",
                                                 "status": {"error_code": "OK", "error_message": ""}}


def test_open_inference_protocol_answers_as_the_v1_routes_do(server, photos):
    """JSON and binary tensors (Triton's extension, by hand), classification, metadata, errors."""
    counted = "flowers_serve_requests_total{route=/v2/models/{name}/infer,status=200}"
    before = metric_samples(server).get(counted, 0)
    v1 = post(f"{server}/predict", {"instances": [b64(p) for p in photos], "parameters": {"top_k": 4}})
    want = [probabilities(p) for p in v1.json()["predictions"]]
    metadata = httpx.get(f"{server}/v2/models/smoke", timeout=REQUEST_TIMEOUT_S).json()
    names = metadata["parameters"]["class_names"]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(names)]}]

    answer = post(f"{server}{V2}", {"id": "r1", "inputs": [photos_tensor([b64(p)["b64"] for p in photos])]})
    assert answer.status_code == 200, answer.text
    output = answer.json()["outputs"][0]
    assert answer.json()["id"] == "r1" and output["shape"] == [len(photos), len(names)]
    got = np.asarray(output["data"]).reshape(output["shape"])
    for row, expected in zip(got, want, strict=True):
        assert max(abs(row[names.index(c)] - p) for c, p in expected.items()) <= 1e-6

    # Binary in and out: the JSON header, then each file as a 4-byte little-endian length and its bytes.
    raw = b"".join(len(p.read_bytes()).to_bytes(4, "little") + p.read_bytes() for p in photos)
    header = json.dumps({"inputs": [{"name": "photos", "datatype": "BYTES", "shape": [len(photos)],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    answer = httpx.post(f"{server}{V2}", content=header + raw, timeout=REQUEST_TIMEOUT_S,
                        headers={"Inference-Header-Content-Length": str(len(header))})
    assert answer.status_code == 200, answer.text
    length = int(answer.headers["Inference-Header-Content-Length"])
    size = json.loads(answer.content[:length])["outputs"][0]["parameters"]["binary_data_size"]
    assert size == len(answer.content) - length
    assert np.array_equal(np.frombuffer(answer.content[length:], "<f4").reshape(got.shape),
                          got.astype(np.float32))

    ranked = post(f"{server}{V2}", {"inputs": [photos_tensor([b64(photos[0])["b64"]])], "outputs": [
        {"name": "probabilities", "parameters": {"classification": 2}}]}).json()["outputs"][0]
    best = np.argsort(-got[0])[:2]
    assert ranked["shape"] == [1, 2] and [label.split(":")[1:] for label in ranked["data"]] == [
        [str(i), names[i]] for i in best]

    assert metric_samples(server)[counted] - before == 3  # the same metrics as every route

    for headers, content, message in (
            ({"Inference-Header-Content-Length": "999999"}, header + raw, "not a byte count"),
            ({"Inference-Header-Content-Length": str(len(header))}, header + raw[:-1], "binary_data_size"),
            ({"Content-Encoding": "gzip"}, header, "Content-Encoding gzip is not supported")):
        bad = httpx.post(f"{server}{V2}", content=content, headers=headers, timeout=REQUEST_TIMEOUT_S)
        assert bad.status_code in (400, 415) and message in bad.json()["error"], bad.text


def test_concurrent_requests_are_batched(server, photos):
    before = metric_samples(server)
    body = json.dumps({"instances": [b64(photos[0])]}).encode()

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
            responses = await asyncio.gather(*(client.post(f"{server}/predict", content=body)
                                               for _ in range(64)))
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 64
    after = metric_samples(server)
    calls = after["flowers_serve_batch_size_count"] - before["flowers_serve_batch_size_count"]
    images = after["flowers_serve_batch_size_sum"] - before["flowers_serve_batch_size_sum"]
    bucket_1 = "flowers_serve_batch_size_bucket{le=1.0}"
    single = after[bucket_1] - before[bucket_1]
    assert images == 64
    assert calls < 64 and single < calls, (calls, single)  # some model calls ran batches > 1
    ok = "flowers_serve_requests_total{route=/predict,status=200}"
    assert after[ok] - before[ok] == 64
    assert after["flowers_serve_queue_depth"] == 0 and after["flowers_serve_ready"] == 1


NOT_AN_IMAGE = base64.b64encode(b"just some text, not a JPEG").decode()
V2 = "/v2/models/smoke/infer"


def photos_tensor(data: list[str]) -> dict:
    """An Open Inference Protocol input of encoded photos, base64 in JSON."""
    return {"name": "photos", "datatype": "BYTES", "shape": [len(data)], "data": data}


@pytest.mark.parametrize(("route", "body", "status", "message"), [
    ("/predict", b"{not json", 400, "the body is not JSON"),
    ("/predict", b"[1, 2]", 400, "must be a JSON object"),
    ("/predict", {"images": []}, 400, "unknown key 'images'"),
    ("/predict", {"parameters": {"top_k": 1}}, 400, 'missing "instances"'),
    ("/predict", {"instances": []}, 400, "non-empty list"),
    ("/predict", {"instances": [{"b64": "%%% not base64 %%%"}]}, 400, "instance 0: bad base64"),
    ("/predict", {"instances": [{"b64": NOT_AN_IMAGE}]}, 400,
     "instance 0: cannot read the image: not an image"),
    ("/predict", {"instances": [[[1, 2], [3, 4]]]}, 400, "instance 0: pixel array of shape [2, 2]"),
    ("/predict", {"instances": [[[[300, 0, 0]]]]}, 400, "within 0..255"),
    ("/predict", {"instances": [[[0, 0, 0], [1, 1]]]}, 400, "not a rectangular array"),
    ("/predict", {"instances": ["daisy.jpg"]}, 400, 'instance 0: an instance is {"b64"'),
    ("/predict", {"instances": [[[[0, 0, 0]]]] * 9}, 400, "9 instances; this server takes at most 8"),
    ("/predict", {"instances": [[[[0, 0, 0]]]], "parameters": {"top_k": 0}}, 400, "top_k must be"),
    ("/predict", {"instances": [[[[0, 0, 0]]]], "parameters": {"k": 1}}, 400, "unknown parameter 'k'"),
    ("/predict", {"instances": [{"b64": "A" * 1_100_000}]}, 413, "the limit is 1000000"),
    ("/v1/models/roses:predict", {"instances": [[[[0, 0, 0]]]]}, 404, "model 'roses' not found"),
    ("/v1/models/smoke/versions/7:predict", {"instances": [[[[0, 0, 0]]]]}, 404, "no version '7'"),
    ("/nowhere", {"instances": []}, 404, "no route POST /nowhere"),
    (V2, b"{not json", 400, "the request header is not JSON"),
    (V2, {"inputs": []}, 400, '"inputs" must hold one input'),
    (V2, {"inputs": [photos_tensor(["%%%"])]}, 400, "photos[0]: bad base64"),
    (V2, {"inputs": [photos_tensor([NOT_AN_IMAGE])]}, 400, "photos[0]: cannot read the image"),
    (V2, {"inputs": [photos_tensor([NOT_AN_IMAGE] * 9)]}, 400, "9 items; this server takes 1 to 8"),
    (V2, {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": [0, 0, 300]}]},
     400, "images[0]: pixel values must be within 0..255"),
    (V2, {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 11}]},
     400, "11 values; shape [1, 2, 2, 3] needs 12"),
    (V2, {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0] * 4}]},
     400, "expected [N, H, W, 3]"),
    (V2, {"inputs": [photos_tensor([NOT_AN_IMAGE])], "outputs": [{"name": "logits"}]}, 400,
     '"outputs" may name one output, "probabilities"'),
    (V2, {"inputs": [photos_tensor([NOT_AN_IMAGE])], "parameters": {"priority": 1}}, 400,
     "unknown parameter 'priority'; known: binary_data_output"),
    ("/v2/models/roses/infer", {"inputs": []}, 404, "model 'roses' not found"),
])
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(server, photos, route, body,
                                                                      status, message):
    response = post(f"{server}{route}", body)
    assert response.status_code == status, response.text
    assert message in error_message(response)
    # Google's error shape on the Vertex AI route only; TF Serving's and v2's {"error": "..."} elsewhere.
    assert isinstance(response.json()["error"], dict) == (route == "/predict"), response.text
    assert post(f"{server}/predict", {"instances": [b64(photos[0])]}).status_code == 200


def test_wrong_method_and_chunked_oversized_body(server):
    response = httpx.get(f"{server}/predict", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 405 and "no route GET /predict" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # no content-length: the limit is enforced while reading
        yield b'{"instances": [{"b64": "'
        for _ in range(30):
            yield b"A" * 40_000
        yield b'"}]}'

    response = httpx.post(f"{server}/predict", content=chunks(), timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 413 and "over the limit" in error_message(response)


def test_health_is_ready_only_after_the_warm_up(version, photos, tmp_path):
    # --max-batch 512 makes the warm-up run two batches of 512 images: a loading phase to observe.
    log = tmp_path / "server.log"
    with served(str(version), "--max-batch", "512", log=log, wait=False) as (url, process):
        seen, loading_predict, loading_v2 = [], None, None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                response = httpx.get(f"{url}/health", timeout=5)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.05)
                continue
            seen.append(response.status_code)
            if response.status_code == 200:
                break
            assert response.status_code == 503 and response.json() == {"error": {
                "code": 503, "message": "loading the model", "status": "UNAVAILABLE"}}
            if loading_v2 is None:  # every protocol says the same while the model loads
                routes = ("/v2/health/ready", "/v2/models/smoke/ready", "/v1/models/smoke", "/")
                loading_v2 = [httpx.get(f"{url}{route}", timeout=5) for route in routes]
            if loading_predict is None:
                loading_predict = post(f"{url}/predict", {"instances": [b64(photos[0])]})
            time.sleep(0.05)
        assert seen and seen[-1] == 200, (seen, log.read_text()[-2000:])
        assert 503 in seen, seen
        assert loading_predict.status_code == 503 and "still loading" in error_message(loading_predict)
        v2_ready, v2_model_ready, v1_status, live = loading_v2
        assert v2_ready.status_code == v2_model_ready.status_code == 503, v2_ready.text
        assert "still loading" in v2_ready.json()["error"]
        assert v1_status.json()["ready"] is False and v1_status.json()["model_version_status"][0][
            "state"] == "LOADING"
        assert live.json() == {"status": "alive"}  # alive while loading: liveness is not readiness
        health = httpx.get(f"{url}/health", timeout=5).json()
        assert health["status"] == "ready" and health["model"]["format"] == "onnx"
        assert health["model"]["warmup_s"] > 0
        assert post(f"{url}/predict", {"instances": [b64(photos[0])]}).status_code == 200


def test_vertex_ai_variables_set_the_port_and_routes(version, photos, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "AIP_HTTP_PORT": str(port),
           "AIP_HEALTH_ROUTE": "/v1/endpoints/e/deployedModels/m", "AIP_PREDICT_ROUTE": "/infer"}
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as log_file:  # --host: tests listen on loopback only
        process = subprocess.Popen([sys.executable, "-m", "flowers.cli", "serve", str(version), "--host",
                                    "127.0.0.1"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, status = time.monotonic() + START_TIMEOUT_S, None
        while status != 200 and time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                status = httpx.get(f"{url}/v1/endpoints/e/deployedModels/m", timeout=5).status_code
            time.sleep(0.1)
        assert status == 200, (tmp_path / "server.log").read_text()[-2000:]
        assert post(f"{url}/infer", {"instances": [b64(photos[0])]}).status_code == 200
        assert post(f"{url}/predict", {"instances": [b64(photos[0])]}).status_code == 404
        assert httpx.get(f"{url}/health", timeout=5).status_code == 404
    finally:
        stop(process)


def test_overload_gets_503_with_retry_after_never_a_hang(version, photos, tmp_path):
    log = tmp_path / "server.log"
    with served(str(version), "--max-queue", "2", "--max-batch", "1", log=log) as (url, _):
        body = json.dumps({"instances": [b64(photos[0])] * 4}).encode()

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S,
                                         limits=httpx.Limits(max_connections=24)) as client:
                return await asyncio.gather(*(client.post(f"{url}/predict", content=body) for _ in range(24)))

        responses = asyncio.run(asyncio.wait_for(burst(), REQUEST_TIMEOUT_S))
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 503}, statuses
        refused = [r for r in responses if r.status_code == 503]
        assert all(r.headers["Retry-After"] == "1" and "--max-queue" in error_message(r) for r in refused)
        assert post(f"{url}/predict", {"instances": [b64(photos[0])]}).status_code == 200
        assert metric_samples(url)["flowers_serve_requests_total{route=/predict,status=503}"] == len(refused)


def test_sigterm_answers_every_accepted_request_and_exits_0(version, photos, tmp_path):
    log = tmp_path / "server.log"
    with served(str(version), "--max-batch", "1", log=log) as (url, process):
        body = json.dumps({"instances": [b64(photos[0])] * 4}).encode()
        requests = 24

        def one(_: int) -> int | str:
            try:
                return post(f"{url}/predict", body).status_code
            except httpx.TransportError as exc:
                return type(exc).__name__

        with ThreadPoolExecutor(requests) as pool:
            futures = [pool.submit(one, i) for i in range(requests)]
            # SIGTERM once the server holds every request not yet answered (each one accepted).
            deadline = time.monotonic() + REQUEST_TIMEOUT_S
            while time.monotonic() < deadline:
                held = metric_samples(url)["flowers_serve_requests_held"]
                answered = sum(f.done() for f in futures)
                if held + answered >= requests and held > 0:
                    break
                time.sleep(0.01)
            assert held > 0, "the burst finished before SIGTERM could be sent"
            process.send_signal(signal.SIGTERM)
            results = [f.result(timeout=REQUEST_TIMEOUT_S) for f in futures]
        assert results == [200] * requests, results
        assert process.wait(REQUEST_TIMEOUT_S) == 0, log.read_text()[-2000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


@pytest.mark.parametrize(("protocol", "route"), [
    ("v1", "/predict"), ("v2", V2), ("v2-binary", V2)])  # v2: the model named by GET /v2/models
def test_loadtest_writes_well_formed_figures(server, learnable_set, tmp_path, protocol, route):
    out = tmp_path / "loadtest.json"
    result = flowers("loadtest", server, "--concurrency", "1,4", "--requests", "12", "--duration-s", "60",
                     "--images", str(learnable_set / "test"), "--out", str(out), "--protocol", protocol,
                     timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["concurrency", "requests", "errors", "requests/s",
                                                     "images/s", "p50", "ms", "p95", "ms", "p99", "ms"]
    figures = json.loads(out.read_text())
    assert figures["url"] == f"{server}{route}" and figures["photos"] == 64
    assert "closed loop" in figures["method"]
    assert [level["concurrency"] for level in figures["levels"]] == [1, 4]
    for level in figures["levels"]:
        assert level["requests"] == level["ok"] == 12 and level["errors"] == 0, level
        assert level["requests_per_s"] > 0 and level["images_per_s"] > 0
        assert 0 < level["latency_p50_ms"] <= level["latency_p95_ms"] <= level["latency_p99_ms"]


@pytest.mark.parametrize(("args", "message"), [
    (["http://10.20.30.40:8080"], "10.20.30.40 is not this machine"),
    (["ftp://127.0.0.1/"], "not an http:// or https:// URL"),
    (["http://127.0.0.1:9", "--concurrency", "0"], "--concurrency levels must be 1..1024"),
    (["http://127.0.0.1:9", "--images", "/nonexistent"], "images folder not found"),
    (["http://127.0.0.1:9", "--protocol", "v3"], "'v3' is not one of 'v1', 'v2', 'v2-binary'"),
    (["http://127.0.0.1:9", "--protocol", "v2"], "cannot read the model name from http://127.0.0.1:9/v2/models"),
])
def test_loadtest_rejects(args, message):
    assert message in one_line_error(flowers("loadtest", *args))


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "export not found:"),
    ("unknown runtime", "unknown runtime 'pytorch'; choose one of keras, savedmodel, onnx, tflite"),
    ("absent format", "has no tflite export (it has onnx)"),
    ("backend for onnx", "--backend applies to the keras runtime only"),
    ("port in use", "is in use; choose another with --port"),
    ("bad option", "--max-batch must be at least 1, not 0"),
])
def test_serve_startup_mistakes_are_one_line(version, busy_port, case, message):
    args = {"missing": [str(version.parent / "v99")],
            "unknown runtime": [str(version), "--runtime", "pytorch"],
            "absent format": [str(version), "--runtime", "tflite"],
            "backend for onnx": [str(version), "--backend", "jax"],
            "port in use": [str(version), "--host", "127.0.0.1", "--port", str(busy_port)],
            "bad option": [str(version), "--max-batch", "0"]}[case]
    assert message in one_line_error(flowers("serve", *args, timeout=120))


def test_serve_without_the_runtime_names_the_extra(version):
    driver = f"""
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "onnxruntime" else real(name, *a)
        from flowers.cli import main
        main(["serve", "{version}", "--port", "1"])
    """
    error = one_line_error(python(driver, timeout=120))
    assert "serving onnx models needs onnxruntime, which is not installed" in error


def test_an_unreadable_model_stops_the_server_with_its_reason(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    port = free_port()
    result = flowers("serve", str(broken), "--host", "127.0.0.1", "--port", str(port), timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {broken}: not a readable onnx model")
