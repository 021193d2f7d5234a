"""One training run in MLflow (`flowers train --track mlflow`).

The MLflow run lives in the experiment named after the flowers experiment and carries:
- params: every setting (section.key), backend, framework versions, device, CPU, git commit and dirty
  state, the run id and folder;
- tags: experiment, backend, seed, phase (the phase training now, then its last), flowers.run_id;
- metrics: each epoch's logs (loss, accuracy, val_loss, ...; step = the epoch, from 0 as in
  history.csv), then metrics.json's numbers as final/<key> at step 0 (nested keys joined with ".");
- artifacts: config.json, metrics.json, history.csv, predictions.csv, class_names.json and
  learning_curve.png (drawn from history.csv into the run directory).

Its id is kept in the run directory's tracking.json, so `--resume` continues the same MLflow run. A
run stopped by SIGINT/SIGTERM ends KILLED, one that raised ends FAILED; a SIGKILLed one stays RUNNING
until --resume continues it.
"""

from __future__ import annotations

import csv
import numbers
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flowers import backend, config, files, host
from flowers.config import Experiment
from flowers.errors import FlowersError
from flowers.tracking.base import Tracker
from flowers.tracking.mlflow_client import Sender

TRACKING_FILE = "tracking.json"
LEARNING_CURVE = "learning_curve.png"
ARTIFACTS = ("config.json", "metrics.json", "history.csv", "predictions.csv", "class_names.json",
             LEARNING_CURVE)


def saved_run(run_dir: Path) -> dict[str, str]:
    """tracking.json's MLflow entry ({"run_id", "tracking_uri"}); {} for a run never tracked."""
    path = run_dir / TRACKING_FILE
    return files.read_json(path).get("mlflow", {}) if path.is_file() else {}


