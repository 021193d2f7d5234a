"""Data-parallel training on each framework's own engine: the one module that knows them.

`train.distribution = "data_parallel"` (or `flowers train --distribute data-parallel`) trains ONE
model definition with the global batch `train.batch_size` split over every device of every process:

- jax: keras.distribution.DataParallel over all devices (jax.distributed for several processes;
  Keras shards the tf.data batches per process itself).
- tensorflow: tf.distribute.MirroredStrategy over this host's GPUs (or logical CPU devices,
  FLOWERS_TF_CPU_DEVICES=N); one host only: Keras 3's fit does not run under
  MultiWorkerMirroredStrategy (keras-team/keras#20585).
- torch: Keras 3.15.1 ships no torch distribution (upstream support is merged on master, not
  released), and wrapping the model in DDP does nothing because Keras' trainer calls the model, not
  the wrapper. So: torch.distributed (nccl on GPU, gloo on CPU), rank 0's weights broadcast before
  training, and a gradient hook on every trainable variable that all-reduces and averages it; each
  process reads its own slice of every global batch. Replace with Keras' own support when a Keras
  release ships it.

The cluster comes from the environment (detect_cluster): torchrun's RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT/LOCAL_RANK, keras' KERAS_DISTRIBUTION_JOB_ADDRESSES/_NUM_PROCESSES/_PROCESS_ID, or Vertex
AI's CLUSTER_SPEC (mapped to the variables jax or torch need, so the same command runs as a Vertex AI
multi-replica custom job). Collectives time out after FLOWERS_COLLECTIVE_TIMEOUT_S seconds (default
300), so a process whose peer died exits with one line instead of hanging.

The training code asks an Engine for: a scope to build and compile in, the per-process share of a
dataset, extra callbacks, whether this process is the chief (process 0, the only one that writes the
run directory), a barrier, the chief's value of a string, and the trained weights as numpy arrays.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from flowers.errors import FlowersError, PeerLost

TIMEOUT_ENV = "FLOWERS_COLLECTIVE_TIMEOUT_S"
TF_CPU_DEVICES_ENV = "FLOWERS_TF_CPU_DEVICES"


@dataclass(frozen=True)
class Cluster:
    """The processes of one training job, as the environment describes them."""

    num_processes: int = 1
    process_id: int = 0
    coordinator: str | None = None  # host:port of process 0
    local_rank: int = 0  # which of this host's devices the process uses (torch on GPU)
    source: str = "single process"

    @property
    def is_chief(self) -> bool:
        return self.process_id == 0


def collective_timeout_s() -> int:
    text = os.environ.get(TIMEOUT_ENV, "300")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise FlowersError(f"{TIMEOUT_ENV}={text!r}: must be a positive whole number of seconds")
    return value


def detect_cluster(env: Mapping[str, str] | None = None) -> Cluster:
    """The cluster described by Vertex AI's CLUSTER_SPEC, torchrun's or keras' variables, or none.

    Raises:
        FlowersError: a malformed description (one line naming the variable).
    """
    env = os.environ if env is None else env
    if "CLUSTER_SPEC" in env:
        return _vertex_cluster(env["CLUSTER_SPEC"])
    if "WORLD_SIZE" in env or "RANK" in env:
        size, rank = _int(env, "WORLD_SIZE", "1"), _int(env, "RANK", "0")
        address = f"{env.get('MASTER_ADDR', '127.0.0.1')}:{env.get('MASTER_PORT', '29500')}"
        return _checked(Cluster(size, rank, address, _int(env, "LOCAL_RANK", "0"), "torchrun"))
    if "KERAS_DISTRIBUTION_NUM_PROCESSES" in env or "KERAS_DISTRIBUTION_JOB_ADDRESSES" in env:
        addresses = env.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
        size = _int(env, "KERAS_DISTRIBUTION_NUM_PROCESSES", str(len(addresses.split(","))))
        coordinator = addresses.split(",")[0] or None
        return _checked(Cluster(size, _int(env, "KERAS_DISTRIBUTION_PROCESS_ID", "0"), coordinator,
                                0, "KERAS_DISTRIBUTION_*"))
    return Cluster()


def _vertex_cluster(text: str) -> Cluster:
    """Vertex AI's CLUSTER_SPEC: {"cluster": {"workerpool0": [host:port], ...}, "task": {...}}."""
    try:
        spec = json.loads(text)
        pools = spec["cluster"]
        task = spec["task"]
        names = sorted(name for name in pools if name.startswith("workerpool"))
        addresses = [address for name in names for address in pools[name]]
        offset = sum(len(pools[name]) for name in names[:names.index(task["type"])])
        process_id = offset + int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FlowersError(f"CLUSTER_SPEC is not a Vertex AI cluster description "
                           f"({type(exc).__name__}: {exc})") from None
    return _checked(Cluster(len(addresses), process_id, addresses[0] if addresses else None, 0,
                            "Vertex AI CLUSTER_SPEC"))


