"""The Engine interface the training code asks (see flowers.distribute), and its no-distribution
implementation: one process, one device."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from flowers.distribute.cluster import SINGLE_PROCESS, Cluster
from flowers.errors import PeerLost


class Engine:
    """No distribution: one process, one device (the methods are the interface: see flowers.distribute)."""

    distribution = "none"

    def __init__(self, cluster: Cluster = SINGLE_PROCESS):
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

