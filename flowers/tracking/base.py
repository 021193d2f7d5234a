"""The one interface every tracker implements (flowers/tracking/__init__.py lists them).

The training loop calls, on the chief only and in this order:

    start(cfg, backend_name, resumed)   the run directory exists (config.json is in it)
    callbacks()                         Keras callbacks for every fit() of the run (per epoch)
    finish(run_dir)                     the run directory is complete and published (its final path)
    stop(status)                        instead of finish: "KILLED" (SIGINT/SIGTERM) or "FAILED"

A tracker must not raise from these for a destination that is unreachable: the run directory is the
record of the run; trackers are copies of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowers.config import Experiment


class Tracker:
    """A destination of a run's records; every method does nothing unless a tracker overrides it."""

    name = "tracker"

    def start(self, cfg: Experiment, backend_name: str, resumed: bool) -> None:
        """The run has started (or a --resume continues it)."""

    def callbacks(self) -> list[Any]:
        """keras.callbacks.Callback instances for fit() (imports keras: call after backend.select)."""
        return []

    def finish(self, run_dir: Path) -> None:
        """The run finished; run_dir is its complete, published directory."""

    def stop(self, status: str) -> None:
        """The run stopped before finishing: "KILLED" or "FAILED"."""
