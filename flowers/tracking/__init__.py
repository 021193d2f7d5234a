"""Experiment trackers: where a run's records go besides its run directory (THE tracker registry).

    tensorboard   every run: TensorBoard event files in <run>/logs (per epoch)
    mlflow        `--track mlflow` (or FLOWERS_TRACK=mlflow): the run, its parameters, per-epoch and
                  final metrics, tags and files in MLflow at MLFLOW_TRACKING_URI (MLflow's default
                  store, sqlite:///mlflow.db, when unset); `flowers compare` logs a parent run over
                  the backend runs; `flowers export` registers a model version

A tracker is a `Tracker` (base.py): the training loop calls it on the chief only, and a tracker that
cannot reach its destination never stops or slows training (mlflow_client.Sender).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flowers import interrupt
from flowers.errors import FlowersError
from flowers.tracking.base import Tracker

# The trackers a user turns on (TensorBoard is always on).
OPTIONAL = ("mlflow",)


def parse(names: Iterable[str]) -> tuple[str, ...]:
    """--track values, checked: each an optional tracker, its packages installed."""
    chosen = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    for name in chosen:
        if name not in OPTIONAL:
            raise FlowersError(f"unknown tracker {name!r}; valid: {', '.join(OPTIONAL)}")
    if "mlflow" in chosen:
        from flowers.tracking import mlflow_client

        mlflow_client.check()
    return chosen


@dataclass(frozen=True)
class Tracking:
    """Which trackers a command writes to, and where their warnings go (the CLI's stderr)."""

    names: tuple[str, ...] = ()
    warn: Callable[[str], None] = field(default=lambda line: None, compare=False)

    def open(self, run_dir: Path) -> list[Tracker]:
        """The trackers of one run directory, TensorBoard first."""
        from flowers.tracking.tensorboard import TensorBoardTracker

        trackers: list[Tracker] = [TensorBoardTracker(run_dir)]
        if "mlflow" in self.names:
            from flowers.tracking.mlflow_run import MlflowTracker

            trackers.append(MlflowTracker(run_dir, self.warn))
        return trackers


@contextlib.contextmanager
def stopping(trackers: Sequence[Tracker]) -> Iterator[None]:
    """Tell the trackers how a run that did not finish ended: KILLED (SIGINT/SIGTERM) or FAILED."""
    try:
        yield
    except interrupt.Interrupted:
        for tracker in trackers:
            tracker.stop("KILLED")
        raise
    except Exception:
        for tracker in trackers:
            tracker.stop("FAILED")
        raise
