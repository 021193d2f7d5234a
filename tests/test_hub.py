"""model.backbone="hub:PRESET": a KerasHub backbone from a local preset directory, offline.

The preset is a tiny ResNetBackbone with random weights and a ResNetImageConverter with the ImageNet
mean/std, written by KerasHub's own save_to_preset. keras_hub must be installed (the nox `tests`
session installs it): without it these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import BACKENDS, flowers, python, read_json, run_dir_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# built for 64 px; flowers rebuilds it for data.image_size
PRESET_DRIVER = f"""
    import sys
    from flowers import backend
    backend.select("tensorflow")
    import keras_hub
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(64, 64, 3))
    mean, std = {IMAGENET_MEAN}, {IMAGENET_STD}
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(64, 64), scale=[1 / (255 * s) for s in std],
        offset=[-m / s for m, s in zip(mean, std)])
    backbone.save_to_preset(sys.argv[1])
    converter.save_to_preset(sys.argv[1])
"""


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A local KerasHub preset directory (config.json, model.weights.h5, image_converter.json)."""
    folder = tmp_path_factory.mktemp("hub") / "tiny_resnet"
    result = python(PRESET_DRIVER.replace("sys.argv[1]", repr(str(folder))))
    assert result.returncode == 0, ("writing the KerasHub preset failed (is keras-hub installed? see "
                                    f"the README):\n{result.stderr[-3000:]}")
    assert (folder / "image_converter.json").is_file()
    return folder


BUILD_DRIVER = """
    import json, sys
    from pathlib import Path
    import numpy as np
    from flowers import backend
    backend.select("{backend}")
    import keras
    from flowers.config import ModelConfig
    from flowers.model import backbone_of, build_model, load_model, save_model
    images = np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 3)).astype("float32")
    weights, saved_model = Path("{weights}"), Path("{weights}").with_suffix(".keras")
    out = {{}}
    if saved_model.is_file():  # first, while keras_hub is not imported yet
        loaded, _ = load_model(saved_model)
        out["loaded_probabilities"] = np.asarray(loaded.predict_on_batch(images)).tolist()
        out["keras_hub_imported_by_load"] = "keras_hub" in sys.modules
    model = build_model(ModelConfig(backbone="hub:{preset}", weights="none", head_units=16,
                                    dropout=0.0), 48, 3)
    if weights.is_file():
        with np.load(weights) as saved:
            model.set_weights([saved[f"w{{i}}"] for i in range(len(saved.files))])
    else:
        np.savez(weights, **{{f"w{{i}}": w for i, w in enumerate(model.get_weights())}})
        save_model(model, saved_model, ["a", "b", "c"])
    backbone = backbone_of(model)
    features = keras.Model(model.input, model.get_layer("avg_pool").output).predict_on_batch(images)
    print(json.dumps({{
        **out,
        "logits": np.asarray(model.predict_on_batch(images)).tolist(),
        "features": np.asarray(features).tolist(),
        "feature_map": list(backbone.output.shape[1:]),
        "layers": [layer.name for layer in backbone.layers[:3]],
        "rescaling": backbone.get_layer("hub_preprocess").get_config(),
    }}))
"""


