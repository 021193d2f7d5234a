"""Faults for real: a `flowers train` subprocess is killed (SIGKILL) or signalled (SIGTERM, SIGINT)
at named points (flowers.faults) or from outside, then `--resume` must finish it to exactly the run
left alone: the same history.csv, the same val metrics and the same trained weights, bit for bit,
under each backend (dropout and augmentation on, so the data order and every random draw count).
"""

import contextlib
import hashlib
import io
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import PROJECT_ROOT, flowers, read_json, run_dir_of

pytestmark = pytest.mark.slow

SETTINGS = ["train.epochs=4", "data.synthetic_train_images=16", "data.synthetic_val_images=8",
            "train.batch_size=8", "train.latency_repeats=1", "data.augment=true"]


def _args(backend, *extra):
    return ["train", "-e", "smoke", "--backend", backend,
            *[a for s in (*SETTINGS, *extra) for a in ("--set", s)]]


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


# (backend, FLOWERS_FAULT, expected exit code, train.checkpoint_every_steps, the state resumed
# from): each backend killed at other points (a kill right after an epoch's checkpoint:
# test_resume.py, test_early_stopping.py, test_finetune.py). An epoch is 2 steps.
MATRIX = [
    ("tensorflow", "checkpoint-staged:2", -signal.SIGKILL, 0, "epoch-1"),  # mid-write of epoch 2's
    ("tensorflow", "run-saved", -signal.SIGKILL, 0, "epoch-4"),  # every file written, not renamed
    ("torch", "train-step:2:0", -signal.SIGKILL, 0, "epoch-2"),  # mid-epoch: the epoch again
    ("torch", "train-step:2:0=SIGTERM", 143, 0, "epoch-2-step-1"),  # the signal saves that step
    ("jax", "train-step:1:1=SIGINT", 130, 0, "epoch-2"),  # an epoch's last step: the epoch finishes
    ("tensorflow", "train-step:1:1", -signal.SIGKILL, 1, "epoch-1-step-1"),  # a step state
    ("jax", "checkpoint-staged:1:1", -signal.SIGKILL, 1, "epoch-1"),  # mid-write of a step state
]


@pytest.mark.parametrize("backend,fault,code,every_steps,resumed_from", MATRIX,
                         ids=[f"{m[0]}-{m[1]}" + (f"-every-{m[3]}" if m[3] else "") for m in MATRIX])
def test_a_killed_run_resumes_to_the_uninterrupted_result(backend, fault, code, every_steps,
                                                          resumed_from, tmp_path, tmp_path_factory,
                                                          fault_row):
    every = [f"train.checkpoint_every_steps={every_steps}"] if every_steps else []
    row = fault_row(kind="signal" if code > 0 else "kill", backend=backend,
                    fault=(f"FLOWERS_FAULT={fault}" if code > 0 else f"SIGKILL at {fault}")
                    + "".join(f", {e}" for e in every))
    killed = flowers(*_args(backend, *every), "--runs-dir", str(tmp_path),
                     env={"FLOWERS_FAULT": fault})
    assert killed.returncode == code, killed.stderr[-2000:]
    row["traceback"] = "Traceback" in killed.stderr
    assert not row["traceback"]
    if code > 0:  # a signal: one line saying what is kept and the command that continues it
        line = killed.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: interrupted by {signal.Signals(code - 128).name}; ")
        assert f"flowers train -e smoke --backend {backend} --resume --runs-dir {tmp_path}" in line
    runs = list((tmp_path / "smoke" / backend).iterdir())
    assert len(runs) == 1 and runs[0].name.startswith(".incomplete-"), runs
    if resumed_from != "epoch-4":  # the newest state is the one the resume continues from
        saved = [p for p in (runs[0] / "backup").glob("epoch-*")
                 if (p / "training_metadata.json").is_file()]
        newest = max(saved, key=lambda p: [int(n) for n in p.name.split("-")[1::2]])
        assert newest.name == resumed_from
    row["outcome"] = (f"exit {code}, one line with the resume command; " if code > 0 else "") + \
        f"an .incomplete- run that --resume completes from {resumed_from}"
    resumed = flowers("train", "-e", "smoke", "--backend", backend, "--resume", "--runs-dir", str(tmp_path))
    if "step" in resumed_from:
        assert "steps of epoch" in resumed.stdout  # resume: epoch E of 4 and S of 2 steps of ...
    _assert_same_run(run_dir_of(resumed), _uninterrupted(backend, tmp_path_factory))
    row["identical"] = True


