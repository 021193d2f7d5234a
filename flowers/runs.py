"""Run directories: experiments/runs/<experiment>/<backend>/<run-id>/, complete or absent.

A run is written into `.incomplete-<run-id>/` beside its final place and renamed when everything is
in it, so a directory without the dot is always complete. An interrupted run keeps its
`.incomplete-` directory (with the epoch checkpoint) for `flowers train --resume`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowers import files
from flowers.config import Experiment, apply_overrides, differences, from_dict
from flowers.errors import FlowersError
from flowers.files import INCOMPLETE_PREFIX

RUN_FILES = ("config.json", "metrics.json", "history.csv", "model.keras")
# Every validation image's label and predicted probabilities (written by training, read by compare).
PREDICTIONS_FILE = "predictions.csv"


def new_run_id() -> str:
    """Sortable and unique: UTC time to the second plus 4 random hex digits."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def start_run(root: Path, experiment: Experiment, backend: str) -> Path:
    """Create the `.incomplete-<run-id>` directory for a new run and write its config.json."""
    parent = root / experiment.name / backend
    run_id = new_run_id()
    path = parent / f"{INCOMPLETE_PREFIX}{run_id}"
    path.mkdir(parents=True)
    files.write_json(path / "config.json", {"run_id": run_id, "backend": backend,
                                      "experiment": experiment.to_dict()})
    return path


def lock(run_dir: Path) -> int:
    """Hold an exclusive lock on run_dir for the rest of this process (released at exit, kill -9
    included); returns the descriptor. One writer per run directory: a second `flowers train
    --resume` of a run that is training now is refused in one line.

    The lock is on the directory itself (flock), so it follows the directory through its final
    rename and leaves no file behind.
    """
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FlowersError(f"{run_dir} is being trained by another flowers process right now; "
                           "wait for it to finish, or stop it and then --resume") from None
    return fd


@contextlib.contextmanager
def kept(run_dir: Path) -> Iterator[None]:
    """Say so in one line when the block fails because run_dir was deleted while it ran.

    Whatever write or read fails first (progress.json, a checkpoint, TensorBoard's events, in any
    library) fails because its folder is gone; the run cannot be resumed, since its checkpoints went
    with it. A library may have made the folder again meanwhile (TensorBoard's writer creates its
    log folder): a run folder without its config.json, the first file every run writes, was deleted
    too, and what was made again in it is removed.
    """
    try:
        yield
    except Exception as exc:
        if (run_dir / "config.json").is_file():
            raise
        if run_dir.is_dir() and files.is_incomplete(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # a library's leftovers, never a run
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise FlowersError(f"the run directory {run_dir} was deleted while the run was writing to "
                           f"it ({type(exc).__name__}: {detail}); nothing was published and its "
                           "checkpoints are gone: start the run again") from None


def find_incomplete(root: Path, experiment_name: str, backend: str) -> Path:
    """The newest unfinished run of experiment+backend; FlowersError when there is none."""
    parent = root / experiment_name / backend
    candidates = sorted(p for p in parent.glob(f"{INCOMPLETE_PREFIX}*")
                        if (p / "config.json").is_file())
    if not candidates:
        raise FlowersError(f"nothing to resume: no unfinished {experiment_name}/{backend} run "
                           f"under {root}")
    return candidates[-1]


def resume_settings(root: Path, experiment_name: str, backend: str,
                    overrides: Iterable[str] = ()) -> tuple[Path, Experiment]:
    """The newest unfinished run of experiment+backend and the settings it was started with.

    A resumed run continues with its own config.json, whatever the experiment file says now, so
    `--resume` needs no `--set`. An override is only checked (check_resumable): one that changes a
    stored setting is refused, naming each key.

    Raises:
        FlowersError: nothing to resume, or an override that conflicts with the stored settings.
    """
    resume_dir = find_incomplete(root, experiment_name, backend)
    saved, _ = read_run_config(resume_dir)
    return resume_dir, check_resumable(resume_dir, apply_overrides(saved, list(overrides)), saved)


def check_resumable(resume_dir: Path, experiment: Experiment,
                    saved: Experiment | None = None) -> Experiment:
    """experiment, if it has the settings resume_dir was started with; else a one-line FlowersError.

    The run's epochs so far were trained with the stored settings, so continuing with others would
    silently train a mix. train() calls this for every resume; resume_settings for the CLI, before
    the frameworks load.
    """
    saved = saved or read_run_config(resume_dir)[0]
    conflicts = differences(saved.to_dict(), experiment.to_dict())
    if conflicts:
        changes = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in conflicts)
        raise FlowersError(f"--resume: {resume_dir.name} was started with other settings ({changes}); "
                           "drop those --set values to resume it, or start a new run without --resume")
    return experiment


def finalize(incomplete: Path) -> Path:
    """Rename `.incomplete-<id>` to `<id>` once every run file is in it; returns the final path."""
    missing = [f for f in RUN_FILES if not (incomplete / f).is_file()]
    if missing:
        raise RuntimeError(f"run {incomplete} is missing {missing}; not finalizing")
    return files.publish_dir(incomplete, incomplete.with_name(files.final_name(incomplete)))


def read_run_config(run_dir: Path) -> tuple[Experiment, dict[str, Any]]:
    """The Experiment a run used and its raw config.json."""
    raw = files.read_json(run_dir / "config.json")
    return from_dict(raw["experiment"], origin=str(run_dir / "config.json")), raw


def check_complete(run_dir: str | Path) -> Path:
    """Return run_dir if it is a complete run directory, else raise a one-line FlowersError."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FlowersError(f"run directory not found: {path}")
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing or files.is_incomplete(path):
        what = f"missing {', '.join(missing)}" if missing else "unfinished"
        raise FlowersError(f"{path} is not a complete run directory ({what})")
    return path


def complete_runs(root: Path, experiment: str | None = None,
                  backend: str | None = None) -> list[Path]:
    """Complete run directories under root, oldest first (run ids sort by time)."""
    pattern = f"{experiment or '*'}/{backend or '*'}/*"
    runs = [p for p in root.glob(pattern)
            if p.is_dir() and not p.name.startswith(".") and
            all((p / f).is_file() for f in RUN_FILES)]
    return sorted(runs, key=lambda p: p.name)

