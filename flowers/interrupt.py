"""SIGINT and SIGTERM (Ctrl-C, a cloud preemption notice): stop at a step boundary, exit 128 + signal.

The CLI installs the handlers. Outside training a signal raises Interrupted at once (files being
written are atomic, flowers.files, so nothing half-written is left). While model.fit runs
(`deferred()`), the signal is only recorded and training stops at the next step boundary
(`check()`, called by a callback after each step and after each epoch's checkpoint), once the
state after that step is saved (flowers.training.callbacks.StepBoundary), so `--resume` continues
from there. A second signal while one is pending stops at once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []
_deferring = [False]


class Interrupted(BaseException):
    """The process got SIGINT or SIGTERM. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it; the CLI exits with 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
        self.hint = ""  # what the interrupted command leaves behind and how to continue it


def install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _handle)


def _handle(signum, frame) -> None:
    if _deferring[0] and not _pending:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a signal waits for check() (the next step boundary) instead of raising."""
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = False
    check()


def pending() -> bool:
    """Whether a signal is waiting for check()."""
    return bool(_pending)


def check() -> None:
    """Raise Interrupted if a signal arrived since deferred() began."""
    if _pending:
        raise Interrupted(_pending.pop())
