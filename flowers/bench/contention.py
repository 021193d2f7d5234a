"""A bounded CPU load for `flowers bench --contention`: one busy process per logical core.

Each load process spins in pure Python (one core each, no memory traffic to speak of) until the
bench stops it or its own deadline passes, whichever comes first, so a bench that dies cannot leave
the machine loaded. Every process runs in its own process group and is killed by group on exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from flowers import processes as children

# the load's own limit: a bench killed mid-way leaves it running this long at most
MAX_LOAD_S = 1800
SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def background_load(processes: int | None = None, limit_s: float = MAX_LOAD_S) -> Iterator[int]:
    """Run `processes` (default: one per logical core) CPU-bound processes for the with-block.

    Yields the number of load processes started.
    """
    count = processes or os.cpu_count() or 1
    started: list[children.Process] = []
    try:
        for _ in range(count):
            started.append(children.start_group([sys.executable, "-c", SPIN.format(limit=float(limit_s))]))
        yield count
    finally:
        for process in started:
            children.kill_group(process)
