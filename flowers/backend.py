"""The backend choice, device facts and memory probes: the ONLY module with per-backend branches.

`select()` must run before anything imports keras: it validates the name, checks the backend's
framework is installed (and TensorFlow, which tf.data needs everywhere), and sets KERAS_BACKEND.
Every other function here asks the chosen framework, so the rest of the code never branches on it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from flowers import host
from flowers.errors import FlowersError

BACKENDS = ("torch", "tensorflow", "jax")
# backend -> (module that must import, pip extra that installs it)
_REQUIREMENTS = {"torch": ("torch", "torch"), "tensorflow": ("tensorflow", "tensorflow"),
                 "jax": ("jax", "jax")}
# distributions that may provide each framework (first one installed wins)
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos"),
    "jax": ("jax",),
}
CPU_MEMORY_REASON = "no framework allocator on CPU; see peak_host_rss_mb"


def check_name(name: str) -> str:
    """Return `name` if it is a known backend, else raise a one-line error listing them."""
    if name not in BACKENDS:
        raise FlowersError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def check_installed(name: str) -> str:
    """Raise a one-line error naming the pip extra when the backend's framework is missing."""
    for module, extra in {_REQUIREMENTS[name], ("tensorflow", "tensorflow")}:
        if importlib.util.find_spec(module) is None:
            raise FlowersError(
                f"backend {name!r} needs {module}, which is not installed; "
                f"install it with: pip install -e '.[{extra}]'"
            )
    return name


def select(name: str) -> str:
    """Choose the Keras backend for this process. Call before anything imports keras.

    Args:
        name: "torch", "tensorflow" or "jax".

    Returns:
        The backend name.

    Raises:
        FlowersError: unknown backend, framework not installed, or keras already imported with
            a different backend in this process.
    """
    check_installed(check_name(name))
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != name:
            raise FlowersError(
                f"keras is already loaded with backend {keras.backend.backend()!r} in this process; "
                f"run {name!r} in a new process"
            )
    os.environ["KERAS_BACKEND"] = name
    # TensorFlow's C++ start-up chatter would bury the one-line messages users need to see.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if name == "torch":
        keep_freed_memory()
        bounded_openmp_spin()
    if "tensorflow" not in sys.modules:
        with host.quiet_stderr():  # its C++ start-up lines come before TF_CPP_MIN_LOG_LEVEL applies
            import tensorflow  # noqa: F401  (every backend needs it for tf.data)
    if name == "torch":  # eager: free each activation after its last use (flowers.graph_memory)
        from flowers import graph_memory

        graph_memory.install()
    return name


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap instead of returning it to the OS (Linux, torch).

    Eager PyTorch on the CPU allocates every activation with malloc; blocks over 32 MiB (a batch of
    224 px ResNet activations) are mmap-ed and unmapped on every call, so each forward pass
    page-faults its activations in afresh: `flowers bench` measured about 150,000 page faults and a
    third of the CPU time in the kernel per Keras forward call at batch 32 on a 2-core CPU. With
    mmap off and trimming off, freed blocks are reused (no faults after the first call) and the
    peak RSS is what the largest step needs. FLOWERS_KEEP_FREED_MEMORY=0 turns this off. Returns
    whether the setting was applied.
    """
    if os.environ.get("FLOWERS_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


# OpenMP busy-wait iterations before an idle torch thread sleeps (libgomp's default is 300,000)
OPENMP_SPINCOUNT = "30000"


def bounded_openmp_spin() -> bool:
    """Shorten how long torch's OpenMP threads busy-wait between parallel regions (GOMP_SPINCOUNT).

    Eager torch runs every op as its own OpenMP region; between them libgomp's threads spin for
    up to 300,000 iterations before sleeping. On a CPU that other processes also use, those spins
    take the cores the work needs. With one busy process per core, Keras-on-torch ResNet50 forward
    at 224 px, batch 1, ran 7-10x slower than quiet with 100,000 spins and 3.7-4.8x with 30,000, at
    the same quiet speed (2-core AMD EPYC Zen 3; tensorflow 1.5x). Fewer spins cost quiet speed:
    10,000 5-15%, 300 or OMP_WAIT_POLICY=PASSIVE (no spinning) 25-32%, for a 2.6-2.8x slowdown.
    Must be set before torch loads libgomp (select() runs before keras is imported). A
    GOMP_SPINCOUNT or OMP_WAIT_POLICY of the user's own wins; FLOWERS_OPENMP_SPIN=0 leaves
    libgomp's default. Returns whether the setting was applied.
    """
    if os.environ.get("FLOWERS_OPENMP_SPIN", "1") == "0" or "torch" in sys.modules:
        return False
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT
    return True


def installed_versions() -> dict[str, str | None]:
    """Version of each backend's framework, or None when it is not installed (imports nothing)."""
    found = {}
    for name, dists in _DISTRIBUTIONS.items():
        found[name] = next((v for d in dists if (v := host.package_version(d))), None)
    return found


def versions(name: str) -> dict[str, str | None]:
    """Versions that identify a measurement: backend framework, keras, tensorflow (tf.data), python."""
    installed = installed_versions()
    return {
        "backend_version": installed[name],
        "keras_version": host.package_version("keras"),
        "tensorflow_version": installed["tensorflow"],
        "python_version": platform.python_version(),
    }


