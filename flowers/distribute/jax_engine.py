"""jax data-parallel: keras.distribution.DataParallel over every device (jax.distributed for
several processes; Keras shards the tf.data batches per process itself)."""

from __future__ import annotations

import numpy as np

from flowers.distribute.cluster import Cluster, collective_timeout_s
from flowers.distribute.engine import Engine
from flowers.errors import FlowersError


class JaxEngine(Engine):
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

