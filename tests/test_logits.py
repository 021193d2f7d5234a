"""Training on logits: the same loss on every backend, probabilities out, older runs still usable.

Older runs' model.keras files end in Dense(activation="softmax", name="probabilities"); runs made
since the model trains on logits end in Dense "logits" + Softmax "probabilities". Both must
evaluate, predict and export.
"""

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import BACKENDS, flowers, learnable_photos, python, read_json, run_dir_of


def _last_layers(model_file: Path, count: int = 2) -> list[tuple[str, str, str | None]]:
    """(class, name, activation) of the last `count` layers, read from the file's config.json."""
    with zipfile.ZipFile(model_file) as archive:
        layers = json.loads(archive.read("config.json"))["config"]["layers"]
    return [(layer["class_name"], layer["name"], layer["config"].get("activation"))
            for layer in layers[-count:]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_loss_is_exact_where_a_probability_is_below_epsilon(backend):
    """One photo's true-class probability is e^-40: its loss is 40 and it still gets a gradient.

    A cross-entropy computed from clipped probabilities (Keras under torch and jax) would cap
    that loss at -log(1e-7) = 16.1 and give the photo no gradient.
    """
    driver = f"""
        import json
        import numpy as np
        from flowers import backend, config
        backend.select("{backend}")
        import keras
        from flowers.model import build_model, compile_model, with_probabilities
        model = build_model(config.load_experiment("smoke", []).model, 32, 4)
        compile_model(model, 1e-3, 4)
        logits = model.get_layer("logits")
        kernel, bias = logits.get_weights()
        # logits [0, 40, 0, 0] for every image, whatever its features
        logits.set_weights([np.zeros_like(kernel), np.array([0, 40, 0, 0], "float32")])
        images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
        labels = np.array([0, 1])
        probabilities = np.asarray(with_probabilities(model).predict_on_batch(images))
        loss = float(model.evaluate(images, labels, verbose=0, return_dict=True)["loss"])
        model.train_on_batch(images, labels)
        print(json.dumps({{"p_true": float(probabilities[0, 0]), "loss": loss,
                          "bias_after": logits.get_weights()[1].tolist()}}))
    """
    result = python(driver)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["p_true"] < 1e-7
    # exact: image 0 loses log(3 + e^40) = 40.0, image 1 loses log(1 + 3e^-40) ~ 0
    assert out["loss"] == pytest.approx(40.0 / 2, rel=1e-6)
    # image 0 has a gradient: Adam's first step raises its class's bias by ~lr
    assert out["bias_after"][0] == pytest.approx(1e-3, rel=1e-2)


def test_logits_and_probabilities_stay_float32_under_mixed_precision():
    driver = """
        import json
        from flowers import backend, config
        backend.select("tensorflow")
        import keras
        from flowers.model import build_model, logits_model, with_probabilities
        keras.config.set_dtype_policy("mixed_bfloat16")
        model = build_model(config.load_experiment("smoke", []).model, 32, 4)
        full = with_probabilities(model)
        print(json.dumps({"head": str(model.get_layer("head_dense").output.dtype),
                          "logits": str(model.output.dtype), "probabilities": str(full.output.dtype),
                          "names": [full.layers[-2].name, full.layers[-1].name],
                          "same_again": with_probabilities(full) is full,
                          "stripped": logits_model(full).layers[-1].name}))
    """
    result = python(driver)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"head": "bfloat16", "logits": "float32", "probabilities": "float32",
                   "names": ["logits", "probabilities"], "same_again": True, "stripped": "logits"}


def test_a_trained_model_file_returns_probabilities(smoke_runs):
    for backend in BACKENDS:
        assert _last_layers(smoke_runs[backend] / "model.keras") == [
            ("Dense", "logits", "linear"), ("Softmax", "probabilities", None)], backend


@pytest.fixture(scope="module")
def old_run(smoke_runs, tmp_path_factory) -> Path:
    """A copy of the torch smoke run whose model.keras is built the old way (softmax in the Dense).

    Same weights as the run's model, so every figure must match the run's own.
    """
    run = smoke_runs["torch"]
    copy = tmp_path_factory.mktemp("old-run") / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("model.keras", "logs"))
    driver = f"""
        from flowers import backend
        backend.select("tensorflow")
        import keras
        from flowers.model import load_model, save_model
        new, class_names = load_model("{run / 'model.keras'}")
        logits = new.get_layer("logits")
        old_output = keras.layers.Dense(logits.units, activation="softmax", dtype="float32",
                                        name="probabilities")
        # older runs' head Dropout was keras' own (before train.portable_random)
        dropout = keras.layers.Dropout(0.5, name="head_dropout")(new.get_layer("head_dense").output)
        old = keras.Model(new.input, old_output(dropout), name=new.name)
        old_output.set_weights(logits.get_weights())
        save_model(old, "{copy / 'model.keras'}", class_names)
    """
    result = python(driver)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _last_layers(copy / "model.keras") == [("Dropout", "head_dropout", None),
                                                  ("Dense", "probabilities", "softmax")]
    return copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_old_run_evaluates_like_the_run_itself(old_run, smoke_runs, backend):
    """val_loss of the old file, through its recovered logits, is the run's own on every backend."""
    trained = read_json(smoke_runs["torch"] / "metrics.json")
    result = flowers("evaluate", str(old_run), "--backend", backend)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads(result.stdout)
    assert evaluated["backend"] == backend and evaluated["num_val"] == trained["num_val"]
    assert evaluated["val_accuracy"] == pytest.approx(trained["val_accuracy"], abs=1e-9)
    assert evaluated["val_top5_accuracy"] == pytest.approx(trained["val_top5_accuracy"], abs=1e-9)
    assert evaluated["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-4)


def _probabilities(model_file: Path, photo: Path, *extra: str) -> list[float]:
    result = flowers("predict", str(model_file), str(photo), "--top", "4", "--json", *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    (prediction,) = json.loads(result.stdout)
    return [t["probability"] for t in sorted(prediction["top"], key=lambda t: t["class"])]


@pytest.fixture(scope="module")
def photo(learnable_set) -> Path:
    return learnable_photos(learnable_set, 1)[0]


def test_an_old_run_predicts_and_exports_like_the_run_itself(old_run, smoke_runs, photo, tmp_path):
    expected = _probabilities(smoke_runs["torch"] / "model.keras", photo, "--backend", "torch")
    assert sum(expected) == pytest.approx(1.0, abs=1e-5) and max(expected) < 1.0

    # float32 on another backend or runtime: equal to ~1e-6 (an old file misread would be far off)
    for backend in ("torch", "jax"):
        assert _probabilities(old_run / "model.keras", photo, "--backend", backend) == pytest.approx(
            expected, abs=1e-5), backend

    # The old file's logits are recovered when it loads, before any converter sees the model, so
    # one converted format proves the export takes them (every format: tests/test_export.py).
    version_dir = run_dir_of(flowers("export", str(old_run), "--formats", "keras,onnx",
                                     "--out", str(tmp_path)))
    manifest = read_json(version_dir / "manifest.json")
    assert manifest["verification"]["passed"] is True
    assert set(manifest["formats"]) == {"keras", "onnx"}
    assert all(r["passed"] for r in manifest["verification"]["results"])
    for model in ("model.onnx",):
        assert _probabilities(version_dir / model, photo) == pytest.approx(expected, abs=1e-5), model
