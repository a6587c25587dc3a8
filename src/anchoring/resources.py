"""Checking a run fits in memory before anything is allocated."""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Callable

from anchoring.errors import AnchoringError


def available_bytes() -> int:
    """Memory the OS says a new allocation can use (MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def check_fits(needed: int, what: str, advice: str) -> None:
    """Refuse, with the estimate, a run that would need more than 80% of the available memory."""
    have = available_bytes()
    if needed > 0.8 * have:
        raise AnchoringError(f"{what} needs about {needed / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB is available; {advice}")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if os.name != "posix":
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library already loaded; glibc only (musl and macOS have none)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Why: one LM job allocates and frees hundreds of MB of activations and optimiser state; glibc
    keeps most of the freed heap, scattered between longer-lived objects, and a process that runs
    job after job (the run's own loop, a worker) grew by about 40 MB per job (a 100-seed run passed
    7.9 GB). Called between jobs, it costs milliseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
