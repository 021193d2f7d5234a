"""Named points where a test can kill this process for real: FLOWERS_FAULT=<point> sends SIGKILL,
FLOWERS_FAULT=<point>=SIGTERM (or SIGINT) sends that signal instead.

Fault-tolerance tests run `flowers` as a subprocess with FLOWERS_FAULT set to one of these points and
check what the kill leaves behind (a complete run, or an `.incomplete-` one that --resume finishes):

    checkpoint-published:<epoch>   right after epoch <epoch>'s checkpoint directory is published
    checkpoint-staged:<epoch>      epoch <epoch>'s state written, before its directory is published
    train-step:<epoch>:<step>      after training step <step> (0-based) of epoch <epoch> (0-based)
    run-saved                      the run's files are all written, before its directory is renamed
    export-worker:<backend>        `flowers export`: the Keras process under <backend> has written
                                   and run its formats (the others are not verified yet)
    publish-staged                 a staged directory is complete, before it is renamed into place
                                   (the first one of the process: an export version, a report, ...)
    publish-exchanged              a replacing directory is swapped in, the old one not yet deleted
    publish-done                   a directory is in its place (the process has not said so yet)
    export-copied                  `flowers export`: model.keras copied, no other format written
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