def _checked(cluster: Cluster) -> Cluster:
    if cluster.num_processes < 1 or not 0 <= cluster.process_id < cluster.num_processes:
        raise FlowersError(f"{cluster.source}: process {cluster.process_id} of "
                           f"{cluster.num_processes} is not a valid position in the cluster")
    if cluster.num_processes > 1 and not cluster.coordinator:
        raise FlowersError(f"{cluster.source}: {cluster.num_processes} processes but no coordinator "
                           "address")
    return cluster


def _int(env: Mapping[str, str], key: str, default: str) -> int:
    try:
        return int(env.get(key, default))
    except ValueError:
        raise FlowersError(f"{key}={env.get(key)!r}: must be a whole number") from None


def check_request(distribution: str, backend_name: str, batch_size: int,
                  cluster: Cluster | None = None) -> Cluster:
    """What can be refused before any framework loads: a backend or cluster that cannot do it.

    Raises:
        FlowersError: several tensorflow processes, or a cluster without --distribute.
    """
    cluster = cluster or detect_cluster()
    if distribution == "none":
        if cluster.num_processes > 1:
            raise FlowersError(f"{cluster.source} describes {cluster.num_processes} processes but "
                               "train.distribution is 'none': add --distribute data-parallel, or "
                               "run one process")
        return cluster
    if backend_name == "tensorflow" and cluster.num_processes > 1:
        raise FlowersError(
            f"tensorflow data-parallel runs on one host only ({cluster.source} describes "
            f"{cluster.num_processes} processes): Keras 3's fit does not work with "
            "MultiWorkerMirroredStrategy (keras-team/keras#20585); use --backend jax or torch for "
            "several hosts")
    if batch_size % cluster.num_processes:
        raise FlowersError(f"train.batch_size={batch_size} (the global batch) does not divide by "
                           f"the {cluster.num_processes} processes")
    return cluster


class Engine:
    """No distribution: one process, one device (the methods are the interface; see the docstring)."""

    distribution = "none"

    def __init__(self, cluster: Cluster = Cluster()):
        self.cluster = cluster
        self.replicas = 1

    @property
    def processes(self) -> int:
        return self.cluster.num_processes

    @property
    def is_chief(self) -> bool:
        return self.cluster.is_chief

    @property
    def distributed(self) -> bool:
        return self.distribution != "none"

    def describe(self) -> str:
        return "one device"

    def summary(self, batch_size: int) -> str | None:
        """The line a user sees when training starts (None without data-parallel training)."""
        if not self.distributed:
            return None
        if self.replicas == 1:
            return "distribute: data-parallel over 1 device (one process, one device): training as usual"
        return (f"distribute: data-parallel over {self.describe()}; global batch {batch_size}, "
                f"{batch_size // self.replicas} per replica")

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def shard(self, dataset):
        """This process's share of a dataset of global batches."""
        return dataset

    def callbacks(self) -> list:
        return []

    def barrier(self, name: str) -> None:
        pass

    def agree(self, text: str) -> str:
        """The chief's text, on every process."""
        return text

    def minimum(self, value: int) -> int:
        """The smallest of every process's value, on every process."""
        return value

    def check_in_sync(self, model) -> None:
        """Raise FlowersError if the replicas' weights differ (they must be bitwise equal)."""

    def local_weights(self, model) -> list[np.ndarray]:
        return [np.asarray(w) for w in model.get_weights()]

    def replica_values(self, variable) -> np.ndarray:
        """A variable's value on each of this process's replicas, stacked on a new first axis (one
        row unless the engine keeps a copy per device: a metric's running total, say)."""
        return np.asarray(variable.numpy())[None]

    def add_to_replicas(self, variable, values: np.ndarray) -> None:
        """Add replica_values' rows back, each to its replica's copy (a state saved with another
        number of replicas: the rows' sum to the first copy, which keeps the variable's total)."""
        variable.assign_add(values.sum(axis=0))

    def release(self) -> None:
        """Stop distributing new models and computations (before the single-device evaluation)."""

    @contextlib.contextmanager
    def guard(self):
        """Turn a collective that fails because another process died into one resumable line."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001  (only collective failures are translated)
            if self.processes == 1 or not self._lost_peer(exc):
                raise
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise PeerLost(
                f"process {self.cluster.process_id} of {self.processes}: another process stopped "
                f"answering ({first}); the run is resumable: start the same command with --resume "
                "on every process") from None

    def _lost_peer(self, exc: BaseException) -> bool:
        return False

    def backup_dir(self, run_dir: Path) -> Path:
        """Where this process's checkpoint lives: one folder per process when there are several."""
        return run_dir / "backup" if self.processes == 1 else \
            run_dir / "backup" / f"process-{self.cluster.process_id}"


