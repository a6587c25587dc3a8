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
def sigterm_to_workers() -> Iterator[None]:
    """Within the block, a SIGTERM to this process is passed to its worker processes (each saves a
    checkpoint and stops) and then raised here as KeyboardInterrupt, the parent's usual stop."""

    def terminate(*_: object) -> None:
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
