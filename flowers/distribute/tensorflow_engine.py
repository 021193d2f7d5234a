"""tensorflow data-parallel: tf.distribute.MirroredStrategy over this host's GPUs, or over
FLOWERS_TF_CPU_DEVICES logical CPU devices (one host only; see flowers.distribute)."""

from __future__ import annotations

import os

import numpy as np

from flowers.distribute.cluster import Cluster, whole_number
from flowers.distribute.engine import Engine
from flowers.errors import FlowersError

TF_CPU_DEVICES_ENV = "FLOWERS_TF_CPU_DEVICES"


class TensorflowEngine(Engine):
    distribution = "data_parallel"

    def __init__(self, cluster: Cluster):
        super().__init__(cluster)
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):  # (list_logical_devices would fix the devices)
            devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        else:
            count = whole_number(os.environ, TF_CPU_DEVICES_ENV, "1")
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

