"""flowers/fold.py: a frozen backbone's BatchNormalization folded into the convolutions before it
(model.fold_batchnorm) computes what the unfolded model computes, on every backend, and saves,
loads and trains like any model; its kernels stored in torch's layout (model.backend_kernel_layout)
are the same values that torch's convolution reads without a copy."""

import json
import zipfile

import pytest

from conftest import BACKENDS, flowers, python, run_dir_of

CHECK = """
    import json, sys
    from pathlib import Path
    from flowers import backend
    backend.select("{backend}")
    import keras, numpy as np
    from flowers.config import ModelConfig
    from flowers.images import load_image_files
    from flowers.fold import Rewrite
    from flowers.model import backbone_of, build_model, load_model, rewrite_classifier, save_model

    model = build_model(ModelConfig(weights="none"), 64, 5)
    rng = np.random.default_rng(0)
    for layer in backbone_of(model).layers:  # statistics far from the defaults (0, 1)
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.1, shape),
                               rng.normal(0, 0.1, shape), rng.uniform(0.5, 2.0, shape)])
    folded = rewrite_classifier(model)
    photos = sorted(Path("{photos}").rglob("*.jpg"))[:8]
    images = load_image_files([str(p) for p in photos], 64).astype("float32")
    logits = [keras.ops.convert_to_numpy(m.predict_on_batch(images)) for m in (model, folded)]
    save_model(folded, "{out}/folded.keras", [str(i) for i in range(5)])
    loaded, _ = load_model("{out}/folded.keras")
    again = keras.ops.convert_to_numpy(loaded.predict_on_batch(images))
    twin = build_model(ModelConfig(weights="none"), 64, 5, rewrite=Rewrite())
    twin.set_weights(folded.get_weights())
    print(json.dumps({{
        "scale": float(np.abs(logits[0]).max()),
        "diff": float(np.abs(logits[0] - logits[1]).max()),
        "loaded_diff": float(np.abs(again - keras.ops.convert_to_numpy(
            keras.ops.softmax(logits[1]))).max()),
        "batchnorm_left": sum(isinstance(l, keras.layers.BatchNormalization)
                              for l in backbone_of(folded).layers),
        "batchnorm_before": sum(isinstance(l, keras.layers.BatchNormalization)
                                for l in backbone_of(model).layers),
        "twin_weights": len(twin.get_weights()) == len(folded.get_weights()),
    }}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_folded_model_computes_the_unfolded_ones_logits(backend, tmp_path, learnable_set):
    result = python(CHECK.format(backend=backend, photos=learnable_set, out=tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert (found["batchnorm_before"], found["batchnorm_left"]) == (53, 0)  # ResNet50's 53 pairs
    assert found["diff"] <= 1e-4 * max(1.0, found["scale"]), found
    assert found["loaded_diff"] <= 1e-6, found  # saved and loaded: the same probabilities
    assert found["twin_weights"]  # build_model(rewrite=...) builds the same weights list


def _backbone_layer_classes(model_file) -> set[str]:
    with zipfile.ZipFile(model_file) as archive:
        config = json.loads(archive.read("config.json"))
    found = set()

    def walk(node):
        if isinstance(node, dict):
            if "class_name" in node and isinstance(node.get("config"), dict):
                found.add(node["class_name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(config)
    return found


def test_runs_fold_by_default_and_not_when_switched_off(smoke_runs, tmp_path):
    assert "BatchNormalization" not in _backbone_layer_classes(smoke_runs["tensorflow"] / "model.keras")
    unfolded = run_dir_of(flowers("train", "-e", "smoke", "--backend", "tensorflow", "--runs-dir",
                                  str(tmp_path), "--set", "model.fold_batchnorm=false",
                                  "--set", "train.epochs=1"))
    assert "BatchNormalization" in _backbone_layer_classes(unfolded / "model.keras")


LAYOUT = """
    import json
    from flowers import backend
    backend.select("torch")
    import keras, numpy as np, torch
    from flowers.config import ModelConfig
    from flowers.fold import Rewrite
    from flowers.model import backbone_of, build_model, rewrite_classifier

    found = {{}}
    images = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    for data_format, memory_format in (("channels_first", torch.contiguous_format),
                                       ("channels_last", torch.channels_last)):
        model = build_model(ModelConfig(weights="none", data_format=data_format), 64, 5)
        rewritten = rewrite_classifier(model, Rewrite(fold_batchnorm=False))
        convs = [l for l in backbone_of(rewritten).layers if isinstance(l, keras.layers.Conv2D)]
        before = [l for l in backbone_of(model).layers if isinstance(l, keras.layers.Conv2D)]
        found[data_format] = {{
            "convs": len(convs),
            # the view Keras-on-torch hands to torch's convolution needs no copy
            "in_layout": sum(l.kernel.value.permute(3, 2, 0, 1).is_contiguous(
                memory_format=memory_format) for l in convs),
            "keras_layout_before": sum(l.kernel.value.permute(3, 2, 0, 1).is_contiguous(
                memory_format=memory_format) for l in before),
            "same_kernels": all(np.array_equal(keras.ops.convert_to_numpy(a.kernel),
                                               keras.ops.convert_to_numpy(b.kernel))
                                for a, b in zip(before, convs, strict=True)),
            "same_config": json.dumps(backbone_of(model).get_config(), sort_keys=True, default=str)
                           == json.dumps(backbone_of(rewritten).get_config(), sort_keys=True,
                                         default=str),
            "diff": float(np.abs(keras.ops.convert_to_numpy(model.predict_on_batch(images))
                                 - keras.ops.convert_to_numpy(rewritten.predict_on_batch(images))).max()),
            "scale": float(np.abs(keras.ops.convert_to_numpy(model.predict_on_batch(images))).max()),
        }}
        # assigned values (a checkpoint, set_weights) keep the layout
        rewritten.set_weights(model.get_weights())
        found[data_format]["after_assign"] = sum(l.kernel.value.permute(3, 2, 0, 1).is_contiguous(
            memory_format=memory_format) for l in convs)
    print(json.dumps(found))
"""


def test_torch_kernels_are_stored_in_the_layout_its_convolution_reads():
    result = python(LAYOUT.format())
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for data_format, figures in found.items():
        assert figures["convs"] == 53, (data_format, figures)  # ResNet50's Conv2D layers
        assert figures["keras_layout_before"] == 0, (data_format, figures)  # what the rewrite changes
        assert figures["in_layout"] == figures["after_assign"] == 53, (data_format, figures)
        assert figures["same_kernels"] and figures["same_config"], (data_format, figures)
        assert figures["diff"] <= 1e-5 * max(1.0, figures["scale"]), (data_format, figures)
