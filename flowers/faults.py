"""Named points where a test can kill this process for real: FLOWERS_FAULT=<point> sends SIGKILL.

Fault-tolerance tests run `flowers` as a subprocess with FLOWERS_FAULT set to one of these points and
check what the kill leaves behind (a complete run, or an `.incomplete-` one that --resume finishes):

    checkpoint-published:<epoch>   right after epoch <epoch>'s checkpoint directory is published
"""

from __future__ import annotations

import os
import signal
import sys

FAULT_ENV = "FLOWERS_FAULT"


def point(name: str) -> None:
    """SIGKILL this process here when FLOWERS_FAULT names this point (nothing otherwise)."""
    if os.environ.get(FAULT_ENV) == name:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
