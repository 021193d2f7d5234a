"""Worker protocols: work under another Keras backend, in a child process.

A process can run one Keras backend only, so work under another backend runs in a child process
(`python -m <module> ...`). Two protocols, one rule for failures:

- One-shot (run_worker / worker_main): the parent writes a request JSON file, the child selects the
  request's backend, runs its handler and writes the handler's result JSON beside the request.
  Export, parity, the serving benchmark's in-process measurement and the benchmark's end-to-end runs
  use it. Large arrays travel as files named in the request.
- Line by line (LineWorker / worker_main's --lines mode): a long-lived child answers one JSON line
  per request on stdin, so the benchmark can interleave backends round by round.

Failures: a child that raises FlowersError prints `error: <line>` and exits 1; the parent raises
FlowersError("<what> under <backend> failed: <line>"), so the child's one-line error reaches the user.
Any other exit is a crash: "<what> under <backend> crashed (exit status N): <last stderr line>"
(the last exception line when there is one, e.g. the last line of a traceback).

Every child gets processes.child_env(): the parent's environment without KERAS_BACKEND (each child
selects its own) and with Python warnings off. Plain tools and servers are started by
flowers/processes.py.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from flowers import files
from flowers.errors import FlowersError
from flowers.processes import child_env

LINES_FLAG = "--lines"
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b")


def failure(what: str, backend_name: str, returncode: int | None, stderr: str) -> str:
    """The one-line error for a failed child (the rule in the module docstring)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if errors:
        return f"{what} under {backend_name} failed: {errors[-1]}"
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    last = (exceptions or lines or ["no output"])[-1][:500]
    return f"{what} under {backend_name} crashed (exit status {returncode}): {last}"


def result_path(request_path: Path) -> Path:
    """Where a one-shot child writes the result of request_path."""
    return request_path.with_name(request_path.name.removesuffix(".request.json") + ".result.json")


def run_worker(module: str, backend_name: str, request: dict[str, Any], work_dir: Path, what: str,
               cpu_only: bool = False, timeout_s: float | None = None,
               log: Path | None = None) -> Any:
    """Run `python -m module REQUEST` under backend_name; returns the result its handler returned.

    Args:
        module: a module whose `__main__` calls worker_main.
        backend_name: the Keras backend the child selects (added to the request as "backend").
        request: JSON-able request for the child's handler.
        work_dir: an existing folder for the request and result files.
        what: names the job in errors, e.g. "parity" or "writing onnx".
        cpu_only: hide GPUs from the child.
        timeout_s: kill the child after this many seconds (FlowersError then).
        log: also keep the child's stderr in this file (for a long job's diagnosis).

    Raises:
        FlowersError: the child failed (see the module docstring) or ran out of time.
    """
    name = f"{module.rsplit('.', 1)[-1]}-{backend_name}-{secrets.token_hex(3)}"
    request_path = work_dir / f"{name}.request.json"
    files.write_json(request_path, {**request, "backend": backend_name})
    try:
        done = subprocess.run([sys.executable, "-m", module, str(request_path)], capture_output=True,
                              text=True, env=child_env(cpu_only), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FlowersError(f"{what} under {backend_name} did not finish within {timeout_s:g} s") from None
    if log is not None:
        files.write_text(log, done.stderr)
    output = result_path(request_path)
    if done.returncode != 0 or not output.is_file():
        raise FlowersError(failure(what, backend_name, done.returncode, done.stderr))
    return files.read_json(output)


def worker_main(run: Callable[[dict[str, Any]], Any] | None = None,
                start: Callable[[dict[str, Any]], Any] | None = None,
                argv: Sequence[str] | None = None) -> None:
    """The child side of both protocols; a worker module's `if __name__ == "__main__":` calls it.

    Args:
        run: one-shot handler, request -> JSON-able result (`python -m module REQUEST.json`).
        start: line-mode factory (`python -m module --lines`): called with the first line's request,
            returns an object with describe() -> dict (sent as {"ready": ...}) and
            handle(message) -> dict (one reply per later line). {"task": "quit"} ends it.

    Both run after the request's backend is selected and TensorFlow is kept off the GPU when it is
    not the training backend. A FlowersError becomes `error: <line>` on stderr and exit status 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == [LINES_FLAG] and start is not None:
        _serve_lines(start)
        return
    if len(argv) != 1 or run is None:
        raise SystemExit("usage: python -m <worker module> REQUEST.json | --lines")
    request_path = Path(argv[0])
    try:
        result = run(_prepare(files.read_json(request_path)))
    except FlowersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    files.write_json(result_path(request_path), result)


def _prepare(request: dict[str, Any]) -> dict[str, Any]:
    from flowers import backend

    name = backend.select(request["backend"])
    backend.hide_gpus_from_tensorflow(name)
    return request


def _serve_lines(start: Callable[[dict[str, Any]], Any]) -> None:
    # Replies go to the original stdout; everything else printed (keras progress, C++ logs) is sent
    # to stderr so it cannot corrupt the protocol.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    first = sys.stdin.readline()
    try:
        worker = start(_prepare(json.loads(first)))
    except FlowersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    _send(protocol, {"ready": worker.describe()})
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("task") == "quit":
            break
        try:
            _send(protocol, worker.handle(message))
        except Exception as exc:  # reported to the parent, which names the job
            _send(protocol, {"error": f"{type(exc).__name__}: {exc}"})


def _send(stream: IO[str], message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


class LineWorker:
    """A long-lived child under one backend, spoken to one JSON line at a time.

    Its stderr goes to `log`; `ready` is what the child's describe() returned.
    """

    def __init__(self, module: str, backend_name: str, request: dict[str, Any], log: Path,
                 what: str):
        self.backend, self.what, self.log = backend_name, what, log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, LINES_FLAG], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log_file, text=True, env=child_env())
        self.ready = self._exchange({**request, "backend": backend_name}, what)["ready"]

    def ask(self, message: dict[str, Any], what: str) -> dict[str, Any]:
        """Send one request; its reply, or FlowersError naming `what` and this backend."""
        reply = self._exchange(message, what)
        if "error" in reply:
            raise FlowersError(f"{what} under {self.backend} failed: {reply['error']}")
        return reply

    def _exchange(self, message: dict[str, Any], what: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except OSError:
            pass  # the child is gone; readline() reports it
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self._log_file.flush()
            raise FlowersError(failure(what, self.backend, self.process.returncode,
                                       self.log.read_text()) + f" (log: {self.log})")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"task": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._log_file.close()
