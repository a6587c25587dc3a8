"""Atomic file writes: temp file in the same folder, flushed to disk, then rename. Readers never see
half a file, and a crash or power cut just after a save leaves the old file or the new one, never an
empty one (a rename can reach the disk before the data it points to)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_stem(name: str, room: int = 32) -> str:
    """A hidden name for a temporary sibling of `name` that leaves `room` bytes for a suffix within the
    file system's 255-byte limit: a legal long name failed only when its temporary file was made."""
    return "." + name.encode()[: 255 - room - 1].decode("utf-8", "ignore")  # never half a character


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{temp_stem(path.name)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
        sync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sync_file(path: Path | str) -> None:
    """Flush a file written by other means (a copy) to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(folder: Path) -> None:
    """Make the rename itself durable. Some file systems cannot open a folder for syncing: skip there."""
    try:
        sync_file(folder)
    except OSError:
        pass
