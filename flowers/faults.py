"""Named points where a test can kill this process for real: FLOWERS_FAULT=<point> sends SIGKILL,
FLOWERS_FAULT=<point>=SIGTERM (or SIGINT) sends that signal instead.

Fault-tolerance tests run `flowers` as a subprocess with FLOWERS_FAULT set to one of these points and
check what the kill leaves behind (a complete run, or an `.incomplete-` one that --resume finishes):

    checkpoint-published:<epoch>   right after epoch <epoch>'s checkpoint directory is published
    checkpoint-staged:<epoch>      epoch <epoch>'s state written, before its directory is published
    train-step:<epoch>:<step>      after training step <step> (0-based) of epoch <epoch> (0-based)
    run-saved                      the run's files are all written, before its directory is renamed
"""

from __future__ import annotations

import os
import signal
import sys

FAULT_ENV = "FLOWERS_FAULT"


def point(name: str) -> None:
    """SIGKILL (or the named signal) this process here when FLOWERS_FAULT names this point."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or not wanted.startswith(name):
        return
    point_name, _, signal_name = wanted.partition("=")
    if point_name != name:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, signal_name or "SIGKILL"))
