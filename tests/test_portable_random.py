"""train.portable_random: one seed gives the same initial weights, the same dropout masks and so
the same training under torch, tensorflow and jax (flowers/randomness.py).

Each backend runs in its own process and reports hashes and figures; the test compares them.
"""

import csv
import json

import pytest

from conftest import BACKENDS, flowers, one_line_error, python, read_json

BACKBONES = ("ResNet50", "MobileNetV3Small", "EfficientNetV2B0", "experiments.custom_backbone:small_cnn")


def _in_each_backend(driver: str) -> dict[str, dict]:
    """The JSON each backend's process prints on its last line, by backend."""
    found = {}
    for backend in BACKENDS:
        result = python(driver.replace("BACKEND", backend), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        found[backend] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def test_initial_weights_are_bitwise_identical_under_every_backend():
    """Random ResNet50, MobileNetV3Small, EfficientNetV2B0 and the custom backbone example, with
    the head; a trainable EfficientNetV2B0 too, whose stochastic-depth Dropouts become portable."""
    driver = f"""
        import dataclasses, hashlib, json
        import numpy as np
        from flowers import backend, config
        backend.select("BACKEND")
        import keras
        from flowers.model import backbone_of, build_model
        from flowers.randomness import random_layers
        base = config.load_experiment("smoke", []).model
        found = {{}}
        for name, frozen in [(b, True) for b in {BACKBONES!r}] + [("EfficientNetV2B0", False)]:
            cfg = dataclasses.replace(base, backbone=name, weights="none", freeze_backbone=frozen)
            model = build_model(cfg, 32, 5, seed=7, portable_random=True)
            digest = hashlib.sha256()
            for weight in model.weights:
                digest.update(weight.path.encode())
                digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
            values = np.concatenate([np.ravel(keras.ops.convert_to_numpy(w)) for w in model.weights])
            inactive = [backbone_of(model)] if frozen else []  # runs in inference mode
            found[f"{{name}} frozen={{frozen}}"] = [digest.hexdigest(), len(model.weights),
                                                   float(np.std(values)),
                                                   *random_layers(model, inactive)]
            keras.backend.clear_session()
        print(json.dumps(found))
    """
    found = _in_each_backend(driver)
    reference = found["torch"]
    for backend in BACKENDS[1:]:
        assert found[backend] == reference, backend
    for name, (_, count, spread, portable, other) in reference.items():
        assert count > 5 and spread > 0, name  # weights were drawn, not all zeros or ones
        assert "head_dropout" in portable, name
        assert other == [], f"{name}: random layers left with the backend's own draws: {other}"
    trainable = reference["EfficientNetV2B0 frozen=False"]
    assert "head_dropout" in trainable[3] and len(trainable[3]) > 10  # stochastic depth too


def test_dropout_masks_are_identical_inside_compiled_training_steps():
    """Inside model.fit (XLA under tensorflow and jax, eager torch): the loss of each step is the
    sum of the kept inputs 2^0..2^19 times 2, which spells out that step's mask bit for bit."""
    driver = """
        import json
        import numpy as np
        from flowers import backend
        backend.select("BACKEND")
        import keras
        from flowers.randomness import PortableDropout
        inputs = keras.Input((20,))
        scale = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="sum")
        outputs = scale(PortableDropout(0.5, seed=3, name="drop")(inputs))
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss=lambda y, p: keras.ops.sum(p))
        x = np.array([[2.0 ** k for k in range(20)]], np.float32)
        history = model.fit(x, np.zeros((1, 1)), epochs=6, batch_size=1, verbose=0)
        masks = [format(int(loss) // 2, "020b") for loss in history.history["loss"]]
        print(json.dumps({"masks": masks, "step": int(model.get_layer("drop").step.numpy())}))
    """
    found = _in_each_backend(driver)
    assert found["torch"] == found["tensorflow"] == found["jax"]
    masks = found["torch"]["masks"]
    assert found["torch"]["step"] == 6 and len(set(masks)) == 6  # a new mask every step
    kept = sum(mask.count("1") for mask in masks) / (20 * len(masks))
    assert 0.3 < kept < 0.7


def _history(run_dir):
    with (run_dir / "history.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _predicted(run_dir):
    with (run_dir / "predictions.csv").open(newline="") as f:
        return [(row["index"], row["item"], row["label"], row["predicted"]) for row in csv.DictReader(f)]


def _assert_same_training(runs: dict) -> None:
    """Per-epoch val loss within 1e-3 (relative), val accuracy within 1 pp, top-1 agreement >= 98%."""
    histories = {b: _history(runs[b]) for b in BACKENDS}
    for backend in BACKENDS[1:]:
        for ref, row in zip(histories["torch"], histories[backend], strict=True):
            ref_loss, loss = float(ref["val_loss"]), float(row["val_loss"])
            assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss), (backend, row["epoch"], loss, ref_loss)
        metrics = {b: read_json(runs[b] / "metrics.json") for b in ("torch", backend)}
        assert abs(metrics[backend]["val_accuracy"] - metrics["torch"]["val_accuracy"]) <= 0.01
        reference, other = _predicted(runs["torch"]), _predicted(runs[backend])
        assert [r[:3] for r in reference] == [r[:3] for r in other]  # the same images, same order
        agreement = sum(a[3] == b[3] for a, b in zip(reference, other, strict=True)) / len(reference)
        assert agreement >= 0.98, (backend, agreement)


def test_smoke_runs_train_alike_under_every_backend(smoke_runs):
    for backend, run in smoke_runs.items():
        metrics = read_json(run / "metrics.json")
        assert metrics["seed"] == 42 and metrics["portable_random"]["enabled"], backend
        assert metrics["portable_random"]["dropout_layers"] == ["head_dropout"]
        assert metrics["portable_random"]["not_portable"] == []
        assert metrics["deterministic"] == {"requested": False, "applied": None}
    _assert_same_training(smoke_runs)


def test_flowers12_runs_train_alike_under_every_backend(flowers12_runs):
    """Real photos, 8 epochs, dropout 0.5 (the issue's target; 0.0875 apart before)."""
    _assert_same_training(flowers12_runs)
    items = [row[1] for row in _predicted(flowers12_runs["torch"])]
    assert items[0].startswith("test/") and items[0].endswith(".jpg") and len(set(items)) == 240


def test_portable_random_off_names_the_backend_draws(tmp_path):
    result = flowers("train", "-e", "smoke", "--backend", "tensorflow", "--runs-dir", str(tmp_path),
                     "--set", "train.portable_random=false", "--set", "train.epochs=1",
                     "--set", "model.backbone=MobileNetV3Small", "--set", "train.deterministic=true")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(result.stdout.strip().splitlines()[-1] + "/metrics.json")
    assert metrics["portable_random"]["enabled"] is False
    assert metrics["portable_random"]["not_portable"] == ["head_dropout (Dropout)"]
    assert metrics["deterministic"]["requested"] is True
    assert "enable_op_determinism" in metrics["deterministic"]["applied"]


def test_an_initializer_without_a_portable_draw_is_refused_in_one_line():
    driver = """
        from flowers import backend
        backend.select("torch")
        import keras
        from flowers import randomness
        from flowers.errors import FlowersError
        class Odd(keras.initializers.Initializer):
            def __call__(self, shape, dtype=None):
                return keras.ops.ones(shape, dtype)
        with randomness.recording_initializers() as found:
            layer = keras.layers.Dense(3, kernel_initializer=Odd(), name="odd_dense")
            model = keras.Sequential([keras.Input((2,)), layer])
        try:
            randomness.initialize(model, 0, found)
        except FlowersError as exc:
            print(exc)
    """
    result = python(driver)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert "layer 'odd_dense'" in line and "Odd" in line and "train.portable_random=false" in line


@pytest.mark.parametrize("args, expected", [
    (("--seeds", "0"), "Invalid value for '--seeds'"),
    (("--seeds", "2", "--resume"), "--resume continues one unfinished run"),
    (("--seeds", "2", "--set", "train.seed=4294967295"), "train.seed=4294967296"),
    (("--set", "train.portable_random=maybe"), "train.portable_random='maybe': expected true or false"),
])
def test_bad_seed_options_are_refused_in_one_line(tmp_path, args, expected):
    result = flowers("train", "-e", "smoke", "--backend", "torch", "--runs-dir", str(tmp_path), *args)
    assert result.returncode != 0
    assert expected in one_line_error(result)
    assert not any(tmp_path.rglob("metrics.json"))


def test_seeds_trains_one_complete_run_per_seed(tmp_path):
    """--seeds 2: seeds 5 and 6, each a run directory; seed 6 equals a run of seed 6 alone."""
    common = ("-e", "smoke", "--backend", "torch", "--set", "train.epochs=1")
    result = flowers("train", *common, "--set", "train.seed=5", "--seeds", "2",
                     "--runs-dir", str(tmp_path / "both"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    run_dirs = [line for line in lines if line.startswith(str(tmp_path))]
    assert len(run_dirs) == 2 and lines[-1] == run_dirs[-1]
    seeds = [read_json(f"{run}/metrics.json")["seed"] for run in run_dirs]
    assert seeds == [5, 6]
    alone = flowers("train", *common, "--set", "train.seed=6", "--runs-dir", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = alone.stdout.strip().splitlines()[-1]
    assert _history_losses(run_dirs[1]) == _history_losses(single)
    assert _history_losses(run_dirs[0]) != _history_losses(run_dirs[1])


def _history_losses(run_dir):
    from pathlib import Path

    return [row["val_loss"] for row in _history(Path(run_dir))]
