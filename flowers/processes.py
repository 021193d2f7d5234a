"""Child processes: the one home of starting and stopping them (below every other flowers module).

- child_env(): the environment of every flowers child: the parent's, without KERAS_BACKEND (each
  child selects its own), with Python warnings off, optionally without GPUs.
- run_command(): a plain tool (git, nvidia-smi), its stdout or one FlowersError line.
- start_process() / stop_process(): a long-running flowers process (a server) and its graceful stop.
- start_group() / kill_group(): a silent process in its own process group (the benchmark's CPU
  load), killed with everything it started.
- run_tool(): an installer or converter run to completion (pip, npm, tensorflowjs_converter).
- start_pipe(): a helper speaking a binary protocol on stdin/stdout (the TF.js node runner).

The worker protocols (a request file, or JSON lines, under one backend) start their children in
flowers/workers.py, with child_env(); no other module starts a process.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

from flowers.errors import FlowersError

Process = subprocess.Popen  # what start_process returns


def child_env(cpu_only: bool = False, drop: Iterable[str] = ()) -> dict[str, str]:
    """The environment of a flowers child process (see the module docstring).

    cpu_only hides every GPU from the child (CUDA_VISIBLE_DEVICES=""); drop removes more variables.
    """
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND" and k not in set(drop)}
    env.setdefault("PYTHONWARNINGS", "ignore")
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_command(args: Sequence[str], timeout_s: float = 30) -> str:
    """Run a plain tool (git, nvidia-smi); its stripped stdout, or FlowersError saying why not."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s,
                              check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FlowersError(f"{args[0]}: {type(exc).__name__}") from None
    return done.stdout.strip()


def start_process(args: Sequence[str], log: IO[str], drop_env: Iterable[str] = ()) -> subprocess.Popen:
    """Start a long-running flowers process (a server) with child_env(), output to log."""
    return subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT,
                            env=child_env(drop=drop_env))


def stop_process(process: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM, wait for the graceful exit, SIGKILL after timeout_s; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def start_group(args: Sequence[str]) -> subprocess.Popen:
    """Start a silent process (no input, output discarded) in its own process group."""
    return subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def kill_group(process: subprocess.Popen) -> int:
    """SIGKILL the process group start_group() made (the process and all it started); its status."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.wait()


def run_tool(args: Sequence[str], timeout_s: float, cwd: str | os.PathLike | None = None,
             env: dict[str, str] | None = None) -> str:
    """Run an installer or converter (pip, npm, tensorflowjs_converter) to completion; its output.

    Raises:
        FlowersError: it could not start, ran past timeout_s, or failed; the message ends with the
            last line of its output that says why.
    """
    try:
        done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FlowersError(f"{Path(args[0]).name} ran past {timeout_s:.0f} s") from None
    except OSError as exc:
        raise FlowersError(f"{args[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        raise FlowersError(f"{Path(args[0]).name} failed (exit {done.returncode}): "
                           f"{last_error_line(done.stderr + done.stdout)}")
    return done.stdout


def last_error_line(output: str) -> str:
    """The line of a tool's output that best says why it failed: the last one naming an error."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def start_pipe(args: Sequence[str], cwd: str | os.PathLike | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a helper that speaks a binary protocol on stdin/stdout (the TF.js node runner); its
    stderr is discarded. Stop it with stop_process."""
    return subprocess.Popen(list(args), cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
