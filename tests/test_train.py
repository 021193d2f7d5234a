"""Training under every backend, each in its own process: complete run directories, real metrics."""

import csv
import json
import zipfile
from pathlib import Path

import pytest

from conftest import BACKENDS, flowers, python, read_json, run_dir_of
from flowers.metrics import LATENCY_KEYS, METRIC_KEYS
from flowers.runs import RUN_FILES


@pytest.mark.parametrize("backend", BACKENDS)
def test_smoke_run_is_complete_with_plausible_metrics(smoke_runs, backend):
    run = smoke_runs[backend]
    assert run.parent.name == backend and run.parent.parent.name == "smoke"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert any((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert not list(run.parent.glob(".incomplete-*"))

    metrics = read_json(run / "metrics.json")
    assert set(METRIC_KEYS) <= set(metrics)
    assert metrics["backend"] == backend and metrics["device"] == "cpu"
    assert metrics["backend_version"] and metrics["keras_version"] == "3.15.1"
    assert (metrics["num_train"], metrics["num_val"], metrics["num_classes"]) == (128, 64, 4)
    assert metrics["skipped_files"] == 0
    assert len(metrics["epoch_times_s"]) == 2 and all(t > 0 for t in metrics["epoch_times_s"])
    assert metrics["first_epoch_s"] == metrics["epoch_times_s"][0]
    assert metrics["train_time_s"] >= sum(metrics["epoch_times_s"])
    assert metrics["warmup_epochs"] == [0]
    assert metrics["train_images_per_s"] == pytest.approx(128 / metrics["epoch_times_s"][1])
    assert metrics["peak_host_rss_mb"] > 100
    assert metrics["peak_device_mem_mb"] is None
    assert "CPU" in metrics["null_reasons"]["peak_device_mem_mb"]
    assert metrics["eval_time_s"] > 0
    assert set(metrics["latency_ms"]) == set(LATENCY_KEYS)
    assert all(v > 0 for v in metrics["latency_ms"].values())
    assert metrics["latency_ms"]["batch32_p50"] > metrics["latency_ms"]["batch1_p50"]
    for key in ("val_accuracy", "val_top5_accuracy"):
        assert 0 <= metrics[key] <= 1
    assert metrics["val_loss"] > 0

    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "val_top5_accuracy"} <= set(rows[0])
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(metrics["val_accuracy"], abs=1e-6)

    config = read_json(run / "config.json")
    assert config["backend"] == backend and config["experiment"]["train"]["epochs"] == 2
    with zipfile.ZipFile(run / "model.keras") as archive:
        assert "flowers_class_names.json" in archive.namelist()
    assert read_json(run / "class_names.json") == [f"class_{i:02d}" for i in range(4)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_photos_beat_chance(flowers12_runs, backend):
    """Real photos, random frozen ResNet50 (learning on the generated set: tests/test_backbones.py)."""
    metrics = read_json(flowers12_runs[backend] / "metrics.json")
    assert (metrics["num_train"], metrics["num_val"], metrics["num_classes"]) == (720, 240, 12)
    # chance is 1/12 = 0.083; 0.15 is ~3.7 standard errors above it on 240 images
    assert metrics["val_accuracy"] >= 0.15, metrics["val_accuracy"]
    assert read_json(flowers12_runs[backend] / "class_names.json")[0] == "bluebell"


@pytest.mark.parametrize("other", ["tensorflow", "jax"])
def test_evaluate_torch_model_under_other_backends(learnable_runs, other):
    """The torch run of the custom backbone on the generated set."""
    run = learnable_runs["torch"]
    trained = read_json(run / "metrics.json")
    result = flowers("evaluate", str(run), "--backend", other)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads(result.stdout)
    assert evaluated["backend"] == other and evaluated["trained_backend"] == "torch"
    assert evaluated["num_val"] == 180
    assert evaluated["val_accuracy"] == pytest.approx(trained["val_accuracy"], abs=1e-9)
    assert evaluated["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-4)


def train_on_mock_tfds(experiment: str, examples: int, runs: Path) -> Path:
    """`flowers train -e EXPERIMENT` (tensorflow, 32 px, 1 epoch) on tfds.testing.mock_data: its run."""
    driver = f"""
        import tensorflow_datasets as tfds
        import flowers.host
        from flowers.cli import main
        # mock_data fakes the download and the records, but the builder still reports the data as
        # not prepared, so the pre-download network probe must be told the host is reachable.
        flowers.host.can_reach = lambda *args, **kwargs: True
        with tfds.testing.mock_data(num_examples={examples}):
            main(["train", "-e", "{experiment}", "--backend", "tensorflow", "--runs-dir", "{runs}",
                  "--set", "model.weights=none", "--set", "data.image_size=32",
                  "--set", "train.epochs=1", "--set", "train.latency_repeats=2"])
    """
    return run_dir_of(python(driver))


def test_tfds_source_end_to_end_with_mock_data(tmp_path):
    """tfds:oxford_flowers102 with the baseline's splits, driven by tfds.testing.mock_data."""
    run = train_on_mock_tfds("baseline", 40, tmp_path)
    metrics = read_json(run / "metrics.json")
    assert metrics["num_classes"] == 102
    assert metrics["num_train"] > 0 and metrics["num_val"] > 0
    assert metrics["train_images_per_s"] is None
    assert "2 epochs" in metrics["null_reasons"]["train_images_per_s"]
    names = read_json(run / "class_names.json")
    assert len(names) == 102 and names[0] == "pink primrose"


def test_tf_flowers_experiment_end_to_end_with_mock_data(tmp_path):
    """The tf_flowers experiment (tfds tf_flowers: only a train split, sliced 80/20), offline."""
    run = train_on_mock_tfds("tf_flowers", 50, tmp_path)
    metrics = read_json(run / "metrics.json")
    assert metrics["num_classes"] == 5
    assert metrics["num_train"] > 0 and metrics["num_val"] > 0  # mock_data ignores split slicing
    data = read_json(run / "config.json")["experiment"]["data"]
    assert (data["train_split"], data["val_split"]) == ("train[:80%]", "train[80%:]")  # no test split
    assert read_json(run / "class_names.json") == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]


def test_interrupted_run_resumes_to_a_complete_run(tmp_path):
    """A run that dies after epoch 1 leaves only an .incomplete- dir; --resume finishes it."""
    driver = f"""
        import sys
        from pathlib import Path
        from flowers import backend, config
        backend.select("tensorflow")
        import keras
        from flowers.training.loop import train

        class DieAfterFirstEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                raise SystemExit(9)

        exp = config.load_experiment("smoke", ["train.epochs=5"])
        train(exp, "tensorflow", Path("{tmp_path}"), callbacks=[DieAfterFirstEpoch()])
    """
    died = python(driver)
    assert died.returncode == 9, died.stderr[-2000:]
    parent = tmp_path / "smoke" / "tensorflow"
    assert [p.name.startswith(".incomplete-") for p in parent.iterdir()] == [True]
    incomplete = next(parent.iterdir())
    assert not (incomplete / "metrics.json").exists() and (incomplete / "backup").is_dir()

    run = run_dir_of(flowers("train", "-e", "smoke", "--set", "train.epochs=5", "--resume",
                             "--backend", "tensorflow", "--runs-dir", str(tmp_path)))
    assert run.name == incomplete.name.removeprefix(".incomplete-")
    metrics = read_json(run / "metrics.json")
    assert metrics["resumed"] is True and len(metrics["epoch_times_s"]) == 5
    # Both processes' first epochs carried tracing: only epochs 2-4 measure the steady speed.
    assert metrics["warmup_epochs"] == [0, 1]
    assert metrics["train_images_per_s"] == pytest.approx(128 * 3 / sum(metrics["epoch_times_s"][2:]))
    with (run / "history.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2", "3", "4"]
    assert not (run / "backup").exists() and not list(parent.glob(".incomplete-*"))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_augmented_training_runs_under_every_backend(tmp_path, backend):
    """data.augment once crashed under torch and jax (a Sequential converted tf.data tensors)."""
    run = run_dir_of(flowers("train", "-e", "smoke", "--backend", backend, "--runs-dir", str(tmp_path),
                             "--set", "data.augment=true", "--set", "train.epochs=1",
                             "--set", "train.latency_repeats=2"))
    metrics = read_json(run / "metrics.json")
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["num_train"] == 128
