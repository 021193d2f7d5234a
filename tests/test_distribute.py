"""Data-parallel training (flowers/distribute/): the same losses as one device, on every engine.

Every distributed run is a set of local `python -m flowers train` processes, each in its own process
group with a hard timeout (collectives can hang; a hung test kills its groups and fails). Dropout is
off (model.dropout=0) so that runs can be compared exactly: each replica draws its own dropout
masks under tensorflow and torch.
"""

import csv
import json
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from conftest import LAUNCH_TIMEOUT_S, flowers, launch, one_line_error, read_json, run_dir_of
from flowers import distribute
from flowers.errors import FlowersError

SMOKE = ["train", "-e", "smoke", "--set", "model.dropout=0"]
TIMEOUT_S = LAUNCH_TIMEOUT_S


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flowers(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flowers", *args]


def _losses(run: Path) -> dict[str, list[float]]:
    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows] for key in ("loss", "val_loss")}


def _assert_same_training(run: Path, reference: Path) -> None:
    got, want = _losses(run), _losses(reference)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    metrics, single = read_json(run / "metrics.json"), read_json(reference / "metrics.json")
    assert metrics["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert metrics["val_accuracy"] == single["val_accuracy"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One-device reference runs (smoke, dropout off), made on demand per backend."""
    root, made = tmp_path_factory.mktemp("single"), {}

    def run(backend: str) -> Path:
        if backend not in made:
            made[backend] = run_dir_of(flowers(*SMOKE, "--backend", backend, "--runs-dir", str(root)))
        return made[backend]

    return run


def test_clusters_are_read_from_torchrun_keras_and_vertex_ai():
    torchrun = distribute.detect_cluster({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (torchrun.num_processes, torchrun.process_id, torchrun.coordinator, torchrun.local_rank) \
        == (2, 1, "10.0.0.1:29500", 1)
    keras_env = distribute.detect_cluster({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "h0:1234,h1:1234",
                                           "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                                           "KERAS_DISTRIBUTION_PROCESS_ID": "0"})
    assert (keras_env.num_processes, keras_env.is_chief, keras_env.coordinator) == (2, True, "h0:1234")
    spec = {"cluster": {"workerpool0": ["chief:2222"], "workerpool1": ["w0:2222", "w1:2222"]},
            "task": {"type": "workerpool1", "index": 1}, "environment": "cloud"}
    vertex = distribute.detect_cluster({"CLUSTER_SPEC": json.dumps(spec)})
    assert (vertex.num_processes, vertex.process_id, vertex.coordinator) == (3, 2, "chief:2222")
    assert distribute.detect_cluster({}).num_processes == 1
    for bad in ({"CLUSTER_SPEC": "{not json"}, {"RANK": "2", "WORLD_SIZE": "2"},
                {"WORLD_SIZE": "two"}):
        with pytest.raises(FlowersError) as error:
            distribute.detect_cluster(bad)
        assert "\n" not in str(error.value)


def test_jax_on_two_devices_trains_the_one_device_losses(single, tmp_path):
    run = run_dir_of(flowers(*SMOKE, "--backend", "jax", "--distribute", "data-parallel",
                             "--runs-dir", str(tmp_path),
                             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
    _assert_same_training(run, single("jax"))
    metrics = read_json(run / "metrics.json")
    assert (metrics["distribution"], metrics["replicas"], metrics["processes"]) == ("data_parallel", 2, 1)


def test_tensorflow_on_two_logical_devices_stopped_mid_epoch_resumes_to_the_one_device_losses(
        single, tmp_path):
    """Under MirroredStrategy each device keeps its own running metric values (SyncOnRead
    variables): a SIGTERM inside epoch 2, with a state saved after every step, saves them per device
    (reading them as one array used to raise a traceback), and --resume ends with the one-device
    run's losses and accuracy."""
    args = [*SMOKE, "--backend", "tensorflow", "--distribute", "data-parallel",
            "--set", "train.checkpoint_every_steps=1", "--runs-dir", str(tmp_path)]
    env = {"FLOWERS_TF_CPU_DEVICES": "2"}
    stopped = flowers(*args, env={**env, "FLOWERS_FAULT": "train-step:1:1=SIGTERM"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "2 devices on this host (tf.distribute.MirroredStrategy)" in stopped.stdout
    # TensorFlow's C++ tf.data warnings (absl format, "W0000 ... auto_shard.cc:559]"; logged
    # before absl is initialised, so TF_CPP_MIN_LOG_LEVEL does not filter them) reached stderr in
    # one CI run of six: they are TensorFlow's lines, not flowers', and are left out here.
    # A message of several lines goes on in lines that start with whitespace, e.g.
    # "\t [[{{node MultiDeviceIteratorGetNextFromShard}}]]" (one CI run): those go with it.
    native = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")
    kept, in_native = [], False
    for line in stopped.stderr.splitlines():
        in_native = bool(native.match(line)) or (in_native and line[:1].isspace())
        if not in_native:
            kept.append(line)
    stopped.stderr = "\n".join(kept)
    assert "keeps its checkpoint after 1 of 2 epochs and 2 of 4 steps of epoch 2" in \
        one_line_error(stopped)
    resumed = flowers(*args, "--resume", env=env)
    assert "resume: 1 of 2 epochs and 2 of 4 steps of epoch 2 done" in resumed.stdout
    _assert_same_training(run_dir_of(resumed), single("tensorflow"))


def test_jax_two_processes_killed_after_epoch_1_resume_to_the_same_run(single, tmp_path):
    """Both processes are SIGKILLed right after their epoch-1 checkpoint; --resume finishes the run."""
    address = f"127.0.0.1:{_port()}"
    args = [*SMOKE, "--backend", "jax", "--distribute", "data-parallel", "--runs-dir", str(tmp_path)]

    def env(i, **extra):
        return {"KERAS_DISTRIBUTION_JOB_ADDRESSES": address, "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                "KERAS_DISTRIBUTION_PROCESS_ID": str(i), **extra}

    killed = launch([(_flowers(args), env(i, FLOWERS_FAULT="checkpoint-published:1"))
                      for i in range(2)], tmp_path / "killed")
    assert [code for code, _, _ in killed] == [-signal.SIGKILL] * 2
    (unfinished,) = (tmp_path / "smoke" / "jax").iterdir()
    assert unfinished.name.startswith(".incomplete-")
    assert sorted(p.name for p in (unfinished / "backup").iterdir()) == ["process-0", "process-1"]

    resumed = launch([(_flowers([*args, "--resume"]), env(i)) for i in range(2)], tmp_path / "resumed")
    assert [code for code, _, _ in resumed] == [0, 0], resumed[0][2][-3000:] + resumed[1][2][-3000:]
    assert "process 1 of 2: training done" in resumed[1][1]
    run = Path(resumed[0][1].strip().splitlines()[-1])
    assert list((tmp_path / "smoke" / "jax").iterdir()) == [run]  # written once, by the chief
    _assert_same_training(run, single("jax"))
    metrics = read_json(run / "metrics.json")
    assert (metrics["replicas"], metrics["processes"], metrics["resumed"]) == (2, 2, True)


def test_torchrun_two_processes_train_the_one_process_run(single, tmp_path):
    """With the feature cache too: each process computes the features, the head trains in parallel."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    (code, out, err), = launch([([torchrun, "--standalone", "--nproc_per_node=2", "-m", "flowers",
                                   *SMOKE, "--backend", "torch", "--set", "train.cache_features=true",
                                   "--distribute", "data-parallel", "--runs-dir", str(tmp_path)], {})],
                                tmp_path / "logs")
    assert code == 0, err[-3000:]
    assert "process 1 of 2: training done" in out
    (run,) = (tmp_path / "smoke" / "torch").iterdir()
    _assert_same_training(run, single("torch"))
    assert read_json(run / "metrics.json")["processes"] == 2


def test_a_vertex_ai_cluster_spec_drives_two_torch_workers(single, tmp_path):
    """Tracked in MLflow too: the chief alone logs the run, once."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(store).create_experiment("smoke", artifact_location=(tmp_path / "art").as_uri())
    port = _port()
    cluster = {"workerpool0": [f"127.0.0.1:{port}"], "workerpool1": [f"127.0.0.1:{port + 1}"]}
    results = launch([(_flowers([*SMOKE, "--backend", "torch", "--distribute", "data-parallel",
                                  "--runs-dir", str(tmp_path), "--track", "mlflow"]),
                        {"CLUSTER_SPEC": json.dumps({"cluster": cluster, "environment": "cloud",
                                                     "task": {"type": pool, "index": 0}}),
                         "MLFLOW_TRACKING_URI": store})
                       for pool in ("workerpool0", "workerpool1")], tmp_path / "logs")
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    (run,) = (tmp_path / "smoke" / "torch").iterdir()
    _assert_same_training(run, single("torch"))
    client = mlflow.MlflowClient(store)
    (tracked,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert tracked.info.run_id == read_json(run / "tracking.json")["mlflow"]["run_id"]
    assert tracked.info.status == "FINISHED" and tracked.data.metrics["final/processes"] == 2
    assert sorted(m.step for m in client.get_metric_history(tracked.info.run_id, "loss")) == [0, 1]


def test_sigterm_to_both_torch_processes_mid_epoch_resumes_mid_epoch_to_the_same_run(single, tmp_path):
    """A preemption notice reaches every process of the job: each stops after the same step, saves
    the state after it (epoch 2, step 2 of 4), exits 143 with one line; --resume on both continues
    inside that epoch and ends with the one-process run."""
    port = _port()
    args = _flowers([*SMOKE, "--backend", "torch", "--distribute", "data-parallel",
                     "--runs-dir", str(tmp_path)])
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "FLOWERS_COLLECTIVE_TIMEOUT_S": "60"}
    stopped = launch([(args, {**env, "RANK": str(rank), "FLOWERS_FAULT": "train-step:1:1=SIGTERM"})
                       for rank in range(2)], tmp_path / "stopped")
    assert [code for code, _, _ in stopped] == [143, 143], stopped[0][2][-3000:] + stopped[1][2][-3000:]
    for _, _, err in stopped:
        assert "Traceback" not in err
        assert "keeps its checkpoint after 1 of 2 epochs and 2 of 4 steps of epoch 2" in \
            err.strip().splitlines()[-1]
    (unfinished,) = (tmp_path / "smoke" / "torch").iterdir()
    for process in ("process-0", "process-1"):
        assert (unfinished / "backup" / process / "epoch-1-step-2").is_dir()

    env["MASTER_PORT"] = str(_port())
    resumed = launch([(args + ["--resume"], {**env, "RANK": str(rank)}) for rank in range(2)],
                      tmp_path / "resumed")
    assert [code for code, _, _ in resumed] == [0, 0], resumed[0][2][-3000:] + resumed[1][2][-3000:]
    assert "resume: 1 of 2 epochs and 2 of 4 steps of epoch 2 done" in resumed[0][1]
    run = Path(resumed[0][1].strip().splitlines()[-1])
    _assert_same_training(run, single("torch"))
    assert read_json(run / "metrics.json")["resumed"] is True


def test_a_dead_peer_stops_the_survivor_with_one_resumable_line(tmp_path):
    """Rank 1 is SIGKILLed after its epoch-1 checkpoint; rank 0 must not hang in the next step."""
    port = _port()
    args = _flowers([*SMOKE, "--backend", "torch", "--set", "train.epochs=4", "--distribute",
                     "data-parallel", "--runs-dir", str(tmp_path)])
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "FLOWERS_COLLECTIVE_TIMEOUT_S": "60"}
    start = time.monotonic()
    (code, _, err), (dead, _, _) = launch(
        [(args, {**env, "RANK": "0"}),
         (args, {**env, "RANK": "1", "FLOWERS_FAULT": "checkpoint-published:1"})], tmp_path / "logs")
    assert dead == -signal.SIGKILL and code == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2: another process stopped answering")
    assert last.endswith("the run is resumable: start the same command with --resume on every process")
    assert time.monotonic() - start < TIMEOUT_S
    (unfinished,) = (tmp_path / "smoke" / "torch").iterdir()
    assert unfinished.name.startswith(".incomplete-")


@pytest.mark.parametrize("args, env, message", [
    (["--backend", "jax", "--set", "train.batch_size=33"],
     {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
     "train.batch_size=33 (the global batch) does not divide by the 2 replicas"),
    (["--backend", "tensorflow"],
     {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1,127.0.0.1:2",
      "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "0"},
     "tensorflow data-parallel runs on one host only"),
    (["--backend", "torch", "--distribute", "none"],
     {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "torchrun describes 2 processes but train.distribution is 'none'"),
    (["--backend", "jax"], {"CLUSTER_SPEC": "{broken"}, "CLUSTER_SPEC is not a Vertex AI cluster"),
    (["--backend", "jax", "--set", "train.batch_size=8", "--set", "data.synthetic_val_images=4",
      "--set", "train.early_stopping_patience=2"],
     {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
     "train.early_stopping_patience=2 watches val_loss, but 4 validation images are fewer than one "
     "global batch (8)"),
])
def test_distribution_requests_that_cannot_work_are_refused(tmp_path, args, env, message):
    if "--distribute" not in args:
        args = [*args, "--distribute", "data-parallel"]
    error = one_line_error(flowers(*SMOKE, *args, "--runs-dir", str(tmp_path), env=env))
    assert message in error
    assert not (tmp_path / "smoke").exists()