def preferred_data_format(name: str) -> str:
    """The backbone layout model.data_format="auto" picks (measured with `flowers bench`).

    torch's convolutions take NCHW; with channels_last keras transposes around every conv.
    TensorFlow on CPU only runs NHWC convolutions, and XLA (tensorflow, jax) picks its own layout.
    """
    return "channels_first" if name == "torch" else "channels_last"


def conv_kernel_storage(name: str, data_format: str) -> Callable[..., Any] | None:
    """An initializer that makes a Conv2D kernel (kh, kw, in, out) in the memory layout this
    backend's convolution reads, or None where Keras' own layout serves (flowers.fold).

    Keras-on-torch permutes the kernel to (out, in, kh, kw) on every call, a non-contiguous view
    that torch's convolution copies (channels_last: into that memory format); stored as the
    permutation of a contiguous tensor in that order, the view needs no copy. Assigning values
    keeps a variable's strides. TensorFlow and jax trace the model, and their compilers pick the
    layouts. The zeros are replaced by the layer's weights.
    """
    if name != "torch":
        return None
    import numpy as np
    import torch

    # the order torch's convolution reads: NCHW (out, in, kh, kw) or its channels_last strides
    order = (3, 2, 0, 1) if data_format == "channels_first" else (3, 0, 1, 2)
    inverse = tuple(int(i) for i in np.argsort(order))

    def zeros(shape, dtype=None):
        import keras

        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        stored = torch.zeros([shape[i] for i in order], dtype=getattr(torch, dtype))
        return stored.permute(inverse)

    return zeros


def deterministic_kernels(name: str, requested: bool) -> dict[str, Any]:
    """train.deterministic: turn on the framework's deterministic-kernel switch; what was done.

    TensorFlow: op determinism (also makes tf.data deterministic); torch:
    use_deterministic_algorithms (CUBLAS_WORKSPACE_CONFIG set for cuBLAS, before CUDA starts); jax:
    XLA's --xla_gpu_deterministic_ops (read when jax starts its GPU backend, so set before the
    first computation). On a CPU these kernels are deterministic already: only recorded.
    """
    if not requested:
        return {"requested": False, "applied": None}
    if name == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        applied = "tf.config.experimental.enable_op_determinism()"
    elif name == "torch":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        import torch

        torch.use_deterministic_algorithms(True)
        applied = "torch.use_deterministic_algorithms(True)"
    else:
        flags = os.environ.get("XLA_FLAGS", "")
        if "--xla_gpu_deterministic_ops" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()
        applied = "XLA_FLAGS=--xla_gpu_deterministic_ops=true"
    return {"requested": True, "applied": applied}


def hide_gpus_from_tensorflow(name: str | None = None) -> None:
    """Keep TensorFlow off the GPU when it is not the training backend `name` (always when None).

    TensorFlow then only feeds tf.data (or runs a SavedModel on the CPU, as export verification does).
    """
    if name == "tensorflow":
        return
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # devices already initialised: nothing was claimed through us, keep going


def device(name: str) -> str:
    """The device this backend computes on: the GPU's name, or "cpu"."""
    if name == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return "cpu"
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "gpu")
    import jax

    first = jax.devices()[0]
    return "cpu" if first.platform == "cpu" else first.device_kind


def reset_peak_device_memory(name: str) -> None:
    """Start a new peak window for peak_device_memory_mb (no-op on CPU)."""
    if device(name) == "cpu":
        return
    if name == "torch":
        import torch

        torch.cuda.reset_peak_memory_stats()
    elif name == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")
    # jax has no reset; its peak counts from process start, which is this run's start.


def peak_device_memory_mb(name: str) -> tuple[float | None, str | None]:
    """Framework allocator peak on the GPU in MiB, or (None, reason) where it cannot be measured."""
    if device(name) == "cpu":
        return None, CPU_MEMORY_REASON
    if name == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20, None
    if name == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, None
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return None, "jax device reports no peak_bytes_in_use"
    return stats["peak_bytes_in_use"] / 2**20, None


# How to get a GPU-capable build of each framework (the extras are in pyproject.toml).
GPU_INSTALL = {
    # a +cpu wheel satisfies torch==2.13.0, so a plain install would keep it
    "torch": "pip install --force-reinstall torch==2.13.0 (PyPI's Linux wheel is the CUDA "
             "build; do not use the download.pytorch.org/whl/cpu index)",
    "tensorflow": "pip uninstall tensorflow-cpu && pip install -e '.[tensorflow-gpu]'",
    "jax": "pip install -e '.[jax-gpu]'",
}


def gpu_warning(name: str) -> str | None:
    """One line when nvidia-smi sees a GPU that the installed build of `name` cannot use, else None.

    Training would silently run on the CPU (e.g. `.[tensorflow]` installs tensorflow-cpu). Asks the
    framework itself, so a CUDA build that cannot load its libraries is caught too. Call it after
    select(); it imports the backend's framework.
    """
    gpus = host.nvidia_gpus()
    if not gpus or device(name) != "cpu":
        return None
    build = next((f"{dist} {version}" for dist in _DISTRIBUTIONS[name]
                  if (version := host.package_version(dist))), name)
    return (f"an NVIDIA GPU is visible ({gpus[0]}) but the installed {name} build ({build}) cannot "
            f"use it, so {name} trains on the CPU; for the GPU: {GPU_INSTALL[name]}")
