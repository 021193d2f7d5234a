"""flowers.tracking without a server: the sender's failure policy, how a stopped run ends, the
--track check, final metrics and the registry's tags."""

from __future__ import annotations

import json
import threading

import pytest

from flowers import interrupt, tracking
from flowers.errors import FlowersError
from flowers.tracking import mlflow_client, mlflow_registry
from flowers.tracking.base import Tracker
from flowers.tracking.mlflow_run import flat_numbers


class FakeClient:
    """Answers until `fail_at` calls were made, then raises ConnectionError."""

    def __init__(self, fail_at: int):
        self.calls, self.fail_at = [], fail_at

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if len(self.calls) >= self.fail_at:
                raise ConnectionError("connection refused")
            self.calls.append(name)
            return type("Found", (), {"experiment_id": "1", "info": type("Info", (), {"run_id": "r1"})})
        return call


@pytest.fixture
def fake(monkeypatch):
    def make(fail_at: int) -> FakeClient:
        client = FakeClient(fail_at)
        monkeypatch.setattr(mlflow_client, "client", lambda: client)
        monkeypatch.setattr(mlflow_client, "tracking_uri", lambda: "http://127.0.0.1:1")
        return client
    return make


def test_a_failed_call_warns_once_and_every_later_call_is_listed_as_missed(fake, tmp_path):
    client = fake(fail_at=2)  # get_experiment_by_name, create_run, then log_batch fails
    warnings = []
    sender = mlflow_client.Sender(warnings.append)
    sender.send("start", experiment="smoke", run_name="torch", tags={})
    for epoch in range(3):
        sender.send("log", metrics=[["val_loss", 1.0 / (epoch + 1), epoch, 0]])
    sender.send("end", status="FINISHED")
    sender.close(timeout_s=10)
    sender.write_missed(tmp_path)
    assert sender.run_id == "r1" and client.calls == ["get_experiment_by_name", "create_run"]
    assert len(warnings) == 1
    assert warnings[0].startswith("MLflow at http://127.0.0.1:1 failed (ConnectionError: connection refused)")
    missed = [json.loads(line) for line in (tmp_path / mlflow_client.MISSED_FILE).read_text().splitlines()]
    assert [m["op"] for m in missed] == ["log", "log", "log", "end"]
    assert [m["metrics"][0][2] for m in missed[:3]] == [0, 1, 2]


def test_a_server_that_hangs_is_given_up_after_the_closing_timeout(fake, monkeypatch):
    fake(fail_at=99)
    release = threading.Event()
    monkeypatch.setattr(mlflow_client, "log", lambda *args, **kwargs: release.wait(30))
    warnings = []
    sender = mlflow_client.Sender(warnings.append)
    sender.send("start", run_id="r0")
    sender.send("log", metrics=[])
    sender.send("end", status="FINISHED")
    sender.close(timeout_s=0.5)
    release.set()
    assert len(warnings) == 1 and "did not finish within 0 s" in warnings[0]
    assert [m["op"] for m in sender.missed()] == ["end"]


class Recorder(Tracker):
    def __init__(self):
        self.stopped = []

    def stop(self, status):
        self.stopped.append(status)


@pytest.mark.parametrize("raised, status", [(interrupt.Interrupted(15), "KILLED"),
                                            (RuntimeError("disk full"), "FAILED"), (None, None)])
def test_a_run_that_does_not_finish_ends_killed_or_failed(raised, status):
    recorder = Recorder()
    with pytest.raises(type(raised)) if raised else _nothing():
        with tracking.stopping([recorder]):
            if raised:
                raise raised
    assert recorder.stopped == ([status] if status else [])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_track_values_are_checked():
    assert tracking.parse([]) == ()
    with pytest.raises(FlowersError, match="unknown tracker 'wandb'; valid: mlflow"):
        tracking.parse(["wandb"])
    assert [t.name for t in tracking.Tracking().open(__import__("pathlib").Path("run"))] == ["tensorboard"]


