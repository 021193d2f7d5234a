"""`--track mlflow` against a SQLite store, read back with MlflowClient: a run killed by SIGTERM and
resumed (one MLflow run, KILLED then FINISHED), a comparison as a parent run over the backend runs, an
export registered as a model version whose pyfunc predicts what `flowers predict` does (the serving
tests' export, registered when it is made: conftest.served_version).

The MLflow server over HTTP (three backends, a server killed mid-run) is tests/test_tracking_server.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import (
    flowers,
    learnable_photos,
    one_line_error,
    python,
    read_json,
    registry_store,
    run_dir_of,
)


@pytest.fixture
def store(tmp_path) -> tuple[dict, object]:
    """A SQLite store whose experiment "smoke" keeps its artifacts under tmp_path: (env, client)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("smoke", artifact_location=(tmp_path / "artifacts").as_uri())
    return {"MLFLOW_TRACKING_URI": uri}, client


def test_a_run_killed_and_resumed_is_one_mlflow_run_with_every_epoch(tmp_path, store):
    env, client = store
    runs = tmp_path / "runs"
    args = ("train", "-e", "smoke", "--backend", "torch", "--runs-dir", str(runs), "--track", "mlflow",
            "--set", "train.epochs=3")
    killed = flowers(*args, env={**env, "FLOWERS_FAULT": "train-step:1:1=SIGTERM"})
    assert killed.returncode == 143, killed.stderr[-2000:]
    incomplete = next((runs / "smoke" / "torch").glob(".incomplete-*"))
    run_id = read_json(incomplete / "tracking.json")["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = flowers(*args[:-2], "--resume", env=env)
    run_dir = run_dir_of(resumed)
    assert f"mlflow: run {run_id} at {env['MLFLOW_TRACKING_URI']}" in resumed.stdout
    assert read_json(run_dir / "tracking.json")["mlflow"]["run_id"] == run_id
    run = client.get_run(run_id)
    metrics = read_json(run_dir / "metrics.json")
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    # params: every setting, the backend, versions, device, git state
    params = run.data.params
    assert params["train.epochs"] == "3" and params["data.source"] == "synthetic"
    assert params["backend"] == "torch" and params["backend_version"] == metrics["backend_version"]
    assert params["keras_version"] == metrics["keras_version"] and params["device"] == "cpu"
    assert "git_commit" in params and params["git_dirty"] in ("True", "False", "None")
    assert run.data.tags["experiment"] == "smoke" and run.data.tags["seed"] == "42"
    assert run.data.tags["backend"] == "torch" and run.data.tags["phase"] == "head"
    # per-epoch metrics at their step, the last value of each epoch is history.csv's
    with (run_dir / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    assert sorted(logged) == [0, 1, 2]
    assert [logged[int(row["epoch"])] for row in history] == pytest.approx(
        [float(row["val_loss"]) for row in history])
    assert run.data.metrics["final/val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert run.data.metrics["final/latency_ms.batch1_p50"] == pytest.approx(
        metrics["latency_ms"]["batch1_p50"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "metrics.json", "history.csv", "predictions.csv",
            "learning_curve.png"} <= artifacts
    assert not (run_dir / "mlflow-missed.jsonl").exists()


def _linked_copy(run_dir: Path, folder: Path) -> Path:
    """A copy of a session run (hard links: the tracker writes new files beside the shared ones)."""
    copy = folder / run_dir.relative_to(run_dir.parents[2])
    shutil.copytree(run_dir, copy, copy_function=os.link)
    return copy


def test_compare_logs_a_parent_run_over_the_backend_runs(tmp_path, store, smoke_runs):
    env, client = store
    copies = [_linked_copy(run, tmp_path / "runs") for run in smoke_runs.values()]
    result = flowers("compare", *map(str, copies), "--out", str(tmp_path / "reports"),
                     "--track", "mlflow", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    parent_id = result.stdout.split("mlflow: comparison run ")[1].split()[0]
    parent = client.get_run(parent_id)
    assert parent.data.tags["flowers.kind"] == "comparison"
    assert parent.data.tags["backends"] == ",".join(smoke_runs)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(c.data.tags["backend"] for c in children) == sorted(smoke_runs)
    for child in children:  # logged from its run directory, which now names it
        copy = next(c for c in copies if c.parent.name == child.data.tags["backend"])
        assert read_json(copy / "tracking.json")["mlflow"]["run_id"] == child.info.run_id
        assert child.data.metrics["final/val_accuracy"] == pytest.approx(
            read_json(copy / "metrics.json")["val_accuracy"])
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_loss")) == [0, 1]
    verdict = read_json(tmp_path / "reports" / "smoke" / "comparison.json")["verdict"]
    assert parent.data.tags["verdict"] == verdict["status"]
    assert parent.data.metrics["verdict.largest_difference"] == pytest.approx(
        verdict["largest_difference"]["value"])
    assert parent.data.metrics["verdict.tests_available"] == verdict["tests_available"]
    assert {"comparison.md", "comparison.json", "learning_curves.png"} <= {
        a.path for a in client.list_artifacts(parent_id)}

    again = flowers("compare", *map(str, copies), "--out", str(tmp_path / "reports"),
                    "--track", "mlflow", env=env)  # the same children, not new copies of them
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(client.search_runs([parent.info.experiment_id])) == len(copies) + 2


def test_export_registers_a_pyfunc_that_predicts_what_flowers_predict_does(served_version,
                                                                            learnable_set):
    """served_version is `flowers export SMOKE_TORCH_RUN --formats onnx --track mlflow` (conftest): an
    export without a .keras format registers its source run's model.keras."""
    env = registry_store(served_version.parents[1])
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version("smoke", "1")
    manifest = read_json(served_version / "manifest.json")
    assert version.tags["flowers.export_version"] == f"v{manifest['version']}"
    assert version.tags["flowers.source_run"] == manifest["run_id"]
    assert version.tags["flowers.verified"] == "true"
    assert version.tags["verification.onnx"].startswith("onnxruntime ")
    assert version.tags["verification.onnx"].endswith("passed")
    assert json.loads(version.tags["flowers.manifest"])["class_names"] == manifest["class_names"]
    assert client.get_run(version.run_id).data.tags["flowers.kind"] == "export"

    photos = learnable_photos(learnable_set)
    source_model = Path(manifest["source_run"]) / "model.keras"
    predicted = flowers("predict", str(source_model), *map(str, photos), "--top", "1000", "--json")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    expected = [[{t["class"]: t["probability"] for t in row["top"]}[name]
                 for name in manifest["class_names"]] for row in json.loads(predicted.stdout)]
    loaded = python(f"""
        import json, mlflow, numpy as np
        from flowers.images import load_image_files
        model = mlflow.pyfunc.load_model("models:/smoke/1")
        images = load_image_files({[str(p) for p in photos]!r}, 32)
        print(json.dumps([model.predict(images).tolist(), model.predict(images.astype("float32")).tolist()]))
        try:
            model.predict(np.zeros((1, 8, 8, 3), "uint8"))
        except ValueError as exc:
            print(exc)
    """, env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    lines = loaded.stdout.strip().splitlines()
    as_uint8, as_float = json.loads(lines[-2])
    assert np.abs(np.array(as_uint8) - np.array(expected)).max() <= 1e-5
    assert np.abs(np.array(as_float) - np.array(expected)).max() <= 1e-5
    assert lines[-1] == "expected RGB images of shape (N, 32, 32, 3), values 0..255; got shape (1, 8, 8, 3)"


def test_bad_tracking_requests_fail_in_one_line(tmp_path):
    unknown = flowers("train", "-e", "smoke", "--runs-dir", str(tmp_path), "--track", "wandb")
    assert "unknown tracker 'wandb'; valid: mlflow" in one_line_error(unknown)
    bad_uri = flowers("compare", "-e", "smoke", "--runs-dir", str(tmp_path), "--track", "mlflow",
                      env={"MLFLOW_TRACKING_URI": "nosuchscheme://x"})
    assert "MLflow cannot use MLFLOW_TRACKING_URI='nosuchscheme://x'" in one_line_error(bad_uri)
    assert not any(tmp_path.iterdir())
