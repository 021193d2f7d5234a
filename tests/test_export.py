"""Exports: torch- and tensorflow-trained runs to all four formats, verified in each runtime, versioned."""

import dataclasses
import hashlib
import json
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import BACKENDS, flowers, learnable_photos, one_line_error, python, read_json, run_dir_of

FORMATS = ("keras", "savedmodel", "onnx", "tflite")
ARTEFACTS = {"keras": "model.keras", "savedmodel": "savedmodel", "onnx": "model.onnx",
             "tflite": "model.tflite"}
EXPORTED_BACKENDS = ("torch", "tensorflow")


@pytest.fixture(scope="module")
def exports_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def exported(smoke_runs, exports_root) -> dict[str, Path]:
    """The torch and the tensorflow smoke run, each exported to every format (version dirs).

    Both exports run at once into the same root: on a 2-core CPU that takes ~2/3 of the time, and
    two exports of one experiment racing for the next version number must still get two versions.
    """
    def export(trained: str):
        # the four formats named: TF.js joins the default set once its tools are installed
        # (tests/test_tfjs.py), which would make this fixture depend on test order
        return flowers("export", str(smoke_runs[trained]), "--formats", ",".join(FORMATS),
                       "--out", str(exports_root))

    with ThreadPoolExecutor(len(EXPORTED_BACKENDS)) as pool:
        results = dict(zip(EXPORTED_BACKENDS, pool.map(export, EXPORTED_BACKENDS), strict=True))
    return {trained: run_dir_of(result) for trained, result in results.items()}


