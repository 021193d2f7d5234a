"""The processes of a training job, from the environment: torchrun's, keras' or Vertex AI's
description (detect_cluster), the collective timeout, and what can be refused before any framework
loads (check_request). No framework is imported here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from flowers.errors import FlowersError

TIMEOUT_ENV = "FLOWERS_COLLECTIVE_TIMEOUT_S"


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


SINGLE_PROCESS = Cluster()  # no cluster described: the one process of a plain run


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
        size, rank = whole_number(env, "WORLD_SIZE", "1"), whole_number(env, "RANK", "0")
        address = f"{env.get('MASTER_ADDR', '127.0.0.1')}:{env.get('MASTER_PORT', '29500')}"
        return _checked(Cluster(size, rank, address, whole_number(env, "LOCAL_RANK", "0"), "torchrun"))
    if "KERAS_DISTRIBUTION_NUM_PROCESSES" in env or "KERAS_DISTRIBUTION_JOB_ADDRESSES" in env:
        addresses = env.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
        size = whole_number(env, "KERAS_DISTRIBUTION_NUM_PROCESSES", str(len(addresses.split(","))))
        coordinator = addresses.split(",")[0] or None
        process_id = whole_number(env, "KERAS_DISTRIBUTION_PROCESS_ID", "0")
        return _checked(Cluster(size, process_id, coordinator, 0, "KERAS_DISTRIBUTION_*"))
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


def whole_number(env: Mapping[str, str], key: str, default: str) -> int:
    """env[key] (else default) as an int; FlowersError naming the variable when it is not one."""
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
