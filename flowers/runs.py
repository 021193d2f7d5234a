"""Run directories: experiments/runs/<experiment>/<backend>/<run-id>/, complete or absent.

A run is written into `.incomplete-<run-id>/` beside its final place and renamed when everything is
in it, so a directory without the dot is always complete. An interrupted run keeps its
`.incomplete-` directory (with the epoch checkpoint) for `flowers train --resume`.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowers.config import Experiment, experiments_dir, from_dict
from flowers.errors import FlowersError

RUN_FILES = ("config.json", "metrics.json", "history.csv", "model.keras")
INCOMPLETE_PREFIX = ".incomplete-"


def runs_root(override: str | Path | None = None) -> Path:
    """--runs-dir, else $FLOWERS_RUNS_DIR, else experiments/runs."""
    if override:
        return Path(override)
    env = os.environ.get("FLOWERS_RUNS_DIR")
    return Path(env) if env else experiments_dir() / "runs"


def new_run_id() -> str:
    """Sortable and unique: UTC time to the second plus 4 random hex digits."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def start_run(root: Path, experiment: Experiment, backend: str) -> Path:
    """Create the `.incomplete-<run-id>` directory for a new run and write its config.json."""
    parent = root / experiment.name / backend
    run_id = new_run_id()
    path = parent / f"{INCOMPLETE_PREFIX}{run_id}"
    path.mkdir(parents=True)
    write_json(path / "config.json", {"run_id": run_id, "backend": backend,
                                      "experiment": experiment.to_dict()})
    return path


def find_incomplete(root: Path, experiment_name: str, backend: str) -> Path:
    """The newest unfinished run of experiment+backend; FlowersError when there is none."""
    parent = root / experiment_name / backend
    candidates = sorted(p for p in parent.glob(f"{INCOMPLETE_PREFIX}*")
                        if (p / "config.json").is_file())
    if not candidates:
        raise FlowersError(f"nothing to resume: no unfinished {experiment_name}/{backend} run "
                           f"under {root}")
    return candidates[-1]


def finalize(incomplete: Path) -> Path:
    """Rename `.incomplete-<id>` to `<id>` once every run file is in it; returns the final path."""
    missing = [f for f in RUN_FILES if not (incomplete / f).is_file()]
    if missing:
        raise RuntimeError(f"run {incomplete} is missing {missing}; not finalizing")
    final = incomplete.with_name(incomplete.name.removeprefix(INCOMPLETE_PREFIX))
    incomplete.rename(final)
    return final


def read_run_config(run_dir: Path) -> tuple[Experiment, dict[str, Any]]:
    """The Experiment a run used and its raw config.json."""
    raw = read_json(run_dir / "config.json")
    return from_dict(raw["experiment"], origin=str(run_dir / "config.json")), raw


def check_complete(run_dir: str | Path) -> Path:
    """Return run_dir if it is a complete run directory, else raise a one-line FlowersError."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FlowersError(f"run directory not found: {path}")
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing or path.name.startswith(INCOMPLETE_PREFIX):
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


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FlowersError(f"{path}: unreadable JSON ({exc})") from None