def setup(distribution: str, backend_name: str, batch_size: int) -> Engine:
    """Set up the engine for this process (after backend.select, before any model is built).

    Raises:
        FlowersError: see check_request; a global batch that does not divide by the replicas; a
            cluster that cannot be joined within the collective timeout.
    """
    cluster = check_request(distribution, backend_name, batch_size)
    if distribution == "none":
        return Engine(cluster)
    engines = {"jax": _JaxEngine, "tensorflow": _TensorflowEngine, "torch": _TorchEngine}
    engine = engines[backend_name](cluster)
    if batch_size % engine.replicas:
        raise FlowersError(f"train.batch_size={batch_size} (the global batch) does not divide by the "
                           f"{engine.replicas} replicas: use a multiple of {engine.replicas}")
    return engine


class _JaxEngine(Engine):
    distribution = "data_parallel"

    def __init__(self, cluster: Cluster):
        super().__init__(cluster)
        import jax
        import keras

        if cluster.num_processes > 1:
            timeout = collective_timeout_s()
            try:
                jax.distributed.initialize(coordinator_address=cluster.coordinator,
                                           num_processes=cluster.num_processes,
                                           process_id=cluster.process_id,
                                           initialization_timeout=timeout,
                                           heartbeat_timeout_seconds=timeout)
            except Exception as exc:  # noqa: BLE001  (jax raises XlaRuntimeError/RuntimeError)
                raise FlowersError(f"jax.distributed could not join {cluster.coordinator} as process "
                                   f"{cluster.process_id} of {cluster.num_processes}: "
                                   f"{str(exc).splitlines()[0]}") from None
        devices = keras.distribution.list_devices()
        self.replicas = len(devices)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))

    def describe(self) -> str:
        import jax

        return (f"{self.replicas} {jax.devices()[0].platform} devices in {self.processes} "
                f"process(es) (keras.distribution.DataParallel)")

    def barrier(self, name: str) -> None:
        if self.processes > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def agree(self, text: str) -> str:
        if self.processes == 1:
            return text
        from jax.experimental import multihost_utils

        data = np.zeros(1024, np.uint8)
        encoded = text.encode()[:1024]
        data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
        chief = np.asarray(multihost_utils.broadcast_one_to_all(data))
        return bytes(chief.astype(np.uint8)).rstrip(b"\0").decode()

    def minimum(self, value: int) -> int:
        if self.processes == 1:
            return value
        from jax.experimental import multihost_utils

        return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))

    def local_weights(self, model) -> list[np.ndarray]:
        # Replicated across processes: every process holds a full copy on its own devices.
        return [np.asarray(v.value.addressable_data(0)) for v in model.weights]

    def release(self) -> None:
        import keras

        keras.distribution.set_distribution(None)

    def _lost_peer(self, exc: BaseException) -> bool:
        text = str(exc).lower()
        return type(exc).__name__ in ("XlaRuntimeError", "JaxRuntimeError") or any(
            word in text for word in ("gloo", "connection", "deadline", "heartbeat", "unavailable"))


class _TensorflowEngine(Engine):
    distribution = "data_parallel"

    def __init__(self, cluster: Cluster):
        super().__init__(cluster)
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):  # (list_logical_devices would fix the devices)
            devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        else:
            count = _int(os.environ, TF_CPU_DEVICES_ENV, "1")
            cpu = tf.config.list_physical_devices("CPU")[0]
            if count > 1:
                try:
                    tf.config.set_logical_device_configuration(
                        cpu, [tf.config.LogicalDeviceConfiguration()] * count)
                except RuntimeError:
                    raise FlowersError(f"{TF_CPU_DEVICES_ENV}={count}: TensorFlow's devices were "
                                       "already set up in this process") from None
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        self.strategy = tf.distribute.MirroredStrategy(devices)
        self.replicas = self.strategy.num_replicas_in_sync

    def describe(self) -> str:
        return f"{self.replicas} devices on this host (tf.distribute.MirroredStrategy)"

    def scope(self):
        return self.strategy.scope()

    # A metric variable under MirroredStrategy is a SyncOnRead variable: one running value per
    # device, summed when read (reading its .value as an array fails). Saved and restored per
    # device, a resumed epoch's sums are the uninterrupted epoch's to the bit.
    def replica_values(self, variable) -> np.ndarray:
        copies = self._copies(variable)
        return super().replica_values(variable) if copies is None else \
            np.stack([np.asarray(copy.numpy()) for copy in copies])

    def add_to_replicas(self, variable, values: np.ndarray) -> None:
        copies = self._copies(variable)
        if copies is None:
            return super().add_to_replicas(variable, values)
        if len(values) != len(copies):  # saved with another number of devices: the total to one
            values = [values.sum(axis=0)] + [np.zeros_like(values[0])] * (len(copies) - 1)
        for copy, value in zip(copies, values, strict=True):
            copy.assign_add(value)

    @staticmethod
    def _copies(variable):
        import tensorflow as tf

        value = variable.value
        return value.values if isinstance(value, tf.distribute.DistributedValues) else None


