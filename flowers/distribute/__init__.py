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

cluster.py      the cluster from the environment, the collective timeout, check_request (no framework)
engine.py       the Engine interface, implemented for one process on one device
*_engine.py     one module per framework's engine; setup() below picks one (ENGINES)
"""

from __future__ import annotations

from flowers.distribute.cluster import (
    TIMEOUT_ENV,
    Cluster,
    check_request,
    collective_timeout_s,
    detect_cluster,
)
from flowers.distribute.engine import Engine
from flowers.distribute.jax_engine import JaxEngine
from flowers.distribute.tensorflow_engine import TF_CPU_DEVICES_ENV, TensorflowEngine
from flowers.distribute.torch_engine import TorchEngine
from flowers.errors import FlowersError

__all__ = ["TF_CPU_DEVICES_ENV", "TIMEOUT_ENV", "Cluster", "Engine", "check_request",
           "collective_timeout_s", "detect_cluster", "setup"]

ENGINES = {"jax": JaxEngine, "tensorflow": TensorflowEngine, "torch": TorchEngine}


def setup(distribution: str, backend_name: str, batch_size: int) -> Engine:
    """Set up the engine for this process (after backend.select, before any model is built).

    Raises:
        FlowersError: see check_request; a global batch that does not divide by the replicas; a
            cluster that cannot be joined within the collective timeout.
    """
    cluster = check_request(distribution, backend_name, batch_size)
    if distribution == "none":
        return Engine(cluster)
    engine = ENGINES[backend_name](cluster)
    if batch_size % engine.replicas:
        raise FlowersError(f"train.batch_size={batch_size} (the global batch) does not divide by the "
                           f"{engine.replicas} replicas: use a multiple of {engine.replicas}")
    return engine