def _last_json(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hub_backbone_predicts_the_same_on_every_backend(preset, tmp_path):
    """Same weights, same images: the same logits under torch, tensorflow and jax (to 1e-4)."""
    import numpy as np

    weights = tmp_path / "weights.npz"
    outputs = {b: _last_json(python(BUILD_DRIVER.format(backend=b, preset=preset, weights=weights)))
               for b in BACKENDS}
    first = outputs[BACKENDS[0]]
    # built for data.image_size (48 px: stride 4 stem, stages of stride 1 and 2), not the preset's 64
    assert first["feature_map"] == [6, 6, 64]
    # one flat model: the preset's scale/offset in a Rescaling, then the backbone's own layers
    assert first["layers"][1:] == ["hub_preprocess", "conv1_pad"]
    rescaling = first["rescaling"]
    assert rescaling["scale"] == pytest.approx([1 / (255 * s) for s in IMAGENET_STD])
    offsets = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert rescaling["offset"] == pytest.approx(offsets)
    assert np.std(first["features"]) > 0
    logits = np.asarray(first["logits"])
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for backend_name in BACKENDS[1:]:
        out = outputs[backend_name]
        np.testing.assert_allclose(out["logits"], logits, atol=1e-4,
                                   err_msg=f"{backend_name} vs {BACKENDS[0]}")
        # the first backend's model.keras (a ResNet preset: only core Keras layers) loads in
        # this one without keras_hub, and predicts the same
        assert not out["keras_hub_imported_by_load"]
        np.testing.assert_allclose(out["loaded_probabilities"], probabilities, atol=1e-5,
                                   err_msg=f"model.keras under {backend_name}")


@pytest.mark.slow
def test_train_with_a_hub_backbone(preset, tmp_path):
    run = run_dir_of(flowers(
        "train", "-e", "smoke", "--backend", "torch", "--runs-dir", str(tmp_path / "runs"),
        "--set", f"model.backbone=hub:{preset}", "--set", "model.weights=none",
        "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "train.latency_repeats=1",
        "--set", "data.synthetic_train_images=16", "--set", "data.synthetic_val_images=8"))
    metrics = read_json(run / "metrics.json")
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] > 0
    assert read_json(run / "config.json")["experiment"]["model"]["backbone"] == f"hub:{preset}"
    assert (run / "model.keras").is_file()


BAD_INPUT_DRIVER = """
    import contextlib, io, json, sys
    from flowers.cli import main

    def train(backbone, weights):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                main(["train", "-e", "smoke", "--backend", "jax", "--runs-dir", {runs!r},
                      "--set", f"model.backbone={{backbone}}", "--set", f"model.weights={{weights}}"])
                code = 0
            except SystemExit as exit:
                code = exit.code
        return {{"code": code, "stderr": stderr.getvalue()}}

    results = {{
        "unknown": train("hub:no_such_preset_xyz", "none"),
        "offline": train("hub:resnet_18_imagenet", "imagenet"),
        "weights_file": train("hub:{preset}", {weights_file!r}),
    }}
    sys.modules["keras_hub"] = None  # `import keras_hub` now raises ImportError
    results["not_installed"] = train("hub:{preset}", "none")
    print(json.dumps(results))
"""


def test_bad_hub_settings_are_one_line_errors(preset, tmp_path):
    """Unknown preset, a Kaggle preset offline, a weights file, keras_hub missing: one line each.

    One process runs the four `flowers train` calls in turn (one backend import, not four).
    """
    weights_file = tmp_path / "backbone.weights.h5"
    weights_file.write_bytes(b"not used")
    # no network for certain: an unreachable proxy and an empty download cache
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
               "NO_PROXY": "", "no_proxy": "", "KAGGLEHUB_CACHE": str(tmp_path / "kagglehub"),
               "HF_HUB_OFFLINE": "1"}
    runs = tmp_path / "runs"
    results = _last_json(python(BAD_INPUT_DRIVER.format(runs=str(runs), preset=preset,
                                                        weights_file=str(weights_file)), env=offline))
    errors = {}
    for case, result in results.items():
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        assert result["code"] == 1 and len(lines) == 1, f"{case}: {result}"
        assert lines[0].startswith("error: ") and "Traceback" not in result["stderr"], f"{case}: {result}"
        errors[case] = lines[0]
    assert ("model.backbone='hub:no_such_preset_xyz': unknown KerasHub preset 'no_such_preset_xyz'"
            in errors["unknown"])
    assert "could not download KerasHub preset 'resnet_18_imagenet' (offline?)" in errors["offline"]
    assert "a KerasHub preset carries its own weights; use 'imagenet'" in errors["weights_file"]
    assert "needs KerasHub, which is not installed" in errors["not_installed"]
    assert "pip install --no-deps 'keras-hub==0.32.0'" in errors["not_installed"]
    assert not any(runs.rglob("metrics.json"))
