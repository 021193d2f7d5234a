"""TensorBoard: every run's event files in <run>/logs (train/ and validation/, one point per epoch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowers.tracking.base import Tracker


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path):
        self.log_dir = run_dir / "logs"

    def callbacks(self) -> list[Any]:
        import keras

        return [keras.callbacks.TensorBoard(str(self.log_dir), write_graph=False, profile_batch=0)]
