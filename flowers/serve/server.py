"""Run the app under uvicorn: a socket bound here, one model per worker, graceful stop, exit status.

The socket is bound before uvicorn starts, so "port in use" is one line and a non-zero exit like
every other startup mistake. One worker runs in this process; with --workers N uvicorn's supervisor
starts N processes that share the socket, each loading its own model (settings passed as JSON in
$FLOWERS_SERVE_SETTINGS, metrics summed through $PROMETHEUS_MULTIPROC_DIR).

SIGTERM (and Ctrl-C): uvicorn stops accepting, answers every open request, runs the lifespan
shutdown; this process then exits 0. uvicorn re-raises the signal it caught once it is done, so the
handlers installed here only note it, instead of letting the default handler kill the process.
A model that fails to load (found by a worker in the background) is written to a file and stops
the server; serve() then raises it as a FlowersError.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from flowers.errors import FlowersError
from flowers.serve.settings import SETTINGS_ENV, ServeSettings

# uvicorn configures this logger (uvicorn.Config); these lines appear among its own.
log = logging.getLogger("uvicorn.error")
# Bounded drain: a client that never reads its answer cannot keep the server alive forever.
GRACEFUL_SHUTDOWN_S = 60
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port, as uvicorn would bind it.

    Raises:
        FlowersError: the port is in use, or the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise FlowersError(f"port {port} on {host} {reason}; choose another with --port") from None
    sock.set_inheritable(True)  # uvicorn's worker processes serve on this socket
    return sock


def serve(settings: ServeSettings, host: str, port: int, workers: int = 1, access_log: bool = False,
          log_level: str = "info") -> None:
    """Serve until SIGTERM or Ctrl-C (then return normally, after answering open requests).

    Raises:
        FlowersError: the port cannot be bound, or the model failed to load.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if workers < 1:
        raise FlowersError(f"--workers must be at least 1, not {workers}")
    sock = bind(host, port)
    with tempfile.TemporaryDirectory(prefix="flowers-serve-") as scratch:
        failure_file = Path(scratch) / "failure.txt"
        settings = replace(settings, failure_file=str(failure_file), supervisor_pid=os.getpid())
        common = dict(workers=workers, access_log=access_log, log_level=log_level, lifespan="on",
                      timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        with _noted_signals():
            listening = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
            if workers == 1:
                from flowers.serve.app import create_app

                config = uvicorn.Config(create_app(settings), **common)
                log.info("listening on %s (1 worker)", listening)
                uvicorn.Server(config).run(sockets=[sock])
            else:
                metrics_dir = Path(scratch) / "metrics"
                metrics_dir.mkdir()
                with _environment({SETTINGS_ENV: settings.to_json(),
                                   "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}):
                    config = uvicorn.Config("flowers.serve.app:app_from_env", factory=True, **common)
                    log.info("listening on %s (%d workers, one model each)", listening, workers)
                    Multiprocess(config, sockets=[sock]).run()
        sock.close()
        if failure_file.is_file():
            raise FlowersError(failure_file.read_text().strip() or "the model failed to load")


@contextlib.contextmanager
def _noted_signals() -> Iterator[None]:
    saved = {sig: signal.signal(sig, lambda signum, frame: None) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for spawned workers, restoring the previous values after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
