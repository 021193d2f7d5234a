"""TF.js: runs of every backend converted, verified in node on tfjs' CPU and WASM backends, and the
demo page run in headless Chromium.

The converter's virtualenv and the node packages are made once per machine (conftest's tfjs_tools;
flowers.toolenvs keeps them in the user's cache folder), which needs the package registries the
first time. Without Node.js (or, for the page, Chromium) these tests skip with the reason; under
CI=true they fail instead.
"""

import http.server
import json
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    flowers,
    learnable_photos,
    needs,
    one_line_error,
    python,
    read_json,
    run_dir_of,
)

pytestmark = pytest.mark.slow
TRAINED = ("torch", "jax", "tensorflow")  # tensorflow's run is exported with float16 weights
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def tfjs_exports(tfjs_tools, smoke_runs, tmp_path_factory) -> dict[str, Path]:
    """The torch and jax smoke runs exported to TF.js, the tensorflow one with float16 weights and
    a float32 SavedModel beside it."""
    root = tmp_path_factory.mktemp("tfjs-exports")

    def export(trained: str):
        args = (["--formats", "savedmodel,tfjs", "--tfjs-quantize", "float16"]
                if trained == "tensorflow" else ["--formats", "tfjs"])
        return flowers("export", str(smoke_runs[trained]), *args, "--out", str(root / trained),
                       timeout=TIMEOUT_S)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(TRAINED, pool.map(export, TRAINED), strict=True))
    return {trained: run_dir_of(result) for trained, result in results.items()}


@pytest.mark.parametrize("trained", TRAINED)
def test_runs_of_every_backend_convert_and_verify_on_cpu_and_wasm(tfjs_exports, trained):
    version = tfjs_exports[trained]
    manifest = read_json(version / "manifest.json")
    assert manifest["training_backend"] == trained and manifest["verification"]["passed"] is True
    results = [r for r in manifest["verification"]["results"] if r["format"] == "tfjs"]
    assert [r["runtime"].split()[2] for r in results] == ["wasm", "cpu"]
    for result in results:
        assert result["runtime"].startswith("tfjs 4.22.0 ") and "(node v" in result["runtime"]
        # the pure-JS CPU backend is verified on the first 8 images (11 s each at 224 px)
        assert result["images"] == (64 if "wasm" in result["runtime"] else 8)
        assert result["max_abs_prob_diff"] <= result["limit"], result
        # float16 weights may swap two classes within the limit of each other, nothing else
        swapped = result.get("near_ties_swapped", 0)
        assert result["top1_agreement"] == 1.0 - swapped / result["images"], result
    entry = manifest["formats"]["tfjs"]
    assert entry["written_by"].startswith("tensorflowjs_converter 4.22.0 (tensorflow 2.19")
    assert "oneDNN rewrites off" in entry["written_by"]
    packages = manifest["packages"]
    assert packages["@tensorflow/tfjs"] == packages["@tensorflow/tfjs-backend-wasm"] == "4.22.0"
    assert packages["node"].startswith("v")
    folder = version / "tfjs"
    assert read_json(folder / "class_names.json") == manifest["class_names"]
    for name in ("model.json", "index.html", "demo.js", "resize.js", "tf.min.js",
                 "tf-backend-wasm.min.js", "tfjs-backend-wasm-simd.wasm"):
        assert f"tfjs/{name}" in manifest["files"], name
    if trained == "tensorflow":  # quantized: held to its own limit, the drift recorded
        assert entry["quantization"] == "float16" and "float16 weights" in entry["written_by"]
        assert all(r["limit"] == 1e-2 for r in results)
        assert manifest["verification"]["criteria"]["max_abs_prob_diff"] == {"savedmodel": 1e-4,
                                                                            "tfjs": 1e-2}
        shards = sum(f["bytes"] for n, f in manifest["files"].items() if n.endswith(".bin"))
        float32 = sum(f["bytes"] for n, f in read_json(tfjs_exports["torch"] / "manifest.json")
                      ["files"].items() if n.endswith(".bin"))
        assert 0.45 < shards / float32 < 0.55  # half the bytes
    else:
        assert "quantization" not in entry and all(r["limit"] == 1e-4 for r in results)
        assert "savedmodel" not in manifest["formats"]  # converted from a scratch SavedModel
        assert not (version / "savedmodel").exists()


