"""Checking a run fits in memory before anything is allocated."""

from __future__ import annotations

import os

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
