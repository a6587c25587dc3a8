"""Signals for a parent that trains in worker processes.

Ctrl-C reaches every process of the terminal's group, so each worker saves and stops by itself. A
SIGTERM sent to the parent alone (a scheduler, `kill PID`) does not: without passing it on, the
parent dies and its workers train on, unparented, into the run directory a later `resume` writes to.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def sigterm_interrupts(pass_to_workers: bool = False) -> Iterator[None]:
    """Within the block a SIGTERM to this process raises KeyboardInterrupt here, the usual stop (the
    training loop, which installs its own handler, turns either into a clean stop); with
    `pass_to_workers`, it is first passed to this process's workers, each of which saves and stops."""

    def terminate(*_: object) -> None:
        if pass_to_workers:
            for child in mp.active_children():
                child.terminate()
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def sigterm_to_workers():
    """`sigterm_interrupts` for a parent of worker processes."""
    return sigterm_interrupts(pass_to_workers=True)