class _TorchEngine(Engine):
    distribution = "data_parallel"

    def __init__(self, cluster: Cluster):
        super().__init__(cluster)
        import torch
        import torch.distributed as dist

        self.replicas = cluster.num_processes
        if torch.cuda.is_available():
            if torch.cuda.device_count() > 1 and cluster.num_processes == 1:
                raise FlowersError(
                    f"torch data-parallel runs one process per GPU ({torch.cuda.device_count()} "
                    "visible): torchrun --standalone --nproc_per_node="
                    f"{torch.cuda.device_count()} -m flowers train ... --distribute data-parallel")
            torch.cuda.set_device(cluster.local_rank)
        if cluster.num_processes == 1:
            return
        host, _, port = (cluster.coordinator or "127.0.0.1:29500").rpartition(":")
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=port, RANK=str(cluster.process_id),
                          WORLD_SIZE=str(cluster.num_processes))
        try:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                    timeout=timedelta(seconds=collective_timeout_s()))
        except Exception as exc:  # noqa: BLE001  (torch raises RuntimeError/DistBackendError)
            raise FlowersError(f"torch.distributed could not join {cluster.coordinator} as rank "
                               f"{cluster.process_id} of {cluster.num_processes}: "
                               f"{str(exc).splitlines()[0]}") from None

    def describe(self) -> str:
        import torch

        device = "GPU" if torch.cuda.is_available() else "CPU"
        return (f"{self.replicas} {device} process(es) (torch.distributed "
                f"{'nccl' if device == 'GPU' else 'gloo'}, gradients all-reduced by hooks)")

    def shard(self, dataset):
        if self.processes == 1:
            return dataset
        rank, size = self.cluster.process_id, self.processes

        def mine(images, labels):
            share = _tf().shape(images)[0] // size
            return images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share]

        return dataset.map(mine)

    def callbacks(self) -> list:
        return [] if self.processes == 1 else [_torch_callback()]

    def _lost_peer(self, exc: BaseException) -> bool:
        import torch.distributed as dist

        text = str(exc).lower()
        return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(
            word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout")))

    def barrier(self, name: str) -> None:
        if self.processes > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, text: str) -> str:
        if self.processes == 1:
            return text
        import torch.distributed as dist

        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_in_sync(self, model) -> None:
        # Every rank applies the same averaged gradients to the same weights, so the weights must
        # be bitwise equal; a digest per rank shows any drift (e.g. a variable without a hook).
        if self.processes == 1:
            return
        import hashlib

        import torch.distributed as dist

        digest = hashlib.sha256()
        for weight in model.get_weights():
            digest.update(np.ascontiguousarray(weight).tobytes())
        digests: list[str | None] = [None] * self.processes
        dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            raise FlowersError(f"the {self.processes} torch processes ended with different weights "
                               "(data-parallel replicas drifted apart); the run was not written")

    def minimum(self, value: int) -> int:
        if self.processes == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor[0])


def _tf():
    import tensorflow as tf

    return tf


def _torch_callback():
    """Keras callback: rank 0's weights everywhere, gradients averaged, logs averaged over ranks."""
    import keras
    import torch
    import torch.distributed as dist

    def average(tensor):
        tensor = tensor.contiguous()
        dist.all_reduce(tensor)
        return tensor / dist.get_world_size()

    class AllReduce(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._hooks = []

        def on_train_begin(self, logs=None):
            with torch.no_grad():
                for variable in self.model.variables:
                    dist.broadcast(variable.value.data, src=0)
            self._hooks = [v.value.register_hook(average) for v in self.model.trainable_variables]

        def on_train_end(self, logs=None):
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

        def on_epoch_end(self, epoch, logs=None):
            # Each rank's metrics cover its slice of every batch (equal sizes): their mean is the
            # global value; changed in place so the logger, history and checkpoint see it.
            for key, value in (logs or {}).items():
                logs[key] = float(average(torch.tensor([float(value)], dtype=torch.float64))[0])

    return AllReduce()

