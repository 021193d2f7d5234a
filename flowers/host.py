"""Facts about this machine and its software, each found one way: package versions, CPU and RAM,
the GPUs nvidia-smi sees, the git commit of this checkout, and muting C++ libraries' stderr chatter.

Imports no ML framework. Per-backend facts (devices, memory peaks) are in flowers/backend.py.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from flowers.errors import FlowersError
from flowers.paths import CHECKOUT
from flowers.processes import run_command


def package_version(distribution: str) -> str | None:
    """The installed version of a pip distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(distributions: Iterable[str]) -> dict[str, str | None]:
    return {name: package_version(name) for name in distributions}


def host_info() -> dict[str, Any]:
    """CPU model, logical cores and RAM of this machine (for report headers)."""
    import psutil

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
    }


def nvidia_gpus() -> list[str]:
    """Names of NVIDIA GPUs reported by nvidia-smi (empty without a driver); imports no framework."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = run_command(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], timeout_s=20)
    except FlowersError:
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def git_state() -> dict[str, Any]:
    """Commit of this checkout, and whether its tree has uncommitted changes."""
    if CHECKOUT is None:
        return {"commit": None, "dirty": None, "null_reason": "installed from a wheel, not a checkout"}
    try:
        commit = run_command(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"])
        dirty = bool(run_command(["git", "-C", str(CHECKOUT), "status", "--porcelain"]))
    except FlowersError as exc:
        return {"commit": None, "dirty": None,
                "null_reason": f"not a git checkout or git unavailable ({exc})"}
    return {"commit": commit, "dirty": dirty}


def can_reach(host: str, port: int = 443, timeout_s: float = 5.0) -> bool:
    """True when a TCP connection to host:port opens (used before a download, to fail fast)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Mute what C++ libraries write straight to file descriptor 2 (TensorFlow's start-up lines,
    LiteRT's INFO lines), which would bury the one-line messages users need to see.

    Python exceptions raised inside still propagate. TF_CPP_MIN_LOG_LEVEL=0 keeps the chatter.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    sys.stderr.flush()
    saved_fd, devnull_fd = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull_fd, 2)
    try:
        yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull_fd)
