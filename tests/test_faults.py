"""Faults for real: a `flowers train` subprocess is killed (SIGKILL) or signalled (SIGTERM, SIGINT)
at named points (flowers.faults) or from outside, then `--resume` must finish it to exactly the run
left alone: the same history.csv, the same val metrics and the same trained weights, bit for bit,
under each backend (dropout and augmentation on, so the data order and every random draw count).
"""

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import zipfile

import h5py
import numpy as np
import pytest

from conftest import PROJECT_ROOT, flowers, read_json, run_dir_of

pytestmark = pytest.mark.slow

SETTINGS = ["train.epochs=4", "data.synthetic_train_images=16", "data.synthetic_val_images=8",
            "train.batch_size=8", "train.latency_repeats=1", "data.augment=true"]


def _args(backend):
    return ["train", "-e", "smoke", "--backend", backend,
            *[a for s in SETTINGS for a in ("--set", s)]]


_whole: dict = {}


def _uninterrupted(backend, tmp_path_factory):
    if backend not in _whole:
        root = tmp_path_factory.mktemp(f"whole-{backend}")
        _whole[backend] = run_dir_of(flowers(*_args(backend), "--runs-dir", str(root)))
    return _whole[backend]


def _weights(run_dir):
    """Every array in model.keras's weights file, by its path in the file."""
    with zipfile.ZipFile(run_dir / "model.keras") as archive:
        data = archive.read("model.weights.h5")
    arrays = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return arrays


def _assert_same_run(resumed, whole):
    assert (resumed / "history.csv").read_text() == (whole / "history.csv").read_text()
    got, want = read_json(resumed / "metrics.json"), read_json(whole / "metrics.json")
    assert got["resumed"] is True
    for key in ("epochs", "val_loss", "val_accuracy", "val_top5_accuracy"):
        assert got[key] == want[key], key
    mine, theirs = _weights(resumed), _weights(whole)
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        assert np.array_equal(mine[name], theirs[name]), name


def _resume(backend, root):
    resumed = flowers("train", "-e", "smoke", "--backend", backend, "--resume", "--runs-dir", str(root))
    return run_dir_of(resumed)


# (backend, FLOWERS_FAULT, expected exit code): each backend killed at other points (a kill right
# after an epoch's checkpoint: test_resume.py, test_early_stopping.py, test_finetune.py)
MATRIX = [
    ("tensorflow", "checkpoint-staged:2", -signal.SIGKILL),  # mid-write of the checkpoint
    ("tensorflow", "run-saved", -signal.SIGKILL),  # every file written, before the final rename
    ("torch", "train-step:2:0", -signal.SIGKILL),  # mid-epoch
    ("torch", "train-step:2:0=SIGTERM", 143),
    ("jax", "train-step:1:1=SIGINT", 130),
]


@pytest.mark.parametrize("backend,fault,code", MATRIX, ids=[f"{b}-{f}" for b, f, _ in MATRIX])
def test_a_killed_run_resumes_to_the_uninterrupted_result(backend, fault, code, tmp_path,
                                                          tmp_path_factory):
    killed = flowers(*_args(backend), "--runs-dir", str(tmp_path), env={"FLOWERS_FAULT": fault})
    assert killed.returncode == code, killed.stderr[-2000:]
    assert "Traceback" not in killed.stderr
    if code > 0:  # a signal: one line saying what is kept and the command that continues it
        line = killed.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: interrupted by {signal.Signals(code - 128).name}; ")
        assert f"flowers train -e smoke --backend {backend} --resume --runs-dir {tmp_path}" in line
    assert not [p for p in (tmp_path / "smoke" / backend).iterdir() if not p.name.startswith(".")]
    _assert_same_run(_resume(backend, tmp_path), _uninterrupted(backend, tmp_path_factory))


def test_sigterm_from_outside_mid_training(tmp_path, tmp_path_factory):
    """A preemption notice at an unplanned moment: SIGTERM once the first epoch is reported."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("KERAS_BACKEND", None)
    process = subprocess.Popen([sys.executable, "-m", "flowers.cli", *_args("tensorflow"),
                                "--runs-dir", str(tmp_path)], cwd=PROJECT_ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if lines.get(timeout=5).startswith("epoch 1/4"):
                    break
            except queue.Empty:
                assert process.poll() is None, process.stderr.read()
        else:
            pytest.fail("no epoch reported within 300 s")
        process.send_signal(signal.SIGTERM)
        stderr = process.stderr.read()
        assert process.wait(timeout=300) == 143, stderr
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted by SIGTERM; ")
    _assert_same_run(_resume("tensorflow", tmp_path), _uninterrupted("tensorflow", tmp_path_factory))


# the same check covers training_metadata.json and rng_state.npz (flowers.checkpoint._damage)
@pytest.mark.parametrize("damaged", ["latest.weights.h5"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(damaged, tmp_path, tmp_path_factory):
    """A disk that lost the end of the newest checkpoint's file: one warning, resume from the epoch
    before, and still the uninterrupted result."""
    killed = flowers(*_args("tensorflow"), "--runs-dir", str(tmp_path),
                     env={"FLOWERS_FAULT": "checkpoint-published:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (run,) = (tmp_path / "smoke" / "tensorflow").iterdir()
    target = run / "backup" / "epoch-3" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    resumed = flowers("train", "-e", "smoke", "--backend", "tensorflow", "--resume",
                      "--runs-dir", str(tmp_path))
    assert "resume: 2 of 4 epochs done" in resumed.stdout, resumed.stdout + resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and damaged in warnings[0], resumed.stderr
    _assert_same_run(run_dir_of(resumed), _uninterrupted("tensorflow", tmp_path_factory))