@pytest.fixture(scope="session")
def photo(learnable_set) -> Path:
    return learnable_photos(learnable_set, 1)[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("trained", EXPORTED_BACKENDS)
def test_every_format_is_written_and_verified(exported, smoke_runs, trained):
    version_dir, run = exported[trained], smoke_runs[trained]
    manifest = read_json(version_dir / "manifest.json")
    assert version_dir.name == f"v{manifest['version']}"
    assert version_dir.parent.name == "smoke" == manifest["experiment"]
    assert manifest["training_backend"] == trained
    assert manifest["source_run"] == str(run.resolve())
    assert manifest["config"] == read_json(run / "config.json")["experiment"]
    metrics = read_json(run / "metrics.json")
    assert manifest["val_metrics"]["val_accuracy"] == metrics["val_accuracy"]
    assert manifest["class_names"] == [f"class_{i:02d}" for i in range(4)]
    assert manifest["input"]["shape"] == [None, 32, 32, 3]
    assert manifest["input"]["value_range"] == [0, 255] and manifest["input"]["dtype"] == "float32"
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["git"]["commit"])
    assert isinstance(manifest["git"]["dirty"], bool)
    assert manifest["packages"]["keras"] == "3.15.1" and manifest["packages"]["onnxruntime"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", manifest["created"])

    assert list(manifest["formats"]) == list(FORMATS)
    for fmt in FORMATS:
        assert (version_dir / ARTEFACTS[fmt]).exists(), fmt
        assert manifest["formats"][fmt]["bytes"] > 1e6, fmt
    assert (version_dir / "savedmodel" / "saved_model.pb").is_file()
    for name, entry in manifest["files"].items():
        assert (version_dir / name).stat().st_size == entry["bytes"], name
    assert manifest["files"]["model.keras"]["sha256"] == _sha256(run / "model.keras")
    assert manifest["files"]["model.onnx"]["sha256"] == _sha256(version_dir / "model.onnx")

    verification = manifest["verification"]
    assert verification["passed"] is True
    assert verification["images"] >= 32 and "validation" in verification["images_from"]
    assert verification["reference"].endswith(f"({trained})")
    results = verification["results"]
    assert {r["format"] for r in results} == set(FORMATS)
    keras_runtimes = {r["runtime"] for r in results if r["format"] == "keras"}
    assert keras_runtimes == {f"keras 3.15.1 ({b})" for b in BACKENDS}
    assert sum(r["format"] == "savedmodel" for r in results) == 2  # float32 and uint8 signatures
    for r in results:
        assert r["passed"] and r["top1_agreement"] == 1.0, r
        assert r["max_abs_prob_diff"] <= 1e-4, r
        assert r["batch1_p50_ms"] > 0, r
    assert not list(version_dir.parent.glob(".incomplete-*"))


def test_versions_increment_and_are_listed(exported, exports_root):
    assert sorted(p.name for p in (exports_root / "smoke").iterdir()) == ["v1", "v2"]
    assert {exported[b].name for b in EXPORTED_BACKENDS} == {"v1", "v2"}

    listed = flowers("exports", "list", "--out", str(exports_root))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["experiment", "version", "created", "trained"]
    rows = {line.split()[1]: line for line in lines[1:]}
    assert set(rows) == {"v1", "v2"}
    for trained in EXPORTED_BACKENDS:
        row = rows[exported[trained].name]
        assert trained in row.split() and "keras,savedmodel,onnx,tflite" in row

    by_env = flowers("exports", "list", "-e", "flowers12", env={"FLOWERS_EXPORTS_DIR": str(exports_root)})
    assert by_env.stdout.strip() == f"no exports of flowers12 under {exports_root}"


def test_predict_gives_the_same_top1_from_every_format(exported, photo):
    version_dir = exported["torch"]
    tops = {}
    for label, model, extra in (("keras under jax", "model.keras", ["--backend", "jax"]),
                                ("savedmodel", "savedmodel", []), ("onnx", "model.onnx", []),
                                ("tflite", "model.tflite", [])):
        result = flowers("predict", str(version_dir / model), str(photo), "--top", "3", "--json",
                         *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        (prediction,) = json.loads(result.stdout)
        assert prediction["image"] == str(photo) and len(prediction["top"]) == 3
        tops[label] = prediction["top"][0]
    assert len({t["class"] for t in tops.values()}) == 1, tops
    assert next(iter(tops.values()))["class"].startswith("class_0")  # names from the manifest
    probabilities = [t["probability"] for t in tops.values()]
    assert max(probabilities) - min(probabilities) <= 1e-4, tops


def test_a_failed_verification_fails_the_export_and_leaves_no_version(smoke_runs, tmp_path):
    """ONNX runtime results drift by 0.01: the export stops, names the format, keeps nothing."""
    driver = f"""
        import flowers.export.runtimes as runtimes
        real_open_model = runtimes.open_model

        def drifting_open_model(path, *args, **kwargs):
            model = real_open_model(path, *args, **kwargs)
            if model.format == "onnx":
                predict = model.predict
                model.predict = lambda images: predict(images) + 0.01
            return model

        runtimes.open_model = drifting_open_model
        from flowers.cli import main
        main(["export", "{smoke_runs['torch']}", "--formats", "onnx", "--out", "{tmp_path}"])
    """
    error = one_line_error(python(driver))
    assert "verification failed" in error and "onnx in onnxruntime" in error
    assert "max |Δprob| 1.0e-02 (limit 1e-04)" in error
    assert list((tmp_path / "smoke").iterdir()) == []


def test_a_crash_midway_leaves_no_version(smoke_runs, tmp_path):
    """model.keras is already staged when the first backend process dies."""
    driver = f"""
        import flowers.export.run

        def crash(*args, **kwargs):
            raise RuntimeError("backend process crashed (simulated)")

        flowers.export.run._run_worker = crash
        from flowers.cli import main
        main(["export", "{smoke_runs['tensorflow']}", "--formats", "keras,onnx", "--out", "{tmp_path}"])
    """
    result = python(driver)
    assert result.returncode != 0 and "crashed (simulated)" in result.stderr
    assert list((tmp_path / "smoke").iterdir()) == []


@pytest.mark.parametrize("make, args, message", [
    (lambda p, run: p / "missing", [], "run directory not found"),
    (lambda p, run: (p / "half").mkdir() or p / "half", [],
     "not a complete run directory (missing config.json"),
    (lambda p, run: run, ["--formats", "keras,pt"],
     "unknown format 'pt'; choose from keras, savedmodel, onnx, tflite"),
    (lambda p, run: run, ["--formats", ","], "no format given"),
    (lambda p, run: _mixed_precision_copy(p, run), [],
     "train.dtype_policy='mixed_bfloat16'; exports are float32 only"),
])
def test_export_rejects(smoke_runs, tmp_path, make, args, message):
    run_dir = make(tmp_path, smoke_runs["tensorflow"])
    error = one_line_error(flowers("export", str(run_dir), *args, "--out", str(tmp_path / "out")))
    assert message in error
    assert not (tmp_path / "out").exists()


def _mixed_precision_copy(tmp_path: Path, run: Path) -> Path:
    """The run's files, with a config that says it trained in mixed_bfloat16."""
    from flowers.config import TrainConfig

    if "dtype_policy" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        pytest.skip("this checkout has no train.dtype_policy")
    copy = tmp_path / "mixed"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("model.keras", "logs"))
    (copy / "model.keras").write_bytes(b"")  # never read: the config is refused first
    config = read_json(run / "config.json")
    config["experiment"]["train"]["dtype_policy"] = "mixed_bfloat16"
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_export_without_the_toolchain_names_the_extra(smoke_runs, tmp_path):
    driver = f"""
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "onnxruntime" else real(name, *a)
        from flowers.cli import main
        main(["export", "{smoke_runs['tensorflow']}", "--out", "{tmp_path}/out"])
    """
    error = one_line_error(python(driver))
    assert "verifying format 'onnx' needs onnxruntime, which is not installed" in error
    assert "pip install -e '.[export]'" in error
    assert not (tmp_path / "out").exists()


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing image", "image file not found"),
    ("not an image", "not an image"),
    ("corrupt image", "corrupt"),
    ("unknown model type", "unknown model type; expected a .keras, .onnx or .tflite file"),
    ("missing model", "model file not found"),
    ("unreadable model", "not a readable onnx model"),
    ("backend for onnx", "--backend applies to .keras files only"),
])
def test_predict_rejects(exported, photo, tmp_path, case, message):
    model, image, extra = exported["torch"] / "model.onnx", photo, []
    if case == "missing image":
        image = tmp_path / "missing.jpg"
    elif case == "not an image":
        image = _write(tmp_path / "notes.jpg", b"not a photo\n")
    elif case == "corrupt image":
        image = _write(tmp_path / "cut.jpg", photo.read_bytes()[: photo.stat().st_size // 2])
    elif case == "unknown model type":
        model = _write(tmp_path / "model.pt", b"weights")
    elif case == "missing model":
        model = tmp_path / "missing.onnx"
    elif case == "unreadable model":
        model = _write(tmp_path / "model.onnx", b"not onnx")
    else:
        extra = ["--backend", "jax"]
    error = one_line_error(flowers("predict", str(model), str(image), *extra))
    assert message in error


# ---- hostile and broken model files: predict, evaluate and serve refuse each in one line ---------
HOSTILE = {  # case -> (file name, what the one line says)
    "truncated onnx": ("model.onnx", "not a readable onnx model (["),
    "truncated tflite": ("model.tflite", "not a readable tflite model ("),
    "savedmodel without variables": ("savedmodel", "not a readable savedmodel model ("),
    "truncated keras": ("model.keras", "not a readable .keras model (File is not a zip file)"),
    "unknown custom class": ("model.keras", "it uses the class 'FancyDense' from my_project.layers, "
                                            "which is not registered here"),
    "python lambda": ("model.keras", "Lambda` layer whose `function` is a Python lambda"),
}
KERAS_CASES = [case for case, (name, _) in HOSTILE.items() if name == "model.keras"]


def _cut(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    return target


@pytest.fixture(scope="module")
def hostile_models(exported, tmp_path_factory) -> dict[str, Path]:
    """Each HOSTILE case made from the torch export (a file in a folder of its own)."""
    version, root = exported["torch"], tmp_path_factory.mktemp("hostile")
    made = {}
    for case, (name, _) in HOSTILE.items():
        (root / case).mkdir()
        made[case] = root / case / name
    for case in ("truncated onnx", "truncated tflite", "truncated keras"):
        _cut(version / HOSTILE[case][0], made[case])
    shutil.copytree(version / "savedmodel", made["savedmodel without variables"],
                    ignore=shutil.ignore_patterns("variables"))
    # the head's first Dense renamed to a class from a package this process has never imported
    with zipfile.ZipFile(version / "model.keras") as source, \
            zipfile.ZipFile(made["unknown custom class"], "w") as target:
        config = json.loads(source.read("config.json"))
        dense = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")
        dense.update(module="my_project.layers", class_name="FancyDense",
                     registered_name="MyProject>FancyDense")
        for item in source.infolist():
            data = json.dumps(config).encode() if item.filename == "config.json" else source.read(item)
            target.writestr(item, data)
    built = python(f"""
        import os
        os.environ["KERAS_BACKEND"] = "tensorflow"
        import keras
        inputs = keras.Input((32, 32, 3))
        doubled = keras.layers.Lambda(lambda x: x * 2)(inputs)
        outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(doubled))
        keras.Model(inputs, outputs).save({str(made["python lambda"])!r})
    """)
    assert built.returncode == 0, built.stderr[-2000:]
    return made


def _refused(result, model: Path, message: str, fault_row, command: str, case: str) -> None:
    row = fault_row(kind="hostile model file", fault=f"flowers {command}: {case}")
    row["traceback"] = "Traceback" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and not row["traceback"], result.stderr[-3000:]
    assert lines[-1].startswith(f"error: {model}: ") and message in lines[-1], lines[-1]
    row["outcome"] = "refused in one line: " + lines[-1][len(f"error: {model}: "):][:140]


@pytest.mark.parametrize("case", HOSTILE)
def test_predict_refuses_a_hostile_model_file(hostile_models, photo, case, fault_row):
    model = hostile_models[case]
    result = flowers("predict", str(model), str(photo))
    one_line_error(result)
    _refused(result, model, HOSTILE[case][1], fault_row, "predict", case)


@pytest.mark.parametrize("case", HOSTILE)
def test_serve_refuses_a_hostile_model_file(hostile_models, case, fault_row):
    """The server stops before it answers anything; its last line is the reason (uvicorn's own
    start and stop lines come before it)."""
    from flowers.serve.bench import free_port

    model = hostile_models[case]
    result = flowers("serve", str(model), "--host", "127.0.0.1", "--port", str(free_port()), timeout=180)
    _refused(result, model, HOSTILE[case][1], fault_row, "serve", case)


@pytest.mark.parametrize("case", KERAS_CASES)
def test_evaluate_refuses_a_run_with_a_hostile_model_file(hostile_models, smoke_runs, tmp_path, case,
                                                          fault_row):
    run = tmp_path / "run"
    shutil.copytree(smoke_runs["torch"], run, ignore=shutil.ignore_patterns("model.keras"))
    shutil.copy(hostile_models[case], run / "model.keras")
    result = flowers("evaluate", str(run))
    one_line_error(result)
    _refused(result, run / "model.keras", HOSTILE[case][1], fault_row, "evaluate", case)