def _source_model(version: Path) -> Path:
    return Path(read_json(version / "manifest.json")["source_run"]) / "model.keras"


def test_the_node_runner_resizes_any_photo_as_the_pipeline_does(tfjs_exports, learnable_set,
                                                                 tmp_path):
    """Photos of other sizes (smaller, larger, not square) sent whole to node, resized there by
    resize.js, give the probabilities of the same photos resized by flowers.images."""
    done = python(f"""
        import json
        import numpy as np
        from flowers import backend
        backend.select("tensorflow")
        from PIL import Image
        from flowers.export.formats import tfjs
        from flowers.images import decode_image_bytes, resize_image
        photo = decode_image_bytes(open({str(learnable_photos(learnable_set, 1)[0])!r}, "rb").read())
        runner = tfjs.NodeRunner(__import__("pathlib").Path({str(tfjs_exports["jax"] / "tfjs")!r}), "wasm")
        worst = 0.0
        for size in [(20, 27), (48, 48), (131, 200), (333, 250)]:
            image = np.asarray(Image.fromarray(photo).resize(size, Image.BICUBIC)).astype(np.float32)
            whole = runner.predict(image[None])
            resized = runner.predict(resize_image(image, 32).numpy().astype(np.float32)[None])
            assert whole.argmax() == resized.argmax(), size
            worst = max(worst, float(np.abs(whole - resized).max()))
        runner.close()
        print(json.dumps({{"worst": worst}}))
    """, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["worst"] <= 1e-3


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_predict_and_the_demo_page_in_headless_chromium_match_the_keras_model(
        tfjs_tools, tfjs_exports, learnable_set, tmp_path):
    """`flowers predict` on the TF.js folder (node, WASM) gives the Keras model's top-5 within 1e-4;
    the demo page, given one photo in headless Chromium, shows its top-1 (a screenshot is kept)."""
    photos = [str(p) for p in learnable_photos(learnable_set, 3)]
    version = tfjs_exports["jax"]
    keras, tfjs = (json.loads(flowers("predict", *args, "--json").stdout) for args in (
        [str(_source_model(version)), *photos, "--backend", "jax"], [str(version / "tfjs"), *photos]))
    for ours, theirs in zip(tfjs, keras, strict=True):
        assert [t["class"] for t in ours["top"]] == [t["class"] for t in theirs["top"]]
        assert np.allclose([t["probability"] for t in ours["top"]],
                           [t["probability"] for t in theirs["top"]], atol=1e-4)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    needs("Chromium", chromium is not None)
    folder = version / "tfjs"
    photo = photos[0]
    handler = lambda *a, **k: _Quiet(*a, directory=str(folder), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    screenshot = tmp_path / "demo-page.png"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html?backend=wasm"
        done = subprocess.run(
            ["node", str(_support() / "browser.mjs"), url, str(photo), str(screenshot), "120"],
            capture_output=True, text=True, timeout=240,
            env={**os.environ, "FLOWERS_NODE_ENV": tfjs_tools["node_env"],
                 "CHROME": chromium})
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    page = json.loads(done.stdout.strip().splitlines()[-1])
    assert page["backend"] == "wasm" and screenshot.stat().st_size > 10_000
    assert page["top"][0]["class"] == keras[0]["top"][0]["class"]
    assert abs(page["top"][0]["probability"] - keras[0]["top"][0]["probability"]) <= 1e-3


def _support() -> Path:
    from flowers.export.formats import tfjs

    return tfjs.SUPPORT


@pytest.mark.parametrize("args, expected", [
    (["--formats", "keras", "--tfjs-quantize", "float16"],
     "quantizing tfjs needs tfjs among the formats (--formats ...,tfjs)"),
])
def test_bad_tfjs_requests_are_one_line(smoke_runs, tmp_path, args, expected):
    error = one_line_error(flowers("export", str(smoke_runs["tensorflow"]), *args, "--out",
                                   str(tmp_path / "out")))
    assert expected in error
    assert not (tmp_path / "out").exists()


def test_an_unknown_quantization_is_refused_by_the_cli(smoke_runs, tmp_path):
    result = flowers("export", str(smoke_runs["tensorflow"]), "--tfjs-quantize", "int8", "--out",
                     str(tmp_path / "out"))
    assert result.returncode == 2 and "'int8' is not 'float16'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
