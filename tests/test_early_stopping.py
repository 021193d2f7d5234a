"""train.early_stopping_patience: a phase ends when val_loss stops improving, with its best weights,
and a run killed anywhere around the stop resumes to the same result.

Smoke model (random ResNet50, 32 px, 16 synthetic images) under tensorflow at a learning rate high
enough that val_loss rises within a few epochs; dropout off, so a resumed run trains bit-identically.
"""

import csv
import signal

import pytest

from conftest import flowers, one_line_error, read_json, run_dir_of

ARGS = ["train", "-e", "smoke", "--backend", "tensorflow",
        *[a for s in ["data.synthetic_train_images=16", "data.synthetic_val_images=8",
                      "train.batch_size=8", "train.latency_repeats=1", "train.epochs=6",
                      "train.early_stopping_patience=1", "model.dropout=0", "train.learning_rate=0.05"]
          for a in ("--set", s)]]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    return run_dir_of(flowers(*ARGS, "--runs-dir", str(tmp_path_factory.mktemp("early"))))


@pytest.mark.slow
def test_a_phase_stops_when_val_loss_stops_improving_and_keeps_its_best_weights(stopped_run):
    metrics = read_json(stopped_run / "metrics.json")
    with (stopped_run / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    val_losses = [float(row["val_loss"]) for row in history]
    stop = metrics["early_stopping"]["head"]
    assert stop["stopped_epoch"] is not None and stop["stopped_epoch"] < 6, metrics["early_stopping"]
    # patience 1: the epoch after the best one did not improve, and the run ended there
    assert stop["stopped_epoch"] == stop["best_epoch"] + 1
    assert len(history) == metrics["epochs"] == stop["stopped_epoch"]
    assert min(val_losses) == val_losses[stop["best_epoch"] - 1] < val_losses[-1]
    # the saved and evaluated model is the best epoch's, not the last one's
    assert metrics["val_loss"] == pytest.approx(min(val_losses), rel=1e-5)
    assert len(metrics["epoch_times_s"]) == metrics["epochs"]


@pytest.mark.slow
@pytest.mark.parametrize("killed_after", [2, "stop"], ids=["before-the-stop", "at-the-stop"])
def test_a_run_killed_around_the_stop_resumes_to_the_same_result(stopped_run, tmp_path, killed_after):
    expected = read_json(stopped_run / "metrics.json")
    if killed_after == "stop":  # the stopping epoch's checkpoint is written, the run directory not
        killed_after = expected["early_stopping"]["head"]["stopped_epoch"]
    killed = flowers(*ARGS, "--runs-dir", str(tmp_path),
                     env={"FLOWERS_FAULT": f"checkpoint-published:{killed_after}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_dir_of(flowers("train", "-e", "smoke", "--backend", "tensorflow", "--resume",
                                 "--runs-dir", str(tmp_path)))
    metrics = read_json(resumed / "metrics.json")
    assert metrics["resumed"] is True
    for key in ("early_stopping", "epochs", "val_loss", "val_accuracy"):
        assert metrics[key] == expected[key], key
    assert (resumed / "history.csv").read_text() == (stopped_run / "history.csv").read_text()


def test_negative_patience_is_refused():
    error = one_line_error(flowers("train", "-e", "smoke", "--backend", "tensorflow",
                                   "--set", "train.early_stopping_patience=-1"))
    assert "train.early_stopping_patience=-1: must be >= 0 (0 = off)" in error
