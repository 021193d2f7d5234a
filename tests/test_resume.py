"""`--resume` continues with the interrupted run's own settings; only a conflicting --set is refused.

The library check (runs.resume_settings) is tested in-process; one bare `flowers train --resume`
trains a tiny run to show the CLI uses it.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import flowers, one_line_error, read_json, run_dir_of
from flowers import config, runs
from flowers.errors import FlowersError


def _interrupted(root, overrides, backend="tensorflow"):
    """An .incomplete- run of smoke started with `overrides` (as runs.start_run leaves it)."""
    return runs.start_run(root, config.load_experiment("smoke", overrides), backend)


def test_bare_resume_takes_the_runs_settings(tmp_path):
    started = _interrupted(tmp_path, ["train.epochs=3", "data.image_size=48"])
    resume_dir, experiment = runs.resume_settings(tmp_path, "smoke", "tensorflow")
    assert resume_dir == started
    assert (experiment.train.epochs, experiment.data.image_size) == (3, 48)  # smoke.toml says 2, 32


def test_a_set_that_repeats_a_stored_value_is_accepted(tmp_path):
    _interrupted(tmp_path, ["train.epochs=3"])
    _, experiment = runs.resume_settings(tmp_path, "smoke", "tensorflow", ["train.epochs=3"])
    assert experiment.train.epochs == 3


def test_a_conflicting_set_is_refused_naming_each_key(tmp_path):
    started = _interrupted(tmp_path, ["train.epochs=3"])
    with pytest.raises(FlowersError) as info:
        runs.resume_settings(tmp_path, "smoke", "tensorflow",
                             ["train.epochs=8", "train.learning_rate=0.01"])
    message = str(info.value)
    assert f"--resume: {started.name} was started with other settings" in message
    assert "train.learning_rate: 0.0001 -> 0.01" in message and "train.epochs: 3 -> 8" in message
    # a --set that is wrong in itself is still refused as such
    with pytest.raises(FlowersError, match="unknown key train.epochz"):
        runs.resume_settings(tmp_path, "smoke", "tensorflow", ["train.epochz=3"])


def test_nothing_to_resume(tmp_path):
    with pytest.raises(FlowersError, match="nothing to resume: no unfinished smoke/jax run"):
        runs.resume_settings(tmp_path, "smoke", "jax")


def test_conflict_from_the_cli_is_one_line(tmp_path):
    _interrupted(tmp_path, ["train.epochs=3"])
    error = one_line_error(flowers("train", "-e", "smoke", "--backend", "tensorflow", "--resume",
                                   "--set", "train.epochs=8", "--runs-dir", str(tmp_path)))
    assert "train.epochs: 3 -> 8" in error


@pytest.mark.slow
def test_bare_resume_from_the_cli_finishes_the_run_with_its_settings(tmp_path):
    # smoke.toml says 2 epochs at 32 px; the interrupted run was started with other settings
    started = _interrupted(tmp_path, ["train.epochs=1", "data.synthetic_train_images=16",
                                      "data.synthetic_val_images=8", "train.batch_size=8",
                                      "train.latency_repeats=1"])
    run = run_dir_of(flowers("train", "-e", "smoke", "--backend", "tensorflow", "--resume",
                             "--runs-dir", str(tmp_path)))
    assert run.name == started.name.removeprefix(runs.INCOMPLETE_PREFIX)
    metrics = read_json(run / "metrics.json")
    assert metrics["resumed"] is True
    assert (metrics["epochs"], metrics["num_train"], metrics["num_val"]) == (1, 16, 8)
    assert read_json(run / "config.json")["experiment"]["train"]["epochs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["train.cache_features=true"]], ids=["images", "feature-cache"])
def test_a_run_killed_after_its_last_checkpoint_keeps_what_it_trained(tmp_path, extra):
    # Killed once the last epoch's checkpoint is published, before the run directory is written: the
    # resumed process has no epoch left to fit, and must still evaluate and save the trained model
    # (it once evaluated freshly built weights: val_loss 3.03 where the trained model has 1.58).
    args = ["train", "-e", "smoke", "--backend", "tensorflow",
            *[a for s in ["train.epochs=2", "data.synthetic_train_images=16", "data.synthetic_val_images=8",
                          "train.batch_size=8", "train.latency_repeats=1", *extra] for a in ("--set", s)]]
    killed = flowers(*args, "--runs-dir", str(tmp_path / "killed"),
                     env={"FLOWERS_FAULT": "checkpoint-published:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = flowers("train", "-e", "smoke", "--backend", "tensorflow", "--resume",
                      "--runs-dir", str(tmp_path / "killed"))
    assert "resume: 2 of 2 epochs done" in resumed.stdout
    whole = run_dir_of(flowers(*args, "--runs-dir", str(tmp_path / "whole")))
    uninterrupted = read_json(whole / "metrics.json")
    metrics = read_json(run_dir_of(resumed) / "metrics.json")
    assert metrics["resumed"] is True
    assert (metrics["val_loss"], metrics["val_accuracy"]) == \
        (uninterrupted["val_loss"], uninterrupted["val_accuracy"])


def test_a_second_resume_of_a_run_being_trained_is_refused(tmp_path):
    started = _interrupted(tmp_path, ["train.epochs=1"])
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from flowers import runs
        runs.lock(Path({str(started)!r}))
        print("locked", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        error = one_line_error(flowers("train", "-e", "smoke", "--backend", "tensorflow", "--resume",
                                       "--runs-dir", str(tmp_path), timeout=300))
        assert f"{started} is being trained by another flowers process right now" in error
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    # the killed holder's lock went with it (the first lock succeeds); a second holder is refused
    with pytest.raises(FlowersError, match="being trained"):
        runs.lock(started)
        runs.lock(started)
