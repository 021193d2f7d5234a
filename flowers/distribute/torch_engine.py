"""torch data-parallel without Keras support (see flowers.distribute): torch.distributed, rank 0's
weights broadcast before training, every trainable variable's gradient all-reduced and averaged by a
hook, each process reading its own slice of every global batch."""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np

from flowers.distribute.cluster import Cluster, collective_timeout_s
from flowers.distribute.engine import Engine
from flowers.errors import FlowersError


class TorchEngine(Engine):
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

