"""`--track mlflow` over HTTP: a real `mlflow server` (SQLite backend, artifacts uploaded through it) on
127.0.0.1 takes the runs of all three backends and their comparison, then is killed in the middle of a
fourth run, which finishes anyway: one warning line, a complete run directory, the missed calls
listed in it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow

from conftest import BACKENDS, flowers, launch, mlflow_server, python, read_json, run_dir_of


def _train_at_once(runs, env: dict, logs) -> dict[str, subprocess.CompletedProcess]:
    """`flowers train -e smoke --track mlflow` under every backend, three processes at once."""
    commands = [([sys.executable, "-m", "flowers.cli", "train", "-e", "smoke", "--backend", b,
                  "--runs-dir", str(runs), "--track", "mlflow"], env) for b in BACKENDS]
    results = launch(commands, logs)
    return {b: subprocess.CompletedProcess(args, code, out, err)
            for b, (args, _), (code, out, err) in zip(BACKENDS, commands, results, strict=True)}


KILL_AFTER_FIRST_EPOCH = """
    import os, signal, sys
    from pathlib import Path
    from flowers import backend, config
    backend.select("torch")
    import keras
    from flowers.tracking import Tracking
    from flowers.training.loop import train

    class KillServer(keras.callbacks.Callback):  # runs after the trackers' own callbacks
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                os.killpg({server_pid}, signal.SIGKILL)

    experiment = config.load_experiment("smoke", ["train.epochs=3"])
    warn = lambda line: print("warning: " + line, file=sys.stderr)
    print(train(experiment, "torch", Path({runs!r}), callbacks=[KillServer()],
                track=Tracking(("mlflow",), warn=warn)))
"""


def test_three_backends_over_http_then_the_server_dies_mid_run(tmp_path):
    runs = tmp_path / "runs"
    with mlflow_server(tmp_path) as (url, server):
        env = {"MLFLOW_TRACKING_URI": url}
        client = mlflow.MlflowClient(url)
        trained = {b: run_dir_of(result)
                   for b, result in _train_at_once(runs, env, tmp_path / "logs").items()}
        run_ids = {b: read_json(d / "tracking.json")["mlflow"]["run_id"] for b, d in trained.items()}
        for name, run_id in run_ids.items():
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED" and run.data.tags["backend"] == name
            assert run.data.metrics["final/val_accuracy"] == read_json(
                trained[name] / "metrics.json")["val_accuracy"]
            assert "learning_curve.png" in {a.path for a in client.list_artifacts(run_id)}

        compared = flowers("compare", *map(str, trained.values()), "--out", str(tmp_path / "reports"),
                           "--track", "mlflow", env=env, timeout=300)
        assert compared.returncode == 0, compared.stderr[-2000:]
        parent_id = compared.stdout.split("mlflow: comparison run ")[1].split()[0]
        experiment_id = client.get_run(parent_id).info.experiment_id
        children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
        assert sorted(c.info.run_id for c in children) == sorted(run_ids.values())  # the live runs

        result = python(KILL_AFTER_FIRST_EPOCH.format(server_pid=server.pid, runs=str(runs)), env=env,
                        timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = run_dir_of(result)
        warnings = [line for line in result.stderr.splitlines() if "MLflow at" in line]
        assert len(warnings) == 1 and warnings[0].startswith(f"warning: MLflow at {url} failed"), warnings
        assert "training goes on without it" in warnings[0]
        assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + 3  # all 3 epochs
        assert {"model.keras", "metrics.json", "predictions.csv"} <= {p.name for p in run_dir.iterdir()}
        missed = [json.loads(line) for line in (run_dir / "mlflow-missed.jsonl").read_text().splitlines()]
        assert missed[-1] == {"op": "end", "status": "FINISHED"}
        assert {"artifact", "log"} <= {m["op"] for m in missed}
        assert any(m["op"] == "log" and any(row[0] == "final/val_accuracy" for row in m.get("metrics") or [])
                   for m in missed)
        assert any(row[0] == "val_loss" and row[2] == 2 for m in missed for row in m.get("metrics") or [])
    # what reached the server before it died is in its store: the run, never ended
    stored = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    survivor = stored.get_run(read_json(run_dir / "tracking.json")["mlflow"]["run_id"])
    assert survivor.info.status == "RUNNING" and survivor.data.params["train.epochs"] == "3"