def save_run(run_dir: Path, run_id: str, uri: str) -> None:
    """Write tracking.json: the MLflow run a run directory is tracked under, and its store."""
    files.write_json(run_dir / TRACKING_FILE, {"mlflow": {"run_id": run_id, "tracking_uri": uri}})


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, warn: Callable[[str], None]):
        self.run_dir = run_dir
        self.sender = Sender(warn)
        self.head_epochs = 0  # set by start(): epochs before it are the head phase's
        self._saved = False
        self._phase = ""

    def start(self, cfg: Experiment, backend_name: str, resumed: bool) -> None:
        raw = files.read_json(self.run_dir / "config.json")
        saved = saved_run(self.run_dir) if resumed else {}
        # --resume continues the MLflow run it started, when it was tracked in this same store
        run_id = saved.get("run_id") if saved.get("tracking_uri") == self.sender.uri else None
        self.head_epochs = cfg.train.epochs
        self.sender.send("start", run_id=run_id, experiment=cfg.name,
                         run_name=f"{backend_name}-seed{cfg.train.seed}-{raw['run_id']}",
                         tags=run_tags(cfg.name, backend_name, cfg.train.seed, raw["run_id"]))
        if run_id is None:  # a resumed run logged these when it started
            self.sender.send("log", params=run_params(raw, live_facts(backend_name, self.run_dir)))
            if resumed and (self.run_dir / "history.csv").is_file():  # the epochs trained untracked
                self.sender.send("log", metrics=epoch_metrics(self.run_dir))

    def callbacks(self) -> list[Any]:
        import keras

        tracker = self

        class EpochMetrics(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                tracker.epoch(epoch, logs or {})

        return [EpochMetrics()]

    def epoch(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """One epoch's logs, as metrics at step=epoch; the phase tag when it changed."""
        now = int(time.time() * 1000)
        phase = "head" if epoch < self.head_epochs else "finetune"
        self.sender.send("log", metrics=[[k, float(v), epoch, now] for k, v in logs.items()
                                         if _is_number(v)],
                         tags={"phase": phase} if phase != self._phase else None)
        self._phase = phase
        self._keep(self.run_dir)

    def finish(self, run_dir: Path) -> None:
        self.sender.send("log", metrics=final_metrics(run_dir))
        for path in artifacts(run_dir):
            self.sender.send("artifact", path=str(path))
        self.sender.send("end", status="FINISHED")
        self.sender.close()
        self._keep(run_dir)

    def stop(self, status: str) -> None:
        self.sender.send("end", status=status)
        self.sender.close(timeout_s=15)
        if self.run_dir.is_dir():
            self._keep(self.run_dir)

    def _keep(self, run_dir: Path) -> None:
        """tracking.json once the run id is known, and any missed calls, into run_dir."""
        if self.sender.run_id and not self._saved:
            save_run(run_dir, self.sender.run_id, self.sender.uri)
            self._saved = True
        self.sender.write_missed(run_dir)


def run_tags(experiment: str, backend_name: str, seed: int, run_id: str) -> dict[str, str]:
    return {"experiment": experiment, "backend": backend_name, "seed": str(seed),
            "flowers.run_id": run_id}


def run_params(raw: Mapping[str, Any], facts: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting of config.json (section.key), the run's id and what identifies the measurement."""
    return {**config.settings(raw["experiment"]), "flowers_run_id": raw["run_id"], **facts}


def live_facts(backend_name: str, run_dir: Path) -> dict[str, Any]:
    """The backend, versions, device, CPU and git state of the run training in this process."""
    git, cpu = host.git_state(), host.host_info()
    return {"backend": backend_name, **backend.versions(backend_name),
            "device": backend.device(backend_name), "cpu_model": cpu["cpu_model"],
            "cpu_count": cpu["cpu_count"], "git_commit": git["commit"], "git_dirty": git["dirty"],
            "run_dir": str(run_dir.with_name(files.final_name(run_dir)))}


def recorded_facts(metrics: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """The same facts, as a finished run's metrics.json recorded them (no git state: it has none)."""
    keys = ("backend", "backend_version", "keras_version", "tensorflow_version", "python_version",
            "device")
    return {**{key: metrics.get(key) for key in keys}, "cpu_model": metrics["host"]["cpu_model"],
            "cpu_count": metrics["host"]["cpu_count"], "run_dir": str(run_dir)}


def epoch_metrics(run_dir: Path) -> list[list[Any]]:
    """history.csv's numbers as [key, value, step=epoch, timestamp] rows (a run logged afterwards)."""
    now = int(time.time() * 1000)
    return [[key, float(value), int(float(row["epoch"])), now] for row in _history(run_dir / "history.csv")
            for key, value in row.items() if key not in ("epoch", "phase") and value != ""]


def final_metrics(run_dir: Path) -> list[list[Any]]:
    """metrics.json's numbers as final/<key> rows at step 0 (one value each: the MLflow UI draws
    them as bars, one per run)."""
    now = int(time.time() * 1000)
    return [[f"final/{k}", v, 0, now] for k, v in flat_numbers(files.read_json(run_dir / "metrics.json"))]


def artifacts(run_dir: Path) -> list[Path]:
    """The run's files MLflow keeps (the learning curve drawn first, when it can be)."""
    try:
        _draw_learning_curve(run_dir)
    except (FlowersError, OSError, ValueError):  # no per-epoch validation, or an odd history.csv:
        pass                                     # the other files still go
    return [run_dir / name for name in ARTIFACTS if (run_dir / name).is_file()]


def flat_numbers(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, number) for every int/float leaf of nested dicts (no bools, lists or None)."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from flat_numbers(value, f"{prefix}{key}.")
        elif _is_number(value):
            yield f"{prefix}{key}", float(value)


def _is_number(value: Any) -> bool:
    """A real number (numpy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _history(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _draw_learning_curve(run_dir: Path) -> None:
    """learning_curve.png: val accuracy and val loss per epoch, read as the comparison report reads
    history.csv (FlowersError when validation did not run every epoch)."""
    from flowers.report import read_history
    from flowers.report_charts import learning_curves

    history = read_history(run_dir / "history.csv")
    raw = files.read_json(run_dir / "config.json")
    learning_curves({raw["backend"]: [history]}, f"{raw['experiment']['name']} · {raw['run_id']}",
                    run_dir / LEARNING_CURVE)