@contextlib.contextmanager
def _training_after_epoch_1(runs_dir):
    """A tensorflow smoke run as a subprocess (its own process group), handed over once it has
    reported epoch 1; killed with its group if the test leaves it running."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("KERAS_BACKEND", None)
    process = subprocess.Popen([sys.executable, "-m", "flowers.cli", *_args("tensorflow"),
                                "--runs-dir", str(runs_dir)], cwd=PROJECT_ROOT, env=env, text=True,
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
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_sigterm_from_outside_mid_training(tmp_path, tmp_path_factory, fault_row):
    """A preemption notice at an unplanned moment: SIGTERM once the first epoch is reported."""
    row = fault_row(kind="signal", backend="tensorflow", fault="SIGTERM from outside after epoch 1")
    with _training_after_epoch_1(tmp_path) as process:
        process.send_signal(signal.SIGTERM)
        stderr = process.stderr.read()
        assert process.wait(timeout=300) == 143, stderr
    row["traceback"] = "Traceback" in stderr
    assert not row["traceback"]
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted by SIGTERM; ")
    row["outcome"] = "exit 143, one line with the resume command; --resume completes it"
    _assert_same_run(_resume("tensorflow", tmp_path), _uninterrupted("tensorflow", tmp_path_factory))
    row["identical"] = True


# the same check covers training_metadata.json and rng_state.npz (flowers.checkpoint._damage)
@pytest.mark.parametrize("damaged", ["latest.weights.h5"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(damaged, tmp_path, tmp_path_factory,
                                                                 fault_row):
    """A disk that lost the end of the newest checkpoint's file: one warning, resume from the epoch
    before, and still the uninterrupted result."""
    row = fault_row(kind="damaged file", backend="tensorflow",
                    fault=f"SIGKILL after epoch 3's checkpoint, then its {damaged} cut in half")
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
    row["traceback"] = "Traceback" in resumed.stderr
    row["outcome"] = "one warning; resumes from epoch 2's checkpoint"
    _assert_same_run(run_dir_of(resumed), _uninterrupted("tensorflow", tmp_path_factory))
    row["identical"] = True


# ---- a full disk: one line naming the file, nothing published, a rerun with room succeeds --------
# The limit is the process's file-size limit (ulimit -f, as a shell sets it): a write past it fails
# with EFBIG like a full disk's ENOSPC (both handled by flowers.files.no_space, ENOSPC for real in
# test_no_space_reads_each_librarys_way_of_saying_it), and it needs no root and no mount.
FILE_LIMIT_KB = 40_000  # under the 94 MB weights file, over every small file


def _with_file_limit(*args: str, limit_kb: int = FILE_LIMIT_KB) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("KERAS_BACKEND", None)
    return subprocess.run(["bash", "-c", f'ulimit -f {limit_kb} && exec "$0" -m flowers.cli "$@"',
                           sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=PROJECT_ROOT, timeout=600)


def _no_space_line(result, under) -> str:
    from conftest import one_line_error

    line = one_line_error(result)
    assert line.startswith(f"error: no space left writing {under}/"), line
    assert "File too large: over the file-size limit" in line and "run the command again" in line
    return line


def test_a_full_disk_stops_train_export_and_compare_and_a_rerun_finishes(tmp_path, tmp_path_factory,
                                                                       fault_row):
    runs, exports, reports = tmp_path / "runs", tmp_path / "exports", tmp_path / "reports"
    row = fault_row(kind="disk full", backend="tensorflow", fault="flowers train, file-size limit 40 MB")
    _no_space_line(_with_file_limit(*_args("tensorflow"), "--runs-dir", str(runs)), runs)
    (unfinished,) = (runs / "smoke" / "tensorflow").iterdir()
    assert unfinished.name.startswith(".incomplete-")  # nothing that looks like a finished run
    run = _resume("tensorflow", runs)
    row["outcome"] = "one line naming the file; an .incomplete- run that --resume completes"
    _assert_same_run(run, _uninterrupted("tensorflow", tmp_path_factory))
    row["identical"] = True

    row = fault_row(kind="disk full", backend="tensorflow", fault="flowers export, file-size limit 40 MB")
    _no_space_line(_with_file_limit("export", str(run), "--out", str(exports)), exports / "smoke")
    assert list((exports / "smoke").iterdir()) == []  # no version, not even a staged one
    version = run_dir_of(flowers("export", str(run), "--formats", "keras", "--out", str(exports)))
    assert version == exports / "smoke" / "v1"
    assert read_json(version / "manifest.json")["verification"]["passed"] is True
    row["outcome"] = "one line naming the file; no version; the rerun writes v1"

    row = fault_row(kind="disk full", backend="tensorflow", fault="flowers compare, file-size limit 2 KB")
    _no_space_line(_with_file_limit("compare", str(run), "--out", str(reports), limit_kb=2), reports)
    assert not (reports / "smoke").exists() and not [p for p in reports.iterdir() if p.is_dir()]
    report = flowers("compare", str(run), "--out", str(reports))
    assert report.returncode == 0 and (reports / "smoke" / "comparison.md").is_file(), report.stderr
    row["outcome"] = "one line naming the file; no report; the rerun writes it"


def test_no_space_reads_each_librarys_way_of_saying_it(tmp_path):
    """A real ENOSPC (/dev/full), h5py's and TensorFlow's messages, and an error that is not one."""
    import errno

    from flowers import files

    with open("/dev/full", "wb", buffering=0) as device, pytest.raises(OSError) as full:
        device.write(b"x")
    assert full.value.errno == errno.ENOSPC
    line = files.no_space(full.value)
    assert line.startswith("no space left (No space left on device)"), line
    h5py_style = OSError(27, "Can't synchronously write data (file write failed: filename = "
                             "'/runs/x/latest.weights.h5', errno = 27, error message = 'File too large')")
    assert files.no_space(h5py_style).startswith(
        "no space left writing /runs/x/latest.weights.h5 (File too large: over the file-size limit")
    tf_style = RuntimeError("could not write '/exp/v3/savedmodel/variables/variables.data-00000-of-00001'")
    tf_style.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert files.no_space(tf_style).startswith(  # the file named by the error around the cause
        "no space left writing /exp/v3/savedmodel/variables/variables.data-00000-of-00001 (No space")
    assert files.no_space(ValueError("File format not supported")) is None
    assert files.no_space(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None
    # a folder that turns read-only or loses its permissions while a command writes into it
    assert files.write_error(OSError(errno.EROFS, "Read-only file system", "/runs/x.h5")) == (
        "cannot write /runs/x.h5 (Read-only file system); nothing was published: make the folder "
        "writable or use another one (an unfinished training run continues with --resume)")
    refused = RuntimeError("saving failed")
    refused.__context__ = PermissionError(errno.EACCES, "Permission denied", "/exports/v2")
    assert files.write_error(refused).startswith("no permission for /exports/v2 (Permission denied)")
    assert files.write_error(full.value).startswith("no space left")
    assert files.write_error(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None


# ---- a read-only output folder; a run directory deleted while the run writes to it -----------
def _read_only(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`flowers args` with folder read-only for it alone: a read-only bind mount in the process's
    own mount namespace (unshare -rm: a user namespace, so it needs no root, and root's chmod
    bypass cannot write through it either)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"needs unshare -rm (user and mount namespaces): {probe.stderr.strip()}")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("KERAS_BACKEND", None)
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(folder), sys.executable,
                           "-m", "flowers.cli", *args], capture_output=True, text=True, env=env,
                          cwd=PROJECT_ROOT, timeout=300)


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, finished_run, fault_row):
    from conftest import one_line_error

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    for command, option in ((_args("tensorflow"), "--runs-dir"),
                            (["export", str(finished_run)], "--out"),
                            (["compare", str(finished_run)], "--out")):
        row = fault_row(kind="read-only folder", backend="tensorflow",
                        fault=f"flowers {command[0]} {option} on a read-only mount")
        started = time.monotonic()
        line = one_line_error(_read_only(read_only, *command, option, str(read_only / "out")))
        row["traceback"] = False
        folder = read_only / "out" / ("smoke" if command[0] == "export" else "")
        assert line == (f"error: cannot write to {str(folder).rstrip('/')} (Read-only file system); "
                        f"make it writable or choose another folder with {option}")
        row["outcome"] = f"refused in one line after {time.monotonic() - started:.0f} s, nothing written"
    assert list(read_only.iterdir()) == []


def test_a_run_directory_deleted_mid_run_stops_it_in_one_line(tmp_path, fault_row):
    """The folder goes away under a training run (someone cleans up, a volume is unmounted)."""
    row = fault_row(kind="vanishing folder", backend="tensorflow",
                    fault="the .incomplete- run directory deleted after epoch 1")
    with _training_after_epoch_1(tmp_path) as process:
        (run,) = (tmp_path / "smoke" / "tensorflow").iterdir()
        for _ in range(50):  # the run may be writing into it meanwhile
            shutil.rmtree(run, ignore_errors=True)
            if not run.exists():
                break
        stderr = process.stderr.read()
        code = process.wait(timeout=300)
    row["traceback"] = "Traceback" in stderr
    assert code == 1 and not row["traceback"], stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: the run directory {run} was deleted while the run was writing "
                           "to it ("), line
    assert line.endswith("nothing was published and its checkpoints are gone: start the run again")
    assert list((tmp_path / "smoke" / "tensorflow").iterdir()) == []
    row["outcome"] = "exit 1, one line saying the run directory was deleted; nothing published"


# ---- the kill matrix for `flowers export` and `flowers compare` ---------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return _uninterrupted("tensorflow", tmp_path_factory)


def _published(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def _killed(fault_row, command: str, fault: str, *args: str):
    row = fault_row(kind="kill", backend="tensorflow", fault=f"flowers {command}, SIGKILL at {fault}")
    killed = flowers(command, *args, env={"FLOWERS_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    row["traceback"] = "Traceback" in killed.stderr
    assert not row["traceback"]
    return row


def test_a_killed_export_leaves_no_version_or_a_complete_one(finished_run, tmp_path, fault_row):
    """Killed mid-write (model.keras copied), mid-verification (one backend's Keras process done)
    and just before the rename: no version, and `flowers exports list` shows none. Killed just
    after the rename: a complete, verified version, numbered v1: the killed attempts took no number."""
    exports, args = tmp_path / "exports", (str(finished_run), "--formats", "keras", "--out",
                                           str(tmp_path / "exports"))
    for fault in ("export-copied", "export-worker:tensorflow", "publish-staged"):
        row = _killed(fault_row, "export", fault, *args)
        assert _published(exports / "smoke") == [], fault
        listed = flowers("exports", "list", "--out", str(exports))
        assert listed.returncode == 0 and "v1" not in listed.stdout, listed.stdout + listed.stderr
        row["outcome"] = "no version"
        # the killed attempt's staging folder stays until the next export's start deletes it
        assert len([p for p in (exports / "smoke").iterdir() if p.name.startswith(".")]) == 1
    row = _killed(fault_row, "export", "publish-done", *args)
    assert sorted(p.name for p in (exports / "smoke").iterdir()) == ["v1"]  # no stale staging left
    manifest = read_json(exports / "smoke" / "v1" / "manifest.json")
    assert manifest["version"] == 1 and manifest["verification"]["passed"] is True
    written = (exports / "smoke" / "v1" / "model.keras").read_bytes()
    assert hashlib.sha256(written).hexdigest() == manifest["files"]["model.keras"]["sha256"]
    row["outcome"] = "a complete, verified v1 (the killed attempts took no number)"


def test_a_killed_compare_leaves_the_old_report_or_the_new_one(finished_run, tmp_path, fault_row):
    reports = tmp_path / "reports"
    args = (str(finished_run), "--out", str(reports))
    first = flowers("compare", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    old = (reports / "smoke" / "comparison.json").read_text()

    row = _killed(fault_row, "compare", "publish-staged", *args)
    assert (reports / "smoke" / "comparison.json").read_text() == old
    row["outcome"] = "the previous report, whole"
    row = _killed(fault_row, "compare", "publish-exchanged", *args)
    new = read_json(reports / "smoke" / "comparison.json")
    assert (reports / "smoke" / "comparison.json").read_text() != old  # its creation time differs
    assert {"comparison.md", "comparison.csv", *new["charts"]} <= set(_published(reports / "smoke"))
    row["outcome"] = "the new report, whole (swapped in with one atomic rename)"
    again = flowers("compare", *args)
    assert again.returncode == 0 and _published(reports) == ["smoke"], again.stderr[-2000:]
    assert sorted(p.name for p in reports.iterdir()) == ["smoke"]  # the killed ones' folders went
