"""MLflow's client for every flowers command, and the sender that keeps training independent of it.

Where: MLFLOW_TRACKING_URI (a server, http://host:5000, or a store, sqlite:///mlflow.db), else
MLflow's default. flowers lowers MLflow's HTTP retries and timeout (2 retries, 10 s a request, unless
the MLFLOW_HTTP_REQUEST_* variables say otherwise) so an unreachable server is known in seconds,
not minutes.

Training never waits for MLflow: `Sender` makes every call on a thread of its own. When a call fails,
it says so in one warning line and stops calling for the rest of the run; that call and every one
after it are listed in the run directory's mlflow-missed.jsonl (one JSON object per line: the call
and what it carried), and the run directory itself stays complete.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowers import host
from flowers.errors import FlowersError

MISSED_FILE = "mlflow-missed.jsonl"
# MLflow settings flowers changes unless the user set them: seconds, not minutes, to know a server is
# unreachable; no "View run at" lines written to stdout from the sender's thread (flowers prints the
# run id itself).
ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# MLflow's own limits on one log_batch call
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
MAX_PARAM_CHARS = 6000


def check() -> None:
    """MLflow is installed and MLFLOW_TRACKING_URI is one it can use; else a one-line FlowersError."""
    if host.package_version("mlflow") is None:
        raise FlowersError("--track mlflow needs MLflow, which is not installed: "
                           "pip install 'flowers[track]' (or leave out --track)")
    try:
        client()
    except Exception as exc:  # MLflow's errors for a bad URI differ by scheme
        raise FlowersError(f"--track mlflow: MLflow cannot use MLFLOW_TRACKING_URI="
                           f"{os.environ.get('MLFLOW_TRACKING_URI', '')!r} ({reason(exc)})") from None


def client() -> Any:
    """An MlflowClient for MLFLOW_TRACKING_URI (or MLflow's default), with flowers' ENV_DEFAULTS."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # not its store's "Creating tables" INFO lines
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    import mlflow

    return mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def experiment_id(mlflow_client: Any, name: str) -> str:
    """The id of the MLflow experiment `name`, created when it does not exist yet.

    Several runs starting at once (three backends against one server) can all find it missing: the
    ones whose create loses the race read the winner's.
    """
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow_client.get_experiment_by_name(name).experiment_id


def log(mlflow_client: Any, run_id: str, metrics: list | None = None, params: dict | None = None,
        tags: dict | None = None) -> None:
    """log_batch within MLflow's per-call limits. metrics: [key, value, step, timestamp_ms] rows."""
    from mlflow.entities import Metric, Param, RunTag

    entities = {
        "metrics": [Metric(k, float(v), int(t), int(s)) for k, v, s, t in metrics or []],
        "params": [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in (params or {}).items()],
        "tags": [RunTag(k, str(v)) for k, v in (tags or {}).items()],
    }
    while any(entities.values()):
        chunk = {kind: items[:BATCH_LIMITS[kind]] for kind, items in entities.items()}
        entities = {kind: items[BATCH_LIMITS[kind]:] for kind, items in entities.items()}
        mlflow_client.log_batch(run_id, **chunk)


def reason(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text[:200]}"


class Sender:
    """MLflow calls on a thread of their own, in order; a failure turns every later call into a
    missed entry (`missed()`), after one warning line.

    Each call is (op, payload): payload is JSON (it is what mlflow-missed.jsonl lists). `run_id` is
    set once the "start" call made or reopened the run.
    """

    def __init__(self, warn: Callable[[str], None]):
        self.warn = warn
        self.run_id: str | None = None
        self.uri = tracking_uri()
        self.failure: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._missed: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._client: Any = None
        self._thread = threading.Thread(target=self._work, name="flowers-mlflow", daemon=True)
        self._thread.start()

    def send(self, op: str, **payload: Any) -> None:
        self._queue.put({"op": op, **payload})

    def close(self, timeout_s: float = 60.0) -> None:
        """Wait (at most timeout_s) for every call sent so far; what is left is missed."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._fail(f"MLflow at {self.uri} did not finish within {timeout_s:.0f} s")
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None:
                    self._miss(item)

    def missed(self) -> list[dict[str, Any]]:
        """The calls missed since the last call of missed()."""
        with self._lock:
            taken, self._missed = self._missed, []
        return taken

    def write_missed(self, run_dir: Path) -> None:
        """Append the calls missed so far to run_dir/mlflow-missed.jsonl."""
        taken = self.missed()
        if taken:
            with (run_dir / MISSED_FILE).open("a") as f:
                f.writelines(json.dumps(item) + "\n" for item in taken)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.failure:
                self._miss(item)
                continue
            try:
                self._call(item)
            except Exception as exc:  # whatever MLflow or the network raises, training goes on
                self._fail(f"MLflow at {self.uri} failed ({reason(exc)})")
                self._miss(item)

    def _call(self, item: dict[str, Any]) -> None:
        if self._client is None:
            self._client = client()
        op, mlflow_client = item["op"], self._client
        if op == "start":
            self.run_id = item.get("run_id") or mlflow_client.create_run(
                experiment_id(mlflow_client, item["experiment"]), run_name=item["run_name"],
                tags=item["tags"]).info.run_id
            if item.get("run_id"):  # --resume: the same run, running again
                mlflow_client.update_run(self.run_id, status="RUNNING")
        elif op == "log":
            log(mlflow_client, self.run_id, item.get("metrics"), item.get("params"), item.get("tags"))
        elif op == "artifact":
            mlflow_client.log_artifact(self.run_id, item["path"], item.get("artifact_path"))
        elif op == "end":
            mlflow_client.set_terminated(self.run_id, status=item["status"])
        else:
            raise ValueError(f"unknown MLflow call {op!r}")

    def _fail(self, what: str) -> None:
        if self.failure is None:
            self.failure = what
            self.warn(f"{what}; training goes on without it and the run directory stays complete; "
                      f"what MLflow missed is listed in the run directory's {MISSED_FILE}")

    def _miss(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._missed.append(item)