def test_final_metrics_are_the_numbers_of_metrics_json():
    metrics = {"val_accuracy": 0.5, "resumed": False, "latency_ms": {"batch1_p50": 2.0, "note": "x"},
               "epoch_times_s": [1.0, 2.0], "peak_device_mem_mb": None}
    assert dict(flat_numbers(metrics)) == {"val_accuracy": 0.5, "latency_ms.batch1_p50": 2.0}


def test_a_model_version_is_tagged_with_its_export_and_verification():
    manifest = {"version": 3, "run_id": "20261207-1", "training_backend": "jax", "config_hash": "abc",
                "experiment": "smoke", "val_metrics": {"val_accuracy": 0.75}, "config": {"big": 1},
                "files": {}, "class_names": ["a", "b"],
                "verification": {"passed": False, "results": [
                    {"format": "onnx", "runtime": "onnxruntime 1.32.0", "top1_agreement": 1.0,
                     "max_abs_prob_diff": 3.1e-06, "limit": 1e-4, "passed": True},
                    {"format": "tflite", "runtime": "ai-edge-litert 2.3.0", "top1_agreement": 0.5,
                     "max_abs_prob_diff": 0.2, "limit": 1e-4, "passed": False}]}}
    tags = mlflow_registry.version_tags(manifest)
    assert tags["flowers.export_version"] == "v3" and tags["flowers.verified"] == "false"
    assert tags["verification.onnx"] == ("onnxruntime 1.32.0: top-1 agreement 100.0%, max |Δprob| "
                                         "3.1e-06 (limit 1e-04), passed")
    assert tags["verification.tflite"].endswith("FAILED")
    assert "config" not in json.loads(tags["flowers.manifest"])


class RecordingSender:
    def __init__(self, warn):
        self.sent, self.uri, self.run_id = [], "sqlite:///here.db", None

    def send(self, op, **payload):
        self.sent.append({"op": op, **payload})


def test_resume_continues_the_mlflow_run_of_this_store_and_logs_untracked_epochs_otherwise(
        tmp_path, monkeypatch):
    from flowers import config, files
    from flowers.tracking import mlflow_run

    monkeypatch.setattr(mlflow_run, "Sender", RecordingSender)
    monkeypatch.setattr(mlflow_run, "live_facts", lambda backend, run_dir: {"backend": backend})
    cfg = config.load_experiment("smoke")
    files.write_json(tmp_path / "config.json", {"run_id": "r", "backend": "jax", "experiment": cfg.to_dict()})
    (tmp_path / "history.csv").write_text("epoch,loss,val_loss\n0,2.0,1.5\n")

    def started(saved_uri: str) -> list[dict]:
        files.write_json(tmp_path / "tracking.json", {"mlflow": {"run_id": "abc", "tracking_uri": saved_uri}})
        tracker = mlflow_run.MlflowTracker(tmp_path, warn=print)
        tracker.start(cfg, "jax", resumed=True)
        return tracker.sender.sent

    same = started("sqlite:///here.db")
    assert [(s["op"], s.get("run_id")) for s in same] == [("start", "abc")]
    other = started("http://elsewhere:5000")  # tracked in another store: a new run, with its past epochs
    assert other[0]["op"] == "start" and other[0]["run_id"] is None
    assert other[1]["params"]["train.epochs"] == cfg.train.epochs
    assert [row[:3] for row in other[2]["metrics"]] == [["loss", 2.0, 0], ["val_loss", 1.5, 0]]


def test_runs_starting_at_once_share_the_experiment_whose_creation_one_of_them_won():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

    class Racing:
        def __init__(self):
            self.created = False

        def get_experiment_by_name(self, name):  # missing at first, then the other process's
            return type("Found", (), {"experiment_id": "7"}) if self.created else None

        def create_experiment(self, name):
            self.created = True
            raise MlflowException(f"Experiment(name={name}) already exists",
                                  error_code=RESOURCE_ALREADY_EXISTS)

    assert mlflow_client.experiment_id(Racing(), "smoke") == "7"
