"""`flowers compare --track mlflow`: the report as a parent MLflow run over the compared runs.

The parent run (tag flowers.kind=comparison) sits in the experiment's MLflow experiment and holds
the report's files (comparison.md/json/csv and charts), the verdict as tag and description, and the
figures it rests on as verdict.* metrics. The backends' own figures stay on the children, under the
same metric names in every child, which is what the MLflow UI's charts and compare view line up.

Every compared run becomes its child (mlflow.parentRunId): a run tracked while it trained keeps its
MLflow run; a run that was not (or was tracked in another store, or whose MLflow run is gone) is
logged now from its run directory (params, per-epoch and final metrics, files) and its tracking.json
written, so a later comparison finds it.

Unlike training, a comparison waits for MLflow: a server that does not answer fails the command in
one line, after the report is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flowers import files
from flowers.errors import FlowersError
from flowers.tracking import mlflow_client
from flowers.tracking.mlflow_run import (
    artifacts,
    epoch_metrics,
    final_metrics,
    recorded_facts,
    run_params,
    run_tags,
    save_run,
    saved_run,
)


def log_comparison(report_dir: Path, comparison: Mapping[str, Any], run_dirs: Sequence[Path]) -> str:
    """Log the report as a parent run with run_dirs as its children; returns the parent's run id.

    Raises:
        FlowersError: MLflow failed (the report on disk is complete either way).
    """
    try:
        client = mlflow_client.client()
        experiment_id = mlflow_client.experiment_id(client, comparison["experiment"])
        backends = [column["backend"] for column in comparison["columns"]]
        children = [tracked_run(client, experiment_id, Path(run_dir)) for run_dir in run_dirs]
        parent = client.create_run(experiment_id, run_name=f"compare-{'-'.join(backends)}", tags={
            "flowers.kind": "comparison", "experiment": comparison["experiment"],
            "backends": ",".join(backends), "verdict": comparison["verdict"]["status"],
            "mlflow.note.content": comparison["verdict"].get("sentence", "")}).info.run_id
        for child in children:
            client.set_tag(child, "mlflow.parentRunId", parent)
        mlflow_client.log(client, parent, metrics=_verdict_metrics(comparison["verdict"]))
        client.log_artifacts(parent, str(report_dir))
        client.set_terminated(parent, status="FINISHED")
    except Exception as exc:  # MLflow's and the network's errors
        raise FlowersError(f"the report is written to {report_dir}, but logging it to MLflow at "
                           f"{mlflow_client.tracking_uri()} failed ({mlflow_client.reason(exc)})") from None
    return parent


def tracked_run(client: Any, experiment_id: str, run_dir: Path) -> str:
    """The MLflow run of a run directory in this store: the one it was tracked under while it
    trained, else one logged now from the directory (and kept in its tracking.json)."""
    saved = saved_run(run_dir)
    if saved.get("run_id") and saved.get("tracking_uri") == mlflow_client.tracking_uri() \
            and _exists(client, saved["run_id"]):
        return saved["run_id"]
    return log_run_dir(client, experiment_id, run_dir)


def _exists(client: Any, run_id: str) -> bool:
    """Whether this store has the run (a store can be deleted and made again at the same URI)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def log_run_dir(client: Any, experiment_id: str, run_dir: Path) -> str:
    """A complete run directory as a finished MLflow run; returns its id."""
    raw = files.read_json(run_dir / "config.json")
    metrics = files.read_json(run_dir / "metrics.json")
    run_id = client.create_run(
        experiment_id, run_name=f"{raw['backend']}-seed{metrics['seed']}-{raw['run_id']}",
        tags=run_tags(metrics["experiment"], raw["backend"], metrics["seed"], raw["run_id"])).info.run_id
    mlflow_client.log(client, run_id, metrics=epoch_metrics(run_dir) + final_metrics(run_dir),
                      params=run_params(raw, recorded_facts(metrics, run_dir)))
    for path in artifacts(run_dir):
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED")
    save_run(run_dir, run_id, mlflow_client.tracking_uri())
    return run_id


def _verdict_metrics(verdict: Mapping[str, Any]) -> list[list[Any]]:
    """The figures the verdict rests on: the largest difference in mean val accuracy, the smallest
    Holm-corrected McNemar p, the seed-to-seed spread, the top-1 agreement range (those measured)."""
    import time

    figures = {"verdict.largest_difference": (verdict.get("largest_difference") or {}).get("value"),
               "verdict.smallest_p_holm": (verdict.get("smallest_p_holm") or {}).get("value"),
               "verdict.seed_spread": (verdict.get("seed_spread") or {}).get("largest"),
               "verdict.agreement_min": (verdict.get("agreement_range") or [None])[0],
               "verdict.tests_available": verdict.get("tests_available")}
    now = int(time.time() * 1000)
    return [[key, value, 0, now] for key, value in figures.items() if isinstance(value, int | float)]
